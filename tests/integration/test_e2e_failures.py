"""Broken endpoints and a missing milterbridge, as the SMTP client sees them through Postfix.

An endpoint failure (down, too slow, 5xx, an answer that is not a valid decision) merges as
its ``on_error`` action (design.md §3.5). When milterbridge itself is gone, Postfix applies
``milter_default_action`` (``milter-protocol.md`` §8.6); Postfix 3.7 knows tempfail, accept,
reject and quarantine (``shutdown`` arrived in 3.11 and is only documented).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from milterbridge.config import EndpointSettings
from milterbridge.milter.constants import Event
from milterbridge.policy.model import OnError
from tests.fakes.webhooks import FakeResponse, FakeWebhooks

from .bridge import BridgeRunner, blocking, parse, smtp
from .postfix import PostfixInstance, SmtpReply, SmtpResult, make_message

pytestmark = pytest.mark.postfix

SENDER = "alice@example.org"
RCPT = "bob@example.net"
#: Short enough to keep the suite fast, far below Postfix's milter timeouts in the harness.
ENDPOINT_TIMEOUT = 0.4

#: What the client sees at end-of-data for each on_error, when the endpoint fails there.
#: The bridge answers a bare tempfail/reject, so Postfix uses its default texts (§5.8).
EOM_OUTCOME: dict[OnError, tuple[int, str]] = {
    OnError.TEMPFAIL: (451, "4.7.1 Service unavailable - try again later"),
    OnError.REJECT: (550, "5.7.1 Command rejected"),
    OnError.CONTINUE: (250, ""),
    OnError.ACCEPT: (250, ""),
}


def _failure(kind: str, webhooks: FakeWebhooks, closed_port: int) -> str:
    """Script ``kind`` of failure on ``webhooks`` and return the endpoint URL to use."""
    match kind:
        case "down":
            return f"http://127.0.0.1:{closed_port}/hook"
        case "slow":
            webhooks.set_default(FakeResponse.decision("continue").after(ENDPOINT_TIMEOUT * 3))
        case "status-500":
            webhooks.set_default(FakeResponse.status_code(500, b"internal error"))
        case "not-json":
            webhooks.set_default(FakeResponse.raw(b"<html>oops</html>"))
        case "invalid-decision":
            webhooks.set_default(FakeResponse.decision("explode"))
        case _:
            raise AssertionError(kind)
    return webhooks.url("/hook")


def _assert_outcome(reply: SmtpReply | None, on_error: OnError) -> None:
    code, text = EOM_OUTCOME[on_error]
    assert reply is not None
    assert reply.code == code, reply
    if text:
        assert reply.text == text


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["down", "slow", "status-500", "not-json", "invalid-decision"])
async def test_endpoint_failure_at_eom_applies_on_error(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner, closed_milter_port: int, kind: str
) -> None:
    """Each kind of endpoint failure gives each on_error outcome at end-of-data (one bridge per on_error)."""
    url = _failure(kind, webhooks, closed_milter_port)
    delivered = 0
    # Every bridge takes the run's fixed milter address, so each on_error gets a fresh bridge
    # while Postfix stays configured as it is.
    for on_error in OnError:
        endpoint = EndpointSettings(name="flaky", url=url, on_error=on_error, timeout=ENDPOINT_TIMEOUT)
        bridge = await bridges.start(endpoint)
        started = time.monotonic()

        result = await smtp(mta, SENDER, [RCPT], make_message(subject=f"{kind} {on_error}"))

        elapsed = time.monotonic() - started
        await bridge.stop()
        _assert_outcome(result.transaction.end_of_data, on_error)
        # The endpoint's timeout bounds the wait, whatever the failure.
        assert elapsed < ENDPOINT_TIMEOUT + 2.0
        if result.accepted:
            delivered += 1
            messages = await blocking(mta.wait_for_delivery, delivered)
            assert parse(messages[-1][1])["Subject"] == f"{kind} {on_error}"
    assert await blocking(mta.wait_for_queue_idle) == []
    assert len(mta.maildir_messages()) == 2  # continue and accept


@pytest.mark.asyncio
@pytest.mark.parametrize(("on_error", "code"), [(OnError.TEMPFAIL, 451), (OnError.REJECT, 550)])
async def test_endpoint_failure_at_rcpt_refuses_each_recipient(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner, on_error: OnError, code: int
) -> None:
    """A failing rcpt endpoint refuses every recipient with its on_error; the transaction gets no DATA."""
    webhooks.set_default(FakeResponse.status_code(503), event="rcpt")
    endpoint = webhooks.endpoint("flaky", events=frozenset({Event.RCPT}), on_error=on_error, timeout=ENDPOINT_TIMEOUT)
    await bridges.start(endpoint)

    result = await smtp(mta, SENDER, ["bob@example.net", "carol@example.net"], make_message())

    assert [r.code for r in result.transaction.rcpts] == [code, code]
    assert result.transaction.data is None
    # 503 is retried once inside the budget: two calls per recipient.
    assert len(webhooks.requests_for(event="rcpt")) == 4
    assert mta.maildir_messages() == []


@pytest.mark.asyncio
async def test_progress_keepalives_outlast_postfix_content_timeout(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    """An eom webhook slower than milter_content_timeout still wins, because the bridge sends progress."""
    webhooks.set_default(
        FakeResponse.decision("reject", reply={"code": 550, "text": "slow but sure"}).after(2.2), event="eom"
    )
    endpoint = webhooks.endpoint("slow", timeout=5.0)
    await bridges.start(endpoint, server={"progress_interval": 0.3}, content_timeout="1s")

    result = await smtp(mta, SENDER, [RCPT], make_message())

    assert result.transaction.end_of_data is not None
    assert (result.transaction.end_of_data.code, result.transaction.end_of_data.text) == (550, "slow but sure")


@pytest.mark.asyncio
async def test_without_keepalives_postfix_gives_up_on_a_slow_eom(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    """The control case: with progress rarer than milter_content_timeout, Postfix times out and tempfails."""
    webhooks.set_default(FakeResponse.decision("continue").after(2.2), event="eom")
    endpoint = webhooks.endpoint("slow", timeout=5.0)
    await bridges.start(endpoint, server={"progress_interval": 10.0}, content_timeout="1s")
    mark = mta.log_mark()

    result = await smtp(mta, SENDER, [RCPT], make_message())

    assert result.transaction.end_of_data is not None
    assert result.transaction.end_of_data.code == 451
    await blocking(
        mta.wait_for_log,
        r"milter inet:127\.0\.0\.1:\d+: can't read SMFIC_BODYEOB reply packet header: Connection timed out",
        since=mark,
    )
    assert mta.maildir_messages() == []


def _down_outcome(action: str) -> Callable[[PostfixInstance, SmtpResult], None]:
    def tempfail(mta: PostfixInstance, result: SmtpResult) -> None:
        assert result.greeting.code == 220
        assert result.transaction.mail is not None
        assert (result.transaction.mail.code, result.transaction.mail.text) == (
            451,
            "4.7.1 Service unavailable - try again later",
        )
        assert mta.queue() == []

    def reject(mta: PostfixInstance, result: SmtpResult) -> None:
        assert result.greeting.code == 554
        assert result.greeting.text.endswith("not accepting connections")
        assert result.transaction.mail is not None
        assert (result.transaction.mail.code, result.transaction.mail.text) == (550, "5.5.0 Service unavailable")
        assert mta.queue() == []

    def accept(mta: PostfixInstance, result: SmtpResult) -> None:
        assert result.accepted
        delivered = mta.wait_for_delivery(2)
        assert parse(delivered[-1][1])["Subject"] == "after"

    def quarantine(mta: PostfixInstance, result: SmtpResult) -> None:
        assert result.accepted
        [held] = mta.wait_for_queue(1, "hold")
        assert held.queue_id == result.transaction.queue_id

    return {"tempfail": tempfail, "reject": reject, "accept": accept, "quarantine": quarantine}[action]


@pytest.mark.asyncio
@pytest.mark.parametrize("action", ["tempfail", "reject", "accept", "quarantine"])
async def test_bridge_down_gives_milter_default_action(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner, action: str
) -> None:
    """With the bridge stopped, new sessions get Postfix's milter_default_action."""
    bridge = await bridges.start(webhooks.endpoint("policy"), default_action=action)
    before = await smtp(mta, SENDER, [RCPT], make_message(subject="before"))
    assert before.accepted
    await blocking(mta.wait_for_delivery, 1)
    mark = mta.log_mark()
    address = bridge.address

    await bridge.stop()
    result = await smtp(mta, SENDER, [RCPT], make_message(subject="after"))

    await blocking(_down_outcome(action), mta, result)
    await blocking(mta.wait_for_log, rf"connect to Milter service {address}: Connection refused", since=mark)
    assert len(webhooks.requests_for(event="eom")) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("action", "code", "text"),
    [
        ("tempfail", 451, "4.7.1 Service unavailable - try again later"),
        ("reject", 550, "5.5.0 Service unavailable"),
        ("accept", 250, None),
        ("quarantine", 250, None),
    ],
)
async def test_bridge_stopping_mid_session_gives_milter_default_action(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner, action: str, code: int, text: str | None
) -> None:
    """The bridge stops between two messages of one SMTP session: the second gets the default action."""
    bridge = await bridges.start(webhooks.endpoint("policy"), default_action=action)
    session = mta.smtp_session()
    await blocking(session.open)
    first = await blocking(session.send, SENDER, [RCPT], make_message(subject="first"))

    await bridge.stop()
    second = await blocking(session.send, SENDER, [RCPT], make_message(subject="second"))
    await blocking(session.close)

    assert first.accepted
    assert second.end_of_data is not None
    # The bridge's milter events before eom are no-reply, so Postfix finds the milter gone only there.
    assert second.end_of_data.code == code
    if text is not None:
        assert second.end_of_data.text == text
    entries = await blocking(mta.wait_for_queue_idle)
    held = [entry.queue_id for entry in entries if entry.queue_name == "hold"]
    assert held == ([second.queue_id] if action == "quarantine" else [])
    delivered = sorted(parse(raw)["Subject"] for _, raw in mta.maildir_messages())
    assert delivered == (["first", "second"] if action == "accept" else ["first"])
