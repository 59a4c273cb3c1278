#!/usr/bin/env python3
"""Benchmark osocks against microsocks and Dante (and any server given with --server):
throughput, per-session CPU, memory, fairness.

    python3 bench/run.py            # full run, every installed server
    python3 bench/run.py --smoke    # a few seconds, for CI
    python3 bench/run.py --server 'c-osocks=/opt/osocks -l 127.0.0.1 -p {port}'
    python3 bench/run.py --soak 10  # mixed clients for 10 minutes, reloads, killed workers (soak.py)

See bench/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import rounds
import scenarios
import services
import soak
from report import Failed, Outcome, Results, Skipped, markdown_table, write_json
from scenarios import Profile, Target
from socks5 import Endpoint

BENCH = Path(__file__).resolve().parent
DEFAULT_JSON = BENCH / "results" / "latest.json"
OPEN_FILES_WANTED = 65536
NGINX_CONNECTIONS = 8192
SERVER_NAMES = ("osocks", "osocks-shipped", "osocks-asyncio", "microsocks", "dante")  # osocks-asyncio: --loop asyncio
SELF_EXPLAINING_ERRORS = (scenarios.ScenarioError, services.StartError)


@dataclass(frozen=True)
class Scenario:
    letter: str
    key: str
    measure: Callable[[Target, Profile], dict[str, float]]


SESSIONS = Scenario("b", "sessions", scenarios.new_sessions)  # run in interleaved rounds (rounds.py)
SCENARIOS = (
    Scenario("a", "bulk", scenarios.bulk_download),
    SESSIONS,
    Scenario("c", "memory", scenarios.memory),
    Scenario("d", "privoxy_ab", scenarios.privoxy_ab),
    Scenario("e", "fairness", scenarios.fairness),
)


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny run (< 30 s per server) for CI")
    parser.add_argument("--servers", default=",".join(SERVER_NAMES), help="comma-separated, from: %(default)s")
    parser.add_argument(
        "--only",
        default="a,b,c,d,e",
        help="scenarios: a bulk download, b new sessions, c memory, d privoxy+ab, e fairness",
    )
    parser.add_argument(
        "--osocks-args",
        action="append",
        default=[],
        metavar="ARGS",
        help='an extra osocks column started with these arguments, e.g. "-w 2" (repeatable)',
    )
    parser.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        type=_named_command,
        help="one more column NAME: the server started as COMMAND, {port} replaced by its port (repeatable)",
    )
    parser.add_argument(
        "--ratio-to",
        metavar="NAME",
        help="a row of CPU per session as multiples of server NAME's (a column of this run)",
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument(
        "--soak",
        type=float,
        nargs="?",
        const=1.0,
        metavar="MINUTES",
        help="instead of the benchmark: the soak (bench/soak.py) for MINUTES (default 1)",
    )
    parser.add_argument("--soak-workers", type=int, default=2, metavar="N", help="osocks -w N (default 2)")
    parser.add_argument("--soak-hup-every", type=float, default=3.0, metavar="S", help="SIGHUP every S s (default 3)")
    parser.add_argument(
        "--soak-kill-every", type=float, default=20.0, metavar="S", help="SIGKILL a worker every S s (default 20)"
    )
    parser.add_argument(
        "--soak-out", type=Path, default=BENCH / "results", metavar="DIR", help="soak.csv and soak.png go here"
    )
    arguments = parser.parse_args(argv)
    unknown_servers = set(_split(arguments.servers)) - set(SERVER_NAMES)
    unknown_scenarios = set(_split(arguments.only)) - {scenario.letter for scenario in SCENARIOS}
    if unknown_servers or unknown_scenarios:
        parser.error(f"unknown servers {sorted(unknown_servers)} or scenarios {sorted(unknown_scenarios)}")
    return arguments


def _named_command(text: str) -> tuple[str, list[str]]:
    name, _, command = text.partition("=")
    argv = shlex.split(command)
    if not name.strip() or not argv or not any("{port}" in word for word in argv):
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=COMMAND, with {{port}} in COMMAND")
    return name.strip(), argv


def _split(comma_separated: str) -> list[str]:
    return [part.strip() for part in comma_separated.split(",") if part.strip()]


def raise_open_file_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE (inherited by every server started) as far as allowed; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))  # a higher hard limit needs root
            return wanted
        except (ValueError, OSError):
            wanted = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


def servers_to_run(
    names: list[str], osocks_variants: list[str], commands: list[tuple[str, list[str]]]
) -> list[services.SocksServer]:
    chosen: list[services.SocksServer] = []
    for name in names:
        if name == "osocks":
            chosen.append(services.osocks([]))
            chosen.extend(services.osocks(shlex.split(variant)) for variant in osocks_variants)
        elif name == "osocks-shipped":
            chosen.append(services.osocks_shipped())
        elif name == "osocks-asyncio":
            chosen.append(services.osocks(["--loop", "asyncio"]))
        elif name == "microsocks":
            chosen.append(services.microsocks())
        else:
            chosen.append(services.dante())
    chosen.extend(services.command(name, argv) for name, argv in commands)
    installed = [server for server in chosen if server.is_installed()]
    for server in chosen:
        if server not in installed:
            _progress(f"note: {server.name} is not installed ({server.program}), left out")
    return installed


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _summary(figures: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in figures.items())


def measure(
    server: services.SocksServer, scenario: Scenario, web: Endpoint, workdir: Path, profile: Profile, label: str = ""
) -> Outcome:
    """Start a fresh server, run one scenario against it, stop it; never raises."""
    what = f"{scenario.key} {label}".strip()
    scenario_dir = workdir / f"{server.name}-{what}".replace(" ", "_").replace("/", "_")
    scenario_dir.mkdir()
    started = time.monotonic()
    try:
        with server.serving(scenario_dir) as (proxy, pid):
            figures = scenario.measure(Target(proxy, pid, web, scenario_dir, server.status_log), profile)
    except Exception as error:  # noqa: BLE001 - reported in the table, the run goes on
        message = str(error) if isinstance(error, SELF_EXPLAINING_ERRORS) else f"{type(error).__name__}: {error}"
        _progress(f"[{server.name}] {what}: error: {message}")
        return Failed(message)
    _progress(f"[{server.name}] {what} ({time.monotonic() - started:.1f} s): {_summary(figures)}")
    return figures


def skip_reason(scenario: Scenario, smoke: bool) -> str | None:
    if scenario.key == "fairness":
        return scenarios.fairness_missing()
    if scenario.key != "privoxy_ab":
        return None
    if smoke:
        return "not run with --smoke"
    return scenarios.privoxy_ab_missing()


def run_settings(profile: Profile, open_files: int) -> dict[str, object]:
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "profile": asdict(profile),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "client_event_loop": scenarios.client_event_loop(),
        "open_files_limit": open_files,
    }


def run(arguments: argparse.Namespace) -> Results:
    profile = scenarios.SMOKE if arguments.smoke else scenarios.FULL
    open_files = raise_open_file_limit(OPEN_FILES_WANTED)
    servers = servers_to_run(_split(arguments.servers), arguments.osocks_args, arguments.server)
    chosen = [s for s in SCENARIOS if s.letter in _split(arguments.only)]
    results = Results([server.name for server in servers], run_settings(profile, open_files))
    with tempfile.TemporaryDirectory(prefix="osocks-bench-") as temporary:
        workdir = Path(temporary)
        workdir.chmod(0o755)  # nginx's worker runs as "nobody" when started as root
        (workdir / "nginx").mkdir()
        with services.nginx(workdir / "nginx", profile.file_sizes(), NGINX_CONNECTIONS) as web:
            if SESSIONS in chosen:

                def measure_round(server: services.SocksServer, number: int) -> Outcome:
                    return measure(server, SESSIONS, web, workdir, profile, f"round {number}")

                for server, number, outcome in rounds.interleaved(
                    servers, measure_round, profile.session_rounds, profile.session_rounds_at_most
                ):
                    key = SESSIONS.key if number == 0 else f"{SESSIONS.key} round {number}"
                    results.record(server.name, key, outcome)
            for server in servers:
                for scenario in chosen:
                    if scenario is SESSIONS:
                        continue
                    reason = skip_reason(scenario, arguments.smoke)
                    outcome = Skipped(reason) if reason else measure(server, scenario, web, workdir, profile)
                    results.record(server.name, scenario.key, outcome)
    return results


def main(argv: list[str]) -> int:
    arguments = parse_arguments(argv)
    if shutil.which("nginx") is None:
        _progress("error: nginx is not installed (Debian package nginx-light)")
        return 2
    if arguments.soak is not None:
        raise_open_file_limit(OPEN_FILES_WANTED)
        plan = soak.SoakPlan(
            arguments.soak, arguments.soak_workers, arguments.soak_hup_every, arguments.soak_kill_every
        )
        return soak.run(plan, arguments.soak_out)
    for scenario in SCENARIOS:
        reason = skip_reason(scenario, arguments.smoke)
        if reason and scenario.letter in _split(arguments.only):
            _progress(f"note: scenario {scenario.letter} ({scenario.key}) skipped: {reason}")
    results = run(arguments)
    print(markdown_table(results, arguments.ratio_to))
    write_json(results, arguments.json)
    _progress(f"results written to {arguments.json}")
    failed = any(isinstance(outcome, Failed) for outcome in results.outcomes.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
