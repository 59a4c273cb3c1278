"""Every option of osocks, with its default: the only place a default lives.

`Settings` is built once (from the command line, from UCI, or both) and never
changed; a reload builds a new one.  Times are seconds here; the command line
and UCI speak milliseconds, as the original osocks did.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from .rules import Rule, parse_network, parse_rule

Family = Literal["any", "ipv4", "ipv6"]
FAMILIES: tuple[Family, ...] = ("any", "ipv4", "ipv6")
ProtectionName = Literal["none", "integrity", "confidentiality"]
PROTECTIONS: tuple[ProtectionName, ...] = ("none", "integrity", "confidentiality")  # RFC 1961 levels 0, 1, 2
EventLoop = Literal["uvloop", "asyncio"]
EVENT_LOOPS: tuple[EventLoop, ...] = ("uvloop", "asyncio")


class SettingsError(ValueError):
    """A value a user gave is wrong; the message names the option and the value."""


@dataclass(frozen=True, slots=True)
class User:
    name: str
    secret: str  # clear text, or a "$pbkdf2-sha256$..." / "$scrypt$..." hash (see auth.py)

    def __repr__(self) -> str:  # never show a password, not even in a traceback
        return f"User({self.name!r})"


@dataclass(frozen=True, slots=True)
class Settings:
    listen: tuple[str, ...] = ("0.0.0.0",)
    port: int = 1080
    max_sessions: int = 0  # 0: unlimited
    connect_timeout: float = 8.0
    idle_timeout: float = 64.0
    handshake_timeout: float = 10.0
    bind_timeout: float = 60.0  # how long BIND waits for its peer
    family: Family = "any"
    syslog: bool = False
    verbosity: int = 0  # 0: INFO, 1+: DEBUG, -1: WARNING, -2: ERROR
    workers: int = 1  # 0: one per core
    users: tuple[User, ...] = ()
    anonymous: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    client_rules: tuple[Rule, ...] = ()
    dest_rules: tuple[Rule, ...] = ()
    allow_local: bool = False  # allow destinations on loopback and on this host
    bind_address: str | None = None  # outgoing source address
    external_address: str | None = None  # address announced for BIND (default: the one the client reached)
    interfaces: tuple[str, ...] = ()  # OpenWrt logical interfaces whose addresses we listen on
    splice: bool = True
    loop: EventLoop = "uvloop"  # uvloop where it is installed, else (with a log line) asyncio's own
    gssapi_keytab: str | None = None  # offer GSSAPI (RFC 1961) with the keys in this keytab
    gssapi_service: str = "rcmd"  # accept tickets for gssapi_service/<any host in the keytab>
    gssapi_min_protection: ProtectionName = "none"
    gssapi_max_protection: ProtectionName = "confidentiality"
    gssapi_principals: tuple[str, ...] = ()  # allowed principals, "name@REALM" or "*@REALM"; empty: all

    def __post_init__(self) -> None:
        check_port("port", self.port)
        if self.max_sessions < 0:
            raise SettingsError(f"max_sessions: {self.max_sessions!r} must be 0 (unlimited) or more")
        for name in ("connect_timeout", "idle_timeout", "handshake_timeout", "bind_timeout"):
            value = getattr(self, name)
            if not value > 0:
                raise SettingsError(f"{name}: {value!r} must be more than 0")
        if self.family not in FAMILIES:
            raise SettingsError(f"family: {self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.loop not in EVENT_LOOPS:
            raise SettingsError(f"loop: {self.loop!r} is not one of {', '.join(EVENT_LOOPS)}")
        if self.workers < 0:
            raise SettingsError(f"workers: {self.workers!r} must be 0 (one per core) or more")
        for address in self.listen:
            check_address("listen", address)
        for name in ("bind_address", "external_address"):
            value = getattr(self, name)
            if value is not None:
                check_address(name, value)
        if not self.listen and not self.interfaces:
            raise SettingsError("listen: no listen address and no interface given")
        names = [user.name for user in self.users]
        if len(set(names)) != len(names):
            twice = next(name for name in names if names.count(name) > 1)
            raise SettingsError(f"users: user {twice!r} is listed twice")
        self._check_gssapi()

    def _check_gssapi(self) -> None:
        if self.gssapi_keytab == "":
            raise SettingsError("gssapi_keytab: an empty file name")
        service = self.gssapi_service
        if not service or any(c in service for c in "/@ \t"):
            raise SettingsError(f"gssapi_service: {service!r} must be a service name such as rcmd (no '/', '@')")
        for name in ("gssapi_min_protection", "gssapi_max_protection"):
            if getattr(self, name) not in PROTECTIONS:
                raise SettingsError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(PROTECTIONS)}")
        if PROTECTIONS.index(self.gssapi_min_protection) > PROTECTIONS.index(self.gssapi_max_protection):
            raise SettingsError(
                f"gssapi_min_protection: {self.gssapi_min_protection!r} is above "
                f"gssapi_max_protection {self.gssapi_max_protection!r}"
            )
        for pattern in self.gssapi_principals:
            check_principal_pattern("gssapi_principals", pattern)

    def replace(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def public(self) -> dict[str, Any]:
        """The effective settings as plain data, passwords left out."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "users":
                out[f.name] = [user.name for user in value]
            elif isinstance(value, tuple):
                out[f.name] = [str(item) for item in value]
            else:
                out[f.name] = value
        return out


def check_port(name: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise SettingsError(f"{name}: {port!r} is not a port number (0-65535)")


def check_address(name: str, address: str) -> None:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise SettingsError(f"{name}: {address!r} is not an IPv4 or IPv6 address") from None


def check_principal_pattern(name: str, pattern: str) -> None:
    """A principal with its realm (alice@EXAMPLE.ORG), or every principal of a realm (*@EXAMPLE.ORG)."""
    who, at, realm = pattern.rpartition("@")
    if not at or not who or not realm or "*" in realm or ("*" in who and who != "*"):
        raise SettingsError(f"{name}: {pattern!r} must be name@REALM or *@REALM")


def principal_allowed(patterns: Collection[str], principal: str) -> bool:
    """Whether gssapi_principals lets this principal in (none configured: every one)."""
    if not patterns:
        return True
    return principal in patterns or "*@" + principal.rpartition("@")[2] in patterns


def parse_user(text: str, option: str = "user") -> User:
    """`user:password` (or `user:HASH`); SettingsError naming the option for anything a login could never match."""
    name, sep, secret = text.partition(":")
    if not sep:
        raise SettingsError(f"{option}: {text!r} must be written user:password")
    if not name:
        raise SettingsError(f"{option}: the user name before ':' is empty (write user:password)")
    hashed = False
    if secret.startswith("$"):
        from . import auth  # hashlib only where there are users

        problem = auth.hash_problem(secret)
        if problem is not None:
            raise SettingsError(f"{option}: user {name!r}: {problem}")
        hashed = auth.is_hashed(secret)
    if len(name.encode()) > 255 or len(secret.encode()) > 255 and not hashed:
        raise SettingsError(f"{option}: {name!r}: user and password are 255 bytes at most (RFC 1929)")
    return User(name, secret)


def user_file_entries(path: str, option: str = "user_file") -> list[tuple[str, User]]:
    """(where, user) for each user:password line of the file; blank lines and lines starting with #
    are skipped.  A file with no user at all is an error: it would leave the proxy open."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise SettingsError(f"{option}: {path!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{option}: {path!r}: not UTF-8 text") from None
    entries = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if line and not line.startswith("#"):
            where = f"{option} {path}:{number}"
            entries.append((where, parse_user(line, where)))
    if not entries:
        raise SettingsError(f"{option}: {path!r} lists no user (only blank lines or comments)")
    return entries


def read_user_file(path: str, option: str = "user_file") -> tuple[User, ...]:
    return unique_users(user_file_entries(path, option))


def unique_users(entries: list[tuple[str, User]]) -> tuple[User, ...]:
    """The users of (where, user) entries; SettingsError naming a user listed twice, and where."""
    first: dict[str, str] = {}
    for where, user in entries:
        if user.name in first:
            raise SettingsError(f"{where}: user {user.name!r} is listed twice (also at {first[user.name]})")
        first[user.name] = where
    return tuple(user for _, user in entries)


def parse_rules(option: str, texts: list[str] | tuple[str, ...]) -> tuple[Rule, ...]:
    try:
        return tuple(parse_rule(text) for text in texts)
    except ValueError as e:
        raise SettingsError(f"{option}: {e}") from None


def parse_networks(option: str, texts: list[str] | tuple[str, ...]) -> tuple[Any, ...]:
    try:
        return tuple(parse_network(text) for text in texts)
    except ValueError as e:
        raise SettingsError(f"{option}: {e}") from None


DEFAULTS = Settings()
