"""Listeners, the live-session registry, limits, counters, reload and shutdown."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import itertools
import logging
import os
import resource
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from . import __version__, netinfo, tcp
from .rules import allowed, first_match
from .session import COMMAND, RELAY, Session, _endpoint
from .settings import Settings, User, principal_allowed
from .socks5 import Command, ProtocolError, ReplyCode

log = logging.getLogger("osocks")

Resolver = Callable[[str, int, int], Awaitable[list[tuple[int, tuple]]]]

LISTEN_FIELDS = ("listen", "port", "family", "interfaces")
BACKLOG = 1024


class ListenError(Exception):
    """A listening socket could not be opened; the message says which and why."""


COUNTED = (
    "total",
    "peak",
    "refused",
    "denied",
    "revoked",  # sessions closed by a reload that removed their user, changed the password or dropped the principal
    "auth_failures",
    "bytes_up",  # of finished sessions; live ones are added in status()
    "bytes_down",
    "udp_associations",
    "udp_datagrams",
    "udp_bytes",
    "udp_invalid",  # datagrams dropped: malformed, or naming a host that cannot be looked up
    "udp_denied",  # datagrams dropped: the destination is denied (rule, local, -4/-6)
    "spliced",  # directions of finished sessions that moved to splice(2)
    "out_of_fds",  # connections refused for want of file descriptors
)
_REPLIES = len(COUNTED)  # then one count per reply code
_TOTAL, _PEAK, _BYTES_UP, _BYTES_DOWN = map(COUNTED.index, ("total", "peak", "bytes_up", "bytes_down"))
COUNTERS_BYTES = 8 * (_REPLIES + len(ReplyCode))


def _counted(name: str) -> Any:
    index = COUNTED.index(name)

    def get(self: Counters) -> int:
        return self.values[index]

    def set_(self: Counters, value: int) -> None:
        self.values[index] = value

    return property(get, set_)


def counted_figures(c: Counters, live: int = 0, live_up: int = 0, live_down: int = 0) -> dict[str, Any]:
    """The counters as the status shows them, with the live sessions and the bytes they moved so far."""
    return {
        "sessions": {
            "live": live,
            "total": c.total,
            "peak": c.peak,
            "refused": c.refused,
            "denied": c.denied,
            "revoked": c.revoked,
            "out_of_fds": c.out_of_fds,
        },
        "auth_failures": c.auth_failures,
        "replies": dict(zip((code.name.lower() for code in ReplyCode), c.replies, strict=True)),
        "bytes": {"up": c.bytes_up + live_up, "down": c.bytes_down + live_down},
        "udp": {
            "associations": c.udp_associations,
            "datagrams": c.udp_datagrams,
            "bytes": c.udp_bytes,
            "dropped": {"invalid": c.udp_invalid, "denied": c.udp_denied},
        },
        "spliced": c.spliced,
    }


class Counters:
    """Every number osocks counts, as 64-bit integers in `values`: a buffer of its own, or
    in a worker process its slot of memory shared with the master, which so keeps the
    counts of a worker that dies (workers.py)."""

    __slots__ = ("started", "values")
    total = _counted("total")
    peak = _counted("peak")
    refused = _counted("refused")
    denied = _counted("denied")
    revoked = _counted("revoked")
    auth_failures = _counted("auth_failures")
    bytes_up = _counted("bytes_up")
    bytes_down = _counted("bytes_down")
    udp_associations = _counted("udp_associations")
    udp_datagrams = _counted("udp_datagrams")
    udp_bytes = _counted("udp_bytes")
    udp_invalid = _counted("udp_invalid")
    udp_denied = _counted("udp_denied")
    spliced = _counted("spliced")
    out_of_fds = _counted("out_of_fds")

    def __init__(self, memory: Any = None) -> None:
        self.started = time.monotonic()
        self.values = memoryview(bytearray(COUNTERS_BYTES) if memory is None else memory).cast("q")

    def admitted(self, live: int) -> None:
        """A session is admitted; live: how many are now (the peak)."""
        values = self.values
        values[_TOTAL] += 1
        if live > values[_PEAK]:
            values[_PEAK] = live

    def finished(self, up: int, down: int) -> None:
        """A session ended, having moved these bytes."""
        values = self.values
        values[_BYTES_UP] += up
        values[_BYTES_DOWN] += down

    def replied(self, code: ReplyCode) -> None:
        self.values[_REPLIES + code] += 1

    @property
    def replies(self) -> list[int]:
        return self.values[_REPLIES : _REPLIES + len(ReplyCode)].tolist()

    def clear(self) -> None:
        self.values[:] = memoryview(bytes(COUNTERS_BYTES)).cast("q")


async def system_resolver(host: str, port: int, family: int) -> list[tuple[int, tuple]]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    return [(info[0], info[4]) for info in infos]


class Server:
    def __init__(
        self,
        settings: Settings,
        resolver: Resolver = system_resolver,
        reuse_port: bool = False,
        counters: Counters | None = None,
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        self.reuse_port = reuse_port  # SO_REUSEPORT: worker processes each listen on the same port
        self.counters = counters or Counters()
        self.live: set[Session] = set()
        self.listeners: dict[tuple[str, int], tcp.Listener] = {}
        self.interface_addresses: dict[str, list[str]] = {}  # OpenWrt interface → its addresses
        self._ticker: asyncio.TimerHandle | None = None
        self.fd_limit = fd_limit()
        self.fds_checked_from = _fds_checked_from(self.fd_limit)  # live sessions from which admit() looks
        self._starved = 0  # connections refused for want of descriptors since the last warning
        self._starved_warned = -STARVED_WARN_EVERY
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start()
        self.poller: tcp.Poller = None  # type: ignore[assignment]  # the TCP sockets' epoll set (set by start())
        self.closed = asyncio.Event()
        self._session_numbers = itertools.count(1)
        self._pid = os.getpid()  # a worker builds its Server after the fork

    # -- listeners ---------------------------------------------------------

    async def start(self, interface_addresses: dict[str, list[str]] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.poller = tcp.Poller(self.loop)
        await self._open_listeners(self.settings, interface_addresses or {})
        self._tick()

    @staticmethod
    def listen_addresses(settings: Settings, interface_addresses: dict[str, list[str]]) -> list[tuple[str, int]]:
        addresses = list(settings.listen)
        for name in settings.interfaces:
            addresses += interface_addresses.get(name, [])
        if settings.family == "ipv4":
            addresses = [a for a in addresses if ipaddress.ip_address(a).version == 4]
        elif settings.family == "ipv6":
            addresses = [a for a in addresses if ipaddress.ip_address(a).version == 6]
        return [(address, settings.port) for address in dict.fromkeys(addresses)]

    async def _open_listeners(self, settings: Settings, interface_addresses: dict[str, list[str]]) -> list[str]:
        wanted = self.listen_addresses(settings, interface_addresses)
        if not wanted and not settings.interfaces:
            raise ListenError(f"no listen address of family {settings.family}")
        opened: dict[tuple[str, int], tcp.Listener] = {}
        try:
            for address in wanted:
                if address not in self.listeners:
                    sock = listening_socket(address, settings, wanted, self.reuse_port)
                    new_session = functools.partial(Session, self)
                    opened[address] = tcp.Listener(self.poller, sock, new_session, BACKLOG, self.starved)
        except BaseException:
            for listener in opened.values():
                listener.close()
            raise
        for address in list(self.listeners):
            if address not in wanted:
                self.listeners.pop(address).close()
        self.listeners.update(opened)
        self.interface_addresses = interface_addresses
        return [_endpoint(address) for address in opened]

    def bound_addresses(self) -> list[tuple[str, int]]:
        bound = []
        for listener in self.listeners.values():
            for sock in listener.sockets:
                bound.append(sock.getsockname()[:2])
        return bound

    # -- sessions ----------------------------------------------------------

    def admit(self, session: Session) -> bool:
        counters = self.counters
        settings = self.settings
        if settings.client_rules:
            address = netinfo.plain_address(session.client[0])
            if not allowed(settings.client_rules, address):
                counters.denied += 1
                log.info("client %s denied by rule", _endpoint(session.client))
                return False
        if settings.max_sessions and len(self.live) >= settings.max_sessions:
            counters.refused += 1
            log.warning("client %s refused: %d sessions live (limit)", _endpoint(session.client), len(self.live))
            return False
        if len(self.live) >= self.fds_checked_from and self._few_fds_left(session):
            self.starved()
            return False
        self.live.add(session)
        session.number = next(self._session_numbers)
        counters.admitted(len(self.live))
        return True

    def session_id(self, session: Session) -> str:
        """The session's id in status and for disconnect: the pid tells the master which worker."""
        return f"{self._pid}-{session.number}"

    def _few_fds_left(self, session: Session) -> bool:
        """Whether the accepted socket took one of the last FD_RESERVE descriptors (descriptors are
        given lowest first, so every lower one is in use).  Asked only when there are so many live
        sessions that the limit may be near: uvloop (libuv) never lets accept() fail with EMFILE."""
        sock = session.transport.get_extra_info("socket")
        return sock is not None and sock.fileno() >= self.fd_limit - FD_RESERVE

    def starved(self) -> None:
        """A connection refused for want of descriptors: counted; a warning every few seconds at most."""
        self.counters.out_of_fds += 1
        self._starved += 1
        if time.monotonic() - self._starved_warned >= STARVED_WARN_EVERY:
            self._warn_starved()

    def _warn_starved(self) -> None:
        log.warning(
            "out of file descriptors (limit %d, RLIMIT_NOFILE): %d connection%s refused",
            self.fd_limit,
            self._starved,
            "" if self._starved == 1 else "s",
        )
        self._starved = 0
        self._starved_warned = time.monotonic()

    def session_finished(self, session: Session) -> None:
        try:
            self.live.remove(session)
        except KeyError:  # never admitted, or finished already
            return
        up, down = session.bytes_moved()
        for end in (session.client_end, session.upstream_end):
            if end is not None and end.spliced:
                self.counters.spliced += 1
        self.counters.finished(up, down)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "client %s%s%s: up %d down %d bytes in %.3fs, %s",
                _endpoint(session.client),
                f" user {session.user}" if session.user else "",
                _command_text(session),
                up,
                down,
                time.monotonic() - session.started,
                session.outcome,
            )

    def literal_address(self, host: str, port: int, family: int = 0) -> list[tuple[int, tuple]] | None:
        """[(family, sockaddr)] for an IP literal (no resolving, no coroutine); None for a name.
        family: the literal's, when the request's address type told it."""
        literal = family or _literal_family(host)
        if literal is None:
            return None
        off = self.family_off(literal)
        if off is not None:
            raise ProtocolError(off, ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED)
        return [(literal, (host, port))]

    def family_off(self, family: int) -> str | None:
        """Why destinations of this address family are not served (-4, -6), or None when they are."""
        if _FAMILIES[self.settings.family] in (socket.AF_UNSPEC, family):
            return None
        version = 4 if family == socket.AF_INET else 6
        return f"IPv{version} destinations are off (-{10 - version})"

    async def resolve(self, host: str, port: int) -> list[tuple[int, tuple]]:
        """(family, sockaddr) to try in turn: an IP literal as it is, a name through the resolver."""
        literal = self.literal_address(host, port)
        if literal is not None:
            return literal
        try:
            addresses = await self.resolver(host, port, _FAMILIES[self.settings.family])
        except UnicodeError:  # a name IDNA cannot encode: the codec lets few of them through
            raise ProtocolError("invalid host name", ReplyCode.HOST_UNREACHABLE) from None
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, "name has no address")
        return addresses

    def destination_refused(self, host: str, port: int) -> str | None:
        """Why a destination (an IP literal) is not allowed, or None when it is."""
        if not self.settings.allow_local and netinfo.is_local_host(host):
            return "is on this host (--allow-local, UCI allow_local, allows it)"
        rules = self.settings.dest_rules
        rule = first_match(rules, netinfo.reached_address(host), port) if rules else None
        return f"denied by rule '{rule}'" if rule is not None and not rule.allow else None

    def connect(self, protocol: asyncio.Protocol, family: int, host: str, port: int) -> tcp.Transport | tcp.Connecting:
        """A TCP connection to an IP address, read by protocol: made already, or under way (tcp.connect)."""
        return tcp.connect(self.poller, protocol, family, host, port, self.source_address(family))

    def source_address(self, family: int) -> tuple[str, int] | None:
        source = self.settings.bind_address
        if source is None:
            return None
        version = 4 if family == socket.AF_INET else 6
        return (source, 0) if ipaddress.ip_address(source).version == version else None

    # -- timeouts: one sweep for all sessions ------------------------------

    def _tick(self) -> None:
        now = time.monotonic()
        self.fd_limit = fd_limit()  # prlimit(1) may change it from outside
        self.fds_checked_from = _fds_checked_from(self.fd_limit)
        if self._starved and now - self._starved_warned >= STARVED_WARN_EVERY:
            self._warn_starved()
        newest = last = self.settings
        shortest = _shortest_timeout(newest)
        for session in list(self.live):
            settings = session.settings
            if settings is not last and settings is not newest:  # a session from before a reload
                shortest = min(shortest, _shortest_timeout(settings))
                last = settings
            if session.state < COMMAND:
                if now - session.started > settings.handshake_timeout:
                    session.abort("handshake timeout")
            elif session.state == COMMAND:
                if session.command == Command.CONNECT and now - session.active > settings.connect_timeout:
                    session.fail(ReplyCode.TTL_EXPIRED, "connect timed out")
            elif session.state == RELAY:
                up, down = session.bytes_moved()
                if up + down != session.seen_bytes:
                    session.seen_bytes = up + down
                    session.active = now
                elif now - session.active > settings.idle_timeout:
                    session.abort("idle timeout")
        interval = min(1.0, max(0.02, shortest / 8))
        self._ticker = asyncio.get_running_loop().call_later(interval, self._tick)

    # -- status, reload, shutdown ------------------------------------------

    def status(self) -> dict[str, Any]:
        c = self.counters
        up = down = 0
        for session in self.live:
            u, d = session.bytes_moved()
            up += u
            down += d
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(time.monotonic() - c.started, 3),
            "listeners": [_endpoint(address) for address in self.bound_addresses()],
            "interfaces": self.interface_addresses,
            "interfaces_without_address": without_address(self.interface_addresses),
            "fd_limit": self.fd_limit,
            **counted_figures(c, len(self.live), up, down),
            "settings": self.settings.public(),
        }

    def sessions(self) -> list[dict[str, Any]]:
        return [session.describe() for session in self.live]

    def disconnect(self, session_id: str) -> dict[str, Any]:
        """Close the live session `sessions` lists with this id; LookupError when there is none."""
        for session in self.live:
            if self.session_id(session) == session_id:
                session.abort("disconnected by the administrator")
                return {"disconnected": session_id}
        raise LookupError(f"no live session {session_id}")

    async def reload(
        self, settings: Settings, interface_addresses: dict[str, list[str]] | None = None
    ) -> dict[str, Any]:
        """Apply new settings to new sessions; live sessions keep theirs."""
        if interface_addresses is None:
            interface_addresses = self.interface_addresses
        changed = changed_settings(self.settings, settings, self.interface_addresses, interface_addresses)
        opened: list[str] = []
        if any(name in changed for name in (*LISTEN_FIELDS, "interface_addresses")):
            opened = await self._open_listeners(settings, interface_addresses)
        self.settings = settings
        revoked = self.revoke_logins() if "users" in changed or "gssapi_principals" in changed else 0
        return {"changed": changed, "opened": opened, "listeners": self.status()["listeners"], "revoked": revoked}

    def login_allowed(self, login: User) -> bool:
        """Whether the settings still have this user with this secret (or no users at all: anyone may)."""
        return _login_kept(_secrets(self.settings), login)

    def principal_allowed(self, principal: str) -> bool:
        return principal_allowed(self.settings.gssapi_principals, principal)

    def revoke_logins(self) -> int:
        """Close the live sessions whose user the settings removed or gave another secret, or whose
        GSSAPI principal they no longer allow; how many."""
        secrets = _secrets(self.settings)
        closed: dict[str, int] = {}
        for session in list(self.live):
            login = session.login
            if login is not None and not _login_kept(secrets, login):
                who, why = login.name, "user removed or password changed"
            elif session.principal and not self.principal_allowed(session.principal):
                who, why = session.principal, "principal no longer allowed"
            else:
                continue
            closed[who] = closed.get(who, 0) + 1
            session.abort(f"closed by reload: {why}")
        revoked = sum(closed.values())
        if revoked:
            self.counters.revoked += revoked
            log.warning(
                "reload: closed %d sessions of removed users, changed passwords or principals no longer allowed: %s",
                revoked,
                ", ".join(f"{name} ({n})" for name, n in sorted(closed.items())),
            )
        return revoked

    def close(self) -> None:
        for listener in self.listeners.values():
            listener.close()
        self.listeners.clear()
        if self._ticker is not None:
            self._ticker.cancel()
        for session in list(self.live):
            session.abort("server shutting down")
        if self.poller is not None:
            self.poller.close()
        self.closed.set()


def _secrets(settings: Settings) -> dict[str, str]:
    return {user.name: user.secret for user in settings.users}


def _login_kept(secrets: dict[str, str], login: User) -> bool:
    """Whether a login stays valid under these users' secrets (none configured: anyone may)."""
    return not secrets or secrets.get(login.name) == login.secret


def without_address(interface_addresses: dict[str, list[str]]) -> list[str]:
    """The interfaces osocks should listen on but cannot: down, or up without an address."""
    return [name for name, addresses in interface_addresses.items() if not addresses]


def _shortest_timeout(settings: Settings) -> float:
    return min(settings.handshake_timeout, settings.idle_timeout, settings.connect_timeout)


def changed_settings(
    old: Settings, new: Settings, old_addresses: dict[str, list[str]], new_addresses: dict[str, list[str]]
) -> list[str]:
    """What a reload changes: the settings' names, and "interface_addresses" when those differ."""
    changed = [name for name in old.public() if getattr(old, name) != getattr(new, name)]
    if new_addresses != old_addresses:
        changed.append("interface_addresses")
    return changed


FD_RESERVE = 16  # descriptors a new session may not take: live sessions need some for destinations
FDS_PER_SESSION = 4  # at most (UDP: the control connection, the client's socket, one per family)
FD_GATE = 256  # below (limit - FD_GATE) / FDS_PER_SESSION live sessions, descriptors are not checked
STARVED_WARN_EVERY = 5.0  # seconds


def fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _fds_checked_from(limit: int) -> int:
    return (limit - FD_GATE) // FDS_PER_SESSION


def raise_fd_limit() -> None:
    """The soft RLIMIT_NOFILE up to the hard one, as nginx's worker_rlimit_nofile does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as e:
            log.debug("file descriptors: limit %d, cannot raise it to %d (%s)", soft, hard, e)
            return
        log.debug("file descriptors: limit raised from %d to %d", soft, hard)
    else:
        log.debug("file descriptors: limit %d", soft)


def _command_text(session: Session) -> str:
    """' CONNECT -> example.org:443 [192.0.2.1]': the command, what the client asked for, what it reached."""
    if not session.command:
        return ""
    reached = f" [{session.reached}]" if session.reached else ""
    return f" {session.command_name()} -> {session.target}{reached}"


_FAMILIES = {"any": socket.AF_UNSPEC, "ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}


def _literal_family(host: str) -> int | None:
    """AF_INET or AF_INET6 when host is an IP address, None for a name."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return None


def listening_socket(
    address: tuple[str, int], settings: Settings, wanted: list[tuple[str, int]], reuse_port: bool = False
) -> socket.socket:
    """A bound, non-blocking TCP socket for address (listen() is the caller's); ListenError if it cannot be."""
    host, port = address
    ip = ipaddress.ip_address(host)
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            ipv4_wildcard_too = any(ipaddress.ip_address(h) == ipaddress.IPv4Address(0) for h, _ in wanted)
            v6only = settings.family == "ipv6" or ipv4_wildcard_too or not ip.is_unspecified
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind(address)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise ListenError(f"cannot listen on {_endpoint(address)}: {e.strerror or e}") from None
    return sock
