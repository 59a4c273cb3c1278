"""README.md, as a newcomer runs it: the run command as root (a container has no sudo)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import ROOT

STUB = '#!/bin/sh\necho "$(basename "$0") $*" >> "$CALLS"\n'
PYTHON_STUB = (
    STUB + 'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; for t in pip osocks; do cp "$0" "$3/bin/$t"; done; fi\n'
)


def run_command() -> str:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("**Run it**"))
    return next(line.strip() for line in lines[start + 1 :] if line.startswith("    "))


def test_the_run_command_works_as_root_without_sudo(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("apt-get", STUB), ("python3", PYTHON_STUB), ("sudo", STUB + "exit 1\n"), ("id", STUB)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "id").write_text("#!/bin/sh\necho 0\n")  # root
    calls = tmp_path / "calls"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "CALLS": str(calls)}
    done = subprocess.run(["sh", "-c", run_command()], env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    ran = calls.read_text().splitlines()
    assert [line.split()[0] for line in ran] == ["apt-get", "apt-get", "python3", "pip", "osocks"], ran
    assert ran[-1] == "osocks -l 127.0.0.1 -p 1080"
    assert os.path.isdir(tmp_path / ".osocks" / "bin")


def test_the_readme_says_local_destinations_are_denied_before_the_first_curl() -> None:
    text = (ROOT / "README.md").read_text()
    top = text[: text.index("## Command line")]
    assert "--allow-local" in top and "(97)" in top
    assert "apt-get" in top.split("**Test it**")[1]
