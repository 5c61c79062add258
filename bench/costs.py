"""Where the bridge's CPU per message goes, measured in parts (profile a by default).

    python -m bench.costs                 # about 30 seconds
    python -m bench.costs --messages 300  # a quick look
    python -m bench.costs --instructions  # the milter side in instructions (valgrind), about a minute
    python -m bench.costs --bridge-instructions  # the whole bridge process in instructions, about 80 s
    python -m bench.costs --bridge-instructions --messages-per-connection 1  # one message per session

1. **milter side**: the bridge's own Python work per message, without sockets or HTTP:
   ``MilterConnection``, the session, the dispatcher, the policy and the payload, fed the
   bytes the load generator writes (one ``data_received`` per write, as a socket would
   deliver them one by one), with a webhook client stub that answers at once.
2. **webhook call**: one ``WebhookClient.post`` of that profile's real eom request to
   ``bench.endpoint`` (its own process), one call after another.
3. **aiohttp alone**: the same request through a bare ``aiohttp.ClientSession.post``: the
   client the bridge used before ``milterbridge/webhook/http.py``, for comparison.

``--bridge-instructions`` counts instead the user-space instructions per message of a whole
``milterbridge serve`` under valgrind, driven by the load generator at 4 concurrent
connections and calling ``bench.endpoint``: sockets, uvloop and the HTTP client included, the
kernel not.

Each figure is the CPU time (user + system) of this process divided by the messages or
calls. This process runs on the first core, the endpoint on the second. The parts add up
to less than ``python -m bench.run`` shows for the bridge: the rest is the milter socket
(reads, the reply's write) and the event loop's scheduling around them.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

import milterbridge
from bench import eventloop, procs, run
from bench.endpoint import _CONTINUE, _EOM, HOOK_PATH
from bench.loadgen import run_load
from bench.profiles import PROFILES, Profile, build_envelope, build_message
from milterbridge.admission import ServerState
from milterbridge.app import connection_settings
from milterbridge.client import MilterClient
from milterbridge.config import Config, EndpointSettings, load_config
from milterbridge.connection import MilterConnection
from milterbridge.dispatch import Dispatcher
from milterbridge.metrics import Metrics
from milterbridge.webhook.client import WebhookClient, WebhookResponse, prepare_endpoint

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent


class _InstantWebhooks:
    """A webhook client stub: answers like bench.endpoint, at once, and keeps the last eom body."""

    def __init__(self) -> None:
        self.eom_body = b""

    async def post(
        self, endpoint: Any, body: Any, *, webhook_id: str, timeout: float | None = None, headers: bytes = b""
    ) -> Any:
        data = body if isinstance(body, bytes) else b"".join(body.chunks())
        # "event" is the first member of every request: no need to parse the rest here.
        eom = data.startswith(b'{"event":"eom"')
        if eom:
            self.eom_body = data
        return WebhookResponse(status=200, body=_EOM if eom else _CONTINUE, attempts=1, elapsed=0.0)


class _Transport(asyncio.Transport):
    """A transport that hands what the connection writes to ``sink``."""

    def __init__(self, sink: Any) -> None:
        super().__init__()
        self._sink = sink
        self._closing = False

    def write(self, data: Any) -> None:
        self._sink(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        return None

    def resume_reading(self) -> None:
        return None

    def close(self) -> None:
        self._closing = True

    def abort(self) -> None:
        self._closing = True

    def is_closing(self) -> bool:
        return self._closing


class _RecordingWriter:
    """Stands in for the client's StreamWriter: passes each write to the connection and records it."""

    def __init__(self) -> None:
        self.connection: MilterConnection | None = None
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        assert self.connection is not None
        self.connection.data_received(data)

    async def drain(self) -> None:
        return None

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        return None

    async def wait_closed(self) -> None:
        return None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def load_bridge_config(profile: Profile, url: str) -> Config:
    """The config ``bench.run`` gives the bridge for ``profile`` (nothing listens here), pointing at ``url``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.toml"
        path.write_text(run.bridge_config(1, 2, url, profile))
        return load_config(path)


async def milter_side(profile: Profile, messages: int) -> tuple[float, bytes]:
    """CPU µs per message of the bridge's milter side (see the module docstring); also an eom body."""
    config = load_bridge_config(profile, f"http://{HOST}:1{HOOK_PATH}")
    webhooks = _InstantWebhooks()
    dispatcher = Dispatcher(config, webhooks, metrics=Metrics())
    settings = connection_settings(config)
    state = ServerState()
    envelope, message = build_envelope(profile), build_message(profile)
    per_connection = max(profile.messages_per_connection, 1)

    # Record what the load generator writes for one connection, write by write.
    reader = asyncio.StreamReader()
    writer = _RecordingWriter()
    writer.connection = MilterConnection(state, dispatcher, settings)
    writer.connection.connection_made(_Transport(reader.feed_data))
    client = MilterClient(reader, writer)  # type: ignore[arg-type]
    await client.negotiate()
    await client.open_session(envelope)
    opening, writer.writes = writer.writes, []
    result = await client.send_transaction(envelope, message)
    if result.eom is None or not result.eom.modifications:
        raise RuntimeError(f"the bridge did not answer end-of-message as expected: {result}")
    transaction, writer.writes = writer.writes, []
    await client.quit()
    closing = writer.writes

    async def replay(count: int) -> None:
        done = 0
        while done < count:
            conn = MilterConnection(state, dispatcher, settings)
            conn.connection_made(_Transport(lambda data: None))
            for chunk in opening:
                conn.data_received(chunk)
            for _ in range(per_connection):
                for chunk in transaction:
                    conn.data_received(chunk)
                    while conn.busy is not None:  # end-of-message runs as a task
                        await conn.busy
                done += 1
            for chunk in closing:
                conn.data_received(chunk)
            conn.connection_lost(None)

    await replay(min(messages, 300))  # warm up
    gc.collect()
    started = time.process_time()
    await replay(messages)
    return (time.process_time() - started) / messages * 1e6, webhooks.eom_body


async def webhook_calls(url: str, body: bytes, calls: int) -> float:
    """CPU µs per ``WebhookClient.post`` of ``body``."""
    endpoint = prepare_endpoint(EndpointSettings(name="bench", url=url, timeout=20.0))
    async with WebhookClient() as client:
        for n in range(min(calls, 300)):
            await client.post(endpoint, body, webhook_id=f"evt_warm{n}")
        started = time.process_time()
        for n in range(calls):
            await client.post(endpoint, body, webhook_id=f"evt_{n}")
        return (time.process_time() - started) / calls * 1e6


async def aiohttp_calls(url: str, body: bytes, calls: int) -> float:
    """CPU µs per bare ``aiohttp.ClientSession.post`` of ``body`` (response read)."""
    headers = {"Content-Type": "application/json"}
    target = URL(url)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False) as session:

        async def once() -> None:
            async with session.post(target, data=body, headers=headers) as response:
                await response.read()

        for _ in range(min(calls, 300)):
            await once()
        started = time.process_time()
        for _ in range(calls):
            await once()
        return (time.process_time() - started) / calls * 1e6


#: Messages of the two callgrind runs: their difference cancels start-up and imports.
CALLGRIND_RUNS = (100, 600)


def replayed(messages: int) -> int:
    """Messages ``milter_side(profile, messages)`` replays, its warm-up included."""
    return min(messages, 300) + messages


def parse_callgrind_total(text: str) -> int:
    """The instruction count valgrind's callgrind prints at exit (``Collected : 1,234``)."""
    match = re.search(r"Collected\s*:\s*([\d,]+)", text)
    if match is None:
        raise RuntimeError(f"valgrind printed no instruction count:\n{text[-2000:]}")
    return int(match.group(1).replace(",", ""))


def milter_side_instructions(profile: Profile) -> float:
    """Instructions per message of the milter side, counted by callgrind (needs ``valgrind``).

    Unlike CPU time, the count does not depend on what else the machine does, so two versions
    of the code can be compared on a shared machine: a difference of 1% is real.
    """
    totals = []
    for messages in CALLGRIND_RUNS:
        argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m"]
        argv += ["bench.costs", "--milter-only", "--no-pin", "--profile", profile.key, "--messages", str(messages)]
        argv += ["--messages-per-connection", str(max(profile.messages_per_connection, 1))]
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO_ROOT, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} ... failed:\n{proc.stderr[-2000:]}")
        totals.append(parse_callgrind_total(proc.stderr))
    few, many = CALLGRIND_RUNS
    return (totals[1] - totals[0]) / (replayed(many) - replayed(few))


#: Concurrency of the load generator for ``bridge_instructions`` (the bridge runs slowly under
#: valgrind, so more connections would only queue).
BRIDGE_CALLGRIND_CONCURRENCY = 4


def _bridge_run_instructions(profile: Profile, messages: int, layout: procs.CoreLayout, tmp: Path) -> int:
    """Instructions of one ``milterbridge serve`` under callgrind while it answers ``messages``."""
    with run.bridge_with_endpoint(
        profile,
        tmp,
        layout,
        tag=f"bridge-{messages}",
        workers=1,
        wrapper=("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"),
        start_timeout=300.0,
        stop_timeout=60.0,  # valgrind writes its summary after the bridge's drain
    ) as running:
        result = eventloop.run(
            run_load(
                running.address,
                profile,
                concurrency=BRIDGE_CALLGRIND_CONCURRENCY,
                max_messages=messages,
                duration_seconds=1800.0,
                message_timeout=300.0,
            )
        )
        if result.errors or result.messages != messages:
            raise RuntimeError(
                f"the bridge under valgrind answered {result.messages} of {messages} messages, "
                f"{result.errors} errors: {result.error_samples[:3]}"
            )
    return parse_callgrind_total(running.bridge.log_path.read_text(errors="replace"))


def bridge_instructions(profile: Profile) -> float:
    """User-space instructions per message of the whole ``milterbridge serve`` process (callgrind).

    Unlike ``milter_side_instructions``, this is the real bridge: sockets, uvloop, the HTTP
    client, driven by the load generator and calling ``bench.endpoint``. The kernel's work is
    not counted. How the load generator's writes are grouped into reads depends on timing, so
    the count repeats to about 0.5%, not 0.1%.
    """
    layout = procs.CoreLayout.choose(pin=True)
    totals = []
    with tempfile.TemporaryDirectory() as tmp:
        for messages in CALLGRIND_RUNS:
            totals.append(_bridge_run_instructions(profile, messages, layout, Path(tmp)))
    few, many = CALLGRIND_RUNS
    return (totals[1] - totals[0]) / (many - few)


def _environment() -> str:
    return f"event loop: {eventloop.loop_name()}; core: {milterbridge.CORE.build}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.costs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="a", choices=sorted(k for k, p in PROFILES.items() if p.kind == "sweep"))
    parser.add_argument("--messages", type=int, default=5000, help="messages (and calls) per part (default 5000)")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument(
        "--messages-per-connection",
        type=int,
        default=None,
        help="messages on each milter connection (default: the profile's, 5); 1 is what Postfix mostly does",
    )
    parser.add_argument("--milter-only", action="store_true", help="measure the milter side only")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count the milter side's instructions per message with valgrind (about a minute)",
    )
    parser.add_argument(
        "--bridge-instructions",
        action="store_true",
        help="count the instructions per message of the whole bridge process with valgrind (about 80 s)",
    )
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.messages_per_connection is not None:
        if args.messages_per_connection < 1:
            parser.error("--messages-per-connection must be at least 1")
        profile = profile.scaled(messages_per_connection=args.messages_per_connection)
    per_connection = f"; {profile.messages_per_connection} per connection"
    if args.bridge_instructions:
        count = bridge_instructions(profile)
        print(f"profile ({profile.key}) {profile.title}{per_connection}; core: {milterbridge.CORE.build}")
        print(f"  milterbridge serve under the load generator: {count:,.0f} instructions per message (callgrind)")
        return 0
    if args.instructions:
        count = milter_side_instructions(profile)
        print(f"profile ({profile.key}) {profile.title}{per_connection}; core: {milterbridge.CORE.build}")
        print(f"  milter side, no sockets, instant webhooks: {count:,.0f} instructions per message (callgrind)")
        return 0
    layout = procs.CoreLayout.choose(pin=not args.no_pin)
    if layout.loadgen:
        os.sched_setaffinity(0, layout.loadgen)
    milter_us, eom_body = eventloop.run(milter_side(profile, args.messages))
    if args.milter_only:
        print(f"profile ({profile.key}) {profile.title}{per_connection}; {_environment()}")
        print(f"  milter side, no sockets, instant webhooks: {milter_us:7.1f} µs CPU per message")
        return 0
    port = procs.free_port(HOST)
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = procs.Child(
            "endpoint",
            [sys.executable, "-m", "bench.endpoint", "--host", HOST, "--port", str(port)],
            log_path=Path(tmp) / "endpoint.log",
            cores=layout.milter,  # the core the bridge would have: this process plays the bridge
            cwd=REPO_ROOT,
        )
        with procs.running([endpoint]):
            procs.wait_for_port(endpoint, HOST, port)
            url = f"http://{HOST}:{port}{HOOK_PATH}"
            webhook_us = eventloop.run(webhook_calls(url, eom_body, args.messages))
            aiohttp_us = eventloop.run(aiohttp_calls(url, eom_body, args.messages))
    print(f"profile ({profile.key}) {profile.title}{per_connection}; {_environment()}")
    print(f"  milter side, no sockets, instant webhooks: {milter_us:7.1f} µs CPU per message")
    print(f"  one WebhookClient.post of the eom request: {webhook_us:7.1f} µs CPU per call ({len(eom_body)} bytes)")
    print(f"  the same request with bare aiohttp:        {aiohttp_us:7.1f} µs CPU per call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
