"""Every webhook action through a real Postfix, at each stage where Postfix honours it.

The SMTP client's view is the truth here: which command got which reply, with the
endpoint's custom (multi-line) text, and what was delivered, discarded or held. What Postfix
does with each milter reply per stage is in ``milter-protocol.md`` §5.8.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from milterbridge.milter.constants import Event
from tests.fakes.webhooks import FakeResponse, FakeWebhooks, RecordedRequest

from .bridge import BridgeRunner, blocking, body_of, parse, smtp
from .postfix import PostfixInstance, SmtpReply, make_message

pytestmark = pytest.mark.postfix

SENDER = "alice@example.org"
RCPTS = ["bob@example.net", "carol@example.net"]
LINES = ["custom line one", "custom line two"]


def _events(*names: str) -> frozenset[Event]:
    return frozenset(Event(name) for name in names)


def _reply_of(replies: tuple[SmtpReply, ...], step: str) -> SmtpReply:
    return next(reply for reply in replies if reply.step == step)


# (event, the SMTP step where the endpoint's reply shows up)
REFUSAL_STAGES = [
    pytest.param("connect", "mail", id="connect"),
    pytest.param("helo", "mail", id="helo"),
    pytest.param("mail", "mail", id="mail"),
    pytest.param("data", "data", id="data"),
    pytest.param("eom", "end_of_data", id="eom"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("event", "step"), REFUSAL_STAGES)
@pytest.mark.parametrize(("action", "code"), [("reject", 550), ("tempfail", 451)])
async def test_refusal_reaches_the_client_with_custom_multiline_text(
    mta: PostfixInstance,
    webhooks: FakeWebhooks,
    bridges: BridgeRunner,
    event: str,
    step: str,
    action: str,
    code: int,
) -> None:
    """A reject/tempfail with a two-line reply refuses at the right SMTP step, text and enhanced code intact."""
    enhanced = f"{code // 100}.7.1"
    webhooks.set_default(
        FakeResponse.decision(action, reply={"code": code, "enhanced": enhanced, "text": LINES}), event=event
    )
    await bridges.start(webhooks.endpoint("policy", events=_events(event)))

    result = await smtp(mta, SENDER, RCPTS, make_message())

    refusal = _reply_of(result.replies, step)
    assert refusal.code == code
    assert refusal.text.split("\n") == [f"{enhanced} {line}" for line in LINES]
    if event == "connect":
        # Postfix shows a generic greeting; the endpoint's text waits for MAIL (§5.8).
        expected_greeting = 554 if action == "reject" else 220
        assert result.greeting.code == expected_greeting
        assert "custom" not in result.greeting.text
    else:
        assert result.greeting.code == 220
    if event == "helo":
        assert result.ehlo is not None
        assert result.ehlo.code == 250
    assert not result.accepted
    assert await blocking(mta.wait_for_queue_idle) == []
    assert mta.maildir_messages() == []
    assert webhooks.events() == [event]


@pytest.mark.asyncio
async def test_connect_421_closes_the_session(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    """A 421 tempfail at connect gives Postfix's 421 greeting and the session ends at once."""
    webhooks.set_default(FakeResponse.decision("tempfail", reply={"code": 421, "text": "going away"}), event="connect")
    await bridges.start(webhooks.endpoint("policy", events=_events("connect")))

    result = await smtp(mta, SENDER, RCPTS, make_message())

    assert result.greeting.code == 421
    assert result.ehlo is None
    assert result.transaction.mail is None
    assert mta.maildir_messages() == []


@pytest.mark.asyncio
@pytest.mark.parametrize(("action", "code"), [("reject", 550), ("tempfail", 451)])
async def test_rcpt_refusal_refuses_only_that_recipient(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner, action: str, code: int
) -> None:
    """A refusal at rcpt refuses one recipient (custom text, % kept); the others are delivered."""

    def per_recipient(request: RecordedRequest) -> FakeResponse:
        if request.json["data"]["address"] == "mallory@example.net":
            return FakeResponse.decision(action, reply={"code": code, "text": "no mail for 100% of mallory"})
        return FakeResponse.decision("continue")

    webhooks.set_default(per_recipient, event="rcpt")
    await bridges.start(webhooks.endpoint("policy", events=_events("rcpt")))
    rcpts = ["bob@example.net", "mallory@example.net", "carol@example.net"]

    result = await smtp(mta, SENDER, rcpts, make_message(to=rcpts))

    assert [(r.argument, r.code) for r in result.transaction.rcpts] == [
        ("bob@example.net", 250),
        ("mallory@example.net", code),
        ("carol@example.net", 250),
    ]
    # The bridge doubles '%' on the wire and Postfix turns '%%' back into '%'.
    assert result.transaction.rcpts[1].text.endswith("no mail for 100% of mallory")
    assert result.accepted
    delivered = await blocking(mta.wait_for_delivery, 2)
    assert sorted(parse(raw)["Delivered-To"] for _, raw in delivered) == ["bob@example.net", "carol@example.net"]
    assert await blocking(mta.wait_for_queue_idle) == []
    assert len(mta.maildir_messages()) == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("event", ["connect", "helo", "mail", "rcpt", "data", "eom"])
async def test_accept_delivers_and_ends_the_endpoints_events(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner, event: str
) -> None:
    """accept lets the message through and the endpoint hears nothing more for that scope."""
    webhooks.set_default(FakeResponse.decision("accept"), event=event)
    await bridges.start(webhooks.endpoint("policy", events=_events(event, "rcpt", "eom")))

    result = await smtp(mta, SENDER, RCPTS, make_message(subject="accepted"))

    assert result.accepted
    delivered = await blocking(mta.wait_for_delivery, 2)
    assert {parse(raw)["Subject"] for _, raw in delivered} == {"accepted"}
    # Everything the endpoint subscribed to up to and including the accepting event, then nothing.
    expected = {
        "connect": ["connect"],
        "helo": ["helo"],
        "mail": ["mail"],
        "rcpt": ["rcpt"],
        "data": ["rcpt", "rcpt", "data"],
        "eom": ["rcpt", "rcpt", "eom"],
    }[event]
    assert webhooks.events() == expected


@pytest.mark.asyncio
@pytest.mark.parametrize("event", ["mail", "rcpt", "data", "eom"])
async def test_discard_answers_250_and_delivers_nothing(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner, event: str
) -> None:
    """discard: the client sees 250 after the dot, yet nothing is delivered or queued."""
    webhooks.set_default(FakeResponse.decision("discard"), event=event)
    await bridges.start(webhooks.endpoint("policy", events=_events(event, "eom")))
    mark = mta.log_mark()

    result = await smtp(mta, SENDER, RCPTS, make_message())

    assert [r.code for r in result.transaction.rcpts] == [250, 250]
    assert result.accepted
    assert await blocking(mta.wait_for_queue_idle) == []
    assert mta.maildir_messages() == []
    # Postfix shows no more events of a discarded message: eom is never reached before it.
    assert webhooks.events().count("eom") == (1 if event == "eom" else 0)
    stage = {"mail": "MAIL", "rcpt": "RCPT", "data": "DATA", "eom": "END-OF-MESSAGE"}[event]
    await blocking(mta.wait_for_log, rf"milter-discard: {stage} from .*milter triggers DISCARD action", since=mark)


@pytest.mark.asyncio
@pytest.mark.parametrize("event", ["connect", "helo", "mail", "rcpt", "data", "eom"])
async def test_quarantine_holds_the_message_and_the_bridge_logs_the_reason(
    mta: PostfixInstance,
    webhooks: FakeWebhooks,
    bridges: BridgeRunner,
    caplog: pytest.LogCaptureFixture,
    event: str,
) -> None:
    """quarantine puts the message in the hold queue; the bridge logs the reason (Postfix 3.7 does not).

    Two messages go over one SMTP connection from different senders. Only the message from
    the suspect sender is quarantined, except at connect and helo, where the verdict covers
    every message of the session.
    """
    caplog.set_level(logging.INFO, logger="milterbridge")
    session_wide = event in ("connect", "helo")

    def verdict(request: RecordedRequest) -> FakeResponse:
        message: Any = request.json["message"]
        if session_wide or message["mail_from"]["address"] == "suspect@example.org":
            return FakeResponse.decision("quarantine", reason="looks like phishing")
        return FakeResponse.decision("continue")

    webhooks.set_default(verdict, event=event)
    await bridges.start(webhooks.endpoint("policy", events=_events(event, "eom")))
    mark = mta.log_mark()

    def two_messages() -> tuple[str | None, str | None]:
        with mta.smtp_session() as session:
            suspect = session.send("suspect@example.org", ["bob@example.net"], make_message(subject="suspect"))
            fine = session.send(SENDER, ["carol@example.net"], make_message(subject="fine"))
        assert suspect.accepted
        assert fine.accepted
        return suspect.queue_id, fine.queue_id

    suspect_id, fine_id = await blocking(two_messages)

    held_count = 2 if session_wide else 1
    held = await blocking(mta.wait_for_queue, held_count, "hold")
    held_ids = {entry.queue_id for entry in held}
    assert suspect_id in held_ids
    assert (fine_id in held_ids) is session_wide
    await blocking(mta.wait_for_log, rf"{suspect_id}: milter-hold: END-OF-MESSAGE", since=mark)
    if not session_wide:
        [(_, raw)] = await blocking(mta.wait_for_delivery, 1)
        assert parse(raw)["Subject"] == "fine"
    quarantined = [
        record
        for record in caplog.records
        if record.getMessage() == "message quarantined" and record.__dict__["fields"]["queue_id"] == suspect_id
    ]
    assert len(quarantined) == 1
    assert "looks like phishing" in quarantined[0].__dict__["fields"]["reason"]


@pytest.mark.asyncio
async def test_skip_at_body_stops_the_chunks(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    """skip on the first body chunk makes Postfix stop sending the body; the message is delivered whole."""
    webhooks.set_default(FakeResponse.decision("skip"), event="body")
    await bridges.start(webhooks.endpoint("scanner", events=_events("body", "eom")))
    body = "".join(f"line {n:06d} of a body long enough for many milter chunks\n" for n in range(20000))

    result = await smtp(mta, SENDER, RCPTS[:1], make_message(subject="skipped", body=body))

    assert result.accepted
    [(_, raw)] = await blocking(mta.wait_for_delivery, 1)
    assert body_of(raw) == body.encode()
    # Postfix sends the body in chunks of at most 65535 bytes; after the skip, none follow.
    assert len(body) > 10 * 65535
    assert webhooks.events() == ["body", "eom"]
