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
SMOKE_TIMEOUT = 90  # below pytest-timeout's 120 s, so this reports first
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

pytestmark = pytest.mark.skipif(
    shutil.which("nginx") is None,
    reason="the benchmark needs nginx (Debian package nginx-light)",
)


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
    results = tmp_path / "results.json"
    finished = subprocess.run(
        [sys.executable, str(BENCHMARK), "--smoke", "--servers", "osocks", "--json", str(results)],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    osocks = table_column(finished.stdout, "osocks")
    with_curl = shutil.which("/usr/bin/curl") is not None  # bench/services.py CURL
    for row in MEASURED_ROWS + (FAIRNESS_ROWS if with_curl else ()):
        assert NUMBER.fullmatch(osocks[row]), f"{row}: {osocks[row]}"
    scenarios = {"bulk", "sessions", "memory"} | ({"fairness"} if with_curl else set())
    assert set(json.loads(results.read_text())["servers"]["osocks"]) >= scenarios


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
