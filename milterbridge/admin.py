"""The admin HTTP listener: ``/livez``, ``/readyz`` and ``/metrics`` (design.md §6).

It runs inside the bridge's own event loop through aiohttp's ``AppRunner`` and ``TCPSite``:

- ``GET /livez``: 200 ``ok`` while the process can answer HTTP at all. It never looks at
  endpoints or readiness, so an orchestrator does not restart a bridge whose filters are down.
- ``GET /readyz``: 200 ``ready``, or 503 with the reason from the ``HealthSource`` (config
  loaded, listener bound, not draining: the application decides).
- ``GET /metrics``: the ``Metrics`` registry in the Prometheus text format.

Every other path is 404 (and another method on these paths 405). Access logging is off: a
scrape every few seconds would otherwise drown the per-message lines. The module knows the
server only through ``HealthSource``, never its internals (style.md §2).
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Final, Protocol, Self

from aiohttp import web

from milterbridge.metrics import Metrics
from milterbridge.milter.address import split_host_port

__all__ = ["HealthSource", "AdminServer"]

log = logging.getLogger(__name__)

#: Admin answers are instant; on shutdown an open keep-alive connection gets this long.
_SHUTDOWN_TIMEOUT: Final = 1.0
_NO_STORE: Final = {"Cache-Control": "no-store"}


class HealthSource(Protocol):
    """What ``/readyz`` asks; implemented by the application."""

    def readiness(self) -> tuple[bool, str]:
        """Whether the bridge is ready for mail, and a short reason (shown when it is not)."""
        ...


class AdminServer:
    """The admin listener. Construct, then ``start()``; ``aclose()`` stops it (or use ``async with``)."""

    def __init__(self, listen: str, metrics: Metrics, health: HealthSource) -> None:
        """Parse ``listen`` (``host:port`` or ``[v6]:port``; port 0 picks a free port).

        Raises:
            ValueError: ``listen`` is not of that form.
        """
        self.listen = listen
        self._host, self._port = split_host_port(listen)
        self._metrics = metrics
        self._health = health
        self._runner: web.AppRunner | None = None
        self._bound: tuple[str, int] | None = None

    @property
    def bound(self) -> tuple[str, int]:
        """The (host, port) actually listened on, once started.

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
            site = web.TCPSite(runner, self._host, self._port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        sockname = runner.addresses[0]
        self._bound = (str(sockname[0]), int(sockname[1]))
        log.info(
            "admin listening on %s", self.listen, extra={"fields": {"host": self._bound[0], "port": self._bound[1]}}
        )

    async def aclose(self) -> None:
        """Stop listening and close open connections. Safe to call twice, or before ``start``."""
        runner, self._runner = self._runner, None
        self._bound = None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- handlers -------------------------------------------------------------------------

    async def _livez(self, request: web.Request) -> web.Response:
        return web.Response(text="ok", headers=_NO_STORE)

    async def _readyz(self, request: web.Request) -> web.Response:
        try:
            ready, reason = self._health.readiness()
        except Exception:
            # A failing check means "not ready", never a 500 that looks like a crash.
            log.exception("readiness check failed")
            ready, reason = False, "readiness check failed"
        if ready:
            return web.Response(text="ready", headers=_NO_STORE)
        return web.Response(status=503, text=reason or "not ready", headers=_NO_STORE)

    async def _metrics_page(self, request: web.Request) -> web.Response:
        body, content_type = self._metrics.render()
        # content_type= would reject the charset and version parameters; set the header as is.
        return web.Response(body=body, headers={"Content-Type": content_type, **_NO_STORE})
