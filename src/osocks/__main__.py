"""`osocks` and `python -m osocks`: settings, logging, event loop, signals."""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import os
import signal
import sys
from collections.abc import Callable

from . import __version__, cli
from .server import ListenError, Server
from .settings import DEFAULTS, Settings, SettingsError

log = logging.getLogger("osocks")

UCI_DIR = "/etc/config"


def load_settings(command: cli.Command) -> Settings:
    """Defaults, then UCI (when asked for, or when pyuci and /etc/config/osocks exist), then the flags."""
    base = DEFAULTS
    if not command.no_uci:
        from . import uci

        if command.uci is not None:
            base = uci.load(command.uci)
        elif uci.available() and os.path.exists(f"{UCI_DIR}/osocks"):
            base = uci.load("osocks")
    return command.settings(base)


def setup_logging(settings: Settings) -> None:
    level = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}.get(
        max(-2, settings.verbosity), logging.DEBUG
    )
    handler: logging.Handler
    if settings.syslog:
        handler = logging.handlers.SysLogHandler("/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter("osocks[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("osocks: %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        log.info("uvloop is not installed: using the stock asyncio event loop")
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def serve(settings: Settings, reload_settings: Callable[[], Settings]) -> None:
    server = Server(settings)
    await server.start()
    loop = asyncio.get_running_loop()

    async def reload() -> dict:
        try:
            new = reload_settings()
        except (SettingsError, OSError) as e:
            log.error("reload failed, keeping the running config: %s", e)
            return {"error": str(e)}
        try:
            return await server.reload(new)
        except ListenError as e:
            log.error("reload failed, keeping the running config: %s", e)
            return {"error": str(e)}

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.close)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload()))
    bridge = _start_ubus(server, reload, loop)
    log.info("osocks %s listening on %s", __version__, ", ".join(server.status()["listeners"]))
    try:
        await server.closed.wait()
    finally:
        if bridge is not None:
            bridge.stop()
    log.info("osocks stopped")


def _start_ubus(server: Server, reload: Callable, loop: asyncio.AbstractEventLoop) -> object | None:
    from . import ubus

    if not ubus.available():
        return None
    bridge = ubus.UbusBridge(status=server.status, sessions=server.sessions, reload=reload, loop=loop)
    try:
        bridge.start()
    except Exception as e:  # no ubusd running: serve anyway
        log.warning("ubus: not connected (%s); status is not published", e)
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
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(settings, lambda: load_settings(command)))
    except ListenError as e:
        cli.die(str(e), 1)
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
