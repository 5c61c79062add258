"""Shared fixtures: a time limit per test (pytest-timeout, see pyproject) and leak checks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from milterbridge.connection import ConnectionSettings, HandlerFactory
from milterbridge.server import MilterServer


def assert_no_leaked_tasks() -> None:
    """Fail if tasks other than the current one are still pending."""
    current = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
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
