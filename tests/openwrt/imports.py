"""What a package's code imports, read from its sources, and the standard-library modules that
those imports load in turn.

- Python sources are read with `ast`: every import, inside functions too (the lazy ones), except
  those under `if TYPE_CHECKING:` or `if __name__ == "__main__":`; `importlib.import_module("name")`
  with a literal name counts.
  An import inside `try:` whose handler catches ImportError, or inside `with suppress(ImportError):`,
  is optional (the code copes without it).
- Cython sources (.pyx, .pxi: uvloop) are read line by line for `import` and `from ... import`.
- Some needs are not import statements: a host name given to getaddrinfo is encoded with the idna
  codec (encodings.idna), and some functions exist only with an optional C module (USES_NEEDING).
- The standard library's own imports are followed where they run at import time (module level,
  class bodies) and are not optional; its lazy imports are left to the guarded run
  (tests/test_openwrt_stdlib.py), which runs the real code.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# (module, attribute) used by the code -> (the optional C module it needs, from which Python on)
USES_NEEDING = {
    ("hashlib", "scrypt"): ("_hashlib", (3, 0)),  # only OpenSSL's scrypt exists
    ("hashlib", "pbkdf2_hmac"): ("_hashlib", (3, 12)),  # the pure-Python fallback is gone in 3.12
}
NAME_LOOKUPS = re.compile(r"\bgetaddrinfo\b|['\"]idna['\"]")
OPTIONAL_HANDLERS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


@dataclass(frozen=True)
class Need:
    module: str  # a module that must import
    where: str  # file:line that needs it
    why: str  # "imports X", "hashlib.scrypt", ...
    optional: bool = False  # inside try/except ImportError: the code copes without it


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in OPTIONAL_HANDLERS for n in names)


def _suppresses_import_error(expr: ast.expr) -> bool:
    if not isinstance(expr, ast.Call):
        return False
    func = expr.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    return name == "suppress" and any(isinstance(a, ast.Name) and a.id in OPTIONAL_HANDLERS for a in expr.args)


def _never_at_import(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` and `if __name__ == "__main__":` bodies do not run when a module is imported."""
    if isinstance(test, ast.Name | ast.Attribute):
        return (test.id if isinstance(test, ast.Name) else test.attr) == "TYPE_CHECKING"
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    )


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = parts[: len(parts) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


class _Walker(ast.NodeVisitor):
    def __init__(self, package: str, where: str, lazy: bool) -> None:
        self.package = package  # the package a relative import is relative to
        self.where = where
        self.lazy = lazy  # follow imports inside functions
        self.optional = 0
        self.needs: list[Need] = []

    def add(self, module: str, node: ast.AST, why: str) -> None:
        self.needs.append(Need(module, f"{self.where}:{getattr(node, 'lineno', 0)}", why, self.optional > 0))

    def visit_Import(self, node: ast.Import) -> None:  # noqa: N802
        for alias in node.names:
            self.add(alias.name, node, f"imports {alias.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:  # noqa: N802
        module = _absolute(node, self.package)
        self.add(module, node, f"imports {module}")
        for alias in node.names:  # `from package import submodule`
            self.add(f"{module}.{alias.name}?", node, f"imports {module}.{alias.name}")

    def visit_If(self, node: ast.If) -> None:  # noqa: N802
        if _never_at_import(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Try(self, node: ast.Try) -> None:  # noqa: N802
        optional = any(_catches_import_error(h) for h in node.handlers)
        self.optional += optional
        for child in node.body:
            self.visit(child)
        self.optional -= optional
        for child in [*node.handlers, *node.orelse, *node.finalbody]:
            self.visit(child)

    def visit_With(self, node: ast.With) -> None:  # noqa: N802
        """`with contextlib.suppress(ImportError):` makes its imports optional, as a try would."""
        optional = any(_suppresses_import_error(item.context_expr) for item in node.items)
        self.optional += optional
        self.generic_visit(node)
        self.optional -= optional

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:  # noqa: N802
        if self.lazy:
            self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]  # noqa: N815

    def visit_Call(self, node: ast.Call) -> None:  # noqa: N802
        func = node.func
        if (
            isinstance(func, ast.Attribute)
            and func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            self.add(node.args[0].value, node, f"imports {node.args[0].value}")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:  # noqa: N802
        if isinstance(node.value, ast.Name) and (node.value.id, node.attr) in USES_NEEDING:
            module, since = USES_NEEDING[node.value.id, node.attr]
            where, why = f"{self.where}:{node.lineno}", f"{node.value.id}.{node.attr}"
            self.needs.append(Need(f"{module}@{since[0]}.{since[1]}", where, why, self.optional > 0))
        self.generic_visit(node)


def python_needs(path: Path, package: str, where: str, lazy: bool = True) -> list[Need]:
    """The imports of one Python source file; `package` is the package its relative imports start from."""
    text = path.read_text()
    walker = _Walker(package, where, lazy)
    walker.visit(ast.parse(text, str(path)))
    needs = walker.needs
    for number, line in enumerate(text.splitlines(), 1):
        if NAME_LOOKUPS.search(line) and not line.lstrip().startswith("#"):
            needs.append(Need("encodings.idna", f"{where}:{number}", "a host name lookup (the idna codec)"))
            break
    return needs


_CYTHON_IMPORT = re.compile(r"^\s*(?:import\s+([\w., \\]+)|from\s+([\w.]+)\s+(?:c?import)\s)")


def cython_needs(path: Path, where: str) -> list[Need]:
    """`import a, b.c` and `from x import y` lines of a .pyx/.pxi file (cimports are compile-time only)."""
    needs = []
    lines = path.read_text().replace("\\\n", " ").splitlines()
    for number, line in enumerate(lines, 1):
        if re.match(r"^\s*(from\s+\S+\s+)?cimport\s", line):
            continue
        m = _CYTHON_IMPORT.match(line)
        if m and m[1]:
            for name in m[1].replace("\\", " ").split(","):
                name = name.split(" as ")[0].strip()
                if name:
                    needs.append(Need(name, f"{where}:{number}", f"imports {name}"))
        elif m and m[2] and " cimport " not in line and not m[2].startswith("."):
            needs.append(Need(m[2], f"{where}:{number}", f"imports {m[2]}"))
        if NAME_LOOKUPS.search(line) and not line.lstrip().startswith("#"):
            needs.append(Need("encodings.idna", f"{where}:{number}", "a host name lookup (the idna codec)"))
    return needs


def package_needs(directory: Path, package: str, where_root: Path) -> list[Need]:
    """Every need of a package directory (Python and Cython sources)."""
    needs = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(where_root).as_posix()
        sub = ".".join([package, *path.relative_to(directory).parent.parts])
        if path.suffix == ".py":
            name = sub if path.name == "__init__.py" else f"{sub}.{path.stem}"
            needs += python_needs(path, name if path.name == "__init__.py" else sub, rel)
        elif path.suffix in (".pyx", ".pxi"):
            needs += cython_needs(path, rel)
    return needs


# -- the standard library's own imports -----------------------------------------------------------


class Stdlib:
    """One Python's standard-library sources: finds a module's file and its import-time imports."""

    def __init__(self, directory: Path, version: tuple[int, int], names: set[str]) -> None:
        self.directory = directory
        self.version = version
        self.names = names  # sys.stdlib_module_names of that Python
        self._cache: dict[str, list[str]] = {}

    @classmethod
    def running(cls) -> Stdlib:
        import sysconfig

        return cls(Path(sysconfig.get_paths()["stdlib"]), sys.version_info[:2], set(sys.stdlib_module_names))

    def prepare(self, modules: set[str]) -> None:
        """Nothing to do ahead: this Python reads its own sources as it goes."""

    def is_stdlib(self, module: str) -> bool:
        top = module.partition(".")[0]
        return top in self.names or top in sys.builtin_module_names

    def source(self, module: str) -> Path | None:
        base = self.directory.joinpath(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def exists(self, module: str) -> bool:
        if self.source(module) is not None or module in sys.builtin_module_names:
            return True
        return any((self.directory / "lib-dynload").glob(f"{module}.*.so")) or (
            self.directory.joinpath(*module.split(".")).is_dir()
        )

    def imports(self, module: str) -> list[str]:
        """What importing `module` imports at once (not optional, not inside functions)."""
        if module not in self._cache:
            path = self.source(module)
            found: list[str] = []
            if path is not None:
                package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                for need in python_needs(path, package, module, lazy=False):
                    if need.optional:
                        continue
                    if not need.module.endswith("?") and "@" not in need.module:
                        found.append(need.module)
                    elif need.module.endswith("?") and self.exists(need.module[:-1]):
                        found.append(need.module[:-1])
            parent = module.rpartition(".")[0]
            if parent:
                found.append(parent)
            self._cache[module] = found
        return self._cache[module]

    def chains(self, start: str) -> Iterator[tuple[str, ...]]:
        """Every standard-library module importing `start` loads, each with the import chain to it."""
        seen = {start}
        todo: list[tuple[str, ...]] = [(start,)]
        while todo:
            chain = todo.pop()
            yield chain
            for name in self.imports(chain[-1]):
                if name not in seen and self.is_stdlib(name):
                    seen.add(name)
                    todo.append((*chain, name))


class ForeignStdlib:
    """The standard library of another Python on this machine, read by that Python (its own parser
    reads its own syntax): runs this file there once per batch of modules."""

    def __init__(self, python: str) -> None:
        self.python = python
        answer = self._ask([])
        self.version = tuple(answer["version"])
        self.names = set(answer["names"])
        self._chains: dict[str, list[tuple[str, ...]]] = {}
        self._exists: dict[str, bool] = {}

    def _ask(self, modules: list[str]) -> dict:
        import json
        import subprocess

        out = subprocess.run(
            [self.python, __file__, *modules], capture_output=True, text=True, check=True, timeout=120
        ).stdout
        return json.loads(out)

    def prepare(self, modules: set[str]) -> None:
        todo = sorted(m for m in modules if m not in self._exists)
        if todo:
            answer = self._ask(todo)
            self._exists.update(answer["exists"])
            self._chains.update({m: [tuple(c) for c in chains] for m, chains in answer["chains"].items()})

    def is_stdlib(self, module: str) -> bool:
        return module.partition(".")[0] in self.names

    def exists(self, module: str) -> bool:
        self.prepare({module})
        return self._exists[module]

    def chains(self, start: str) -> Iterator[tuple[str, ...]]:
        self.prepare({start})
        return iter(self._chains[start])


def main() -> None:
    """python3.X imports.py MODULE...: this Python's version and module names, and for each MODULE
    whether it exists and its import chains, as JSON (see ForeignStdlib)."""
    import json

    stdlib = Stdlib.running()
    modules = sys.argv[1:]
    print(
        json.dumps(
            {
                "version": list(sys.version_info[:2]),
                "names": sorted(sys.stdlib_module_names),
                "exists": {m: stdlib.exists(m) for m in modules},
                "chains": {m: [list(c) for c in stdlib.chains(m)] if stdlib.is_stdlib(m) else [] for m in modules},
            }
        )
    )


if __name__ == "__main__":
    main()
