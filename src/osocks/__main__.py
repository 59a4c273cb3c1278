"""`osocks` and `python -m osocks`: settings, logging, event loop, signals."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import __version__, cli, netinfo, tasks
from .server import ListenError, Server, raise_fd_limit
from .session import _endpoint
from .settings import DEFAULTS, Settings, SettingsError

if TYPE_CHECKING:
    from .ubus import UbusBridge
    from .workers import Master, Zygote

log = logging.getLogger("osocks")

UCI_DIR = "/etc/config"
SYSLOG_SOCKET = "/dev/log"
UBUS_SOCKETS = ("/var/run/ubus/ubus.sock", "/var/run/ubus.sock")  # libubus' default, and older OpenWrt's


def load_settings(command: cli.Command) -> Settings:
    """Defaults, then UCI (when asked for, or when pyuci and /etc/config/osocks exist), then the flags."""
    base = DEFAULTS
    if not command.no_uci:
        from . import uci

        confdir = command.uci_dir or UCI_DIR
        if command.uci is not None:
            base = uci.load(command.uci, confdir=confdir)
        elif uci.available() and os.path.exists(f"{confdir}/osocks"):
            base = uci.load("osocks", confdir=confdir)
    settings = command.settings(base)
    if settings.gssapi_keytab:
        check_gssapi(settings)
    return settings


def check_gssapi(settings: Settings) -> None:
    """python-gssapi importable, and a key for the service in the keytab: else one clear line at start."""
    from . import gss

    try:
        gss.acceptor(settings)
    except gss.GssUnavailable as e:
        raise SettingsError(f"gssapi_keytab (--gssapi-keytab): {e}") from None


def setup_logging(settings: Settings) -> None:
    level = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}.get(max(-2, settings.verbosity), logging.DEBUG)
    logging.raiseExceptions = False  # a log line that cannot be written is no reason for a traceback
    # no getpid() and thread lookups for every record: the syslog tag gets this process's pid below
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    logging._srcfile = None  # nor a walk up the stack for the caller's file and line, which no format shows
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("osocks: %(levelname)s %(message)s"))
    no_syslog = settings.syslog and not os.path.exists(SYSLOG_SOCKET)
    if settings.syslog and not no_syslog:
        from logging.handlers import SysLogHandler  # only here: memory other runs need not pay

        handler = SysLogHandler(SYSLOG_SOCKET, facility=SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter(f"osocks[{os.getpid()}]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if no_syslog:
        log.warning("-s: no syslog at %s, logging to stderr", SYSLOG_SOCKET)


def new_event_loop(settings: Settings) -> asyncio.AbstractEventLoop:
    if settings.loop == "asyncio":
        return asyncio.new_event_loop()
    try:
        import uvloop
    except ImportError:  # said in the "listening on" line (loop_note), so an error exit stays one line
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def loop_note(settings: Settings, loop: asyncio.AbstractEventLoop) -> str:
    if settings.loop == "uvloop" and not type(loop).__module__.startswith("uvloop"):
        return " (uvloop is not installed: using the stock asyncio event loop)"
    return ""


async def log_status(server: Server | Master) -> None:
    """SIGUSR1: the status as one JSON line, whatever the verbosity."""
    status = server.status()
    if inspect.isawaitable(status):
        status = await status
    import json

    log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, "status %s", (json.dumps(status),), None))


def logged(reloaded: dict[str, Any]) -> dict[str, Any]:
    """A reload's answer, logged once (by the process that serves or the master, never per worker)."""
    if reloaded["changed"]:
        log.info("reloaded: %s changed", ", ".join(reloaded["changed"]))
    return reloaded


async def serve(command: cli.Command, settings: Settings, zygote: Zygote | None = None) -> None:
    loop = asyncio.get_running_loop()
    server: Server | Master
    if zygote is None:
        server = Server(settings)
    else:
        from .workers import Master  # noqa: F811 - only where there are workers

        server = Master(settings, zygote)
    for signum in (signal.SIGTERM, signal.SIGINT):  # before ubus starts: libubox would take SIGTERM
        loop.add_signal_handler(signum, server.close)
    background: set[asyncio.Task[Any]] = set()  # signal handlers' work, and following netifd
    loop.add_signal_handler(signal.SIGUSR1, lambda: tasks.start(log_status(server), background))

    async def reload(ask_netifd: bool = True) -> dict:
        """Re-read the settings and apply them; on error keep the running ones."""
        try:
            new = load_settings(command)
            if ask_netifd:
                addresses = await interfaces(new)
            else:  # answering over ubus: netifd can be asked only once that answer is sent
                addresses = {name: server.interface_addresses.get(name, []) for name in new.interfaces}
                tasks.start(follow_interfaces(), background)
            return logged(await server.reload(new, addresses))
        except (SettingsError, ListenError, OSError) as e:
            log.error("reload failed, keeping the running config: %s", e)
            return {"error": str(e)}

    async def follow_interfaces() -> None:
        addresses = await interfaces(server.settings)
        if addresses != server.interface_addresses:
            try:
                logged(await server.reload(server.settings, addresses))
            except ListenError as e:
                log.error("interfaces changed, but: %s", e)

    bridge = _start_ubus(server, lambda: reload(ask_netifd=False), loop, command.ubus_socket)

    warned: set[str] = set()  # interfaces said to have no address, until they have one

    async def interfaces(settings: Settings) -> dict[str, list[str]]:
        """The addresses of the configured interfaces: from netifd over ubus, else from the kernel
        (SettingsError for a name neither knows)."""
        found = await ask_interfaces(settings)
        for name, addresses in found.items():
            if addresses:
                warned.discard(name)
            elif name not in warned:
                warned.add(name)
                log.warning("interface %s has no address (down?): osocks listens on it once it has one", name)
        return found

    async def ask_interfaces(settings: Settings) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for name in settings.interfaces:
            if bridge is None:
                if not netinfo.is_device(name):
                    raise SettingsError(
                        f"interface {name!r}: -i (UCI list interface) names an OpenWrt interface, which needs "
                        "netifd over ubus, and there is no ubus here; off OpenWrt, name a network device (eth0)"
                    )
                found[name] = netinfo.linux_interface_addresses(name)
                continue
            try:
                replies = await asyncio.wrap_future(bridge.call(f"network.interface.{name}", "status", {}))
            except Exception as e:
                log.warning("interface %s: no status from netifd (%s)", name, e)
                replies = []
            from .ubus import interface_addresses

            found[name] = interface_addresses(replies[0]) if replies else []
        return found

    try:
        await server.start(await interfaces(settings))
        loop.add_signal_handler(signal.SIGHUP, lambda: tasks.start(reload(), background))
        listeners = ", ".join(_endpoint(address) for address in server.bound_addresses())
        log.info("osocks %s listening on %s%s", __version__, listeners or "nothing yet", loop_note(settings, loop))
        await server.closed.wait()
    finally:
        server.close()
        await server.closed.wait()  # a master's workers and zygote have ended
        if bridge is not None:
            bridge.stop()
    log.info("osocks stopped")


def _start_ubus(
    server: Server | Master, reload: Callable, loop: asyncio.AbstractEventLoop, socket_path: str | None
) -> UbusBridge | None:
    if socket_path is None and not any(os.path.exists(path) for path in UBUS_SOCKETS):
        log.debug("ubus: no ubusd socket; status is not published")
        return None
    from . import ubus  # only where there is a ubusd to talk to

    if not ubus.available():
        return None
    bridge = ubus.UbusBridge(
        status=server.status,
        sessions=server.sessions,
        reload=reload,
        disconnect=server.disconnect,
        loop=loop,
        socket_path=socket_path,
    )
    try:
        bridge.start()
    except Exception as e:  # no ubusd running: serve anyway
        log.warning("ubus: not connected (%s); status is not published", str(e).strip())
        return None
    return bridge


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        command = cli.parse(args)
        if command.help:
            print(cli.usage(), end="")
            return 0
        if command.version:
            print(f"osocks {__version__}")
            return 0
        settings = load_settings(command)
    except (cli.UsageError, SettingsError) as e:
        cli.die(f"{e} (osocks -h for help)")
    setup_logging(settings)
    raise_fd_limit()
    zygote = None
    if settings.workers != 1:
        from . import workers

        if workers.count(settings) > 1:
            zygote = workers.Zygote.fork(uvloop_too=settings.loop == "uvloop")  # before any thread or event loop
    loop = new_event_loop(settings)
    try:
        loop.run_until_complete(serve(command, settings, zygote))
    except ListenError as e:
        cli.die(str(e), 1)
    except SettingsError as e:
        cli.die(str(e), 2)
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
