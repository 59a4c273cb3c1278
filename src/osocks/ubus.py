"""The ubus side of osocks: objects `osocks` and `osocks.luci`, and calls out to others.

Methods (the same on both objects): status, sessions, reload, hash_password
{"password"} (a hash to store in UCI) and disconnect {"id"} (an id from sessions).

Built on python-ubus 0.1.3, whose ways were measured against a real ubusd:

* one connection per process (module-level state in the C extension);
* `ubus.loop(ms)` releases the GIL, so it runs here in a thread of its own, in
  short slices, with a stop flag checked between them;
* `ubus.call()` keeps the GIL for the whole call and must not run beside
  `loop()`: every call is queued and made by the loop thread between slices,
  always with a timeout; a call to our own object can never be answered (libubus
  defers incoming requests during a synchronous call), so it is refused at once;
* `handler.reply()` works only while the method callback runs, so the answer is
  computed synchronously there; an exception in a callback reaches the caller as
  a bare "Unknown error", so every failure is caught and answered {"error": "..."};
* a method signature requires every key with its exact blobmsg type, and any
  other key is refused as "Invalid argument".  LuCI's /ubus (uhttpd) adds
  `ubus_rpc_session` to every call, which `ubus call osocks status` never has:
  so the methods are served twice, as `osocks` with the plain arguments, and as
  `osocks.luci` whose signatures add `ubus_rpc_session` (checked by rpcd's ACL
  before the call reaches us, and ignored here).  Rather than an rpcd ucode
  plugin forwarding LuCI's calls: no second hop and no second language, and
  rpcd, which serves all of LuCI one call at a time, never waits on osocks;
* a reply must be a JSON object: the sessions list goes out as {"sessions": [...]}.

Signals: libubox's loop installs its own SIGTERM (and SIGINT) handler when the
process has none, and that handler only ends the current loop slice: the
process would then ignore SIGTERM.  The server must install its SIGTERM handler
(e.g. `loop.add_signal_handler`) before `start()`.  libubox would also take
SIGCHLD and reap every child with waitpid(-1), stealing exit codes from
subprocess and asyncio; `start()` therefore sets a no-op SIGCHLD handler when
none is set (main thread only), which keeps libubox away and changes nothing else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import inspect
import ipaddress
import json
import logging
import queue
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from .auth import hashed_secret

log = logging.getLogger(__name__)
_Call = tuple[str, str, dict[str, Any], concurrent.futures.Future[Any]]  # obj, method, args, result

SLICE_MS = 200  # longest wait of a queued call for the loop thread
ANSWER_TIMEOUT = 2.0  # seconds the event loop has to answer status/sessions
RELOAD_TIMEOUT = 10.0
HASH_TIMEOUT = 10.0  # PBKDF2 takes a second or two on a slow router
CALL_TIMEOUT_MS = 5000  # never 0: python-ubus would wait forever
METHODS: dict[str, tuple[str, ...]] = {  # method → its arguments, all strings
    "status": (),
    "sessions": (),
    "reload": (),
    "hash_password": ("password",),
    "disconnect": ("id",),
}
LUCI_SUFFIX = ".luci"  # object name + this: the methods as LuCI calls them
LUCI_SESSION_ARGUMENT = "ubus_rpc_session"


def available() -> bool:
    """True when python-ubus can be imported (on OpenWrt, package python3-ubus)."""
    try:
        importlib.import_module("ubus")
    except ImportError:
        return False
    return True


def interface_addresses(status: dict[str, Any]) -> list[str]:
    """The addresses to listen on, from `ubus call network.interface.NAME status`; [] when down."""
    if not status.get("up"):
        return []
    entries = [*status.get("ipv4-address", ()), *status.get("ipv6-address", ())]
    entries += [a.get("local-address") for a in status.get("ipv6-prefix-assignment", ())]
    found: list[str] = []
    for entry in entries:
        try:
            address = ipaddress.ip_address(str(entry["address"]))
        except (TypeError, KeyError, ValueError):
            continue
        if not address.is_link_local and str(address) not in found:
            found.append(str(address))
    return found


def _keep_children(signum: int, frame: object) -> None:
    """SIGCHLD handler that does nothing: its presence keeps libubox from reaping."""


class UbusBridge:
    """Serves object `osocks` on ubus; server state is read only on the asyncio loop."""

    def __init__(
        self,
        *,
        status: Callable[[], dict[str, Any] | Awaitable[dict[str, Any]]],
        sessions: Callable[[], list[dict[str, Any]] | Awaitable[list[dict[str, Any]]]],
        reload: Callable[[], Awaitable[dict[str, Any]]],
        disconnect: Callable[[str], dict[str, Any] | Awaitable[dict[str, Any]]],
        loop: asyncio.AbstractEventLoop,
        socket_path: str | None = None,
        object_name: str = "osocks",
    ) -> None:
        async def sessions_object(args: dict[str, str]) -> dict[str, Any]:
            found = sessions()
            return {"sessions": await found if inspect.isawaitable(found) else found}

        async def hash_object(args: dict[str, str]) -> dict[str, Any]:
            return {"hash": await asyncio.to_thread(hashed_secret, args["password"])}

        self._jobs: dict[str, tuple[Callable[[dict[str, str]], Any], float]] = {
            "status": (lambda args: status(), ANSWER_TIMEOUT),
            "sessions": (sessions_object, ANSWER_TIMEOUT),
            "reload": (lambda args: reload(), RELOAD_TIMEOUT),
            "hash_password": (hash_object, HASH_TIMEOUT),
            "disconnect": (lambda args: disconnect(args["id"]), ANSWER_TIMEOUT),
        }
        self._loop = loop
        self._socket_path = socket_path
        self._object_name = object_name
        self._calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # no call is queued once stop is set
        self._thread: threading.Thread | None = None
        self._ubus: Any = None
        self._sigchld_set = False

    def start(self) -> None:
        """Connect, register the object with its methods, start the loop thread."""
        self._ubus = importlib.import_module("ubus")
        if self._ubus.get_connected():
            raise RuntimeError("python-ubus is already connected in this process")
        if self._socket_path:
            self._ubus.connect(socket_path=self._socket_path)
        else:
            self._ubus.connect()
        try:
            self._ubus.add(self._object_name, self._methods(luci=False))
            self._ubus.add(self._object_name + LUCI_SUFFIX, self._methods(luci=True))
        except Exception:
            self._ubus.disconnect()
            raise
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL:
            signal.signal(signal.SIGCHLD, _keep_children)  # before the first uloop_init
            self._sigchld_set = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ubus", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop thread (within a slice, or an answer's timeout) and disconnect."""
        with self._lock:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(RELOAD_TIMEOUT + 1)
            if self._thread.is_alive():
                log.warning("ubus thread did not stop")
            self._thread = None
        self._drain(refuse="ubus bridge stopped")
        if self._sigchld_set and signal.getsignal(signal.SIGCHLD) is _keep_children:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            self._sigchld_set = False

    def call(self, obj: str, method: str, args: dict[str, Any]) -> concurrent.futures.Future[Any]:
        """Call obj.method(args) from the loop thread; the Future gets the list of replies."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if obj == self._object_name:
            future.set_exception(ValueError("python-ubus cannot call its own object"))
        else:
            with self._lock:
                if self._thread is not None and not self._stop.is_set():
                    self._calls.put((obj, method, args, future))
                    return future
            future.set_exception(RuntimeError("ubus bridge is not running"))
        return future

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain()
                self._ubus.loop(SLICE_MS)
        finally:
            with self._lock:
                self._stop.set()
            if self._ubus.get_connected():
                self._ubus.disconnect()
            self._drain(refuse="ubus bridge stopped")

    def _drain(self, refuse: str | None = None) -> None:
        while True:
            try:
                obj, method, args, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                if refuse is not None:
                    raise RuntimeError(refuse)
                future.set_result(self._ubus.call(obj, method, args, CALL_TIMEOUT_MS))
            except Exception as exc:
                future.set_exception(exc)

    def _methods(self, luci: bool) -> dict[str, dict[str, Any]]:
        """python-ubus' method table; for LuCI, every signature also has the session argument."""
        string = self._ubus.BLOBMSG_TYPE_STRING
        methods = {}
        for name, arguments in METHODS.items():
            signature = dict.fromkeys(arguments, string)
            if luci:
                signature[LUCI_SESSION_ARGUMENT] = string
            methods[name] = {"signature": signature, "method": self._method(name)}
        return methods

    def _method(self, name: str) -> Callable[[Any, Any], None]:
        job, timeout = self._jobs[name]

        async def run(args: dict[str, str]) -> Any:
            answer = job(args)
            return await answer if inspect.isawaitable(answer) else answer

        def handle(handler: Any, args: Any) -> None:
            coro = run(args if isinstance(args, dict) else {})
            try:
                try:
                    pending = asyncio.run_coroutine_threadsafe(coro, self._loop)
                except Exception:
                    coro.close()
                    raise
                try:
                    answer = pending.result(timeout)
                except TimeoutError:
                    pending.cancel()
                    raise TimeoutError(f"no answer within {timeout:g} s") from None
                reply = json.loads(json.dumps(answer, default=str))
                if not isinstance(reply, dict):
                    raise TypeError(f"{name} answered {type(answer).__name__}, not a dict")
            except Exception as exc:
                log.warning("ubus %s failed: %s", name, exc)
                reply = {"error": str(exc) or type(exc).__name__}
            handler.reply(reply)

        return handle
