"""Hardening over real sockets: slowloris, fd exhaustion, malformed input,
thousands of held sessions, and CLOSE_WAIT leaks.

All traffic stays on 127.0.0.1; every loop is bounded in count and in time.
Processes started here are ended by their own PID (fixtures), nothing else.

SLOW: test_ten_thousand_held_sessions (~11 s) and test_fuzzed_handshakes (~7 s);
the others take a few seconds each.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import random
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop

from conftest import ROOT, EchoServer, OsocksProcess, ServerThread, free_port, recv_exactly, socks_connect, wait_closed
from osocks import socks5
from osocks.rules import parse_rule
from osocks.settings import User
from osocks.socks5 import Command, ReplyCode

LOOPS = ("uvloop", "asyncio")
TCP_LISTEN, TCP_CLOSE_WAIT = "0A", "08"  # states as /proc/net/tcp writes them
NO_AUTH = b"\x00"

# -- small helpers ----------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(interval)


def raise_nofile(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (up to the hard limit); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@pytest.fixture
def nofile() -> Iterator[Callable[[int], int]]:
    """`raise_nofile`, with the limits of the test process restored afterwards."""
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield raise_nofile
    resource.setrlimit(resource.RLIMIT_NOFILE, saved)


def hard_nofile() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else hard


def rst_close(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0) instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def connect_hello(dest_port: int) -> bytes:
    """Greeting (no authentication) and CONNECT 127.0.0.1:dest_port, in one piece."""
    return socks5.encode_greeting(NO_AUTH) + socks5.encode_request(Command.CONNECT, "127.0.0.1", dest_port)


def echo_round_trip(sock: socket.socket, payload: bytes = b"ping") -> None:
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload


def open_tunnel(proxy_port: int, dest_port: int) -> socket.socket:
    sock, code, _, _ = socks_connect(proxy_port, "127.0.0.1", dest_port, timeout=10)
    assert code == ReplyCode.SUCCEEDED
    return sock


def without_uvloop(tmp_path: Path) -> dict[str, str]:
    """An environment in which `import uvloop` fails, so osocks runs on the stock loop."""
    (tmp_path / "uvloop.py").write_text("raise ImportError('uvloop hidden for this test')\n")
    return dict(os.environ, PYTHONPATH=f"{tmp_path}:{ROOT / 'src'}")


def loop_env(loop: str, tmp_path: Path) -> dict[str, str] | None:
    return without_uvloop(tmp_path) if loop == "asyncio" else None


# -- a process seen through /proc --------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def tcp_states(pid: int) -> list[str]:
    """The TCP state of each socket `pid` holds (hex, as in /proc/net/tcp)."""
    mine = socket_inodes(pid)
    states = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[9]) in mine:
                    states.append(fields[3])
    return states


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the IPv4 listener on `port` (for a listening
    socket, /proc/net/tcp's rx_queue is its accept queue)."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[3] == TCP_LISTEN and int(fields[1].rpartition(":")[2], 16) == port:
                return int(fields[4].partition(":")[2], 16)
    raise AssertionError(f"no listener on port {port}")


def wait_hogs_gone(server: OsocksProcess) -> None:
    """After a flood of connections that are closed now: the server has accepted and closed every
    one of them. Those that found no descriptor wait in the accept queue, and each takes one again
    when accepted, until its end is read."""
    pid = server.proc.pid
    wait_until(lambda: not accept_queue(server.port) and fd_count(pid) < FD_LIMIT // 2, 10, "the hogs' fds are freed")


def close_wait_count(pid: int) -> int:
    return tcp_states(pid).count(TCP_CLOSE_WAIT)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def start_osocks(
    run_osocks: Callable[..., OsocksProcess], *args: str, env: dict[str, str] | None = None, nofile: int | None = None
) -> OsocksProcess:
    """osocks as a real process on a free port, its fd limit set to `nofile` (soft and hard)."""
    server: OsocksProcess = run_osocks("-l", "127.0.0.1", "-p", str(free_port()), "--allow-local", *args, env=env)
    if nofile is not None:
        resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (nofile, nofile))
    return server


def assert_only_listener_left(server: OsocksProcess, timeout: float) -> None:
    """Every session socket is closed: the one TCP socket left is the listener, no CLOSE_WAIT."""
    pid = server.proc.pid
    wait_until(lambda: tcp_states(pid) == [TCP_LISTEN], timeout, f"only the listener left: {tcp_states(pid)}")
    assert server.proc.poll() is None
    assert not any("Traceback" in line for line in server.lines), "".join(server.lines)


# -- 1. slowloris ----------------------------------------------------------------

SLOWLORIS = 1000  # clients that connect and then say nothing (or very little)
DRIPPERS = 50  # of them, the ones sending one byte a second


class Dripper(threading.Thread):
    """Sends `payload` one byte a second to each socket, until told to stop (bounded by the payload)."""

    def __init__(self, socks: list[socket.socket], payload: bytes) -> None:
        super().__init__(daemon=True)
        self.socks, self.payload = list(socks), payload
        self.stopped = threading.Event()

    def run(self) -> None:
        for byte in self.payload:
            for sock in list(self.socks):
                try:
                    sock.send(bytes((byte,)))
                except OSError:  # closed by the server, as it should be
                    self.socks.remove(sock)
            if self.stopped.wait(1.0):
                return


def connect_idle(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setblocking(False)
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the peer closed (EOF or reset); reads and drops anything before."""
    while True:
        try:
            if not sock.recv(4096):
                return True
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True


def served_tunnel(proxy_port: int, dest_port: int) -> None:
    sock = open_tunnel(proxy_port, dest_port)
    with sock:
        echo_round_trip(sock)


SLOWLORIS_TIMEOUT = 10.0  # handshake timeout: the slow clients are all still there while new ones are served
DRIP_NAME = "a-name-longer-than-the-handshake-timeout-in-seconds.test"  # one byte a second never finishes


def test_slowloris_does_not_starve_new_clients(make_server, echo: EchoServer, nofile) -> None:
    """SLOW (~11 s): new clients are served while every slow one still holds its place."""
    nofile(4 * SLOWLORIS + 512)
    server: ServerThread = make_server(handshake_timeout=SLOWLORIS_TIMEOUT)
    idle = [connect_idle(server.port) for _ in range(SLOWLORIS - DRIPPERS)]
    slow = [connect_idle(server.port) for _ in range(DRIPPERS)]
    dripper = Dripper(slow, socks5.encode_greeting(NO_AUTH) + socks5.encode_request(Command.CONNECT, DRIP_NAME, 80))
    dripper.start()
    try:
        server.wait_for(lambda s: s["sessions"]["live"] == SLOWLORIS, timeout=10)
        for _ in range(3):
            served_tunnel(server.port, echo.port)
        status = server.status()  # served before any slow one timed out, so not by waiting for their places
        assert status["sessions"]["live"] >= SLOWLORIS and status["sessions"]["total"] == SLOWLORIS + 3
        everyone = idle + slow
        wait_until(
            lambda: all(closed_by_peer(sock) for sock in everyone), 30, "the handshake timeout closes them all", 0.2
        )
        server.wait_for(lambda s: s["sessions"]["live"] == 0, timeout=10)
    finally:
        dripper.stopped.set()
        dripper.join(5)
        for sock in idle + slow:
            sock.close()
    served_tunnel(server.port, echo.port)
    assert server.status()["sessions"]["total"] == SLOWLORIS + 4


# -- 2. fd exhaustion -------------------------------------------------------------

FD_LIMIT = 64
HOGS = 3 * FD_LIMIT  # silent clients: more than the server has fds for


def open_hogs(port: int, count: int) -> list[socket.socket]:
    """`count` connections started without waiting (the kernel completes them from the backlog)."""
    hogs = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        hogs.append(sock)
    return hogs


@pytest.mark.parametrize("loop", LOOPS)
def test_fd_exhaustion_keeps_serving_without_spinning(loop: str, tmp_path: Path, run_osocks, echo: EchoServer) -> None:
    server = start_osocks(run_osocks, "--handshake-timeout", "60000", env=loop_env(loop, tmp_path), nofile=FD_LIMIT)
    pid = server.proc.pid
    tunnel = open_tunnel(server.port, echo.port)
    echo_round_trip(tunnel)
    hogs = open_hogs(server.port, HOGS)
    exhausted = time.monotonic()
    try:
        wait_until(lambda: fd_count(pid) >= FD_LIMIT - 1, 10, f"osocks runs out of fds (has {fd_count(pid)})")
        # a spinning loop takes a whole core (or what a loaded machine leaves it); a waiting one, almost nothing
        window, before = time.monotonic(), cpu_seconds(pid)
        time.sleep(2.0)  # the window the CPU share is measured over, not a wait for something
        share = (cpu_seconds(pid) - before) / (time.monotonic() - window)
        assert share < 0.25, f"osocks spins while out of fds: {share:.0%} of a core"
        assert server.proc.poll() is None
        echo_round_trip(tunnel, b"still here")  # a live session is served meanwhile
    finally:
        for sock in hogs:
            sock.close()
    wait_hogs_gone(server)
    fresh = open_tunnel(server.port, echo.port)  # accepted again
    echo_round_trip(fresh)
    echo_round_trip(tunnel)
    fresh.close()
    tunnel.close()
    hogged = time.monotonic() - exhausted  # the stock loop retries a failed accept() once a second meanwhile
    assert server.stop() == 0
    logged = sum("out of system resource" in line for line in server.lines)  # the stock loop's, once per retry
    assert logged <= hogged + 2, f"{logged} accept() failures logged in {hogged:.1f} s"  # not a flood


# -- 3. malformed input -------------------------------------------------------------

SEED = 20240517
FUZZ_ROUND = 1000  # connections per round; two rounds
FUZZ_BUDGET = 60.0  # seconds per round, at most: a bound for a stuck server, not a benchmark
FUZZ_CONCURRENCY = 100
FUZZ_READ = 0.3  # seconds a fuzz client waits for the server's answer
MEMORY_GROWTH = 512 * 1024  # bytes a second round may leave behind, at most
ECHO_NAME = "echo.test"  # the one name the fuzz resolver knows


@dataclass(frozen=True, slots=True)
class Case:
    target: int  # which server: 0 without users, 1 with users
    chunks: tuple[tuple[bytes, float], ...]  # segments, and the pause after each
    ending: str  # "fin" | "rst" | "half" | "read-rst"


def valid_handshake(rng: random.Random, echo_port: int, with_users: bool) -> bytes:
    methods = rng.choice([b"\x00", b"\x02", b"\x00\x02", b"\x01\x02\x00", bytes(range(256))[:255]])
    data = socks5.encode_greeting(methods)
    if with_users:
        password = rng.choice([b"pass", b"wrong", b"", b"p" * 255])
        data += socks5.encode_credentials(rng.choice([b"user", b"", b"u" * 255]), password)
    command = rng.choice([Command.CONNECT] * 6 + [Command.BIND, Command.UDP_ASSOCIATE, 0x00, 0x04, 0xFF])
    host = rng.choice(["127.0.0.1"] * 4 + ["::1", ECHO_NAME, "nowhere.test", "0.0.0.0", "x" * 255])
    port = rng.choice([echo_port] * 4 + [0, 1, 65535])
    data += socks5.encode_request(command, host, port)
    if rng.random() < 0.3:
        data += rng.randbytes(rng.choice([1, 100, 4096]))  # early data for the destination
    return data


def mutate(rng: random.Random, data: bytes) -> bytes:
    kind = rng.choice(["flip", "flip", "truncate", "insert", "repeat", "oversize", "same"])
    if kind == "flip" and data:
        buf = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        return bytes(buf)
    if kind == "truncate":
        return data[: rng.randrange(len(data) + 1)]
    if kind == "insert":
        at = rng.randrange(len(data) + 1)
        return data[:at] + rng.randbytes(rng.randint(1, 16)) + data[at:]
    if kind == "repeat":
        return data * rng.randint(2, 4)
    if kind == "oversize":  # more early data than the server holds (64 KiB)
        return data + rng.randbytes(rng.choice([70_000, 200_000]))
    return data


def split(rng: random.Random, data: bytes) -> tuple[tuple[bytes, float], ...]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 5)))) if len(data) > 1 else []
    edges = [0, *cuts, len(data)]
    return tuple((data[a:b], rng.choice([0.0, 0.0, 0.0, 0.002, 0.02])) for a, b in itertools.pairwise(edges))


def fuzz_case(rng: random.Random, echo_port: int) -> Case:
    target = rng.randrange(2)
    if rng.random() < 0.2:
        data = rng.randbytes(rng.choice([0, 1, 2, 3, 7, 64, 300, 5000]))
        if data and rng.random() < 0.5:
            data = b"\x05" + data  # get past the version byte
    else:
        data = mutate(rng, valid_handshake(rng, echo_port, with_users=target == 1))
    return Case(target, split(rng, data), rng.choice(["fin", "rst", "half", "read-rst"]))


async def drain(sock: socket.socket, seconds: float) -> None:
    """Read (and drop) what the server sends until it closes, or `seconds` pass."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(seconds):
            while await loop.sock_recv(sock, 65536):
                pass
    except TimeoutError:
        pass


async def play(case: Case, port: int) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        async with asyncio.timeout(1.0):  # a server that stops reading must not hold us
            for chunk, pause in case.chunks:
                await loop.sock_sendall(sock, chunk)
                if pause:
                    await asyncio.sleep(pause)
        if case.ending == "rst":
            rst_close(sock)
            return
        if case.ending == "half":
            sock.shutdown(socket.SHUT_WR)
        await drain(sock, FUZZ_READ)
        if case.ending == "read-rst":
            rst_close(sock)
    except (OSError, TimeoutError):  # the server closed or reset us: allowed
        pass
    finally:
        sock.close()


async def fuzz_round(rng: random.Random, ports: tuple[int, int], echo_port: int) -> int:
    """FUZZ_ROUND cases, FUZZ_CONCURRENCY at a time, within FUZZ_BUDGET seconds; returns how many ran."""
    cases = [fuzz_case(rng, echo_port) for _ in range(FUZZ_ROUND)]
    gate = asyncio.Semaphore(FUZZ_CONCURRENCY)
    deadline = time.monotonic() + FUZZ_BUDGET
    played = 0

    async def one(case: Case) -> None:
        nonlocal played
        async with gate:
            if time.monotonic() < deadline:
                await play(case, ports[case.target])
                played += 1

    await asyncio.gather(*(one(case) for case in cases))
    return played


class Problems(logging.Handler):
    """Formats every record (a bad format argument is a bug too); keeps the errors, and every
    general failure (01) answered to a request: the only malformed request that earns one is a
    CONNECT to port 0, any other is a bug showing as a reply."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception as e:  # noqa: BLE001 - that is what we look for
            self.found.append(f"log record {record.msg!r} does not format: {e!r}")
            return
        error = record.levelno >= logging.ERROR or "Traceback" in text or "Exception in callback" in text
        if error or ("(reply general_failure)" in text and "destination port 0 (reply" not in text):
            self.found.append(text)

    def loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.found.append(f"loop exception: {context.get('message')} {context.get('exception')!r}")


@pytest.fixture
def problems() -> Iterator[Problems]:
    """Errors logged by osocks or asyncio, and exceptions that reach the event loop."""
    handler = Problems()
    saved = []
    for name in ("osocks", "asyncio"):
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # thousands of session lines need not reach pytest's capture
    yield handler
    for logger, level, propagate in saved:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def fuzz_server(
    make_server: Callable[..., ServerThread], problems: Problems, echo_port: int, **options: Any
) -> ServerThread:
    async def resolver(host: str, port: int, family: int) -> list[tuple[int, tuple]]:
        if host == ECHO_NAME:
            return [(socket.AF_INET, ("127.0.0.1", port))]
        raise socket.gaierror(socket.EAI_NONAME, "unknown name")

    def new_loop() -> asyncio.AbstractEventLoop:
        loop = uvloop.new_event_loop()
        loop.set_exception_handler(problems.loop_exception)
        return loop

    rules = (parse_rule(f"allow 127.0.0.1 port {echo_port}"), parse_rule("deny all"))  # nowhere else
    return make_server(
        resolver=resolver,
        loop_factory=new_loop,
        handshake_timeout=1.0,
        connect_timeout=1.0,
        bind_timeout=0.5,
        idle_timeout=2.0,
        dest_rules=rules,
        **options,
    )


def never_awaited(recorded: pytest.WarningsRecorder) -> list[str]:
    """Coroutines created and dropped unstarted: a command a session set up but never ran."""
    return [str(w.message) for w in recorded if "never awaited" in str(w.message)]


def settle(servers: list[ServerThread]) -> None:
    """Every session ended and every connection closed (the servers run in this process)."""
    for server in servers:
        server.wait_for(lambda s: s["sessions"]["live"] == 0, timeout=10)
    pid = os.getpid()
    wait_until(lambda: set(tcp_states(pid)) <= {TCP_LISTEN}, 10, f"only listeners left: {tcp_states(pid)}")
    gc.collect()


def test_fuzzed_handshakes(make_server, echo: EchoServer, problems: Problems, recwarn, nofile) -> None:
    """SLOW (~7 s): two rounds of malformed handshakes; nothing escapes, nothing stays, nothing grows."""
    nofile(4096)
    servers = [
        fuzz_server(make_server, problems, echo.port),
        fuzz_server(make_server, problems, echo.port, users=(User("user", "pass"),)),
    ]
    ports = (servers[0].port, servers[1].port)
    rng = random.Random(SEED)
    assert asyncio.run(fuzz_round(rng, ports, echo.port)) == FUZZ_ROUND
    settle(servers)
    osocks_log = logging.getLogger("osocks")
    osocks_log.setLevel(logging.ERROR)  # lines kept by pytest's log capture are not the server's memory
    tracemalloc.start()
    try:
        assert asyncio.run(fuzz_round(rng, ports, echo.port)) == FUZZ_ROUND
        settle(servers)
        grown = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        osocks_log.setLevel(logging.INFO)
    assert not problems.found, "\n".join(problems.found[:20])
    assert not never_awaited(recwarn), never_awaited(recwarn)[:3]
    assert grown < MEMORY_GROWTH, f"{grown} bytes still held after a second round"
    for server in servers:
        assert sum(server.status()["replies"].values()) > 0  # requests did reach the command stage
    tunnel = open_tunnel(servers[0].port, echo.port)  # still serves a normal CONNECT
    echo_round_trip(tunnel)
    tunnel.close()


def test_reset_right_after_the_request_leaves_no_stray_coroutine(make_server, echo: EchoServer, recwarn) -> None:
    """A client that resets right after its request: its command is cancelled before it starts."""
    server: ServerThread = make_server()
    hello = connect_hello(echo.port)
    for _ in range(20):
        client = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        client.sendall(hello)
        rst_close(client)
    server.wait_for(lambda s: s["sessions"]["total"] == 20 and s["sessions"]["live"] == 0)
    server.call(gc.collect)
    assert not never_awaited(recwarn), never_awaited(recwarn)[:3]


# -- 4. thousands of held sessions ----------------------------------------------------

HELD = 10_000
HELD_CONCURRENCY = 400  # handshakes in flight at once
FD_MARGIN = 64  # fds osocks needs besides two per session

ECHO_PROCESS = """
import asyncio, resource, sys
try:
    from uvloop import run
except ImportError:  # the suite's stock-loop pass hides uvloop (tests/no_uvloop)
    from asyncio import run

_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        self.transport.write(data)

async def main():
    server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the test closes stdin

run(main())
"""


@pytest.fixture
def echo_process() -> Iterator[int]:
    """An asyncio echo server in a process of its own (its fds do not count against ours); yields its port."""
    proc = subprocess.Popen(
        [sys.executable, "-c", ECHO_PROCESS], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        yield int(proc.stdout.readline())  # type: ignore[union-attr]
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def recv_exactly_async(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


async def hold_tunnels(proxy_port: int, dest_port: int, count: int) -> list[socket.socket]:
    """`count` CONNECT tunnels, each checked by an echo; all or nothing."""
    loop = asyncio.get_running_loop()
    hello = connect_hello(dest_port)
    gate = asyncio.Semaphore(HELD_CONCURRENCY)

    async def one() -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            async with gate:
                await loop.sock_connect(sock, ("127.0.0.1", proxy_port))
                await loop.sock_sendall(sock, hello)
                reply = await recv_exactly_async(sock, 2 + 10)  # method choice, then a reply for an IPv4 address
                assert reply[:4] == b"\x05\x00\x05\x00", reply
                await loop.sock_sendall(sock, b"ping")
                assert await recv_exactly_async(sock, 4) == b"ping"
        except BaseException:
            sock.close()
            raise
        return sock

    async with asyncio.timeout(40):
        results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    socks = [r for r in results if isinstance(r, socket.socket)]
    errors = [r for r in results if not isinstance(r, socket.socket)]
    if errors:
        for sock in socks:
            sock.close()
        raise AssertionError(f"{len(errors)} of {count} tunnels failed, first: {errors[0]!r}")
    return socks


def raise_hard_nofile(wanted: int) -> None:
    """Root may raise the hard fd limit too (up to fs.nr_open); others keep theirs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, wanted))


def test_ten_thousand_held_sessions(run_osocks, nofile, request: pytest.FixtureRequest) -> None:
    """SLOW (~11 s): 10 000 tunnels at once (as many as the hard fd limit holds), then all closed."""
    raise_hard_nofile(2 * HELD + FD_MARGIN * 4)  # before the echo process starts: it inherits the limit
    held = min(HELD, (hard_nofile() - FD_MARGIN * 4) // 2)
    assert held >= 100, f"the hard fd limit ({hard_nofile()}) holds only {held} sessions"
    echo_process = request.getfixturevalue("echo_process")
    nofile(held + FD_MARGIN * 4)
    server = start_osocks(run_osocks, "-q", nofile=2 * held + FD_MARGIN)
    pid = server.proc.pid
    assert_only_listener_left(server, timeout=5)  # the start-up probe's session is gone
    idle = fd_count(pid)
    socks = uvloop.run(hold_tunnels(server.port, echo_process, held))
    try:
        assert fd_count(pid) == idle + 2 * held
        assert close_wait_count(pid) == 0
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: fd_count(pid) == idle, 20, f"osocks is back to {idle} fds (has {fd_count(pid)})", 0.2)
    assert close_wait_count(pid) == 0
    assert_only_listener_left(server, timeout=1)
    fresh = open_tunnel(server.port, echo_process)
    echo_round_trip(fresh)
    fresh.close()


# -- 5. no CLOSE_WAIT, whichever side closes first --------------------------------------


class Destination:
    """A destination whose accepted connections the test closes by hand."""

    def __init__(self, backlog: int = 64) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=backlog)
        self.sock.settimeout(5)
        self.port = self.sock.getsockname()[1]

    def accept(self) -> socket.socket:
        conn, _ = self.sock.accept()
        conn.settimeout(5)
        return conn

    def close(self) -> None:
        self.sock.close()


class FullBacklog(Destination):
    """A destination that never accepts and whose accept queue is full: SYNs to it go unanswered."""

    def __init__(self) -> None:
        super().__init__(backlog=0)
        self.fillers = open_hogs(self.port, 4)

    def close(self) -> None:
        for sock in self.fillers:
            sock.close()
        super().close()


def linked(proxy_port: int, dest: Destination) -> tuple[socket.socket, socket.socket]:
    """A tunnel that moved bytes both ways: (client socket, destination's socket)."""
    client = open_tunnel(proxy_port, dest.port)
    conn = dest.accept()
    client.sendall(b"up")
    assert recv_exactly(conn, 2) == b"up"
    conn.sendall(b"down")
    assert recv_exactly(client, 4) == b"down"
    return client, conn


def client_fin_first(port: int, dest: Destination) -> None:
    client, conn = linked(port, dest)
    client.close()
    assert wait_closed(conn) == b""
    conn.close()


def destination_fin_first(port: int, dest: Destination) -> None:
    client, conn = linked(port, dest)
    conn.close()
    assert wait_closed(client) == b""
    client.close()


def client_rst(port: int, dest: Destination) -> None:
    client, conn = linked(port, dest)
    rst_close(client)
    wait_closed(conn)
    conn.close()


def destination_rst(port: int, dest: Destination) -> None:
    client, conn = linked(port, dest)
    rst_close(conn)
    wait_closed(client)
    client.close()


def both_half_close(server: OsocksProcess, dest: Destination) -> None:
    """Each side shuts down writing, data still flowing the other way; osocks closes both by itself."""
    client, conn = linked(server.port, dest)
    client.shutdown(socket.SHUT_WR)
    assert conn.recv(10) == b""
    conn.sendall(b"after")
    assert recv_exactly(client, 5) == b"after"
    conn.shutdown(socket.SHUT_WR)
    assert client.recv(10) == b""
    assert_only_listener_left(server, timeout=5)  # before we close our ends
    client.close()
    conn.close()


def client_closes_during_handshake(port: int, sent: bytes, rst: bool) -> None:
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    if sent:
        client.sendall(sent)
        time.sleep(0.05)
    if rst:
        rst_close(client)
    else:
        client.close()


def client_closes_while_connect_pends(port: int, dest: FullBacklog, rst: bool) -> None:
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    client.sendall(connect_hello(dest.port))
    assert recv_exactly(client, 2) == b"\x05\x00"
    client.settimeout(0.3)
    with pytest.raises(TimeoutError):
        client.recv(10)  # the connect pends: no reply yet
    if rst:
        rst_close(client)
    else:
        client.close()


def destination_closes_before_client_speaks(port: int, dest: Destination, rst: bool) -> None:
    client = open_tunnel(port, dest.port)
    conn = dest.accept()
    if rst:
        rst_close(conn)
    else:
        conn.close()
    wait_closed(client)
    client.close()


def destination_closes_before_reply(port: int, dest: Destination) -> None:
    """The destination hangs up at once, maybe before osocks has replied."""
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    client.sendall(connect_hello(dest.port))
    dest.accept().close()
    wait_closed(client)
    client.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_no_close_wait_whoever_closes_first(loop: str, tmp_path: Path, run_osocks) -> None:
    server = start_osocks(run_osocks, "-T", "2000", env=loop_env(loop, tmp_path))
    port = server.port
    dest, full = Destination(), FullBacklog()
    try:
        for rst in (False, True):
            client_closes_while_connect_pends(port, full, rst)  # these end with -T, 2 s from now
        greeting = socks5.encode_greeting(NO_AUTH)
        for sent in (b"", b"\x05", greeting, greeting + b"\x05\x01\x00\x01\x7f"):
            for rst in (False, True):
                client_closes_during_handshake(port, sent, rst)
        for _ in range(3):
            client_fin_first(port, dest)
            destination_fin_first(port, dest)
            client_rst(port, dest)
            destination_rst(port, dest)
            for rst in (False, True):
                destination_closes_before_client_speaks(port, dest, rst)
            destination_closes_before_reply(port, dest)
        assert_only_listener_left(server, timeout=6)
        both_half_close(server, dest)
    finally:
        dest.close()
        full.close()
    assert_only_listener_left(server, timeout=1)
