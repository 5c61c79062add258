"""The compiled core (mypyc, setup.py) and its guard against stale builds (milterbridge/_native.py).

The test run uses the compiled build that ``scripts/bootstrap`` installs, so every other test
exercises it; the Python sources, which run where nothing could be compiled or after an edit,
get the core's own tests here, in a subprocess.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

import milterbridge
from milterbridge import _native
from tests.conftest import missing_prerequisite

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The compiled modules' own tests, run again on the Python sources.
CORE_TESTS = (
    "tests/milter",
    "tests/policy",
    "tests/engine",
    "tests/test_payload_ids.py",
    "tests/test_connection.py",
    "tests/test_endpoint.py",
)

PROBE = (
    "import json, milterbridge, importlib;"
    "files = {m: importlib.import_module(m).__file__ for m in milterbridge._native.COMPILED_MODULES};"
    "print(json.dumps({'build': milterbridge.CORE.build, 'stale': milterbridge.CORE.stale,"
    " 'reason': milterbridge.CORE.reason, 'files': files}))"
)


def _is_extension(path: str) -> bool:
    return path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def _probe(root: Path, **env: str) -> dict[str, Any]:
    """Which files a fresh interpreter loads for the core when ``root`` is first on its path."""
    environ = {k: v for k, v in os.environ.items() if k != _native.PURE_ENV}
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=root,
        env={**environ, "PYTHONPATH": str(root), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    probed: dict[str, Any] = json.loads(result.stdout)
    return probed


def _require_compiled_build() -> None:
    if os.environ.get("MILTERBRIDGE_COMPILE") == "0":
        missing_prerequisite("the compiled core (MILTERBRIDGE_COMPILE=0 installed the pure-Python package)")
    core = _native.detect(environ={})
    if core.stale:
        pytest.fail(f"the compiled core is out of date ({core.reason}): run scripts/bootstrap")
    if core.build != "compiled":
        missing_prerequisite(f"the compiled core ({core.reason}; needs a C compiler and the Python headers)")


def test_the_test_run_uses_the_compiled_core() -> None:
    """scripts/bootstrap compiled the core, and this process runs it (unless told to run the sources)."""
    if os.environ.get("MILTERBRIDGE_COMPILE") == "0":
        assert (milterbridge.CORE.build, milterbridge.CORE.reason) == ("python", "not compiled")
        return
    _require_compiled_build()
    if os.environ.get(_native.PURE_ENV) == "1":
        assert milterbridge.CORE.build == "python"
        return
    assert (milterbridge.CORE.build, milterbridge.CORE.stale) == ("compiled", False)
    for name in _native.COMPILED_MODULES:
        assert _is_extension(importlib.import_module(name).__file__ or ""), name


def test_an_edited_source_runs_instead_of_its_stale_compiled_module(tmp_path: Path) -> None:
    """After one source changes, all modules of the group load from source, and the log will say why."""
    _require_compiled_build()
    shutil.copytree(REPO_ROOT / "milterbridge", tmp_path / "milterbridge", ignore=shutil.ignore_patterns("__pycache__"))
    fresh = _probe(tmp_path)
    assert fresh["build"] == "compiled"
    assert all(_is_extension(f) for f in fresh["files"].values())

    codec = tmp_path / "milterbridge" / "milter" / "codec.py"
    codec.write_text(codec.read_text() + "\n# edited after the build\n")
    edited = _probe(tmp_path)
    assert edited["build"] == "python"
    assert edited["stale"] is True
    assert edited["reason"] == "sources changed since the build: milterbridge.milter.codec"
    files = edited["files"]
    assert files == {m: str(_native.source_path(m, tmp_path)) for m in _native.COMPILED_MODULES}


def test_pure_python_env_loads_every_source(tmp_path: Path) -> None:
    """MILTERBRIDGE_PURE_PYTHON=1 runs the sources of a fresh compiled build, all of them."""
    _require_compiled_build()
    probed = _probe(REPO_ROOT, **{_native.PURE_ENV: "1"})
    assert probed["build"] == "python"
    assert probed["stale"] is False
    assert probed["files"] == {m: str(_native.source_path(m)) for m in _native.COMPILED_MODULES}


def test_the_core_tests_pass_on_the_python_sources() -> None:
    """The codec, session, payload and connection tests, run again with the sources instead of the build."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CORE_TESTS],
        cwd=REPO_ROOT,
        env={**os.environ, _native.PURE_ENV: "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]


def test_a_failed_compile_builds_the_pure_python_package(tmp_path: Path) -> None:
    """Without a working C compiler the wheel is built from the sources alone, and says so."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    build_outputs = shutil.ignore_patterns("__pycache__", "*.so", _native.MANIFEST)
    shutil.copytree(REPO_ROOT / "milterbridge", source / "milterbridge", ignore=build_outputs)
    env = {k: v for k, v in os.environ.items() if k != "MILTERBRIDGE_COMPILE"}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--wheel-dir", str(tmp_path / "wheels"), "."],
        cwd=source,
        env={**env, "CC": "false"},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "milterbridge build: compiling the core failed" in output
    (wheel,) = (tmp_path / "wheels").glob("milterbridge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "milterbridge/milter/session.py" in names
    assert not [n for n in names if n.endswith(".so") or n.endswith(_native.MANIFEST)]


# --- detect() on a tree of stand-in files (nothing is imported) --------------------------


def _tree(tmp_path: Path, *, compiled: bool = True, manifest: bool = True) -> Path:
    for module in _native.COMPILED_MODULES:
        source = _native.source_path(module, tmp_path)
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(f"# {module}\n")
    if compiled:
        suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        for module in (*_native.COMPILED_MODULES, _native.GROUP_NAME + "__mypyc"):
            source = _native.source_path(module, tmp_path)
            source.with_name(source.stem + suffix).write_bytes(b"")
    if manifest:
        digests = _native.source_digests(tmp_path)
        (tmp_path / "milterbridge" / _native.MANIFEST).write_text(json.dumps(digests))
    return tmp_path


def test_detect_a_matching_build_is_compiled(tmp_path: Path) -> None:
    assert _native.detect(_tree(tmp_path), environ={}) == _native.Core("compiled")


def test_detect_no_build_is_plain_python(tmp_path: Path) -> None:
    root = _tree(tmp_path, compiled=False, manifest=False)
    assert _native.detect(root, environ={}) == _native.Core("python", "not compiled")


def test_detect_a_build_without_manifest_is_stale(tmp_path: Path) -> None:
    core = _native.detect(_tree(tmp_path, manifest=False), environ={})
    assert (core.build, core.stale) == ("python", True)
    assert _native.MANIFEST in core.reason


def test_detect_a_missing_extension_is_stale(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    _native.compiled_files(root)[0].unlink()
    assert _native.detect(root, environ={}) == _native.Core("python", "the compiled build is incomplete", stale=True)


def test_detect_names_every_changed_source(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    for module in ("milterbridge.payload", "milterbridge.milter.session"):
        _native.source_path(module, root).write_text("# changed\n")
    core = _native.detect(root, environ={})
    assert core.reason == "sources changed since the build: milterbridge.milter.session, milterbridge.payload"


def test_detect_pure_env_wins_over_a_fresh_build(tmp_path: Path) -> None:
    core = _native.detect(_tree(tmp_path), environ={_native.PURE_ENV: "1"})
    assert core == _native.Core("python", f"{_native.PURE_ENV}=1")


def test_detect_a_build_without_its_sources_runs_compiled(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    _native.source_path("milterbridge.milter.codec", root).unlink()
    assert _native.detect(root, environ={}) == _native.Core("compiled", "sources not installed, so not compared")


def _reused_exception_names(tree: ast.AST) -> list[str]:
    """``function: name`` for each name bound by ``except ... as name`` clauses of different types in one function."""
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        types: dict[str, set[str]] = {}
        for node in ast.walk(function):
            if isinstance(node, ast.ExceptHandler) and node.name is not None:
                types.setdefault(node.name, set()).add(ast.unparse(node.type) if node.type else "BaseException")
        found += [f"{function.name}: {name}" for name, kinds in types.items() if len(kinds) > 1]
    return found


def test_no_compiled_function_reuses_an_exception_name_for_another_type() -> None:
    """mypyc types ``except A as exc`` by the first clause that binds ``exc``: a later ``except B as exc``
    in the same function raises TypeError when a B arrives (a bridge fault instead of the endpoint's on_error)."""
    reused = {
        module: found
        for module in _native.COMPILED_MODULES
        if (found := _reused_exception_names(ast.parse(_native.source_path(module).read_text())))
    }
    assert not reused
    sample = "def f():\n    try: pass\n    except ValueError as exc: pass\n    except OSError as exc: pass\n"
    assert _reused_exception_names(ast.parse(sample)) == ["f: exc"]
