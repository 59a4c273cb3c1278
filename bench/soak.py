"""The soak: mixed clients at once against one osocks for MINUTES, proving nothing is lost.

    python3 bench/run.py --soak 10          # 10 minutes, -w 2, a worker SIGKILLed every 20 s
    python3 bench/run.py --soak 0.25 --soak-kill-every 6 --soak-hup-every 2   # CI's few seconds

Clients, all at once and over and over: bulk downloads checked by length and sha256, short HTTP
sessions (checked the same way), UDP round trips, BIND (bytes both ways, checked), slowloris
clients (the handshake timeout must close them), clients that reset mid-transfer.  Meanwhile
osocks gets a SIGHUP every few seconds with its users file alternating, and with -w 2 one of its
workers is SIGKILLed every 20 s.  Every second the fd count and RSS of osocks' process tree are
sampled.

A session ends completed, or failed with a cause.  The acceptable failures are the provoked ones
(slowloris closed by the handshake timeout, our own resets) and those of a killed worker (a
connection error within KILL_GRACE seconds of a kill); anything else, a corrupted transfer, fds
or RSS that keep growing, or fds that do not come back to the idle count once the clients stop,
fails the soak (exit 1).  Writes soak.csv, and soak.png where matplotlib is installed
(pip install -e '.[bench]').
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import os
import random
import signal
import socket
import statistics
import struct
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import services
from proctree import process_tree, tree_memory
from socks5 import Endpoint

try:
    import uvloop
except ImportError:
    uvloop = None  # type: ignore[assignment]

BULK_FILE, BULK_BYTES = "8M", 8 << 20
SMALL_FILE, SMALL_BYTES = "1K", 1 << 10
USER, PASSWORD = b"soak", b"soak-password"
HANDSHAKE_TIMEOUT_MS = 2000  # slowloris clients are closed after this
SLOWLORIS_CLIENTS = 20
KILL_GRACE = 3.0  # seconds after a kill in which a connection error is the killed worker's
STEP_TIMEOUT = 30.0  # any one read or write of a client, at most
SETTLE_SECONDS = 15.0  # for osocks to be back to its idle fd count once the clients stop
FD_SLACK = 4  # fds osocks may hold above its idle count at the end (a restarted worker's own)
# growth: the trend of the samples after a warm-up quarter, over their span, at most this much
# (a share of the median, plus a fixed amount); judged only with MIN_STEADY_SAMPLES or more
FD_GROWTH, FD_GROWTH_FIXED = 0.25, 30
RSS_GROWTH, RSS_GROWTH_FIXED_MB = 0.10, 8.0
MIN_STEADY_SAMPLES = 30

PROVOKED = ("slowloris closed by the handshake timeout", "reset by the client mid-transfer")
KILLED = "a killed worker's session"


class Corrupt(Exception):
    """Bytes arrived, but not the ones sent."""


@dataclass
class Tally:
    started: Counter[str] = field(default_factory=Counter)
    completed: Counter[str] = field(default_factory=Counter)
    failed: Counter[tuple[str, str]] = field(default_factory=Counter)  # (client kind, cause)
    verified_bytes: int = 0
    corrupted: list[str] = field(default_factory=list)
    kills: list[float] = field(default_factory=list)
    reloads: int = 0
    examples: dict[str, str] = field(default_factory=dict)  # cause -> first error text

    def unexpected(self) -> int:
        return sum(n for (_, cause), n in self.failed.items() if cause not in (*PROVOKED, KILLED))


@dataclass(frozen=True)
class Sample:
    seconds: float
    fds: int
    rss_mb: float
    started: int
    completed: int
    failed: int


# -- a SOCKS5 client on asyncio streams -------------------------------------------------------


async def _read(reader: asyncio.StreamReader, n: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), STEP_TIMEOUT)


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str, int]:
    head = await _read(reader, 4)
    if head[3] == 1:
        host = socket.inet_ntoa(await _read(reader, 4))
    elif head[3] == 4:
        host = socket.inet_ntop(socket.AF_INET6, await _read(reader, 16))
    else:
        host = (await _read(reader, (await _read(reader, 1))[0])).decode()
    (port,) = struct.unpack("!H", await _read(reader, 2))
    return head[1], host, port


def _request(command: int, host: str, port: int) -> bytes:
    return bytes((5, command, 0, 1)) + socket.inet_aton(host) + struct.pack("!H", port)


async def socks_open(
    proxy: Endpoint, command: int, host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str, int]:
    """Greeting, login, request, in one write; the reader past the first reply."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(proxy.host, proxy.port), STEP_TIMEOUT)
    login = bytes((1, len(USER))) + USER + bytes((len(PASSWORD),)) + PASSWORD
    writer.write(b"\x05\x01\x02" + login + _request(command, host, port))
    if await _read(reader, 4) != b"\x05\x02\x01\x00":
        writer.close()
        raise ConnectionError("login refused")
    code, bound_host, bound_port = await _reply(reader)
    if code != 0:
        writer.close()
        raise ConnectionError(f"request refused with reply {code}")
    return reader, writer, bound_host, bound_port


async def http_checked(proxy: Endpoint, web: Endpoint, name: str, size: int, tally: Tally) -> None:
    reader, writer, _, _ = await socks_open(proxy, 1, web.host, web.port)
    try:
        writer.write(f"GET /{name} HTTP/1.1\r\nHost: {web.host}\r\nConnection: close\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP_TIMEOUT)
        if not head.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(f"HTTP answer {head[:40]!r}")
        digest, received = hashlib.sha256(), 0
        while chunk := await asyncio.wait_for(reader.read(1 << 18), STEP_TIMEOUT):
            digest.update(chunk)
            received += len(chunk)
        if received < size:  # cut short: its worker killed, or a failure of its own
            raise ConnectionError(f"/{name}: closed after {received} of {size} bytes")
        if received > size:
            raise Corrupt(f"/{name}: {received} bytes, not {size}")
        if digest.hexdigest() != services.SERVED_SHA256["/" + name]:
            raise Corrupt(f"/{name}: {size} bytes, but the sha256 differs")
        tally.verified_bytes += size
    finally:
        writer.close()


async def reset_mid_transfer(proxy: Endpoint, web: Endpoint, tally: Tally) -> None:
    reader, writer, _, _ = await socks_open(proxy, 1, web.host, web.port)
    writer.write(f"GET /{BULK_FILE} HTTP/1.1\r\nHost: {web.host}\r\nConnection: close\r\n\r\n".encode())
    received = 0
    while received < BULK_BYTES // 8:
        chunk = await asyncio.wait_for(reader.read(1 << 16), STEP_TIMEOUT)
        if not chunk:
            raise ConnectionError("closed before the client's reset")
        received += len(chunk)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    raise Provoked(PROVOKED[1])


class Provoked(Exception):
    """A session ended the way the soak made it end."""


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


class UdpClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answers: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.answers.put_nowait(data)


async def udp_round_trips(proxy: Endpoint, echo_port: int, tally: Tally, rounds: int = 20) -> None:
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(UdpClient, local_addr=("127.0.0.1", 0))
    try:
        reader, writer, relay_host, relay_port = await socks_open(proxy, 3, "0.0.0.0", 0)
        control_closed = asyncio.ensure_future(reader.read(1))  # the association ends with it
        try:
            header = b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", echo_port)
            for _ in range(rounds):
                payload = os.urandom(random.randint(1, 1400))
                transport.sendto(header + payload, (relay_host, relay_port))
                answering = asyncio.ensure_future(client.answers.get())
                await asyncio.wait({answering, control_closed}, timeout=STEP_TIMEOUT, return_when="FIRST_COMPLETED")
                if not answering.done():
                    answering.cancel()
                    if control_closed.done():
                        raise ConnectionError("the UDP association's control connection closed")
                    raise TimeoutError(f"no answer to a datagram within {STEP_TIMEOUT:g} s")
                answer = answering.result()
                if answer[len(header) :] != payload:
                    raise Corrupt(f"UDP: {len(payload)} bytes sent, another datagram came back")
                tally.verified_bytes += len(payload)
        finally:
            control_closed.cancel()
            writer.close()
    finally:
        transport.close()


async def bind_both_ways(proxy: Endpoint, tally: Tally, size: int = 64 << 10) -> None:
    reader, writer, host, port = await socks_open(proxy, 2, "127.0.0.1", 0)
    try:
        peer_reader, peer_writer = await asyncio.wait_for(asyncio.open_connection(host, port), STEP_TIMEOUT)
        try:
            code, _, _ = await _reply(reader)
            if code != 0:
                raise ConnectionError(f"BIND's second reply {code}")
            down, up = os.urandom(size), os.urandom(size)
            peer_writer.write(down)
            writer.write(up)
            if await _read(reader, size) != down or await _read(peer_reader, size) != up:
                raise Corrupt("BIND: bytes changed on the way")
            tally.verified_bytes += 2 * size
        finally:
            peer_writer.close()
    finally:
        writer.close()


async def slowloris(proxy: Endpoint) -> None:
    """A byte a second of a greeting that never ends: the handshake timeout must close it."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(proxy.host, proxy.port), STEP_TIMEOUT)
    try:
        writer.write(b"\x05\xff")  # 255 methods announced, sent one a second
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_MS / 1000 + 10
        while time.monotonic() < deadline:
            try:
                if await asyncio.wait_for(reader.read(1), 1.0) == b"":
                    raise Provoked(PROVOKED[0])
            except TimeoutError:
                writer.write(b"\x00")
            except ConnectionResetError:
                raise Provoked(PROVOKED[0]) from None
        raise ConnectionError("slowloris client still open long after the handshake timeout")
    finally:
        writer.close()


# -- running it -------------------------------------------------------------------------------


def _cause(error: BaseException, started: float, failed: float, kills: list[float]) -> str:
    if isinstance(error, Provoked):
        return str(error)
    if isinstance(error, Corrupt):
        return "corrupted: " + str(error)
    connection_error = isinstance(error, (ConnectionError, asyncio.IncompleteReadError, TimeoutError, OSError)) or (
        isinstance(error, RuntimeError) and "closed" in str(error)  # uvloop: a write to a transport closed by a reset
    )
    if connection_error and any(started - KILL_GRACE <= k <= failed <= k + KILL_GRACE for k in kills):
        return KILLED
    if isinstance(error, asyncio.IncompleteReadError):
        return "closed early"
    return type(error).__name__


async def _client_loop(
    kind: str, session: Callable[[], Awaitable[None]], tally: Tally, until: float, pause: float
) -> None:
    while time.monotonic() < until:
        tally.started[kind] += 1
        began = time.monotonic()
        try:
            await session()
        except Exception as error:  # noqa: BLE001 - every end is counted by cause
            cause = _cause(error, began, time.monotonic(), tally.kills)
            tally.failed[(kind, cause)] += 1
            tally.examples.setdefault(cause, f"{kind}: {error!r}")
            if cause.startswith("corrupted"):
                tally.corrupted.append(cause)
        else:
            tally.completed[kind] += 1
        await asyncio.sleep(pause)


def _tree_fds(pid: int) -> int:
    count = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):  # gone meanwhile
            count += len(os.listdir(f"/proc/{member}/fd"))
    return count


def _workers(master: int) -> list[int]:
    """The zygote's children: the master's grandchildren."""
    return [pid for pid in process_tree(master) if pid != master and _parent(pid) != master]


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rpartition(")")[2].split()[1])


@dataclass(frozen=True)
class SoakPlan:
    minutes: float
    workers: int
    hup_every: float
    kill_every: float


async def _drive(plan: SoakPlan, proxy: Endpoint, web: Endpoint, pid: int, users: Path, tally: Tally) -> list[Sample]:
    loop = asyncio.get_running_loop()
    udp, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", 0))
    echo_port = udp.get_extra_info("sockname")[1]
    started = time.monotonic()
    until = started + plan.minutes * 60
    samples: list[Sample] = []

    async def sample() -> None:
        while True:
            memory = tree_memory(pid)
            samples.append(
                Sample(
                    round(time.monotonic() - started, 2),
                    _tree_fds(pid),
                    round(memory.rss_kib / 1024, 2),
                    sum(tally.started.values()),
                    sum(tally.completed.values()),
                    sum(tally.failed.values()),
                )
            )
            await asyncio.sleep(1.0)

    async def reload() -> None:
        flip = False
        while True:
            await asyncio.sleep(plan.hup_every)
            flip = not flip
            _write_users(users, extra=flip)
            os.kill(pid, signal.SIGHUP)
            tally.reloads += 1

    async def kill() -> None:
        while True:
            await asyncio.sleep(plan.kill_every)
            workers = _workers(pid)
            if workers:
                tally.kills.append(time.monotonic())
                os.kill(random.choice(workers), signal.SIGKILL)  # a worker of the osocks the soak started

    def bulk() -> Awaitable[None]:
        return http_checked(proxy, web, BULK_FILE, BULK_BYTES, tally)

    def short() -> Awaitable[None]:
        return http_checked(proxy, web, SMALL_FILE, SMALL_BYTES, tally)

    clients = [
        *(("bulk", bulk, 0.05) for _ in range(2)),
        *(("short HTTP", short, 0.01) for _ in range(6)),
        *(("UDP", lambda: udp_round_trips(proxy, echo_port, tally), 0.05) for _ in range(2)),
        ("BIND", lambda: bind_both_ways(proxy, tally), 0.05),
        ("reset", lambda: reset_mid_transfer(proxy, web, tally), 0.2),
        *(("slowloris", lambda: slowloris(proxy), 0.0) for _ in range(SLOWLORIS_CLIENTS)),
    ]
    helpers = [asyncio.ensure_future(sample()), asyncio.ensure_future(reload())]
    if plan.workers > 1:
        helpers.append(asyncio.ensure_future(kill()))
    try:
        await asyncio.gather(*(_client_loop(kind, job, tally, until, pause) for kind, job, pause in clients))
    finally:
        for helper in helpers:
            helper.cancel()
        udp.close()
    return samples


def _write_users(path: Path, extra: bool) -> None:
    lines = [f"{USER.decode()}:{PASSWORD.decode()}"] + (["flip:flop"] if extra else [])
    path.write_text("\n".join(lines) + "\n")


def _settled_fds(pid: int, idle: int) -> int:
    """Wait (bounded) for osocks' fds to come back to `idle`; returns the count seen last."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        fds = _tree_fds(pid)
        if fds <= idle + FD_SLACK or time.monotonic() > deadline:
            return fds
        time.sleep(0.2)


def growth_problems(samples: list[Sample]) -> list[str]:
    """fds or RSS trending up (least squares, after a warm-up quarter) by more than noise would."""
    if not samples:
        return ["no samples"]
    end = samples[-1].seconds
    steady = [s for s in samples if s.seconds >= end / 4]
    if len(steady) < MIN_STEADY_SAMPLES:
        return []  # too short a run to tell growth from noise; the fds must still come back (run)
    seconds = [s.seconds for s in steady]
    span = seconds[-1] - seconds[0]
    problems = []
    for what, values, share, fixed, unit in (
        ("fds", [float(s.fds) for s in steady], FD_GROWTH, FD_GROWTH_FIXED, ""),
        ("RSS", [s.rss_mb for s in steady], RSS_GROWTH, RSS_GROWTH_FIXED_MB, " MB"),
    ):
        grown = statistics.linear_regression(seconds, values).slope * span
        median = statistics.median(values)
        if grown > median * share + fixed:
            problems.append(f"{what} grow: +{grown:.1f}{unit} over {span:.0f} s (median {median:.1f}{unit})")
    return problems


def write_csv(samples: list[Sample], path: Path) -> None:
    with path.open("w", newline="") as output:
        writer = csv.writer(output)
        writer.writerow(["seconds", "fds", "rss_mb", "started", "completed", "failed"])
        for s in samples:
            writer.writerow([s.seconds, s.fds, s.rss_mb, s.started, s.completed, s.failed])


def draw_png(samples: list[Sample], kills: list[float], started: float, path: Path) -> str | None:
    """soak.png: fds and RSS over time, kills marked; the reason when it cannot be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    seconds = [s.seconds for s in samples]
    figure, (fds_axis, rss_axis) = plt.subplots(2, 1, sharex=True, figsize=(9, 5))
    fds_axis.plot(seconds, [s.fds for s in samples], color="tab:blue")
    fds_axis.set_ylabel("open fds (osocks tree)")
    rss_axis.plot(seconds, [s.rss_mb for s in samples], color="tab:green")
    rss_axis.set_ylabel("RSS MB (osocks tree)")
    rss_axis.set_xlabel("seconds")
    for kill in kills:
        for axis in (fds_axis, rss_axis):
            axis.axvline(kill - started, color="tab:red", alpha=0.3, linewidth=1)
    fds_axis.set_title("osocks soak: fds and RSS sampled every second (red: a worker SIGKILLed)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return None


def report(tally: Tally, plan: SoakPlan, samples: list[Sample], problems: list[str]) -> str:
    kinds = list(dict.fromkeys(tally.started))
    lines = [
        f"soak: {plan.minutes:g} min, -w {plan.workers}, SIGHUP every {plan.hup_every:g} s ({tally.reloads} sent), "
        f"{len(tally.kills)} workers SIGKILLed",
        "",
        "| client | started | completed | failed (cause: count) |",
        "|---|---:|---:|---|",
    ]
    for kind in kinds:
        causes = ", ".join(f"{cause}: {n}" for (k, cause), n in sorted(tally.failed.items()) if k == kind)
        lines.append(f"| {kind} | {tally.started[kind]} | {tally.completed[kind]} | {causes or '–'} |")
    total_failed = sum(tally.failed.values())
    lines.append(
        f"| all | {sum(tally.started.values())} | {sum(tally.completed.values())} | {total_failed}, "
        f"unexpected: {tally.unexpected()} |"
    )
    lines += ["", f"bytes verified (sha256 or byte for byte): {tally.verified_bytes:,}"]
    if samples:
        fds, rss = [s.fds for s in samples], [s.rss_mb for s in samples]
        lines.append(f"fds: {min(fds)}..{max(fds)}, RSS: {min(rss):.1f}..{max(rss):.1f} MB ({len(samples)} samples)")
        steady = sum(s.seconds >= samples[-1].seconds / 4 for s in samples)
        judged = "judged" if steady >= MIN_STEADY_SAMPLES else f"not judged (fewer than {MIN_STEADY_SAMPLES} samples)"
        lines.append(f"growth of fds and RSS: {judged}; fds back to idle once the clients stopped: checked")
    for cause, example in tally.examples.items():
        if cause not in (*PROVOKED, KILLED):
            lines.append(f"first {cause}: {example}")
    lines += [f"PROBLEM: {problem}" for problem in problems]
    return "\n".join(lines)


def run(plan: SoakPlan, out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="osocks-soak-") as temporary:
        workdir = Path(temporary)
        workdir.chmod(0o755)  # nginx's worker runs as "nobody" when started as root
        (workdir / "nginx").mkdir()
        users = workdir / "users"
        _write_users(users, extra=False)
        sizes = {BULK_FILE: BULK_BYTES, SMALL_FILE: SMALL_BYTES}
        with services.nginx(workdir / "nginx", sizes, 4096) as web:
            port = services.free_port()
            argv = [sys.executable, "-m", "osocks", "--no-uci", "-l", "127.0.0.1", "-p", str(port), "-q"]
            argv += ["--allow-local", "-U", str(users), "-w", str(plan.workers)]
            argv += ["--handshake-timeout", str(HANDSHAKE_TIMEOUT_MS)]
            env = services._environment_with_repo_sources()
            with services.running("osocks-soak", argv, port, workdir, env) as process:
                if plan.workers > 1:
                    _wait_for_workers(process.pid, plan.workers)
                idle = _tree_fds(process.pid)
                tally = Tally()
                started = time.monotonic()
                driver = _drive(plan, Endpoint("127.0.0.1", port), web, process.pid, users, tally)
                samples = uvloop.run(driver) if uvloop is not None else asyncio.run(driver)
                problems = growth_problems(samples)
                if plan.workers > 1:
                    _wait_for_workers(process.pid, plan.workers)
                settled = _settled_fds(process.pid, idle)
                if settled > idle + FD_SLACK:
                    problems.append(f"fds not back to idle once the clients stopped: {settled}, idle {idle}")
                if process.poll() is not None:
                    problems.append(f"osocks exited with {process.returncode}")
            log = (workdir / "osocks-soak.log").read_text(errors="replace")
            if "Traceback" in log:
                problems.append("osocks logged a traceback: " + log[log.index("Traceback") :][:400])
    if tally.corrupted:
        problems.append(f"{len(tally.corrupted)} transfers corrupted")
    if tally.unexpected():
        problems.append(f"{tally.unexpected()} sessions failed for an unexpected cause")
    write_csv(samples, out_dir / "soak.csv")
    no_png = draw_png(samples, tally.kills, started, out_dir / "soak.png")
    print(report(tally, plan, samples, problems))
    print(f"\nseries: {out_dir / 'soak.csv'}" + (f" (no PNG: {no_png})" if no_png else f", {out_dir / 'soak.png'}"))
    return 1 if problems else 0


def _wait_for_workers(master: int, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while len(_workers(master)) < count:
        if time.monotonic() > deadline:
            raise services.StartError(f"osocks has {len(_workers(master))} of {count} workers after {timeout:g} s")
        time.sleep(0.1)
