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
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.fakes.webhooks import FakeResponse, FakeWebhooks, RecordedRequest

from .bridge import BridgeRunner, blocking, body_of, configure_milter, parse, smtp
from .postfix import PostfixInstance, SmtpTransaction, make_message, median_seconds

pytestmark = pytest.mark.postfix

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


@pytest.mark.asyncio
async def test_latency_with_and_without_the_bridge(
    mta: PostfixInstance,
    webhooks: FakeWebhooks,
    bridges: BridgeRunner,
    postfix_report: Callable[[str], None],
) -> None:
    """Median SMTP transaction time through Postfix with milterbridge (eom only, continue) vs without a milter."""

    def run(label: str) -> tuple[float, float]:
        results = [mta.send(SENDER, [RCPT], make_message(subject=f"{label} {n}")) for n in range(LATENCY_MESSAGES)]
        assert all(result.accepted for result in results)
        return (
            median_seconds(r.transaction.duration for r in results),
            median_seconds(r.duration for r in results),
        )

    await blocking(configure_milter, mta, None)
    assert mta.get("smtpd_milters") == ""
    bare_transaction, bare_session = await blocking(run, "bare")
    webhooks.set_default(FakeResponse.no_content(), event="eom")
    await bridges.start(webhooks.endpoint("trivial"))
    bridged_transaction, bridged_session = await blocking(run, "bridged")

    assert len(webhooks.requests_for(event="eom")) == LATENCY_MESSAGES
    await blocking(mta.wait_for_delivery, 2 * LATENCY_MESSAGES, 10.0)
    assert bridged_transaction < 1.0
    postfix_report(
        f"latency, median of {LATENCY_MESSAGES} (MAIL to end of data): "
        f"no milter {bare_transaction * 1000:.1f} ms, milterbridge + trivial eom endpoint "
        f"{bridged_transaction * 1000:.1f} ms, difference {(bridged_transaction - bare_transaction) * 1000:+.1f} ms"
    )
    postfix_report(
        f"latency, median of {LATENCY_MESSAGES} (whole SMTP session): no milter {bare_session * 1000:.1f} ms, "
        f"milterbridge {bridged_session * 1000:.1f} ms, difference {(bridged_session - bare_session) * 1000:+.1f} ms"
    )
