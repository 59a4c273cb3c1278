"""Starting and stopping the processes a benchmark run needs: nginx, the SOCKS servers, privoxy,
the echo server and the curl downloads.

Every process is started in a new session, so it leads its own process group,
and is stopped by signalling that group; leftover descendants are killed by PID.
"""

from __future__ import annotations

import compileall
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proctree import process_tree
from socks5 import Endpoint

LOCALHOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


class StartError(RuntimeError):
    """A process did not come up listening on its port."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _last_log_line(log: Path) -> str:
    """The last line a process printed: for a Python traceback, the exception."""
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return lines[-1] if lines else "(no output)"


def _wait_until_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StartError(f"server exited with status {process.returncode}: {_last_log_line(log)}")
        try:
            socket.create_connection((LOCALHOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise StartError(f"server not listening on port {port} after {START_TIMEOUT:.0f} s: {_last_log_line(log)}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    descendants = process_tree(process.pid)[1:]
    for signal_number, grace in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, STOP_TIMEOUT)):
        try:
            os.killpg(process.pid, signal_number)
        except ProcessLookupError:
            break
        try:
            process.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue
    for pid in descendants:  # any that left the process group
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _start(
    argv: list[str], workdir: Path, log: Path, env: Mapping[str, str] | None = None, output_to_null: bool = False
) -> subprocess.Popen[bytes]:
    """Start argv in a new session, its messages (and its output, unless output_to_null) in log."""
    with log.open("wb") as messages:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if output_to_null else messages,
            stderr=messages if output_to_null else subprocess.STDOUT,
            cwd=workdir,
            env=None if env is None else dict(env),
            start_new_session=True,
        )


@contextmanager
def running(
    name: str, argv: list[str], port: int, workdir: Path, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run argv until the block ends; returns once it accepts connections on port."""
    log = workdir / f"{name}.log"
    process = _start(argv, workdir, log, env)
    try:
        _wait_until_listening(process, port, log)
        yield process
    finally:
        _stop(process)


# --- nginx -------------------------------------------------------------------

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {open_files};
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections {open_files}; }}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 100000;
    keepalive_timeout 600s;
    default_type application/octet-stream;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    server {{
        listen {host}:{port};
        root {docroot};
    }}
}}
"""

_WRITE_CHUNK = 1 << 20


SERVED_SHA256: dict[str, str] = {}  # "/NAME" -> the sha256 of the file nginx serves there


def _write_random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as output:
        for offset in range(0, size, _WRITE_CHUNK):
            chunk = os.urandom(min(_WRITE_CHUNK, size - offset))
            digest.update(chunk)
            output.write(chunk)
    return digest.hexdigest()


def _make_docroot(docroot: Path, file_sizes: Mapping[str, int]) -> None:
    docroot.mkdir()
    for name, size in file_sizes.items():
        SERVED_SHA256["/" + name] = _write_random_file(docroot / name, size)


@contextmanager
def nginx(workdir: Path, file_sizes: Mapping[str, int], open_files: int) -> Iterator[Endpoint]:
    """An nginx serving file_sizes (name -> bytes of random content) on a free port.

    Started as root, nginx's worker runs as "nobody", so every directory above
    workdir must be searchable by others.
    """
    docroot = workdir / "docroot"
    _make_docroot(docroot, file_sizes)
    workdir.chmod(0o755)
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(workdir=workdir, docroot=docroot, host=LOCALHOST, port=port, open_files=open_files)
    )
    nginx_program = shutil.which("nginx") or "/usr/sbin/nginx"
    with running("nginx", [nginx_program, "-c", str(conf), "-p", str(workdir)], port, workdir):
        yield Endpoint(LOCALHOST, port)


# --- SOCKS servers -----------------------------------------------------------


@dataclass(frozen=True)
class SocksServer:
    """How to start one SOCKS server under test; `name` labels its column."""

    name: str
    program: str
    arguments: Callable[[int, Path], list[str]]  # (port, workdir) -> argv[1:]
    env: Mapping[str, str] | None = field(default=None)
    status_log: str = ""  # osocks: the log it writes its status to on SIGUSR1

    def is_installed(self) -> bool:
        return Path(self.program).exists() or shutil.which(self.program) is not None

    @contextmanager
    def serving(self, workdir: Path) -> Iterator[tuple[Endpoint, int]]:
        """Start the server on a free port: (its endpoint, its PID) until the block ends."""
        port = free_port()
        argv = [self.program, *self.arguments(port, workdir)]
        with running(_log_name(self.name), argv, port, workdir, self.env) as process:
            yield Endpoint(LOCALHOST, port), process.pid


def _environment_with_repo_sources() -> dict[str, str]:
    """os.environ, with the repository's src/ first on PYTHONPATH so osocks runs uninstalled."""
    env = dict(os.environ)
    paths = [str(REPO / "src"), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def osocks(extra_arguments: list[str]) -> SocksServer:
    """osocks from this checkout; --no-uci keeps a host's /etc/config/osocks out of the figures.

    Its modules are compiled to bytecode first, as an installed package ships them: compiling
    the sources at each start (PYTHONDONTWRITEBYTECODE) would leave ~0.7 MB of the compiler's
    garbage in the idle figure.
    """
    compileall.compile_dir(REPO / "src" / "osocks", quiet=1)

    def arguments(port: int, _: Path) -> list[str]:
        listen = ["-l", LOCALHOST, "-p", str(port)]
        return ["-m", "osocks", *listen, "-q", "--allow-local", "--no-uci", *extra_arguments]

    name = " ".join(["osocks", *extra_arguments])
    return SocksServer(
        name=name,
        program=sys.executable,
        arguments=arguments,
        env=_environment_with_repo_sources(),
        status_log=_log_name(name),
    )


# The shipped files/osocks.config, with which a router serves: a log line per session (no -q)
# and destinations on this host denied.  The bench's destinations are all on 127.0.0.1, which
# the built-in local deny refuses whatever the rules say, so this column lifts it and puts the
# rules in its place: 127.0.0.1 reachable, every other destination (::1, this host's other
# addresses, anywhere else) denied, each session's destination checked against them.
SHIPPED = "osocks shipped"
SHIPPED_ARGUMENTS = ["--allow-local", "--dest-rule", f"allow {LOCALHOST}", "--dest-rule", "deny all"]


def osocks_shipped() -> SocksServer:
    """osocks as files/osocks.config ships it, with SHIPPED_ARGUMENTS to reach the bench's servers."""
    compileall.compile_dir(REPO / "src" / "osocks", quiet=1)

    def arguments(port: int, _: Path) -> list[str]:
        return ["-m", "osocks", "-l", LOCALHOST, "-p", str(port), "--no-uci", *SHIPPED_ARGUMENTS]

    return SocksServer(
        name=SHIPPED,
        program=sys.executable,
        arguments=arguments,
        env=_environment_with_repo_sources(),
        status_log=_log_name(SHIPPED),
    )


STATUS_LINE = "osocks: INFO status "


def _log_name(server_name: str) -> str:
    return server_name.replace(" ", "_")


def osocks_status(log: Path, pid: int, timeout: float = 10.0) -> dict[str, Any]:
    """The status osocks logs (to `log`) on SIGUSR1."""
    seen = log.read_text(errors="replace").count(STATUS_LINE)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith(STATUS_LINE)]
        if len(lines) > seen:
            status: dict[str, Any] = json.loads(lines[-1][len(STATUS_LINE) :])
            return status
        time.sleep(0.05)
    raise StartError(f"osocks (pid {pid}) logged no status within {timeout:g} s of SIGUSR1")


def command(name: str, argv: list[str]) -> SocksServer:
    """A server given on the command line (run.py --server): argv, {port} replaced by its port."""

    def arguments(port: int, _: Path) -> list[str]:
        return [word.replace("{port}", str(port)) for word in argv[1:]]

    return SocksServer(name=name, program=argv[0], arguments=arguments)


MICROSOCKS = "/usr/bin/microsocks"


def _microsocks_knows_quiet() -> bool:
    """microsocks before 1.0.4 has no -q (and logs nothing per session anyway)."""
    usage = subprocess.run([MICROSOCKS, "-h"], capture_output=True, text=True, timeout=10)
    return " -q" in usage.stdout + usage.stderr


def microsocks() -> SocksServer:
    def arguments(port: int, _: Path) -> list[str]:
        quiet = ["-q"] if _microsocks_knows_quiet() else []
        return ["-i", LOCALHOST, "-p", str(port), *quiet]

    return SocksServer(name="microsocks", program=MICROSOCKS, arguments=arguments)


DANTED = "/usr/sbin/danted"

DANTE_CONF = """\
logoutput: stderr
internal: {host} port = {port}
external: {host}
socksmethod: none
clientmethod: none
{users}
client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}
socks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}
"""

# Dante switches to these users only when started as root.
_DANTE_USERS = "user.privileged: root\nuser.unprivileged: nobody\n"


def dante() -> SocksServer:
    def arguments(port: int, workdir: Path) -> list[str]:
        conf = workdir / "danted.conf"
        users = _DANTE_USERS if os.geteuid() == 0 else ""
        conf.write_text(DANTE_CONF.format(host=LOCALHOST, port=port, users=users))
        return ["-f", str(conf), "-p", str(workdir / "danted.pid"), "-N", "1"]

    return SocksServer(name="dante", program=DANTED, arguments=arguments)


# --- privoxy -----------------------------------------------------------------

PRIVOXY = "/usr/sbin/privoxy"

PRIVOXY_CONF = """\
listen-address {host}:{port}
forward-socks5 / {socks_host}:{socks_port} .
"""


@contextmanager
def privoxy(workdir: Path, socks: Endpoint) -> Iterator[Endpoint]:
    """privoxy forwarding every request through the SOCKS server at socks, no logging."""
    port = free_port()
    conf = workdir / "privoxy.conf"
    conf.write_text(PRIVOXY_CONF.format(host=LOCALHOST, port=port, socks_host=socks.host, socks_port=socks.port))
    with running("privoxy", [PRIVOXY, "--no-daemon", str(conf)], port, workdir):
        yield Endpoint(LOCALHOST, port)


# --- echo server and curl downloads (fairness scenario) -----------------------

ECHO = Path(__file__).resolve().parent / "echo.py"
CURL = "/usr/bin/curl"


@contextmanager
def echo_server(workdir: Path, lifetime: float) -> Iterator[Endpoint]:
    """bench/echo.py on a free port, in its own process, for at most lifetime seconds."""
    port = free_port()
    with running("echo", [sys.executable, str(ECHO), str(port), f"{lifetime:g}"], port, workdir):
        yield Endpoint(LOCALHOST, port)


def last_message(workdir: Path, name: str) -> str:
    """The last line that the process started as name printed."""
    return _last_log_line(workdir / f"{name}.log")


@contextmanager
def socks_downloads(
    proxy: Endpoint, url_glob: str, streams: int, workdir: Path, transfer_timeout: float
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """streams curl processes, each fetching every URL of url_glob (e.g. ".../64M?[1-100]") in turn
    through proxy, over one SOCKS session, into /dev/null; stopped when the block ends.

    Process number i logs its errors to curl-i.log in workdir; a failed transfer ends it.
    """
    argv = [CURL, "-fsS", "--fail-early", "--max-time", f"{transfer_timeout:g}"]
    argv += ["--socks5", f"{proxy.host}:{proxy.port}", url_glob]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for number in range(streams):
            processes.append(_start(argv, workdir, workdir / f"curl-{number}.log", output_to_null=True))
        yield processes
    finally:
        for process in processes:
            _stop(process)
