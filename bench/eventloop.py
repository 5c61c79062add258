"""Run a coroutine on the event loop the bridge itself would use.

``milterbridge serve`` runs on uvloop when it is installed (the ``uvloop``
extra); the load generator and our reference milter do the same, so the
comparison measures the webhook work, not a difference in event loops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``uvloop.run(coro)`` when uvloop is importable, else ``asyncio.run(coro)``."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: what :func:`run` will use."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"
