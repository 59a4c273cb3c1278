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
