"""Scenario (b) in interleaved rounds: each round measures every server once (a fresh server
each time), so that slow drifts of the machine hit every server alike; rounds that other
programs disturbed are dropped, and a server's figures are the medians of its quiet rounds.

A round is disturbed when, while it ran, processes that are not this run's (or the
hypervisor, as steal) used more than QUIET_LOAD_CORES of CPU: `other_load_cores` of
scenarios.new_sessions.  Another program's load raises a server's CPU per session through
shared caches and cores, or lowers it by making the server wait and batch its events; both
make rounds differ, so neither is measured.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from typing import TypeVar

from report import Failed, Figures, Outcome

QUIET_LOAD_CORES = 0.15
LOAD = "other_load_cores"
S = TypeVar("S")


def _is_quiet(figures: Figures) -> bool:
    return figures[LOAD] <= QUIET_LOAD_CORES


def combine(rounds: list[Figures], wanted: int) -> Figures:
    """Medians over the quiet rounds; with fewer than wanted quiet ones, over the wanted least disturbed."""
    quiet = [figures for figures in rounds if _is_quiet(figures)]
    used = quiet if len(quiet) >= wanted else sorted(rounds, key=lambda figures: figures[LOAD])[:wanted]
    combined = {name: statistics.median(figures[name] for figures in used) for name in used[0]}
    combined.update(rounds_run=len(rounds), rounds_quiet=len(quiet), rounds_used=len(used))
    return combined


def interleaved(
    servers: list[S], measure_round: Callable[[S, int], Outcome], wanted: int, at_most: int
) -> Iterator[tuple[S, int, Outcome]]:
    """Run rounds (numbered from 1) until each server has `wanted` quiet ones or has run
    `at_most`; yields (server, round, outcome) as they come, then
    (server, 0, combined outcome) for each server.  A failed round ends that server's rounds."""
    measured: list[list[Figures]] = [[] for _ in servers]  # by the server's index
    failed: dict[int, Failed] = {}

    def needs_more(index: int) -> bool:
        return index not in failed and sum(map(_is_quiet, measured[index])) < wanted

    for number in range(1, at_most + 1):
        pending = [index for index in range(len(servers)) if needs_more(index)]
        if not pending:
            break
        for index in pending:
            outcome = measure_round(servers[index], number)
            if isinstance(outcome, Failed):
                failed[index] = outcome
            elif isinstance(outcome, dict):
                measured[index].append(outcome)
            yield servers[index], number, outcome
    for index, server in enumerate(servers):
        if index in failed:
            yield server, 0, failed[index]
        elif measured[index]:
            yield server, 0, combine(measured[index], wanted)
