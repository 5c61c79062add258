"""setuptools hook: compile the hot core with mypyc. Everything else is in pyproject.toml.

The modules in ``milterbridge/_native.py``'s ``COMPILED_MODULES`` are compiled with mypyc into
extension modules, and the SHA-256 of each source goes into ``milterbridge/_native_sources.json``
beside them, so the package can tell at import whether the compiled code still matches its
sources. ``MILTERBRIDGE_COMPILE=0`` builds the pure-Python package (and removes an in-place
compiled build from the source tree). When mypyc or the C compiler fails (no compiler, no
Python headers), the build warns and makes the pure-Python package; ``MILTERBRIDGE_COMPILE=1``
makes that an error instead.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
NATIVE: dict[str, Any] = runpy.run_path(str(ROOT / "milterbridge" / "_native.py"))
MODE = os.environ.get("MILTERBRIDGE_COMPILE", "auto")
if MODE not in ("0", "1", "auto"):
    sys.exit(f"MILTERBRIDGE_COMPILE must be 0, 1 or auto, not {MODE!r}")


def _say(text: str) -> None:
    print(f"milterbridge build: {text}", file=sys.stderr)


def _remove_compiled(root: Path) -> None:
    """Drop an earlier in-place build, so the sources are what runs."""
    for path in NATIVE["compiled_files"](root):
        path.unlink()
    (root / "milterbridge" / NATIVE["MANIFEST"]).unlink(missing_ok=True)


#: The commands that build extension modules. pip also runs setup.py for metadata (egg_info,
#: dist_info), which needs no mypyc run: it would type-check and generate the C code again.
_BUILD_COMMANDS = frozenset({"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"})


def _extensions() -> list[Any]:
    if MODE == "0":
        _remove_compiled(ROOT)
        return []
    if not _BUILD_COMMANDS.intersection(sys.argv[1:]):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        if MODE == "1":
            raise
        _say("mypyc is not installed: building the pure-Python package")
        return []
    paths = [str(NATIVE["source_path"](m, Path())) for m in NATIVE["COMPILED_MODULES"]]
    try:
        # The [tool.mypy] per-module sections name modules that are not compiled here.
        return mypycify(["--no-warn-unused-configs", *paths], opt_level="3", group_name=NATIVE["GROUP_NAME"])
    except SystemExit:  # mypyc has printed the type errors that stopped it
        if MODE == "1":
            raise
        _say("mypyc could not compile the core: building the pure-Python package")
        return []


class BuildNative(build_ext):
    """build_ext that writes the source manifest, or falls back to pure Python when compiling fails."""

    def run(self) -> None:
        if self.extensions and self._in_source_tree():
            # The compiled files in the tree are about to change: until the build has succeeded,
            # no manifest may vouch for them.
            (ROOT / "milterbridge" / NATIVE["MANIFEST"]).unlink(missing_ok=True)
        try:
            super().run()
        except Exception as exc:  # distutils' compiler and platform errors, or a missing Python.h
            if MODE == "1" or not self.extensions:
                raise
            detail = str(exc) if len(str(exc)) < 200 else "..." + str(exc)[-200:]  # not the whole command line
            _say(f"compiling the core failed ({detail}): building the pure-Python package")
            self._drop_outputs()
            return
        if not self.extensions:
            return
        digests = json.dumps(NATIVE["source_digests"](ROOT), indent=1, sort_keys=True) + "\n"
        for target in self._manifest_targets():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(digests)
        _say(f"compiled {len(NATIVE['COMPILED_MODULES'])} core modules with mypyc")

    def _manifest_targets(self) -> list[Path]:
        targets = [Path(self.build_lib) / "milterbridge" / NATIVE["MANIFEST"]]
        if self._in_source_tree():
            targets.append(ROOT / "milterbridge" / NATIVE["MANIFEST"])
        return targets

    def _drop_outputs(self) -> None:
        self.extensions = []
        _remove_compiled(Path(self.build_lib))
        if self._in_source_tree():
            _remove_compiled(ROOT)

    def _in_source_tree(self) -> bool:
        """True for an in-place or editable build, whose extension modules land beside the sources."""
        return bool(self.inplace or getattr(self, "editable_mode", False))

    def get_outputs(self) -> list[str]:
        outputs: list[str] = super().get_outputs()
        if self.extensions:
            outputs.append(str(Path(self.build_lib) / "milterbridge" / NATIVE["MANIFEST"]))
        return outputs


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildNative})
