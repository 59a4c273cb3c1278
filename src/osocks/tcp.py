"""TCP without the event loop's transports: listeners, outgoing connections and one lean
transport, its sockets watched by an epoll set of osocks' own (a Poller), on either loop.

asyncio's selector transports are general (SSL, buffered protocols, sendfile; a task and
futures to set up each connection) and pure Python, and so is its loop's way to wait for a
socket (a selector key and a Handle for each `add_reader`, Python bookkeeping for each event).
uvloop's are C, but each still costs a handle of libuv, a Python-level registry entry and a
loop turn or two to set up.  Here the loop watches one descriptor, the Poller's epoll set; when
it is readable the Poller calls the transports whose sockets are ready, straight from the
epoll events.  A short session costs less CPU this way on both loops (bench/README.md).

Bytes go through os.read/os.write on the descriptor: the same system calls as recv/send without
their argument parsing, and never after the socket is closed (a transport is closing by then).

The protocols (session, relay) see an `asyncio.Transport`: this one does what they use of it,
with its semantics (`connection_lost` is called soon, not from within `close`/`abort`;
`pause_writing` above 64 KiB buffered, `resume_writing` at 16 KiB).
"""

from __future__ import annotations

import _socket  # the C socket type: socket.socket's Python layer (enum conversions, io refs) costs per call
import asyncio
import errno
import os
import select
import socket
from collections.abc import Callable
from typing import Any

READ_SIZE = 1 << 16
HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024
ACCEPT_RETRY_DELAY = 1.0  # out of fds: asyncio's own pause before accepting again
ACCEPTS_PER_WAKEUP = 64
OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
CONNECTING = {errno.EINPROGRESS, errno.EALREADY}
CONNECTED = {0, errno.EISCONN}
_PEER_SHUT_DOWN = select.EPOLLRDHUP  # the peer's FIN has arrived (behind the data, often)
READABLE = select.EPOLLIN | _PEER_SHUT_DOWN
WRITABLE = select.EPOLLOUT
_TCP, _NODELAY = socket.IPPROTO_TCP, socket.TCP_NODELAY  # set on every socket, as asyncio and uvloop do
EVENTS_PER_TURN = 256  # epoll events handled per turn of the loop; more wait for the next turn


class Poller:
    """An epoll set of transports, polled whenever asyncio's loop finds it readable."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.epoll = select.epoll()
        self.transports: dict[int, Transport | Connecting] = {}  # by fd
        loop.add_reader(self.epoll.fileno(), self._dispatch)

    def watch(self, transport: Transport | Connecting, events: int) -> None:
        """Wait for these events (READABLE | WRITABLE, or 0: none) on the transport's socket."""
        fd = transport._fd
        if not transport._events:
            self.epoll.register(fd, events)
            self.transports[fd] = transport
        elif events:
            self.epoll.modify(fd, events)
        else:
            self.epoll.unregister(fd)
            del self.transports[fd]
        transport._events = events

    def forget(self, transport: Transport) -> None:
        """Stop watching a transport whose socket is closed next, no epoll_ctl(2): closing the
        socket takes it out of the epoll set (its only descriptor: nothing has a duplicate)."""
        del self.transports[transport._fd]
        transport._events = 0

    def _dispatch(self) -> None:
        transports = self.transports
        for fd, events in self.epoll.poll(0, EVENTS_PER_TURN):
            transport = transports.get(fd)
            if transport is None:  # stopped watching since
                continue
            if events & ~WRITABLE and transport._events & READABLE:  # readable, hung up or failed
                transport._read_ready(events)
            if events & ~READABLE and transport._events & WRITABLE:
                transport._write_ready()

    def close(self) -> None:
        if not self.epoll.closed:
            self.loop.remove_reader(self.epoll.fileno())
            self.epoll.close()


class Transport(asyncio.Transport):
    __slots__ = (
        "_loop",
        "_poller",
        "_events",
        "_sock",
        "_fd",
        "_protocol",
        "_peername",
        "_buffer",
        "_reading",
        "_read_eof",
        "_closing",
        "_lost",
        "_eof_asked",
        "_write_paused",
        "_shared",
    )

    def __init__(self, poller: Poller, sock: _socket.socket, protocol: asyncio.Protocol, peername: Any = None) -> None:
        self._loop = poller.loop
        self._poller = poller
        self._events = 0  # what the poller waits for on this socket
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._peername = peername  # what accept() said; asked of the kernel otherwise
        self._buffer: bytes | bytearray = b""  # what the socket did not take yet (a bytearray once there is some)
        self._reading = False
        self._read_eof = False
        self._closing = False  # close() or abort() called: nothing more is read
        self._lost = False  # connection_lost is scheduled
        self._eof_asked = False  # write_eof(): shut down writing once the buffer is sent
        self._write_paused = False
        self._shared = False  # the socket was handed out (get_extra_info): it may have been duplicated

    # -- reading -----------------------------------------------------------

    def _read_ready(self, events: int) -> None:
        try:
            data = os.read(self._fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._force_close(e)
            return
        if data:
            self._protocol.data_received(data)
            if not (events & _PEER_SHUT_DOWN and len(data) < READ_SIZE and self._reading):
                return
            # the FIN had arrived behind what was read, all of it: the end of the stream, no recv() needed
        self._read_eof = True
        self._reading = False
        if not self._protocol.eof_received():
            self.close()
        if self._events & READABLE and not self._lost:  # still open: no more reading a socket at EOF
            self._poller.watch(self, self._events & ~READABLE)

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._poller.watch(self, self._events & ~READABLE)

    def resume_reading(self) -> None:
        if not (self._reading or self._closing or self._read_eof):
            self._reading = True
            self._poller.watch(self, self._events | READABLE)

    def is_reading(self) -> bool:
        return self._reading

    # -- writing -----------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._eof_asked or not data:
            return
        if not self._buffer:
            try:
                sent = os.write(self._fd, data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                self._force_close(e)
                return
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
            self._poller.watch(self, self._events | WRITABLE)
        if self._buffer:
            self._buffer += data
        else:
            self._buffer = bytearray(data)
        if not self._write_paused and len(self._buffer) > HIGH_WATER:
            self._write_paused = True
            self._protocol.pause_writing()

    def _write_ready(self) -> None:
        try:
            sent = os.write(self._fd, self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._force_close(e)
            return
        del self._buffer[:sent]  # type: ignore[union-attr]  # a bytearray: there was something to send
        if self._write_paused and len(self._buffer) <= LOW_WATER:
            self._write_paused = False
            self._protocol.resume_writing()
        if self._buffer:
            return
        if self._closing:
            self._connection_lost_soon(None)
            return
        self._poller.watch(self, self._events & ~WRITABLE)
        if self._eof_asked:
            self._shutdown_writing()

    def write_eof(self) -> None:
        if self._closing or self._eof_asked:
            return
        self._eof_asked = True
        if not self._buffer:
            self._shutdown_writing()

    def _shutdown_writing(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            self._force_close(e)

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    # -- closing -----------------------------------------------------------

    def close(self) -> None:
        """Stop reading; once what is buffered is sent, close the socket."""
        if self._closing:
            return
        self._closing = True
        if self._buffer:
            self.pause_reading()
        else:
            self._connection_lost_soon(None)

    def abort(self) -> None:
        self._force_close(None)

    def _force_close(self, error: Exception | None) -> None:
        if self._lost:
            return
        self._buffer = b""
        self._closing = True
        self._connection_lost_soon(error)

    def _connection_lost_soon(self, error: Exception | None) -> None:
        self._lost = True
        self._reading = False
        if self._shared and self._events:
            self._poller.watch(self, 0)
        elif self._events:
            self._poller.forget(self)
        self._loop.call_soon(self._connection_lost, error)

    def _connection_lost(self, error: Exception | None) -> None:
        try:
            self._protocol.connection_lost(error)
        finally:
            self._sock.close()
            self._protocol = None  # type: ignore[assignment]  # no reference cycle left behind

    def is_closing(self) -> bool:
        return self._closing

    # -- the rest of the Transport API the protocols use ---------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        try:
            if name == "peername":
                if self._peername is None:
                    self._peername = self._sock.getpeername()
                return self._peername
            if name == "sockname":
                return self._sock.getsockname()
        except OSError:
            return default
        if name == "socket":
            self._shared = True
            return self._sock
        return default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol


class Listener:
    """A listening socket: each connection gets a protocol from protocol_factory and a Transport,
    reading at once.  What `create_server` returns, as far as the server uses it.  on_starved is
    called when accept() fails for want of descriptors (accepting then pauses for a while)."""

    def __init__(
        self,
        poller: Poller,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        backlog: int,
        on_starved: Callable[[], None] | None = None,
    ) -> None:
        self.poller = poller
        self.loop = loop = poller.loop
        self.sockets = [sock]
        self.protocol_factory = protocol_factory
        self.on_starved = on_starved
        self._retry: asyncio.TimerHandle | None = None
        sock.setsockopt(_TCP, _NODELAY, 1)  # Linux gives it to every accepted socket: no setsockopt each
        sock.listen(backlog)
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        listening = self.sockets[0]
        family = listening.family
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                fd, peername = listening._accept()  # type: ignore[attr-defined]  # the C accept: a descriptor
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:
                if e.errno in OUT_OF_RESOURCES:  # wait, rather than spin on a listener that stays readable
                    if self.on_starved is not None:
                        self.on_starved()
                    self.loop.remove_reader(listening.fileno())
                    self._retry = self.loop.call_later(ACCEPT_RETRY_DELAY, self._resume)
                    return
                raise
            try:
                sock = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
            except OSError:
                os.close(fd)
                continue
            sock.setblocking(False)
            protocol = self.protocol_factory()
            transport = Transport(self.poller, sock, protocol, peername)
            protocol.connection_made(transport)
            transport.resume_reading()

    def _resume(self) -> None:
        self._retry = None
        self.loop.add_reader(self.sockets[0].fileno(), self._accept)

    def close(self) -> None:
        if not self.sockets:
            return
        if self._retry is not None:
            self._retry.cancel()
        else:
            self.loop.remove_reader(self.sockets[0].fileno())
        self.sockets.pop().close()


def connect(
    poller: Poller,
    protocol: asyncio.Protocol,
    family: int,
    host: str,
    port: int,
    local_addr: tuple[str, int] | None = None,
) -> Transport | Connecting:
    """Connect to (host, port), an IP address.  Connected at once (on loopback often): the transport,
    whose protocol has had connection_made and reads once asked to (resume_reading).  Else the
    Connecting, whose on_done gets the transport or the error.  OSError if it fails at once."""
    sock = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        sock.setsockopt(_TCP, _NODELAY, 1)
        if local_addr is not None:
            sock.bind(local_addr)
        address = (host, port)
        error = sock.connect_ex(address)
        if error in CONNECTING:
            error = sock.connect_ex(address)  # on loopback the handshake is often over already
            if error in CONNECTING:
                return Connecting(poller, sock, protocol)
        if error not in CONNECTED:
            raise OSError(error, os.strerror(error))
    except BaseException:
        sock.close()
        raise
    return _connected(poller, sock, protocol)


def _connected(poller: Poller, sock: _socket.socket, protocol: asyncio.Protocol) -> Transport:
    transport = Transport(poller, sock, protocol)
    protocol.connection_made(transport)
    return transport


class Connecting:
    """An outgoing connection under way: the poller waits for its socket to be writable, then
    on_done gets the connected transport or the error.  cancel() gives up (closes the socket)."""

    __slots__ = ("_poller", "_sock", "_fd", "_events", "_protocol", "on_done")

    def __init__(self, poller: Poller, sock: _socket.socket, protocol: asyncio.Protocol) -> None:
        self._poller = poller
        self._sock = sock
        self._fd = sock.fileno()
        self._events = 0
        self._protocol = protocol
        self.on_done: Callable[[Transport | OSError], None] = _unused
        poller.watch(self, WRITABLE)

    def _read_ready(self, events: int) -> None:  # never watched for
        pass

    def _write_ready(self) -> None:  # connected, or failed
        self._poller.watch(self, 0)
        error = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._sock.close()
            self.on_done(OSError(error, os.strerror(error)))
        else:
            self.on_done(_connected(self._poller, self._sock, self._protocol))

    def cancel(self) -> None:
        if self._events:
            self._poller.watch(self, 0)
        self._sock.close()


def _unused(result: Transport | OSError) -> None:
    pass
