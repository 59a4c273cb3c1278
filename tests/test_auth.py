"""Username/password (RFC 1929) over real sockets and with real clients."""

from __future__ import annotations

import hashlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from python_socks.sync import Proxy
from test_workers import status_of, wait_status

from conftest import ROOT, EchoServer, HttpServer, OsocksProcess, ServerThread, recv_exactly, wait_closed
from osocks import auth, socks5
from osocks.settings import Settings, SettingsError, User, parse_user, read_user_file
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
    assert auth.check_secret(auth.hash_scrypt("s3cret", n=1024), b"s3cret")


def test_user_file(tmp_path) -> None:
    path = tmp_path / "users"
    path.write_text("# comment\nalice:wonderland\n\nbob:" + auth.hash_password("builder", iterations=1000) + "\n")
    users = read_user_file(str(path))
    assert [u.name for u in users] == ["alice", "bob"]
    assert "wonderland" not in repr(users)
    with pytest.raises(SettingsError, match="must be written user:password"):
        parse_user("nocolon")
    with pytest.raises(SettingsError, match="^-u: the user name before ':' is empty"):
        parse_user(":pw", "-u")
    with pytest.raises(SettingsError, match="No such file"):
        read_user_file(str(tmp_path / "missing"))


def hash_command(*args: str, password: str = "pw\n") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "osocks.auth", *args], input=password, capture_output=True, text=True, timeout=30
    )


def test_hash_command_makes_both_documented_forms_and_osocks_takes_them(run_osocks, echo: EchoServer, tmp_path) -> None:
    lines = [hash_command("carol").stdout, hash_command("--scrypt", "dave", password="pw2\n").stdout]
    assert lines[0].startswith("carol:$pbkdf2-sha256$200000$") and lines[1].startswith("dave:$scrypt$16384$8$1$")
    users = tmp_path / "users"
    users.write_text("".join(lines))
    server = run_osocks("-l", "127.0.0.1", "-p", "0", "--allow-local", "-U", str(users))
    assert login_and_connect(server.port, b"carol", b"pw", echo) == ReplyCode.SUCCEEDED
    assert login_and_connect(server.port, b"dave", b"pw2", echo) == ReplyCode.SUCCEEDED
    assert login_and_connect(server.port, b"dave", b"pw", echo) is None


@pytest.mark.parametrize(
    ("args", "password", "message"),
    [
        (["bad:user"], "pw\n", "cannot contain ':'"),  # the line would be user 'bad', password 'user:...'
        (["carol"], "\n", "the password is empty"),
        (["carol"], "", "the password is empty"),
        (["-x", "carol"], "pw\n", "unknown option '-x'"),
        ([], "pw\n", "give one USER"),
        (["carol", "dave"], "pw\n", "give one USER"),
        (["#carol"], "pw\n", "cannot start with '#'"),
        ([""], "pw\n", "the user name is empty"),
        (["carol"], "p" * 256 + "\n", "255 bytes at most"),
    ],
)
def test_hash_command_refuses_what_would_not_work(args: list[str], password: str, message: str) -> None:
    out = hash_command(*args, password=password)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("osocks.auth: ") and message in out.stderr and len(out.stderr.splitlines()) == 1


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_hash_command_help(flag: str) -> None:
    out = hash_command(flag, "carol")
    assert out.returncode == 0 and out.stdout.startswith("usage: python3 -m osocks.auth [--scrypt] USER")
    assert "carol" not in out.stdout


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


def login_and_connect(port: int, user: bytes, password: bytes, echo: EchoServer) -> int | None:
    """Login, then CONNECT to echo: the reply code, or None when the login is refused."""
    sock, answer = login(port, b"\x02", user, password)
    with sock:
        if answer != b"\x01\x00":
            return None
        sock.sendall(socks5.encode_request(socks5.Command.CONNECT, "127.0.0.1", echo.port))
        return recv_exactly(sock, 10)[1]


# -- users on the command line, as a real process -----------------------------------------------

CHEAP_HASH = auth.hash_password("builder", iterations=1000)


def test_user_flag(run_osocks, echo: EchoServer) -> None:
    server = run_osocks(
        "-l", "127.0.0.1", "-p", "0", "--allow-local", "-u", "alice:wonderland", "-u", f"bob:{CHEAP_HASH}"
    )
    assert login_and_connect(server.port, b"alice", b"wonderland", echo) == ReplyCode.SUCCEEDED
    assert login_and_connect(server.port, b"bob", b"builder", echo) == ReplyCode.SUCCEEDED
    assert login_and_connect(server.port, b"alice", b"builder", echo) is None
    sock, answer = login(server.port, b"\x00", b"", b"")
    sock.close()
    assert answer == b"\x05\xff"  # no password, no proxy
    assert status_of(server)["auth_failures"] == 1


def run_refused(args: list[str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "osocks", "--no-uci", "-l", "127.0.0.1", "-p", "0", *args],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
    )
    assert out.returncode == 2 and out.stdout == "", out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("osocks: "), out.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("file", "args", "message"),
    [
        ("", ["-U", "{file}"], "-U: '{file}' lists no user"),
        ("# only\n\n  # comments\n", ["-U", "{file}"], "-U: '{file}' lists no user"),
        (None, ["-u", "alice:a", "-u", "alice:b"], "-u: user 'alice' is listed twice (also at -u)"),
        (
            "bob:x\nalice:b\n",
            ["-u", "alice:a", "-U", "{file}"],
            "-U {file}:2: user 'alice' is listed twice (also at -u)",
        ),
        ("alice:a\n#\nalice:a\n", ["-U", "{file}"], "-U {file}:3: user 'alice' is listed twice (also at -U {file}:1)"),
        (None, ["-u", ":pw"], "-u: the user name before ':' is empty"),
        (None, ["-u", "bob:$scrypt$abc"], "-u: user 'bob': an scrypt hash is $scrypt$N$R$P$SALT_HEX$HASH_HEX"),
        ("bob:$scrypt$1000$8$1$00$" + "00" * 32, ["-U", "{file}"], "-U {file}:1: user 'bob': N must be a power of 2"),
        ("bob:$pbkdf2-sha256$0$00$" + "00" * 32, ["-U", "{file}"], "-U {file}:1: user 'bob': ITERATIONS is a whole"),
        ("bob:$pbkdf2-sha256$9$00$00\n", ["-U", "{file}"], "user 'bob': HASH_HEX must be 32 bytes"),
        ("bob:$pbkdf2-sha256$4294967296$00$" + "00" * 32, ["-U", "{file}"], "user 'bob': ITERATIONS is 2147483647 at"),
        (None, ["-u", "bob:$6$salt$hash"], "-u: user 'bob': '$6$' is not a hash osocks knows"),
    ],
)
def test_user_settings_that_cannot_work_refuse_to_start(
    tmp_path, file: str | None, args: list[str], message: str
) -> None:
    path = tmp_path / "users"
    if file is not None:
        path.write_text(file)
    line = run_refused([arg.format(file=path) for arg in args])
    assert message.format(file=path) in line


def test_a_bad_hash_names_its_user_in_uci_too() -> None:
    from osocks.uci import settings_from_sections

    with pytest.raises(SettingsError, match=r"^uci osocks\.main\.user: user 'bob': an scrypt hash is"):
        settings_from_sections({"main": {"user": ("alice:pw", "bob:$scrypt$abc")}})


def test_clear_text_passwords_that_merely_start_with_a_dollar_are_kept() -> None:
    assert parse_user("alice:$ecret") == User("alice", "$ecret")
    assert auth.check_secret("$ecret", b"$ecret")


def wait_line(server: OsocksProcess, text: str, seen: int, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        for line in server.lines[seen:]:
            if text in line:
                return line
        assert time.monotonic() < deadline, f"no line with {text!r}: " + "".join(server.lines[-5:])
        time.sleep(0.02)


def wait_until_named(server: OsocksProcess, text: str, seen: int, names: tuple[str, ...], timeout: float = 10.0) -> str:
    """The lines with text after the first `seen`, once they name every one of names between them."""
    deadline = time.monotonic() + timeout
    while True:
        said = "".join(line for line in server.lines[seen:] if text in line)
        if all(name in said for name in names):
            return said
        assert time.monotonic() < deadline, f"not all of {names} named in: {said!r}"
        time.sleep(0.02)


def test_reload_with_an_empty_user_file_keeps_the_users(run_osocks, echo: EchoServer, tmp_path) -> None:
    users = tmp_path / "users"
    users.write_text("alice:wonderland\n")
    server = run_osocks("-l", "127.0.0.1", "-p", "0", "--allow-local", "-U", str(users))
    users.write_text("# everyone gone\n")
    seen = len(server.lines)
    server.signal(signal.SIGHUP)
    line = wait_line(server, "reload failed", seen)
    assert f"keeping the running config: -U: '{users}' lists no user" in line
    assert login_and_connect(server.port, b"alice", b"wonderland", echo) == ReplyCode.SUCCEEDED
    sock, answer = login(server.port, b"\x00", b"", b"")
    sock.close()
    assert answer == b"\x05\xff"  # not an open proxy
    assert status_of(server)["settings"]["users"] == ["alice"]


# -- reload closes the sessions of users it removes or gives a new password -------------------


def open_session(port: int, user: bytes, password: bytes, echo: EchoServer) -> socket.socket:
    sock, answer = login(port, b"\x02", user, password)
    assert answer == b"\x01\x00"
    sock.sendall(socks5.encode_request(socks5.Command.CONNECT, "127.0.0.1", echo.port))
    assert recv_exactly(sock, 10)[1] == ReplyCode.SUCCEEDED
    return sock


def still_echoes(sock: socket.socket) -> bool:
    try:
        sock.sendall(b"ping")
        return recv_exactly(sock, 4) == b"ping"
    except OSError:
        return False


def revoke_scenario(run_osocks: Callable[..., OsocksProcess], echo: EchoServer, tmp_path: Path, *flags: str) -> None:
    """alice stays, bob is removed, carol gets a new password: only bob's and carol's sessions close."""
    users = tmp_path / "users"
    users.write_text(f"alice:wonderland\nbob:{CHEAP_HASH}\ncarol:old\n")
    server = run_osocks("-l", "127.0.0.1", "-p", "0", "--allow-local", *flags, "-U", str(users))
    logins = {b"alice": b"wonderland", b"bob": b"builder", b"carol": b"old"}
    held = {name: [open_session(server.port, name, pw, echo) for _ in range(6)] for name, pw in logins.items()}
    wait_status(server, lambda s: s["sessions"]["live"] == 18)
    users.write_text(f"alice:wonderland\ncarol:{auth.hash_password('new', iterations=1000)}\n")
    seen = len(server.lines)
    server.signal(signal.SIGHUP)
    status = wait_status(server, lambda s: s["sessions"]["revoked"] == 12 and s["sessions"]["live"] == 6)
    assert status["settings"]["users"] == ["alice", "carol"]
    for name in (b"bob", b"carol"):
        for sock in held[name]:
            assert wait_closed(sock, 10) == b""
    assert all(still_echoes(sock) for sock in held[b"alice"])
    assert "closed by reload: user removed or password changed" in wait_line(server, "closed by reload", seen)
    said = wait_until_named(server, "reload: closed", seen, ("bob", "carol"))  # a line per worker with -w
    assert "alice" not in said
    assert login_and_connect(server.port, b"carol", b"new", echo) == ReplyCode.SUCCEEDED
    assert login_and_connect(server.port, b"bob", b"builder", echo) is None
    for socks in held.values():
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("workers", [[], ["-w", "2"]], ids=["one process", "2 workers"])
def test_reload_closes_sessions_of_removed_users_and_changed_passwords(
    run_osocks, echo: EchoServer, tmp_path, workers: list[str]
) -> None:
    revoke_scenario(run_osocks, echo, tmp_path, *workers)


def test_reload_that_drops_every_user_closes_no_session(make_server, echo: EchoServer) -> None:
    server = make_server(users=USERS)
    sock = open_session(server.port, b"alice", b"wonderland", echo)
    answer = server.run(server.server.reload(server.server.settings.replace(users=())))
    assert answer["revoked"] == 0 and still_echoes(sock)  # no users: anyone may, so no one is cut off
    sock.close()


# -- the hash: checked off the loop, remembered; a failure costs the same for any name ---------


class Executor(ThreadPoolExecutor):
    """The server loop's default executor: counts the jobs; `gate`, when set, holds them until opened."""

    def __init__(self) -> None:
        super().__init__(4)
        self.jobs = 0
        self.gate: threading.Event | None = None

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        self.jobs += 1
        gate = self.gate

        def job() -> Any:
            if gate is not None:
                assert gate.wait(10)
            return fn(*args, **kwargs)

        return super().submit(job)


@pytest.fixture
def hashing(make_server, monkeypatch) -> tuple[ServerThread, Executor, list[int]]:
    """A server with two hashed users and a clear-text one; its executor; the PBKDF2 runs (iterations)."""
    runs: list[int] = []
    pbkdf2 = hashlib.pbkdf2_hmac

    def counted(name: str, password: bytes, salt: bytes, iterations: int, *rest: Any) -> bytes:
        runs.append(iterations)
        return pbkdf2(name, password, salt, iterations, *rest)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counted)
    fresh = [User("bob", auth.hash_password("builder", iterations=1000))]  # a new salt: not yet remembered
    users = (USERS[0], *fresh, User("carol", auth.hash_password("x", iterations=1000)))
    server = make_server(users=users)
    executor = Executor()
    server.call(lambda: server.loop.set_default_executor(executor))
    return server, executor, runs


def costs(server: ServerThread, executor: Executor, runs: list[int], user: bytes, password: bytes) -> tuple:
    """(answer, executor jobs, PBKDF2 iterations run) of one login."""
    jobs, before = executor.jobs, len(runs)
    sock, answer = login(server.port, b"\x02", user, password)
    sock.close()
    return answer, executor.jobs - jobs, runs[before:]


def test_a_failed_login_costs_one_hash_whether_or_not_the_name_exists(hashing) -> None:
    server, executor, runs = hashing
    failed = (b"\x01\x01", 1, [1000])  # one job in the executor, one PBKDF2 of the users' parameters
    assert costs(server, executor, runs, b"bob", b"wrong") == failed
    assert costs(server, executor, runs, b"mallory", b"wrong") == failed  # no such user
    assert costs(server, executor, runs, b"", b"") == failed
    assert costs(server, executor, runs, b"alice", b"wrong") == failed  # a clear-text user
    assert costs(server, executor, runs, b"bob", b"builder") == (b"\x01\x00", 1, [1000])
    # remembered: bob's next login needs no hash, but a failure still costs one, for any name
    assert costs(server, executor, runs, b"bob", b"builder") == (b"\x01\x00", 0, [])
    assert costs(server, executor, runs, b"bob", b"wrong") == failed
    assert costs(server, executor, runs, b"mallory", b"builder") == failed
    assert costs(server, executor, runs, b"alice", b"wonderland") == (b"\x01\x00", 0, [])


def test_with_clear_text_users_only_nothing_is_hashed(make_server) -> None:
    server = make_server(users=(User("alice", "wonderland"),))
    executor = Executor()
    server.call(lambda: server.loop.set_default_executor(executor))
    for user, password, answer in ((b"alice", b"x", b"\x01\x01"), (b"mallory", b"x", b"\x01\x01")):
        sock, got = login(server.port, b"\x02", user, password)
        sock.close()
        assert got == answer
    assert executor.jobs == 0


def test_the_hash_is_checked_off_the_event_loop(hashing, echo: EchoServer) -> None:
    server, executor, runs = hashing
    executor.gate = threading.Event()
    waiting = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    waiting.sendall(socks5.encode_greeting(b"\x02") + socks5.encode_credentials(b"bob", b"builder"))
    assert recv_exactly(waiting, 2) == b"\x05\x02"
    server.wait_for(lambda s: any(x["state"] == "checking" for x in server.call(server.server.sessions)))
    # bob's hash is held in the executor; the loop still serves everyone else
    assert login_and_connect(server.port, b"alice", b"wonderland", echo) == ReplyCode.SUCCEEDED
    executor.gate.set()
    assert recv_exactly(waiting, 2) == b"\x01\x00"
    waiting.close()


def test_a_login_checked_across_a_reload_that_removes_the_user_fails(hashing) -> None:
    server, executor, runs = hashing
    executor.gate = threading.Event()
    waiting = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    waiting.sendall(socks5.encode_greeting(b"\x02") + socks5.encode_credentials(b"bob", b"builder"))
    assert recv_exactly(waiting, 2) == b"\x05\x02"
    server.wait_for(lambda s: any(x["state"] == "checking" for x in server.call(server.server.sessions)))
    settings: Settings = server.server.settings
    server.run(server.server.reload(settings.replace(users=settings.users[:1])))  # alice only
    executor.gate.set()
    assert wait_closed(waiting) == b"\x01\x01"
    waiting.close()
