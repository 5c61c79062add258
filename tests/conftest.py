"""Shared fixtures: a time limit per test (pytest-timeout, see pyproject) and leak checks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import milterbridge
from milterbridge.connection import ConnectionSettings, HandlerFactory
from milterbridge.server import MilterServer

PACKAGE_DIR = str(Path(milterbridge.__file__).resolve().parent)


def _ours(task: asyncio.Task[object]) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and code.co_filename.startswith(PACKAGE_DIR)


def assert_no_leaked_tasks() -> None:
    """Fail if a task running milterbridge code is still pending.

    Tasks of other servers in the same loop (aiohttp keep-alive handlers of a
    test's endpoint) end with their own fixtures and are not counted.
    """
    current = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() if t is not current and not t.done() and _ours(t)]
    assert not leaked, f"leaked tasks: {leaked}"


@contextlib.asynccontextmanager
async def running_server(
    factory: HandlerFactory,
    listen: Sequence[str] = ("inet:127.0.0.1:0",),
    settings: ConnectionSettings | None = None,
    **kwargs: object,
) -> AsyncIterator[MilterServer]:
    """A started MilterServer that is drained and checked for leaks afterwards."""
    server = MilterServer(listen, factory, settings, **kwargs)  # type: ignore[arg-type]
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown(timeout=2.0)
        for _ in range(3):
            await asyncio.sleep(0)
        assert not server.state.connections
        assert_no_leaked_tasks()


def pytest_report_header() -> str:
    """Print the Postfix version the end-to-end tests run against."""
    from tests.integration.postfix import installed_version

    return f"Postfix version: {installed_version() or 'not installed'}"


def required_tool(name: str, how: str) -> str:
    """The path of the program ``name``, or ``missing_prerequisite`` naming ``how`` it gets installed."""
    import shutil

    found = shutil.which(name)
    if found is None:
        missing_prerequisite(f"{name} ({how})")
    assert found is not None
    return found


def missing_prerequisite(what: str) -> None:
    """Skip loudly for a missing prerequisite, but fail when CI=true (CI must never skip)."""
    import os

    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(f"prerequisite missing under CI: {what}")
    pytest.skip(f"PREREQUISITE MISSING: {what}")
