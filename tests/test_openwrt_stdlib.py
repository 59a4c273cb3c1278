"""osocks run as on the router: only the standard library its DEPENDS install on OpenWrt.

OpenWrt splits Python's standard library into python3-* packages (tests/openwrt/python3-packages.toml);
Debian's Python has all of it, so a module the recipes forget to depend on is only missed on a router.
Here the real osocks process and `python -m osocks.auth` run under tests/openwrt/guard, which makes
every module outside the DEPENDS closure of our Makefiles fail to import, as it would there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import ROOT, STOCK_LOOP, EchoServer, OsocksProcess, read_reply, recv_exactly
from openwrt import split
from osocks import socks5
from osocks.socks5 import Command, ReplyCode

RELEASE = split.release_for_running_python()
pytestmark = pytest.mark.skipif(
    RELEASE is None, reason=f"no OpenWrt release in the table ships Python {sys.version_info[0]}.{sys.version_info[1]}"
)
STATUS_LINE = "osocks: INFO status "
OLD_RECIPES = {  # DEPENDS of both recipes before python3-codecs (and python3-logging for uvloop) were added
    "osocks": ["python3-light", "python3-asyncio", "python3-logging", "python3-ubus", "python3-uci", "python3-uvloop"],
    "python3-uvloop": ["python3-light", "python3-asyncio", "python3-openssl", "libuv"],
}


class Guarded:
    """Runs osocks and python3 with only what `packages` install on `release`; collects what the guard refused."""

    def __init__(self, packages: set[str], tmp: Path, release: split.Release | None = None, python: str = "") -> None:
        release = release or RELEASE
        assert release is not None
        self.release = release
        self.packages = packages
        self.python_bin = python or sys.executable
        self.log = tmp / "refused.log"
        env = dict(os.environ)
        if self.python_bin != sys.executable:  # another Python: osocks from the checkout
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
        self.env = split.guard_env(packages, release, self.log, env)
        self.started: list[OsocksProcess] = []

    def osocks(self, *args: str) -> OsocksProcess:
        process = OsocksProcess(*args, env=self.env, python=self.python_bin)
        self.started.append(process)
        return process

    def python(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.python_bin, *args], input=stdin, capture_output=True, text=True, env=self.env, cwd=ROOT, timeout=60
        )

    def has(self, module: str) -> bool:
        """Whether this Python has `module` at all (the guard aside)."""
        return has_module(self.python_bin, module)

    def refused(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def stop(self) -> None:
        for process in self.started:
            process.stop()


def routers() -> dict[str, tuple[split.Release, str, set[str]]]:
    """What installing osocks from this feed puts on the router, computed from the Makefiles: built with
    python3-uvloop (OSOCKS_UVLOOP=y, the default) and without it; for each release whose Python is
    here (the one running the tests, and another found on this machine, with osocks from the
    checkout and uvloop only where that Python has it)."""
    found = {}
    for release in split.releases().values():
        python = split.find_python(release.python)
        if python is None:
            continue
        has_uvloop = python == sys.executable or has_module(python, "uvloop")
        for name, conditions in (("uvloop", split.DEFAULT_CONFIG), ("stock-loop", ())):
            if conditions and not has_uvloop:
                continue
            found[f"{release.name}-{name}"] = (release, python, split.installed(release, conditions))
    return found


def has_module(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True, timeout=30).returncode == 0


ROUTERS = routers()


@pytest.fixture(params=sorted(ROUTERS))
def router(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Guarded]:
    release, python, packages = ROUTERS[request.param]
    guarded = Guarded(packages, tmp_path, release, python)
    yield guarded
    guarded.stop()


def clean_log(process: OsocksProcess) -> None:
    text = "".join(process.lines)
    assert "Traceback" not in text and "unknown encoding" not in text, text


# -- the guard itself ----------------------------------------------------------------------------


def test_guard_refuses_modules_of_packages_not_installed(tmp_path: Path) -> None:
    assert RELEASE is not None
    light = Guarded(RELEASE.closure(["python3-light"], {}), tmp_path)
    result = light.python("-c", "import json, socket, hashlib; import asyncio")
    assert result.returncode != 0
    assert f"No module named 'asyncio' (OpenWrt {RELEASE.name} installs asyncio with python3-asyncio" in result.stderr
    result = light.python("-c", "'xn--bcher-kva.example'.encode('ascii').decode('idna')")
    assert "unknown encoding: idna" in result.stderr
    assert any("unicodedata: " in line and "python3-codecs" in line for line in light.refused())
    result = light.python("-c", "import pytest")
    assert "pytest is not an OpenWrt package osocks depends on" in result.stderr


def test_guard_lets_the_installed_packages_import(router: Guarded) -> None:
    result = router.python("-c", "import asyncio, logging, unicodedata; print('bücher.example'.encode('idna'))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "b'xn--bcher-kva.example'"


def test_yesterdays_depends_fail_on_names(tmp_path: Path, echo: EchoServer) -> None:
    """The recipes before this test: no python3-codecs, so the idna codec (every name lookup) is missing."""
    assert RELEASE is not None
    old = Guarded(RELEASE.closure(["osocks"], OLD_RECIPES), tmp_path)
    assert "python3-codecs" not in old.packages
    try:
        server = old.osocks("-l", "127.0.0.1", "-p", "0", "--allow-local")
        sock = anonymous(server.port)
        sock.sendall(socks5.encode_request(Command.CONNECT, "localhost", echo.port))
        assert read_reply(sock)[0] == ReplyCode.GENERAL_FAILURE
        sock.close()
        wait_line(server, "unknown encoding: idna")
    finally:
        old.stop()
    assert any(line.split()[1] == "unicodedata:" for line in old.refused())


# -- SOCKS5 clients ------------------------------------------------------------------------------


def anonymous(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(socks5.encode_greeting(b"\x00"))
    assert recv_exactly(sock, 2) == b"\x05\x00"
    return sock


def logged_in(port: int, user: str, password: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(socks5.encode_greeting(b"\x02") + socks5.encode_credentials(user.encode(), password.encode()))
    assert recv_exactly(sock, 2) == b"\x05\x02"
    assert recv_exactly(sock, 2) == b"\x01\x00", f"login of {user} refused"
    return sock


def echoed_through(sock: socket.socket, host: str, port: int, payload: bytes) -> bytes:
    sock.sendall(socks5.encode_request(Command.CONNECT, host, port))
    code, _, _ = read_reply(sock)
    assert code == ReplyCode.SUCCEEDED, f"CONNECT {host}: reply {code}"
    sock.sendall(payload)
    return recv_exactly(sock, len(payload))


def wait_line(server: OsocksProcess, text: str, seen: int = 0, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.lines[seen:]:
            if text in line:
                return line
        time.sleep(0.02)
    raise AssertionError(f"no line with {text!r}: " + "".join(server.lines[-10:]))


def status_of(server: OsocksProcess) -> dict:
    seen = len(server.lines)
    server.signal(signal.SIGUSR1)
    return json.loads(wait_line(server, STATUS_LINE, seen)[len(STATUS_LINE) :])


def wait_status(server: OsocksProcess, predicate: Callable[[dict], bool], timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = status_of(server)
        if predicate(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


class UdpEcho:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]

    def answer_one(self) -> None:
        data, peer = self.sock.recvfrom(65535)
        self.sock.sendto(b"echo:" + data, peer)


# -- osocks as on the router ---------------------------------------------------------------------


@pytest.fixture
def users(router: Guarded, tmp_path: Path) -> Path:
    """alice with a pbkdf2 hash, bob with a scrypt hash, both made by `python -m osocks.auth` under the guard."""
    alice = router.python("-m", "osocks.auth", "alice", stdin="wonderland\n")
    assert alice.returncode == 0 and alice.stdout.startswith("alice:$pbkdf2-sha256$"), alice.stderr
    bob = router.python("-m", "osocks.auth", "--scrypt", "bob", stdin="builder\n")
    assert bob.returncode == 0 and bob.stdout.startswith("bob:$scrypt$"), bob.stderr
    path = tmp_path / "users"
    path.write_text(alice.stdout + bob.stdout)
    return path


def test_osocks_as_on_the_router(router: Guarded, users: Path, echo: EchoServer) -> None:
    server = router.osocks("-l", "127.0.0.1", "-p", "0", "--allow-local", "-U", str(users))
    stock = "python3-uvloop" not in router.packages or STOCK_LOOP
    assert ("uvloop is not installed" in wait_line(server, "listening on")) == stock

    with logged_in(server.port, "alice", "wonderland") as sock:
        assert echoed_through(sock, "127.0.0.1", echo.port, b"ipv4") == b"ipv4"
    with logged_in(server.port, "bob", "builder") as sock:
        assert echoed_through(sock, "localhost", echo.port, b"by name") == b"by name"
    if has_ipv6_loopback():
        echo6 = EchoServer("::1")
        try:
            with logged_in(server.port, "alice", "wonderland") as sock:
                assert echoed_through(sock, "::1", echo6.port, b"ipv6") == b"ipv6"
        finally:
            echo6.close()

    udp_echo = UdpEcho()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(10)
    try:
        with logged_in(server.port, "alice", "wonderland") as control:
            control.sendall(socks5.encode_request(Command.UDP_ASSOCIATE, "0.0.0.0", 0))
            code, host, relay_port = read_reply(control)
            assert code == ReplyCode.SUCCEEDED
            client.sendto(socks5.encode_udp_header("localhost", udp_echo.port) + b"datagram", (host, relay_port))
            udp_echo.answer_one()
            assert client.recvfrom(65535)[0].endswith(b"echo:datagram")
    finally:
        client.close()
        udp_echo.sock.close()

    with logged_in(server.port, "bob", "builder") as control:
        control.sendall(socks5.encode_request(Command.BIND, "127.0.0.1", 0))
        code, host, port = read_reply(control)
        assert code == ReplyCode.SUCCEEDED
        with socket.create_connection((host, port), timeout=10) as peer:
            assert read_reply(control)[0] == ReplyCode.SUCCEEDED
            peer.sendall(b"bound")
            assert recv_exactly(control, 5) == b"bound"

    users.write_text(users.read_text() + "carol:clear-text\n")
    server.signal(signal.SIGHUP)
    assert wait_status(server, lambda s: "carol" in s["settings"]["users"])["settings"]["users"] == [
        "alice",
        "bob",
        "carol",
    ]
    with logged_in(server.port, "carol", "clear-text") as sock:
        assert echoed_through(sock, "localhost", echo.port, b"after reload") == b"after reload"

    assert server.stop() == 0
    clean_log(server)


def test_workers_as_on_the_router(router: Guarded, users: Path, echo: EchoServer) -> None:
    server = router.osocks("-l", "127.0.0.1", "-p", "0", "--allow-local", "-U", str(users), "-w", "2")
    for _ in range(6):  # over both workers
        with logged_in(server.port, "alice", "wonderland") as sock:
            assert echoed_through(sock, "localhost", echo.port, b"worker") == b"worker"
    with logged_in(server.port, "bob", "builder") as sock:
        assert echoed_through(sock, "localhost", echo.port, b"scrypt") == b"scrypt"
    server.signal(signal.SIGHUP)
    status = wait_status(server, lambda s: s["sessions"]["live"] == 0)
    assert len(status["workers"]) == 2 and status["sessions"]["total"] >= 7
    assert server.stop() == 0
    clean_log(server)


SYSLOG_RUN = r"""
import socket, subprocess, sys
syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
syslog.bind("/dev/log")
syslog.settimeout(20)
osocks = subprocess.Popen([sys.executable, "-m", "osocks", "--no-uci", "-s", "-l", "127.0.0.1", "-p", "0"],
                          env=eval(sys.argv[1]), stderr=subprocess.PIPE, text=True)
try:
    for _ in range(5):
        line = syslog.recv(4096).decode(errors="replace")
        if "listening on" in line:
            print(line, flush=True)
            break
finally:
    osocks.terminate()
    print("exit", osocks.wait(10), osocks.stderr.read(), flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)")
def test_syslog_as_on_the_router(router: Guarded) -> None:
    """-s: logging.handlers, with a /dev/log of our own (an overlay on /dev in a private mount namespace)."""
    with tempfile.TemporaryDirectory() as layers:
        upper, work = Path(layers, "upper"), Path(layers, "work")
        upper.mkdir()
        work.mkdir()
        mount = (
            f"mount --make-rprivate / && mount -t overlay overlay -o lowerdir=/dev,upperdir={upper},workdir={work} /dev"
        )
        result = subprocess.run(
            [
                "unshare",
                "-m",
                "sh",
                "-c",
                f'{mount} && exec "$@"',
                "sh",
                sys.executable,
                "-c",
                SYSLOG_RUN,
                repr(router.env),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    if "mount" in result.stderr and result.returncode != 0 and "osocks" not in result.stdout:
        pytest.skip(f"cannot mount an overlay on /dev here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    first, rest = result.stdout.split("\n", 1)
    assert first.startswith("<30>osocks[") and "listening on 127.0.0.1:" in first  # daemon.info
    assert rest.startswith("exit 0") and "Traceback" not in rest, rest


UCI_CONFIG = """\
config osocks 'main'
\tlist listen '127.0.0.1'
\toption port '{port}'
\toption allow_local '1'
\tlist user '{user}'
"""


def test_uci_and_ubus_as_on_the_router(router: Guarded, users: Path, tmp_path: Path, echo: EchoServer) -> None:
    """`--uci` through pyuci and the ubus methods through python-ubus, under the guard (where they are here)."""
    missing = [name for name in ("ubusd", "ubus") if shutil.which(name) is None]
    missing += [name for name, module in (("python-ubus", "ubus"), ("pyuci", "euci")) if not router.has(module)]
    if missing:
        pytest.skip(f"OpenWrt only, not installed here: {', '.join(missing)}")
    sock = str(tmp_path / "ubus.sock")
    ubusd = subprocess.Popen([shutil.which("ubusd") or "ubusd", "-s", sock])
    confdir = tmp_path / "config"
    confdir.mkdir()
    with socket.create_server(("127.0.0.1", 0)) as probe:  # a free port for osocks
        port = probe.getsockname()[1]
    alice = users.read_text().splitlines()[0]
    (confdir / "osocks").write_text(UCI_CONFIG.format(port=port, user=alice))
    command = ["-m", "osocks", "--uci", "osocks", "--uci-dir", str(confdir), "--ubus-socket", sock]
    osocks = subprocess.Popen(
        [router.python_bin, *command], env=router.env, cwd=ROOT, stderr=subprocess.PIPE, text=True
    )

    def ubus(method: str) -> dict:
        out = subprocess.run(["ubus", "-s", sock, "-t", "10", "call", "osocks", method], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    try:
        deadline = time.monotonic() + 20
        while True:  # on ubus first, then listening
            try:
                with logged_in(port, "alice", "wonderland") as client:
                    assert echoed_through(client, "localhost", echo.port, b"uci") == b"uci"
                break
            except (ConnectionRefusedError, subprocess.SubprocessError):
                assert time.monotonic() < deadline and osocks.poll() is None
                time.sleep(0.05)
        assert ubus("status")["listeners"] == [f"127.0.0.1:{port}"]
        assert "changed" in ubus("reload")
    finally:
        osocks.terminate()
        _, err = osocks.communicate(timeout=10)
        ubusd.terminate()
        ubusd.wait(5)
    assert osocks.returncode == 0, err
    assert "Traceback" not in err and "unknown encoding" not in err, err
