"""Through a real Postfix: messages per second and CPU per message with no milter, pymilter or the bridge.

    python -m bench.postfix                      # 9 rounds of 4,800 messages per target, 1 and 300 per session
    python -m bench.postfix --rounds 1 --messages 800 --per-session 1   # a quick look

Postfix's own load generator, ``smtp-source``, sends 4 KiB messages over 16 parallel SMTP
sessions to a private Postfix (the test suite's harness, ``tests/integration/postfix.py``;
root only), which delivers them to a Maildir. Each round runs every target once, in an order
that alternates between rounds:

* ``none``: Postfix with no milter;
* ``pymilter``: ``bench.pymilter_milter`` (libmilter through pymilter), which adds one header
  at end-of-message;
* ``bridge``: ``milterbridge serve`` with profile (a)'s endpoint (``bench.endpoint``), which
  adds the same header.

``--per-session 1`` sends one message per SMTP session (and so per milter connection), what
most real sessions carry; ``--per-session many`` sends each session's share over one connection
(``smtp-source -d``). After each run every message must be in the Maildir, with the header for
the milter targets; a run that loses or tempfails one is an error.

Reported per target, medians over the rounds: messages per second (``smtp-source``'s wall time),
whole-machine CPU per message (``/proc/stat``, every process), and the CPU per message of
Postfix's processes, of the milter process and of the endpoint, each apart.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import procs, run
from bench.profiles import BENCH_HEADER_NAME, PROFILES
from tests.integration.postfix import PostfixInstance, prerequisites_problem

HOST = "127.0.0.1"
TARGETS = ("none", "pymilter", "bridge")
SENDER = "sender@example.org"
RCPT = "rcpt@example.net"


@dataclass(frozen=True, slots=True)
class Sample:
    """One run of one target."""

    target: str
    per_session: str
    messages: int
    seconds: float
    machine_cpu: float
    postfix_cpu: float
    milter_cpu: float | None
    endpoint_cpu: float | None

    def per_message_us(self, seconds: float | None) -> float | None:
        return None if seconds is None else seconds / self.messages * 1e6


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (``/proc/stat``: all but idle and iowait)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(f) for f in fields]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / procs.CLOCK_TICKS_PER_SECOND


@contextlib.contextmanager
def milter(target: str, workdir: Path) -> Iterator[tuple[str | None, int | None, int | None]]:
    """Start ``target``: (its milter address for Postfix, its pid, its endpoint's pid)."""
    layout = procs.CoreLayout.choose(pin=False)
    if target == "none":
        yield None, None, None
        return
    profile = PROFILES["a"]
    if target == "bridge":
        with run.bridge_with_endpoint(profile, workdir, layout, tag="postfix-bridge", workers=1) as running:
            yield f"inet:{HOST}:{running.port}", running.bridge.pid, running.endpoint.pid
        return
    port = procs.free_port(HOST)
    child = procs.Child(
        target,
        [sys.executable, "-m", "bench.pymilter_milter", "--host", HOST, "--port", str(port), "--events", "eom"],
        log_path=workdir / f"postfix-{target}.log",
        cores=None,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        cwd=run.REPO_ROOT,
        stop_timeout=1.0,
    )
    with procs.running([child]):
        procs.wait_for_port(child, HOST, port)
        yield f"inet:{HOST}:{port}", child.pid, None


def _cpu(pid: int | None) -> float | None:
    return procs.cpu_seconds(pid) if pid is not None else None


def _own_and_reaped(pid: int) -> tuple[float, float]:
    """(utime + stime, cutime + cstime) of ``pid`` in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    ticks = [int(f) for f in stat[stat.rindex(")") + 2 :].split()[11:15]]  # utime, stime, cutime, cstime
    return (ticks[0] + ticks[1]) / procs.CLOCK_TICKS_PER_SECOND, (ticks[2] + ticks[3]) / procs.CLOCK_TICKS_PER_SECOND


@dataclass(frozen=True, slots=True)
class PostfixCpu:
    """Each live Postfix process's own CPU, and what the master has from the children it reaped."""

    own: dict[int, float]
    reaped: float

    @classmethod
    def now(cls, postfix: PostfixInstance) -> PostfixCpu:
        own: dict[int, float] = {}
        reaped = 0.0
        master = postfix.master_pid()
        for pid in postfix.instance_pids():
            with contextlib.suppress(OSError, ValueError):
                own[pid], children = _own_and_reaped(pid)
                if pid == master:
                    reaped = children
        return cls(own, reaped)

    def since(self, before: PostfixCpu) -> float:
        """CPU seconds Postfix used between ``before`` and this snapshot.

        A process alive at both counts its difference; one that exited in between is in the
        master's reaped time with its whole life, so what it had used before is taken off.
        """
        alive = sum(cpu - before.own.get(pid, 0.0) for pid, cpu in self.own.items())
        exited = sum(cpu for pid, cpu in before.own.items() if pid not in self.own)
        return alive + (self.reaped - before.reaped) - exited


def one_run(postfix: PostfixInstance, target: str, per_session: str, args: argparse.Namespace, workdir: Path) -> Sample:
    """Send ``args.messages`` through Postfix with ``target`` as its milter; check every delivery."""
    with milter(target, workdir) as (address, pid, endpoint_pid):
        postfix.set_milter(address, command_timeout="30s", content_timeout="300s")
        postfix.delete_all()
        postfix.clear_maildir()
        argv = ["smtp-source", "-s", str(args.sessions), "-l", str(args.size), "-m", str(args.messages)]
        argv += ["-f", SENDER, "-t", RCPT, "-M", "client.bench.test"]
        if per_session == "many":
            argv.append("-d")
        argv.append(f"{postfix.smtp_host}:{postfix.smtp_port}")
        before = (machine_cpu_seconds(), PostfixCpu.now(postfix), _cpu(pid), _cpu(endpoint_pid))
        started = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
        seconds = time.monotonic() - started
        after = (machine_cpu_seconds(), PostfixCpu.now(postfix), _cpu(pid), _cpu(endpoint_pid))
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-2000:]}")
        delivered = postfix.wait_for_delivery(args.messages, timeout=120.0)
        if len(delivered) != args.messages:
            raise RuntimeError(f"{target}: {len(delivered)} of {args.messages} messages delivered")
        header = f"\n{BENCH_HEADER_NAME}:".encode()
        marked = sum(header in raw.split(b"\n\n", 1)[0] for _name, raw in delivered)
        if marked != (0 if target == "none" else args.messages):
            raise RuntimeError(f"{target}: {marked} of {args.messages} delivered messages have {BENCH_HEADER_NAME}")
    return Sample(
        target=target,
        per_session=per_session,
        messages=args.messages,
        seconds=seconds,
        machine_cpu=after[0] - before[0],
        postfix_cpu=after[1].since(before[1]),
        milter_cpu=None if before[2] is None or after[2] is None else after[2] - before[2],
        endpoint_cpu=None if before[3] is None or after[3] is None else after[3] - before[3],
    )


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def report(samples: Sequence[Sample]) -> str:
    """A table of medians per (messages per session, target)."""
    lines = [
        f"{'per session':<12} {'target':<9} {'msg/s':>8} {'machine µs':>11} {'postfix µs':>11} "
        f"{'milter µs':>10} {'endpoint µs':>12}   (CPU per message, medians of {len(samples)} runs in all)"
    ]
    keys = dict.fromkeys((s.per_session, s.target) for s in samples)
    for per_session, target in keys:
        runs = [s for s in samples if (s.per_session, s.target) == (per_session, target)]

        def col(values: Sequence[float | None], width: int) -> str:
            value = _median(values)
            return f"{'—':>{width}}" if value is None else f"{value:>{width}.0f}"

        lines.append(
            f"{per_session:<12} {target:<9} {col([s.messages / s.seconds for s in runs], 8)} "
            f"{col([s.per_message_us(s.machine_cpu) for s in runs], 11)} "
            f"{col([s.per_message_us(s.postfix_cpu) for s in runs], 11)} "
            f"{col([s.per_message_us(s.milter_cpu) for s in runs], 10)} "
            f"{col([s.per_message_us(s.endpoint_cpu) for s in runs], 12)}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.postfix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--messages", type=int, default=4800, help="messages per run (default 4800)")
    parser.add_argument("--sessions", type=int, default=16, help="parallel SMTP sessions (default 16)")
    parser.add_argument("--size", type=int, default=4096, help="message size in bytes (default 4096)")
    parser.add_argument("--per-session", default="1,many", help="1, many or both (default 1,many)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"subset of {','.join(TARGETS)}")
    args = parser.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    if set(targets) - set(TARGETS):
        parser.error(f"unknown targets: {', '.join(sorted(set(targets) - set(TARGETS)))}")
    if "pymilter" in targets and not run.pymilter_available():
        parser.error("pymilter is not installed: run bench/install-pymilter")
    problem = prerequisites_problem()
    if problem is not None or shutil.which("smtp-source", path="/usr/sbin:/usr/bin") is None:
        print(f"error: {problem or 'smtp-source is missing (Debian: the postfix package)'}", file=sys.stderr)
        return 2
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory() as tmp, PostfixInstance() as postfix:
        for round_number in range(args.rounds):
            order = targets if round_number % 2 == 0 else targets[::-1]
            for per_session in [p for p in args.per_session.split(",") if p]:
                for target in order:
                    sample = one_run(postfix, target, per_session, args, Path(tmp))
                    samples.append(sample)
                    print(
                        f"  round {round_number + 1}: {per_session:>4} per session, {target:<9} "
                        f"{sample.messages / sample.seconds:7.0f} msg/s",
                        file=sys.stderr,
                        flush=True,
                    )
    print(
        f"bench.postfix: Postfix {postfix.version}, {args.sessions} sessions, {args.size}-byte messages, "
        f"{args.messages} per run; {procs.cpu_model()}, {os.cpu_count()} CPUs"
    )
    print(report(samples))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
