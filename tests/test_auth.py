"""Username/password (RFC 1929) over real sockets and with real clients."""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess

import pytest
from python_socks.sync import Proxy

from conftest import EchoServer, HttpServer, ServerThread, recv_exactly, wait_closed
from osocks import auth, socks5
from osocks.settings import SettingsError, User, parse_user, read_user_file
from osocks.socks5 import ReplyCode

USERS = (User("alice", "wonderland"), User("bob", auth.hash_password("builder", iterations=1000)))


def login(port: int, methods: bytes, user: bytes, password: bytes) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(socks5.encode_greeting(methods))
    chosen = recv_exactly(sock, 2)
    if chosen != b"\x05\x02":
        return sock, chosen
    sock.sendall(socks5.encode_credentials(user, password))
    return sock, recv_exactly(sock, 2)


@pytest.fixture
def secured(make_server) -> ServerThread:
    return make_server(users=USERS)


@pytest.mark.parametrize(("user", "password"), [(b"alice", b"wonderland"), (b"bob", b"builder")])
def test_good_password_then_connect(secured: ServerThread, echo: EchoServer, user: bytes, password: bytes) -> None:
    sock, answer = login(secured.port, b"\x00\x02", user, password)
    assert answer == b"\x01\x00"
    sock.sendall(socks5.encode_request(1, "127.0.0.1", echo.port) + b"hi")
    assert recv_exactly(sock, 10)[1] == ReplyCode.SUCCEEDED
    assert recv_exactly(sock, 2) == b"hi"
    sock.close()


@pytest.mark.parametrize(
    ("user", "password"), [(b"alice", b"wrong"), (b"carol", b"wonderland"), (b"bob", b""), (b"", b"")]
)
def test_bad_password_fails_closes_and_counts(secured: ServerThread, user: bytes, password: bytes, caplog) -> None:
    sock, answer = login(secured.port, b"\x02", user, password)
    assert answer == b"\x01\x01"
    assert wait_closed(sock) == b""
    sock.close()
    status = secured.wait_for(lambda s: s["auth_failures"] == 1)
    assert status["sessions"]["live"] == 0
    assert any(
        "authentication failed" in r.getMessage() and repr(user.decode()) in r.getMessage() for r in caplog.records
    )


def test_username_password_not_offered_gets_no_acceptable(secured: ServerThread) -> None:
    sock, answer = login(secured.port, b"\x00\x01", b"", b"")
    assert answer == b"\x05\xff"
    assert wait_closed(sock) == b""


def test_without_users_username_password_is_never_chosen(osocks: ServerThread) -> None:
    sock, answer = login(osocks.port, b"\x02", b"alice", b"wonderland")
    assert answer == b"\x05\xff"
    sock.close()


def test_long_names_and_pipelined_auth(make_server, echo: EchoServer) -> None:
    long_user, long_password = "u" * 255, "p" * 255
    server = make_server(users=(User(long_user, long_password),))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(
            socks5.encode_greeting(b"\x02")
            + socks5.encode_credentials(long_user.encode(), long_password.encode())
            + socks5.encode_request(1, "127.0.0.1", echo.port)
            + b"x"
        )
        assert recv_exactly(sock, 4) == b"\x05\x02\x01\x00"
        assert recv_exactly(sock, 10)[1] == ReplyCode.SUCCEEDED
        assert recv_exactly(sock, 1) == b"x"


def test_wrong_subnegotiation_version_closes(secured: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", secured.port), timeout=5) as sock:
        sock.sendall(b"\x05\x01\x02" + b"\x05\x05alice\x0awonderland")
        assert wait_closed(sock) == b"\x05\x02"


def test_anonymous_networks_skip_the_password(make_server, echo: EchoServer) -> None:
    from osocks.rules import parse_network

    server = make_server(users=USERS, anonymous=(parse_network("127.0.0.0/8"),))
    sock, answer = login(server.port, b"\x00\x02", b"", b"")
    assert answer == b"\x05\x00"
    sock.close()


def test_hashed_forms() -> None:
    pbkdf2 = auth.hash_password("s3cret", iterations=1000)
    assert pbkdf2.startswith("$pbkdf2-sha256$1000$")
    salt = b"saltsalt"
    digest = hashlib.scrypt(b"s3cret", salt=salt, n=1024, r=8, p=1, dklen=32)
    scrypt = f"$scrypt$1024$8$1${salt.hex()}${digest.hex()}"
    for secret in (pbkdf2, scrypt, "s3cret"):
        assert auth.check_secret(secret, b"s3cret")
        assert not auth.check_secret(secret, b"s3cret!")
    assert not auth.check_secret("$pbkdf2-sha256$x$zz$00", b"s3cret")


def test_user_file(tmp_path) -> None:
    path = tmp_path / "users"
    path.write_text("# comment\nalice:wonderland\n\nbob:" + auth.hash_password("builder", iterations=1000) + "\n")
    users = read_user_file(str(path))
    assert [u.name for u in users] == ["alice", "bob"]
    assert "wonderland" not in repr(users)
    with pytest.raises(SettingsError, match="must be written user:password"):
        parse_user("nocolon")
    with pytest.raises(SettingsError, match="No such file"):
        read_user_file(str(tmp_path / "missing"))


def test_hash_command(tmp_path) -> None:
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "osocks.auth", "carol"], input="pw\n", capture_output=True, text=True, timeout=30
    )
    name, _, secret = out.stdout.strip().partition(":")
    assert name == "carol" and auth.check_secret(secret, b"pw")


def test_python_socks_with_password(secured: ServerThread, http_server: HttpServer) -> None:
    proxy = Proxy.from_url(f"socks5://alice:wonderland@127.0.0.1:{secured.port}")
    sock = proxy.connect(dest_host="127.0.0.1", dest_port=http_server.port, timeout=10)
    with sock:
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert wait_closed(sock).endswith(b"hello\n")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_proxy_user(make_server, http_server: HttpServer) -> None:
    server = make_server(users=USERS)
    url = f"http://127.0.0.1:{http_server.port}/hello"
    ok = subprocess.run(
        ["curl", "-sSf", "--socks5", f"127.0.0.1:{server.port}", "--proxy-user", "bob:builder", url],
        capture_output=True,
        timeout=30,
    )
    assert ok.stdout == b"hello\n"
    bad = subprocess.run(
        ["curl", "-sS", "--socks5", f"127.0.0.1:{server.port}", "--proxy-user", "bob:nope", url],
        capture_output=True,
        timeout=30,
    )
    assert bad.returncode != 0


def test_pysocks_with_password(secured: ServerThread, http_server: HttpServer) -> None:
    import socks  # PySocks

    sock = socks.socksocket()
    sock.set_proxy(socks.SOCKS5, "127.0.0.1", secured.port, username="bob", password="builder")
    sock.settimeout(10)
    sock.connect(("127.0.0.1", http_server.port))
    with sock:
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert wait_closed(sock).endswith(b"hello\n")
    bad = socks.socksocket()
    bad.set_proxy(socks.SOCKS5, "127.0.0.1", secured.port, username="bob", password="nope")
    bad.settimeout(10)
    with pytest.raises(socks.GeneralProxyError):
        bad.connect(("127.0.0.1", http_server.port))
    bad.close()


def test_hashed_secret_for_a_new_password() -> None:
    """What ubus `hash_password` stores in UCI: a salted hash that check_secret accepts."""
    first, second = auth.hashed_secret("correct horse"), auth.hashed_secret("correct horse")
    assert first.startswith("$pbkdf2-sha256$") and first != second and "correct" not in first
    assert auth.check_secret(first, b"correct horse") and not auth.check_secret(first, b"correct")
    assert parse_user(f"carol:{first}").secret == first
    with pytest.raises(ValueError, match="empty"):
        auth.hashed_secret("")
    with pytest.raises(ValueError, match="255 bytes"):
        auth.hashed_secret("é" * 128)
    assert auth.check_secret(auth.hashed_secret("x" * 255), b"x" * 255)
