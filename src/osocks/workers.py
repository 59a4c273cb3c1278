"""Worker processes (`-w N`): N processes serve one port, each with its own event loop.

Three processes kinds, all from one program:

* the master (the process procd or the user started) serves no client: it owns
  the ubus connection, reads the settings, holds the port, has the workers
  started, restarts one that dies, and answers `status`, `sessions`, `reload`
  and `disconnect` (asking the worker whose pid starts the session id) for all
  of them; `__main__.serve` drives it as it drives a `Server`;
* the zygote, forked from the master at start-up, before any thread or event
  loop exists, forks a worker whenever the master asks;
* the workers, each a `Server` with SO_REUSEPORT listening sockets on its own
  uvloop loop, talking to the master over a socketpair of its own.

Why these choices: measured on a 2-core VM with `bench/run.py` (medians of 3
runs each; its client, nginx and osocks share the 2 cores):

* SO_REUSEPORT rather than one listening socket inherited by every worker: the
  same sessions/s (-w 2: 3083 against 3090) and CPU per session (322 against
  316 µs), an evener spread of sessions (within 3% of equal, against up to 15%
  at -w 4), and less CPU per session at -w 4 (346 against 380 µs: a shared
  socket wakes every worker for each connection).  And each worker opens and
  closes its own sockets on reload, where a shared socket would have to be
  passed to every worker.  The master binds each address first, without
  listen(): a port 0 becomes one real port for all, "address in use" shows
  before any worker starts, and the port stays held while a worker restarts;
  a bind without SO_REUSEPORT, made and closed at once, keeps a second osocks
  from silently joining the group.
* workers forked from a zygote rather than exec'd: a fresh interpreter costs
  each worker its own 15 MB (idle PSS of the whole tree, -w 2: 49.7 MB exec'd,
  32.7 MB forked, 18.4 MB for one process; -w 4: 80.2 against 40.2 MB).
  Forking the master itself later would copy a process running the ubus
  thread and an event loop; the zygote is a copy of the master made before
  either exists, so the master, the zygote and every worker share their pages
  (gc.freeze() keeps the collector off them).  If the zygote dies, the master
  starts a new one by exec (`python -m osocks.workers FD`).
* what -w 2 gains: per session, the workers use as much CPU as one process
  (230 against 260 µs), so capacity grows with the cores osocks gets.  On that
  VM one process already leaves the other core only 10% idle (the client and
  nginx use the rest), so -w 2 serves 1.25x the sessions/s (4170 against 3334),
  1.31x with a lighter client in C (3847 against 2930: idle 18% → 1%): the
  cores run out, not osocks.  Bulk throughput of one stream stays the same.

The channels.  Master → zygote: a SOCK_SEQPACKET message, the pickled logging
settings (only those: the whole settings, with many users, would not fit one
message) with the worker's end of a new socketpair and the counters' memfd as
SCM_RIGHTS; the answer is the new pid.  The zygote logs how each worker ended.  Master ↔ worker:
length-prefixed pickles (a private channel between a process and its own
descendants):

    master → worker   (seq, op, args)   op: "start" (first, once: settings, interfaces, counters
                                        slot), "ping", "status", "sessions", "reload", "disconnect"
    worker → master   (seq, ok, value)  value: the answer, or the exception when not ok

A worker stops, closing its sessions, when its channel closes (the master
stopping, or gone, even by SIGKILL: no worker outlives it) or on SIGTERM;
SIGINT, SIGHUP and SIGUSR1 are the master's, the others ignore them.  A channel
that closes while osocks runs is a worker that died: the slot gets a new one
after a back-off (0.1 s, doubled up to 10 s while workers keep dying young),
counted in `worker_restarts`.  A worker that is alive but does not answer the
master's check (a "ping" every CHECK_INTERVAL) HUNG_AFTER times in a row is
killed, and so restarted the same way.

Status: counters are the sums over the workers.  Each worker counts into its
own page of a memfd the master shares with it (passed with its channel), so
the counts of a worker that dies, even by SIGKILL, stay in the totals: the
master adds its page to `retired` once the channel closes, then clears it for
the next worker in the slot (bytes of sessions the dead worker still had open
are lost with them).  `sessions.peak` is the sum of the running workers'
peaks, an upper bound on the peak of the total; listeners are the union; `workers` lists each
worker (pid, live, total, uptime; or the error when it did not answer); `pid` is
the master's.  Reload: the master reads and checks the settings and binds any new
address first, then every worker applies them; a failure in any worker undoes
the change in the others, so that nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from . import __version__, tasks
from .server import (
    COUNTERS_BYTES,
    Counters,
    ListenError,
    Server,
    changed_settings,
    counted_figures,
    listening_socket,
    without_address,
)
from .session import _endpoint
from .settings import DEFAULTS, Settings, SettingsError

log = logging.getLogger("osocks")

Address = tuple[str, int]

START_TIMEOUT = 10.0  # seconds for a new worker to open its listeners
ANSWER_TIMEOUT = 1.5  # for status and sessions (ubus waits 2 s for the master)
RELOAD_TIMEOUT = 8.0  # (ubus waits 10 s)
STOP_TIMEOUT = 5.0  # for workers to close their sessions and exit, before SIGKILL
FORK_TIMEOUT = 5.0  # for the zygote to answer with a pid
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 10.0  # seconds before a restart
CHECK_INTERVAL = 5.0  # seconds between the master's checks that every worker still answers
HUNG_AFTER = 3  # checks in a row a worker leaves unanswered: it is killed, then restarted
STABLE = 10.0  # a worker that ran this long died of something new: back to BACKOFF_FIRST
NOT_SUMMED = (
    "version",
    "pid",
    "uptime",
    "listeners",
    "interfaces",
    "interfaces_without_address",
    "settings",
    "fd_limit",
)
SLOT_BYTES = max(mmap.PAGESIZE, COUNTERS_BYTES)  # a worker's counters; mmap offsets are whole pages


def count(settings: Settings) -> int:
    """How many workers the settings ask for (0: one per core this process may run on); 1 means no
    master, no worker: one process."""
    return settings.workers or len(os.sched_getaffinity(0)) or 1


class WorkerGone(Exception):
    """The worker ended, or its channel closed, before it answered."""


def _frame(message: Any) -> bytes:
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(4, "big") + data


async def _receive(reader: asyncio.StreamReader) -> Any:
    size = int.from_bytes(await reader.readexactly(4), "big")
    return pickle.loads(await reader.readexactly(size))


# -- the zygote ------------------------------------------------------------------------------------


class Zygote:
    """The master's handle on the process that forks the workers."""

    def __init__(self, channel: socket.socket, pid: int) -> None:
        self.channel = channel
        self.pid = pid
        channel.settimeout(FORK_TIMEOUT)

    @classmethod
    def fork(cls, uvloop_too: bool = True) -> Zygote:
        """Fork the zygote from this process: call it before any thread or event loop exists.
        uvloop_too: load uvloop first, once for every worker (their pages stay shared)."""
        if uvloop_too:
            with contextlib.suppress(ImportError):
                import uvloop  # noqa: F401
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()  # objects the collector will not touch: their pages stay shared
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                ours.close()
                status = _zygote(theirs)
            finally:
                os._exit(status)
        theirs.close()
        return cls(ours, pid)

    @classmethod
    def exec(cls) -> Zygote:
        """A new zygote, from a fresh interpreter: when the forked one is gone, the master has threads."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            process = subprocess.Popen(
                [sys.executable, "-m", "osocks.workers", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},  # the master's osocks, wherever it is
            )
        return cls(ours, process.pid)

    def fork_worker(self, channel: socket.socket, counters_fd: int, settings: Settings) -> int:
        """A new worker with channel (the worker's end of its socketpair) and the shared counters' file;
        its pid.  OSError: no zygote."""
        logging_only = DEFAULTS.replace(syslog=settings.syslog, verbosity=settings.verbosity)
        socket.send_fds(self.channel, [pickle.dumps(logging_only)], [channel.fileno(), counters_fd])
        answer = self.channel.recv(8)
        if len(answer) != 8:
            raise ConnectionError("the zygote is gone")
        return int.from_bytes(answer, "big")

    def close(self) -> None:
        """Close the channel (the zygote then exits) and collect the zygote, if it is this process's child."""
        self.channel.close()
        deadline = time.monotonic() + FORK_TIMEOUT
        try:
            while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(self.pid, signal.SIGKILL)
                    deadline = float("inf")
                time.sleep(0.005)
        except ChildProcessError:
            pass


def _zygote(channel: socket.socket) -> int:
    """Fork a worker for each request; log how each ended; exit when the master is gone."""
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, _worker_ended)
    logging_set_for = b""
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(channel, 1 << 16, 2)
        except OSError:
            return 1
        if not data:
            return 0
        if data != logging_set_for:  # pickled settings: log as they say
            from .__main__ import setup_logging

            setup_logging(pickle.loads(data))
            logging_set_for = data
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                channel.close()
                channel_fd, counters_fd = fds
                status = worker_main(channel_fd, counters_fd, pickle.loads(data))
            finally:
                os._exit(status)
        for fd in fds:
            os.close(fd)
        channel.sendall(pid.to_bytes(8, "big"))


def _worker_ended(signum: int, frame: object) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if os.WIFSIGNALED(status):
            log.warning("worker pid %d was killed by signal %d", pid, os.WTERMSIG(status))
        elif os.WEXITSTATUS(status):
            log.warning("worker pid %d exited with status %d", pid, os.WEXITSTATUS(status))


# -- the master ------------------------------------------------------------------------------------


class Worker:
    """One worker slot: its process (a new one after a death), its channel, its pending requests."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.pid: int | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.watching: asyncio.Task[None] | None = None  # ends when the channel closes
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.ready = False  # started, and answering
        self.started = 0.0
        self.unanswered = 0  # health checks in a row without an answer
        self.backoff = 0.0
        self.restart: asyncio.TimerHandle | None = None


class Master:
    """N workers behind one face: what `__main__.serve` asks of a Server, answered for all of them."""

    def __init__(self, settings: Settings, zygote: Zygote) -> None:
        self.settings = settings  # as the workers run it: a port 0 replaced by the port chosen for it
        self.zygote = zygote
        self.interface_addresses: dict[str, list[str]] = {}
        self.workers = [Worker(slot) for slot in range(count(settings))]
        # each worker counts into its slot here; the counts of a worker that ended go to `retired`
        self.counters_fd = os.memfd_create("osocks-counters")
        os.ftruncate(self.counters_fd, SLOT_BYTES * len(self.workers))
        self.counters_memory = mmap.mmap(self.counters_fd, SLOT_BYTES * len(self.workers))
        self.retired = Counters()
        self.reserved: dict[Address, socket.socket] = {}
        self.chosen_port = 0  # the real port, when the configured one is 0
        self.restarts = 0
        self.started = time.monotonic()
        self.closed = asyncio.Event()
        self.stopping = False
        self.serving = False  # restarts only once every worker has started
        self._lock = asyncio.Lock()  # a reload, or a worker starting: one at a time
        self._forking = asyncio.Lock()  # the zygote's channel: one request at a time
        self._seq = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.checking: asyncio.Task[None] | None = None

    def _task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return tasks.start(coro, self._tasks)

    # -- the port ------------------------------------------------------------------------------

    def _reserve(
        self, settings: Settings, interface_addresses: dict[str, list[str]]
    ) -> tuple[Settings, dict[Address, socket.socket]]:
        """Bind every new listen address (see the module's doc); the settings with the real port."""
        configured_port = settings.port
        if configured_port == 0 and self.chosen_port:
            settings = settings.replace(port=self.chosen_port)
        opened: dict[Address, socket.socket] = {}
        try:
            wanted = Server.listen_addresses(settings, interface_addresses)
            if settings.port == 0 and wanted:
                first = self._bind(wanted[0], settings, wanted)
                settings = settings.replace(port=first.getsockname()[1])
                opened[(wanted[0][0], settings.port)] = first
                wanted = Server.listen_addresses(settings, interface_addresses)
            if not wanted and not settings.interfaces:
                raise ListenError(f"no listen address of family {settings.family}")
            for address in wanted:
                if address not in self.reserved and address not in opened:
                    opened[address] = self._bind(address, settings, wanted)
        except BaseException:
            for sock in opened.values():
                sock.close()
            raise
        if configured_port == 0 and opened:
            self.chosen_port = settings.port
        return settings, opened

    @staticmethod
    def _bind(address: Address, settings: Settings, wanted: list[Address]) -> socket.socket:
        sock = listening_socket(address, settings, wanted, reuse_port=True)
        try:
            listening_socket(sock.getsockname()[:2], settings, wanted).close()  # fails if any socket listens
        except ListenError:
            sock.close()
            raise
        return sock

    def _commit(
        self, settings: Settings, interface_addresses: dict[str, list[str]], opened: dict[Address, socket.socket]
    ) -> None:
        self.settings = settings
        self.interface_addresses = interface_addresses
        wanted = Server.listen_addresses(settings, interface_addresses)
        for address in list(self.reserved):
            if address not in wanted:
                self.reserved.pop(address).close()
        self.reserved.update(opened)

    def bound_addresses(self) -> list[Address]:
        return list(self.reserved)

    # -- workers -------------------------------------------------------------------------------

    async def start(self, interface_addresses: dict[str, list[str]] | None = None) -> None:
        """Bind the listen addresses, start every worker and wait until each listens."""
        addresses = interface_addresses or {}
        settings, opened = self._reserve(self.settings, addresses)
        self._commit(settings, addresses, opened)
        try:
            await asyncio.gather(*(self._spawn(worker) for worker in self.workers))
        except Exception as e:
            if self.stopping:  # SIGTERM while starting: no error
                return
            self.close()
            await self.closed.wait()
            if isinstance(e, (WorkerGone, TimeoutError, OSError)):
                raise ListenError(f"a worker did not start: {e or type(e).__name__}") from None
            raise
        self.serving = True
        self.checking = self._task(self._check_workers())
        log.info("%d worker processes: %s", len(self.workers), ", ".join(str(w.pid) for w in self.workers))

    async def _spawn(self, worker: Worker) -> None:
        """Have a worker forked into the slot and wait until it listens; raises what kept it from starting.
        Once it exists, its watcher (`_watch`) owns the slot: it notices its end and restarts it."""
        ours, theirs = socket.socketpair()
        try:
            with theirs:
                worker.pid = await self._fork_worker(theirs)
            reader, worker.writer = await asyncio.open_unix_connection(sock=ours)
        except BaseException:
            ours.close()  # a worker already forked sees its channel close, and exits
            raise
        worker.started = time.monotonic()
        worker.watching = self._task(self._watch(worker, reader))
        try:
            await self._ask(
                worker, "start", self.settings, self.interface_addresses, worker.slot, timeout=START_TIMEOUT
            )
        except BaseException as e:
            worker.writer.close()  # the worker exits; its watcher takes over
            if isinstance(e, TimeoutError):
                os.kill(worker.pid, signal.SIGKILL)  # it does not even read
            raise
        worker.unanswered = 0  # a new process: the old one's missed checks are not its own
        worker.ready = True

    async def _fork_worker(self, channel: socket.socket) -> int:
        """Ask the zygote for a worker, in a thread: its answer may take up to FORK_TIMEOUT, and
        replacing a zygote that is gone as long again, while the loop keeps serving ubus and signals."""
        async with self._forking:  # one request on the zygote's channel at a time
            if self.stopping:
                raise WorkerGone("osocks is stopping")
            zygote = self.zygote
            try:
                return await _in_thread(zygote.fork_worker, channel, self.counters_fd, self.settings)
            except OSError as e:
                log.warning("the zygote (pid %d) is gone (%s): starting a new one", zygote.pid, e)
            await _in_thread(zygote.close)
            self.zygote = await _in_thread(Zygote.exec)
            return await _in_thread(self.zygote.fork_worker, channel, self.counters_fd, self.settings)

    def _slot(self, worker: Worker) -> Counters:
        offset = worker.slot * SLOT_BYTES
        return Counters(memoryview(self.counters_memory)[offset : offset + COUNTERS_BYTES])

    def _retire_counts(self, worker: Worker) -> None:
        """The worker has ended (its channel closed when its process did): keep what it counted."""
        slot = self._slot(worker)
        retired = self.retired.values
        for index, value in enumerate(slot.values):
            retired[index] += value
        self.retired.peak = 0  # a peak is of live sessions: only the running workers' count
        slot.clear()

    async def _watch(self, worker: Worker, reader: asyncio.StreamReader) -> None:
        """Hand each answer to the request waiting for it.  The channel closes when the worker ends:
        then, unless osocks is stopping, restart the slot after a back-off."""
        pending, pid, writer = worker.pending, worker.pid, worker.writer
        try:
            while True:
                seq, ok, value = await _receive(reader)
                future = pending.pop(seq, None)
                if future is not None and not future.done():
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            worker.ready = False
            for future in pending.values():
                if not future.done():
                    future.set_exception(WorkerGone(f"worker {worker.slot} is gone"))
            pending.clear()
            if writer is not None:
                writer.close()
            self._retire_counts(worker)
        if self.stopping or not self.serving:
            return
        ran = time.monotonic() - worker.started
        worker.backoff = BACKOFF_FIRST if ran >= STABLE else _doubled(worker.backoff)
        log.error(
            "worker %d (pid %s) ended after %.1f s; restarting it in %.1f s", worker.slot, pid, ran, worker.backoff
        )
        self._schedule_restart(worker)

    async def _check_workers(self) -> None:
        """A worker that stops answering (a loop stuck in a bug, a stopped process) is killed: its
        watcher then restarts the slot, as for any worker that dies."""
        while not self.stopping:
            await asyncio.sleep(CHECK_INTERVAL)
            workers = [w for w in self.workers if w.ready]
            for worker, answer in zip(workers, await self._ask_all(workers, "ping"), strict=True):
                if not isinstance(answer, TimeoutError):
                    worker.unanswered = 0
                    continue
                worker.unanswered += 1
                if worker.unanswered >= HUNG_AFTER and worker.ready and worker.pid is not None:
                    log.error("worker %d (pid %d) stopped answering: killing it", worker.slot, worker.pid)
                    worker.unanswered = 0
                    os.kill(worker.pid, signal.SIGKILL)

    def _schedule_restart(self, worker: Worker) -> None:
        worker.restart = asyncio.get_running_loop().call_later(
            worker.backoff, lambda: self._task(self._restart(worker))
        )

    async def _restart(self, worker: Worker) -> None:
        worker.restart = None
        if self.stopping:
            return
        self.restarts += 1
        watching = worker.watching
        try:
            async with self._lock:
                await self._spawn(worker)
        except Exception as e:  # noqa: BLE001 - logged; the slot is tried again
            if self.stopping:
                return
            log.error("worker %d did not restart: %s", worker.slot, e or type(e).__name__)
            if worker.watching is watching:  # no worker, so no watcher to try again
                worker.backoff = _doubled(worker.backoff)
                self._schedule_restart(worker)

    async def _ask(self, worker: Worker, op: str, *args: Any, timeout: float = ANSWER_TIMEOUT) -> Any:
        writer = worker.writer
        if writer is None or writer.is_closing():
            raise WorkerGone(f"worker {worker.slot} is not running")
        seq = next(self._seq)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        worker.pending[seq] = future
        try:
            writer.write(_frame((seq, op, args)))
            return await asyncio.wait_for(future, timeout)
        finally:
            worker.pending.pop(seq, None)

    def _tell(self, worker: Worker, op: str, *args: Any) -> None:
        """A request whose answer nobody waits for (the reader drops answers no one asked for)."""
        if worker.writer is not None and not worker.writer.is_closing():
            worker.writer.write(_frame((next(self._seq), op, args)))

    async def _ask_all(self, workers: list[Worker], op: str, *args: Any, timeout: float = ANSWER_TIMEOUT) -> list[Any]:
        """Each worker's answer, or the exception it raised."""
        asking = (self._ask(worker, op, *args, timeout=timeout) for worker in workers)
        return await asyncio.gather(*asking, return_exceptions=True)

    # -- status, reload, shutdown ----------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        workers = [w for w in self.workers if w.ready]
        answers = dict(zip(workers, await self._ask_all(workers, "status"), strict=True))
        statuses = [a for a in answers.values() if isinstance(a, dict)]
        merged = merge_statuses([*statuses, counted_figures(self.retired)])
        merged.update(
            version=__version__,
            pid=os.getpid(),
            uptime=round(time.monotonic() - self.started, 3),
            interfaces=self.interface_addresses,
            interfaces_without_address=without_address(self.interface_addresses),
            settings=self.settings.public(),
        )
        listed: list[dict[str, Any]] = []
        for worker in self.workers:
            s = answers.get(worker)
            if isinstance(s, dict):
                listed.append(
                    {
                        "pid": s["pid"],
                        "live": s["sessions"]["live"],
                        "total": s["sessions"]["total"],
                        "uptime": s["uptime"],
                    }
                )
            else:
                why = "restarting" if s is None else str(s) or type(s).__name__
                listed.append({"pid": worker.pid, "error": why})
        merged["workers"] = listed
        merged["worker_restarts"] = self.restarts
        return merged

    async def sessions(self) -> list[dict[str, Any]]:
        workers = [w for w in self.workers if w.ready]
        answers = await self._ask_all(workers, "sessions")
        found: list[dict[str, Any]] = []
        for worker, answer in zip(workers, answers, strict=True):
            if isinstance(answer, list):
                found += [{**session, "worker": worker.pid} for session in answer]
        return found

    async def disconnect(self, session_id: str) -> dict[str, Any]:
        """Close a session of any worker: its id starts with the worker's pid."""
        pid = session_id.partition("-")[0]
        for worker in self.workers:
            if worker.ready and str(worker.pid) == pid:
                result: dict[str, Any] = await self._ask(worker, "disconnect", session_id)
                return result
        raise LookupError(f"no live session {session_id}")

    async def reload(
        self, settings: Settings, interface_addresses: dict[str, list[str]] | None = None
    ) -> dict[str, Any]:
        """Apply new settings in every worker, or nowhere: raises the first error."""
        if interface_addresses is None:
            interface_addresses = self.interface_addresses
        async with self._lock:
            old, old_addresses = self.settings, self.interface_addresses
            settings, opened = self._reserve(settings, interface_addresses)
            workers = [w for w in self.workers if w.ready]
            answers = await self._ask_all(workers, "reload", settings, interface_addresses, timeout=RELOAD_TIMEOUT)
            errors = [a for a in answers if isinstance(a, BaseException)]
            if errors:
                applied = [w for w, a in zip(workers, answers, strict=True) if not isinstance(a, BaseException)]
                late = [w for w, a in zip(workers, answers, strict=True) if isinstance(a, TimeoutError)]
                for worker in late:  # it may apply the new settings yet: the old ones follow on its channel
                    self._tell(worker, "reload", old, old_addresses)
                await self._ask_all(applied, "reload", old, old_addresses, timeout=RELOAD_TIMEOUT)
                for sock in opened.values():
                    sock.close()
                if late:
                    raise ListenError(f"worker {late[0].slot} did not answer the reload within {RELOAD_TIMEOUT:g} s")
                if isinstance(errors[0], (SettingsError, ListenError, OSError)):
                    raise errors[0]
                raise ListenError(f"a worker did not reload: {errors[0] or type(errors[0]).__name__}")
            self._commit(settings, interface_addresses, opened)
        changed = changed_settings(old, settings, old_addresses, interface_addresses)
        if "workers" in changed:
            log.warning("workers: a new number takes effect when osocks restarts")
        listeners = list(dict.fromkeys(listener for a in answers for listener in a["listeners"]))
        return {
            "changed": changed,
            "opened": [_endpoint(address) for address in opened],
            "listeners": listeners,
            "revoked": sum(a.get("revoked", 0) for a in answers),
        }

    def close(self) -> None:
        """Close every worker's channel (each closes its sessions and exits); `closed` is set once all have."""
        if self.stopping:
            return
        self.stopping = True
        if self.checking is not None:
            self.checking.cancel()
        for worker in self.workers:
            if worker.restart is not None:
                worker.restart.cancel()
            if worker.writer is not None and worker.writer.can_write_eof() and not worker.writer.is_closing():
                worker.writer.write_eof()
        self._task(self._finish())

    async def _finish(self) -> None:
        watching = [w.watching for w in self.workers if w.watching is not None]
        if watching:
            await asyncio.wait(watching, timeout=STOP_TIMEOUT)
        for worker in self.workers:
            if worker.watching is not None and not worker.watching.done() and worker.pid is not None:
                log.warning(
                    "worker %d (pid %d) did not stop within %g s: killed", worker.slot, worker.pid, STOP_TIMEOUT
                )
                os.kill(worker.pid, signal.SIGKILL)
                worker.watching.cancel()
        async with self._forking:
            await _in_thread(self.zygote.close)
        for sock in self.reserved.values():
            sock.close()
        self.reserved.clear()
        os.close(self.counters_fd)
        self.closed.set()


async def _in_thread(function: Callable[..., Any], *args: Any) -> Any:
    """function(*args) in the loop's executor.  Cancelled, it still waits for the thread to finish:
    the caller's sockets stay open for as long as the thread may use them."""
    future = asyncio.get_running_loop().run_in_executor(None, function, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await future
        raise


def _doubled(backoff: float) -> float:
    return min(BACKOFF_MAX, max(BACKOFF_FIRST, backoff * 2))


def merge_statuses(statuses: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' statuses as one: numbers summed (in nested dicts too), listeners united, the rest
    from the first worker; the caller puts in the master's own version, pid, uptime and settings."""
    merged: dict[str, Any] = {}
    for status in statuses:
        for key, value in status.items():
            if key == "listeners":
                merged[key] = list(dict.fromkeys([*merged.get(key, []), *value]))
            elif key in NOT_SUMMED or key not in merged:
                merged.setdefault(key, _copy(value))
            else:
                merged[key] = _add(merged[key], value)
    merged.setdefault("listeners", [])
    return merged


def _copy(value: Any) -> Any:
    return {k: _copy(v) for k, v in value.items()} if isinstance(value, dict) else value


def _add(total: Any, value: Any) -> Any:
    if isinstance(total, dict) and isinstance(value, dict):
        for key, item in value.items():
            total[key] = _add(total[key], item) if key in total else _copy(item)
        return total
    if isinstance(total, int | float) and not isinstance(total, bool) and isinstance(value, int | float):
        return total + value
    return total


# -- a worker --------------------------------------------------------------------------------------


def worker_main(fd: int, counters_fd: int, settings: Settings) -> int:
    """A worker, in a process the zygote just forked: serve until the channel fd closes or SIGTERM.
    `settings` are those the zygote was asked to fork it with; they choose the event loop."""
    from .__main__ import new_event_loop

    loop = new_event_loop(settings)
    try:
        return loop.run_until_complete(_work(socket.socket(fileno=fd), counters_fd))
    finally:
        loop.close()


async def _work(channel: socket.socket, counters_fd: int) -> int:
    from .__main__ import setup_logging

    reader, writer = await asyncio.open_unix_connection(sock=channel)
    try:
        seq, _, (settings, interface_addresses, slot) = await _receive(reader)
    except (asyncio.IncompleteReadError, ConnectionError):
        return 1  # the master went away before it said what to do
    setup_logging(settings)
    counters_memory = mmap.mmap(counters_fd, SLOT_BYTES, offset=slot * SLOT_BYTES)
    os.close(counters_fd)
    server = Server(settings, reuse_port=True, counters=Counters(counters_memory))
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, server.close)
    try:
        await server.start(interface_addresses)
    except ListenError as e:
        writer.write(_frame((seq, False, e)))
        await writer.drain()
        return 1
    writer.write(_frame((seq, True, os.getpid())))
    answering = asyncio.ensure_future(_answer(reader, writer, server))
    await server.closed.wait()
    answering.cancel()
    return 0  # the channel closes with the process: to the master, that is this worker's end


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
    """The master's requests, answered in order; when the master closes the channel, stop."""
    try:
        while True:
            seq, op, args = await _receive(reader)
            try:
                if op == "ping":
                    value: Any = None
                elif op == "status":
                    value = server.status()
                elif op == "sessions":
                    value = server.sessions()
                elif op == "reload":
                    value = await server.reload(*args)
                elif op == "disconnect":
                    value = server.disconnect(*args)
                else:
                    raise ValueError(f"unknown request {op!r}")
                writer.write(_frame((seq, True, value)))
            except Exception as e:  # noqa: BLE001 - the master's to report
                if not isinstance(e, (SettingsError, ListenError, OSError, LookupError)):
                    e = RuntimeError(f"{type(e).__name__}: {e}")
                writer.write(_frame((seq, False, e)))
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        server.close()


if __name__ == "__main__":  # a zygote started by exec: see Zygote.exec
    logging.basicConfig(format="osocks: %(levelname)s %(message)s")
    sys.exit(_zygote(socket.socket(fileno=int(sys.argv[1]))))
