"""Which build of the hot core runs: the one compiled with mypyc, or the Python sources.

``setup.py`` compiles the modules in ``COMPILED_MODULES`` with mypyc when it can (about two
fifths fewer instructions on the milter side; docs/performance.md) and records the SHA-256
of each source it compiled in ``MANIFEST``. An extension module shadows the ``.py`` file of
the same name, so a source edited after the build would otherwise keep running its old
compiled code. ``select()`` (called once, from ``milterbridge/__init__.py``) hashes the
sources again; when any differs from the manifest, when the manifest is missing, or when
``MILTERBRIDGE_PURE_PYTHON=1`` is set, a finder put first on ``sys.meta_path`` loads every
module of the group from its source instead. It is all or none: the compiled modules call
each other's compiled code directly, so they cannot be mixed with Python ones.

Nothing here may import from milterbridge: ``setup.py`` loads this file on its own.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

#: Compiled together as one mypyc group, so loaded together.
COMPILED_MODULES = (
    "milterbridge.milter.address",
    "milterbridge.milter.codec",
    "milterbridge.milter.context",
    "milterbridge.milter.errors",
    "milterbridge.milter.limits",
    "milterbridge.milter.negotiation",
    "milterbridge.milter.rules",
    "milterbridge.milter.session",
    "milterbridge.payload",
    # The asyncio shell of the message path: per connection, per read, per call.
    "milterbridge.admission",
    "milterbridge.calls",
    "milterbridge.conditional",
    "milterbridge.connection",
    "milterbridge.dispatch",
    "milterbridge.endpoint",
    "milterbridge.message_log",
    "milterbridge.webhook.breaker",
    "milterbridge.webhook.client",
    "milterbridge.webhook.http",
    "milterbridge.policy.apply",
    "milterbridge.policy.conditions",
    "milterbridge.policy.ledger",
    "milterbridge.policy.mailbox",
    "milterbridge.policy.merge",
    "milterbridge.policy.model",
    "milterbridge.policy.parse",
    "milterbridge.policy.transaction",
)
#: The group's shared library is ``milterbridge/_core__mypyc.<abi>.so``.
GROUP_NAME = "milterbridge._core"
#: Beside this file: {module: SHA-256 of the source it was compiled from}.
MANIFEST = "_native_sources.json"
#: Set to 1 to run the Python sources although a compiled build is installed.
PURE_ENV = "MILTERBRIDGE_PURE_PYTHON"

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Core:
    """The build that runs: ``compiled`` or ``python``, and why when it is not the compiled one."""

    build: str
    reason: str = ""
    #: True when a compiled build is installed but does not match its sources.
    stale: bool = False


def source_path(module: str, root: Path = ROOT) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def source_digests(root: Path = ROOT, modules: Sequence[str] = COMPILED_MODULES) -> dict[str, str]:
    return {m: hashlib.sha256(source_path(m, root).read_bytes()).hexdigest() for m in modules}


def compiled_files(root: Path = ROOT, modules: Sequence[str] = COMPILED_MODULES) -> list[Path]:
    """The extension modules (one per module, plus the group's library) present under ``root``."""
    found = []
    for name in (*modules, GROUP_NAME + "__mypyc"):
        py = source_path(name, root)
        found += [py.with_name(py.stem + s) for s in importlib.machinery.EXTENSION_SUFFIXES]
    return [p for p in found if p.exists()]


def detect(root: Path = ROOT, environ: dict[str, str] | None = None) -> Core:
    """Decide which build should run under ``root``, without importing anything."""
    env = os.environ if environ is None else environ
    present = compiled_files(root)
    if not present:
        return Core("python", "not compiled")
    if env.get(PURE_ENV) == "1":
        return Core("python", f"{PURE_ENV}=1")
    try:
        recorded = json.loads((root / "milterbridge" / MANIFEST).read_text())
    except (OSError, ValueError):
        return Core("python", f"compiled files without a valid {MANIFEST}", stale=True)
    try:
        current = source_digests(root)
    except OSError:
        # An install without the .py files: there is nothing else to run, nor to compare with.
        return Core("compiled", "sources not installed, so not compared")
    changed = sorted(m for m in COMPILED_MODULES if recorded.get(m) != current[m])
    if changed:
        return Core("python", "sources changed since the build: " + ", ".join(changed), stale=True)
    if len(present) < len(COMPILED_MODULES) + 1:
        return Core("python", "the compiled build is incomplete", stale=True)
    return Core("compiled")


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Finds the modules of the compiled group as their ``.py`` sources."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in COMPILED_MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, source_path(fullname))


def select() -> Core:
    """Choose the build (see the module docstring); call before any module of the group is imported."""
    core = detect()
    if core.build == "python" and core.reason != "not compiled":
        sys.meta_path.insert(0, _SourceFinder())
    return core
