"""The benchmark's smoke run works end to end and measures osocks."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARK = REPO / "bench" / "run.py"
SMOKE_TIMEOUT = 240  # a bound for a stuck run on a loaded machine, below the tests' own timeout
MEASURED_ROWS = (
    "bulk MB/s",
    "CPU s per GB",
    "sessions/s",
    "CPU µs per session",
    "idle RSS MB",
    "idle PSS MB",
    "KB per held session (PSS)",
)
FAIRNESS_ROWS = (  # scenario (e), run when curl is installed
    "ping-pong p50 µs alone",
    "ping-pong p99 µs alone",
    "ping-pong p50 µs under load",
    "ping-pong p99 µs under load",
    "bulk MB/s total under load",
    "slowest stream, % of mean",
)
NUMBER = re.compile(r"-?\d+(\.\d+)?")

pytestmark = [
    pytest.mark.skipif(shutil.which("nginx") is None, reason="the benchmark needs nginx (Debian package nginx-light)"),
    pytest.mark.timeout(SMOKE_TIMEOUT + 60),
]


def table_column(markdown: str, column: str) -> dict[str, str]:
    """The cells of one column of a markdown table, by row label."""
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in markdown.splitlines()
        if line.startswith("|")
    ]
    header, _alignment, *body = rows
    index = header.index(column)
    return {row[0]: row[index] for row in body}


def test_smoke_run_measures_osocks(tmp_path: Path) -> None:
    """osocks as the bench runs it, and as files/osocks.config ships it; bulk is spliced in both."""
    results = tmp_path / "results.json"
    finished = subprocess.run(
        [sys.executable, str(BENCHMARK), "--smoke", "--servers", "osocks,osocks-shipped", "--json", str(results)],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    with_curl = shutil.which("/usr/bin/curl") is not None  # bench/services.py CURL
    scenarios = {"bulk", "sessions", "memory"} | ({"fairness"} if with_curl else set())
    for column in ("osocks", "osocks shipped"):
        osocks = table_column(finished.stdout, column)
        for row in MEASURED_ROWS + (FAIRNESS_ROWS if with_curl else ()):
            assert NUMBER.fullmatch(osocks[row]), f"{column}, {row}: {osocks[row]}"
        measured = json.loads(results.read_text())["servers"][column]
        assert set(measured) >= scenarios
        assert measured["bulk"]["spliced"] >= measured["bulk"]["downloads"]  # each download's body went by splice


def test_a_corrupted_download_is_an_error() -> None:
    """A server that changes one byte past the first MiB: the same length, another sha256."""
    corrupting = f"corrupting={sys.executable} {REPO / 'tests' / 'corrupting_socks.py'} {{port}}"
    finished = subprocess.run(
        [sys.executable, str(BENCHMARK), "--smoke", "--servers", "", "--only", "a", "--server", corrupting],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
    )
    assert finished.returncode == 1, finished.stdout + finished.stderr[-3000:]
    cell = table_column(finished.stdout, "corrupting")["bulk MB/s"]
    assert cell.startswith("error: download of /") and "sha256 differs" in cell


def test_relay_design_comparison_runs() -> None:
    finished = subprocess.run(
        [sys.executable, str(REPO / "bench" / "relay_designs.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    for design in ("protocol", "buffered", "streams", "osocks --no-splice"):
        cpu_per_session = table_column(finished.stdout, "CPU µs per session")[design]
        assert NUMBER.fullmatch(cpu_per_session), finished.stdout


# -- the soak (bench/soak.py), for a few seconds -------------------------------------------------

sys.path.insert(0, str(REPO / "bench"))
import soak  # noqa: E402 - bench/ is not a package


def test_soak_runs_and_accounts_for_every_session(tmp_path: Path) -> None:
    """SLOW (~20 s): every client kind at once, SIGHUP every 2 s, a worker SIGKILLed every 5 s."""
    argv = [sys.executable, str(BENCHMARK), "--soak", "0.2", "--soak-hup-every", "2", "--soak-kill-every", "5"]
    finished = subprocess.run(
        [*argv, "--soak-out", str(tmp_path)], capture_output=True, text=True, timeout=SMOKE_TIMEOUT
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    table = {row: cells for row, cells in soak_rows(finished.stdout).items()}
    for kind in ("bulk", "short HTTP", "UDP", "BIND"):
        assert int(table[kind][1]) > 0, f"no {kind} session completed: {finished.stdout}"
    assert "reset by the client mid-transfer" in table["reset"][2]
    assert "slowloris closed by the handshake timeout" in table["slowloris"][2]
    assert table["all"][2].endswith("unexpected: 0")
    assert re.search(r"SIGHUP every 2 s \(([3-9]|\d\d+) sent\), ([1-9]\d*) workers SIGKILLed", finished.stdout)
    samples = (tmp_path / "soak.csv").read_text().splitlines()
    assert samples[0] == "seconds,fds,rss_mb,started,completed,failed" and len(samples) > 5
    assert (tmp_path / "soak.png").read_bytes().startswith(b"\x89PNG")


def soak_rows(report: str) -> dict[str, list[str]]:
    """The soak's table: client -> [started, completed, failed by cause]."""
    rows = {}
    for line in report.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[1].isdigit():
            rows[cells[0]] = cells[1:]
    return rows


def sample(seconds: float, fds: int, rss_mb: float) -> soak.Sample:
    return soak.Sample(seconds, fds, rss_mb, 0, 0, 0)


def test_soak_growth_check() -> None:
    steady = [sample(t, 90 + t % 7, 80 + (t % 3) / 10) for t in range(60)]
    assert soak.growth_problems(steady) == []
    leaking = [sample(t, 60 + 5 * t, 80 + t) for t in range(60)]
    assert [p.split(":")[0] for p in soak.growth_problems(leaking)] == ["fds grow", "RSS grow"]
    assert soak.growth_problems(leaking[:20]) == []  # too few samples to judge


def test_soak_failure_causes() -> None:
    kill = 100.0
    assert soak._cause(ConnectionResetError(), 99.0, 101.0, [kill]) == soak.KILLED
    assert soak._cause(ConnectionResetError(), 80.0, 90.0, [kill]) == "ConnectionResetError"  # no kill near
    assert soak._cause(soak.Corrupt("x"), 99.0, 101.0, [kill]) == "corrupted: x"  # never excused by a kill
    assert soak._cause(soak.Provoked(soak.PROVOKED[0]), 0.0, 1.0, []) == soak.PROVOKED[0]


def test_session_rounds_on_both_loops_with_ratios(tmp_path: Path) -> None:
    """(b) in rounds, each with the machine's other load; the stock-loop column; CPU as multiples of one column's."""
    results = tmp_path / "results.json"
    command = [sys.executable, str(BENCHMARK), "--smoke", "--only", "b", "--servers", "osocks,osocks-asyncio"]
    command += ["--ratio-to", "osocks", "--json", str(results)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=SMOKE_TIMEOUT)
    assert finished.returncode == 0, finished.stderr[-3000:]
    for column in ("osocks", "osocks --loop asyncio"):
        cells = table_column(finished.stdout, column)
        assert NUMBER.fullmatch(cells["CPU per session, × osocks"]), cells
        assert cells["rounds of (b): run"] == "1"
        measured = json.loads(results.read_text())["servers"][column]
        assert measured["sessions round 1"]["other_load_cores"] >= 0
        assert measured["sessions"]["rounds_used"] == 1
    assert table_column(finished.stdout, "osocks")["CPU per session, × osocks"] == "1.00"
