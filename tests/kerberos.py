"""A throwaway MIT Kerberos realm for the GSSAPI tests: a real KDC on loopback.

Everything lives under one temporary directory and is reached through the
environment (KRB5_CONFIG, KRB5_KDC_PROFILE, KRB5CCNAME, KRB5_KTNAME,
KRB5RCACHEDIR): the host's /etc/krb5.conf is neither read nor written.

    realm = Realm.create(tmp_path)          # kdb5_util create, krb5kdc on 127.0.0.1
    realm.add_user("alice")                  # a principal with a password
    realm.add_service("rcmd/localhost")      # a random key, exported to realm.keytab
    realm.kinit("alice")                     # a ticket in realm.ccache
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

REALM = "OSOCKS.TEST"
PASSWORD = "correct horse battery staple"
TOOLS = ("kdb5_util", "krb5kdc", "kadmin.local", "kinit", "klist", "kdestroy")
SBIN = ("/usr/sbin", "/sbin")


def tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in SBIN:
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    return None


def missing_tools() -> list[str]:
    return [name for name in TOOLS if tool(name) is None]


def _free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (the KDC listens on both)."""
    for _ in range(50):
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port for the KDC")


class Realm:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.realm = REALM
        self.krb5_conf = root / "krb5.conf"
        self.kdc_conf = root / "kdc.conf"
        self.keytab = root / "service.keytab"
        self.ccache = root / "ccache"
        self.rcache = root / "rcache"
        self.port = 0
        self.kdc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to use this realm (added to the environment given)."""
        return {
            "KRB5_CONFIG": str(self.krb5_conf),
            "KRB5_KDC_PROFILE": str(self.kdc_conf),
            "KRB5CCNAME": f"FILE:{self.ccache}",
            "KRB5_KTNAME": f"FILE:{self.keytab}",
            "KRB5RCACHEDIR": str(self.rcache),
            "KRB5_TRACE": "/dev/null",
        }

    def _write_configs(self) -> None:
        root = self.root
        self.krb5_conf.write_text(
            f"""[libdefaults]
    default_realm = {REALM}
    dns_lookup_kdc = false
    dns_lookup_realm = false
    dns_canonicalize_hostname = false
    rdns = false
    ignore_acceptor_hostname = false
    clockskew = 1
    udp_preference_limit = 1
    default_ccache_name = FILE:{self.ccache}
    default_keytab_name = FILE:{self.keytab}
    permitted_enctypes = aes256-cts-hmac-sha1-96 aes128-cts-hmac-sha1-96
[realms]
    {REALM} = {{
        kdc = 127.0.0.1:{self.port}
    }}
[domain_realm]
    localhost = {REALM}
"""
        )
        self.kdc_conf.write_text(
            f"""[kdcdefaults]
    kdc_listen = 127.0.0.1:{self.port}
    kdc_tcp_listen = 127.0.0.1:{self.port}
[realms]
    {REALM} = {{
        database_name = {root}/principal
        key_stash_file = {root}/stash
        acl_file = {root}/kadm5.acl
        kdc_listen = 127.0.0.1:{self.port}
        kdc_tcp_listen = 127.0.0.1:{self.port}
        kadmind_listen = 127.0.0.1:{self.port + 1}
        max_life = 1h
        max_renewable_life = 0
        supported_enctypes = aes256-cts-hmac-sha1-96:normal
    }}
[logging]
    kdc = FILE:{root}/kdc.log
    default = FILE:{root}/kdc.log
"""
        )
        (root / "kadm5.acl").write_text("")
        self.rcache.mkdir(exist_ok=True)

    def run(self, *argv: str, stdin: str | None = None) -> str:
        """A Kerberos tool with this realm's environment; its output, or RuntimeError."""
        path = tool(argv[0])
        if path is None:
            raise RuntimeError(f"{argv[0]} is not installed")
        done = subprocess.run(
            [path, *argv[1:]],
            input=stdin,
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
            timeout=60,
        )
        if done.returncode:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    @classmethod
    def create(cls, root: Path) -> Realm:
        realm = cls(root)
        realm.port = _free_port()
        realm._write_configs()
        realm.run("kdb5_util", "create", "-s", "-r", REALM, "-P", "master key of the test realm", "-W")
        realm._start_kdc()
        return realm

    def _start_kdc(self) -> None:
        path = tool("krb5kdc")
        assert path is not None
        self.kdc = subprocess.Popen(
            [path, "-n", "-r", REALM, "-P", str(self.root / "kdc.pid")],
            env={**os.environ, **self.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.kdc.poll() is not None:
                raise RuntimeError(f"krb5kdc exited: {self.kdc.stderr.read() if self.kdc.stderr else ''}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("krb5kdc did not start listening")

    def kadmin(self, query: str) -> str:
        return self.run("kadmin.local", "-r", REALM, "-q", query)

    def add_user(self, name: str, password: str = PASSWORD) -> str:
        self.kadmin(f'addprinc -pw "{password}" {name}')
        return f"{name}@{REALM}"

    def add_service(self, name: str, keytab: Path | None = None) -> str:
        """A service principal with a random key, exported to `keytab` (the realm's by default)."""
        self.kadmin(f"addprinc -randkey {name}")
        self.kadmin(f"ktadd -k {keytab or self.keytab} {name}")
        return f"{name}@{REALM}"

    def kinit(
        self, name: str, password: str = PASSWORD, lifetime: str | None = None, ccache: Path | None = None
    ) -> Path:
        """Tickets for `name` in `ccache` (the realm's by default) via kinit, the password on stdin."""
        ccache = ccache or self.ccache
        argv = ["kinit", "-c", f"FILE:{ccache}"]
        if lifetime:
            argv += ["-l", lifetime]
        self.run(*argv, f"{name}@{REALM}", stdin=password + "\n")
        return ccache

    def kdestroy(self, ccache: Path | None = None) -> None:
        path = ccache or self.ccache
        if path.exists():
            self.run("kdestroy", "-c", f"FILE:{path}")

    def stop(self) -> None:
        if self.kdc is not None and self.kdc.poll() is None:
            self.kdc.send_signal(signal.SIGTERM)
            try:
                self.kdc.wait(10)
            except subprocess.TimeoutExpired:
                self.kdc.kill()
                self.kdc.wait(5)
