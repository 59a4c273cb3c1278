"""Fixtures: osocks in a thread of the test process (for its counters and an
injected resolver) or as a real process, and real local destinations.

With CI set, a skipped test fails unless its reason names a piece that cannot exist on
a CI host (CANNOT_EXIST_HERE): everything else the suite needs is installed by tests/run.sh,
so a skip there would hide a test that never ran (ci_skips.py)."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import uvloop

from ci_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401 - hooks, for pytest
from osocks import socks5
from osocks.server import Server, system_resolver
from osocks.settings import Settings

ROOT = Path(__file__).resolve().parent.parent

# OSOCKS_TEST_LOOP=asyncio (tests/run.sh's second pass): the servers the tests run in a thread use
# the stock loop, and every process they start finds no uvloop (tests/no_uvloop on PYTHONPATH)
STOCK_LOOP = os.environ.get("OSOCKS_TEST_LOOP") == "asyncio"
DEFAULT_LOOP: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop if STOCK_LOOP else uvloop.new_event_loop
if STOCK_LOOP:
    hidden = str(ROOT / "tests" / "no_uvloop")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (hidden, os.environ.get("PYTHONPATH", "")) if p)
LOOP_NAMES = ("uvloop", "asyncio")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In the stock-loop pass, a test parametrized by event loop is left out: the first pass ran it
    on both loops already (and with uvloop hidden, its uvloop case would be its asyncio case again)."""
    if not STOCK_LOOP:
        return
    by_loop = [item for item in items if parametrized_by_loop(item)]
    if by_loop:
        config.hook.pytest_deselected(items=by_loop)
        items[:] = [item for item in items if not parametrized_by_loop(item)]


def parametrized_by_loop(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    return callspec is not None and any(value in LOOP_NAMES for value in callspec.params.values())


class ServerThread:
    """A Server on its own event loop in a background thread."""

    def __init__(self, settings: Settings, resolver: Any = system_resolver, loop_factory: Callable = DEFAULT_LOOP):
        self.loop = loop_factory()
        self.server = Server(settings, resolver)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.server.start())
        self.host, self.port = self.server.bound_addresses()[0]

    def run(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any], timeout: float = 10) -> Any:
        future: Future = Future()

        def job() -> None:
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                future.set_exception(e)

        self.loop.call_soon_threadsafe(job)
        return future.result(timeout)

    def status(self) -> dict:
        return self.call(self.server.status)

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s: {status}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.call(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def make_server() -> Iterator[Callable[..., ServerThread]]:
    started: list[ServerThread] = []

    def make(resolver: Any = system_resolver, loop_factory: Callable = DEFAULT_LOOP, **options: Any) -> ServerThread:
        options.setdefault("listen", ("127.0.0.1",))
        options.setdefault("port", 0)
        options.setdefault("allow_local", True)
        server = ServerThread(Settings(**options), resolver, loop_factory)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def osocks(make_server: Callable[..., ServerThread]) -> ServerThread:
    return make_server()


# -- a SOCKS5 client with plain blocking sockets ---------------------------


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_reply(sock: socket.socket) -> tuple[int, str, int]:
    head = recv_exactly(sock, 4)
    atyp = head[3]
    if atyp == socks5.AddressType.IPV4:
        rest = recv_exactly(sock, 6)
    elif atyp == socks5.AddressType.IPV6:
        rest = recv_exactly(sock, 18)
    else:
        length = recv_exactly(sock, 1)
        rest = length + recv_exactly(sock, length[0] + 2)
    parsed = socks5.parse_request(bytes((5, 0)) + head[2:] + rest)
    assert parsed is not None
    return head[1], parsed[0].host, parsed[0].port


def socks_connect(port: int, host: str, dport: int, timeout: float = 10) -> tuple[socket.socket, int, str, int]:
    """Greeting + CONNECT; returns the socket and the reply (code, bound host, bound port)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(socks5.encode_greeting(b"\x00"))
    assert recv_exactly(sock, 2) == b"\x05\x00"
    sock.sendall(socks5.encode_request(socks5.Command.CONNECT, host, dport))
    code, bhost, bport = read_reply(sock)
    return sock, code, bhost, bport


def tunnel(port: int) -> tuple[socket.socket, socket.socket, socket.socket]:
    """A CONNECT through osocks to a fresh listener: (client side, destination side, listener)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    sock, code, _, _ = socks_connect(port, "127.0.0.1", listener.getsockname()[1])
    assert code == socks5.ReplyCode.SUCCEEDED
    conn, _ = listener.accept()
    return sock, conn, listener


def wait_closed(sock: socket.socket, timeout: float = 5) -> bytes:
    """Read until the peer closes; returns what came before."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


# -- destinations ----------------------------------------------------------


class EchoServer:
    """Echoes what it reads; on the client's EOF sends `farewell`, then closes."""

    def __init__(self, host: str = "127.0.0.1", farewell: bytes = b"") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.farewell = farewell
        self.peers: list[tuple] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        with conn:
            try:
                while chunk := conn.recv(65536):
                    conn.sendall(chunk)
                conn.sendall(self.farewell)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    files: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        digest = hashlib.sha256()
        while length:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                break
            digest.update(chunk)
            length -= len(chunk)
        body = digest.hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class HttpServer:
    """GET /10M returns 10 MB of random bytes; POST returns the sha256 of the body."""

    def __init__(self) -> None:
        self.big = os.urandom(10 * 1024 * 1024)
        _Handler.files = {"/10M": self.big, "/hello": b"hello\n"}
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="session")
def http_server() -> Iterator[HttpServer]:
    server = HttpServer()
    yield server
    server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- osocks as a real process ---------------------------------------------


class OsocksProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None, python: str = sys.executable) -> None:
        self.proc = subprocess.Popen(
            [python, "-m", "osocks", "--no-uci", *args],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.lines: list[str] = []
        self.port = int(args[args.index("-p") + 1]) if "-p" in args else 1080
        if self.port:
            threading.Thread(target=self._drain, daemon=True).start()
            self._wait_listening()
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()  # type: ignore[union-attr]
            if not line:
                break
            self.lines.append(line)
            match = re.search(r"listening on .*:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                break
        if not self.port:
            self.stop()
            raise RuntimeError("osocks did not start: " + "".join(self.lines))
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("osocks did not start: " + "".join(self.lines))

    def _drain(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            self.lines.append(line)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@pytest.fixture
def run_osocks() -> Iterator[Callable[..., OsocksProcess]]:
    started: list[OsocksProcess] = []

    def run(*args: str, env: dict[str, str] | None = None) -> OsocksProcess:
        process = OsocksProcess(*args, env=env)
        started.append(process)
        return process

    yield run
    for process in started:
        process.stop()
