"""GSSAPI (RFC 1961) against a real MIT KDC (tests/kerberos.py), with real clients: libcurl (pycurl)
and a small client on python-gssapi that negotiates each protection level."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvloop
from kerberos import REALM, Realm, missing_tools

from conftest import ROOT, EchoServer, HttpServer, OsocksProcess, ServerThread, recv_exactly, wait_closed
from osocks import socks5
from osocks.socks5 import Command, GssMessage, Method, ReplyCode

gssapi = pytest.importorskip("gssapi", reason="python-gssapi is not installed (pip install -e '.[test]')")

if missing_tools():
    pytest.skip(
        f"Kerberos tools {', '.join(missing_tools())} are not installed (tests/run.sh installs krb5-kdc)",
        allow_module_level=True,
    )

ALICE = f"alice@{REALM}"
BOB = f"bob@{REALM}"
SERVICE = "rcmd/localhost"
TEN_MB = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def realm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Realm]:
    host_conf = Path("/etc/krb5.conf")  # krb5-user writes it; KRB5_CONFIG replaces it here, and it stays as it was
    host_before = host_conf.read_bytes() if host_conf.exists() else None
    realm = Realm.create(tmp_path_factory.mktemp("realm"))
    saved = {name: os.environ.get(name) for name in realm.env}
    os.environ.update(realm.env)  # for python-gssapi and libcurl in this process
    try:
        realm.add_user("alice")
        realm.add_user("bob")
        realm.add_service(SERVICE)
        realm.add_service("host/localhost")  # in the keytab too, but not the service osocks accepts
        realm.add_service("HTTP/localhost", realm.root / "other.keytab")
        realm.kinit("alice")
        yield realm
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        realm.stop()
    assert (host_conf.read_bytes() if host_conf.exists() else None) == host_before


@pytest.fixture
def gss_server(realm: Realm, make_server: Callable[..., ServerThread]) -> Callable[..., ServerThread]:
    def make(**options: object) -> ServerThread:
        options.setdefault("gssapi_keytab", str(realm.keytab))
        return make_server(**options)

    return make


def ccache_of(realm: Realm, user: str, lifetime: str | None = None) -> Path:
    path = realm.root / f"ccache-{user}-{lifetime or 'default'}"
    realm.kinit(user, ccache=path, lifetime=lifetime)
    return path


# -- a SOCKS5 client on python-gssapi ------------------------------------


class Rejected(Exception):
    """The server answered [1][0xFF]."""


def read_frame(sock: socket.socket) -> socks5.GssFrame:
    head = recv_exactly(sock, 2)
    if head == socks5.GSS_ABORT:
        raise Rejected()
    head += recv_exactly(sock, 2)
    length = int.from_bytes(head[2:], "big")
    parsed = socks5.parse_gss_frame(head + recv_exactly(sock, length))
    assert parsed is not None
    return parsed[0]


class GssClient:
    """Greeting with method 0x01, context establishment, protection level; then plain SOCKS5 wrapped."""

    def __init__(self, port: int, ccache: Path | None = None, target: str = SERVICE, timeout: float = 30) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.level = 0
        self.plain = b""
        self.buffer = b""
        creds = None
        if ccache is not None:
            creds = gssapi.Credentials(usage="initiate", store={"ccache": f"FILE:{ccache}"})
        flags = (
            gssapi.RequirementFlag.mutual_authentication
            | gssapi.RequirementFlag.integrity
            | gssapi.RequirementFlag.confidentiality
        )
        name = gssapi.Name(target, gssapi.NameType.kerberos_principal)
        self.context = gssapi.SecurityContext(name=name, usage="initiate", creds=creds, flags=flags)

    def greet(self, methods: bytes = b"\x01") -> int:
        self.sock.sendall(socks5.encode_greeting(methods))
        answer = recv_exactly(self.sock, 2)
        assert answer[0] == 5
        return answer[1]

    def first_token(self) -> bytes:
        return self.context.step()

    def authenticate(self, token: bytes | None = None) -> None:
        """Context establishment; raises Rejected on [1][0xFF]."""
        token = self.first_token() if token is None else token
        while True:
            self.sock.sendall(socks5.encode_gss_frame(GssMessage.CONTEXT, token))
            if self.context.complete:
                return
            frame = read_frame(self.sock)
            assert frame.kind == GssMessage.CONTEXT
            token = self.context.step(frame.token)
            if self.context.complete and not token:
                return

    def negotiate(self, level: int) -> int:
        """Asks for `level`; returns the level granted (and uses it from then on)."""
        asked = self.context.wrap(bytes((level,)), False).message
        self.sock.sendall(socks5.encode_gss_frame(GssMessage.PROTECTION, asked))
        frame = read_frame(self.sock)
        assert frame.kind == GssMessage.PROTECTION
        self.level = self.context.unwrap(frame.token).message[0]
        return self.level

    def login(self, level: int = 0, methods: bytes = b"\x01") -> int:
        assert self.greet(methods) == Method.GSSAPI
        self.authenticate()
        return self.negotiate(level)

    # SOCKS messages and data, wrapped when the level asks for it

    def seal(self, data: bytes) -> bytes:
        if not self.level:
            return data
        out = []
        step = 60000
        for start in range(0, len(data), step):
            token = self.context.wrap(data[start : start + step], self.level == 2).message
            out.append(socks5.encode_gss_frame(GssMessage.ENCAPSULATED, token))
        return b"".join(out)

    def send(self, data: bytes) -> None:
        self.sock.sendall(self.seal(data))

    def recv(self, n: int) -> bytes:
        """Exactly n plain bytes."""
        while len(self.plain) < n:
            if not self.level:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError(f"closed after {len(self.plain)} of {n} bytes")
                self.plain += chunk
                continue
            frame = read_frame(self.sock)
            assert frame.kind == GssMessage.ENCAPSULATED
            result = self.context.unwrap(frame.token)
            assert result.encrypted == (self.level == 2)
            self.plain += result.message
        data, self.plain = self.plain[:n], self.plain[n:]
        return data

    def request(self, command: int, host: str, port: int) -> tuple[int, str, int]:
        self.send(socks5.encode_request(command, host, port))
        return self.read_reply()

    def read_reply(self) -> tuple[int, str, int]:
        head = self.recv(4)
        size = {1: 6, 4: 18}.get(head[3])
        rest = self.recv(size) if size else b""
        parsed = socks5.parse_request(bytes((5, 0)) + head[2:] + rest)
        assert parsed is not None
        return head[1], parsed[0].host, parsed[0].port

    def close(self) -> None:
        self.sock.close()


def expect_rejected(client: GssClient, token: bytes | None = None) -> None:
    with pytest.raises(Rejected):
        client.authenticate(token)
    assert client.sock.recv(10) == b""  # and closed
    client.close()


def a_tunnel_of(port: int, echo: EchoServer, ccache: Path | None = None, level: int = 0) -> GssClient:
    """A GSSAPI session at this protection level, relaying to the echo server."""
    client = GssClient(port, ccache)
    try:
        assert client.login(level) == level
        code, _, _ = client.request(Command.CONNECT, "127.0.0.1", echo.port)
        assert code == ReplyCode.SUCCEEDED
    except BaseException:
        client.close()
        raise
    return client


def echoes(client: GssClient) -> bool:
    client.send(b"ping")
    return client.recv(4) == b"ping"


def works(port: int, echo: EchoServer, level: int = 0, ccache: Path | None = None) -> None:
    """A whole session: login, CONNECT to the echo server, a few bytes there and back."""
    client = a_tunnel_of(port, echo, ccache, level)
    try:
        assert echoes(client)
    finally:
        client.close()


# -- real clients --------------------------------------------------------


def test_pycurl_downloads_through_gssapi(
    gss_server: Callable[..., ServerThread], http_server: HttpServer, caplog: pytest.LogCaptureFixture
) -> None:
    import pycurl

    assert pycurl.version_info()[4] & pycurl.VERSION_GSSAPI, "this libcurl has no GSS-API"
    caplog.set_level("INFO", logger="osocks")
    osocks = gss_server(gssapi_max_protection="none")  # curl implements no per-message protection
    body = bytearray()
    curl = pycurl.Curl()
    try:
        curl.setopt(pycurl.URL, f"http://127.0.0.1:{http_server.port}/10M")
        curl.setopt(pycurl.PROXY, f"socks5://localhost:{osocks.port}")
        curl.setopt(pycurl.PROXY_SERVICE_NAME, SERVICE)  # CURLOPT_SOCKS5_GSSAPI_SERVICE's successor
        curl.setopt(pycurl.WRITEFUNCTION, body.extend)
        curl.setopt(pycurl.TIMEOUT, 60)
        curl.perform()
        assert curl.getinfo(pycurl.RESPONSE_CODE) == 200
    finally:
        curl.close()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(http_server.big).hexdigest()
    status = osocks.wait_for(lambda s: s["sessions"]["live"] == 0)
    assert status["auth_failures"] == 0
    assert f"user {ALICE} CONNECT -> 127.0.0.1:{http_server.port}: up" in caplog.text


# -- protection levels ---------------------------------------------------


@pytest.mark.parametrize("loop", [uvloop.new_event_loop, asyncio.new_event_loop], ids=["uvloop", "asyncio"])
@pytest.mark.parametrize("level", [0, 1, 2])
def test_each_level_round_trips_ten_megabytes_each_way(
    gss_server: Callable[..., ServerThread], echo: EchoServer, level: int, loop: Callable
) -> None:
    osocks = gss_server(loop_factory=loop)
    client = GssClient(osocks.port)
    assert client.login(level) == level
    code, _, _ = client.request(Command.CONNECT, "127.0.0.1", echo.port)
    assert code == ReplyCode.SUCCEEDED
    sessions = osocks.call(osocks.server.sessions)
    assert [s["user"] for s in sessions] == [ALICE]
    data = os.urandom(TEN_MB)
    sender = threading.Thread(target=client.send, args=(data,))
    sender.start()
    echoed = client.recv(TEN_MB)
    sender.join(30)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()
    client.close()
    status = osocks.wait_for(lambda s: s["sessions"]["live"] == 0)
    assert status["bytes"] == {"up": TEN_MB, "down": TEN_MB}  # plain bytes, not the wrapped ones
    if level:
        assert status["spliced"] == 0  # a protected session cannot splice


@pytest.mark.parametrize(
    ("minimum", "maximum", "asked", "granted"),
    [
        ("none", "confidentiality", 3, 2),  # selective: the most there is
        ("none", "integrity", 2, 1),
        ("none", "none", 2, 0),  # what curl needs
        ("integrity", "confidentiality", 1, 1),
        ("integrity", "integrity", 2, 1),
    ],
)
def test_the_level_granted_is_within_the_bounds(
    gss_server: Callable[..., ServerThread], echo: EchoServer, minimum: str, maximum: str, asked: int, granted: int
) -> None:
    osocks = gss_server(gssapi_min_protection=minimum, gssapi_max_protection=maximum)
    client = GssClient(osocks.port)
    assert client.login(asked) == granted
    code, _, _ = client.request(Command.CONNECT, "127.0.0.1", echo.port)
    assert code == ReplyCode.SUCCEEDED
    client.send(b"x" * 70000)  # more than one message
    assert client.recv(70000) == b"x" * 70000
    client.close()


@pytest.mark.parametrize("asked", [0, 4, 255])
def test_a_level_below_the_minimum_or_unknown_is_refused(
    gss_server: Callable[..., ServerThread], echo: EchoServer, asked: int
) -> None:
    osocks = gss_server(gssapi_min_protection="integrity")
    client = GssClient(osocks.port)
    assert client.greet() == Method.GSSAPI
    client.authenticate()
    with pytest.raises(Rejected):
        client.negotiate(asked)
    client.close()
    osocks.wait_for(lambda s: s["auth_failures"] == 1 and s["sessions"]["live"] == 0)
    works(osocks.port, echo, level=1)


@pytest.mark.parametrize("level", [1, 2])
def test_udp_datagrams_are_wrapped(gss_server: Callable[..., ServerThread], level: int) -> None:
    osocks = gss_server()
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(10)
    client = GssClient(osocks.port)
    assert client.login(level) == level
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(10)
    code, host, port = client.request(Command.UDP_ASSOCIATE, "127.0.0.1", udp.getsockname()[1])
    assert code == ReplyCode.SUCCEEDED
    header = socks5.encode_udp_header("127.0.0.1", peer.getsockname()[1])
    udp.sendto(header + b"not wrapped", (host, port))  # dropped: a protected session's datagrams are wrapped
    udp.sendto(client.seal(header + b"question"), (host, port))
    data, source = peer.recvfrom(65536)
    assert data == b"question"
    peer.sendto(os.urandom(65507), source)  # too large to wrap into one datagram: dropped
    peer.sendto(b"answer", source)
    wrapped, _ = udp.recvfrom(65536)
    parsed = socks5.parse_gss_frame(wrapped)
    assert parsed is not None and parsed[0].kind == GssMessage.ENCAPSULATED
    result = client.context.unwrap(parsed[0].token)
    assert result.encrypted == (level == 2)
    header_back = socks5.parse_udp_header(result.message)
    assert header_back is not None
    assert result.message[header_back[1] :] == b"answer"
    assert osocks.status()["udp"]["dropped"]["invalid"] == 1
    client.close()
    peer.close()
    udp.close()


def test_bind_replies_and_data_are_wrapped(gss_server: Callable[..., ServerThread]) -> None:
    osocks = gss_server()
    client = GssClient(osocks.port)
    assert client.login(2) == 2
    code, host, port = client.request(Command.BIND, "127.0.0.1", 0)
    assert code == ReplyCode.SUCCEEDED
    peer = socket.create_connection((host, port), timeout=10)
    code, peer_host, peer_port = client.read_reply()
    assert (code, peer_host, peer_port) == (ReplyCode.SUCCEEDED, *peer.getsockname()[:2])
    peer.sendall(b"to the client")
    assert client.recv(13) == b"to the client"
    client.send(b"to the peer")
    assert recv_exactly(peer, 11) == b"to the peer"
    peer.close()
    client.close()


# -- method choice -------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "offered", "chosen"),
    [
        ({}, b"\x00\x01\x02", Method.GSSAPI),
        ({"users": "alice:pw"}, b"\x00\x02\x01", Method.GSSAPI),
        ({"users": "alice:pw"}, b"\x00\x02", Method.USERNAME_PASSWORD),
        ({"users": "alice:pw"}, b"\x00", Method.NO_ACCEPTABLE),
        ({}, b"\x00\x02", Method.NO_ACCEPTABLE),  # a keytab means clients must authenticate
        ({"anonymous": "127.0.0.0/8"}, b"\x00", Method.NO_AUTH),
        ({"anonymous": "127.0.0.0/8"}, b"\x00\x01", Method.GSSAPI),
    ],
)
def test_gssapi_is_preferred_then_password_then_none(
    gss_server: Callable[..., ServerThread], options: dict, offered: bytes, chosen: Method
) -> None:
    from osocks.settings import parse_networks, parse_user

    settings: dict[str, object] = {}
    if "users" in options:
        settings["users"] = (parse_user(options["users"]),)
    if "anonymous" in options:
        settings["anonymous"] = parse_networks("anonymous", [options["anonymous"]])
    osocks = gss_server(**settings)
    client = GssClient(osocks.port)
    assert client.greet(offered) == chosen
    client.close()


# -- failures: each a clean [1][0xFF], and the next client is served ------


def test_no_ticket_fails_in_the_client_and_the_server_serves_the_next(
    gss_server: Callable[..., ServerThread], echo: EchoServer, realm: Realm
) -> None:
    import pycurl

    osocks = gss_server(gssapi_max_protection="none")
    empty = realm.root / "ccache-empty"
    curl = pycurl.Curl()
    try:
        curl.setopt(pycurl.URL, f"http://127.0.0.1:{echo.port}/")
        curl.setopt(pycurl.PROXY, f"socks5://localhost:{osocks.port}")
        curl.setopt(pycurl.PROXY_SERVICE_NAME, SERVICE)
        curl.setopt(pycurl.TIMEOUT, 30)
        os.environ["KRB5CCNAME"] = f"FILE:{empty}"
        with pytest.raises(pycurl.error):
            curl.perform()
    finally:
        os.environ["KRB5CCNAME"] = realm.env["KRB5CCNAME"]
        curl.close()
    with pytest.raises(gssapi.exceptions.GSSError):
        GssClient(osocks.port, empty).first_token()
    osocks.wait_for(lambda s: s["sessions"]["live"] == 0)
    works(osocks.port, echo)


def test_an_expired_ticket_is_refused(gss_server: Callable[..., ServerThread], echo: EchoServer, realm: Realm) -> None:
    osocks = gss_server()
    ccache = ccache_of(realm, "alice", lifetime="2s")
    lifetime = gssapi.Credentials(usage="initiate", store={"ccache": f"FILE:{ccache}"}).lifetime
    expires = time.time() + lifetime
    client = GssClient(osocks.port, ccache)
    token = client.first_token()  # made while the ticket is valid, sent once it has expired
    time.sleep(max(0.0, expires - time.time() + 1 + 1.5))  # past the end and the realm's 1 s clock skew
    assert client.greet() == Method.GSSAPI
    expect_rejected(client, token)
    osocks.wait_for(lambda s: s["auth_failures"] == 1)
    works(osocks.port, echo)


@pytest.mark.parametrize("target", ["host/localhost", "HTTP/localhost"])
def test_a_ticket_for_another_service_is_refused(
    gss_server: Callable[..., ServerThread], echo: EchoServer, target: str
) -> None:
    osocks = gss_server()
    client = GssClient(osocks.port, target=target)
    assert client.greet() == Method.GSSAPI
    expect_rejected(client)
    osocks.wait_for(lambda s: s["auth_failures"] == 1)
    works(osocks.port, echo)


@pytest.mark.parametrize(
    ("allowed", "user", "ok"),
    [
        ((ALICE,), "alice", True),
        ((ALICE,), "bob", False),
        ((f"*@{REALM}",), "bob", True),
        (("*@OTHER.REALM", ALICE), "bob", False),
    ],
)
def test_the_allow_list_of_principals(
    gss_server: Callable[..., ServerThread], echo: EchoServer, realm: Realm, allowed: tuple, user: str, ok: bool
) -> None:
    osocks = gss_server(gssapi_principals=allowed)
    ccache = ccache_of(realm, user)
    if ok:
        works(osocks.port, echo, ccache=ccache)
        assert osocks.status()["auth_failures"] == 0
        return
    client = GssClient(osocks.port, ccache)
    assert client.greet() == Method.GSSAPI
    expect_rejected(client)
    osocks.wait_for(lambda s: s["auth_failures"] == 1)
    works(osocks.port, echo)


def test_a_reload_that_drops_a_principal_closes_its_sessions(
    gss_server: Callable[..., ServerThread], echo: EchoServer, realm: Realm
) -> None:
    osocks = gss_server(gssapi_principals=(f"*@{REALM}",))
    alice = a_tunnel_of(osocks.port, echo, ccache_of(realm, "alice"))
    bob = a_tunnel_of(osocks.port, echo, ccache_of(realm, "bob"))
    settings = osocks.server.settings
    answer = osocks.run(osocks.server.reload(settings.replace(gssapi_principals=(ALICE, f"*@OTHER.{REALM}"))))
    assert answer["revoked"] == 1
    assert wait_closed(bob.sock) == b""
    assert echoes(alice)
    status = osocks.wait_for(lambda s: s["sessions"]["live"] == 1)
    assert status["sessions"]["revoked"] == 1
    assert osocks.status()["auth_failures"] == 0
    # other changes and an empty list (every principal) close no one
    answer = osocks.run(osocks.server.reload(osocks.server.settings.replace(gssapi_principals=(), idle_timeout=99.0)))
    assert answer["revoked"] == 0 and echoes(alice)
    alice.close()
    bob.close()


def test_a_principal_dropped_during_its_handshake_is_refused(
    gss_server: Callable[..., ServerThread], echo: EchoServer, realm: Realm
) -> None:
    """The reload comes after the security context is made, before the protection level: refused."""
    osocks = gss_server(gssapi_principals=(ALICE, BOB))
    client = GssClient(osocks.port, ccache_of(realm, "bob"))
    assert client.greet() == Method.GSSAPI
    client.authenticate()
    osocks.run(osocks.server.reload(osocks.server.settings.replace(gssapi_principals=(ALICE,))))
    with pytest.raises(Rejected):
        client.negotiate(0)
    client.close()
    assert osocks.wait_for(lambda s: s["auth_failures"] == 1)["sessions"]["live"] == 0
    works(osocks.port, echo, ccache=ccache_of(realm, "alice"))


def _flip(token: bytes, at: int) -> bytes:
    return token[:at] + bytes((token[at] ^ 0x55,)) + token[at + 1 :]


@pytest.mark.parametrize("forge", ["random", "flipped", "cut short", "replayed"])
def test_forged_tokens_are_refused(gss_server: Callable[..., ServerThread], echo: EchoServer, forge: str) -> None:
    osocks = gss_server()
    client = GssClient(osocks.port)
    real = client.first_token()
    if forge == "replayed":
        assert client.greet() == Method.GSSAPI
        client.authenticate(real)  # the first time it is fine ...
        client.close()
        client = GssClient(osocks.port)
        token = real  # ... the second, the replay cache refuses it
    else:
        token = {
            "random": os.urandom(len(real)),
            "flipped": _flip(real, len(real) - 20),
            "cut short": real[: len(real) // 2],
        }[forge]
    assert client.greet() == Method.GSSAPI
    expect_rejected(client, token)
    osocks.wait_for(lambda s: s["auth_failures"] == 1)
    works(osocks.port, echo)


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(lambda token: b"\x01\x01\x00\x10" + token, id="length shorter than the token"),
        pytest.param(lambda token: b"\x01\x01\xff\xff" + os.urandom(65535), id="the longest token, garbage"),
        pytest.param(lambda token: b"\x02\x01" + len(token).to_bytes(2, "big") + token, id="wrong version"),
        pytest.param(lambda token: b"\x01\x03" + len(token).to_bytes(2, "big") + token, id="wrong message type"),
    ],
)
def test_malformed_frames_are_refused(
    gss_server: Callable[..., ServerThread], echo: EchoServer, frame: Callable[[bytes], bytes]
) -> None:
    osocks = gss_server()
    client = GssClient(osocks.port)
    token = client.first_token()
    assert client.greet() == Method.GSSAPI
    client.sock.sendall(frame(token))
    assert recv_exactly(client.sock, 2) == socks5.GSS_ABORT
    assert client.sock.recv(10) == b""
    client.close()
    osocks.wait_for(lambda s: s["auth_failures"] == 1 and s["sessions"]["live"] == 0)
    works(osocks.port, echo)


def test_a_token_longer_than_what_comes_times_out(gss_server: Callable[..., ServerThread], echo: EchoServer) -> None:
    osocks = gss_server(handshake_timeout=0.5)
    client = GssClient(osocks.port)
    token = client.first_token()
    assert client.greet() == Method.GSSAPI
    client.sock.sendall(b"\x01\x01" + (len(token) + 100).to_bytes(2, "big") + token)
    assert client.sock.recv(10) == b""  # the handshake timeout closes it
    client.close()
    osocks.wait_for(lambda s: s["sessions"]["live"] == 0)
    works(osocks.port, echo)


def test_a_client_that_gives_up_or_closes_mid_token(gss_server: Callable[..., ServerThread], echo: EchoServer) -> None:
    osocks = gss_server()
    client = GssClient(osocks.port)
    assert client.greet() == Method.GSSAPI
    client.sock.sendall(socks5.GSS_ABORT)
    assert client.sock.recv(10) == b""
    client.close()
    client = GssClient(osocks.port)
    token = client.first_token()
    assert client.greet() == Method.GSSAPI
    client.sock.sendall(b"\x01\x01" + len(token).to_bytes(2, "big") + token[:100])
    client.sock.shutdown(socket.SHUT_WR)
    assert client.sock.recv(10) == b""
    client.close()
    osocks.wait_for(lambda s: s["sessions"]["live"] == 0)
    works(osocks.port, echo)


@pytest.mark.parametrize("level", [1, 2])
def test_a_tampered_message_closes_the_session(
    gss_server: Callable[..., ServerThread], echo: EchoServer, level: int
) -> None:
    osocks = gss_server()
    client = GssClient(osocks.port)
    assert client.login(level) == level
    code, _, _ = client.request(Command.CONNECT, "127.0.0.1", echo.port)
    assert code == ReplyCode.SUCCEEDED
    sealed = client.seal(b"hello world")
    client.sock.sendall(_flip(sealed, len(sealed) - 3))
    client.sock.settimeout(10)
    assert client.sock.recv(10) == b""
    client.close()
    osocks.wait_for(lambda s: s["sessions"]["live"] == 0)
    works(osocks.port, echo, level=level)


def test_a_plain_request_after_protection_is_refused(gss_server: Callable[..., ServerThread], echo: EchoServer) -> None:
    osocks = gss_server()
    client = GssClient(osocks.port)
    assert client.login(2) == 2
    client.sock.sendall(socks5.encode_request(Command.CONNECT, "127.0.0.1", echo.port))
    assert client.sock.recv(10) == b""
    client.close()
    works(osocks.port, echo, level=2)


# -- the event loop, and the start -----------------------------------------


def test_acceptor_steps_run_off_the_event_loop(
    gss_server: Callable[..., ServerThread], echo: EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    from osocks import gss

    osocks = gss_server(verbosity=1)
    threads: list[str] = []
    real_step = gss.Acceptor.step

    def step(self: gss.Acceptor, context: object, token: bytes) -> object:
        threads.append(threading.current_thread().name)
        return real_step(self, context, token)

    gss.Acceptor.step = step  # type: ignore[method-assign]
    try:
        caplog.set_level("DEBUG", logger="osocks")
        works(osocks.port, echo, level=2)
    finally:
        gss.Acceptor.step = real_step  # type: ignore[method-assign]
    assert threads and osocks.thread.name not in threads
    assert "GSSAPI acceptor step took" in caplog.text


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_real_process_serves_gssapi(
    run_osocks: Callable[..., OsocksProcess], echo: EchoServer, realm: Realm, workers: str
) -> None:
    server = run_osocks(
        "-l",
        "127.0.0.1",
        "-p",
        "0",
        "--allow-local",
        "-w",
        workers,
        "--gssapi-keytab",
        str(realm.keytab),
        env=dict(os.environ),
    )
    for level in (0, 2, 1):
        works(server.port, echo, level=level)
    client = GssClient(server.port, target="host/localhost")
    assert client.greet() == Method.GSSAPI
    expect_rejected(client)
    works(server.port, echo, level=2)


def _run_osocks(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "osocks", "--no-uci", "-l", "127.0.0.1", "-p", "0", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=30,
    )


def test_start_without_python_gssapi_is_a_clear_error(tmp_path: Path, realm: Realm) -> None:
    shadow = tmp_path / "shadow" / "gssapi"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named gssapi')\n")
    env = {**os.environ, "PYTHONPATH": str(shadow.parent)}
    done = _run_osocks("--gssapi-keytab", str(realm.keytab), env=env)
    assert done.returncode == 2
    assert "python-gssapi is not installed (pip install 'osocks[gssapi]'" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("problem", ["no key for the service", "no keytab"])
def test_start_with_a_keytab_that_cannot_serve_is_a_clear_error(realm: Realm, tmp_path: Path, problem: str) -> None:
    if problem == "no key for the service":
        args, message = ("--gssapi-keytab", str(realm.keytab), "--gssapi-service", "nfs"), "service 'nfs'"
    else:
        args, message = ("--gssapi-keytab", str(tmp_path / "none.keytab")), "none.keytab"
    done = _run_osocks(*args, env=dict(os.environ))
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "gssapi_keytab (--gssapi-keytab)" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
