"""Layering: the pure core, the payload encoder and the dispatcher import nothing they must not (style.md §2)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "milterbridge"


def imports_of(path: Path) -> set[str]:
    """Absolute module names imported by a file (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                found.add(node.module)
    return found


def imported_names(path: Path) -> set[str]:
    """Dotted names a file imports: ``import a.b`` gives ``a.b``, ``from a import b`` gives ``a.b``.

    Unlike ``imports_of`` this names what is taken from a module, so ``from milterbridge import
    server`` shows up as ``milterbridge.server`` and ``from x import Handler`` as ``x.Handler``.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``name`` is one of the dotted ``prefixes`` or lies under one."""
    return any(name == prefix or name.startswith(f"{prefix}.") for prefix in prefixes)


def modules(sub: str) -> list[Path]:
    target = PACKAGE / sub
    return sorted(target.rglob("*.py")) if target.is_dir() else [target]


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("path", modules("milter"), ids=lambda p: p.name)
def test_milter_core_is_stdlib_only(path: Path) -> None:
    """milterbridge/milter/ imports only the standard library and itself."""
    for name in imports_of(path):
        if name.startswith("milterbridge."):
            assert name.startswith("milterbridge.milter"), f"{path.name} imports {name}"
        else:
            assert top(name) in sys.stdlib_module_names, f"{path.name} imports {name}"
            assert top(name) not in {"asyncio", "socket", "logging", "selectors"}, f"{path.name} imports {name}"


#: Pure packages (no I/O, no logging): what of milterbridge each may import besides itself.
PURE_PACKAGES = {
    "policy": ("milterbridge.milter.messages", "milterbridge.milter.constants"),
    # MTA Hooks translation: requests and answers, no HTTP.
    "mtahooks": ("milterbridge.milter.constants",),
}


@pytest.mark.parametrize(
    ("path", "allowed"),
    [(p, (f"milterbridge.{sub}", *allowed)) for sub, allowed in PURE_PACKAGES.items() for p in modules(sub)],
    ids=lambda v: v.name if isinstance(v, Path) else "",
)
def test_pure_packages(path: Path, allowed: tuple[str, ...]) -> None:
    """milterbridge/policy/ and milterbridge/mtahooks/ import the stdlib (no I/O, no logging), a few core
    modules and themselves only."""
    for name in imports_of(path):
        if name.startswith("milterbridge"):
            assert name.startswith(allowed), f"{path.name} imports {name}"
        else:
            assert top(name) in sys.stdlib_module_names, f"{path.name} imports {name}"
            assert top(name) not in {"asyncio", "socket", "logging"}, f"{path.name} imports {name}"


FORBIDDEN = {
    "connection.py": ("milterbridge.webhook", "aiohttp", "milterbridge.policy"),
    "server.py": ("milterbridge.webhook", "aiohttp", "milterbridge.policy"),
    "admission.py": ("milterbridge.webhook", "aiohttp", "milterbridge.policy"),
    # The endpoint-call step: HTTP through the webhook client, nothing of the milter side's I/O.
    "endpoint.py": ("milterbridge.connection", "milterbridge.server", "milterbridge.dispatch", "aiohttp"),
    "client.py": (
        "milterbridge.webhook",
        "milterbridge.policy",
        "milterbridge.dispatch",
        "milterbridge.server",
        "aiohttp",
    ),
    "webhook": ("milterbridge.milter", "milterbridge.connection", "milterbridge.server"),
}


@pytest.mark.parametrize(
    ("path", "forbidden"),
    [(p, f) for sub, f in FORBIDDEN.items() for p in modules(sub) if p.exists()],
    ids=lambda v: v.name if isinstance(v, Path) else "",
)
def test_shell_rings(path: Path, forbidden: tuple[str, ...]) -> None:
    """Shell modules keep to their ring (style.md §2 table)."""
    for name in imports_of(path):
        assert not name.startswith(forbidden), f"{path.name} imports {name}"


#: What payload.py may import from the package: it is pure encoding of the session's data
#: (the milter core's types, the body it streams); no I/O, no knowledge of who sends it.
PAYLOAD_ALLOWED = ("milterbridge.milter", "milterbridge.body")
#: Standard library modules that do I/O or run the loop: not for an encoder.
PAYLOAD_STDLIB_FORBIDDEN = frozenset({"asyncio", "socket", "selectors", "ssl"})


def test_payload_is_pure_encoding() -> None:
    """payload.py imports the stdlib (no asyncio, socket ...), orjson, the milter core and body only."""
    path = PACKAGE / "payload.py"
    for name in imported_names(path):
        if within(name, ("milterbridge",)):
            assert within(name, PAYLOAD_ALLOWED), f"payload.py imports {name}"
        elif top(name) != "orjson":
            assert top(name) in sys.stdlib_module_names, f"payload.py imports {name}"
            assert top(name) not in PAYLOAD_STDLIB_FORBIDDEN, f"payload.py imports {name}"


#: The dispatcher (which endpoints, when), relative to milterbridge/. ``dispatch*.py`` and a
#: ``dispatch/`` package are found by themselves; list here the other modules it is split into.
DISPATCHER_MODULES: tuple[str, ...] = (
    "dispatch.py",
    "snapshot.py",
    "calls.py",
    "background.py",
    "message_log.py",
    "replies.py",
    "conditional.py",
)
#: Transport the dispatcher never touches: HTTP goes through the endpoint-call step, milter
#: bytes through the connection. ``milterbridge.connection`` is checked name by name below.
DISPATCHER_FORBIDDEN = ("socket", "aiohttp", "milterbridge.webhook.http", "milterbridge.server")
#: What a dispatcher module may take from milterbridge.connection: the handler protocol it implements.
CONNECTION_PROTOCOL = frozenset({"Handler", "HandlerFactory", "HandlerResult"})


def dispatcher_modules() -> list[Path]:
    found = {PACKAGE / name for name in DISPATCHER_MODULES}
    found.update(PACKAGE.glob("dispatch*.py"))
    found.update((PACKAGE / "dispatch").rglob("*.py"))
    return sorted(found)


@pytest.mark.parametrize("name", DISPATCHER_MODULES)
def test_dispatcher_modules_are_there(name: str) -> None:
    """Every module named in DISPATCHER_MODULES exists, so a rename cannot drop it from the check."""
    assert (PACKAGE / name).is_file(), f"DISPATCHER_MODULES names {name}, which is not in milterbridge/"


@pytest.mark.parametrize("path", dispatcher_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_dispatcher_imports_no_transport(path: Path) -> None:
    """The dispatcher imports no socket, aiohttp, HTTP transport, listener or connection machinery."""
    connection = "milterbridge.connection"
    for name in imported_names(path):
        assert not within(name, DISPATCHER_FORBIDDEN), f"{path.name} imports {name}"
        if within(name, (connection,)):
            assert name.removeprefix(f"{connection}.") in CONNECTION_PROTOCOL, f"{path.name} imports {name}"
