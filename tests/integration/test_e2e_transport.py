"""Transport through a real Postfix: TCP and unix-socket listeners, concurrency, size and latency.

Postfix's smtpd (and cleanup, for non_smtpd_milters) runs as user ``postfix`` and connects to
the milter socket with that identity, so a unix socket must be reachable by it: the tests
show that a root-only socket is refused and that a setgid directory owned by group
``postfix`` works with the default ``socket_mode`` of 0o660 (what ``docs/postfix.md``
recommends).
"""

from __future__ import annotations

import asyncio
import base64
import grp
import hashlib
import json
import os
import shutil
import sys
import tempfile
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from bench import procs
from bench import run as bench_run
from bench.profiles import BENCH_HEADER_NAME, BENCH_HEADER_VALUE, PROFILES
from milterbridge.milter.negotiation import CONTEXT_EVENTS
from tests.fakes.webhooks import FakeResponse, FakeWebhooks, RecordedRequest

from .bridge import BridgeRunner, blocking, body_of, parse, smtp
from .postfix import PostfixInstance, SmtpResult, SmtpTransaction, make_message, median_seconds

pytestmark = pytest.mark.postfix
REPO_ROOT = Path(__file__).resolve().parents[2]

SENDER = "alice@example.org"
RCPT = "bob@example.net"


@pytest.fixture
def socket_dir() -> Iterator[str]:
    """A fresh directory for a unix socket, world-searchable like every parent Postfix must cross."""
    path = tempfile.mkdtemp(prefix="milterbridge-sock-")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.asyncio
async def test_unix_socket_in_a_setgid_postfix_directory(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner, socket_dir: str
) -> None:
    """A socket created in a setgid directory of group mta, mode 0660, is usable by Postfix."""
    postfix_gid = grp.getgrnam("postfix").gr_gid
    os.chown(socket_dir, -1, postfix_gid)
    os.chmod(socket_dir, 0o2750)  # setgid: files created inside inherit the postfix group
    path = os.path.join(socket_dir, "milter.sock")
    webhooks.set_default(FakeResponse.decision("continue", modifications=[_tag("via-unix")]), event="eom")
    bridge = await bridges.start(webhooks.endpoint("policy"), listen=[f"unix:{path}"])

    result = await smtp(mta, SENDER, [RCPT], make_message())

    assert bridge.address == f"unix:{path}"
    assert os.stat(path).st_gid == postfix_gid
    assert os.stat(path).st_mode & 0o777 == 0o660
    assert result.accepted
    [(_, raw)] = await blocking(mta.wait_for_delivery, 1)
    assert parse(raw)["X-Transport"] == "via-unix"


@pytest.mark.asyncio
async def test_unix_socket_only_root_can_open_is_refused(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner, socket_dir: str
) -> None:
    """A root:root 0660 socket is out of reach for smtpd (user mta): default_action applies."""
    path = os.path.join(socket_dir, "milter.sock")
    await bridges.start(webhooks.endpoint("policy"), listen=[f"unix:{path}"], default_action="tempfail")
    mark = mta.log_mark()

    result = await smtp(mta, SENDER, [RCPT], make_message())

    assert result.transaction.mail is not None
    assert result.transaction.mail.code == 451
    await blocking(mta.wait_for_log, rf"connect to Milter service unix:{path}: Permission denied", since=mark)
    assert webhooks.requests == []


@pytest.mark.asyncio
async def test_tcp_listener(mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner) -> None:
    """The inet listener on loopback carries a whole session to the endpoint and back."""
    webhooks.set_default(FakeResponse.decision("continue", modifications=[_tag("via-tcp")]), event="eom")
    bridge = await bridges.start(webhooks.endpoint("policy"), listen=["inet:127.0.0.1:0"])

    result = await smtp(mta, SENDER, [RCPT], make_message())

    assert bridge.address.startswith("inet:127.0.0.1:")
    assert mta.get("smtpd_milters") == bridge.address
    assert result.accepted
    [(_, raw)] = await blocking(mta.wait_for_delivery, 1)
    assert parse(raw)["X-Transport"] == "via-tcp"


def _tag(value: str) -> dict[str, Any]:
    return {"op": "add_header", "name": "X-Transport", "value": value}


def _echo(request: RecordedRequest) -> FakeResponse:
    """Echo what this payload says about its own message, so cross-talk shows up in the delivered mail."""
    message = request.json["message"]
    tag = next(h["value"].strip() for h in message["headers"] if h["name"] == "X-Test-Tag")
    body = base64.b64decode(message["body"]["base64"])
    summary = " ".join(
        [
            tag,
            message["mail_from"]["address"],
            ",".join(r["address"] for r in message["rcpt_to"]),
            message["queue_id"],
            hashlib.sha256(body).hexdigest(),
        ]
    )
    return FakeResponse.decision("continue", modifications=[{"op": "add_header", "name": "X-Echo", "value": summary}])


THREADS = 8
MESSAGES_PER_THREAD = 3


@pytest.mark.asyncio
async def test_concurrent_sessions_do_not_cross_talk(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    """8 SMTP sessions at once, 3 messages each: every endpoint call and modification stays with its own message."""

    async def echo_after_a_moment(request: RecordedRequest) -> FakeResponse:
        # A little jitter so the sessions' eom calls overlap and finish out of order.
        await asyncio.sleep(0.005 * (request.index % 5))
        return _echo(request)

    webhooks.set_default(echo_after_a_moment, event="eom")
    await bridges.start(webhooks.endpoint("echo", include_body=True))

    def one_session(thread: int) -> list[SmtpTransaction]:
        with mta.smtp_session() as session:
            return [
                session.send(
                    f"t{thread}m{n}@example.org",
                    [f"r{thread}m{n}@example.net"],
                    make_message(headers=[("X-Test-Tag", f"tag-{thread}-{n}")], body=f"body of {thread}/{n}\n" * 20),
                )
                for n in range(MESSAGES_PER_THREAD)
            ]

    loop = asyncio.get_running_loop()
    # A dedicated pool: the default one may have fewer workers than sessions on a small machine.
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        per_thread = await asyncio.gather(*(loop.run_in_executor(pool, one_session, t) for t in range(THREADS)))

    total = THREADS * MESSAGES_PER_THREAD
    queue_ids = {}
    for thread, transactions in enumerate(per_thread):
        for n, transaction in enumerate(transactions):
            assert transaction.accepted, transaction
            queue_ids[f"tag-{thread}-{n}"] = transaction.queue_id
    delivered = await blocking(mta.wait_for_delivery, total, 10.0)
    assert len(delivered) == total
    assert len(webhooks.requests_for(event="eom")) == total
    for _, raw in delivered:
        message = parse(raw)
        tag = message["X-Test-Tag"]
        _, thread, n = tag.split("-")
        body = body_of(raw).replace(b"\n", b"\r\n")
        assert message["X-Echo"].split(" ") == [
            tag,
            f"t{thread}m{n}@example.org",
            f"r{thread}m{n}@example.net",
            queue_ids[tag],
            hashlib.sha256(body).hexdigest(),
        ]
        assert message["Delivered-To"] == f"r{thread}m{n}@example.net"


@pytest.mark.asyncio
async def test_multi_mebibyte_message_through_include_body(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    """A 5 MiB body reaches the endpoint whole (spooled by the bridge) and is delivered intact."""
    line = b"%07d 0123456789abcdefghijklmnopqrstuvwxyz \xe9\xe8\xff ABCDEFGHIJKLMNOPQRSTUVWXYZ\r\n"
    lines = [line % n for n in range(5 * 1024 * 1024 // len(line % 0) + 1)]
    body = b"".join(lines)
    assert len(body) >= 5 * 1024 * 1024
    head = make_message(subject="big").split(b"\r\n\r\n", 1)[0]
    raw_message = head + b"\r\n\r\n" + body

    def digest(request: RecordedRequest) -> FakeResponse:
        got = base64.b64decode(request.json["message"]["body"]["base64"])
        modification = {"op": "add_header", "name": "X-Body", "value": f"{len(got)} {hashlib.sha256(got).hexdigest()}"}
        return FakeResponse.decision("continue", modifications=[modification])

    webhooks.set_default(digest, event="eom")
    bridge = await bridges.start(webhooks.endpoint("archive", include_body=True, timeout=10.0))

    def send() -> SmtpTransaction:
        with mta.smtp_session() as session:
            return session.send(SENDER, [RCPT], raw_message, mail_options=["BODY=8BITMIME"], fix_newlines=False)

    transaction = await blocking(send)

    assert transaction.accepted, transaction
    [(_, raw)] = await blocking(mta.wait_for_delivery, 1, 10.0)
    assert parse(raw)["X-Body"] == f"{len(body)} {hashlib.sha256(body).hexdigest()}"
    assert body_of(raw) == body.replace(b"\r\n", b"\n")
    [request] = webhooks.requests_for(event="eom")
    assert request.json["message"]["body"]["size"] == len(body)
    assert bridge.config.server.body_memory_bytes < len(body)  # so the spool path was taken


LATENCY_MESSAGES = 30
LATENCY_WARMUP = 5
#: Far less than a delayed ACK (40 ms at least), far more than this machine's noise.
STALL_SECONDS = 0.03
#: Clients from this address get no milter (smtpd_milter_maps): the latency test's baseline.
BARE_CLIENT = "127.0.0.2"
#: Clients from this address get the minimal milter instead of the bridge.
MINIMAL_CLIENT = "127.0.0.3"
#: What the bridge asks Postfix for in profile (a) besides end-of-message, all without reply
#: (milter.negotiation.CONTEXT_EVENTS): the minimal milter asks for the same, so Postfix sends both the same.
MINIMAL_ARGS = ("--events", "eom", "--no-reply", ",".join(sorted(event.value for event in CONTEXT_EVENTS)))


@pytest.mark.asyncio
async def test_latency_with_and_without_the_bridge(
    mta: PostfixInstance, postfix_report: Callable[[str], None], tmp_path: Path
) -> None:
    """Median SMTP transaction time through Postfix with milterbridge as deployed vs without a milter.

    The bridge is ``milterbridge serve`` in its own process and the trivial endpoint
    (``bench.endpoint``: continue, and one header at eom) in another, as in production (in
    this process they would share the GIL with the SMTP client's thread). Messages with and
    without the milter alternate, so a drift in the machine's speed hits both alike: Postfix's
    ``smtpd_milter_maps`` disables the milter for clients connecting from 127.0.0.2. A third
    kind of message, from 127.0.0.3, goes to our minimal milter (``bench.reference_milter``)
    asking for the same events as the bridge, without HTTP: the share of the difference that
    any milter receiving those events costs Postfix.
    """
    minimal_port = procs.free_port()
    minimal = procs.Child(
        "minimal",
        [sys.executable, "-m", "bench.reference_milter", "--listen", f"inet:127.0.0.1:{minimal_port}", *MINIMAL_ARGS],
        log_path=tmp_path / "minimal.log",
        cwd=REPO_ROOT,
    )
    maps = mta.config_dir / "milter_maps.cidr"
    maps.write_text(f"{BARE_CLIENT}/32 DISABLE\n{MINIMAL_CLIENT}/32 inet:127.0.0.1:{minimal_port}\n")
    maps.chmod(0o644)
    kinds = (("bare", BARE_CLIENT), ("minimal", MINIMAL_CLIENT), ("bridged", "127.0.0.1"))
    cpu: dict[str, float] = {}

    def run(milters: dict[str, procs.Child]) -> dict[str, list[SmtpResult]]:
        out: dict[str, list[SmtpResult]] = {label: [] for label, _ in kinds}
        for n in range(LATENCY_WARMUP + LATENCY_MESSAGES):
            if n == LATENCY_WARMUP:
                cpu.update({label: -procs.run_seconds(child.pid) for label, child in milters.items()})
            for label, source in kinds:
                result = mta.send(SENDER, [RCPT], make_message(subject=f"{label} {n}"), source_address=source)
                assert result.accepted, result
                if n >= LATENCY_WARMUP:  # the first ones pay for connections and caches
                    out[label].append(result)
        for label, child in milters.items():
            cpu[label] += procs.run_seconds(child.pid)
        return out

    unpinned = procs.CoreLayout.choose(pin=False)
    with (
        bench_run.bridge_with_endpoint(PROFILES["a"], tmp_path, unpinned, tag="bridge", workers=1) as bridged,
        procs.running([minimal]),
    ):
        procs.wait_for_port(minimal, "127.0.0.1", minimal_port)
        await blocking(mta.configure, {"smtpd_milter_maps": f"cidr:{maps}"}, reload=False)
        await blocking(mta.set_milter, bridged.address)  # reloads
        results = await blocking(run, {"minimal": minimal, "bridged": bridged.bridge})
        delivered = await blocking(mta.wait_for_delivery, len(kinds) * (LATENCY_WARMUP + LATENCY_MESSAGES), 10.0)
        stats = await blocking(_get_json, f"http://127.0.0.1:{bridged.endpoint_port}/stats")

    assert stats.get("eom") == LATENCY_WARMUP + LATENCY_MESSAGES  # only the bridged third reached the endpoint
    header = f"\n{BENCH_HEADER_NAME}: {BENCH_HEADER_VALUE}".encode()
    # Both milters add the header; no message without a milter has it. Subjects are "<kind> <n>".
    tagged: Counter[str] = Counter()
    for _, raw in delivered:
        text = raw.replace(b"\r\n", b"\n")
        if header in text:
            tagged[text.split(b"\nSubject: ", 1)[1].split(b" ", 1)[0].decode()] += 1
    assert tagged == {"minimal": LATENCY_WARMUP + LATENCY_MESSAGES, "bridged": LATENCY_WARMUP + LATENCY_MESSAGES}
    transaction = {k: median_seconds(r.transaction.duration for r in v) for k, v in results.items()}
    session = {k: median_seconds(r.duration for r in v) for k, v in results.items()}
    assert transaction["bridged"] < 1.0
    # A delayed-ACK stall (Postfix's Nagle waiting for our ACK, postfix-e2e.md pitfall 7)
    # costs at least 40 ms, Linux's shortest delayed ACK, on every transaction it hits.
    for label in ("minimal", "bridged"):
        stalled = [r for r in results[label] if r.transaction.duration > transaction["bare"] + STALL_SECONDS]
        assert len(stalled) <= LATENCY_MESSAGES // 10, (
            label,
            [round(r.transaction.duration * 1000, 1) for r in stalled],
        )
    # A diagnostic, not a target: /proc/<pid>/task/<tid>/sched needs a kernel with
    # CONFIG_SCHED_DEBUG, and without it the figures are 0.
    per_message = {k: f"{v / LATENCY_MESSAGES * 1e6:.0f} µs" if v > 0 else "n/a" for k, v in cpu.items()}
    postfix_report(
        f"CPU per message through Postfix (scheduler run time, {LATENCY_MESSAGES} messages, a session each): "
        f"milterbridge {per_message['bridged']}, minimal milter {per_message['minimal']}"
    )
    for what, medians in (("MAIL to end of data", transaction), ("whole SMTP session", session)):
        bare, minimal_ms, bridged = (medians[k] * 1000 for k in ("bare", "minimal", "bridged"))
        postfix_report(
            f"latency, median of {LATENCY_MESSAGES} ({what}): no milter {bare:.1f} ms, "
            f"milterbridge + trivial eom endpoint {bridged:.1f} ms, difference {bridged - bare:+.1f} ms "
            f"(minimal milter asking the same events, no HTTP: {minimal_ms - bare:+.1f} ms)"
        )


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())
