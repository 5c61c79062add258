"""docs/configuration.md agrees with the keys declared in milterbridge/settings.py.

Each section's table in the page must list exactly the declared keys, each row with the
declared type and default, and a meaning that starts with the declared one-line description.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest

from milterbridge import settings as settings_module
from milterbridge.config import Config, load_config
from milterbridge.settings import (
    AdminSettings,
    EndpointSettings,
    Key,
    LogSettings,
    SendmailSettings,
    ServerSettings,
    TlsSettings,
    TracingSettings,
    declared_keys,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
#: The heading each settings class is documented under, and the TOML that holds its keys.
SECTIONS = {
    ServerSettings: ("## `[server]`", "[server]\n"),
    AdminSettings: ("## `[admin]`", "[admin]\n"),
    LogSettings: ("## `[log]`", "[log]\n"),
    SendmailSettings: ("## `[sendmail]`", "[sendmail]\n"),
    TracingSettings: ("## `[tracing]`", "[tracing]\n"),
    EndpointSettings: ("## `[[endpoints]]`", '[[endpoints]]\nname = "policy"\nurl = "https://hooks.example/m"\n'),
    TlsSettings: ("## TLS", '[[endpoints]]\nname = "policy"\nurl = "https://hooks.example/m"\n[endpoints.tls]\n'),
}
ALL_KEYS = [
    pytest.param(cls, key, id=f"{cls.__name__}.{key.name}") for cls in SECTIONS for key in declared_keys(cls).values()
]


def table(heading: str) -> dict[str, tuple[str, str, str]]:
    """The key table under ``heading``: key name -> (type, default, meaning), markdown unescaped."""
    text = DOC.read_text().split(f"\n{heading}", 1)[1]
    lines = text.split("\n| key |", 1)[1].splitlines()
    assert lines[0] == " type | default | meaning |", f"{heading}: unexpected table header"
    rows: dict[str, tuple[str, str, str]] = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        name = cells[0].strip("`")
        assert name not in rows, f"{heading}: {name} has two rows"
        rows[name] = (cells[1], cells[2], cells[3])
    return rows


def literal(key: Key, value: Any) -> str:
    """A default as the page writes it: the TOML one would write for it."""
    match value:
        case bool():
            return "true" if value else "false"
        case enum.Enum():
            return f'"{value.value}"'
        case str():
            return f'"{value}"'
        case int() if key.check.kind == "integer (octal)":
            return f"0o{value:o}"
        case tuple() if key.check.kind == "table":  # (name, value) pairs
            return "{ " + ", ".join(f'{name} = "{v}"' for name, v in value) + " }" if value else "{}"
        case tuple() | frozenset():
            return "[" + ", ".join(literal(key, item) for item in sorted(value, key=str)) + "]"
        case _ if dataclasses.is_dataclass(value):  # a table of its own: the keys that are set
            items = [(k, getattr(value, k.field)) for k in declared_keys(type(value)).values()]
            return "{ " + ", ".join(f"{k.name} = {literal(k, v)}" for k, v in items if v is not None) + " }"
        case _:
            return repr(value)


def default_text(key: Key) -> str:
    """The default column for ``key``."""
    if key.shown is not None:
        return key.shown
    if key.default is dataclasses.MISSING:
        return "—"
    if key.default is None:
        return "unset"
    return f"`{literal(key, key.default)}`"


def declared_classes() -> list[type]:
    """Every settings class with declared keys."""
    classes = [cls for cls in vars(settings_module).values() if isinstance(cls, type) and dataclasses.is_dataclass(cls)]
    return [cls for cls in classes if declared_keys(cls)]


def test_every_section_of_the_config_is_on_the_page():
    """Each table of ``Config`` (and the endpoint's) has its section here, so a new one cannot go undocumented."""
    hints = typing.get_type_hints(Config)
    sections = {hints[f.name] for f in dataclasses.fields(Config)} & set(declared_classes())
    sections |= {EndpointSettings, TlsSettings}
    assert sections == set(SECTIONS)


@pytest.mark.parametrize("cls", list(SECTIONS), ids=lambda cls: cls.__name__)
def test_every_field_is_declared(cls):
    """Every field of a settings class is filled by a declared key, so the loader can set it."""
    assert {key.field for key in declared_keys(cls).values()} == {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("cls", list(SECTIONS), ids=lambda cls: cls.__name__)
def test_the_page_lists_exactly_the_declared_keys(cls):
    """The section's table has one row per declared key and no other."""
    assert set(table(SECTIONS[cls][0])) == set(declared_keys(cls))


@pytest.mark.parametrize(("cls", "key"), ALL_KEYS)
def test_row_matches_the_declaration(cls, key):
    """Type and default are the declared ones; the meaning starts with the declared description."""
    kind, default, meaning = table(SECTIONS[cls][0])[key.name]
    assert kind == (f"{key.check.kind}, **required**" if key.required else key.check.kind)
    expected = default_text(key)
    assert default == expected or default.startswith(f"{expected} ("), f"default {default!r}, declared {expected!r}"
    assert meaning.replace("`", "").startswith(key.doc.removesuffix(".")), f"meaning does not start with {key.doc!r}"


@pytest.mark.parametrize(("cls", "key"), ALL_KEYS)
def test_description_is_one_line(cls, key):
    """A declared description is one line of plain text that ends with a full stop."""
    assert key.doc.endswith(".")
    assert "\n" not in key.doc
    assert "`" not in key.doc


def writable(key: Key) -> bool:
    """The key has a default that the page writes as a TOML value."""
    return key.shown is None and key.default not in (None, dataclasses.MISSING)


@pytest.mark.parametrize(("cls", "key"), [p for p in ALL_KEYS if writable(p.values[1])])
def test_documented_default_loads_as_the_default(tmp_path, cls, key):
    """Writing a key's documented default into the file gives the field its default value."""
    text = f"{SECTIONS[cls][1]}{key.name} = {literal(key, key.default)}\n"
    assert tomllib.loads(text)  # the literal is TOML
    path = tmp_path / "milterbridge.toml"
    path.write_text(text)
    config = load_config(path, {})
    settings = {
        ServerSettings: config.server,
        AdminSettings: config.admin,
        LogSettings: config.log,
        SendmailSettings: config.sendmail,
        TracingSettings: config.tracing,
        EndpointSettings: config.endpoints[0] if config.endpoints else None,
        TlsSettings: config.endpoints[0].tls if config.endpoints else None,
    }[cls]
    assert getattr(settings, key.field) == key.default
