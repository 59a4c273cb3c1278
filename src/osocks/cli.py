"""The command line → settings, in the original osocks synopsis (times in ms)."""

from __future__ import annotations

import getopt
import sys
from typing import Any, NoReturn

from . import __version__
from .settings import (
    DEFAULTS,
    PROTECTIONS,
    Settings,
    SettingsError,
    check_principal_pattern,
    parse_networks,
    parse_rules,
    parse_user,
    unique_users,
    user_file_entries,
)

USAGE = """\
Usage: osocks [-l addr] [-p port] [-n num] [-I idle-timeout] [-T connect-timeout] [-svVh]
  -l  listen address (0.0.0.0)        -p  listen port (1080)
  -n  max number of live sessions (unlimited)
  -T  TCP connection timeout (8000ms) -I  session idle timeout (64000ms)
  -s  use syslog (false)              -v  increase verbose level (LOG_INFO)
  -V  show version (osocks {version})     -h  show help

  -l may be given more than once (IPv6 literals too)
  -4 / -6                     listen and connect over IPv4 / IPv6 only
  -q                          decrease verbose level (no line per session)
  --handshake-timeout MS      close clients that do not finish the handshake (10000ms)
  --bind-timeout MS           how long BIND waits for the peer to connect (60000ms)
  -w N                        worker processes (1; 0: one per core)
  -u USER:PASSWORD            require username/password (repeatable)
  -U FILE                     users from FILE, one user:password per line
                              (hashed forms: python3 -m osocks.auth [--scrypt] USER)
  --anonymous CIDR            clients from CIDR need no password (repeatable)
  --client-rule RULE          e.g. 'allow 192.168.1.0/24', 'deny all' (repeatable, first match wins)
  --dest-rule RULE            e.g. 'deny 10.0.0.0/8 port 1-1023' (repeatable, checked after resolving)
  --allow-local               allow destinations on loopback and this host's own addresses
  -b ADDR                     outgoing connections from ADDR
  --external ADDR             address announced in BIND replies
  -i IFACE                    listen on the addresses of OpenWrt interface IFACE (repeatable)
  --no-splice                 copy bytes in Python instead of splice(2)
  --loop uvloop|asyncio       event loop (uvloop; asyncio: Python's own)
  --gssapi-keytab FILE        offer GSSAPI (RFC 1961) authentication with the keys in FILE
                              (needs python-gssapi: pip install osocks[gssapi], OpenWrt python3-gssapi)
  --gssapi-service NAME       accept tickets for NAME/<any host in the keytab> (rcmd)
  --gssapi-min-protection L   none, integrity or confidentiality: the least a client may ask for (none)
  --gssapi-max-protection L   the most granted (confidentiality; none for curl, which protects nothing)
  --gssapi-principal P        allow only principal P (name@REALM, or *@REALM; repeatable)
  --uci[=CONFIG] / -c CONFIG  read /etc/config/CONFIG (osocks) first; flags override it
  --no-uci                    do not read UCI (the default where UCI is not installed)
  --uci-dir DIR               where UCI configs are (/etc/config)
  --ubus-socket PATH          the ubusd socket (libubus' default)
"""


class UsageError(Exception):
    """A bad flag or value: one line for the user, exit 2."""


def _milliseconds(text: str) -> float:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{text!r} is not a whole number of milliseconds") from None
    if value <= 0:
        raise UsageError(f"{text!r} must be more than 0 ms")
    return value / 1000


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise UsageError(f"{text!r} must be 0 or more")
    return value


def _port(text: str) -> int:
    value = _count(text)
    if value > 65535:
        raise UsageError(f"{text!r} is not a port number (0-65535)")
    return value


def _protection(text: str) -> str:
    if text not in PROTECTIONS:
        raise UsageError(f"{text!r} is not one of {', '.join(PROTECTIONS)}")
    return text


def _principal(text: str) -> str:
    try:
        check_principal_pattern("", text)
    except SettingsError as e:
        raise UsageError(str(e).removeprefix(": ")) from None
    return text


# flag -> (key in Command.given, action, how to read its value; or, for a flag that takes
# none, the value it stands for).  getopt rather than argparse: argparse and what it
# imports (shutil, bz2, lzma) held 0.7 MB of a router's RAM for the whole run.
_APPEND, _SET, _COUNT = "append", "set", "count"
_OPTIONS: dict[str, tuple[str, str, Any]] = {
    "-l": ("listen", _APPEND, str),
    "-p": ("port", _SET, _port),
    "-n": ("max_sessions", _SET, _count),
    "-T": ("connect_timeout", _SET, _milliseconds),
    "-I": ("idle_timeout", _SET, _milliseconds),
    "--handshake-timeout": ("handshake_timeout", _SET, _milliseconds),
    "--bind-timeout": ("bind_timeout", _SET, _milliseconds),
    "-4": ("family", _SET, "ipv4"),
    "-6": ("family", _SET, "ipv6"),
    "-s": ("syslog", _SET, True),
    "-v": ("louder", _COUNT, None),
    "-q": ("quieter", _COUNT, None),
    "-V": ("version", _SET, True),
    "--version": ("version", _SET, True),
    "-h": ("help", _SET, True),
    "--help": ("help", _SET, True),
    "-w": ("workers", _SET, _count),
    "-u": ("user", _APPEND, str),
    "-U": ("user_file", _APPEND, str),
    "--anonymous": ("anonymous", _APPEND, str),
    "--client-rule": ("client_rule", _APPEND, str),
    "--dest-rule": ("dest_rule", _APPEND, str),
    "--allow-local": ("allow_local", _SET, True),
    "-b": ("bind_address", _SET, str),
    "--external": ("external_address", _SET, str),
    "-i": ("interface", _APPEND, str),
    "--no-splice": ("splice", _SET, False),
    "--loop": ("loop", _SET, str),
    "--gssapi-keytab": ("gssapi_keytab", _SET, str),
    "--gssapi-service": ("gssapi_service", _SET, str),
    "--gssapi-min-protection": ("gssapi_min_protection", _SET, _protection),
    "--gssapi-max-protection": ("gssapi_max_protection", _SET, _protection),
    "--gssapi-principal": ("gssapi_principals", _APPEND, _principal),
    "--uci": ("uci", _SET, "osocks"),
    "-c": ("uci", _SET, str),
    "--no-uci": ("no_uci", _SET, True),
    "--uci-dir": ("uci_dir", _SET, str),
    "--ubus-socket": ("ubus_socket", _SET, str),
}
_FLAGS = {key: flag for flag, (key, _, _) in reversed(_OPTIONS.items())} | {"family": "-4/-6", "verbosity": "-v/-q"}
_TAKES_VALUE = {flag for flag, (_, _, value) in _OPTIONS.items() if callable(value)}
_SHORT = "".join(flag[1] + (":" if flag in _TAKES_VALUE else "") for flag in _OPTIONS if not flag.startswith("--"))
_LONG = [flag[2:] + ("=" if flag in _TAKES_VALUE else "") for flag in _OPTIONS if flag.startswith("--")]


def _spell_out_uci(argv: list[str]) -> list[str]:
    """`--uci NAME` and `--uci=NAME` as `-c NAME`: getopt has no optional values."""
    out: list[str] = []
    words = iter(argv)
    for word in words:
        if word.startswith("--uci="):
            out += ["-c", word[len("--uci=") :]]
        elif word == "--uci" and (following := next(words, None)) is not None:
            out += ["-c", following] if not following.startswith("-") else [word, following]
        else:
            out.append(word)
    return out


def _exact_long_flags(argv: list[str]) -> None:
    """getopt accepts any unique prefix of a long flag; a typo should not be a different flag."""
    for word in argv:
        if word == "--":
            return
        flag = word.partition("=")[0]
        if flag.startswith("--") and flag != "--" and flag not in _OPTIONS:
            raise UsageError(f"unknown option {flag!r}")


class Command:
    """What the command line asks for: settings overrides, and where else to look."""

    def __init__(self, given: dict[str, Any]) -> None:
        self.given = given
        self.help = given.pop("help", False)
        self.version = given.pop("version", False)
        self.uci: str | None = given.pop("uci", None)
        self.no_uci: bool = given.pop("no_uci", False)
        self.uci_dir: str | None = given.pop("uci_dir", None)
        self.ubus_socket: str | None = given.pop("ubus_socket", None)

    def settings(self, base: Settings = DEFAULTS) -> Settings:
        """The settings: `base` (defaults, or UCI) with every given flag on top."""
        g = self.given
        changes: dict[str, Any] = {}
        for name in (
            "listen",
            "port",
            "max_sessions",
            "connect_timeout",
            "idle_timeout",
            "handshake_timeout",
            "bind_timeout",
            "family",
            "syslog",
            "workers",
            "allow_local",
            "bind_address",
            "external_address",
            "splice",
            "loop",
            "gssapi_keytab",
            "gssapi_service",
            "gssapi_min_protection",
            "gssapi_max_protection",
            "gssapi_principals",
        ):
            if name in g:
                changes[name] = tuple(g[name]) if name in ("listen", "gssapi_principals") else g[name]
        if "louder" in g or "quieter" in g:
            changes["verbosity"] = base.verbosity + g.get("louder", 0) - g.get("quieter", 0)
        if g.get("family") == "ipv6" and "listen" not in g and base.listen == DEFAULTS.listen:
            changes["listen"] = ("::",)
        if "interface" in g:
            changes["interfaces"] = tuple(g["interface"])
            if "listen" not in g:
                changes["listen"] = ()
        users = [("-u", parse_user(text, "-u")) for text in g.get("user", ())]
        for path in g.get("user_file", ()):
            users += user_file_entries(path, "-U")
        if users:
            changes["users"] = unique_users(users)
        if "anonymous" in g:
            changes["anonymous"] = parse_networks("--anonymous", g["anonymous"])
        if "client_rule" in g:
            changes["client_rules"] = parse_rules("--client-rule", g["client_rule"])
        if "dest_rule" in g:
            changes["dest_rules"] = parse_rules("--dest-rule", g["dest_rule"])
        try:
            return base.replace(**changes)
        except SettingsError as e:  # named after the field: name the flag that gave it instead
            field, sep, rest = str(e).partition(": ")
            if sep and field in changes and field in _FLAGS:
                raise SettingsError(f"{_FLAGS[field]}: {rest}") from None
            raise


def parse(argv: list[str]) -> Command:
    """argv (without the program name) → Command; raises UsageError."""
    argv = _spell_out_uci(argv)
    _exact_long_flags(argv)
    try:
        pairs, extra = getopt.getopt(argv, _SHORT, _LONG)
    except getopt.GetoptError as e:
        raise UsageError(_getopt_message(e)) from None
    if extra:
        raise UsageError(f"unexpected argument {extra[0]!r}")
    given: dict[str, Any] = {}
    for flag, text in pairs:
        key, action, value = _OPTIONS[flag]
        if action == _COUNT:
            given[key] = given.get(key, 0) + 1
            continue
        if flag in _TAKES_VALUE:
            try:
                value = value(text)
            except UsageError as e:
                raise UsageError(f"{flag}: {e}") from None
        if action == _APPEND:
            given.setdefault(key, []).append(value)
        else:
            if key == "family" and given.get(key, value) != value:
                raise UsageError("-4 and -6 exclude each other (give neither for both families)")
            given[key] = value
    return Command(given)


def _getopt_message(error: getopt.GetoptError) -> str:
    flag = ("-" if len(error.opt) == 1 else "--") + error.opt
    if "requires argument" in error.msg:
        return f"{flag} needs a value"
    if "must not have an argument" in error.msg:
        return f"{flag} takes no value"
    return f"unknown option {flag!r}"


def usage() -> str:
    return USAGE.format(version=__version__)


def die(message: str, status: int = 2) -> NoReturn:
    print(f"osocks: {message}", file=sys.stderr)
    sys.exit(status)
