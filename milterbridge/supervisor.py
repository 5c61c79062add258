"""Worker processes: ``milterbridge serve --workers N`` with N above one.

``supervise`` forks the workers, each one a ``Bridge`` run by ``run_worker``, and
restarts any that dies. It owns no listener of its own beyond the unix sockets it
binds once for the workers to inherit, and no metrics: what a worker should count
for it reaches the worker as a signal (``REFUSED_SIGNAL``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import time

from milterbridge.app import build_bridge, load_checked, merge_reload, run_bridge, run_event_loop, warn_about
from milterbridge.config import Config, ConfigError
from milterbridge.log import configure_logging
from milterbridge.milter.address import parse_listen_address, split_host_port
from milterbridge.server import bind_unix

#: Its lines sit among the ones ``app`` logs at start and reload, under the same name.
log = logging.getLogger("milterbridge.app")

#: Sent by the supervisor to every worker when it refused a reload, so that each worker's
#: ``config_reloads_total{result="refused"}`` counts it (the supervisor has no metrics).
REFUSED_SIGNAL = signal.SIGUSR1
#: Blocked in a new worker until its event loop handles them (by default each would kill it);
#: one that arrives meanwhile waits and is handled then.
WORKER_SIGNALS = frozenset({signal.SIGHUP, REFUSED_SIGNAL})
#: Seconds before a worker that died is started again.
RESTART_DELAY = 1.0


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


def run_worker(config: Config, path: str, index: int, prebound: dict[str, socket.socket]) -> int:
    """The body of worker ``index`` (in the forked child): one supervised bridge until SIGTERM.

    The worker starts with ``WORKER_SIGNALS`` blocked; ``run_bridge`` unblocks them once
    its loop handles them.
    """

    async def main() -> int:
        bridge = build_bridge(
            config,
            config_path=path,
            reuse_port=True,
            prebound=prebound,
            admin_listen=worker_admin_listen(config.admin.listen, index),
            supervised=True,
        )
        if bridge is None:
            return 1
        return await run_bridge(bridge, signals={REFUSED_SIGNAL: bridge.count_refused_reload}, blocked=WORKER_SIGNALS)

    return run_event_loop(main)


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
                code = run_worker(start_config, path, index, prebound)
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
            merged, _ = merge_reload(accepted, new)
        except (ConfigError, OSError, ValueError) as exc:
            log.error("config reload refused, keeping the running config: %s", exc)  # noqa: TRY400 - no traceback needed
            signal_workers(REFUSED_SIGNAL)
            return
        accepted = merged
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
