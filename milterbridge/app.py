"""The composition root: builds one bridge process from a config and runs it.

``serve`` is what ``milterbridge serve`` calls. With no config (no
``--config`` and no ``MILTERBRIDGE_CONFIG``), or with ``--demo``, it runs the
built-in demo; with more than one worker, ``supervisor.supervise`` runs one
bridge per worker process. Signals: SIGTERM/SIGINT drain (``/readyz`` goes
unready first, the listener stops accepting, in-flight messages finish up to
``server.drain_timeout``); SIGHUP reloads the endpoints from the same file.

A config is only ever applied (at start, on SIGHUP, to a restarted worker) when
it loads, validates, keeps an enforcing endpoint (``serving.check_enforcing``)
and its TLS files and secrets are usable (``preflight``); otherwise the running
config stays, and the refusal is logged at error and counted (design.md §3.7).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from milterbridge import CORE, __version__
from milterbridge.admin import AdminServer, ProcessPages
from milterbridge.background import SHUTDOWN_GRACE
from milterbridge.config import Config, ConfigError, check_waits, load_config
from milterbridge.connection import ConnectionSettings
from milterbridge.demo import DEMO_ADMIN, DEMO_MILTER, DemoFilter, banner, demo_config
from milterbridge.dispatch import Dispatcher
from milterbridge.endpoint import build_endpoints
from milterbridge.hooks import REGISTRATION_WAIT, FileHookBook, HookBook, Registrar
from milterbridge.log import configure_logging
from milterbridge.metrics import Metrics
from milterbridge.milter.context import MemoryBudget
from milterbridge.milter.session import SessionLimits
from milterbridge.server import MilterServer
from milterbridge.serving import config_warnings, load_serving_config
from milterbridge.spans import Tracer
from milterbridge.webhook.client import WebhookClient

log = logging.getLogger("milterbridge.app")


def preflight(config: Config) -> None:
    """Read the TLS files and decode the secrets as the endpoints will, and check that tracing can
    start when it is on (ValueError/OSError if not)."""
    build_endpoints(config.endpoints)
    if config.tracing.enabled:
        tracing_module().check_environment()


def tracing_module() -> Any:
    """``milterbridge.tracing``, imported only when tracing is on; ValueError when OpenTelemetry is missing."""
    try:
        from milterbridge import tracing
    except ImportError as exc:
        raise ValueError(
            f"tracing.enabled is true, but OpenTelemetry cannot be imported ({exc}): pip install 'milterbridge[otel]'"
        ) from None
    return tracing


def load_checked(path: str) -> Config:
    """The config at ``path`` if a bridge may start or reload with it; raises ConfigError, OSError or ValueError."""
    config = load_serving_config(path)
    preflight(config)
    return config


def merge_reload(running: Config, new: Config) -> tuple[Config, bool]:
    """What a reload applies: ``new``'s endpoints and log level on ``running``'s listeners.

    ``allow_no_endpoints`` is about the endpoints, so it follows ``new`` too. The flag says
    whether ``new`` changed anything else in ``[server]``, ``[admin]`` or ``[tracing]`` (that needs a restart).
    Raises ConfigError when ``new``'s budgets do not fit the MTA waits of the ``[server]`` that
    stays (``config.check_waits``): ``new`` was checked against its own.
    """
    server = dataclasses.replace(running.server, allow_no_endpoints=new.server.allow_no_endpoints)
    ignored = new.server != server or new.admin != running.admin or new.tracing != running.tracing
    merged = dataclasses.replace(new, server=server, admin=running.admin, tracing=running.tracing)
    check_waits(merged)
    return merged, ignored


def warn_about(config: Config) -> None:
    """Log ``config_warnings`` at warning level."""
    for warning in config_warnings(config):
        log.warning("config: %s", warning)


def connection_settings(config: Config) -> ConnectionSettings:
    server = config.server
    return ConnectionSettings(
        limits=SessionLimits(
            max_frame_bytes=server.max_frame_bytes,
            max_recipients=server.max_recipients,
            max_headers=server.max_headers,
            max_header_bytes=server.max_header_bytes,
            max_macros=server.max_macros,
            max_message_bytes=server.max_message_bytes,
        ),
        idle_timeout=server.idle_timeout,
        negotiate_timeout=server.negotiate_timeout,
        budget=MemoryBudget(server.max_buffered_bytes),
        progress_interval=server.progress_interval,
    )


class Bridge:
    """One bridge process: milter listener, dispatcher, webhook client, admin HTTP."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None = None,
        reuse_port: bool = False,
        prebound: dict[str, socket.socket] | None = None,
        admin_listen: str | None = None,
        supervised: bool = False,
        metrics: Metrics | None = None,
        tracer: Tracer | None = None,
        shared_dir: str | None = None,
    ) -> None:
        """Build the parts; nothing listens before ``start``.

        ``admin_listen`` replaces ``config.admin.listen`` ("" for no admin HTTP); ``metrics`` is
        where the bridge counts (a new ``Metrics`` by default); ``tracer`` traces the messages
        (by default one from the OTEL_* variables when ``[tracing] enabled``, else none).
        ``shared_dir``: a worker's instance directory, where the instance's registrar publishes
        the MTA Hooks registrations; without it the bridge keeps its own (``hooks.Registrar``).
        """
        self.config = config
        self.config_path = config_path
        #: A worker under ``supervise``: the supervisor checks a reload first and logs its warnings.
        self.supervised = supervised
        self.metrics = Metrics() if metrics is None else metrics
        self.client = WebhookClient(observer=self.metrics)
        #: The tracing this bridge started, and stops at shutdown (not one it was given).
        self._own_tracing: Any = None
        if tracer is None and config.tracing.enabled:
            tracer = self._own_tracing = tracing_module().Tracing.from_environment()
        #: The MTA Hooks registrations the calls use; kept by ``registrar`` when there is one.
        self.hooks: HookBook
        self.registrar: Registrar | None = None
        if shared_dir is not None:
            self.hooks = FileHookBook(shared_dir)
        else:
            self.hooks = HookBook(lambda name, registration: self._registration_gone(name, registration))
            self.registrar = Registrar(self.hooks.publish)
        self._watching: asyncio.Task[None] | None = None
        try:
            #: Builds the endpoints (reading TLS files and secrets: ValueError/OSError when one is bad).
            self.dispatcher = Dispatcher(config, self.client, metrics=self.metrics, tracer=tracer, hooks=self.hooks)
        except BaseException:
            if self._own_tracing is not None:
                self._own_tracing.shutdown()
            raise
        self.metrics.declare_endpoints(e.name for e in config.endpoints)
        self.metrics.set_breaker_source(self.dispatcher.breaker_states)
        self.metrics.set_budget_source(self.dispatcher.budgets)
        self.metrics.set_registration_source(lambda: self.hooks.registered(self.config.endpoints))
        #: What every milter connection runs with: session limits, timeouts, the shared memory budget.
        self.settings = connection_settings(config)
        budget = self.settings.budget
        assert budget is not None
        self.metrics.set_buffered_source(lambda: budget.used)
        self.server = MilterServer(
            config.server.listen,
            self.dispatcher,
            self.settings,
            max_connections=config.server.max_connections,
            allowed_clients=config.server.allowed_clients,
            socket_mode=config.server.socket_mode,
            reuse_port=reuse_port,
            observer=self.metrics,
            prebound=prebound,
        )
        self.metrics.set_event_source(self.server.state.event_counts)
        admin_listen = config.admin.listen if admin_listen is None else admin_listen
        self.admin: AdminServer | None = (
            AdminServer(admin_listen, ProcessPages(self.metrics, self)) if admin_listen else None
        )
        self.draining = False
        self.started = False

    def readiness(self) -> tuple[bool, str]:
        """For /readyz: config loaded, listeners bound, not draining."""
        if self.draining:
            return False, "draining"
        if not self.started or not self.server.is_serving:
            return False, "listeners not bound"
        return True, "ready"

    def _registration_gone(self, name: str, registration: str) -> None:
        if self.registrar is not None:
            self.registrar.gone(name, registration)

    async def _start_hooks(self) -> None:
        """Have the MTA Hooks registrations before the first message, as far as ``REGISTRATION_WAIT`` allows."""
        endpoints = self.config.endpoints
        if self.registrar is not None:
            self.registrar.update(endpoints)
            await self.registrar.wait_registered(REGISTRATION_WAIT)
        elif isinstance(self.hooks, FileHookBook):
            await self.hooks.wait_for(endpoints, REGISTRATION_WAIT)
            self._watching = asyncio.create_task(self.hooks.watch(), name="mta-hooks-watch")
        missing = self.hooks.missing(endpoints)
        if missing:
            log.warning(
                "MTA Hooks endpoints not registered yet (their calls fail by their on_error until they are): %s",
                ", ".join(missing),
            )

    async def _stop_hooks(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
        if self.registrar is not None:
            await self.registrar.aclose()

    async def start(self) -> None:
        await self.client.start()
        loop = asyncio.get_running_loop()
        self.metrics.set_task_source(lambda: len(asyncio.all_tasks(loop)))
        try:
            await self._start_hooks()
            await self.server.start()
            if self.admin is not None:
                await self.admin.start()
        except BaseException:
            await self._stop_hooks()
            await self.client.aclose()
            raise
        self.started = True
        if CORE.stale:
            log.warning("compiled core out of date, running its Python sources: %s (reinstall to compile)", CORE.reason)
        log.info(
            "milterbridge %s ready",
            __version__,
            extra={
                "fields": {
                    "listen": self.server.bound,
                    "endpoints": [e.name for e in self.config.endpoints],
                    "core": CORE.build,
                }
            },
        )

    def reload(self) -> bool:
        """Re-read the config file and apply its endpoints; refuse it (keep the running one) unless it passes."""
        if self.config_path is None:
            return self.refuse_reload("there is no config file (the demo runs)")
        try:
            new = load_serving_config(self.config_path)
            config, ignored = merge_reload(self.config, new)
        except (ConfigError, OSError) as exc:
            return self.refuse_reload(exc)
        try:
            # Builds the new endpoints (reads TLS files, decodes secrets); on error the running ones stay.
            self.dispatcher.reload(config)
        except (ValueError, OSError) as exc:
            return self.refuse_reload(exc)
        if ignored:
            log.warning(
                "config reload: [server], [admin] and [tracing] changes need a restart; applying endpoints only"
            )
        self.config = config
        if self.registrar is not None:
            self.registrar.update(config.endpoints)
        configure_logging(config.log.level)
        self.metrics.reload(True)
        self.metrics.declare_endpoints(e.name for e in config.endpoints)
        log.info("config reloaded", extra={"fields": {"endpoints": [e.name for e in config.endpoints]}})
        if not self.supervised:
            warn_about(config)
        return True

    def refuse_reload(self, reason: object) -> bool:
        """Log and count a refused reload; the running config stays in force."""
        self.metrics.reload(False)
        log.error("config reload refused, keeping the running config: %s", reason)
        return False

    def count_refused_reload(self) -> None:
        """The supervisor refused a reload (and logged why): count it in this worker's metrics."""
        self.metrics.reload(False)

    async def settle(self, timeout: float = SHUTDOWN_GRACE) -> None:
        """Wait up to ``timeout`` for the background calls (notifications, observe endpoints); cancel the rest."""
        await self.dispatcher.aclose(timeout=timeout)

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Drain: unready first, stop accepting, finish in-flight messages, close.

        In-flight messages get ``drain_timeout`` seconds (``server.drain_timeout`` by default).
        """
        self.draining = True
        self.metrics.set_draining(True)
        log.info("draining", extra={"fields": {"connections": len(self.server.state.connections)}})
        await self.server.shutdown(self.config.server.drain_timeout if drain_timeout is None else drain_timeout)
        await self.settle()
        await self._stop_hooks()  # deletes the registrations once no call needs them
        await self.client.aclose()
        if self._own_tracing is not None:
            await asyncio.to_thread(self._own_tracing.shutdown)  # exports the last spans, within a bound
        if self.admin is not None:
            await self.admin.aclose()
        log.info("stopped")


def build_bridge(config: Config, **options: Any) -> Bridge | None:
    """``Bridge(config, **options)``, or None after logging why it cannot be built.

    Building prepares the endpoints, which reads their TLS files and decodes their secrets: a
    certificate rotated into something unreadable since the config was checked fails here.
    """
    try:
        return Bridge(config, **options)
    except (ValueError, OSError) as exc:
        log.error("cannot start: %s", exc)  # noqa: TRY400 - the message names the file
        return None


async def run_bridge(
    bridge: Bridge,
    *,
    demo: DemoFilter | None = None,
    ready_message: str | None = None,
    signals: Mapping[signal.Signals, Callable[[], object]] | None = None,
    blocked: frozenset[signal.Signals] = frozenset(),
) -> int:
    """Start, wait for SIGTERM/SIGINT (SIGHUP reloads), drain, stop.

    ``signals`` adds handlers for the run; ``blocked`` names signals the caller blocked
    until this loop handles them, unblocked once the handlers are installed.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    actions: list[tuple[signal.Signals, Callable[[], object]]] = [
        (signal.SIGTERM, stop.set),
        (signal.SIGINT, stop.set),
        (signal.SIGHUP, bridge.reload),
    ]
    actions.extend((signals or {}).items())
    for sig, action in actions:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, action)
            installed.append(sig)
    if blocked:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
    try:
        try:
            if demo is not None:
                await demo.start()
            await bridge.start()
        except OSError as exc:
            log.error("cannot start: %s", exc)  # noqa: TRY400 - the message names the address
            return 1
        if ready_message:
            print(ready_message, file=sys.stderr, flush=True)
        await stop.wait()
        await bridge.shutdown()
        return 0
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        if demo is not None:
            await demo.aclose()


def run_event_loop(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run ``main()`` to completion in a new event loop (uvloop's when it is installed); its result."""
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())  # type: ignore[no-any-return,unused-ignore]


def serve(config_path: str | None, *, workers: int | None = None, demo: bool = False) -> int:
    """``milterbridge serve``: the configured bridge, or the demo when there is no config (or ``demo``)."""
    path = None if demo else (config_path or os.environ.get("MILTERBRIDGE_CONFIG") or None)
    if path is None:
        return _serve_demo()
    try:
        config = load_checked(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: cannot use config {path}: {exc}", file=sys.stderr)
        return 1
    configure_logging(config.log.level)
    from milterbridge import supervisor  # it imports this module, so not at the top

    count = workers if workers is not None else supervisor.default_workers()
    if count < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    warn_about(config)
    if count > 1:
        return supervisor.supervise(config, path, count)

    async def main() -> int:
        bridge = build_bridge(config, config_path=path)
        return 1 if bridge is None else await run_bridge(bridge)

    return run_event_loop(main)


def _serve_demo() -> int:
    configure_logging("info")
    demo = DemoFilter()
    # The demo honours listen overrides, e.g. MILTERBRIDGE_SERVER__LISTEN=inet:0.0.0.0:8890 in a container.
    try:
        overrides = load_config(None, {k: v for k, v in os.environ.items() if k != "MILTERBRIDGE_CONFIG"})
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    milter = overrides.server.listen[0] if "MILTERBRIDGE_SERVER__LISTEN" in os.environ else DEMO_MILTER
    admin = overrides.admin.listen if "MILTERBRIDGE_ADMIN__LISTEN" in os.environ else DEMO_ADMIN
    config = demo_config(demo.url, milter=milter, admin=admin)

    async def main_demo() -> int:
        bridge = Bridge(config)
        return await run_bridge(bridge, demo=demo, ready_message=banner(config.server.listen[0], config.admin.listen))

    return run_event_loop(main_demo)
