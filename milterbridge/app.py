"""The composition root: builds one bridge process from a config and runs it.

``serve`` is what ``milterbridge serve`` calls. With no config (no
``--config`` and no ``MILTERBRIDGE_CONFIG``) it runs the built-in demo.
Signals: SIGTERM/SIGINT drain (``/readyz`` goes unready first, the listener
stops accepting, in-flight messages finish up to ``server.drain_timeout``);
SIGHUP reloads the endpoints from the same file, keeping the old ones if the
new config is invalid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time

from milterbridge import CORE, __version__
from milterbridge.admin import AdminServer
from milterbridge.config import Config, ConfigError, load_config
from milterbridge.connection import ConnectionSettings
from milterbridge.demo import DEMO_ADMIN, DEMO_MILTER, DemoFilter, banner, demo_config
from milterbridge.dispatch import Dispatcher
from milterbridge.log import configure_logging
from milterbridge.metrics import Metrics
from milterbridge.milter.address import parse_listen_address, split_host_port
from milterbridge.milter.session import SessionLimits
from milterbridge.server import MilterServer, bind_unix
from milterbridge.webhook.client import WebhookClient

log = logging.getLogger("milterbridge.app")


def connection_settings(config: Config) -> ConnectionSettings:
    server = config.server
    return ConnectionSettings(
        limits=SessionLimits(
            max_frame_bytes=server.max_frame_bytes,
            max_recipients=server.max_recipients,
            max_headers=server.max_headers,
            max_header_bytes=server.max_header_bytes,
            max_macros=server.max_macros,
        ),
        idle_timeout=server.idle_timeout,
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
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics = Metrics()
        self.client = WebhookClient(observer=self.metrics)
        self.dispatcher = Dispatcher(config, self.client, metrics=self.metrics)
        self.server = MilterServer(
            config.server.listen,
            self.dispatcher,
            connection_settings(config),
            max_connections=config.server.max_connections,
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
        """Re-read the config file; apply new endpoints, keep the old config on error."""
        try:
            config = load_config(self.config_path)
        except (ConfigError, OSError) as exc:
            self.metrics.reload(False)
            log.error("config reload refused, keeping the running config: %s", exc)  # noqa: TRY400 - no traceback needed
            return False
        if config.server != self.config.server or config.admin != self.config.admin:
            log.warning("config reload: [server] and [admin] changes need a restart; applying endpoints only")
        config = Config(server=self.config.server, admin=self.config.admin, log=config.log, endpoints=config.endpoints)
        try:
            # Reads TLS files and decodes secrets; on error the running endpoints stay.
            self.client.update_endpoints(config.endpoints)
        except (ValueError, OSError) as exc:
            self.metrics.reload(False)
            log.error("config reload refused, keeping the running config: %s", exc)  # noqa: TRY400
            return False
        self.dispatcher.reload(config)
        self.config = config
        configure_logging(config.log.level)
        self.metrics.reload(True)
        log.info("config reloaded", extra={"fields": {"endpoints": [e.name for e in config.endpoints]}})
        return True

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
    for sig, action in ((signal.SIGTERM, stop.set), (signal.SIGINT, stop.set), (signal.SIGHUP, bridge.reload)):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, action)
            installed.append(sig)
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


def supervise(config: Config, path: str | None, workers: int) -> int:
    """Run ``workers`` bridge processes sharing the listeners; restart any that dies.

    TCP listeners are bound by every worker with SO_REUSEPORT (the kernel
    spreads connections); unix sockets are bound once here and inherited.
    SIGTERM/SIGINT and SIGHUP are passed on to the workers.
    """
    prebound: dict[str, socket.socket] = {}
    for text in config.server.listen:
        address = parse_listen_address(text)
        if address.path is not None:
            prebound[address.path] = bind_unix(address.path, config.server.socket_mode)
    children: dict[int, int] = {}
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                admin = worker_admin_listen(config.admin.listen, index)

                async def main() -> int:
                    bridge = Bridge(config, config_path=path, reuse_port=True, prebound=prebound, admin_listen=admin)
                    return await run_bridge(bridge)

                code = _run(main)
            finally:
                os._exit(code)
        children[pid] = index

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if sig == signal.SIGINT else sig)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        for index in range(workers):
            spawn(index)
        log.info("started %d workers", workers, extra={"fields": {"pids": sorted(children)}})
        worst = 0
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
            index = children.pop(pid, -1)
            code = os.waitstatus_to_exitcode(status)
            if index < 0:
                continue
            if stopping:
                worst = max(worst, abs(code))
                continue
            log.error("worker %d (pid %d) exited with %d; restarting", index, pid, code)
            time.sleep(1.0)
            if not stopping:  # a SIGTERM during the pause must not start a worker nobody stops
                spawn(index)
        return min(worst, 1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sock in prebound.values():
            sock.close()
        for sock_path in prebound:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock_path)


def serve(config_path: str | None, *, workers: int | None = None) -> int:
    """``milterbridge serve``: the configured bridge, or the demo when there is no config."""
    path = config_path or os.environ.get("MILTERBRIDGE_CONFIG") or None
    if path is None:
        configure_logging("info")
        demo = DemoFilter()
        # The demo honours listen overrides, e.g. MILTERBRIDGE_SERVER__LISTEN=inet:0.0.0.0:8890 in a container.
        try:
            overrides = load_config(None)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        milter = overrides.server.listen[0] if "MILTERBRIDGE_SERVER__LISTEN" in os.environ else DEMO_MILTER
        admin = overrides.admin.listen if "MILTERBRIDGE_ADMIN__LISTEN" in os.environ else DEMO_ADMIN
        config = demo_config(demo.url, milter=milter, admin=admin)

        async def main_demo() -> int:
            bridge = Bridge(config)
            return await run_bridge(
                bridge, demo=demo, ready_message=banner(config.server.listen[0], config.admin.listen)
            )

        return _run(main_demo)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot read config {path}: {exc}", file=sys.stderr)
        return 1
    configure_logging(config.log.level)
    count = workers if workers is not None else default_workers()
    if count < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    if count > 1:
        return supervise(config, path, count)

    async def main() -> int:
        return await run_bridge(Bridge(config, config_path=path))

    return _run(main)
