"""`-w N`: worker processes behind one master, osocks as a real process.

The status comes from the master's answer to SIGUSR1 (one JSON line on stderr),
and, where ubusd and python-ubus are installed, from `ubus call osocks status`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import test_openwrt_real as openwrt
from test_openwrt_real import ubusd  # noqa: F401 - a fixture

from conftest import ROOT, EchoServer, OsocksProcess, free_port, recv_exactly, socks_connect
from osocks import socks5, ubus
from osocks.socks5 import ReplyCode
from osocks.workers import merge_statuses

STATUS_LINE = "osocks: INFO status "
WORKERS = ("-l", "127.0.0.1", "-p", "0", "--allow-local", "-w", "2")


def status_of(server: OsocksProcess, timeout: float = 5.0) -> dict:
    """SIGUSR1, then the status line it logs."""
    seen = len(server.lines)
    server.signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.lines[seen:]:
            if line.startswith(STATUS_LINE):
                return json.loads(line[len(STATUS_LINE) :])
        time.sleep(0.02)
    raise AssertionError("no status line after SIGUSR1: " + "".join(server.lines[-5:]))


def wait_status(server: OsocksProcess, predicate: Callable[[dict], bool], timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = status_of(server)
        if predicate(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {status}")
        time.sleep(0.05)


def gone(pid: int) -> bool:
    """The process has exited (a zombie no one has reaped yet counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(gone(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {[pid for pid in pids if not gone(pid)]}"
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    """The process's children, whichever of its threads started them (a new zygote comes from a thread)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return sorted(found)


def zygote_and_workers(pid: int) -> tuple[int, set[int]]:
    """The master's one child, the zygote, and its children, the workers."""
    (zygote,) = children(pid)
    return zygote, set(children(zygote))


def echo_sessions(port: int, echo: EchoServer, sizes: list[int]) -> None:
    for size in sizes:
        sock, code, _, _ = socks_connect(port, "127.0.0.1", echo.port)
        assert code == ReplyCode.SUCCEEDED
        sock.sendall(b"x" * size)
        assert recv_exactly(sock, size) == b"x" * size
        sock.close()


def test_sessions_spread_over_workers_and_totals_are_exact(run_osocks, echo: EchoServer) -> None:
    server = run_osocks(*WORKERS)
    sizes = list(range(1, 41))
    echo_sessions(server.port, echo, sizes)
    status = wait_status(server, lambda s: s["sessions"]["live"] == 0)
    assert status["pid"] == server.proc.pid
    assert status["listeners"] == [f"127.0.0.1:{server.port}"]  # port 0: one real port for both
    assert status["sessions"]["total"] == len(sizes) and status["replies"]["succeeded"] == len(sizes)
    assert status["bytes"] == {"up": sum(sizes), "down": sum(sizes)}
    workers = status["workers"]
    assert len(workers) == 2 and {w["pid"] for w in workers} == zygote_and_workers(server.proc.pid)[1]
    assert sum(w["total"] for w in workers) == len(sizes)
    assert all(w["total"] > 0 for w in workers), workers  # SO_REUSEPORT spread them
    assert status["worker_restarts"] == 0 and status["settings"]["workers"] == 2


def test_sessions_are_listed_with_their_worker(run_osocks, echo: EchoServer) -> None:
    server = run_osocks(*WORKERS)
    held = [socks_connect(server.port, "127.0.0.1", echo.port)[0] for _ in range(12)]
    status = wait_status(server, lambda s: s["sessions"]["live"] == 12)
    assert sum(w["live"] for w in status["workers"]) == 12
    for sock in held:
        sock.close()


def test_one_worker_is_one_process(run_osocks) -> None:
    server = run_osocks("-l", "127.0.0.1", "-p", "0")
    status = status_of(server)
    assert children(server.proc.pid) == [] and "workers" not in status
    assert status["listeners"] == [f"127.0.0.1:{server.port}"]


def test_zero_workers_is_one_per_core(run_osocks) -> None:
    server = run_osocks("-l", "127.0.0.1", "-p", "0", "-w", "0")
    cores = len(os.sched_getaffinity(0))
    if cores == 1:
        assert children(server.proc.pid) == []
    else:
        assert len(zygote_and_workers(server.proc.pid)[1]) == cores


def test_sigterm_stops_every_worker_and_exits_zero(run_osocks, echo: EchoServer) -> None:
    server = run_osocks(*WORKERS)
    held = [socks_connect(server.port, "127.0.0.1", echo.port)[0] for _ in range(6)]
    pids = [w["pid"] for w in wait_status(server, lambda s: s["sessions"]["live"] == 6)["workers"]]
    pids.append(zygote_and_workers(server.proc.pid)[0])
    server.signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0
    wait_gone(pids, timeout=10)
    for sock in held:
        sock.settimeout(5)
        assert sock.recv(10) == b""  # every worker closed its sessions
        sock.close()
    assert "Traceback" not in "".join(server.lines)


def test_a_killed_worker_is_restarted_and_its_counts_kept(run_osocks, echo: EchoServer) -> None:
    server = run_osocks(*WORKERS)
    echo_sessions(server.port, echo, [10] * 12)
    before = wait_status(server, lambda s: s["sessions"]["live"] == 0)
    victim = max(before["workers"], key=lambda w: w["total"])
    assert victim["total"] > 0
    os.kill(victim["pid"], signal.SIGKILL)  # a child of the osocks this test started
    status = wait_status(server, lambda s: s["worker_restarts"] == 1 and all("total" in w for w in s["workers"]))
    pids = {w["pid"] for w in status["workers"]}
    assert victim["pid"] not in pids and len(pids) == 2
    assert zygote_and_workers(server.proc.pid)[1] == pids
    # what the dead worker counted is still in the totals (shared memory, not its answers)
    assert status["sessions"]["total"] == 12 and status["replies"]["succeeded"] == 12
    assert status["bytes"] == {"up": 120, "down": 120}
    echo_sessions(server.port, echo, [10] * 20)
    status = wait_status(server, lambda s: s["sessions"]["live"] == 0)
    assert status["sessions"]["total"] == 32 and status["bytes"] == {"up": 320, "down": 320}
    assert sum(w["total"] for w in status["workers"]) == 32 - victim["total"]
    assert all(w["total"] > 0 for w in status["workers"])
    assert any(f"worker pid {victim['pid']} was killed by signal 9" in line for line in server.lines)
    assert any(f"(pid {victim['pid']}) ended after" in line for line in server.lines)


def test_a_worker_that_stops_answering_is_killed_and_replaced(run_osocks, echo: EchoServer, tmp_path: Path) -> None:
    # the master's health check, in short: a check each 0.2 s, killed after 2 unanswered ones
    (tmp_path / "sitecustomize.py").write_text(
        "import osocks.workers as w\nw.CHECK_INTERVAL = 0.2\nw.HUNG_AFTER = 2\nw.ANSWER_TIMEOUT = 0.3\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}:{ROOT / 'src'}")
    server = run_osocks(*WORKERS, env=env)
    echo_sessions(server.port, echo, [10] * 8)
    victim = wait_status(server, lambda s: s["sessions"]["live"] == 0)["workers"][0]["pid"]
    os.kill(victim, signal.SIGSTOP)  # alive, but answers nothing: as a worker stuck in a loop
    status = wait_status(server, lambda s: s["worker_restarts"] == 1 and all("total" in w for w in s["workers"]))
    assert victim not in {w["pid"] for w in status["workers"]}
    wait_gone([victim])
    assert status["sessions"]["total"] == 8  # its counts stay
    assert any(f"(pid {victim}) stopped answering: killing it" in line for line in server.lines)
    echo_sessions(server.port, echo, [10] * 8)


def test_workers_restart_when_the_zygote_is_gone(run_osocks, echo: EchoServer) -> None:
    server = run_osocks(*WORKERS)
    zygote, pids = zygote_and_workers(server.proc.pid)
    os.kill(zygote, signal.SIGKILL)  # the workers go on serving
    echo_sessions(server.port, echo, [10] * 4)
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    status = wait_status(server, lambda s: s["worker_restarts"] == 1 and all("total" in w for w in s["workers"]))
    (new_zygote,) = children(server.proc.pid)  # started anew, by exec; the old one was collected
    assert new_zygote != zygote and victim not in {w["pid"] for w in status["workers"]}
    assert set(children(new_zygote)) == {w["pid"] for w in status["workers"]} - pids
    echo_sessions(server.port, echo, [10] * 20)
    assert any(f"the zygote (pid {zygote}) is gone" in line for line in server.lines)


def test_workers_end_with_the_master(run_osocks) -> None:
    server = run_osocks(*WORKERS)
    pids = [w["pid"] for w in status_of(server)["workers"]]
    pids.append(zygote_and_workers(server.proc.pid)[0])
    server.proc.kill()  # no goodbye: the workers and the zygote see their channels close
    server.proc.wait(5)
    wait_gone(pids)


def test_second_osocks_on_the_same_port_is_refused(run_osocks) -> None:
    server = run_osocks(*WORKERS)
    out = subprocess.run(
        [sys.executable, "-m", "osocks", "--no-uci", "-l", "127.0.0.1", "-p", str(server.port), "-w", "2"],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
    )
    assert out.returncode == 1 and "Address already in use" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def login(port: int, user: bytes, password: bytes, echo: EchoServer) -> int:
    """Username/password login, then CONNECT; the reply code (0xff when the login is refused)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"\x05\x01\x02")
        assert recv_exactly(sock, 2) == b"\x05\x02"
        sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
        if recv_exactly(sock, 2) != b"\x01\x00":
            return 0xFF
        sock.sendall(socks5.encode_request(socks5.Command.CONNECT, "127.0.0.1", echo.port))
        return recv_exactly(sock, 10)[1]


def test_sighup_reaches_every_worker(run_osocks, echo: EchoServer, tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("alice:one\n")
    server = run_osocks(*WORKERS, "-U", str(users))
    users.write_text("alice:one\nbob:two\n")
    server.signal(signal.SIGHUP)
    status = wait_status(server, lambda s: s["settings"]["users"] == ["alice", "bob"])
    reloaded = [line for line in server.lines if "reloaded:" in line]
    assert reloaded == ["osocks: INFO reloaded: users changed\n"]  # once, not once per worker
    totals = [w["total"] for w in status["workers"]]
    assert [login(server.port, b"bob", b"two", echo) for _ in range(20)] == [0] * 20
    status = wait_status(server, lambda s: s["sessions"]["live"] == 0)
    assert all(w["total"] > t for w, t in zip(status["workers"], totals, strict=True))  # both workers know bob

    users.write_text("alice:one\nnot a user line\n")  # a bad file: the reload fails, nothing changes
    seen = len(server.lines)
    server.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while not any("reload failed" in line for line in server.lines[seen:]):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert [login(server.port, b"bob", b"two", echo) for _ in range(20)] == [0] * 20
    assert status_of(server)["settings"]["users"] == ["alice", "bob"]


def test_merge_statuses_sums_counters_and_unites_listeners() -> None:
    one = {
        "pid": 1,
        "listeners": ["a:1"],
        "sessions": {"live": 1, "total": 5},
        "bytes": {"up": 3, "down": 4},
        "settings": {"port": 1},
        "new_counter": 2,
    }
    two = {
        "pid": 2,
        "listeners": ["a:1", "b:1"],
        "sessions": {"live": 2, "total": 7},
        "bytes": {"up": 1, "down": 0},
        "settings": {"port": 1},
        "new_counter": 3,
    }
    merged = merge_statuses([one, two])
    assert merged["sessions"] == {"live": 3, "total": 12} and merged["bytes"] == {"up": 4, "down": 4}
    assert merged["listeners"] == ["a:1", "b:1"] and merged["new_counter"] == 5
    assert merged["pid"] == 1 and merged["settings"] == {"port": 1}
    assert one["sessions"] == {"live": 1, "total": 5}  # the inputs are left alone
    assert merge_statuses([]) == {"listeners": []}


# -- with a real ubusd: the master answers for all workers ------------------------------------------

UBUS_MISSING = [name for name in ("ubusd", "ubus") if shutil.which(name) is None]
if not ubus.available():
    UBUS_MISSING.append("python-ubus")


@pytest.mark.skipif(bool(UBUS_MISSING), reason=f"not installed: {', '.join(UBUS_MISSING)}")
def test_ubus_status_sessions_and_reload_for_all_workers(
    tmp_path: Path,
    echo: EchoServer,
    ubusd: str,  # noqa: F811 - the fixture
) -> None:
    users = tmp_path / "users"
    users.write_text("alice:one\n")
    server = OsocksProcess(*WORKERS, "-U", str(users), "--anonymous", "127.0.0.0/8", "--ubus-socket", ubusd)
    try:
        held = [socks_connect(server.port, "127.0.0.1", echo.port)[0] for _ in range(10)]
        deadline = time.monotonic() + 10
        while (status := openwrt.ubus_call(ubusd, "status"))["sessions"]["live"] != 10:
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert len(status["workers"]) == 2 and status["worker_restarts"] == 0
        assert sum(w["live"] for w in status["workers"]) == 10
        zygote = zygote_and_workers(server.proc.pid)[0]
        sessions = openwrt.ubus_call(ubusd, "sessions")["sessions"]
        assert len(sessions) == 10 and {s["worker"] for s in sessions} <= {w["pid"] for w in status["workers"]}
        assert {s["destination"] for s in sessions} == {f"127.0.0.1:{echo.port}"}

        users.write_text("alice:one\nbob:two\n")
        answer = openwrt.ubus_call(ubusd, "reload")
        assert answer["changed"] == ["users"] and answer["listeners"] == [f"127.0.0.1:{server.port}"]
        assert openwrt.ubus_call(ubusd, "status")["settings"]["users"] == ["alice", "bob"]
        for sock in held:
            sock.close()
        assert server.stop() == 0  # SIGTERM with the ubus bridge running
        wait_gone([zygote, *(w["pid"] for w in status["workers"])])
    finally:
        server.stop()


@pytest.mark.skipif(bool(openwrt.MISSING), reason=f"OpenWrt only, not installed here: {', '.join(openwrt.MISSING)}")
def test_workers_from_uci_follow_the_lan_interface(tmp_path: Path, ubusd: str) -> None:  # noqa: F811
    """`option workers '2'`, `list interface 'lan'`: every worker follows netifd's answers (a stand-in here)."""
    lan = tmp_path / "lan.json"
    with openwrt.netifd_stand_in(ubusd, lan):
        confdir = tmp_path / "config"
        confdir.mkdir()
        port = free_port()
        (confdir / "osocks").write_text(
            f"config osocks 'main'\n\tlist interface 'lan'\n\toption port '{port}'\n\toption workers '2'\n"
        )
        server = openwrt.Osocks(confdir, ubusd)
        try:
            assert openwrt.listeners_become(ubusd, [f"127.0.0.1:{port}"])
            lan.write_text(json.dumps({"up": True, "ipv4-address": [{"address": "127.0.0.3", "mask": 8}]}))
            openwrt.ubus_call(ubusd, "reload")
            assert openwrt.listeners_become(ubusd, [f"127.0.0.3:{port}"])
            for _ in range(20):
                with socket.create_connection(("127.0.0.3", port), timeout=5) as sock:
                    sock.sendall(b"\x05\x01\x00")
                    assert recv_exactly(sock, 2) == b"\x05\x00"
            status = openwrt.ubus_call(ubusd, "status")
            assert status["interfaces"] == {"lan": ["127.0.0.3"]} and status["sessions"]["total"] == 20
            assert [w["total"] > 0 for w in status["workers"]] == [True, True]  # both listen on the new address

            lan.write_text(json.dumps({"up": False}))
            openwrt.ubus_call(ubusd, "reload")
            assert openwrt.listeners_become(ubusd, [])
            assert len(openwrt.ubus_call(ubusd, "status")["workers"]) == 2
        finally:
            assert server.stop() == 0


def test_w0_counts_the_cores_this_process_may_use(run_osocks) -> None:
    """-w 0 is one worker per core osocks may run on (sched_getaffinity), not per core of the machine."""
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(saved)})  # inherited by the osocks started now
    try:
        server = run_osocks("-l", "127.0.0.1", "-p", "0", "-w", "0")
    finally:
        os.sched_setaffinity(0, saved)
    status = status_of(server)
    assert "workers" not in status  # one core: one process, no master
    assert not any("worker processes" in line for line in server.lines)


POLL_SYSCALLS = {"x86_64": {"7", "271"}, "aarch64": {"73"}}  # poll, ppoll: a blocking socket recv with a timeout


def waiting_in_poll(pid: int) -> bool:
    """Some thread of the process is blocked in poll(2), as socket.recv with a timeout is."""
    wanted = POLL_SYSCALLS.get(os.uname().machine, {"7"})
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()[0] in wanted:
                return True
    return False


def test_master_keeps_serving_while_the_zygote_does_not_answer(run_osocks) -> None:
    """Asking the zygote for a worker may wait FORK_TIMEOUT (5 s): not on the master's event loop."""
    server = run_osocks(*WORKERS)
    victim = status_of(server)["workers"][0]["pid"]
    zygote, _ = zygote_and_workers(server.proc.pid)
    os.kill(zygote, signal.SIGSTOP)
    try:
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not waiting_in_poll(server.proc.pid):  # the restart is waiting for the zygote's answer
            assert time.monotonic() < deadline, "the master never asked the zygote for a new worker"
            time.sleep(0.02)
        status = status_of(server, timeout=10)
        assert not any("is gone" in line for line in server.lines)  # answered while the zygote is stuck
        assert any(worker.get("error") == "restarting" for worker in status["workers"]), status["workers"]
    finally:
        os.kill(zygote, signal.SIGKILL)
    status = wait_status(server, lambda s: all("error" not in w for w in s["workers"]) and s["worker_restarts"] == 1)
    assert victim not in {w["pid"] for w in status["workers"]}


def test_workers_start_with_a_thousand_hashed_users(run_osocks, echo: EchoServer, tmp_path: Path) -> None:
    """The settings reach each worker whatever their size (a zygote message once held them: 64 KiB)."""
    from osocks import auth

    users = tmp_path / "users"
    users.write_text("".join(f"user{i}:{auth.hash_password(f'pw{i}', iterations=1)}\n" for i in range(1000)))
    server = run_osocks(*WORKERS, "-U", str(users))
    status = wait_status(
        server, lambda s: len(s["workers"]) == 2 and all("pid" in w and "error" not in w for w in s["workers"])
    )
    assert len(status["settings"]["users"]) == 1000
    assert [login(server.port, b"user999", b"pw999", echo) for _ in range(8)] == [ReplyCode.SUCCEEDED] * 8
    assert login(server.port, b"user0", b"pw1", echo) == 0xFF
