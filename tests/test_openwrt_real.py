"""osocks with the real OpenWrt pieces: ubusd, the ubus CLI, libuci through pyuci.

They are not in any registry CI reaches, so these tests skip there; they run
where libubox, ubus, uci, python-ubus and pyuci are installed (an OpenWrt
host, or a machine where they were built from their public sources).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, EchoServer, HttpServer, free_port, recv_exactly, socks_connect, wait_closed
from osocks import auth, socks5, ubus, uci

MISSING = [name for name in ("ubusd", "ubus") if shutil.which(name) is None]
if not ubus.available():
    MISSING.append("python-ubus")
if not uci.available():
    MISSING.append("pyuci")
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"OpenWrt only, not installed here: {', '.join(MISSING)}")

CONFIG = """\
config osocks 'main'
\tlist listen '127.0.0.1'
\toption port '{port}'
\toption max_sessions '{max_sessions}'
\toption allow_local '1'
\tlist user 'alice:do-not-show-me'
\tlist anonymous '127.0.0.0/8'
"""


@pytest.fixture
def ubusd(tmp_path: Path):
    path = str(tmp_path / "ubus.sock")
    process = subprocess.Popen([shutil.which("ubusd"), "-s", path])  # type: ignore[list-item]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the socket file exists from bind(), before ubusd listens
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(path) == 0:
                break
        time.sleep(0.02)
    yield path
    process.terminate()
    process.wait(5)


def ubus_call(sock: str, method: str, args: dict | None = None, obj: str = "osocks") -> dict:
    out = subprocess.run(
        ["ubus", "-s", sock, "-t", "10", "call", obj, method, *([json.dumps(args)] if args is not None else [])],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


class Osocks:
    def __init__(self, confdir: Path, sock: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "osocks", "--uci", "osocks", "--uci-dir", str(confdir), "--ubus-socket", sock],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.sock = sock
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if subprocess.run(["ubus", "-s", sock, "list", "osocks"], capture_output=True, timeout=5).returncode == 0:
                return
            assert self.proc.poll() is None, self.proc.stderr.read()  # type: ignore[union-attr]
            time.sleep(0.05)
        raise AssertionError("osocks did not register on ubus")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(10)


@pytest.fixture
def osocks_uci(tmp_path: Path, ubusd: str):
    confdir = tmp_path / "config"
    confdir.mkdir()
    port = free_port()
    (confdir / "osocks").write_text(CONFIG.format(port=port, max_sessions=5))
    server = Osocks(confdir, ubusd)
    yield server, confdir, port
    server.stop()


def test_status_from_the_ubus_cli(osocks_uci) -> None:
    server, _, port = osocks_uci
    status = ubus_call(server.sock, "status")
    assert status["listeners"] == [f"127.0.0.1:{port}"]
    assert status["settings"]["max_sessions"] == 5 and status["settings"]["users"] == ["alice"]
    assert status["sessions"]["live"] == 0 and "succeeded" in status["replies"]
    assert "do-not-show-me" not in json.dumps(status)


def test_reload_keeps_a_running_transfer(osocks_uci, http_server: HttpServer) -> None:
    server, confdir, port = osocks_uci
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"\x05\x01\x00" + socks5.encode_request(1, "127.0.0.1", http_server.port))
    assert recv_exactly(sock, 12)[3] == 0
    sock.sendall(b"GET /10M HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    body = bytearray()
    started, reloaded = threading.Event(), threading.Event()

    def read_around_the_reloads() -> None:
        """A first megabyte, then nothing until the reloads are done: the transfer is mid-way through them."""
        while len(body) < 1_000_000 and (chunk := sock.recv(65536)):
            body.extend(chunk)
        started.set()
        reloaded.wait(30)
        while chunk := sock.recv(65536):
            body.extend(chunk)

    reader = threading.Thread(target=read_around_the_reloads)
    reader.start()
    assert started.wait(30)
    assert ubus_call(server.sock, "sessions")["sessions"][0]["destination"] == f"127.0.0.1:{http_server.port}"

    (confdir / "osocks").write_text(CONFIG.format(port=port, max_sessions=7) + "\tlist listen '127.0.0.2'\n")
    answer = ubus_call(server.sock, "reload")
    assert "max_sessions" in answer["changed"] and "listen" in answer["changed"]
    assert f"127.0.0.2:{port}" in answer["listeners"]
    socket.create_connection(("127.0.0.2", port), timeout=5).close()

    (confdir / "osocks").write_text(CONFIG.format(port=port, max_sessions="lots"))
    bad = ubus_call(server.sock, "reload")
    assert "max_sessions" in bad["error"] and "'lots'" in bad["error"]
    assert ubus_call(server.sock, "status")["settings"]["max_sessions"] == 7  # the old config stays

    assert len(body) < len(http_server.big)  # still under way
    reloaded.set()
    reader.join(60)
    sock.close()
    head, _, data = bytes(body).partition(b"\r\n\r\n")
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(http_server.big).hexdigest()


LUCI_SESSION = {"ubus_rpc_session": "0123456789abcdef0123456789abcdef"}  # LuCI's /ubus adds it to every call


@pytest.mark.parametrize("workers", [1, 2])
def test_disconnect_a_live_session(tmp_path: Path, ubusd: str, echo: EchoServer, workers: int) -> None:
    """The id `sessions` reports closes that session, in one process and behind a master."""
    confdir = tmp_path / "config"
    confdir.mkdir()
    port = free_port()
    (confdir / "osocks").write_text(CONFIG.format(port=port, max_sessions=5) + f"\toption workers '{workers}'\n")
    server = Osocks(confdir, ubusd)
    deadline = time.monotonic() + 10
    while True:  # osocks registers on ubus before it listens
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline and server.proc.poll() is None
            time.sleep(0.05)
    try:
        deadline = time.monotonic() + 10  # a master is on ubus before its workers listen
        while (probe := socket.socket()).connect_ex(("127.0.0.1", port)) != 0:
            probe.close()
            assert time.monotonic() < deadline, "the workers did not listen"
            time.sleep(0.05)
        probe.close()
        kept, _, _, _ = socks_connect(port, "127.0.0.1", echo.port)
        closed, _, _, _ = socks_connect(port, "127.0.0.1", echo.port)
        for sock in (kept, closed):
            sock.sendall(b"ping")
            assert recv_exactly(sock, 4) == b"ping"
        live = ubus_call(ubusd, "sessions")["sessions"]
        assert len(live) == 2 and len({s["id"] for s in live}) == 2
        local = f"127.0.0.1:{closed.getsockname()[1]}"
        (target,) = [s for s in live if s["client"] == local]
        answer = ubus_call(ubusd, "disconnect", {"id": target["id"], **LUCI_SESSION}, obj="osocks.luci")
        assert answer == {"disconnected": target["id"]}
        assert wait_closed(closed) == b""
        assert [s["client"] for s in ubus_call(ubusd, "sessions")["sessions"]] != [local]
        assert ubus_call(ubusd, "disconnect", {"id": target["id"]}) == {"error": f"no live session {target['id']}"}
        kept.sendall(b"still")
        assert recv_exactly(kept, 5) == b"still"
        kept.close()
        closed.close()
    finally:
        assert server.stop() == 0


def test_hash_password_from_a_running_osocks(osocks_uci) -> None:
    server, _, _ = osocks_uci
    secret = ubus_call(server.sock, "hash_password", {"password": "pw", **LUCI_SESSION}, obj="osocks.luci")["hash"]
    assert auth.check_secret(secret, b"pw")


def test_sighup_reloads(osocks_uci) -> None:
    server, confdir, port = osocks_uci
    (confdir / "osocks").write_text(CONFIG.format(port=port, max_sessions=9))
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while ubus_call(server.sock, "status")["settings"]["max_sessions"] != 9:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_sigterm_with_ubus_exits_zero(osocks_uci) -> None:
    server, _, _ = osocks_uci
    assert server.stop() == 0


def test_uci_read_with_real_libuci(tmp_path: Path) -> None:
    (tmp_path / "osocks").write_text(CONFIG.format(port=1081, max_sessions=3) + "\tlist dest_rule 'deny all port 25'\n")
    settings = uci.load("osocks", confdir=str(tmp_path))
    assert settings.port == 1081 and settings.max_sessions == 3 and settings.allow_local
    assert [u.name for u in settings.users] == ["alice"] and str(settings.dest_rules[0]) == "deny all port 25"


def listeners_become(sock: str, expected: list[str], timeout: float = 5) -> bool:
    """netifd is asked right after the reload is answered: the listeners follow a moment later."""
    deadline = time.monotonic() + timeout
    while ubus_call(sock, "status")["listeners"] != expected:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


FAKE_NETIFD = """
import json, sys, ubus
ubus.connect(socket_path=sys.argv[1])
def status(handler, data):
    with open(sys.argv[2]) as f:
        handler.reply(json.load(f))
ubus.add("network.interface.lan", {"status": {"method": status, "signature": {}}})
while True:
    ubus.loop(200)
"""


@contextlib.contextmanager
def netifd_stand_in(ubusd: str, lan: Path) -> Iterator[None]:
    """Object network.interface.lan on the real ubusd; its status is what `lan` (JSON) holds."""
    lan.write_text(json.dumps({"up": True, "ipv4-address": [{"address": "127.0.0.1", "mask": 8}]}))
    netifd = subprocess.Popen([sys.executable, "-c", FAKE_NETIFD, ubusd, str(lan)])
    try:
        deadline = time.monotonic() + 5
        while subprocess.run(["ubus", "-s", ubusd, "list", "network.interface.lan"], capture_output=True).returncode:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield
    finally:
        netifd.kill()  # libubox's loop swallows SIGTERM in a process without a handler of its own
        netifd.wait(5)


def test_listens_on_the_lan_interface_and_follows_it(tmp_path: Path, ubusd: str) -> None:
    """netifd's answer (here from a stand-in object on the real ubusd) decides the listeners."""
    lan = tmp_path / "lan.json"
    with netifd_stand_in(ubusd, lan):
        confdir = tmp_path / "config"
        confdir.mkdir()
        port = free_port()
        (confdir / "osocks").write_text(f"config osocks 'main'\n\tlist interface 'lan'\n\toption port '{port}'\n")
        server = Osocks(confdir, ubusd)
        try:
            deadline = time.monotonic() + 5  # the object is published before the listeners open
            while not (status := ubus_call(ubusd, "status"))["listeners"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert status["listeners"] == [f"127.0.0.1:{port}"]
            assert status["interfaces"] == {"lan": ["127.0.0.1"]}

            lan.write_text(json.dumps({"up": True, "ipv4-address": [{"address": "127.0.0.3", "mask": 8}]}))
            ubus_call(ubusd, "reload")  # as procd's interface trigger does
            assert listeners_become(ubusd, [f"127.0.0.3:{port}"])
            socket.create_connection(("127.0.0.3", port), timeout=5).close()

            lan.write_text(json.dumps({"up": False}))
            ubus_call(ubusd, "reload")
            assert listeners_become(ubusd, [])
            assert server.proc.poll() is None  # an interface going down does not stop osocks
        finally:
            assert server.stop() == 0


def test_an_interface_without_address_is_warned_once_and_shown_in_status(tmp_path: Path, ubusd: str) -> None:
    """netifd knows lan but it is down: osocks keeps running, says so once, and status names it."""
    lan = tmp_path / "lan.json"
    with netifd_stand_in(ubusd, lan):
        lan.write_text(json.dumps({"up": False}))
        confdir = tmp_path / "config"
        confdir.mkdir()
        port = free_port()
        (confdir / "osocks").write_text(f"config osocks 'main'\n\tlist interface 'lan'\n\toption port '{port}'\n")
        server = Osocks(confdir, ubusd)
        try:
            deadline = time.monotonic() + 5
            while (status := ubus_call(ubusd, "status")).get("interfaces") != {"lan": []}:  # netifd asked
                assert time.monotonic() < deadline, status
                time.sleep(0.05)
            assert status["interfaces_without_address"] == ["lan"] and status["listeners"] == []
            ubus_call(ubusd, "reload")
            ubus_call(ubusd, "reload")
            lan.write_text(json.dumps({"up": True, "ipv4-address": [{"address": "127.0.0.1", "mask": 8}]}))
            ubus_call(ubusd, "reload")
            assert listeners_become(ubusd, [f"127.0.0.1:{port}"])
            assert ubus_call(ubusd, "status")["interfaces_without_address"] == []
            assert server.proc.poll() is None
        finally:
            assert server.stop() == 0
        stderr = server.proc.stderr.read()  # type: ignore[union-attr]
        assert stderr.count("interface lan has no address") == 1, stderr
