"""The instance view: one admin listener for every worker of ``milterbridge serve --workers N``.

Each worker serves its own admin pages on a private unix socket (``worker-<i>.sock`` in a
directory only the bridge's user may enter). The supervisor runs this view in a process of its
own, on the configured ``[admin] listen``:

- ``/livez``: 200 while the supervisor runs (this process exits soon after it does not).
- ``/readyz``: 200 only when every worker answers ready; else 503 naming each worker that is
  not ready and why (draining, listeners not bound, not answering).
- ``/metrics``: every worker's page read at the scrape and summed by
  ``instance_metrics.WorkerSum``. Between scrapes the pages are read every
  ``REFRESH_INTERVAL`` seconds too, so a worker that is killed takes at most that much of its
  counting with it; the rest stays in the sum.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Sequence
from typing import Final

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from milterbridge.admin import PID_HEADER, AdminServer
from milterbridge.instance_metrics import WorkerSum, parse_page

__all__ = ["REFRESH_INTERVAL", "WORKER_TIMEOUT", "InstancePages", "run_instance_admin", "worker_socket"]

log = logging.getLogger("milterbridge.instance")

#: Seconds between reads of the workers' pages when nobody scrapes.
REFRESH_INTERVAL: Final = 5.0
#: Seconds a worker gets to answer one admin request.
WORKER_TIMEOUT: Final = 2.0
#: Seconds between checks that the supervisor still runs.
_WATCH_INTERVAL: Final = 1.0


def worker_socket(directory: str, index: int) -> str:
    """The private admin socket of worker ``index``."""
    return os.path.join(directory, f"worker-{index}.sock")


class _Families:
    """A collector that yields the families it was last given."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> list[Metric]:
        return self.families


class InstancePages:
    """``AdminPages`` summed over the workers at ``sockets`` (index = position)."""

    def __init__(self, sockets: Sequence[str], supervisor: int) -> None:
        self._sockets: Final = tuple(sockets)
        self._supervisor: Final = supervisor
        self._sum: Final = WorkerSum(len(self._sockets))
        self._sessions: list[aiohttp.ClientSession] = []
        # One read of the pages at a time: a slower read finishing last must not put an
        # older page in the sum over a newer one.
        self._reading: Final = asyncio.Lock()
        self._collector: Final = _Families()
        self._registry: Final = CollectorRegistry(auto_describe=False)
        self._registry.register(self._collector)

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=WORKER_TIMEOUT)
        self._sessions = [
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path), timeout=timeout) for path in self._sockets
        ]

    async def aclose(self) -> None:
        sessions, self._sessions = self._sessions, []
        for session in sessions:
            await session.close()

    async def _get(self, index: int, path: str) -> tuple[int, int, str] | None:
        """(pid, status, text) of worker ``index``'s answer to GET ``path``, or None if it gave none."""
        try:
            async with self._sessions[index].get(f"http://worker-{index}{path}") as response:
                text = await response.text()
                return int(response.headers[PID_HEADER]), response.status, text
        except (aiohttp.ClientError, TimeoutError, OSError, KeyError, ValueError) as exc:
            log.debug("worker %d did not answer %s: %s", index, path, exc)
            return None

    async def livez(self) -> tuple[bool, str]:
        if os.getppid() != self._supervisor:
            return False, "the supervisor is gone"
        return True, "ok"

    async def readyz(self) -> tuple[bool, str]:
        answers = await asyncio.gather(*(self._get(i, "/readyz") for i in range(len(self._sockets))))
        reasons = []
        for index, answer in enumerate(answers):
            if answer is None:
                reasons.append(f"worker {index}: not answering")
            elif answer[1] != 200:
                reasons.append(f"worker {index}: {answer[2]}")
        return not reasons, "; ".join(reasons) or "ready"

    async def read_workers(self) -> list[int]:
        """Read every worker's metrics page into the sum; the workers that answered."""
        async with self._reading:
            answers = await asyncio.gather(*(self._get(i, "/metrics") for i in range(len(self._sockets))))
            answered = []
            for index, answer in enumerate(answers):
                if answer is None or answer[1] != 200:
                    continue
                pid, _, text = answer
                try:
                    page = parse_page(text)
                except (ValueError, TypeError, KeyError) as exc:
                    log.error("worker %d (pid %d) sent a metrics page that does not parse: %s", index, pid, exc)  # noqa: TRY400
                    continue
                self._sum.update(index, pid, page)
                answered.append(index)
            return answered

    async def metrics(self) -> tuple[bytes, str]:
        answered = await self.read_workers()
        self._collector.families = self._sum.families(answered)
        return generate_latest(self._registry), CONTENT_TYPE_LATEST

    async def refresh_forever(self) -> None:
        """Read the workers' pages every ``REFRESH_INTERVAL`` seconds (until cancelled)."""
        while True:
            await asyncio.sleep(REFRESH_INTERVAL)
            try:
                await self.read_workers()
            except Exception:
                log.exception("reading the workers' metrics failed")


def run_instance_admin(listen: str, sock: socket.socket, sockets: Sequence[str], supervisor: int) -> int:
    """The body of the instance-view process (forked by the supervisor): serve until SIGTERM.

    It also ends when the supervisor is gone.
    """
    from milterbridge.app import run_event_loop  # app imports the supervisor, which imports this module

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        pages = InstancePages(sockets, supervisor)
        await pages.start()
        server = AdminServer(listen, pages, sock=sock)
        tasks: list[asyncio.Task[None]] = []
        try:
            try:
                await server.start()
            except OSError as exc:
                log.error("cannot start the admin listener: %s", exc)  # noqa: TRY400 - the message names the address
                return 1
            tasks = [asyncio.create_task(pages.refresh_forever()), asyncio.create_task(watch_parent(supervisor, stop))]
            await stop.wait()
            return 0
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await server.aclose()
            await pages.aclose()

    return run_event_loop(main)


async def watch_parent(supervisor: int, stop: asyncio.Event) -> None:
    """Set ``stop`` once the supervisor is gone (this process was handed to another parent)."""
    while os.getppid() == supervisor:  # noqa: ASYNC110 - no event tells a process its parent died
        await asyncio.sleep(_WATCH_INTERVAL)
    log.error("the supervisor (pid %d) is gone; process %d stops", supervisor, os.getpid())
    stop.set()
