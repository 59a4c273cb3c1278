"""The ubus bridge: `interface_addresses` always; the rest against a real ubusd on a private socket."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from osocks import ubus as bridge_module
from osocks.auth import check_secret
from osocks.ubus import UbusBridge, available, interface_addresses

LAN_STATUS: dict[str, Any] = {  # trimmed `ubus call network.interface.lan status` of an OpenWrt router
    "up": True,
    "pending": False,
    "available": True,
    "l3_device": "br-lan",
    "proto": "static",
    "ipv4-address": [{"address": "192.168.1.1", "mask": 24}, {"address": "10.0.0.1", "mask": 8}],
    "ipv6-address": [{"address": "2001:DB8::1", "mask": 64, "preferred": 3600, "valid": 7200}],
    "ipv6-prefix": [],
    "ipv6-prefix-assignment": [
        {"address": "fd12:3456:789a::", "mask": 60, "local-address": {"address": "fd12:3456:789a::1", "mask": 60}},
        {"address": "2001:db8:1::", "mask": 64},  # assignment not applied yet: no local-address
    ],
    "route": [],
    "dns-server": [],
    "data": {},
}


# --- pure ---------------------------------------------------------------------------------------


def test_interface_addresses_of_an_up_lan() -> None:
    assert interface_addresses(LAN_STATUS) == ["192.168.1.1", "10.0.0.1", "2001:db8::1", "fd12:3456:789a::1"]


def test_interface_addresses_when_down_or_empty() -> None:
    assert interface_addresses({**LAN_STATUS, "up": False}) == []
    assert interface_addresses({}) == []
    assert interface_addresses({"up": True}) == []


def test_interface_addresses_skips_garbage_link_local_and_duplicates() -> None:
    status = {
        "up": True,
        "ipv4-address": [{"address": "192.168.1.1"}, {"address": "192.168.1.1"}, {"mask": 24}, {"address": "x"}],
        "ipv6-address": [{"address": "fe80::1"}, {"address": "fd00::1"}],
        "ipv6-prefix-assignment": [{"local-address": {"address": "FD00::1"}}, {"local-address": None}],
    }
    assert interface_addresses(status) == ["192.168.1.1", "fd00::1"]


def test_without_python_ubus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ubus", None)  # import ubus -> ImportError
    assert available() is False
    bridge = UbusBridge(
        status=dict, sessions=list, reload=_no_reload, disconnect=_no_session, loop=asyncio.new_event_loop()
    )
    with pytest.raises(ImportError):
        bridge.start()
    assert bridge.call("network", "status", {}).exception(timeout=1) is not None


async def _no_reload() -> dict[str, Any]:
    return {}


def _no_session(session_id: str) -> dict[str, Any]:
    raise LookupError(f"no live session {session_id}")


# --- real ubusd ---------------------------------------------------------------------------------


def _need_ubus() -> None:
    missing = [name for name in ("ubusd", "ubus") if shutil.which(name) is None]
    if missing:
        pytest.skip(f"ubusd not installed (OpenWrt only): {', '.join(missing)} not in PATH")
    if not available():
        pytest.skip("python-ubus not installed (OpenWrt only): `pip install ubus` needs libubus")


def _accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(path) == 0


@pytest.fixture
def sock() -> Iterator[str]:
    """A private ubusd; its socket path."""
    _need_ubus()
    folder = tempfile.mkdtemp(prefix="osocks-ubus-")
    path = os.path.join(folder, "ubus.sock")
    daemon = subprocess.Popen(["ubusd", "-s", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not _accepts(path):  # the socket file exists from bind(), before ubusd listens
            assert daemon.poll() is None and time.monotonic() < deadline, "ubusd did not start"
            time.sleep(0.02)
        yield path
    finally:
        daemon.terminate()
        try:
            daemon.wait(5)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(5)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    """A running event loop in a thread, like the server's."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="event-loop")
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


class Fake:
    """The server's side: records which thread answered."""

    def __init__(self) -> None:
        self.threads: set[str] = set()
        self.reloads = 0
        self.fail_reload: Exception | None = None
        self.reload_delay = 0.0

    def status(self) -> dict[str, Any]:
        self.threads.add(threading.current_thread().name)
        return {"version": "0.1.0", "sessions": 2, "bytes": 2**40, "up": True, "listen": ["0.0.0.0:1080"]}

    def sessions(self) -> list[dict[str, Any]]:
        self.threads.add(threading.current_thread().name)
        return [{"id": 1, "client": "192.168.1.10:50000", "target": "example.org:443"}]

    async def reload(self) -> dict[str, Any]:
        self.threads.add(threading.current_thread().name)
        await asyncio.sleep(self.reload_delay)
        if self.fail_reload is not None:
            raise self.fail_reload
        self.reloads += 1
        return {"reloaded": True, "count": self.reloads}

    def disconnect(self, session_id: str) -> dict[str, Any]:
        self.threads.add(threading.current_thread().name)
        if session_id != "1":
            raise LookupError(f"no live session {session_id}")
        return {"disconnected": session_id}


@pytest.fixture
def make_bridge(sock: str, event_loop: asyncio.AbstractEventLoop) -> Iterator[Callable[[Fake], UbusBridge]]:
    started: list[UbusBridge] = []

    def make(fake: Fake) -> UbusBridge:
        bridge = UbusBridge(
            status=fake.status,
            sessions=fake.sessions,
            reload=fake.reload,
            disconnect=fake.disconnect,
            loop=event_loop,
            socket_path=sock,
        )
        bridge.start()
        started.append(bridge)
        return bridge

    yield make
    for bridge in started:
        bridge.stop()


def cli(sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ubus", "-s", sock, "-t", "5", *args], capture_output=True, text=True, timeout=15)


def call_json(sock: str, method: str, *args: str) -> Any:
    done = cli(sock, "call", "osocks", method, *args)
    assert done.stdout, done.stderr
    return json.loads(done.stdout)


def test_status_and_sessions_answered_on_the_event_loop(sock: str, make_bridge: Callable[[Fake], UbusBridge]) -> None:
    fake = Fake()
    status, sessions = fake.status(), fake.sessions()
    fake.threads.clear()
    make_bridge(fake)
    assert call_json(sock, "status") == status
    assert call_json(sock, "sessions") == {"sessions": sessions}
    assert fake.threads == {"event-loop"}


def test_object_signatures(sock: str, make_bridge: Callable[[Fake], UbusBridge]) -> None:
    make_bridge(Fake())
    listing = cli(sock, "-v", "list", "osocks").stdout
    for method in ("status", "reload", "sessions"):
        assert f'"{method}":{{}}' in listing
    assert '"hash_password":{"password":"String"}' in listing
    assert '"disconnect":{"id":"String"}' in listing
    assert "Invalid argument" in cli(sock, "call", "osocks", "status", '{"x": 1}').stderr
    luci = cli(sock, "-v", "list", "osocks.luci").stdout
    assert '"status":{"ubus_rpc_session":"String"}' in luci
    assert '"disconnect":{"id":"String","ubus_rpc_session":"String"}' in luci


SESSION = '"ubus_rpc_session": "0123456789abcdef0123456789abcdef"'  # what LuCI's /ubus adds to every call


def luci_call(sock: str, method: str, args: str = "") -> Any:
    done = cli(sock, "call", "osocks.luci", method, "{" + ", ".join(filter(None, (args, SESSION))) + "}")
    assert done.stdout, done.stderr
    return json.loads(done.stdout)


def test_luci_object_takes_the_session_argument(sock: str, make_bridge: Callable[[Fake], UbusBridge]) -> None:
    fake = Fake()
    status, sessions = fake.status(), fake.sessions()
    make_bridge(fake)
    assert luci_call(sock, "status") == status == call_json(sock, "status")
    assert luci_call(sock, "sessions") == {"sessions": sessions}
    assert luci_call(sock, "reload") == {"reloaded": True, "count": 1}
    assert luci_call(sock, "disconnect", '"id": "1"') == {"disconnected": "1"}
    assert "Invalid argument" in cli(sock, "call", "osocks.luci", "status").stderr  # the plain call is osocks'
    assert (
        "Invalid argument" in cli(sock, "call", "osocks", "status", "{" + SESSION + "}").stderr
    )  # LuCI's, osocks.luci's


def test_disconnect(sock: str, make_bridge: Callable[[Fake], UbusBridge]) -> None:
    fake = Fake()
    make_bridge(fake)
    assert call_json(sock, "disconnect", '{"id": "1"}') == {"disconnected": "1"}
    assert call_json(sock, "disconnect", '{"id": "7"}') == {"error": "no live session 7"}
    assert "Invalid argument" in cli(sock, "call", "osocks", "disconnect").stderr
    assert "Invalid argument" in cli(sock, "call", "osocks", "disconnect", '{"id": 1}').stderr  # a string
    assert "event-loop" in fake.threads


def test_hash_password(sock: str, make_bridge: Callable[[Fake], UbusBridge]) -> None:
    make_bridge(Fake())
    answer = call_json(sock, "hash_password", '{"password": "s3cret pass"}')
    assert answer["hash"].startswith("$pbkdf2-sha256$")
    assert check_secret(answer["hash"], b"s3cret pass") and not check_secret(answer["hash"], b"other")
    assert "s3cret" not in answer["hash"]
    again = luci_call(sock, "hash_password", '"password": "s3cret pass"')["hash"]
    assert again != answer["hash"] and check_secret(again, b"s3cret pass")  # salted
    assert call_json(sock, "hash_password", '{"password": ""}') == {"error": "the password is empty"}


def test_reload_returns_its_dict(sock: str, make_bridge: Callable[[Fake], UbusBridge]) -> None:
    fake = Fake()
    fake.reload_delay = 0.05
    make_bridge(fake)
    assert call_json(sock, "reload") == {"reloaded": True, "count": 1}
    assert call_json(sock, "reload") == {"reloaded": True, "count": 2}
    assert fake.threads == {"event-loop"}


def test_reload_failure_is_an_error_reply(sock: str, make_bridge: Callable[[Fake], UbusBridge]) -> None:
    fake = Fake()
    fake.fail_reload = ValueError("osocks.main.port: 'x' is not a port")
    make_bridge(fake)
    assert call_json(sock, "reload") == {"error": "osocks.main.port: 'x' is not a port"}
    fake.fail_reload = None
    assert call_json(sock, "reload") == {"reloaded": True, "count": 1}  # still serving


def test_slow_answer_times_out(
    sock: str, make_bridge: Callable[[Fake], UbusBridge], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bridge_module, "RELOAD_TIMEOUT", 0.3)
    fake = Fake()
    fake.reload_delay = 60.0  # far past the CLI's own 5 s timeout: an answer at all is the timeout's
    make_bridge(fake)
    assert call_json(sock, "reload") == {"error": "no answer within 0.3 s"}
    assert call_json(sock, "status")["sessions"] == 2


def test_call_another_object(sock: str, make_bridge: Callable[[Fake], UbusBridge]) -> None:
    peer_code = (
        "import sys, ubus\n"
        "ubus.connect(socket_path=sys.argv[1])\n"
        "echo = lambda h, m: h.reply({'echo': m['text']})\n"
        "ubus.add('peer', {'echo': {'signature': {'text': ubus.BLOBMSG_TYPE_STRING}, 'method': echo}})\n"
        "ubus.loop()\n"
    )
    peer = subprocess.Popen([sys.executable, "-c", peer_code, sock])
    try:
        assert cli(sock, "wait_for", "peer").returncode == 0
        bridge = make_bridge(Fake())
        assert bridge.call("peer", "echo", {"text": "hi"}).result(10) == [{"echo": "hi"}]
        with pytest.raises(RuntimeError, match="not found"):
            bridge.call("nobody", "status", {}).result(10)
        with pytest.raises(ValueError, match="own object"):  # libubus could not answer it: refused at once
            bridge.call("osocks", "status", {}).result(0.1)
    finally:
        peer.terminate()
        peer.wait(5)


def test_stop_joins_and_unregisters(sock: str, make_bridge: Callable[[Fake], UbusBridge]) -> None:
    bridge = make_bridge(Fake())
    assert "osocks" in cli(sock, "list").stdout
    started = time.monotonic()
    bridge.stop()
    assert time.monotonic() - started < 10
    assert "osocks" not in cli(sock, "list").stdout
    with pytest.raises(RuntimeError, match="not running"):
        bridge.call("peer", "echo", {}).result(0.1)
    bridge.stop()  # twice is harmless
    make_bridge(Fake())  # python-ubus connects again in the same process
    assert call_json(sock, "status")["up"] is True


def test_children_exit_codes_are_kept(make_bridge: Callable[[Fake], UbusBridge]) -> None:
    make_bridge(Fake())  # unguarded, libubox's SIGCHLD handler would waitpid(-1) them first now and then
    assert [subprocess.run(["false"]).returncode for _ in range(20)] == [1] * 20


def test_sigterm_handler_installed_first_is_kept(sock: str, make_bridge: Callable[[Fake], UbusBridge]) -> None:
    got = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.set())
    try:
        make_bridge(Fake())
        assert call_json(sock, "status")["up"] is True  # answered: the ubus thread has run uloop_init
        os.kill(os.getpid(), signal.SIGTERM)
        assert got.wait(5)
    finally:
        signal.signal(signal.SIGTERM, previous)
