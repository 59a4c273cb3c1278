"""The command line → settings, in the original osocks synopsis (times in ms)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from . import __version__
from .settings import (
    DEFAULTS,
    Settings,
    SettingsError,
    parse_networks,
    parse_rules,
    parse_user,
    read_user_file,
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
                              (hashed forms: python3 -m osocks.auth USER)
  --anonymous CIDR            clients from CIDR need no password (repeatable)
  --client-rule RULE          e.g. 'allow 192.168.1.0/24', 'deny all' (repeatable, first match wins)
  --dest-rule RULE            e.g. 'deny 10.0.0.0/8 port 1-1023' (repeatable, checked after resolving)
  --allow-local               allow destinations on loopback and this host's own addresses
  -b ADDR                     outgoing connections from ADDR
  --external ADDR             address announced in BIND replies
  -i IFACE                    listen on the addresses of OpenWrt interface IFACE (repeatable)
  --no-splice                 copy bytes in Python instead of splice(2)
  --uci [CONFIG] / -c CONFIG  read /etc/config/CONFIG (osocks) first; flags override it
  --no-uci                    do not read UCI (the default where UCI is not installed)
  --uci-dir DIR               where UCI configs are (/etc/config)
  --ubus-socket PATH          the ubusd socket (libubus' default)
"""


class UsageError(Exception):
    """A bad flag or value: one line for the user, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _milliseconds(text: str) -> float:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of milliseconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 ms")
    return value / 1000


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def _port(text: str) -> int:
    value = _count(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return value


def _parser() -> _Parser:
    p = _Parser(prog="osocks", add_help=False, allow_abbrev=False, argument_default=argparse.SUPPRESS)
    p.add_argument("-l", dest="listen", action="append", metavar="addr")
    p.add_argument("-p", dest="port", type=_port)
    p.add_argument("-n", dest="max_sessions", type=_count)
    p.add_argument("-T", dest="connect_timeout", type=_milliseconds)
    p.add_argument("-I", dest="idle_timeout", type=_milliseconds)
    p.add_argument("--handshake-timeout", dest="handshake_timeout", type=_milliseconds)
    p.add_argument("--bind-timeout", dest="bind_timeout", type=_milliseconds)
    p.add_argument("-4", dest="family", action="store_const", const="ipv4")
    p.add_argument("-6", dest="family", action="store_const", const="ipv6")
    p.add_argument("-s", dest="syslog", action="store_true")
    p.add_argument("-v", dest="louder", action="count")
    p.add_argument("-q", dest="quieter", action="count")
    p.add_argument("-V", "--version", dest="version", action="store_true")
    p.add_argument("-h", "--help", dest="help", action="store_true")
    p.add_argument("-w", dest="workers", type=_count)
    p.add_argument("-u", dest="user", action="append")
    p.add_argument("-U", dest="user_file", action="append")
    p.add_argument("--anonymous", action="append")
    p.add_argument("--client-rule", dest="client_rule", action="append")
    p.add_argument("--dest-rule", dest="dest_rule", action="append")
    p.add_argument("--allow-local", dest="allow_local", action="store_true")
    p.add_argument("-b", dest="bind_address")
    p.add_argument("--external", dest="external_address")
    p.add_argument("-i", dest="interface", action="append")
    p.add_argument("--no-splice", dest="splice", action="store_false")
    p.add_argument("--uci", nargs="?", const="osocks")
    p.add_argument("-c", dest="uci")
    p.add_argument("--no-uci", dest="no_uci", action="store_true")
    p.add_argument("--uci-dir", dest="uci_dir")
    p.add_argument("--ubus-socket", dest="ubus_socket")
    return p


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
        ):
            if name in g:
                changes[name] = tuple(g[name]) if name == "listen" else g[name]
        if "louder" in g or "quieter" in g:
            changes["verbosity"] = base.verbosity + g.get("louder", 0) - g.get("quieter", 0)
        if g.get("family") == "ipv6" and "listen" not in g and base.listen == DEFAULTS.listen:
            changes["listen"] = ("::",)
        if "interface" in g:
            changes["interfaces"] = tuple(g["interface"])
            if "listen" not in g:
                changes["listen"] = ()
        users = tuple(parse_user(text, "-u") for text in g.get("user", ()))
        for path in g.get("user_file", ()):
            users += read_user_file(path, "-U")
        if users:
            changes["users"] = users
        if "anonymous" in g:
            changes["anonymous"] = parse_networks("--anonymous", g["anonymous"])
        if "client_rule" in g:
            changes["client_rules"] = parse_rules("--client-rule", g["client_rule"])
        if "dest_rule" in g:
            changes["dest_rules"] = parse_rules("--dest-rule", g["dest_rule"])
        return base.replace(**changes)


def parse(argv: list[str]) -> Command:
    """argv (without the program name) → Command; raises UsageError."""
    try:
        namespace, extra = _parser().parse_known_args(argv)
    except SettingsError as e:
        raise UsageError(str(e)) from None
    if extra:
        kind = "unknown option" if extra[0].startswith("-") else "unexpected argument"
        raise UsageError(f"{kind} {extra[0]!r}")
    return Command(vars(namespace))


def usage() -> str:
    return USAGE.format(version=__version__)


def die(message: str, status: int = 2) -> NoReturn:
    print(f"osocks: {message}", file=sys.stderr)
    sys.exit(status)
