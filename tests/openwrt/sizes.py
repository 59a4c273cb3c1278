"""What installing osocks puts on a router, package by package, with sizes measured by applying the
filespecs of python3-packages.toml to the Python running this script (its standard library and
libpython), as OpenWrt packages them: .py files compiled to .pyc (sources go to the -src packages),
shared objects stripped, no test modules (--disable-test-modules).

    python3 tests/openwrt/sizes.py            # the release whose Python runs this (3.11: 24.10)
    python3.13 tests/openwrt/sizes.py         # 25.12

Sizes are of this machine's build (x86-64, glibc); OpenWrt's own builds differ by architecture and
libc, so read them as estimates. Prints a markdown table (feeds/README.md has one per release).
"""

from __future__ import annotations

import fnmatch
import importlib.util
import marshal
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import split  # noqa: E402

TEST_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages"}
NOT_BUILT = ("_test*", "_ctypes_test*", "_xxtestfuzz*", "xxlimited*", "xxsubtype*", "_tkinter*", "nis.*")
OTHER_FEED = {  # what the closure pulls from outside lang/python; not measured here
    "libbz2",
    "zlib",
    "libopenssl",
    "ca-certs",
    "libuv",
    "libubus",
    "libblobmsg-json",
    "libuci",
    "libpthread",
    "libatomic",
}


def installed_size(path: Path) -> int:
    """Bytes the file takes in an OpenWrt package: .pyc for .py, stripped for shared objects."""
    if path.suffix == ".py":
        try:
            code = compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
        except SyntaxError:  # e.g. lib2to3's test data
            return path.stat().st_size
        return len(importlib.util.MAGIC_NUMBER) + 12 + len(marshal.dumps(code))
    if ".so" in path.suffixes and shutil.which("strip"):
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / path.name
            shutil.copyfile(path, copy)
            subprocess.run(["strip", "--strip-unneeded", str(copy)], check=False, capture_output=True)
            return copy.stat().st_size
    return path.stat().st_size


def _matches(rel: str, entry: str) -> bool:
    if entry.endswith(".so"):
        return fnmatch.fnmatchcase(rel, entry[:-3] + ".*.so")
    return rel == entry or rel.startswith(entry + "/") or fnmatch.fnmatchcase(rel, entry)


def stdlib_sizes(release: split.Release, stdlib: Path) -> dict[str, tuple[int, int]]:
    """package -> (files, bytes) for the standard library's packages."""
    found: dict[str, list[int]] = {}
    for path in stdlib.rglob("*"):
        rel = path.relative_to(stdlib).as_posix()
        if path.is_dir() or TEST_DIRS & set(rel.split("/")[:-1]) or rel.split("/")[0] in TEST_DIRS:
            continue
        if rel.startswith("lib-dynload/") and any(fnmatch.fnmatchcase(path.name, p) for p in NOT_BUILT):
            continue
        if rel.startswith("config-"):  # python3-dev
            continue
        owner = next((p.name for p in release.packages.values() for e in p.files if _matches(rel, e)), None)
        if owner is None:
            if any(_matches(rel, e) for e in release.light_excludes_files):
                continue
            owner = "python3-light"
        entry = found.setdefault(owner, [0, 0])
        entry[0] += 1
        entry[1] += installed_size(path)
    return {name: (files, size) for name, (files, size) in found.items()}


def tree_size(directory: Path, skip: tuple[str, ...] = ()) -> tuple[int, int]:
    files = size = 0
    for path in directory.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and not any(fnmatch.fnmatch(path.name, s) for s in skip):
            files += 1
            size += installed_size(path)
    return files, size


def main() -> None:
    release = split.release_for_running_python()
    if release is None:
        sys.exit(f"no OpenWrt release in the table ships Python {sys.version_info[0]}.{sys.version_info[1]}")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sizes = stdlib_sizes(release, stdlib)
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "")
    library = libdir / str(sysconfig.get_config_var("INSTSONAME") or "")
    if library.is_file():
        sizes["libpython3"] = (1, installed_size(library))
    interpreter = Path(sys.base_prefix) / "bin" / f"python{release.python}"
    if interpreter.is_file():
        files, size = sizes.get("python3-base", (0, 0))
        sizes["python3-base"] = (files + 1, size + installed_size(interpreter))
    for module, package, skip in (
        ("uvloop", "python3-uvloop", ("*.pyx", "*.pxd", "*.pxi", "*.pyi")),
        ("osocks", "osocks", ()),
    ):
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.submodule_search_locations:
            sizes[package] = tree_size(Path(next(iter(spec.submodule_search_locations))), skip)
    for module, package in (("ubus", "python3-ubus"), ("uci", "python3-uci"), ("euci", "python3-uci")):
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin:
            origin = Path(spec.origin)
            files, size = tree_size(origin.parent) if origin.name == "__init__.py" else (1, installed_size(origin))
            had = sizes.get(package, (0, 0))
            sizes[package] = (had[0] + files, had[1] + size)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    files_dir = Path(root) / "files"
    if "osocks" in sizes and files_dir.is_dir():
        extra = tree_size(files_dir)
        sizes["osocks"] = (sizes["osocks"][0] + extra[0], sizes["osocks"][1] + extra[1])

    closure = split.installed(release)
    print(f"OpenWrt {release.name}, measured on Python {sys.version.split()[0]} ({sysconfig.get_platform()})\n")
    print("| package | files | KiB |")
    print("|---|---:|---:|")
    total = 0
    for name in sorted(p for p in closure if p not in OTHER_FEED):
        files, size = sizes.get(name, (0, 0))
        total += size
        shown = f"{size / 1024:.0f}" if size else "not measured here"
        print(f"| {name} | {files} | {shown} |")
    print(f"| **total measured** | | **{total / 1024:.0f}** |")
    others = ", ".join(sorted(p for p in closure if p in OTHER_FEED))
    print(f"\nAlso installed, from outside lang/python (not measured here): {others}.")


if __name__ == "__main__":
    main()
