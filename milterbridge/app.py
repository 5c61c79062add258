"""The composition root: builds one bridge process from a config and runs it.

``serve`` is what ``milterbridge serve`` calls. With no config (no
``--config`` and no ``MILTERBRIDGE_CONFIG``), or with ``--demo``, it runs the
built-in demo. Signals: SIGTERM/SIGINT drain (``/readyz`` goes unready first,
the listener stops accepting, in-flight messages finish up to
``server.drain_timeout``); SIGHUP reloads the endpoints from the same file.

A config is only ever applied (at start, on SIGHUP, to a restarted worker) when
it loads, validates, keeps an enforcing endpoint (``config.check_enforcing``)
and its TLS files and secrets are usable (``preflight``); otherwise the running
config stays, and the refusal is logged at error and counted (design.md §3.7).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import select
import signal
import socket
import sys
import time

from milterbridge import CORE, __version__
from milterbridge.admin import AdminServer
from milterbridge.config import Config, ConfigError, config_warnings, load_config, load_serving_config
from milterbridge.connection import ConnectionSettings
from milterbridge.demo import DEMO_ADMIN, DEMO_MILTER, DemoFilter, banner, demo_config
from milterbridge.dispatch import Dispatcher
from milterbridge.log import configure_logging
from milterbridge.metrics import Metrics
from milterbridge.milter.address import parse_listen_address, split_host_port
from milterbridge.milter.context import MemoryBudget
from milterbridge.milter.session import SessionLimits
from milterbridge.server import MilterServer, bind_unix
from milterbridge.webhook.client import WebhookClient

log = logging.getLogger("milterbridge.app")


def preflight(config: Config) -> None:
    """Read the TLS files and decode the secrets as the webhook client will (ValueError/OSError if not)."""
    WebhookClient().update_endpoints(config.endpoints)


def load_checked(path: str) -> Config:
    """The config at ``path`` if a bridge may start or reload with it; raises ConfigError, OSError or ValueError."""
    config = load_serving_config(path)
    preflight(config)
    return config


def merge_reload(running: Config, new: Config) -> tuple[Config, bool]:
    """What a reload applies: ``new``'s endpoints and log level on ``running``'s listeners.

    ``allow_no_endpoints`` is about the endpoints, so it follows ``new`` too. The flag says
    whether ``new`` changed anything else in ``[server]`` or ``[admin]`` (that needs a restart).
    """
    server = dataclasses.replace(running.server, allow_no_endpoints=new.server.allow_no_endpoints)
    ignored = new.server != server or new.admin != running.admin
    return dataclasses.replace(new, server=server, admin=running.admin), ignored


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
    ) -> None:
        self.config = config
        self.config_path = config_path
        #: A worker under ``supervise``: the supervisor checks a reload first and logs its warnings.
        self.supervised = supervised
        self.metrics = Metrics()
        self.client = WebhookClient(observer=self.metrics)
        self.dispatcher = Dispatcher(config, self.client, metrics=self.metrics)
        settings = connection_settings(config)
        budget = settings.budget
        assert budget is not None
        self.metrics.set_buffered_source(lambda: budget.used)
        self.server = MilterServer(
            config.server.listen,
            self.dispatcher,
            settings,
            max_connections=config.server.max_connections,
            allowed_clients=config.server.allowed_clients,
            socket_mode=config.server.socket_mode,
            reuse_port=reuse_port,
            observer=self.metrics,
            prebound=prebound,
        )
        admin_listen = config.admin.listen if admin_listen is None else admin_listen
        self.admin: AdminServer | None = AdminServer(admin_listen, self.metrics, self) if admin_listen else None
        self.draining = False
        self.started = False

    def readiness(self) -> tuple[bool, str]:
        """For /readyz: config loaded, listeners bound, not draining."""
        if self.draining:
            return False, "draining"
        if not self.started or not self.server.is_serving:
            return False, "listeners not bound"
        return True, "ready"

    async def start(self) -> None:
        await self.client.start()
        self.client.update_endpoints(self.config.endpoints)
        self.metrics.set_breaker_source(self.client.breaker_states)
        loop = asyncio.get_running_loop()
        self.metrics.set_task_source(lambda: len(asyncio.all_tasks(loop)))
        try:
            await self.server.start()
            if self.admin is not None:
                await self.admin.start()
        except BaseException:
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
        except (ConfigError, OSError) as exc:
            return self.refuse_reload(exc)
        config, ignored = merge_reload(self.config, new)
        try:
            # Reads TLS files and decodes secrets; on error the running endpoints stay.
            self.client.update_endpoints(config.endpoints)
        except (ValueError, OSError) as exc:
            return self.refuse_reload(exc)
        if ignored:
            log.warning("config reload: [server] and [admin] changes need a restart; applying endpoints only")
        self.dispatcher.reload(config)
        self.config = config
        configure_logging(config.log.level)
        self.metrics.reload(True)
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

    async def shutdown(self) -> None:
        """Drain: unready first, stop accepting, finish in-flight messages, close."""
        self.draining = True
        self.metrics.set_draining(True)
        log.info("draining", extra={"fields": {"connections": len(self.server.state.connections)}})
        await self.server.shutdown(self.config.server.drain_timeout)
        await self.dispatcher.aclose(timeout=5.0)
        await self.client.aclose()
        if self.admin is not None:
            await self.admin.aclose()
        log.info("stopped")


async def run_bridge(bridge: Bridge, *, demo: DemoFilter | None = None, ready_message: str | None = None) -> int:
    """Start, wait for SIGTERM/SIGINT (SIGHUP reloads), drain, stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    actions = [(signal.SIGTERM, stop.set), (signal.SIGINT, stop.set), (signal.SIGHUP, bridge.reload)]
    if bridge.supervised:
        actions.append((REFUSED_SIGNAL, bridge.count_refused_reload))
    for sig, action in actions:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, action)
            installed.append(sig)
    if bridge.supervised:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
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


def _run(coro_factory: object) -> int:
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return asyncio.run(coro_factory())  # type: ignore[operator,no-any-return]
    return uvloop.run(coro_factory())  # type: ignore[operator,no-any-return]


def default_workers() -> int:
    """CPUs this process may use: the affinity mask, capped by a cgroup v2 CPU quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def worker_admin_listen(listen: str, index: int) -> str:
    """Worker ``index`` serves admin HTTP on the configured port plus its index."""
    if not listen or index == 0:
        return listen
    host, port = split_host_port(listen)
    if port == 0:
        return listen
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port + index}"


#: Sent by the supervisor to every worker when it refused a reload, so that each worker's
#: ``config_reloads_total{result="refused"}`` counts it (the supervisor has no metrics).
REFUSED_SIGNAL = signal.SIGUSR1
#: Blocked in a new worker until its event loop handles them (by default each would kill it);
#: one that arrives meanwhile waits and is handled then.
WORKER_SIGNALS = frozenset({signal.SIGHUP, REFUSED_SIGNAL})
#: Seconds before a worker that died is started again.
RESTART_DELAY = 1.0


def supervise(config: Config, path: str, workers: int) -> int:
    """Run ``workers`` bridge processes sharing the listeners; restart any that dies.

    TCP listeners are bound by every worker with SO_REUSEPORT (the kernel
    spreads connections); unix sockets are bound once here and inherited.
    SIGTERM/SIGINT are passed on to the workers. On SIGHUP the supervisor loads
    and checks the file itself: a config that passes becomes the one restarted
    workers start from, and SIGHUP goes on to the workers (which check it again);
    a refused one is logged here and counted by the workers (``REFUSED_SIGNAL``),
    and the workers are left alone. So a worker never starts from a file that
    did not pass, whatever the file holds when it dies.
    """
    prebound: dict[str, socket.socket] = {}
    for text in config.server.listen:
        address = parse_listen_address(text)
        if address.path is not None:
            prebound[address.path] = bind_unix(address.path, config.server.socket_mode)
    children: dict[int, int] = {}
    restarts: dict[int, float] = {}  # worker index -> when to start it again
    accepted = config
    stopping = False
    reload_wanted = False
    # Signal handlers only set flags and write a byte here; the loop below does the work, so
    # loading a file or logging never runs in the middle of whatever the handler interrupted.
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)

    def spawn(index: int) -> None:
        start_config = accepted
        signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        pid = -1
        try:
            pid = os.fork()
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
        if pid == 0:  # pragma: no cover - runs in the child
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            os.close(wake_read)
            os.close(wake_write)
            code = 1
            try:
                admin = worker_admin_listen(start_config.admin.listen, index)

                async def main() -> int:
                    bridge = Bridge(
                        start_config,
                        config_path=path,
                        reuse_port=True,
                        prebound=prebound,
                        admin_listen=admin,
                        supervised=True,
                    )
                    return await run_bridge(bridge)

                code = _run(main)
            finally:
                os._exit(code)
        children[pid] = index
        if stopping:  # a SIGTERM between the fork and the line above did not reach this worker
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def signal_workers(sig: signal.Signals) -> None:
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def on_signal(sig: int, _frame: object) -> None:
        nonlocal stopping, reload_wanted
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
            signal_workers(signal.SIGTERM)
        elif sig == signal.SIGHUP:
            reload_wanted = True
        with contextlib.suppress(BlockingIOError):  # a full pipe already wakes the loop
            os.write(wake_write, b"\0")

    def reload() -> None:
        nonlocal accepted
        try:
            new = load_checked(path)
        except (ConfigError, OSError, ValueError) as exc:
            log.error("config reload refused, keeping the running config: %s", exc)  # noqa: TRY400 - no traceback needed
            signal_workers(REFUSED_SIGNAL)
            return
        accepted, _ = merge_reload(accepted, new)
        configure_logging(accepted.log.level)
        log.info(
            "config accepted, reloading the workers", extra={"fields": {"endpoints": [e.name for e in new.endpoints]}}
        )
        warn_about(accepted)
        signal_workers(signal.SIGHUP)

    def reap() -> int:
        """Collect the workers that ended; schedule restarts. The worst exit code once stopping."""
        worst = 0
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            index = children.pop(pid, -1)
            code = os.waitstatus_to_exitcode(status)
            if index < 0:
                continue
            if stopping:
                worst = max(worst, abs(code))
                continue
            log.error("worker %d (pid %d) exited with %d; restarting", index, pid, code)
            restarts[index] = time.monotonic() + RESTART_DELAY
        return worst

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    try:
        for index in range(workers):
            spawn(index)
        log.info("started %d workers", workers, extra={"fields": {"pids": sorted(children)}})
        worst = 0
        while children or (restarts and not stopping):
            worst = max(worst, reap())
            if stopping:
                restarts.clear()  # a SIGTERM during the pause must not start a worker nobody stops
            if reload_wanted and not stopping:
                reload_wanted = False
                reload()
            now = time.monotonic()
            for index, when in sorted(restarts.items()):
                if when <= now and not stopping:
                    del restarts[index]
                    spawn(index)  # from the last accepted config
            if not children and not restarts:
                break
            wait = min((when - now for when in restarts.values()), default=1.0)
            # SIGCHLD and the other signals write to the pipe, so this returns at once on any of them;
            # the timeout only bounds the wait for a pending restart.
            select.select([wake_read], [], [], max(0.0, min(wait, 1.0)))
            with contextlib.suppress(BlockingIOError):
                os.read(wake_read, 512)
        return min(worst, 1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(wake_read)
        os.close(wake_write)
        for sock in prebound.values():
            sock.close()
        for sock_path in prebound:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock_path)


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
    count = workers if workers is not None else default_workers()
    if count < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    warn_about(config)
    if count > 1:
        return supervise(config, path, count)

    async def main() -> int:
        return await run_bridge(Bridge(config, config_path=path))

    return _run(main)


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

    return _run(main_demo)
