"""Webhook calls nobody waits for: observe endpoints and the abort/close notifications.

They never hold a reply to the MTA, so they run as tasks of their own, at most
``max_background`` per endpoint at once (per worker): a slow observe endpoint must not grow
the bridge's memory with the mail flow. A call over the cap is dropped before its request is
built, and counted. At shutdown the running ones get a few seconds to finish.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Coroutine
from typing import Any, Protocol

from milterbridge.config import EndpointSettings

#: Seconds the running calls get at shutdown before they are cancelled.
SHUTDOWN_GRACE = 5.0


class DropCounter(Protocol):
    def background_dropped(self, endpoint: str) -> None: ...


class BackgroundCalls:
    """The process's background webhook calls, capped per endpoint and tracked for shutdown."""

    def __init__(self, metrics: DropCounter) -> None:
        self._metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()
        #: Calls running, per endpoint name.
        self._running: dict[str, int] = {}

    def has_room(self, endpoint: EndpointSettings) -> bool:
        """Whether a call to ``endpoint`` may start now; False counts it as dropped."""
        if self._running.get(endpoint.name, 0) < endpoint.max_background:
            return True
        self._metrics.background_dropped(endpoint.name)
        return False

    def spawn(self, coro: Coroutine[Any, Any, None], endpoint: EndpointSettings) -> None:
        """Run ``coro`` (a call to ``endpoint``, after ``has_room``) as a task of its own."""
        name = endpoint.name
        self._running[name] = self._running.get(name, 0) + 1
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._done, name))

    def _done(self, name: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._running[name] -= 1

    async def aclose(self, timeout: float = SHUTDOWN_GRACE) -> None:
        """Let running calls finish up to ``timeout``, then cancel the rest."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
