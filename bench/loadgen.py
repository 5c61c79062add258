"""The load generator: many concurrent milter connections driven by ``milterbridge.client``.

Each worker plays one Postfix smtpd process: it opens a milter connection,
negotiates (offering everything, as Postfix does), sends CONNECT and HELO,
then a few transactions (MAIL .. end-of-message, ABORT), then QUIT, and starts
over until the run's time or message budget is spent. A message counts as
done when the milter answers accept or continue at end-of-message *and* adds
the bench header; anything else is an error, with a sample kept for the report.

Latency is measured per transaction, from MAIL to the end-of-message reply.

Run it alone against any milter::

    python -m bench.loadgen inet:127.0.0.1:8890 --profile a --concurrency 16 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import resource
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from bench import eventloop
from bench.profiles import BENCH_HEADER_NAME, PROFILES, Profile, build_envelope, build_message
from milterbridge.client import Envelope, MilterClient, MilterClientError, TransactionResult
from milterbridge.milter.messages import Accept, AddHeader, Continue

#: Stop a run early when this many errors came before any success: the target is down.
MAX_ERRORS_WITHOUT_SUCCESS = 50
#: Error messages kept for the report.
MAX_ERROR_SAMPLES = 5


class LoadError(Exception):
    """The target refused the load (an idle connection was turned away)."""


@dataclass(slots=True, kw_only=True)
class LoadResult:
    """What one load run measured."""

    concurrency: int
    messages: int = 0
    errors: int = 0
    connections: int = 0
    elapsed_seconds: float = 0.0
    #: Per-message latencies, sorted once the run ends.
    latencies_seconds: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    #: CPU time this process (the load generator) used during the run.
    loadgen_cpu_seconds: float = 0.0

    @property
    def messages_per_second(self) -> float:
        return self.messages / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    @property
    def loadgen_busy(self) -> float:
        """Fraction of one core the load generator used (near 1.0: it, not the target, is the limit)."""
        return self.loadgen_cpu_seconds / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    def percentile_seconds(self, pct: float) -> float:
        """Nearest-rank percentile of the message latencies (0.0 when there are none)."""
        data = self.latencies_seconds
        if not data:
            return 0.0
        rank = max(1, math.ceil(pct / 100.0 * len(data)))
        return data[min(rank, len(data)) - 1]

    def record_error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES and text not in self.error_samples:
            self.error_samples.append(text)


def check_result(result: TransactionResult) -> str | None:
    """Why a transaction does not count as a benchmark success, or None if it does."""
    if result.stopped_by is not None:
        return f"stopped at {result.stopped_at} by {type(result.stopped_by).__name__}"
    if result.eom is None:
        return "no end-of-message reply"
    if not isinstance(result.eom.reply, Accept | Continue):
        return f"end-of-message answered {type(result.eom.reply).__name__}"
    name = BENCH_HEADER_NAME.encode()
    if not any(isinstance(mod, AddHeader) and mod.name == name for mod in result.eom.modifications):
        return f"no {BENCH_HEADER_NAME} header added"
    return None


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_load(
    address: str,
    profile: Profile,
    *,
    concurrency: int,
    duration_seconds: float | None = None,
    max_messages: int | None = None,
    message_timeout: float = 60.0,
    connect_timeout: float = 10.0,
) -> LoadResult:
    """Drive ``address`` with ``concurrency`` connections until time or message budget runs out."""
    if duration_seconds is None and max_messages is None:
        raise ValueError("give duration_seconds, max_messages or both")
    message = build_message(profile)
    envelope = build_envelope(profile)
    result = LoadResult(concurrency=concurrency)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration_seconds if duration_seconds is not None else math.inf
    started = 0  # messages started, against max_messages
    per_connection = max(profile.messages_per_connection, 1)

    def may_start() -> bool:
        nonlocal started
        if loop.time() >= deadline:
            return False
        if result.errors >= MAX_ERRORS_WITHOUT_SUCCESS and result.messages == 0:
            return False
        if max_messages is not None and started >= max_messages:
            return False
        started += 1
        return True

    async def worker() -> None:
        while may_start():
            client: MilterClient | None = None
            try:
                async with asyncio.timeout(connect_timeout):
                    client = await MilterClient.open(address)
                    await client.negotiate()
                    opening = await client.open_session(envelope)
                result.connections += 1
                if opening.stopped_by is not None:
                    result.record_error(f"session refused at {opening.stopped_at}")
                    continue
                for n in range(per_connection):
                    if n and not may_start():
                        break
                    t0 = time.perf_counter()
                    async with asyncio.timeout(message_timeout):
                        transaction = await client.send_transaction(envelope, message)
                    elapsed = time.perf_counter() - t0
                    problem = check_result(transaction)
                    if problem is None:
                        result.messages += 1
                        result.latencies_seconds.append(elapsed)
                    else:
                        result.record_error(problem)
                await client.quit()
                client = None
            except (MilterClientError, OSError, TimeoutError) as exc:
                result.record_error(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
                # A dead or refusing target must not turn this loop into a busy spin.
                await asyncio.sleep(0.02)
            finally:
                if client is not None:
                    await client.aclose()

    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())
    result.elapsed_seconds = time.perf_counter() - t0
    result.loadgen_cpu_seconds = _cpu_seconds() - cpu0
    result.latencies_seconds.sort()
    return result


@contextlib.asynccontextmanager
async def idle_connections(
    address: str,
    count: int,
    envelope: Envelope | None = None,
    *,
    batch: int = 100,
    connect_timeout: float = 30.0,
) -> AsyncIterator[list[MilterClient]]:
    """``count`` connections that negotiated and said CONNECT and HELO, then sit idle.

    They are opened ``batch`` at a time (a burst like Postfix's at start-up,
    within the listen backlog) and closed with QUIT on exit.
    """
    envelope = envelope or Envelope()
    clients: list[MilterClient] = []

    async def one() -> None:
        client = await MilterClient.open(address)
        clients.append(client)
        await client.negotiate()
        opening = await client.open_session(envelope)
        if opening.stopped_by is not None:
            raise LoadError(f"idle connection refused at {opening.stopped_at}")

    try:
        async with asyncio.timeout(connect_timeout):
            for start in range(0, count, batch):
                async with asyncio.TaskGroup() as group:
                    for _ in range(min(batch, count - start)):
                        group.create_task(one())
        yield clients
    finally:
        await asyncio.gather(*(_quit(c) for c in clients))


async def _quit(client: MilterClient) -> None:
    with contextlib.suppress(OSError, MilterClientError):
        await client.quit()
    await client.aclose()


def raise_open_files_limit(wanted: int) -> None:
    """Lift the soft RLIMIT_NOFILE toward ``wanted`` (idle profiles need one fd per connection)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# ------------------------------------------------------------------ command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("address", help="milter address: inet:host:port or unix:/path")
    parser.add_argument("--profile", default="a", choices=sorted(k for k, p in PROFILES.items() if p.kind == "sweep"))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds (default 5)")
    parser.add_argument("--messages", type=int, default=None, help="stop after this many messages")
    parser.add_argument("--messages-per-connection", type=int, default=None)
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.messages_per_connection is not None:
        profile = profile.scaled(messages_per_connection=args.messages_per_connection)
    raise_open_files_limit(args.concurrency + 100)
    res = eventloop.run(
        run_load(
            args.address,
            profile,
            concurrency=args.concurrency,
            duration_seconds=args.duration,
            max_messages=args.messages,
        )
    )
    print(
        f"{res.messages} messages in {res.elapsed_seconds:.2f} s: {res.messages_per_second:.0f} msg/s, "
        f"p50 {res.percentile_seconds(50) * 1e3:.2f} ms, p90 {res.percentile_seconds(90) * 1e3:.2f} ms, "
        f"p99 {res.percentile_seconds(99) * 1e3:.2f} ms, {res.errors} errors, "
        f"load generator busy {res.loadgen_busy:.0%}"
    )
    for sample in res.error_samples:
        print(f"  error: {sample}", file=sys.stderr)
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())
