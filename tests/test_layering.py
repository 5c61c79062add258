"""Layering: the pure core imports nothing it must not (style.md §2)."""

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


@pytest.mark.parametrize("path", modules("policy"), ids=lambda p: p.name)
def test_policy_is_pure(path: Path) -> None:
    """milterbridge/policy/ imports the stdlib, milter messages/constants and itself only."""
    allowed = ("milterbridge.policy", "milterbridge.milter.messages", "milterbridge.milter.constants")
    for name in imports_of(path):
        if name.startswith("milterbridge"):
            assert name.startswith(allowed), f"{path.name} imports {name}"
        else:
            assert top(name) in sys.stdlib_module_names, f"{path.name} imports {name}"
            assert top(name) not in {"asyncio", "socket", "logging"}, f"{path.name} imports {name}"


FORBIDDEN = {
    "connection.py": ("milterbridge.webhook", "aiohttp", "milterbridge.policy"),
    "server.py": ("milterbridge.webhook", "aiohttp", "milterbridge.policy"),
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
