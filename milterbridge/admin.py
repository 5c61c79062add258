"""The admin HTTP listener: ``/livez``, ``/readyz`` and ``/metrics`` (design.md §6).

It runs inside an event loop through aiohttp's ``AppRunner``, on ``host:port``, on
``unix:/path`` (a worker's private socket) or on a socket bound by the caller. What it
answers comes from ``AdminPages``:

- ``ProcessPages``, one bridge process's own answers:

  - ``GET /livez``: 200 ``ok`` while the process can answer HTTP at all. It never looks at
    endpoints or readiness, so an orchestrator does not restart a bridge whose filters are down.
  - ``GET /readyz``: 200 ``ready``, or 503 with the reason from the ``HealthSource`` (config
    loaded, listener bound, not draining: the application decides).
  - ``GET /metrics``: the ``Metrics`` registry in the Prometheus text format.

- ``instance.InstancePages``, the sum over the workers under a supervisor.

Every other path is 404 (and another method on these paths 405). Every answer carries the
answering process's id in ``Milterbridge-Pid``, which is how the instance view tells a
restarted worker from the one before it. Access logging is off: a scrape every few seconds
would otherwise drown the per-message lines. The module knows the server only through
``HealthSource``, never its internals (style.md §2).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Final, Protocol, Self

from aiohttp import web

from milterbridge.metrics import Metrics
from milterbridge.milter.address import parse_listen_address, split_host_port
from milterbridge.server import bind_unix

__all__ = ["HealthSource", "AdminPages", "ProcessPages", "AdminServer", "PID_HEADER"]

log = logging.getLogger(__name__)

#: Admin answers are instant; on shutdown an open keep-alive connection gets this long.
_SHUTDOWN_TIMEOUT: Final = 1.0
_NO_STORE: Final = {"Cache-Control": "no-store"}
#: The header naming the process that answered.
PID_HEADER: Final = "Milterbridge-Pid"
#: A worker's private admin socket: its supervisor's instance view is the only reader.
PRIVATE_SOCKET_MODE: Final = 0o600


class HealthSource(Protocol):
    """What ``/readyz`` asks; implemented by the application."""

    def readiness(self) -> tuple[bool, str]:
        """Whether the bridge is ready for mail, and a short reason (shown when it is not)."""
        ...


class AdminPages(Protocol):
    """What the three paths answer."""

    async def livez(self) -> tuple[bool, str]:
        """Whether the process (or instance) is alive, and a short reason when it is not."""
        ...

    async def readyz(self) -> tuple[bool, str]:
        """Whether it is ready for mail, and a short reason (shown when it is not)."""
        ...

    async def metrics(self) -> tuple[bytes, str]:
        """The metrics page and its content type."""
        ...


class ProcessPages:
    """``AdminPages`` of one bridge process: always alive, ready as ``health`` says, its own metrics."""

    def __init__(self, metrics: Metrics, health: HealthSource) -> None:
        self._metrics = metrics
        self._health = health

    async def livez(self) -> tuple[bool, str]:
        return True, "ok"

    async def readyz(self) -> tuple[bool, str]:
        return self._health.readiness()

    async def metrics(self) -> tuple[bytes, str]:
        return self._metrics.render()


class AdminServer:
    """The admin listener. Construct, then ``start()``; ``aclose()`` stops it (or use ``async with``)."""

    def __init__(self, listen: str, pages: AdminPages, *, sock: socket.socket | None = None) -> None:
        """Parse ``listen``: ``host:port`` or ``[v6]:port`` (port 0 picks a free port), or ``unix:/path``.

        With ``sock`` (a bound socket), that socket is served and ``listen`` only names it in the log.

        Raises:
            ValueError: ``listen`` is not of that form.
        """
        self.listen = listen
        self._path: str | None = None
        self._host, self._port = "", 0
        if listen.startswith("unix:"):
            self._path = parse_listen_address(listen).path
        elif sock is None:
            self._host, self._port = split_host_port(listen)
        self._sock = sock
        self._pages = pages
        # Built here, in the process that serves (a worker forks from the supervisor).
        self._headers: Final = {**_NO_STORE, PID_HEADER: str(os.getpid())}
        self._runner: web.AppRunner | None = None
        self._bound: tuple[str, int] | None = None

    @property
    def bound(self) -> tuple[str, int]:
        """The (host, port) actually listened on, once started (("unix", 0) for a unix socket).

        Raises:
            RuntimeError: the server is not running.
        """
        if self._bound is None:
            raise RuntimeError("admin server is not running")
        return self._bound

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_page)
        return app

    async def start(self) -> None:
        """Bind and start answering.

        Raises:
            OSError: the address cannot be bound (in use, not local ...).
            RuntimeError: already started.
        """
        if self._runner is not None:
            raise RuntimeError("admin server already started")
        runner = web.AppRunner(self._app(), handle_signals=False, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            site: web.BaseSite
            if self._sock is not None:
                site = web.SockSite(runner, self._sock)
            elif self._path is not None:
                site = web.SockSite(runner, bind_unix(self._path, PRIVATE_SOCKET_MODE))
            else:
                site = web.TCPSite(runner, self._host, self._port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        sockname = runner.addresses[0]
        if isinstance(sockname, tuple):
            self._bound = (str(sockname[0]), int(sockname[1]))
            fields: dict[str, object] = {"host": self._bound[0], "port": self._bound[1]}
        else:
            self._bound = ("unix", 0)
            fields = {"path": sockname if isinstance(sockname, str) else repr(sockname)}
        log.info("admin listening on %s", self.listen, extra={"fields": fields})

    async def aclose(self) -> None:
        """Stop listening and close open connections. Safe to call twice, or before ``start``."""
        runner, self._runner = self._runner, None
        self._bound = None
        if runner is not None:
            await runner.cleanup()
            if self._path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- handlers -------------------------------------------------------------------------

    async def _livez(self, request: web.Request) -> web.Response:
        return await self._check(self._pages.livez, "ok", "alive", "liveness")

    async def _readyz(self, request: web.Request) -> web.Response:
        return await self._check(self._pages.readyz, "ready", "ready", "readiness")

    async def _check(
        self, check: Callable[[], Awaitable[tuple[bool, str]]], good: str, state: str, what: str
    ) -> web.Response:
        """200 ``good`` when ``check`` holds, else 503 with its reason (``not <state>`` without one)."""
        try:
            holds, reason = await check()
        except Exception:
            # A failing check means "not ready" (or alive), never a 500 that looks like a crash.
            log.exception("%s check failed", what)
            holds, reason = False, f"{what} check failed"
        if holds:
            return web.Response(text=good, headers=self._headers)
        return web.Response(status=503, text=reason or f"not {state}", headers=self._headers)

    async def _metrics_page(self, request: web.Request) -> web.Response:
        body, content_type = await self._pages.metrics()
        # content_type= would reject the charset and version parameters; set the header as is.
        return web.Response(body=body, headers={"Content-Type": content_type, **self._headers})
