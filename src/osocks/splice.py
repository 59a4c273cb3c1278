"""Zero-copy relay for one direction of a tunnel: splice(2) through a pipe.

A direction that moves bulk data switches from the copying relay (Python
`data_received` → `transport.write`) to the kernel: socket → pipe → socket,
driven by the event loop's reader/writer callbacks on duplicates of the two
sockets' descriptors (the transports keep theirs).  The source transport stops
reading; the destination transport is idle for this direction, so the switch
happens only when its write buffer is empty (byte order is kept).

Back-pressure: at most one pipe (64 KiB) is in flight; when the destination
cannot take more, the source is no longer read until the pipe drains.
Fairness: one splice in and one drain per readiness event, of a size that
shrinks as more directions splice at once (TURN_BUDGET), so that a turn of
the event loop stays short; and that work runs after the turn's other I/O
callbacks, so a small exchange is not kept waiting behind it.  Half-close and
resets behave as in the copying relay: source EOF becomes `write_eof` on the
destination once the pipe is empty; an error aborts both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .relay import RelayEnd

AVAILABLE = hasattr(os, "splice")
PIPE_SIZE = 1 << 20  # F_SETPIPE_SZ: fewer, larger splices (kernel memory, only while in use)
TURN_BUDGET = 1 << 20  # bytes all splicers together move per turn of the event loop
MIN_CHUNK = 1 << 16
_active = 0  # splicers open in this process


def chunk_size() -> int:
    """One splice per readiness event, sized so that a turn of the loop stays short (fairness)."""
    return max(MIN_CHUNK, min(PIPE_SIZE, TURN_BUDGET // max(1, _active)))


SPLICE_AFTER = 1 << 20  # bytes a direction carries before it is worth a pipe
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


class Splicer:
    __slots__ = ("end", "loop", "src", "dst", "pipe_r", "pipe_w", "pending", "source_done", "watching", "queued")

    def __init__(self, end: RelayEnd, loop: asyncio.AbstractEventLoop) -> None:
        self.end = end
        self.loop = loop
        self.src = os.dup(end.transport.get_extra_info("socket").fileno())
        try:
            self.dst = os.dup(end.peer.transport.get_extra_info("socket").fileno())
        except BaseException:
            os.close(self.src)
            raise
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # else the default 64 KiB
            fcntl.fcntl(self.pipe_w, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
        self.pending = 0  # bytes in the pipe
        self.source_done = False
        self.watching = ""  # "read" (the source) or "write" (the destination)
        self.queued = False
        self._watch("read")
        global _active
        _active += 1

    def _watch(self, what: str) -> None:
        if self.watching == "read":
            self.loop.remove_reader(self.src)
        elif self.watching == "write":
            self.loop.remove_writer(self.dst)
        if what == "read":
            self.loop.add_reader(self.src, self._readable)
        elif what == "write":
            self.loop.add_writer(self.dst, self._writable)
        self.watching = what

    def _readable(self) -> None:
        # Splice after this turn's other I/O callbacks: a small exchange that is ready now
        # is relayed before the bulk work, not behind up to TURN_BUDGET of it.
        if not self.queued:
            self.queued = True
            self.loop.call_soon(self._splice_in)

    def _splice_in(self) -> None:
        self.queued = False
        if self.watching != "read":  # closed, or waiting for the destination, meanwhile
            return
        try:
            moved = os.splice(self.src, self.pipe_w, chunk_size(), flags=_FLAGS)
        except BlockingIOError:
            return
        except OSError as e:
            self._fail(e)
            return
        if moved == 0:
            self.source_done = True
        else:
            self.end.received += moved
            self.pending += moved
        self._drain()

    def _writable(self) -> None:
        self._drain()

    def _drain(self) -> None:
        while self.pending:
            try:
                self.pending -= os.splice(self.pipe_r, self.dst, self.pending, flags=_FLAGS)
            except BlockingIOError:
                if self.watching != "write":
                    self._watch("write")
                return
            except OSError as e:
                self._fail(e)
                return
        if self.source_done:
            self._watch("")
            self.end.eof_received()  # the pipe is empty: now the EOF may follow
        elif self.watching != "read":
            self._watch("read")

    def _fail(self, error: OSError) -> None:
        self._watch("")
        if error.errno == errno.EINVAL:  # these sockets cannot splice: copy, as before
            self._fall_back()
            return
        end = self.end
        for side in (end, end.peer):
            if side is not None and side.transport is not None and not side.lost:
                side.transport.abort()

    def _fall_back(self) -> None:
        end = self.end
        held = b""
        while self.pending:
            chunk = os.read(self.pipe_r, self.pending)
            held += chunk
            self.pending -= len(chunk)
        self.close()
        end.splicer = None
        if held:
            end.peer.transport.write(held)
        if self.source_done:
            end.eof_received()
        else:
            end.transport.resume_reading()

    def close(self) -> None:
        if self.src < 0:
            return
        self._watch("")
        for fd in (self.src, self.dst, self.pipe_r, self.pipe_w):
            os.close(fd)
        self.src = -1
        global _active
        _active -= 1


def try_start(end: RelayEnd) -> bool:
    """Switch `end`'s direction to splice, if its destination has nothing buffered."""
    peer = end.peer
    if peer.transport.get_write_buffer_size() or peer.lost or end.eof:
        return False
    try:
        splicer = Splicer(end, asyncio.get_running_loop())
    except OSError:  # out of descriptors, or no such socket: keep copying
        end.splice_after = 0
        return False
    end.transport.pause_reading()
    end.splicer = splicer
    end.splice_after = 0
    return True
