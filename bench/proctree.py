"""CPU time and memory of a process and all its descendants, and bytes a process wrote, read from /proc."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")

# Field numbers in /proc/PID/stat, counted from 1 as in proc(5).
_PPID, _UTIME, _STIME, _CUTIME, _CSTIME = 4, 14, 15, 16, 17
_FIRST_FIELD_AFTER_NAME = 3


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3 and on of /proc/PID/stat, or None if the process is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # Field 2, the command name, is in parentheses and may contain spaces and ")".
    return text[text.rindex(")") + 1 :].split()


def _field(fields: list[str], number: int) -> int:
    return int(fields[number - _FIRST_FIELD_AFTER_NAME])


def _parent_of_every_process() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                parents[int(entry.name)] = _field(fields, _PPID)
    return parents


def process_tree(root_pid: int) -> list[int]:
    """root_pid and all its live descendants."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parent_of_every_process().items():
        children.setdefault(parent, []).append(pid)
    tree, pending = [], [root_pid]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, ()))
    return tree


def tree_cpu_seconds(root_pid: int) -> float:
    """User+system CPU of the tree so far, including children it has already reaped.

    A descendant that exits during a measurement moves its time into its
    parent's cutime/cstime, so the difference of two readings stays right.
    """
    ticks = 0
    for pid in process_tree(root_pid):
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += sum(_field(fields, n) for n in (_UTIME, _STIME, _CUTIME, _CSTIME))
    return ticks / CLOCK_TICKS_PER_SECOND


@dataclass(frozen=True)
class Memory:
    rss_kib: int
    pss_kib: int


def _smaps_rollup_kib(pid: int) -> Memory | None:
    try:
        lines = (PROC / str(pid) / "smaps_rollup").read_text().splitlines()
    except FileNotFoundError:
        return None  # exited meanwhile
    values = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            values[key] = int(rest.split()[0])
    return Memory(rss_kib=values.get("Rss", 0), pss_kib=values.get("Pss", 0))


def tree_memory(root_pid: int) -> Memory:
    """RSS and PSS summed over the tree (RSS counts shared pages once per process)."""
    readings = [m for pid in process_tree(root_pid) if (m := _smaps_rollup_kib(pid)) is not None]
    return Memory(
        rss_kib=sum(m.rss_kib for m in readings),
        pss_kib=sum(m.pss_kib for m in readings),
    )


# Columns of the "cpu" line of /proc/stat that are work (or, for steal, work the hypervisor
# gave to someone else); idle, iowait, irq and softirq are not in any process's times.
_BUSY_COLUMNS = {"user": 0, "nice": 1, "system": 2, "steal": 7}


def machine_busy_seconds() -> float:
    """CPU seconds every core has spent on processes (user, nice, system) or lost to steal, since boot."""
    with (PROC / "stat").open() as stat:
        columns = stat.readline().split()[1:]
    return sum(int(columns[index]) for index in _BUSY_COLUMNS.values()) / CLOCK_TICKS_PER_SECOND


def bytes_written(pid: int) -> int:
    """Bytes the process has passed to write(2) and the like so far ("wchar" in /proc/PID/io).

    Bytes read from a socket with recv(2) are not in "rchar", so a downloader
    writing what it receives to /dev/null is counted by what it writes.
    """
    for line in (PROC / str(pid) / "io").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "wchar":
            return int(value)
    raise LookupError(f"no wchar in /proc/{pid}/io")
