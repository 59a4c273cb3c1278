"""luci-app-osocks in a real browser against a real LuCI, with a real osocks under real procd.

LuCI, rpcd, uhttpd, procd and ubusd are not in any registry, so this test skips unless
OSOCKS_LUCI_ROOT names a prepared LuCI: a directory with two executables,

    start STATEDIR [-r ROOT]...   ubusd, procd, rpcd and uhttpd serving LuCI, in a namespace of
                                  their own where each ROOT (an OpenWrt-layout tree) lies over /;
                                  prints NS_PID=<host pid>, LUCI_URL=http://127.0.0.1:<port>
                                  and LUCI_PASSWORD=<root's password> (or OSOCKS_LUCI_PASSWORD)
    stop STATEDIR                 ends them all

The browser is
Debian's chromium driven by playwright-core from npm (NODE_PATH must find it), each step in a fresh
profile (tests/luci_browser.js), talking to LuCI on 127.0.0.1 without a proxy.  osocks runs from
this checkout under the package's init script, as user osocks.  Screenshots go to
OSOCKS_LUCI_SCREENSHOTS when it names a directory (README's come from here).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, HttpServer, free_port, recv_exactly, wait_closed
from osocks import socks5

LUCI = os.environ.get("OSOCKS_LUCI_ROOT", "")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
APP = ROOT / "feeds" / "luci-app-osocks"
BROWSER = ROOT / "tests" / "luci_browser.js"


def _missing() -> str | None:
    if not LUCI:
        return "no real LuCI: set OSOCKS_LUCI_ROOT to a prepared LuCI (see this file's docstring)"
    if not all(os.access(Path(LUCI) / name, os.X_OK) for name in ("start", "stop")):
        return f"OSOCKS_LUCI_ROOT={LUCI} has no executable start and stop"
    node = shutil.which("node")
    if node is None or not os.access(CHROMIUM, os.X_OK):
        return "node or chromium is not installed"
    found = subprocess.run([node, "-e", "require.resolve('playwright-core')"], capture_output=True, timeout=30)
    if found.returncode:
        return "playwright-core not found (npm install playwright-core; NODE_PATH=.../node_modules)"
    return None


pytestmark = [
    pytest.mark.skipif(_missing() is not None, reason=str(_missing())),
    pytest.mark.timeout(600),  # a browser step is a few seconds; the first test runs some twenty of them
]

CONFIG = """\
config osocks 'main'
\toption enabled '1'
\tlist listen '127.0.0.1'
\toption port '{port}'
\toption allow_local '1'
\toption workers '{workers}'
"""
# osocks from this checkout, with Debian's Python (user osocks cannot enter /root, where pyenv's lives)
LAUNCHER = """\
#!/bin/sh
PYTHONPATH={src}:{site} exec /usr/bin/python3 -m osocks "$@"
"""


def _overlay(root: Path, port: int, workers: int) -> None:
    """An OpenWrt-layout tree: the osocks package and luci-app-osocks, installed as their Makefiles do."""
    files = {
        "etc/init.d/osocks": (ROOT / "files" / "osocks.init").read_text(),
        "etc/config/osocks": CONFIG.format(port=port, workers=workers),
        "usr/share/acl.d/osocks.json": (ROOT / "files" / "osocks.ubus-acl.json").read_text(),
        "usr/share/rpcd/acl.d/osocks.json": (ROOT / "files" / "osocks.rpcd-acl.json").read_text(),
        "usr/bin/osocks": LAUNCHER.format(
            src=ROOT / "src", site=Path(sys.prefix) / "lib" / f"python3.{sys.version_info.minor}" / "site-packages"
        ),
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    for name in ("etc/init.d/osocks", "usr/bin/osocks"):
        (root / name).chmod(0o755)
    shutil.copytree(APP / "htdocs", root / "www", dirs_exist_ok=True)
    shutil.copytree(APP / "root", root, dirs_exist_ok=True)


class Router:
    """The namespace with procd, LuCI and osocks; commands run inside it."""

    def __init__(self, state: Path, root: Path) -> None:
        self.state = state
        done = subprocess.run(
            [str(Path(LUCI) / "start"), str(state), "-r", str(root)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
        values = dict(line.split("=", 1) for line in done.stdout.split() if "=" in line)
        self.ns_pid = int(values["NS_PID"])
        self.url = values["LUCI_URL"]
        self.password = values.get("LUCI_PASSWORD", os.environ.get("OSOCKS_LUCI_PASSWORD", ""))

    def run(self, *command: str, check: bool = True) -> str:
        done = subprocess.run(
            ["nsenter", "-t", str(self.ns_pid), "-m", "-p", "--", *command], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0 or not check, f"{command}: {done.stdout}{done.stderr}"
        return done.stdout

    def ubus(self, obj: str, method: str, args: dict | None = None) -> dict:
        return json.loads(self.run("ubus", "-t", "10", "call", obj, method, json.dumps(args or {})))

    def uci(self, *args: str) -> str:
        return self.run("uci", *args, check=False).strip()

    def osocks_pid(self) -> int:
        return int(self.ubus("osocks", "status")["pid"])

    def wait(self, predicate: Callable[[], Any], timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while not (result := predicate()):
            assert time.monotonic() < deadline, "condition not met"
            time.sleep(0.2)
        return result

    def start_osocks(self) -> None:
        self.run(
            "sh",
            "-c",
            "grep -q ^osocks: /etc/passwd || { echo 'osocks:x:1080:1080::/var/run/osocks:/bin/false'"
            " >>/etc/passwd; echo 'osocks:x:1080:' >>/etc/group; }",
        )
        self.run("/etc/init.d/osocks", "start")
        self.wait(lambda: self.run("ubus", "list", "osocks.luci", check=False).strip())
        self.wait(lambda: self.ubus("osocks", "status")["listeners"])
        self.run("reload_config")  # records the configs' checksums: later changes trigger reloads

    def stop(self) -> None:
        subprocess.run([str(Path(LUCI) / "stop"), str(self.state)], capture_output=True, timeout=60)


def browser(router: Router, step: str, **args: Any) -> dict:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(OSOCKS_LUCI_URL=router.url, OSOCKS_LUCI_PASSWORD=router.password, CHROMIUM=CHROMIUM)
    done = subprocess.run(
        ["node", str(BROWSER), step, json.dumps(args)], capture_output=True, text=True, timeout=180, env=env
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    errors = result.pop("page_errors")
    if step == "bad_port":  # LuCI's save rejects its promise after showing the error, as it always does
        errors = [e for e in errors if "contains an invalid input value" not in e]
    assert errors == [], f"JavaScript errors on the page during {step}"
    return result


def screenshot(name: str) -> str | None:
    folder = os.environ.get("OSOCKS_LUCI_SCREENSHOTS")
    return str(Path(folder) / name) if folder else None


@pytest.fixture
def router(tmp_path: Path) -> Iterator[tuple[Router, int]]:
    root = tmp_path / "root"
    port = free_port()
    _overlay(root, port, workers=1)
    router = Router(tmp_path / "state", root)
    try:
        router.start_osocks()
        yield router, port
    finally:
        router.stop()


def socks_login(port: int, user: bytes | None, password: bytes = b"") -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(socks5.encode_greeting(b"\x02" if user is not None else b"\x00"))
    chosen = recv_exactly(sock, 2)
    if user is None or chosen != b"\x05\x02":
        return sock, chosen
    sock.sendall(socks5.encode_credentials(user, password))
    return sock, recv_exactly(sock, 2)


class SlowDownload:
    """GET /10M through osocks, read slowly until told to hurry, so that it spans a Save & Apply."""

    def __init__(self, port: int, http: HttpServer, user: bytes | None = None, password: bytes = b"") -> None:
        self.sock, answer = socks_login(port, user, password)
        assert answer in (b"\x05\x00", b"\x01\x00")
        self.sock.settimeout(60)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.sock.sendall(socks5.encode_request(1, "127.0.0.1", http.port))
        assert recv_exactly(self.sock, 10)[1] == 0
        self.sock.sendall(b"GET /10M HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.body = bytearray()
        self.hurry = threading.Event()
        self.thread = threading.Thread(target=self._read)
        self.thread.start()

    def _read(self) -> None:
        try:
            while chunk := self.sock.recv(16384):
                self.body.extend(chunk)
                if not self.hurry.is_set():
                    self.hurry.wait(0.1)  # 160 KB/s: 10 MB would take a minute
        except ConnectionResetError:
            pass  # disconnected

    def finish(self) -> bytes:
        self.hurry.set()
        self.thread.join(60)
        assert not self.thread.is_alive()
        self.sock.close()
        return bytes(self.body).partition(b"\r\n\r\n")[2]


class PacedUpload:
    """A POST through osocks at a steady 320 KB/s (the server reads at once: the rate is osocks' own),
    for at most a minute, until the session is closed."""

    def __init__(self, port: int, http: HttpServer, user: bytes, password: bytes) -> None:
        self.sock, answer = socks_login(port, user, password)
        assert answer == b"\x01\x00"
        self.sock.sendall(socks5.encode_request(1, "127.0.0.1", http.port))
        assert recv_exactly(self.sock, 10)[1] == 0
        self.sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
        self.sent = 0
        self.thread = threading.Thread(target=self._send)
        self.thread.start()

    def _send(self) -> None:
        chunk = bytes(16384)
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                self.sock.sendall(chunk)
                self.sent += len(chunk)
                time.sleep(0.05)
        except OSError:
            pass  # disconnected


def test_settings_users_and_status_in_a_browser(router: tuple[Router, int], http_server: HttpServer) -> None:
    r, port = router
    pid = r.osocks_pid()
    assert r.ubus("osocks", "status")["listeners"] == [f"127.0.0.1:{port}"]

    # change the port while a download runs through the old one
    download = SlowDownload(port, http_server)
    new_port = free_port()
    answer = browser(r, "set_port", port=new_port)
    assert answer == {"port": str(new_port), "reload_error": None}
    assert r.uci("get", "osocks.main.port") == str(new_port)
    r.wait(lambda: r.ubus("osocks", "status")["listeners"] == [f"127.0.0.1:{new_port}"])
    assert r.osocks_pid() == pid  # reloaded, not restarted
    assert len(download.body) < len(http_server.big)  # still running across the change
    assert hashlib.sha256(download.finish()).digest() == hashlib.sha256(http_server.big).digest()

    # a bad port is refused in the browser: nothing saved, nothing applied
    bad = browser(r, "bad_port", port=70000)
    assert bad["invalid"] and "Port" in bad["message"] and bad["changes"] == 0
    assert r.uci("get", "osocks.main.port") == str(new_port) and r.uci("changes", "osocks") == ""
    assert r.ubus("osocks", "status")["listeners"] == [f"127.0.0.1:{new_port}"]

    # the rule syntax and networks are checked as osocks checks them (the CI test compares the two)
    for tab, option, value, ok in (
        ("access", "client_rule", "permit all", False),
        ("access", "client_rule", "deny all port 70000", False),
        ("access", "dest_rule", "deny 10.0.0.0/8,fd00::/8 port 1-1023,3306", True),
        ("users", "anonymous", "192.168.1.0/33", False),
        ("users", "anonymous", "192.168.1.0/24 fd00::/8", True),
    ):
        typed = browser(r, "list_entry", tab=tab, option=option, value=value)
        assert typed == {"invalid": not ok, "items": [value] if ok else []}, (option, value)

    # a port osocks cannot take: saved, but osocks refuses it and the page says why
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    busy = taken.getsockname()[1]
    refused = browser(r, "set_port", port=busy)
    assert refused["reload_error"] and f"127.0.0.1:{busy}" in refused["reload_error"]
    assert r.ubus("osocks", "status")["listeners"] == [f"127.0.0.1:{new_port}"] and r.osocks_pid() == pid
    taken.close()
    assert browser(r, "set_port", port=new_port)["reload_error"] is None

    # a user added in the browser logs in through osocks; UCI has only a hash
    added = browser(r, "add_user", name="alice", password="Wonder-land 42", screenshot=screenshot("luci-users.png"))
    assert added == {"users": ["alice"], "password_left_in_field": "", "page_has_password": False, "reload_error": None}
    stored = r.uci("get", "osocks.main.user")
    assert stored.startswith("alice:$pbkdf2-sha256$") and "Wonder" not in stored
    # a user in clear text (written by hand): flagged, its secret never on the page, removed in the browser
    r.run("uci", "add_list", "osocks.main.user=bob:Cl3ar-text-secret")
    r.run("uci", "commit", "osocks")
    listed = browser(r, "users", remove=["bob"], secrets=["Cl3ar-text-secret", stored.split(":", 1)[1]])
    assert listed["users"] == [{"name": "alice", "clear_text": False}, {"name": "bob", "clear_text": True}]
    assert listed["secrets_on_page"] == [] and listed["after"] == [{"name": "alice", "clear_text": False}]
    assert r.uci("get", "osocks.main.user") == stored

    sock, answer_ = socks_login(new_port, None)
    assert answer_ == b"\x05\xff"  # login now required
    sock.close()
    sock, answer_ = socks_login(new_port, b"alice", b"wrong")
    assert answer_ == b"\x01\x01"
    sock.close()
    upload = PacedUpload(new_port, http_server, b"alice", b"Wonder-land 42")

    # the live session appears on the status page, with its user and its traffic; Disconnect closes it
    (live,) = r.ubus("osocks", "sessions")["sessions"]
    shown = browser(r, "sessions", wait_points=5, screenshot=screenshot("luci-status.png"), disconnect=live["id"])
    (row,) = shown["sessions"]
    assert row["id"] == live["id"] and row["cells"][:4] == [live["client"], live["destination"], "alice", "relay"]
    assert f"127.0.0.1:{new_port}" in shown["summary"] and shown["workers"] == 0
    assert min(shown["graph_heights"]) < 160  # a line above the floor: bytes moved between two polls
    upload.thread.join(30)
    assert not upload.thread.is_alive() and upload.sent < 100_000_000  # cut off
    upload.sock.close()
    assert r.ubus("osocks", "sessions")["sessions"] == []
    assert "Live sessions" in browser(r, "overview")["text"]

    assert browser(r, "screenshot_settings", path=screenshot("luci-settings.png")) == {"title": "osocks SOCKS5 server"}


def test_workers_on_the_status_page(tmp_path: Path, http_server: HttpServer) -> None:
    """With -w 2 the page lists each worker, and Disconnect reaches the worker that has the session."""
    root = tmp_path / "root"
    port = free_port()
    _overlay(root, port, workers=2)
    r = Router(tmp_path / "state", root)
    try:
        r.start_osocks()
        r.wait(lambda: len(r.ubus("osocks", "status").get("workers", [])) == 2)
        sock, answer = socks_login(port, None)
        assert answer == b"\x05\x00"
        sock.sendall(socks5.encode_request(1, "127.0.0.1", http_server.port))
        assert recv_exactly(sock, 10)[1] == 0
        (live,) = r.ubus("osocks", "sessions")["sessions"]
        shown = browser(r, "sessions", disconnect=live["id"], screenshot=screenshot("luci-status-workers.png"))
        assert shown["workers"] == 3  # a title row and one per worker
        assert [s["id"] for s in shown["sessions"]] == [live["id"]]
        assert shown["sessions"][0]["cells"][7] == str(live["worker"])
        assert wait_closed(sock) == b""
        sock.close()

        r.run("/etc/init.d/osocks", "stop")
        r.wait(lambda: not r.run("ubus", "list", "osocks.luci", check=False).strip())
        stopped = browser(r, "stopped")
        assert stopped["state"].startswith("osocks is not running") and stopped["sessions"] == 0
        assert browser(r, "overview")["text"] == "osocks is not running"
    finally:
        r.stop()


def jsonrpc(url: str, session: str, obj: str, method: str, args: dict | None = None) -> list:
    """One call through LuCI's /ubus (uhttpd's JSON-RPC), as the views' rpc.declare makes it."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "call", "params": [session, obj, method, args or {}]}
    request = urllib.request.Request(f"{url}/ubus/", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with NO_PROXY.open(request, timeout=30) as answer:
        reply = json.loads(answer.read())
    return reply["result"] if "result" in reply else [reply["error"]["code"]]


NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
ZERO_SESSION = "0" * 32
ACCESS_DENIED = -32002  # uhttpd: the ubus method is not granted
PERMISSION_DENIED = 6  # rpcd's uci: the config is not granted


def login(url: str, user: str, password: str) -> str:
    code, answer = jsonrpc(url, ZERO_SESSION, "session", "login", {"username": user, "password": password})
    assert code == 0
    return str(answer["ubus_rpc_session"])


def add_login(r: Router, name: str, password: str, groups: list[str]) -> str:
    """A LuCI login (rpcd) for a new system user, granted these ACL groups to read and write; its session."""
    uid = 1100 + len(r.run("sh", "-c", "grep -c . /etc/passwd").split())
    r.run(
        "sh", "-c", f"echo '{name}:x:{uid}:{uid}::/tmp:/bin/false' >>/etc/passwd; echo '{name}:x:{uid}:' >>/etc/group"
    )
    r.run("sh", "-c", f"echo '{name}:{password}' | chpasswd")
    commands = ["add rpcd login", f"set rpcd.@login[-1].username={name}", f"set rpcd.@login[-1].password=$p${name}"]
    commands += [f"add_list rpcd.@login[-1].{access}={group}" for group in groups for access in ("read", "write")]
    for command in [*commands, "commit rpcd"]:
        r.run("uci", *command.split())
    return login(r.url, name, password)


def test_ubus_path_and_acl_through_luci(router: tuple[Router, int]) -> None:
    """LuCI's /ubus adds ubus_rpc_session, which osocks.luci takes (the plain object would answer
    "Invalid argument": test_ubus_bridge); a login granted LuCI's base groups and luci-app-osocks
    reaches what the pages use, the package's group osocks its read-only part and reload, others nothing."""
    r, _ = router
    root = login(r.url, "root", r.password)
    assert jsonrpc(r.url, root, "osocks", "status") == [ACCESS_DENIED]  # no group grants it: it could not answer
    code, status = jsonrpc(r.url, root, "osocks.luci", "status")
    assert code == 0 and status["pid"] == r.osocks_pid()

    base = ["luci-base", "luci-base-network-status"]
    owner = add_login(r, "owner", "Own3r-pass", [*base, "luci-app-osocks"])
    for method in ("status", "sessions", "reload"):
        assert jsonrpc(r.url, owner, "osocks.luci", method)[0] == 0, method
    code, hashed = jsonrpc(r.url, owner, "osocks.luci", "hash_password", {"password": "x"})
    assert code == 0 and hashed["hash"].startswith("$pbkdf2-sha256$")
    assert jsonrpc(r.url, owner, "osocks.luci", "disconnect", {"id": "1-1"}) == [0, {"error": "no live session 1-1"}]
    assert jsonrpc(r.url, owner, "uci", "get", {"config": "osocks"})[0] == 0
    assert jsonrpc(r.url, owner, "uci", "get", {"config": "rpcd"}) == [PERMISSION_DENIED]
    assert jsonrpc(r.url, owner, "osocks", "reload") == [ACCESS_DENIED]  # the plain object: not granted

    ops = add_login(r, "ops", "0ps-pass", ["osocks"])  # the osocks package's own group
    assert jsonrpc(r.url, ops, "osocks.luci", "status")[0] == 0 and jsonrpc(r.url, ops, "osocks.luci", "reload")[0] == 0
    assert jsonrpc(r.url, ops, "osocks.luci", "hash_password", {"password": "x"}) == [ACCESS_DENIED]

    guest = add_login(r, "guest", "Gu3st-pass", base)
    assert jsonrpc(r.url, guest, "osocks.luci", "status") == [ACCESS_DENIED]
    assert jsonrpc(r.url, guest, "uci", "get", {"config": "osocks"}) == [PERMISSION_DENIED]
