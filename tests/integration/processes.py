"""Ending what is left of a private MTA's processes: what the Postfix and Sendmail harnesses share."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable


def kill_leftovers(pids: Callable[[], list[int]]) -> None:
    """SIGTERM, then SIGKILL, the processes ``pids()`` lists, each time until it lists none (2 s at most)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        found = pids()
        if not found:
            return
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and pids():
            time.sleep(0.05)
