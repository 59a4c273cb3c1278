"""GSSAPI authentication (RFC 1961) for one session, over python-gssapi (imported only here, lazily).

After the greeting picks method 0x01 the session hands its transport to a `Handshake`:

    client  [1][1][len][token] ...        context establishment: each token goes to the acceptor
    server  [1][1][len][token] ...        (in a thread: it reads the keytab and the replay cache)
    client  [1][2][len][wrap(level)]      protection level asked for: 0 none, 1 integrity, 2 confidentiality
    server  [1][2][len][wrap(level)]      the level granted, within --gssapi-min/max-protection
    either  [1][0xFF]                     giving up; the server then closes

With level 1 or 2 every later byte both ways, the SOCKS request and reply and the relayed data,
travels as `[1][3][len][wrap(data)]`: a `Channel` stands between the session (then the relay) and
the client's transport, and UDP datagrams are wrapped the same way (`seal`, `unseal`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from . import socks5
from .settings import principal_allowed
from .socks5 import GSS_ABORT, GssMessage, Protection, ProtocolError

if TYPE_CHECKING:
    from .session import Session
    from .settings import Settings

log = logging.getLogger("osocks")

MAX_BUFFERED = 2 * (4 + socks5.MAX_GSS_TOKEN)  # client bytes held during the handshake
LEVELS = {"none": Protection.NONE, "integrity": Protection.INTEGRITY, "confidentiality": Protection.CONFIDENTIALITY}
INSTALL_HINT = "python-gssapi is not installed (pip install 'osocks[gssapi]'; on OpenWrt: python3-gssapi)"


class GssUnavailable(Exception):
    """python-gssapi is missing, or the keytab has no key for the service: one line for the user."""


def _raw() -> Any:
    try:
        import gssapi.raw
    except ImportError as e:
        raise GssUnavailable(f"{INSTALL_HINT}: {e}") from None
    return gssapi.raw


class Acceptor:
    """The server's credentials (keytab and service) and its policy (protection bounds, allow-list)."""

    def __init__(self, settings: Settings) -> None:
        raw = self.raw = _raw()
        keytab, service = settings.gssapi_keytab or "", settings.gssapi_service
        try:
            # a host-based name without a host: any service/<host> key of the keytab
            name = raw.import_name(service.encode(), raw.NameType.hostbased_service)
            self.creds = raw.acquire_cred_from({b"keytab": keytab.encode()}, name=name, usage="accept").creds
        except raw.GSSError as e:
            raise GssUnavailable(f"keytab {keytab!r}, service {service!r}: {_gss_message(e)}") from None
        self.minimum = LEVELS[settings.gssapi_min_protection]
        self.maximum = LEVELS[settings.gssapi_max_protection]
        self.principals = frozenset(settings.gssapi_principals)

    def step(self, context: Any, token: bytes) -> tuple[Any, bytes | None, str | None, int, float]:
        """One accept_sec_context call (run in a thread): (context, token to send, principal when
        complete, flags, seconds it took).  Raises GSSError: the raw call raises, unlike
        SecurityContext.step(), which by default returns the Kerberos error token as if all were well."""
        started = time.perf_counter()
        result = self.raw.accept_sec_context(token, acceptor_creds=self.creds, context=context)
        principal = None
        if not result.more_steps:
            principal = self.raw.display_name(result.initiator_name).name.decode("utf-8", "replace")
        return result.context, result.token, principal, int(result.flags), time.perf_counter() - started

    def allows(self, principal: str) -> bool:
        return principal_allowed(self.principals, principal)

    def grant(self, asked: int, flags: int) -> Protection | None:
        """The level to answer, or None to refuse: below the minimum, or not a level at all."""
        if asked > Protection.SELECTIVE:
            return None
        level = min(Protection(asked), Protection.CONFIDENTIALITY, self.maximum)
        RF = self.raw.RequirementFlag
        if level == Protection.CONFIDENTIALITY and not flags & RF.confidentiality:
            level = Protection.INTEGRITY
        if level == Protection.INTEGRITY and not flags & RF.integrity:
            level = Protection.NONE
        return level if level >= self.minimum and asked >= self.minimum else None


_acceptors: dict[tuple, Acceptor] = {}


def acceptor(settings: Settings) -> Acceptor:
    """The Acceptor for these settings, made once per process (GssUnavailable when it cannot be)."""
    key = (
        settings.gssapi_keytab,
        settings.gssapi_service,
        settings.gssapi_min_protection,
        settings.gssapi_max_protection,
        settings.gssapi_principals,
    )
    found = _acceptors.get(key)
    if found is None:
        found = _acceptors[key] = Acceptor(settings)
    return found


def _gss_message(error: BaseException) -> str:
    """A GSSError in one line: its own messages, without the "see the minor code" filler."""
    statuses = getattr(error, "get_all_statuses", None)
    if statuses is None:
        return str(error)
    try:
        messages = [*statuses(error.maj_code, True), *statuses(error.min_code, False)]  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - only for the log line
        return str(error)
    wanted = [m for m in dict.fromkeys(messages) if m and not m.startswith(("Unspecified GSS", "Success", "Unknown"))]
    return "; ".join(wanted) or str(error)


class Handshake(asyncio.Protocol):
    """RFC 1961 §3-4 for one session: owns the client's transport until the protection level is agreed."""

    def __init__(self, session: Session, acceptor: Acceptor, early: bytes) -> None:
        self.session = session
        self.acceptor = acceptor
        self.transport: asyncio.Transport = session.transport
        self.buffer = early
        self.context: Any = None
        self.flags = 0
        self.principal: str | None = None
        self.stepping = False
        self.done = False  # the session has the transport back
        self.transport.set_protocol(self)
        self._advance()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > MAX_BUFFERED:
            self.transport.pause_reading()
        self._advance()

    def eof_received(self) -> bool | None:
        return self.session.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.connection_lost(exc)

    def _advance(self) -> None:
        while not (self.stepping or self.done or self.session.transport is None):  # None: the session closed
            try:
                parsed = socks5.parse_gss_frame(self.buffer)
            except ProtocolError as e:
                self._fail(str(e))
                return
            if parsed is None:
                return
            frame, used = parsed
            self.buffer = self.buffer[used:]
            if frame.kind == GssMessage.ABORT:
                self.session.finish("client gave up GSSAPI authentication")
            elif frame.kind == GssMessage.CONTEXT and self.principal is None:
                self._step(frame.token)
            elif frame.kind == GssMessage.PROTECTION and self.principal is not None:
                self._negotiate(frame.token)
            else:
                self._fail(f"unexpected GSSAPI message type {frame.kind:#04x}")

    def _step(self, token: bytes) -> None:
        self.stepping = True
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, self.acceptor.step, self.context, token)
        future.add_done_callback(self._stepped)

    def _stepped(self, future: asyncio.Future) -> None:
        self.stepping = False
        if self.session.transport is None or future.cancelled():
            return
        error = future.exception()
        if error is not None:
            self._fail(_gss_message(error))
            return
        self.context, token, principal, self.flags, seconds = future.result()
        log.debug("client %s: GSSAPI acceptor step took %.2f ms", self.session.client[0], seconds * 1000)
        if principal is not None:
            if not self.acceptor.allows(principal):
                self._fail("not in the allowed principals", principal)
                return
            self.principal = principal
        if token:
            self.transport.write(socks5.encode_gss_frame(GssMessage.CONTEXT, token))
        self.transport.resume_reading()
        self._advance()

    def _negotiate(self, token: bytes) -> None:
        raw = self.acceptor.raw
        try:
            asked = raw.unwrap(self.context, token).message
        except raw.GSSError as e:
            self._fail(f"protection level message: {_gss_message(e)}", self.principal)
            return
        if len(asked) != 1:
            self._fail(f"protection level message of {len(asked)} bytes", self.principal)
            return
        session, principal = self.session, self.principal or ""
        if session.settings is not session.server.settings and not session.server.principal_allowed(principal):
            self._fail("no longer in the allowed principals (a reload)", principal)  # since the context was made
            return
        level = self.acceptor.grant(asked[0], self.flags)
        if level is None:
            self._fail(f"protection level {asked[0]} refused (minimum {self.acceptor.minimum.name.lower()})")
            return
        answer = raw.wrap(self.context, bytes((level,)), confidential=False).message
        self.transport.write(socks5.encode_gss_frame(GssMessage.PROTECTION, answer))
        rest, self.buffer = self.buffer, b""
        self.done = True
        if level == Protection.NONE:
            session.authenticated(principal, self.transport, rest)
            return
        channel = Channel(self.transport, raw, self.context, level, session)
        session.authenticated(principal, channel, b"", can_splice=False)
        if rest:
            channel.data_received(rest)

    def _fail(self, why: str, principal: str | None = None) -> None:
        if self.session.transport is None:
            return
        self.done = True
        self.transport.write(GSS_ABORT)
        self.session.auth_failed(principal or self.principal or "", f"GSSAPI: {why}")


class Channel(asyncio.Transport, asyncio.Protocol):
    """RFC 1961 §5 per-message protection: to the session and the relay a transport that takes and
    gives plain bytes; to the client's transport the protocol that reads `[1][3][len][wrap(data)]`."""

    def __init__(
        self, transport: asyncio.Transport, raw: Any, context: Any, level: Protection, session: Session
    ) -> None:
        super().__init__()
        self.transport = transport
        self.raw = raw
        self.context = context
        self.confidential = level == Protection.CONFIDENTIALITY
        self.protocol: asyncio.BaseProtocol = session
        self.session = session
        self.buffer = b""
        # the most plain bytes whose wrapping fits one message (LEN is two bytes)
        self.chunk = raw.wrap_size_limit(context, socks5.MAX_GSS_TOKEN, confidential=self.confidential)
        transport.set_protocol(self)

    # -- the transport of the session, then of the relay -------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        wrap, context, confidential, chunk = self.raw.wrap, self.context, self.confidential, self.chunk
        frames = []
        view = memoryview(data)
        for start in range(0, len(view), chunk):
            token = wrap(context, bytes(view[start : start + chunk]), confidential=confidential).message
            frames.append(bytes((1, GssMessage.ENCAPSULATED)) + len(token).to_bytes(2, "big") + token)
        self.transport.write(b"".join(frames))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        self.transport.write_eof()

    def can_write_eof(self) -> bool:
        return self.transport.can_write_eof()

    def close(self) -> None:
        self.transport.close()

    def abort(self) -> None:
        self.transport.abort()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def is_reading(self) -> bool:
        return self.transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.transport.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.transport.get_write_buffer_limits()

    # -- the protocol of the client's transport ----------------------------

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        plain = []
        unwrap, context = self.raw.unwrap, self.context
        while buffer:
            try:
                parsed = socks5.parse_gss_frame(buffer)
            except ProtocolError as e:
                self._broken(str(e))
                return
            if parsed is None:
                break
            frame, used = parsed
            buffer = buffer[used:]
            if frame.kind != GssMessage.ENCAPSULATED:
                self._broken("client gave up" if frame.kind == GssMessage.ABORT else "not an encapsulated message")
                return
            try:
                result = unwrap(context, frame.token)
            except self.raw.GSSError as e:
                self._broken(_gss_message(e))
                return
            if self.confidential and not result.encrypted:
                self._broken("a message without confidentiality")
                return
            plain.append(result.message)
        self.buffer = buffer
        if plain:
            self.protocol.data_received(b"".join(plain))  # type: ignore[attr-defined]

    def _broken(self, why: str) -> None:
        self.buffer = b""
        self.session.abort(f"GSSAPI: {why}")

    def eof_received(self) -> bool | None:
        return self.protocol.eof_received()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()

    # -- UDP datagrams of the session's association ------------------------

    def seal(self, datagram: bytes) -> bytes | None:
        """A datagram for the client, wrapped; None when it does not fit one message."""
        if len(datagram) > self.chunk:
            return None
        token = self.raw.wrap(self.context, datagram, confidential=self.confidential).message
        return socks5.encode_gss_frame(GssMessage.ENCAPSULATED, token)

    def unseal(self, datagram: bytes) -> bytes | None:
        """A datagram from the client, unwrapped; None when it is not a good one."""
        try:
            parsed = socks5.parse_gss_frame(datagram)
            if parsed is None or parsed[1] != len(datagram) or parsed[0].kind != GssMessage.ENCAPSULATED:
                return None
            result = self.raw.unwrap(self.context, parsed[0].token)
        except (ProtocolError, self.raw.GSSError):
            return None
        if self.confidential and not result.encrypted:
            return None
        return result.message
