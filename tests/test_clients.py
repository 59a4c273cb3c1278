"""Real clients: curl, python-socks, PySocks."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import pytest
import socks  # PySocks
from python_socks.sync import Proxy

from conftest import HttpServer, ServerThread

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@pytest.mark.parametrize("mode", ["--socks5-hostname", "--socks5"])
def test_curl_downloads_and_uploads_ten_megabytes(
    osocks: ServerThread, http_server: HttpServer, tmp_path, mode: str
) -> None:
    proxy = f"127.0.0.1:{osocks.port}"
    url = f"http://localhost:{http_server.port}/10M"
    out = tmp_path / "down"
    subprocess.run(["curl", "-sSf", mode, proxy, "-o", str(out), url], check=True, timeout=60)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(http_server.big).hexdigest()

    upload = tmp_path / "up"
    data = os.urandom(10 * 1024 * 1024)
    upload.write_bytes(data)
    answer = subprocess.run(
        [
            "curl",
            "-sSf",
            mode,
            proxy,
            "--data-binary",
            f"@{upload}",
            "-H",
            "Expect:",
            f"http://localhost:{http_server.port}/upload",
        ],
        check=True,
        timeout=60,
        capture_output=True,
    )
    assert answer.stdout.decode() == hashlib.sha256(data).hexdigest()


def test_python_socks(osocks: ServerThread, http_server: HttpServer) -> None:
    proxy = Proxy.from_url(f"socks5://127.0.0.1:{osocks.port}", rdns=True)
    sock = proxy.connect(dest_host="localhost", dest_port=http_server.port, timeout=10)
    with sock:
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.") and data.endswith(b"hello\n")


def test_pysocks(osocks: ServerThread, http_server: HttpServer) -> None:
    sock = socks.socksocket()
    sock.set_proxy(socks.SOCKS5, "127.0.0.1", osocks.port, rdns=False)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", http_server.port))
    with sock:
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert data.endswith(b"hello\n")
