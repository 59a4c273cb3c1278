"""feeds/python3-gssapi and feeds/python3-decorator install what python-gssapi imports on OpenWrt
24.10 and 25.12 (the optional GSSAPI of osocks): the installed gssapi's and decorator's Python
sources read as tests/openwrt/imports.py reads osocks', with the imports of gssapi's compiled
modules (not installed as source) written out below."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_openwrt_imports import stdlib_of

from openwrt import imports, split

gssapi = pytest.importorskip("gssapi", reason="python-gssapi is not installed (pip install -e '.[test]')")
decorator = pytest.importorskip("decorator", reason="decorator (python-gssapi's dependency) is not installed")

FEEDS = split.ROOT / "feeds"
RECIPES = {
    name: split.recipe_depends((FEEDS / name / "Makefile").read_text(), name)
    for name in ("python3-gssapi", "python3-decorator")
}
PROVIDES = {"gssapi": "python3-gssapi", "decorator": "python3-decorator"}
# module-level imports of gssapi 1.12's Cython sources (gssapi/raw/*.pyx), which the wheel leaves out
CYTHON_IMPORTS = ("collections", "collections.abc", "copy", "enum", "locale", "numbers", "typing")
WINDOWS_ONLY = ("gssapi/_win_config.py",)


def needs() -> list[imports.Need]:
    directory = Path(gssapi.__file__).parent
    found = [
        need
        for need in imports.package_needs(directory, "gssapi", directory.parent)
        if not need.where.startswith(("gssapi/tests/", *WINDOWS_ONLY))
    ]
    source = Path(decorator.__file__)
    found += imports.python_needs(source, "decorator", source.name)
    found += [imports.Need(module, "gssapi/raw/*.pyx", f"import {module}") for module in CYTHON_IMPORTS]
    return [need for need in found if not need.optional]


@pytest.mark.parametrize("name", sorted(split.releases()))
def test_python3_gssapi_depends_cover_what_it_imports(name: str) -> None:
    release = split.releases()[name]
    installed = release.closure(["python3-gssapi"], RECIPES)
    assert {"python3-light", "python3-decorator", "krb5-libs"} <= installed
    stdlib, note = stdlib_of(release.python)
    wanted = needs()
    stdlib.prepare({need.module.rstrip("?").split("@")[0] for need in wanted})
    missing = []
    for need in wanted:
        module = need.module.split("@")[0]
        if module.endswith("?"):
            module = module[:-1]
            if not stdlib.is_stdlib(module) or not stdlib.exists(module):
                continue
        top = module.partition(".")[0]
        if not stdlib.is_stdlib(module):
            if PROVIDES.get(top) not in installed:
                missing.append(f"{need.where}: {need.why}: no recipe of feeds/ installs {top!r}")
            continue
        for chain in stdlib.chains(module):
            owner = release.owner(chain[-1])
            if owner not in installed:
                missing.append(f"{need.where}: {' -> '.join(chain)} is in {owner} on OpenWrt {name}{note}")
    assert not missing, "\n".join(sorted(set(missing)))
