"""Per-message limits through the real dispatcher: the bridge answers, it never hangs up.

Hanging up on the MTA would hand the message to Postfix's ``milter_default_action``, which
many sites set to ``accept`` (design.md §3.7). So a message over ``max_headers``,
``max_header_bytes``, ``max_recipients``, ``max_macros`` or ``max_message_bytes`` is answered
with ``server.on_oversize`` at the next command the MTA waits for, the endpoint is not called
for it, and the connection carries the next message as usual.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from milterbridge.client import Envelope
from milterbridge.config import ServerSettings
from milterbridge.metrics import Metrics
from milterbridge.milter import messages as m
from milterbridge.milter.constants import Event
from milterbridge.policy.model import OnOversize
from tests.fakes.webhooks import FakeResponse, FakeWebhooks
from tests.hostile import MESSAGE, Bridge, endpoint

LIMITS: dict[str, Any] = {"max_recipients": 3, "max_headers": 3, "max_header_bytes": 200, "max_macros": 12}
GOOD = Envelope()
HEADERS_MESSAGE = b"".join(b"X-H%d: v\r\n" % n for n in range(4)) + b"\r\nbody\r\n"
BIG_HEADER_MESSAGE = b"Subject: " + b"v" * 300 + b"\r\n\r\nbody\r\n"
MANY_MACROS = tuple((b"{m%d}" % n, b"v") for n in range(13))

FLOODS = [
    pytest.param(
        replace(GOOD, recipients=tuple(b"<r%d@x>" % n for n in range(4))), MESSAGE, "max_recipients", id="rcpt"
    ),
    pytest.param(GOOD, HEADERS_MESSAGE, "max_headers", id="header-count"),
    pytest.param(GOOD, BIG_HEADER_MESSAGE, "max_header_bytes", id="header-bytes"),
    pytest.param(replace(GOOD, connect_macros=MANY_MACROS), MESSAGE, "max_macros", id="connect-macros"),
]


def server_settings(**overrides: Any) -> ServerSettings:
    return ServerSettings(listen=("inet:127.0.0.1:0",), **{**LIMITS, **overrides})


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("on_oversize", "code"),
    [
        pytest.param(OnOversize.TEMPFAIL, b"451 4.3.4", id="tempfail"),
        pytest.param(OnOversize.REJECT, b"552 5.3.4", id="reject"),
    ],
)
@pytest.mark.parametrize(("envelope", "message", "limit"), FLOODS)
async def test_a_flood_is_answered_and_the_connection_goes_on(
    envelope: Envelope, message: bytes, limit: str, on_oversize: OnOversize, code: bytes
) -> None:
    """The flooded message gets on_oversize at end-of-message (naming the limit), the endpoint
    is never asked about it, and the same connection's next message gets the endpoint's answer."""
    async with FakeWebhooks() as fake:
        fake.set_default(FakeResponse.decision("reject"), event="eom")
        ep = endpoint(fake, "policy")
        async with Bridge(fake, ep, server=server_settings(on_oversize=on_oversize)) as bridge:
            client = await bridge.client()
            opening = await bridge.session(client, envelope)
            assert opening.stopped_by is None
            flooded = await client.send_transaction(envelope, message)
            assert flooded.eom is not None, flooded
            reply = flooded.eom.reply
            assert isinstance(reply, m.ReplyCode)
            assert reply.text.startswith(code)
            assert limit.encode() in reply.text
            assert flooded.eom.modifications == ()
            assert fake.requests_for(event="eom") == []
            if limit == "max_macros":
                return  # connection-scoped: every message of this connection is over the limit
            after = await client.send_transaction(GOOD, MESSAGE)
            assert after.eom is not None
            assert isinstance(after.eom.reply, m.Reject)
            assert len(fake.requests_for(event="eom")) == 1
            await client.quit()


@pytest.mark.asyncio
@pytest.mark.parametrize(("envelope", "message", "limit"), FLOODS)
async def test_continue_calls_the_endpoint_with_what_was_kept(envelope: Envelope, message: bytes, limit: str) -> None:
    """With on_oversize = continue the endpoint decides, and the payload says what was cut."""
    async with FakeWebhooks() as fake:
        fake.set_default(FakeResponse.decision("reject"), event="eom")
        ep = endpoint(fake, "policy")
        async with Bridge(fake, ep, server=server_settings(on_oversize=OnOversize.CONTINUE)) as bridge:
            client = await bridge.client()
            await bridge.session(client, envelope)
            result = await client.send_transaction(envelope, message)
            await client.quit()
    assert result.eom is not None
    assert isinstance(result.eom.reply, m.Reject)
    (request,) = fake.requests_for(event="eom")
    msg = request.json["message"]
    part = {"max_recipients": "recipients", "max_macros": "macros"}.get(limit, "headers")
    assert msg["truncated"] == [part]
    assert len(msg["rcpt_to"]) <= LIMITS["max_recipients"]
    assert len(msg["headers"]) <= LIMITS["max_headers"]


@pytest.mark.asyncio
async def test_a_recipient_over_the_limit_is_refused_at_rcpt_when_rcpt_waits() -> None:
    """When the MTA waits at RCPT, only the recipients over max_recipients are refused there;
    the message with the recipients kept goes on to the endpoint, untruncated."""
    async with FakeWebhooks() as fake:
        fake.set_default(FakeResponse.decision("continue"), event="rcpt")
        fake.set_default(FakeResponse.decision("accept"), event="eom")
        ep = endpoint(fake, "policy", events=frozenset({Event.RCPT, Event.EOM}))
        metrics = Metrics()
        async with Bridge(fake, ep, server=server_settings(), metrics=metrics) as bridge:
            client = await bridge.client()
            envelope = replace(GOOD, recipients=tuple(b"<r%d@x>" % n for n in range(5)))
            await bridge.session(client, envelope)
            result = await client.send_transaction(envelope, MESSAGE)
            await client.quit()
    assert [type(r) for r in result.rcpt[:3]] == [m.Continue] * 3
    for refused in result.rcpt[3:]:
        assert isinstance(refused, m.ReplyCode)
        assert refused.text.startswith(b"452 4.5.3")
    assert result.eom is not None
    assert isinstance(result.eom.reply, m.Accept)
    (request,) = fake.requests_for(event="eom")
    assert [r["address"] for r in request.json["message"]["rcpt_to"]] == ["r0@x", "r1@x", "r2@x"]
    assert "truncated" not in request.json["message"]
    assert len(fake.requests_for(event="rcpt")) == 3
    limit = {"limit": "max_recipients"}
    assert metrics.registry.get_sample_value("milterbridge_oversize_messages_total", limit) == 1


@pytest.mark.asyncio
async def test_a_header_flood_is_refused_at_the_header_when_headers_wait() -> None:
    """When an enforcing endpoint subscribes to header, the first header over the limit is refused."""
    async with FakeWebhooks() as fake:
        fake.set_default(FakeResponse.decision("continue"))
        ep = endpoint(fake, "policy", events=frozenset({Event.HEADER, Event.EOM}))
        async with Bridge(fake, ep, server=server_settings()) as bridge:
            client = await bridge.client()
            await bridge.session(client, GOOD)
            result = await client.send_transaction(GOOD, HEADERS_MESSAGE)
            await client.quit()
    assert result.stopped_at == "header"
    assert isinstance(result.stopped_by, m.ReplyCode)
    assert b"max_headers" in result.stopped_by.text
    assert len(fake.requests_for(event="header")) == 3
    assert fake.requests_for(event="eom") == []


@pytest.mark.asyncio
@pytest.mark.parametrize("on_oversize", [OnOversize.CONTINUE, OnOversize.REJECT])
async def test_all_connections_share_max_buffered_bytes(on_oversize: OnOversize) -> None:
    """While one connection holds nearly all of max_buffered_bytes in headers, another's new
    message is tempfailed (451 4.3.2, whatever on_oversize says) without an endpoint call; once
    the first message ends, its bytes are given back and both connections are served again."""
    fake_settings = server_settings(
        max_buffered_bytes=1024 * 1024, max_headers=10_000, max_header_bytes=16 * 1024 * 1024, on_oversize=on_oversize
    )
    async with FakeWebhooks() as fake:
        fake.set_default(FakeResponse.decision("reject"), event="eom")
        async with Bridge(fake, endpoint(fake, "policy"), server=fake_settings) as bridge:
            hog = await bridge.client()
            await bridge.session(hog, GOOD)
            await hog.mail_from(GOOD.mail_from)
            await hog.rcpt_to(GOOD.recipients[0])
            await hog.data()
            for n in range(780):  # 780 headers costing about 1,264 bytes each: less than 1/16 left free
                await hog.header(b"X-Hog-%d" % n, b" " + b"v" * 1000)
            budget = bridge.settings.budget
            assert budget is not None
            # The headers need no reply: wait until the bridge has read them.
            await _wait_until(lambda: budget.low)

            other = await bridge.client()
            await bridge.session(other, GOOD)
            refused = await other.send_transaction(GOOD, MESSAGE)
            assert refused.eom is not None
            assert isinstance(refused.eom.reply, m.ReplyCode)
            assert refused.eom.reply.text.startswith(b"451 4.3.2")
            assert b"max_buffered_bytes" in refused.eom.reply.text
            assert fake.requests_for(event="eom") == []

            await hog.end_of_headers()
            finished = await hog.end_of_message()
            assert isinstance(finished.reply, m.Reject)
            await hog.abort()
            assert budget.used == 0
            after = await other.send_transaction(GOOD, MESSAGE)
            assert after.eom is not None
            assert isinstance(after.eom.reply, m.Reject)
            assert len(fake.requests_for(event="eom")) == 2
            await hog.quit()
            await other.quit()


async def _wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` (state of the bridge in this process) until it holds."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - a plain attribute, no event to wait on
            await asyncio.sleep(0.01)
