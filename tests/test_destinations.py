"""Which destinations a client can reach: names no resolver can look up, addresses the kernel
delivers to loopback, the -4/-6 families, for CONNECT, UDP ASSOCIATE and BIND's peer alike."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest
from test_commands import UdpEcho, associate, exchange

from conftest import EchoServer, read_reply, recv_exactly, socks_connect, wait_closed
from osocks import socks5
from osocks.settings import parse_rules
from osocks.socks5 import Command, ReplyCode

INVALID_NAMES = [
    b"..",
    b".",
    b"a..example",
    b".example",
    b"a" * 64 + b".example",
    b"x." + b"b" * 64,
    b"nul\x00.example",
    "bücher.example".encode(),
]
LOOPBACK_FORMS = ["0.0.0.0", "::", "::ffff:127.0.0.1", "::ffff:0.0.0.0", "127.0.0.1", "127.1.2.3", "::1"]
DENY_LOOPBACK = parse_rules("test", ["deny 127.0.0.0/8,::1"])


def raw_connect(port: int, name: bytes, dport: int = 80) -> bytes:
    """CONNECT to a DOMAIN address of any bytes (encode_request insists on ASCII); the reply's code."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"\x05\x01\x00" + b"\x05\x01\x00\x03" + bytes((len(name),)) + name + dport.to_bytes(2, "big"))
        assert recv_exactly(sock, 2) == b"\x05\x00"
        return recv_exactly(sock, 10)


def udp_header(name: bytes, port: int) -> bytes:
    return b"\x00\x00\x00\x03" + bytes((len(name),)) + name + port.to_bytes(2, "big")


@pytest.fixture
def udp_echo() -> Iterator[UdpEcho]:
    echo = UdpEcho()
    yield echo
    echo.close()


@pytest.fixture
def dual_stack_udp_echo() -> Iterator[UdpEcho]:
    echo = UdpEcho("::")  # IPv6 wildcard, not v6-only: what 0.0.0.0, :: and ::ffff:… reach
    yield echo
    echo.close()


@pytest.fixture
def dual_stack_echo() -> Iterator[EchoServer]:
    echo = EchoServer("::")
    yield echo
    echo.close()


# -- names ---------------------------------------------------------------------


@pytest.mark.parametrize("name", INVALID_NAMES, ids=repr)
def test_invalid_names_answer_host_unreachable(make_server, name: bytes, caplog) -> None:
    caplog.set_level(logging.INFO, logger="osocks")
    server = make_server()
    reply = raw_connect(server.port, name)
    assert reply[1] == ReplyCode.HOST_UNREACHABLE
    server.wait_for(lambda s: s["sessions"]["live"] == 0)
    lines = [r.getMessage() for r in caplog.records]
    assert any("invalid host name" in line and "(reply host_unreachable)" in line for line in lines), lines
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "codec" not in caplog.text and "Traceback" not in caplog.text


def test_a_name_the_resolver_cannot_encode_is_host_unreachable(make_server, caplog) -> None:
    caplog.set_level(logging.INFO, logger="osocks")
    """Whatever the codec lets through, a resolver's UnicodeError is still a plain 04."""

    async def resolver(host: str, port: int, family: int) -> list:
        "a..b".encode("idna")  # raises UnicodeError, as getaddrinfo does for such a name
        return []

    server = make_server(resolver=resolver)
    assert raw_connect(server.port, b"strange.example")[1] == ReplyCode.HOST_UNREACHABLE
    server.wait_for(lambda s: s["sessions"]["live"] == 0)
    assert "invalid host name (reply host_unreachable)" in caplog.text


def test_udp_datagrams_to_invalid_names_are_dropped_and_counted(make_server, udp_echo, caplog) -> None:
    caplog.set_level(logging.INFO)
    server = make_server()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind(("127.0.0.1", 0))
        control, relay = associate(server.port, client)
        for name in INVALID_NAMES:
            client.sendto(udp_header(name, udp_echo.port) + b"bad", relay)
        answer = exchange(client, relay, socks5.encode_udp_header("127.0.0.1", udp_echo.port) + b"good", 10)
        assert answer is not None and answer.endswith(b"echo:good")  # the association still works
        status = server.wait_for(lambda s: s["udp"]["dropped"]["invalid"] == len(INVALID_NAMES))
        assert udp_echo.received == [b"good"] and status["sessions"]["live"] == 1
        control.close()
    status = server.wait_for(lambda s: s["sessions"]["live"] == 0)
    assert status["udp"]["bytes"] == status["bytes"]["up"] + status["bytes"]["down"] == len(b"good" + b"echo:good")
    assert [r.getMessage() for r in caplog.records if "udp" in r.getMessage() or r.levelno >= logging.WARNING] == []


def test_udp_drops_say_one_line_each_at_debug(make_server, udp_echo, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="osocks")
    server = make_server(dest_rules=parse_rules("test", ["deny 127.0.0.2"]))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind(("127.0.0.1", 0))
        control, relay = associate(server.port, client)
        client.sendto(udp_header(b"a..b", udp_echo.port) + b"bad", relay)
        client.sendto(socks5.encode_udp_header("127.0.0.2", udp_echo.port) + b"denied", relay)
        assert exchange(client, relay, socks5.encode_udp_header("127.0.0.1", udp_echo.port) + b"good", 10)
        server.wait_for(lambda s: s["udp"]["dropped"] == {"invalid": 1, "denied": 1})
        control.close()
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 2 and all("\n" not in line and len(line) < 200 for line in dropped), dropped
    assert any("denied by rule 'deny 127.0.0.2/32'" in line for line in dropped)
    assert any("invalid host name" in line for line in dropped)


# -- what a destination address really reaches --------------------------------


@pytest.mark.parametrize("host", LOOPBACK_FORMS)
def test_loopback_forms_reach_loopback_when_allowed(make_server, dual_stack_echo: EchoServer, host: str) -> None:
    """The control: with --allow-local and no rule, every form reaches the loopback server."""
    server = make_server()
    sock, code, _, _ = socks_connect(server.port, host, dual_stack_echo.port)
    with sock:
        assert code == ReplyCode.SUCCEEDED
        sock.sendall(b"hi")
        assert recv_exactly(sock, 2) == b"hi"


@pytest.mark.parametrize("how", ["rule", "default"])
@pytest.mark.parametrize("host", LOOPBACK_FORMS)
def test_connect_to_loopback_forms_is_denied(make_server, dual_stack_echo: EchoServer, host: str, how: str) -> None:
    server = make_server(dest_rules=DENY_LOOPBACK) if how == "rule" else make_server(allow_local=False)
    sock, code, _, _ = socks_connect(server.port, host, dual_stack_echo.port)
    sock.close()
    assert code == ReplyCode.NOT_ALLOWED
    assert dual_stack_echo.peers == []


@pytest.mark.parametrize("how", ["rule", "default"])
def test_udp_to_loopback_forms_is_dropped(make_server, dual_stack_udp_echo: UdpEcho, how: str) -> None:
    """Also: UDP to a local destination without --allow-local (the default deny)."""
    server = make_server(dest_rules=DENY_LOOPBACK) if how == "rule" else make_server(allow_local=False)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind(("127.0.0.1", 0))
        control, relay = associate(server.port, client)
        for host in LOOPBACK_FORMS:
            client.sendto(socks5.encode_udp_header(host, dual_stack_udp_echo.port) + host.encode(), relay)
        server.wait_for(lambda s: s["udp"]["dropped"]["denied"] == len(LOOPBACK_FORMS), timeout=10)
        assert dual_stack_udp_echo.received == []
        control.close()


@pytest.mark.parametrize("how", ["rule", "default"])
@pytest.mark.parametrize("client_host", ["127.0.0.1", "::1"])
def test_bind_peer_on_loopback_is_denied(make_server, client_host: str, how: str) -> None:
    """On a dual-stack listener, a BIND peer from 127.0.0.1 arrives as ::ffff:127.0.0.1."""
    options = {"dest_rules": DENY_LOOPBACK} if how == "rule" else {"allow_local": False}
    server = make_server(listen=("::",), **options)
    family = socket.AF_INET6 if ":" in client_host else socket.AF_INET
    control = socket.socket(family, socket.SOCK_STREAM)
    control.settimeout(5)
    control.connect((client_host, server.port))
    control.sendall(socks5.encode_greeting(b"\x00") + socks5.encode_request(Command.BIND, "0.0.0.0", 0))
    assert recv_exactly(control, 2) == b"\x05\x00"
    code, host, port = read_reply(control)
    assert code == ReplyCode.SUCCEEDED
    peer = socket.create_connection((host, port), timeout=5)
    assert read_reply(control)[0] == ReplyCode.NOT_ALLOWED
    assert wait_closed(peer) == b""
    assert wait_closed(control) == b""
    peer.close()
    control.close()
    server.wait_for(lambda s: s["replies"]["not_allowed"] == 1 and s["sessions"]["live"] == 0)


# -- -4 / -6 -------------------------------------------------------------------


def test_udp_obeys_ipv4_only(make_server, udp_echo: UdpEcho) -> None:
    six = UdpEcho("::1")
    server = make_server(family="ipv4")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.bind(("127.0.0.1", 0))
            control, relay = associate(server.port, client)
            client.sendto(socks5.encode_udp_header("::1", six.port) + b"six", relay)
            assert exchange(client, relay, socks5.encode_udp_header("127.0.0.1", udp_echo.port) + b"four", 10)
            server.wait_for(lambda s: s["udp"]["dropped"]["denied"] == 1)
            assert six.received == []
            control.close()
    finally:
        six.close()


def test_udp_obeys_ipv6_only(make_server) -> None:
    four, six = UdpEcho("127.0.0.1"), UdpEcho("::1")
    server = make_server(family="ipv6", listen=("::1",))
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as client:
            client.bind(("::1", 0))
            control = socket.create_connection(("::1", server.port), timeout=5)
            control.sendall(socks5.encode_greeting(b"\x00") + socks5.encode_request(Command.UDP_ASSOCIATE, "::", 0))
            assert recv_exactly(control, 2) == b"\x05\x00"
            code, host, port = read_reply(control)
            assert code == ReplyCode.SUCCEEDED
            client.sendto(socks5.encode_udp_header("127.0.0.1", four.port) + b"four", (host, port))
            assert exchange(client, (host, port), socks5.encode_udp_header("::1", six.port) + b"six", 10)
            server.wait_for(lambda s: s["udp"]["dropped"]["denied"] == 1)
            assert four.received == []
            control.close()
    finally:
        four.close()
        six.close()


def test_connect_obeys_the_family_too(make_server, echo: EchoServer) -> None:
    server = make_server(family="ipv4")
    sock, code, _, _ = socks_connect(server.port, "::1", echo.port)
    sock.close()
    assert code == ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED
