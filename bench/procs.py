"""Child processes for the benchmark: start, pin to a core, wait until ready, measure, stop.

Measurements come straight from /proc: CPU time is ``utime + stime`` of
``/proc/<pid>/stat`` (all threads, dead ones included), memory is ``VmRSS`` and
``VmHWM`` (peak RSS) of ``/proc/<pid>/status``, each summed over the process
and its descendants (the bridge may run worker processes).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


class ProcessError(Exception):
    """A child process failed to start or died; the message carries its log tail."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CoreLayout:
    """Which cores the load generator, the milter under test and the endpoint run on (None: unpinned)."""

    loadgen: frozenset[int] | None
    milter: frozenset[int] | None
    endpoint: frozenset[int] | None

    @classmethod
    def choose(cls, pin: bool = True) -> CoreLayout:
        """Load generator on the first core, milter on the second, endpoint on a third if any.

        With two cores the endpoint shares the load generator's core, so the
        milter process has a core to itself and its CPU per message is clean.
        """
        cores = sorted(os.sched_getaffinity(0))
        if not pin or len(cores) < 2:
            return cls(loadgen=None, milter=None, endpoint=None)
        endpoint = cores[2] if len(cores) > 2 else cores[0]
        return cls(loadgen=frozenset({cores[0]}), milter=frozenset({cores[1]}), endpoint=frozenset({endpoint}))

    def describe(self) -> str:
        if self.milter is None:
            return "not pinned"
        return (
            f"load generator on CPU {_cores(self.loadgen)}, milter on CPU {_cores(self.milter)}, "
            f"endpoint on CPU {_cores(self.endpoint)}"
        )


def _cores(cores: frozenset[int] | None) -> str:
    return ",".join(str(c) for c in sorted(cores)) if cores else "any"


class Child:
    """One child process with its output in a log file; kill it with :meth:`stop`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        cores: frozenset[int] | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stop_timeout: float = 5.0,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.cores = cores
        self.env = env
        self.cwd = cwd
        self.stop_timeout = stop_timeout
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None, "not started"
        return self.popen.pid

    def start(self) -> None:
        cores = self.cores
        log = self.log_path.open("wb")
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                # Its own process group, so stop() reaches any workers it forks.
                start_new_session=True,
                # Pinned before exec, so every thread it ever starts inherits the core.
                preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
            )
        finally:
            log.close()

    def poll_alive(self) -> None:
        """Raise ProcessError (with the log tail) if the process has exited."""
        if self.popen is not None and self.popen.poll() is not None:
            raise ProcessError(f"{self.name} exited with status {self.popen.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL what is left after ``stop_timeout``."""
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(self.stop_timeout)


@contextlib.contextmanager
def running(children: Sequence[Child]) -> Iterator[None]:
    """Start ``children`` in order and stop them in reverse order, whatever happens."""
    started: list[Child] = []
    try:
        for child in children:
            child.start()
            started.append(child)
        yield
    finally:
        for child in reversed(started):
            child.stop()


def wait_for_port(child: Child, host: str, port: int, timeout: float = 30.0) -> None:
    """Wait until ``host:port`` accepts TCP connections, or the child dies, or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        child.poll_alive()
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise ProcessError(
                    f"{child.name} did not listen on {host}:{port} within {timeout:.0f} s:\n{child.log_tail()}"
                ) from None
            time.sleep(0.05)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out (tiny race: fine on a benchmark machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------ /proc


def descendants(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    out = [pid]
    index = 0
    while index < len(out):
        current = out[index]
        index += 1
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with contextlib.suppress(OSError):
                    children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
                    out.extend(int(c) for c in children if int(c) not in out)
    return out


def run_seconds(pid: int) -> float:
    """CPU seconds of ``pid``'s threads and its descendants', to the microsecond.

    From the scheduler's ``se.sum_exec_runtime`` (``/proc/<pid>/task/<tid>/sched``, in ms),
    for spans too short for :func:`cpu_seconds`, whose clock ticks are 10 ms. Threads that
    ended are not counted; 0.0 on a kernel without ``CONFIG_SCHED_DEBUG`` (no ``sched`` file).
    """
    total = 0.0
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    for line in (task / "sched").read_text().splitlines():
                        if line.startswith("se.sum_exec_runtime"):
                            total += float(line.split(":", 1)[1]) / 1000
                            break
    return total


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of ``pid`` and its descendants."""
    total = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{p}/stat").read_text()
            # Fields after the command name, which may contain spaces; utime and
            # stime are fields 14 and 15 of proc(5), here at 11 and 12.
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS_PER_SECOND


def memory_bytes(pid: int, key: str = "VmRSS") -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of ``pid`` plus descendants, in bytes."""
    total = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


def load_average() -> float:
    """The one-minute load average (a busy machine makes numbers noisy)."""
    return os.getloadavg()[0]


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"
