"""One client: negotiates the method, authenticates, runs the command, replies,
then hands both sockets to the relay.

The handshake is driven by `data_received` on a plain protocol (no task, no
stream); only the command itself (resolving, connecting) runs as a task.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from . import netinfo, relay, socks5, tcp
from .bind import bind
from .socks5 import Command, Method, ProtocolError, ReplyCode
from .udp import Association, associate

if TYPE_CHECKING:
    from .server import Server
    from .settings import User

log = logging.getLogger("osocks")

GREETING, AUTH, CHECKING, REQUEST, COMMAND, RELAY, CLOSED = range(7)
STATE_NAMES = ("greeting", "auth", "checking", "request", "command", "relay", "closed")
MAX_EARLY_DATA = 64 * 1024  # client bytes held while the command runs


class Session(asyncio.Protocol):
    __slots__ = (
        "server",
        "settings",
        "transport",
        "state",
        "buffer",
        "_client",
        "destination",
        "started",
        "active",
        "seen_bytes",
        "outcome",
        "client_end",
        "upstream_end",
        "task",
        "connecting",
        "user",
        "login",
        "principal",
        "udp",
        "client_eof",
        "command",
        "number",
        "reached",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.settings = server.settings  # a reload applies to new sessions only
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.state = GREETING
        self.buffer = b""
        self._client: tuple | None = None  # the client's address, asked for when first needed
        self.destination: tuple[str, int] | None = None  # what the request named (host, port)
        self.started = self.active = time.monotonic()
        self.seen_bytes = 0
        self.outcome = ""
        self.client_end: relay.RelayEnd | None = None
        self.upstream_end: relay.RelayEnd | None = None
        self.task: asyncio.Task | None = None
        self.connecting: tcp.Connecting | None = None  # CONNECT's connection under way
        self.user = ""
        self.login: User | None = None  # the configured user this client logged in as
        self.principal = ""  # the Kerberos principal this client authenticated as (GSSAPI)
        self.udp: Association | None = None
        self.client_eof = False
        self.command = 0
        self.number = 0  # given by the server when it admits the session (status shows its id)
        self.reached = ""  # the address a name led to (CONNECT), or BIND's peer: for the log

    @property
    def target(self) -> str:
        """The destination as the log and status show it: 'example.org:443', '[2001:db8::1]:80'."""
        return _endpoint(self.destination) if self.destination is not None else ""

    @property
    def client(self) -> tuple:
        """The client's address: asked of the transport only when something needs it (rules, the
        log, status), which saves a getpeername(2) per session where nothing does."""
        if self._client is None:
            peer = self.transport.get_extra_info("peername") if self.transport is not None else None
            self._client = peer or ("?", 0)
        return self._client

    # -- handshake ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.server.admit(self):
            self.state = CLOSED
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.state >= RELAY:  # a UDP control connection carries nothing more
            return
        self.buffer = self.buffer + data if self.buffer else data
        try:
            self._advance()
        except ProtocolError as e:
            self.fail(e.reply, str(e))
        except Exception as e:  # the handshake's bug, or a command's started here (CONNECT to an address)
            self._command_failed(e)

    def _advance(self) -> None:
        while self.buffer:
            state = self.state
            if state == GREETING:
                parsed = socks5.parse_greeting(self.buffer)
                if parsed is None:
                    return
                greeting, used = parsed
                self.buffer = self.buffer[used:]
                self._choose_method(greeting.methods)
            elif state == AUTH:
                creds = socks5.parse_credentials(self.buffer)
                if creds is None:
                    return
                credentials, used = creds
                self.buffer = self.buffer[used:]
                self._authenticate(credentials)
            elif state == REQUEST:
                request = socks5.parse_request(self.buffer)
                if request is None:
                    return
                req, used = request
                self.buffer = self.buffer[used:]
                self._run(req)
            elif state in (CHECKING, COMMAND):
                if len(self.buffer) > MAX_EARLY_DATA:
                    self.transport.pause_reading()
                return
            else:
                return

    def _choose_method(self, methods: bytes) -> None:
        settings = self.settings
        if settings.gssapi_keytab and Method.GSSAPI in methods:
            self._start_gssapi()
            return
        if (settings.users or settings.gssapi_keytab) and not self._anonymous_client():
            if settings.users and Method.USERNAME_PASSWORD in methods:
                self.transport.write(socks5.select_method(Method.USERNAME_PASSWORD))
                self.state = AUTH
                return
        elif Method.NO_AUTH in methods:
            self.transport.write(socks5.select_method(Method.NO_AUTH))
            self.state = REQUEST
            return
        self.transport.write(socks5.select_method(Method.NO_ACCEPTABLE))
        self.finish("no acceptable method")

    def _anonymous_client(self) -> bool:
        if not self.settings.anonymous:
            return False
        address = netinfo.plain_address(self.client[0])
        return any(address in net for net in self.settings.anonymous)

    def _start_gssapi(self) -> None:
        from . import gss  # python-gssapi only where a keytab is configured

        try:
            acceptor = gss.acceptor(self.settings)
        except gss.GssUnavailable as e:
            log.error("GSSAPI: %s", e)
            self.transport.write(socks5.select_method(Method.NO_ACCEPTABLE))
            self.finish("GSSAPI unavailable")
            return
        self.transport.write(socks5.select_method(Method.GSSAPI))
        self.state = AUTH
        early, self.buffer = self.buffer, b""
        gss.Handshake(self, acceptor, early)  # has the transport until it calls authenticated() or auth_failed()

    def authenticated(self, user: str, transport: asyncio.Transport, rest: bytes, can_splice: bool = True) -> None:
        """GSSAPI is done: `transport` (the client's, or a gss.Channel protecting it) carries the request."""
        self.user = self.principal = user
        self.transport = transport
        if not can_splice:
            self.settings = self.settings.replace(splice=False)
        self.state = REQUEST
        transport.set_protocol(self)
        if rest:
            self.data_received(rest)

    def auth_failed(self, user: str, why: str = "") -> None:
        self.server.counters.auth_failures += 1
        who = f" for user {user!r}" if user or not why else ""
        log.warning("client %s: authentication failed%s%s", _endpoint(self.client), who, f": {why}" if why else "")
        self.finish("authentication failed")

    def _authenticate(self, credentials: socks5.Credentials) -> None:
        from . import auth  # hashlib and hmac only where there are users to check

        users = self.settings.users
        verdict = auth.quick_check(users, credentials.username, credentials.password)
        if verdict is not None:
            self._authenticated(credentials.username, verdict)
            return
        self.state = CHECKING  # a password hash to compute (a dummy one for a failure): off the event loop
        future = asyncio.get_running_loop().run_in_executor(
            None, auth.check_password, users, credentials.username, credentials.password
        )
        future.add_done_callback(lambda f: self._hash_checked(credentials.username, f))

    def _hash_checked(self, username: bytes, future: asyncio.Future) -> None:
        if self.state != CHECKING:
            return
        ok = not future.cancelled() and future.exception() is None and future.result()
        self._authenticated(username, ok)
        if self.state == REQUEST:
            self.transport.resume_reading()
            try:
                self._advance()
            except ProtocolError as e:
                self.fail(e.reply, str(e))

    def _authenticated(self, username: bytes, ok: bool) -> None:
        name = username.decode("utf-8", "replace")
        if ok:
            login = next(user for user in self.settings.users if user.name.encode() == username)
            ok = self.settings is self.server.settings or self.server.login_allowed(login)  # a reload since?
        if ok:
            self.user = name
            self.login = login
            self.transport.write(socks5.auth_reply(True))
            self.state = REQUEST
            return
        self.transport.write(socks5.auth_reply(False))
        self.auth_failed(name)

    def _run(self, request: socks5.Request) -> None:
        self.destination = (request.host, request.port)
        self.command = request.command
        if request.command not in (Command.CONNECT, Command.BIND, Command.UDP_ASSOCIATE):
            self.state = COMMAND  # so that fail() replies
            self.fail(ReplyCode.COMMAND_NOT_SUPPORTED, f"unknown command {request.command:#04x}")
            return
        self.state = COMMAND
        self.active = time.monotonic()  # the server's sweep enforces the connect timeout from here
        if request.command == Command.CONNECT:
            if request.port == 0:
                raise ProtocolError("destination port 0", ReplyCode.GENERAL_FAILURE)
            family = _FAMILIES.get(request.address_type, 0)
            addresses = self.server.literal_address(request.host, request.port, family)
            if addresses is not None:  # an IP address: connect now, no task
                self._dial(iter(addresses), named=False)
                return
        self.task = self.server.loop.create_task(self._command(request))

    async def _command(self, request: socks5.Request) -> None:
        """Run the command (CONNECT: resolve the name first); any failure becomes its reply code."""
        try:
            if request.command == Command.CONNECT:
                addresses = await self.server.resolve(request.host, request.port)
                self.task = None
                self._dial(iter(addresses), named=True)
            elif request.command == Command.BIND:
                await bind(self, request)
            else:
                await associate(self, request)
        except Exception as e:
            self._command_failed(e)

    def _command_failed(self, error: BaseException) -> None:
        """A failed command's reply: the code its error tells; a bug is logged once, with its traceback."""
        if isinstance(error, ProtocolError):
            self.fail(error.reply, str(error))
        elif isinstance(error, OSError):  # what a destination or the resolver can cause; timeouts included
            self.fail(socks5.reply_for_error(error), _describe(error))
        else:
            what = self.command_name() if self.command else "the handshake"  # no request read yet
            log.error("client %s: %s failed on an internal error", _endpoint(self.client), what, exc_info=error)
            self.fail(ReplyCode.GENERAL_FAILURE, "internal error")

    # -- CONNECT -----------------------------------------------------------

    def _dial(self, addresses: Iterator[tuple[int, tuple]], named: bool, error: BaseException | None = None) -> None:
        """Connect to the destination's next address; once none is left, the last error tells the reply.
        A connection under way (tcp.Connecting) comes back to _dialed."""
        server = self.server
        for family, sockaddr in addresses:
            host, port = sockaddr[0], sockaddr[1]
            refused = server.destination_refused(host, port)
            if refused is not None:
                error = ProtocolError(f"destination {_endpoint(sockaddr)} {refused}", ReplyCode.NOT_ALLOWED)
                continue
            upstream = relay.RelayEnd()
            try:
                connection = server.connect(upstream, family, host, port)
            except OSError as e:
                error = e
                continue
            if isinstance(connection, tcp.Connecting):
                connection.on_done = functools.partial(self._dialed, upstream, host, addresses, named)
                self.connecting = connection
                return
            self._reached(connection, upstream, host, named)
            return
        self._command_failed(error or OSError("no address to connect to"))

    def _dialed(
        self,
        upstream: relay.RelayEnd,
        host: str,
        addresses: Iterator[tuple[int, tuple]],
        named: bool,
        result: tcp.Transport | OSError,
    ) -> None:
        self.connecting = None
        try:
            if isinstance(result, OSError):
                self._dial(addresses, named, result)
            else:
                self._reached(result, upstream, host, named)
        except Exception as e:
            self._command_failed(e)

    def _reached(self, transport: tcp.Transport, upstream: relay.RelayEnd, host: str, named: bool) -> None:
        if named:
            self.reached = host
        self.succeed(transport, upstream)

    def succeed(
        self, upstream_transport: asyncio.Transport, upstream: relay.RelayEnd, bound: tuple | None = None
    ) -> None:
        """Send the success reply (BND = `bound`, or the outgoing socket's own address) and relay."""
        if self.state != COMMAND:  # the client went away meanwhile
            upstream_transport.abort()
            return
        self.task = None
        bound = bound or upstream_transport.get_extra_info("sockname")
        self.transport.write(socks5.encode_reply(ReplyCode.SUCCEEDED, bound[0], bound[1]))
        self.server.counters.replied(ReplyCode.SUCCEEDED)
        client = relay.RelayEnd()
        relay.link(client, upstream)
        client.on_closed = upstream.on_closed = self._relay_closed
        self.client_end, self.upstream_end = client, upstream
        self.state = RELAY
        self.active = time.monotonic()
        early, self.buffer = self.buffer, b""
        relay.start(client, upstream, self.transport, early, self.client_eof, self.settings.splice)

    def start_udp(self, host: str, port: int) -> None:
        """UDP ASSOCIATE is set up: reply; the control connection now only keeps it alive."""
        if self.state != COMMAND:
            return
        self.task = None
        self.transport.write(socks5.encode_reply(ReplyCode.SUCCEEDED, host, port))
        self.server.counters.replied(ReplyCode.SUCCEEDED)
        self.state = RELAY
        self.buffer = b""

    def command_name(self) -> str:
        return _COMMAND_NAMES.get(self.command) or f"command {self.command:#04x}"

    def local_host(self) -> str:
        """The address the client reached us on (asked only by BIND and UDP ASSOCIATE)."""
        return str(self.transport.get_extra_info("sockname")[0])

    def _relay_closed(self) -> None:
        self.finish(self.outcome or "closed")

    # -- ends --------------------------------------------------------------

    def fail(self, reply: ReplyCode | None, why: str) -> None:
        """Send the failure reply (if any), then close."""
        if self.state == CLOSED:
            return
        if reply is not None and self.state in (REQUEST, COMMAND):
            self.transport.write(socks5.encode_reply(reply))
            self.server.counters.replied(reply)
        self.finish(f"{why} (reply {reply.name.lower()})" if reply is not None else why)

    def finish(self, outcome: str) -> None:
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self.outcome = outcome
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        if self.udp is not None:
            self.udp.close()
        if self.client_end is None:
            self.transport.close()
        self.server.session_finished(self)
        # no reference cycles left behind: reference counting frees the session, no GC pass needed
        self.transport = self.client_end = self.upstream_end = self.udp = None  # type: ignore[assignment]

    def abort(self, outcome: str) -> None:
        """Close at once (timeouts, shutdown): nothing left to flush matters."""
        if self.state == CLOSED:
            return
        self.outcome = self.outcome or outcome
        if self.client_end is not None and self.upstream_end is not None:
            relay.abort(self.client_end, self.upstream_end)
        else:
            self.transport.abort()
        self.finish(self.outcome)

    def eof_received(self) -> bool:
        if self.state != COMMAND or self.command != Command.CONNECT:
            self.finish("client closed" if self.state >= COMMAND else "client closed during handshake")
        self.client_eof = True
        return True  # a client that half-closes while CONNECT runs still gets its reply

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state != CLOSED:
            self.finish("client went away" if exc is None else f"client error: {_describe(exc)}")

    # -- accounting --------------------------------------------------------

    def bytes_moved(self) -> tuple[int, int]:
        """(client → destination, destination → client)"""
        if self.udp is not None:
            return self.udp.up, self.udp.down
        if self.client_end is None or self.upstream_end is None:
            return 0, 0
        return self.client_end.received, self.upstream_end.received

    def describe(self) -> dict:
        up, down = self.bytes_moved()
        return {
            "id": self.server.session_id(self),
            "client": _endpoint(self.client),
            "destination": self.target,
            "user": self.user,
            "state": STATE_NAMES[self.state],
            "bytes_up": up,
            "bytes_down": down,
            "age": round(time.monotonic() - self.started, 3),
        }


_FAMILIES: dict[int, int] = {socks5.AddressType.IPV4: socket.AF_INET, socks5.AddressType.IPV6: socket.AF_INET6}
_COMMAND_NAMES: dict[int, str] = {Command.CONNECT: "CONNECT", Command.BIND: "BIND", Command.UDP_ASSOCIATE: "UDP"}


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _endpoint(address: tuple) -> str:
    return f"{_host(str(address[0]))}:{address[1]}"


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
