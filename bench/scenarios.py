"""The five measurements, each against one running SOCKS server.

A scenario returns its figures as a dict of named floats, or raises
ScenarioError (or anything else) to put "error: ..." in its cells.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from proctree import bytes_written, machine_busy_seconds, tree_cpu_seconds, tree_memory
from services import CURL, PRIVOXY, SERVED_SHA256, echo_server, last_message, osocks_status, privoxy, socks_downloads
from socks5 import Endpoint, HttpOverSocks, download, http_get, open_http_session, open_tunnel

try:
    import uvloop
except ImportError:  # the benchmark still runs, with a slower client
    uvloop = None  # type: ignore[assignment]

Figures = dict[str, float]
T = TypeVar("T")

BYTES_PER_MB = 1e6
BYTES_PER_GB = 1e9
MICROSECONDS = 1e6
KIB_PER_MIB = 1024

SMALL_FILE = "1K"
AB_FILE = "1M"
WARM_UP_SESSIONS = 64
SOCKET_TIMEOUT = 30.0
SETTLE_SECONDS = 1.0


class ScenarioError(RuntimeError):
    """The server did not do what the scenario needs."""


@dataclass(frozen=True)
class Profile:
    """How much work each scenario does."""

    bulk_file: str
    bulk_downloads: int
    sessions: int  # per round of (b)
    session_rounds: int  # quiet rounds of (b) wanted per server; the figures are their medians
    session_rounds_at_most: int  # rounds of (b) run per server while waiting for quiet ones
    concurrency: int
    held_sessions: int
    ab_requests: int
    ab_concurrency: int
    fairness_streams: int  # bulk downloads beside the ping-pong session
    fairness_seconds: float  # ping-pong time alone, then again under load
    timeout: float  # seconds allowed for one scenario's measured part

    def file_sizes(self) -> dict[str, int]:
        bulk_mib = int(self.bulk_file.removesuffix("M"))
        return {SMALL_FILE: 1 << 10, AB_FILE: 1 << 20, self.bulk_file: bulk_mib << 20}


FULL = Profile(
    bulk_file="64M",
    bulk_downloads=10,
    sessions=20000,
    session_rounds=5,
    session_rounds_at_most=10,
    concurrency=64,
    held_sessions=1000,
    ab_requests=1024,
    ab_concurrency=64,
    fairness_streams=8,
    fairness_seconds=5.0,
    timeout=300.0,
)
SMOKE = Profile(
    bulk_file="4M",
    bulk_downloads=4,
    sessions=200,
    session_rounds=1,
    session_rounds_at_most=1,
    concurrency=64,
    held_sessions=50,
    ab_requests=0,
    ab_concurrency=0,
    fairness_streams=8,
    fairness_seconds=1.0,
    timeout=20.0,
)


@dataclass(frozen=True)
class Target:
    """A running SOCKS server and the web server it is asked to reach."""

    proxy: Endpoint
    server_pid: int
    web: Endpoint
    workdir: Path
    status_log: str = ""  # osocks: the name of the log its SIGUSR1 status goes to


def client_event_loop() -> str:
    return "uvloop" if uvloop is not None else "asyncio"


def run_client(coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
    """Run an asyncio client to completion (on uvloop when installed), within timeout seconds."""
    bounded = asyncio.wait_for(coroutine, timeout)
    try:
        return uvloop.run(bounded) if uvloop is not None else asyncio.run(bounded)
    except TimeoutError:
        raise ScenarioError(f"client not done after {timeout:.0f} s") from None


# --- (a) single-stream download ----------------------------------------------


def checked_download(target: Target, path: str, size: int) -> float:
    """One download, checked by length and sha256 (after the clock stops); returns its seconds."""
    body, seconds = download(target.proxy, target.web, path, SOCKET_TIMEOUT, size)
    if len(body) != size:
        raise ScenarioError(f"download of {path} gave {len(body)} bytes, not {size}")
    if hashlib.sha256(body).hexdigest() != SERVED_SHA256[path]:
        raise ScenarioError(f"download of {path}: {size} bytes, but not the file's (sha256 differs)")
    return seconds


def bulk_download(target: Target, profile: Profile) -> Figures:
    path = "/" + profile.bulk_file
    expected = profile.file_sizes()[profile.bulk_file]
    checked_download(target, "/" + SMALL_FILE, profile.file_sizes()[SMALL_FILE])  # warm-up
    rates, total_bytes = [], 0
    cpu_seconds = 0.0
    for _ in range(profile.bulk_downloads):
        cpu_before = tree_cpu_seconds(target.server_pid)
        seconds = checked_download(target, path, expected)
        cpu_seconds += tree_cpu_seconds(target.server_pid) - cpu_before
        rates.append(expected / seconds / BYTES_PER_MB)
        total_bytes += expected
    figures = {
        "mb_per_s": statistics.median(rates),
        "cpu_s_per_gb": cpu_seconds / (total_bytes / BYTES_PER_GB),
        "downloads": profile.bulk_downloads,
    }
    if target.status_log:  # osocks: did bulk move to splice(2)?
        status = osocks_status(target.workdir / f"{target.status_log}.log", target.server_pid)
        figures["spliced"] = status["spliced"]
        if status["settings"]["splice"] and not status["spliced"]:
            raise ScenarioError(f"no direction of {profile.bulk_downloads} bulk downloads was spliced")
    return figures


# --- (b) new-session cost -------------------------------------------------------


async def _in_parallel(count: int, concurrency: int, job: Callable[[], Awaitable[None]]) -> list[BaseException]:
    """Run job() count times, at most concurrency at once; returns the failures."""
    remaining = count
    failures: list[BaseException] = []

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            try:
                await job()
            except Exception as error:  # noqa: BLE001 - counted and reported below
                failures.append(error)

    await asyncio.gather(*(worker() for _ in range(min(count, concurrency))))
    return failures


def _raise_if_failed(failures: list[BaseException], count: int, what: str) -> None:
    if failures:
        raise ScenarioError(f"{len(failures)} of {count} {what} failed, first: {failures[0]!r}")


async def _short_sessions(target: Target, count: int, concurrency: int) -> float:
    """Run count short sessions; returns the seconds taken."""
    request = http_get("/" + SMALL_FILE, target.web, keep_alive=False)

    async def session() -> None:
        await open_http_session(target.proxy, target.web, request, hold=False)

    started = time.perf_counter()
    failures = await _in_parallel(count, concurrency, session)
    seconds = time.perf_counter() - started
    _raise_if_failed(failures, count, "sessions")
    return seconds


def new_sessions(target: Target, profile: Profile) -> Figures:
    """One round of short sessions; other_load_cores is the CPU that neither this run's own
    processes (the runner, nginx, the server) nor the kernel's interrupt work used meanwhile:
    other programs' and steal, in cores, which tells a disturbed round."""
    run_client(_short_sessions(target, WARM_UP_SESSIONS, profile.concurrency), profile.timeout)
    ours = os.getpid()  # every process this run started is a descendant
    busy_before, ours_before = machine_busy_seconds(), tree_cpu_seconds(ours)
    cpu_before = tree_cpu_seconds(target.server_pid)
    client_cpu_before = time.process_time()
    seconds = run_client(_short_sessions(target, profile.sessions, profile.concurrency), profile.timeout)
    client_cpu = time.process_time() - client_cpu_before
    cpu = tree_cpu_seconds(target.server_pid) - cpu_before
    other = machine_busy_seconds() - busy_before - (tree_cpu_seconds(ours) - ours_before)
    return {
        "sessions_per_s": profile.sessions / seconds,
        "cpu_us_per_session": cpu / profile.sessions * MICROSECONDS,
        "client_cpu_us_per_session": client_cpu / profile.sessions * MICROSECONDS,
        "other_load_cores": max(0.0, other) / seconds,
        "sessions": profile.sessions,
    }


# --- (c) memory -----------------------------------------------------------------


async def _memory_idle_and_held(target: Target, profile: Profile) -> Figures:
    """Memory of the idle server (after a warm-up), then with held_sessions tunnels open."""
    await _short_sessions(target, WARM_UP_SESSIONS, profile.concurrency)
    await asyncio.sleep(SETTLE_SECONDS)
    idle = tree_memory(target.server_pid)

    request = http_get("/" + SMALL_FILE, target.web, keep_alive=True)
    held: list[HttpOverSocks] = []

    async def hold_one() -> None:
        held.append(await open_http_session(target.proxy, target.web, request, hold=True))

    try:
        failures = await _in_parallel(profile.held_sessions, profile.concurrency, hold_one)
        _raise_if_failed(failures, profile.held_sessions, "held sessions")
        await asyncio.sleep(SETTLE_SECONDS)
        loaded = tree_memory(target.server_pid)
    finally:
        for session in held:
            if session.transport is not None:
                session.transport.close()
    return {
        "idle_rss_mb": idle.rss_kib / KIB_PER_MIB,
        "idle_pss_mb": idle.pss_kib / KIB_PER_MIB,
        "held_pss_mb": loaded.pss_kib / KIB_PER_MIB,
        "kb_per_session": (loaded.pss_kib - idle.pss_kib) / profile.held_sessions,
        "held_sessions": profile.held_sessions,
    }


def memory(target: Target, profile: Profile) -> Figures:
    return run_client(_memory_idle_and_held(target, profile), profile.timeout)


# --- (d) privoxy + ab, the original project's method ---------------------------

AB = "/usr/bin/ab"


def privoxy_ab_missing() -> str | None:
    """Why scenario (d) cannot run here, or None if it can."""
    missing = [
        f"{program} (package {package})"
        for program, package in ((PRIVOXY, "privoxy"), (AB, "apache2-utils"))
        if shutil.which(program) is None
    ]
    return "not installed: " + ", ".join(missing) if missing else None


def _ab_figure(output: str, label: str) -> float:
    match = re.search(rf"^{re.escape(label)}:\s+([\d.]+)", output, re.MULTILINE)
    if match is None:
        raise ScenarioError(f"ab printed no '{label}'")
    return float(match.group(1))


def _run_ab(proxy: Endpoint, url: str, requests: int, concurrency: int, timeout: float) -> float:
    """ab through an HTTP proxy; returns requests per second, raising if any request failed."""
    command = [AB, "-q", "-n", str(requests), "-c", str(concurrency), "-X", f"{proxy.host}:{proxy.port}", url]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if finished.returncode != 0:
        raise ScenarioError(f"ab exited {finished.returncode}: {finished.stderr.strip()[-300:]}")
    failed = _ab_figure(finished.stdout, "Failed requests")
    completed = _ab_figure(finished.stdout, "Complete requests")
    if failed or completed != requests or "Non-2xx responses" in finished.stdout:
        raise ScenarioError(f"ab: {completed:.0f} complete, {failed:.0f} failed, or non-2xx")
    return _ab_figure(finished.stdout, "Requests per second")


def privoxy_ab(target: Target, profile: Profile) -> Figures:
    url = f"http://{target.web.host}:{target.web.port}/{AB_FILE}"
    with privoxy(target.workdir, target.proxy) as http_proxy:
        _run_ab(http_proxy, url, WARM_UP_SESSIONS, profile.ab_concurrency, profile.timeout)
        cpu_before = tree_cpu_seconds(target.server_pid)
        requests_per_s = _run_ab(http_proxy, url, profile.ab_requests, profile.ab_concurrency, profile.timeout)
        cpu = tree_cpu_seconds(target.server_pid) - cpu_before
    return {
        "requests_per_s": requests_per_s,
        "cpu_us_per_request": cpu / profile.ab_requests * MICROSECONDS,
        "requests": profile.ab_requests,
    }


# --- (e) fairness: ping-pong round trips beside bulk downloads -----------------

PING = bytes(range(64))  # the request; the echo server answers the same 64 bytes
WARM_UP_PINGS = 100
MIN_PINGS = 10  # below this no percentile means anything (the JSON has the counts)
MAX_PINGS_PER_SECOND = 100_000  # the count bound, above any loopback ping-pong rate
STREAM_WARM_UP_BYTES = 4 << 20  # each download has moved this much before the ping-pong starts
RAMP_UP_LIMIT = 10.0  # seconds allowed for that
STREAM_RATE_CEILING = 4e9  # bytes/s one download cannot reach here: sizes its list of URLs
POLL_INTERVAL = 0.01
DIRECT_SECONDS = 1.0  # the ping-pong straight to the echo server, alone and under load


def fairness_missing() -> str | None:
    """Why scenario (e) cannot run here, or None if it can."""
    return None if shutil.which(CURL) else f"not installed: {CURL} (package curl)"


def _round_trip_us(connection: socket.socket, answer: memoryview) -> float:
    """Send PING on connection and read its echo into answer: the round trip in µs."""
    started = time.perf_counter_ns()
    connection.sendall(PING)
    received = 0
    while received < len(PING):
        count = connection.recv_into(answer[received:])
        if count == 0:
            raise ScenarioError("a ping-pong connection was closed")
        received += count
    round_trip = (time.perf_counter_ns() - started) / 1e3
    if answer != PING:
        raise ScenarioError("the echo did not match the request")
    return round_trip


def _ping_pong(connection: socket.socket, seconds: float, max_count: int) -> list[float]:
    """Round trips on connection, one after the other, for seconds (at most max_count): each one in µs."""
    answer = memoryview(bytearray(len(PING)))
    round_trips: list[float] = []
    deadline = time.monotonic() + seconds
    while len(round_trips) < max_count and time.monotonic() < deadline:
        round_trips.append(_round_trip_us(connection, answer))
    return round_trips


def _percentiles(round_trips: list[float], what: str) -> tuple[float, float, float]:
    """p50, p99 and p99.9 of the round trips."""
    if len(round_trips) < MIN_PINGS:
        raise ScenarioError(f"only {len(round_trips)} round trips {what}")
    cuts = statistics.quantiles(round_trips, n=1000, method="inclusive")
    return cuts[499], cuts[989], cuts[998]


def _raise_if_ended(downloads: list[subprocess.Popen[bytes]], workdir: Path) -> None:
    for number, process in enumerate(downloads):
        if process.poll() == 0:
            raise ScenarioError(f"download {number} fetched all its URLs too soon: raise STREAM_RATE_CEILING")
        if process.returncode is not None:
            message = last_message(workdir, f"curl-{number}")
            raise ScenarioError(f"download {number} failed, curl exit status {process.returncode}: {message}")


def _bytes_written(downloads: list[subprocess.Popen[bytes]]) -> list[int]:
    return [bytes_written(process.pid) for process in downloads]


def _wait_until_streaming(downloads: list[subprocess.Popen[bytes]], workdir: Path) -> None:
    """Return once every download has moved STREAM_WARM_UP_BYTES."""
    deadline = time.monotonic() + RAMP_UP_LIMIT
    while time.monotonic() < deadline:
        _raise_if_ended(downloads, workdir)
        if all(bytes_written(process.pid) >= STREAM_WARM_UP_BYTES for process in downloads):
            return
        time.sleep(POLL_INTERVAL)
    raise ScenarioError(f"downloads not all under way after {RAMP_UP_LIMIT:.0f} s")


def _url_glob(target: Target, profile: Profile) -> str:
    """The bulk file, under enough different URLs (a curl glob) to last past the measurement."""
    window = RAMP_UP_LIMIT + profile.fairness_seconds
    files = math.ceil(window * STREAM_RATE_CEILING / profile.file_sizes()[profile.bulk_file])
    return f"http://{target.web.host}:{target.web.port}/{profile.bulk_file}?[1-{files}]"


def _direct_connection(echo: Endpoint) -> socket.socket:
    return socket.create_connection((echo.host, echo.port), timeout=SOCKET_TIMEOUT)


def fairness(target: Target, profile: Profile) -> Figures:
    """Ping-pong through the server, alone then beside the downloads.

    After each, 1 s of ping-pong straight to the echo server gives the
    machine's own delays in the same conditions, to read the server's against.
    """
    seconds = profile.fairness_seconds
    max_pings = int(seconds * MAX_PINGS_PER_SECOND)
    with (
        echo_server(target.workdir, profile.timeout) as echo,
        open_tunnel(target.proxy, echo, SOCKET_TIMEOUT) as tunnel,
        _direct_connection(echo) as direct,
    ):
        for connection in (tunnel, direct):
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _ping_pong(connection, seconds, WARM_UP_PINGS)
        alone = _ping_pong(tunnel, seconds, max_pings)
        direct_alone = _ping_pong(direct, DIRECT_SECONDS, max_pings)
        streams, url_glob = profile.fairness_streams, _url_glob(target, profile)
        with socks_downloads(target.proxy, url_glob, streams, target.workdir, SOCKET_TIMEOUT) as downloads:
            _wait_until_streaming(downloads, target.workdir)
            written_before = _bytes_written(downloads)
            started = time.perf_counter()
            loaded = _ping_pong(tunnel, seconds, max_pings)
            loaded_seconds = time.perf_counter() - started
            written = [after - before for after, before in zip(_bytes_written(downloads), written_before, strict=True)]
            direct_loaded = _ping_pong(direct, DIRECT_SECONDS, max_pings)
            _raise_if_ended(downloads, target.workdir)
    if not any(written):
        raise ScenarioError("the downloads moved nothing during the ping-pong")
    alone_p50, alone_p99, _ = _percentiles(alone, "alone")
    loaded_p50, loaded_p99, loaded_p999 = _percentiles(loaded, "under load")
    direct_alone_p50, direct_alone_p99, _ = _percentiles(direct_alone, "direct, alone")
    direct_loaded_p50, direct_loaded_p99, _ = _percentiles(direct_loaded, "direct, under load")
    return {
        "p50_us_alone": alone_p50,
        "p99_us_alone": alone_p99,
        "p50_us_loaded": loaded_p50,
        "p99_us_loaded": loaded_p99,
        "p999_us_loaded": loaded_p999,
        "max_us_loaded": max(loaded),
        "bulk_mb_per_s": sum(written) / loaded_seconds / BYTES_PER_MB,
        "slowest_stream_percent": min(written) / statistics.mean(written) * 100,
        "direct_p50_us_alone": direct_alone_p50,
        "direct_p99_us_alone": direct_alone_p99,
        "direct_p50_us_loaded": direct_loaded_p50,
        "direct_p99_us_loaded": direct_loaded_p99,
        "pings_alone": len(alone),
        "pings_loaded": len(loaded),
        "streams": streams,
    }
