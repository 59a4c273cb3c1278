"""The results of a run: one outcome per (server, scenario), shown as a markdown table and JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Figures = dict[str, float]
_MAX_CELL_MESSAGE = 80


@dataclass(frozen=True)
class Failed:
    message: str


@dataclass(frozen=True)
class Skipped:
    reason: str


Outcome = Figures | Failed | Skipped


@dataclass(frozen=True)
class Row:
    label: str
    scenario: str
    figure: str
    decimals: int


ROWS = (
    Row("bulk MB/s", "bulk", "mb_per_s", 0),
    Row("CPU s per GB", "bulk", "cpu_s_per_gb", 2),
    Row("bulk: directions spliced (osocks)", "bulk", "spliced", 0),
    Row("sessions/s", "sessions", "sessions_per_s", 0),
    Row("CPU µs per session", "sessions", "cpu_us_per_session", 0),
    Row("rounds of (b): run", "sessions", "rounds_run", 0),
    Row("rounds of (b): quiet", "sessions", "rounds_quiet", 0),
    Row("idle RSS MB", "memory", "idle_rss_mb", 1),
    Row("idle PSS MB", "memory", "idle_pss_mb", 1),
    Row("KB per held session (PSS)", "memory", "kb_per_session", 1),
    Row("privoxy+ab req/s", "privoxy_ab", "requests_per_s", 0),
    Row("CPU µs per ab request", "privoxy_ab", "cpu_us_per_request", 0),
    Row("ping-pong p50 µs alone", "fairness", "p50_us_alone", 0),
    Row("ping-pong p99 µs alone", "fairness", "p99_us_alone", 0),
    Row("ping-pong p50 µs under load", "fairness", "p50_us_loaded", 0),
    Row("ping-pong p99 µs under load", "fairness", "p99_us_loaded", 0),
    Row("bulk MB/s total under load", "fairness", "bulk_mb_per_s", 0),
    Row("slowest stream, % of mean", "fairness", "slowest_stream_percent", 0),
)


@dataclass
class Results:
    servers: list[str]
    settings: dict[str, Any]
    outcomes: dict[tuple[str, str], Outcome] = field(default_factory=dict)

    def record(self, server: str, scenario: str, outcome: Outcome) -> None:
        self.outcomes[(server, scenario)] = outcome


def _one_line(text: str, limit: int) -> str:
    line = " ".join(text.split()).replace("|", "/")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _cell(outcome: Outcome | None, row: Row) -> str:
    match outcome:
        case None:
            return "–"
        case Failed(message):
            return "error: " + _one_line(message, _MAX_CELL_MESSAGE)
        case Skipped():
            return "skipped"
        case _ if row.figure not in outcome:  # a figure only some servers have
            return "–"
        case _:
            return f"{outcome[row.figure]:.{row.decimals}f}"


def _ratio_row(results: Results, reference: str) -> str:
    """CPU per session of every server as a multiple of the reference server's, in this run."""
    base = results.outcomes.get((reference, "sessions"))
    cells = []
    for server in results.servers:
        outcome = results.outcomes.get((server, "sessions"))
        if isinstance(base, dict) and isinstance(outcome, dict) and base["cpu_us_per_session"]:
            cells.append(f"{outcome['cpu_us_per_session'] / base['cpu_us_per_session']:.2f}")
        else:
            cells.append("–")
    return f"| CPU per session, × {reference} | " + " | ".join(cells) + " |"


def markdown_table(results: Results, reference: str | None = None) -> str:
    """The table; with a reference server, a row of CPU per session as multiples of its."""
    lines = [
        "| | " + " | ".join(results.servers) + " |",
        "|---|" + "---:|" * len(results.servers),
    ]
    for row in ROWS:
        cells = [_cell(results.outcomes.get((server, row.scenario)), row) for server in results.servers]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
        if row.figure == "cpu_us_per_session" and reference is not None:
            lines.append(_ratio_row(results, reference))
    return "\n".join(lines)


def _as_json(outcome: Outcome) -> dict[str, Any]:
    match outcome:
        case Failed(message):
            return {"error": message}
        case Skipped(reason):
            return {"skipped": reason}
        case _:
            return dict(outcome)


def write_json(results: Results, path: Path) -> None:
    servers: dict[str, dict[str, Any]] = {name: {} for name in results.servers}
    for (server, scenario), outcome in results.outcomes.items():
        servers[server][scenario] = _as_json(outcome)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": results.settings, "servers": servers}, indent=2) + "\n")
