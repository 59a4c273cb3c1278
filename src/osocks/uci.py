"""UCI configuration (/etc/config/osocks) → Settings.

`settings_from_sections` is pure.  It takes the config's sections as plain dicts,
the way pyuci's `get_all(config)` returns them: section name → {option: str, or a
tuple of str for a `list`}.  pyuci gives no section types, so `load` adds each
type under the key ".type"; other keys starting with "." (ubus `uci get` adds
".name", ".anonymous", ".index") are ignored.  Times are milliseconds in UCI.

    config osocks 'main'
        list interface 'lan'
        option port '1080'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from .settings import (
    DEFAULTS,
    Settings,
    SettingsError,
    User,
    parse_networks,
    parse_rules,
    parse_user,
    unique_users,
    user_file_entries,
)

SECTION_TYPE = "osocks"

BOOLEANS = {
    **dict.fromkeys(("1", "yes", "on", "true", "enabled"), True),
    **dict.fromkeys(("0", "no", "off", "false", "disabled"), False),
}


def _bool(at: str, text: str) -> bool:
    try:
        return BOOLEANS[text.lower()]
    except KeyError:
        words = "1/0, yes/no, on/off, true/false, enabled/disabled"
        raise SettingsError(f"{at}: {text!r} is not a boolean ({words})") from None


def _int(at: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SettingsError(f"{at}: {text!r} is not a number") from None


def _ms(at: str, text: str) -> float:
    ms = _int(at, text)
    if ms <= 0:
        raise SettingsError(f"{at}: {text!r} must be more than 0 (milliseconds)")
    return ms / 1000


def _str(at: str, text: str) -> str:
    return text


# UCI option → (Settings field, converter); "enabled" is the init script's.
SCALARS: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "enabled": ("", _bool),
    "port": ("port", _int),
    "max_sessions": ("max_sessions", _int),
    "connect_timeout": ("connect_timeout", _ms),
    "idle_timeout": ("idle_timeout", _ms),
    "handshake_timeout": ("handshake_timeout", _ms),
    "bind_timeout": ("bind_timeout", _ms),
    "family": ("family", _str),
    "syslog": ("syslog", _bool),
    "verbose": ("verbosity", _int),
    "workers": ("workers", _int),
    "allow_local": ("allow_local", _bool),
    "bind_address": ("bind_address", _str),
    "external_address": ("external_address", _str),
    "splice": ("splice", _bool),
    "loop": ("loop", _str),
    "gssapi_keytab": ("gssapi_keytab", _str),
    "gssapi_service": ("gssapi_service", _str),
    "gssapi_min_protection": ("gssapi_min_protection", _str),
    "gssapi_max_protection": ("gssapi_max_protection", _str),
    "user_file": ("users", _str),
}
# UCI list → Settings field.  Addresses, interfaces and networks may also be
# given space-separated, as the init script's config_get reads them.
LISTS = {
    "listen": "listen",
    "interface": "interfaces",
    "anonymous": "anonymous",
    "user": "users",
    "client_rule": "client_rules",
    "dest_rule": "dest_rules",
    "gssapi_principal": "gssapi_principals",
}
SPLIT = {"listen", "interface", "anonymous"}
UCI_NAMES = {field: option for option, field in LISTS.items()} | {
    field: option for option, (field, _) in SCALARS.items() if field and field != "users"
}


def settings_from_sections(
    sections: Mapping[str, Mapping[str, object]],
    base: Settings = DEFAULTS,
    config: str = "osocks",
) -> Settings:
    """The settings of the `config osocks` section; options it does not give keep `base`."""
    name, options = _pick_section(sections, config)
    where = f"uci {config}.{name}"
    changes: dict[str, Any] = {}
    users: list[tuple[str, User]] = []
    user_file: str | None = None
    for option, value in options.items():
        if option.startswith("."):
            continue
        at = f"{where}.{option}"
        if option in LISTS:
            items = _items(value)
            if option in SPLIT:
                items = tuple(word for item in items for word in item.split())
            if option == "user":
                users += ((at, parse_user(item, at)) for item in items)
            elif option == "anonymous":
                changes["anonymous"] = parse_networks(at, items)
            elif option in ("client_rule", "dest_rule"):
                changes[LISTS[option]] = parse_rules(at, items)
            else:
                changes[LISTS[option]] = items
        elif option in SCALARS:
            text = _scalar(at, value)
            if text == "":  # an empty option is an unset one, as for config_get
                continue
            field, convert = SCALARS[option]
            if option == "user_file":
                user_file = text
            elif field:
                changes[field] = convert(at, text)
            else:
                convert(at, text)  # checked here; read by the init script
        else:
            raise SettingsError(f"{at}: unknown option")
    if user_file is not None:
        users += user_file_entries(user_file, f"{where}.user_file")
    if users:
        changes["users"] = unique_users(users)
    if changes.get("interfaces") and "listen" not in changes:
        changes["listen"] = ()  # interfaces replace the default 0.0.0.0
    try:
        return base.replace(**changes)
    except SettingsError as e:
        field, sep, rest = str(e).partition(": ")
        if sep and field in UCI_NAMES:
            raise SettingsError(f"{where}.{UCI_NAMES[field]}: {rest}") from None
        raise SettingsError(f"{where}: {e}") from None


def _pick_section(sections: Mapping[str, Mapping[str, object]], config: str) -> tuple[str, Mapping[str, object]]:
    """The one section of type osocks; a section without ".type" counts as one.

    A second one is an error rather than silently ignored (so is a misspelt type)."""
    names = [name for name, options in sections.items() if options.get(".type", SECTION_TYPE) == SECTION_TYPE]
    if not names:
        raise SettingsError(f"uci {config}: no 'config {SECTION_TYPE}' section")
    if len(names) > 1:
        raise SettingsError(f"uci {config}: more than one 'config {SECTION_TYPE}' section ({', '.join(names)})")
    return names[0], sections[names[0]]


def _items(value: object) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(str(item) for item in value if str(item) != "")
    return (str(value),) if str(value) != "" else ()


def _scalar(at: str, value: object) -> str:
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise SettingsError(f"{at}: one value expected, not a list of {len(value)}")
        value = value[0]
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value).strip()


def load(
    config: str = "osocks",
    confdir: str | None = None,
    savedir: str | None = None,
    base: Settings = DEFAULTS,
) -> Settings:
    """Read `config` (/etc/config/osocks) with pyuci: a new handle each call, as pyuci caches."""
    try:
        euci = importlib.import_module("euci")
        uci = importlib.import_module("uci")
    except ImportError as e:
        raise SettingsError(f"uci {config}: pyuci is not installed ({e})") from None
    dirs = {key: value for key, value in (("confdir", confdir), ("savedir", savedir)) if value}
    handle = euci.EUci(**dirs)
    path = f"{confdir or '/etc/config'}/{config}"
    try:
        sections = handle.get_all(config)
        typed = {name: {**options, ".type": handle.get(config, name)} for name, options in sections.items()}
    except uci.UciExceptionNotFound:
        raise SettingsError(f"uci {config}: {path} not found") from None
    except uci.UciExceptionInvalidInput:
        raise SettingsError(f"uci {config}: {path} is not valid UCI") from None
    except uci.UciException:
        raise SettingsError(f"uci {config}: cannot read {path}") from None
    return settings_from_sections(typed, base, config)


def available() -> bool:
    """Whether pyuci (modules `euci` and `uci`) can be imported."""
    try:
        importlib.import_module("euci")
    except ImportError:
        return False
    return True
