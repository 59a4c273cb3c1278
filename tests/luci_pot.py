"""The translation template of luci-app-osocks: every _('...') string of its views, and its menu titles.

    python3 tests/luci_pot.py           # rewrite feeds/luci-app-osocks/po/templates/osocks.pot
    python3 tests/luci_pot.py --check   # exit 1 when it is out of date

LuCI's own tool (build/i18n-scan.pl) needs a LuCI tree; this does the same for our one app,
in its format (msgids sorted, each with the files and lines it comes from)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "feeds" / "luci-app-osocks"
POT = APP / "po" / "templates" / "osocks.pot"
# _( then one JS string literal, then the end of the first argument
CALL = re.compile(r"""(?<![\w$.])_\(\s*('(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")\s*[,)]""")
JS_ESCAPES = {"n": "\n", "t": "\t", "'": "'", '"': '"', "\\": "\\"}


def unquote(literal: str) -> str:
    return re.sub(r"\\(.)", lambda m: JS_ESCAPES.get(m.group(1), m.group(1)), literal[1:-1])


def po_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'


def messages(app: Path = APP) -> dict[str, list[str]]:
    """msgid → the places (path:line) it comes from."""
    found: dict[str, list[str]] = {}
    for path in sorted((app / "htdocs").rglob("*.js")):
        source = path.read_text(encoding="utf-8")
        for match in CALL.finditer(source):
            line = source.count("\n", 0, match.start()) + 1
            found.setdefault(unquote(match.group(1)), []).append(f"{path.relative_to(app)}:{line}")
    for path in sorted((app / "root" / "usr" / "share" / "luci" / "menu.d").glob("*.json")):
        for node in json.loads(path.read_text(encoding="utf-8")).values():
            if "title" in node:
                found.setdefault(node["title"], []).append(str(path.relative_to(app)))
    return found


def template(app: Path = APP) -> str:
    out = ['msgid ""', 'msgstr "Content-Type: text/plain; charset=UTF-8"', ""]
    for msgid, places in sorted(messages(app).items()):
        out += [f"#: {' '.join(places)}", f"msgid {po_quote(msgid)}", 'msgstr ""', ""]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    text = template()
    if "--check" in argv:
        if not POT.exists() or POT.read_text(encoding="utf-8") != text:
            print(f"{POT} is out of date: run python3 tests/luci_pot.py", file=sys.stderr)
            return 1
        return 0
    POT.parent.mkdir(parents=True, exist_ok=True)
    POT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
