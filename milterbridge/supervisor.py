"""Worker processes: ``milterbridge serve --workers N`` with N above one.

``supervise`` forks the workers, each one a ``Bridge`` run by ``run_worker``, and the
instance view (``instance.run_instance_admin``), and restarts any of them that dies. It
binds the unix milter sockets once for the workers to inherit, and the admin listener for
the instance view, so that an address that cannot be bound stops the start; each worker
serves its own admin pages on a private unix socket that the instance view reads. The
supervisor keeps no metrics: what a worker should count for it reaches the worker as a
signal (``REFUSED_SIGNAL``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import tempfile
import time

from milterbridge.app import build_bridge, load_checked, merge_reload, run_bridge, run_event_loop, warn_about
from milterbridge.config import Config, ConfigError
from milterbridge.hooks import (
    SHARED_FILE,
    Registrar,
    collect_gone_reports,
    file_publisher,
    mta_hooks_endpoints,
    read_published,
)
from milterbridge.instance import run_instance_admin, watch_parent, worker_socket
from milterbridge.log import configure_logging
from milterbridge.milter.address import MAX_UNIX_PATH_BYTES, parse_listen_address, split_host_port
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
#: The index under which the instance view's process is kept among the workers'.
ADMIN_INDEX = -1
#: The index of the MTA Hooks registrar's process (only when the config has such endpoints).
REGISTRAR_INDEX = -2


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


def bind_admin(listen: str) -> socket.socket:
    """The instance view's listening socket at ``host:port``; raises OSError (or ValueError for the text)."""
    host, port = split_host_port(listen)
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return socket.create_server(address[:2], family=family)


def release(prebound: dict[str, socket.socket], admin_sock: socket.socket | None, private_dir: str) -> None:
    """Close what the supervisor bound and remove its files: the unix sockets and the private directory."""
    for sock in prebound.values():
        sock.close()
    for sock_path in prebound:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock_path)
    if admin_sock is not None:
        admin_sock.close()
    if private_dir:
        shutil.rmtree(private_dir, ignore_errors=True)


def run_registrar(config: Config, path: str, directory: str, supervisor: int) -> int:
    """The body of the registrar's process: the instance's MTA Hooks registrations, published in ``directory``.

    SIGHUP reads the config file again (a file that does not load leaves the registrations as
    they are); SIGTERM, sent once the workers are gone, deletes them at the scanners.
    """

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        registrar = Registrar(file_publisher(directory))

        def reload() -> None:
            try:
                registrar.update(load_checked(path).endpoints)
            except (ConfigError, OSError, ValueError) as exc:
                log.error("MTA Hooks registrar: config reload refused, keeping the registrations: %s", exc)  # noqa: TRY400

        loop.add_signal_handler(signal.SIGTERM, stop.set)
        # A Ctrl-C reaches the whole process group: the supervisor stops this process (SIGTERM)
        # once the workers are gone, so that no hook call comes after the deregistration.
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        loop.add_signal_handler(signal.SIGHUP, reload)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
        # A registrar restarted after a crash takes over what its predecessor published.
        registrar.adopt(read_published(os.path.join(directory, SHARED_FILE)), config.endpoints)
        registrar.update(config.endpoints)
        reports = asyncio.create_task(collect_gone_reports(directory, registrar))
        watch = asyncio.create_task(watch_parent(supervisor, stop))
        await stop.wait()
        for task in (reports, watch):
            task.cancel()
        await asyncio.gather(reports, watch, return_exceptions=True)
        await registrar.aclose()
        return 0

    return run_event_loop(main)


def run_worker(
    config: Config, path: str, index: int, prebound: dict[str, socket.socket], admin_listen: str, shared_dir: str
) -> int:
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
            admin_listen=admin_listen,
            supervised=True,
            shared_dir=shared_dir,
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
    admin_sock: socket.socket | None = None
    private_dir = ""
    try:
        for text in config.server.listen:
            address = parse_listen_address(text)
            if address.path is not None:
                prebound[address.path] = bind_unix(address.path, config.server.socket_mode)
        if config.admin.listen:
            admin_sock = bind_admin(config.admin.listen)
        # The workers' admin sockets and the MTA Hooks registrations live here.
        private_dir = tempfile.mkdtemp(prefix="milterbridge-")
    except OSError as exc:
        log.error("cannot start: %s", exc)  # noqa: TRY400 - the message names the address
        release(prebound, admin_sock, private_dir)
        return 1
    sockets = [worker_socket(private_dir, index) for index in range(workers)] if admin_sock is not None else []
    if sockets and len(os.fsencode(sockets[-1])) > MAX_UNIX_PATH_BYTES:
        log.error(
            "cannot start: the workers' admin sockets would be longer than %d bytes (%s): set TMPDIR to a shorter "
            "directory",
            MAX_UNIX_PATH_BYTES,
            sockets[-1],
        )
        release(prebound, admin_sock, private_dir)
        return 1
    supervisor_pid = os.getpid()  # what the admin view watches (a child asking os.getppid() may be too late)
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

    def child_body(index: int, start_config: Config) -> int:  # pragma: no cover - runs in the child
        if index == ADMIN_INDEX:
            assert admin_sock is not None
            for sock in prebound.values():
                sock.close()
            return run_instance_admin(config.admin.listen, admin_sock, sockets, supervisor_pid)
        if admin_sock is not None:
            admin_sock.close()
        if index == REGISTRAR_INDEX:
            for sock in prebound.values():
                sock.close()
            return run_registrar(start_config, path, private_dir, supervisor_pid)
        admin = f"unix:{sockets[index]}" if sockets else ""
        return run_worker(start_config, path, index, prebound, admin, private_dir)

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
                code = child_body(index, start_config)
            finally:
                os._exit(code)
        children[pid] = index
        if stopping:  # a SIGTERM between the fork and the line above did not reach this worker
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def signal_workers(sig: signal.Signals) -> None:
        """Send ``sig`` to every worker (not to the instance view nor the registrar)."""
        for pid, index in list(children.items()):
            if index >= 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    def stop_helpers_after_workers() -> None:
        """Once stopping and no worker is left, SIGTERM the instance view (it said "draining" until then)
        and the registrar (no call needs the registrations any more)."""
        if stopping and children and all(index < 0 for index in children.values()):
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)

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
        registrar = [pid for pid, index in children.items() if index == REGISTRAR_INDEX]
        for pid in registrar:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
        if not registrar and REGISTRAR_INDEX not in restarts and mta_hooks_endpoints(accepted.endpoints):
            spawn(REGISTRAR_INDEX)

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
            index = children.pop(pid, None)
            code = os.waitstatus_to_exitcode(status)
            if index is None:
                continue
            if stopping:
                worst = max(worst, abs(code))
                continue
            if index == ADMIN_INDEX:
                log.error("admin view (pid %d) exited with %d; restarting", pid, code)
            elif index == REGISTRAR_INDEX:
                log.error("MTA Hooks registrar (pid %d) exited with %d; restarting", pid, code)
            else:
                log.error("worker %d (pid %d) exited with %d; restarting", index, pid, code)
            restarts[index] = time.monotonic() + RESTART_DELAY
        return worst

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    try:
        if mta_hooks_endpoints(config.endpoints):
            spawn(REGISTRAR_INDEX)  # first: the workers wait a moment for its registrations
        for index in range(workers):
            spawn(index)
        log.info(
            "started %d workers", workers, extra={"fields": {"pids": sorted(p for p, i in children.items() if i >= 0)}}
        )
        registrars = [pid for pid, index in children.items() if index == REGISTRAR_INDEX]
        if registrars:
            log.info("started the MTA Hooks registrar", extra={"fields": {"pids": registrars}})
        if admin_sock is not None:
            spawn(ADMIN_INDEX)
            admin_pids = [pid for pid, index in children.items() if index == ADMIN_INDEX]
            log.info("started the admin view on %s", config.admin.listen, extra={"fields": {"pids": admin_pids}})
        worst = 0
        while children or (restarts and not stopping):
            worst = max(worst, reap())
            if stopping:
                restarts.clear()  # a SIGTERM during the pause must not start a worker nobody stops
                stop_helpers_after_workers()
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
        release(prebound, admin_sock, private_dir)
