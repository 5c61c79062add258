"""Every action at every event, as the MTA sees it on the milter wire (design.md §3.3)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from milterbridge.client import Envelope, TransactionResult
from milterbridge.milter.constants import ALL_PROTOCOL, Event, Protocol
from milterbridge.milter.messages import (
    Accept,
    AddHeader,
    Continue,
    Discard,
    Quarantine,
    Reject,
    Reply,
    ReplyCode,
    Skip,
    TempFail,
)
from milterbridge.policy.model import Mode, OnError
from tests.engine.conftest import MESSAGE, Engine
from tests.fakes.webhooks import FakeResponse, RecordedRequest

MESSAGE_EVENTS = ("mail", "rcpt", "data", "header", "eoh", "body", "eom")
#: A body of three chunks (Postfix sends at most 65535 bytes per chunk).
LONG_MESSAGE = b"Subject: long\r\n\r\n" + b"x" * 78 + b"\r\n" + (b"y" * 78 + b"\r\n") * 2000


def reply_at(result: TransactionResult, event: str) -> Reply | None:
    """The bridge's reply to the first command of ``event`` in ``result``."""
    if event == "eom":
        return result.eom.reply if result.eom else None
    value: Reply | list[Reply | None] | None = getattr(result, {"header": "headers"}.get(event, event))
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _cases() -> list[Any]:
    """(event, action, expected reply class) for the whole table of design.md §3.3."""
    cases = []
    for event in ("connect", "helo", *MESSAGE_EVENTS):
        message = event not in ("connect", "helo")
        expected: dict[str, type[Reply]] = {
            "continue": Continue,
            "accept": Accept,
            "reject": Reject,
            "tempfail": TempFail,
            # illegal where the table says no: a schema error, so on_error (tempfail) applies
            "discard": Discard if message else TempFail,
            "quarantine": Continue,  # remembered for end-of-message
            "skip": Continue if event in ("header", "body") else TempFail,
        }
        if event == "body":
            expected["skip"] = Skip
        for action, reply in expected.items():
            cases.append(pytest.param(event, action, reply, id=f"{event}-{action}"))
    return cases


@pytest.mark.asyncio
@pytest.mark.parametrize(("event", "action", "expected"), _cases())
async def test_action_at_event(engine: Engine, event: str, action: str, expected: type[Reply]) -> None:
    """An endpoint's action at one event arrives as the milter reply the table prescribes."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event(event)})))
    engine.fake.set_default(FakeResponse.decision(action))
    result = await engine.send()
    reply = reply_at(result, event)
    assert type(reply) is expected
    # Every header is asked about unless the endpoint is done with headers (accept, skip, refusal).
    calls = 3 if event == "header" and action in ("continue", "quarantine") else 1
    assert engine.events("policy") == [event] * calls
    if expected is Continue and event != "eom":
        assert result.eom is not None, "the transaction goes on to end-of-message"
    if action == "quarantine":
        assert result.eom is not None
        assert [type(m) for m in result.eom.modifications] == [Quarantine]
        assert isinstance(result.eom.reply, Continue)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("action", "expected"),
    [
        pytest.param("continue", Continue, id="continue"),
        pytest.param("tempfail", TempFail, id="tempfail"),
        # Postfix ignores 5xx to an unknown command and can crash on accept/discard: all refused
        pytest.param("reject", Continue, id="reject-refused"),
        pytest.param("accept", Continue, id="accept-refused"),
        pytest.param("discard", Continue, id="discard-refused"),
        pytest.param("quarantine", Continue, id="quarantine-refused"),
        pytest.param("skip", Continue, id="skip-refused"),
    ],
)
async def test_action_at_unknown(engine: Engine, action: str, expected: type[Reply]) -> None:
    """At unknown only continue and tempfail are legal; anything else is a failure (here on_error continue)."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.UNKNOWN}), on_error=OnError.CONTINUE))
    engine.fake.set_default(FakeResponse.decision(action))
    client = await engine.client()
    await client.open_session(Envelope())
    reply = await client.unknown(b"XFOO bar")
    assert type(reply) is expected
    (request,) = engine.bodies("policy")
    assert request["data"] == {"command": "XFOO bar"}
    assert request["message"] is None


@pytest.mark.asyncio
async def test_unknown_tempfail_with_4xx_reply(engine: Engine) -> None:
    """A tempfail at unknown with its own 4xx reply reaches the MTA as that reply."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.UNKNOWN})))
    engine.fake.set_default(FakeResponse.decision("tempfail", reply={"code": 421, "text": "go away"}))
    client = await engine.client()
    await client.open_session(Envelope())
    assert await client.unknown(b"XFOO") == ReplyCode(text=b"421 go away")


# ----------------------------------------------------------------- custom replies


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("event", "decision", "text"),
    [
        pytest.param(
            "rcpt",
            {"action": "reject", "reply": {"code": 550, "enhanced": "5.7.1", "text": ["a", "b"]}},
            b"550-5.7.1 a\r\n550 5.7.1 b",
            id="multi-line",
        ),
        pytest.param(
            "mail",
            {"action": "tempfail", "reply": {"code": 451, "enhanced": "4.7.1", "text": "try later"}},
            b"451 4.7.1 try later",
            id="single-line-string",
        ),
        pytest.param(
            "eom",
            {"action": "reject", "reply": {"code": 554, "text": ["100% spam", "50%% more"]}},
            b"554-100%% spam\r\n554 50%%%% more",
            id="percent-doubled",
        ),
        pytest.param(
            "connect",
            {"action": "reject", "reply": {"code": 554, "enhanced": "5.7.1", "text": ["no thanks"]}},
            b"554 5.7.1 no thanks",
            id="connect",
        ),
        pytest.param(
            "header",
            {"action": "tempfail", "reply": {"code": 452, "enhanced": "4.3.1", "text": ["x", "y", "z"]}},
            b"452-4.3.1 x\r\n452-4.3.1 y\r\n452 4.3.1 z",
            id="three-lines",
        ),
    ],
)
async def test_custom_reply_is_exact(engine: Engine, event: str, decision: dict[str, object], text: bytes) -> None:
    """A reply from the endpoint arrives as ReplyCode with the exact portable multi-line text."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event(event)})))
    engine.fake.set_default(FakeResponse.json(decision))
    result = await engine.send()
    assert reply_at(result, event) == ReplyCode(text=text)
    assert result.final == ReplyCode(text=text)


# ----------------------------------------------------------------------- rcpt


@pytest.mark.asyncio
async def test_rcpt_reject_refuses_only_that_recipient(engine: Engine) -> None:
    """A reject at rcpt refuses one recipient; the others go on and the refused one leaves message.rcpt_to."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.RCPT, Event.EOM})))

    def per_recipient(request: RecordedRequest) -> FakeResponse:
        if request.json["data"]["address"] == "bad@example.net":
            return FakeResponse.decision("reject", reply={"code": 550, "enhanced": "5.1.1", "text": "no such user"})
        return FakeResponse.decision("continue")

    engine.fake.set_default(per_recipient, event="rcpt")
    envelope = Envelope(recipients=(b"<a@example.net>", b"<bad@example.net>", b"<c@example.net>"))
    result = await engine.send(envelope=envelope)
    assert result.rcpt == [Continue(), ReplyCode(text=b"550 5.1.1 no such user"), Continue()]
    assert result.eom is not None
    assert isinstance(result.eom.reply, Continue)
    rcpt_requests = engine.bodies("policy", "rcpt")
    assert [a["address"] for a in rcpt_requests[2]["message"]["rcpt_to"]] == ["a@example.net", "c@example.net"]
    (eom,) = engine.bodies("policy", "eom")
    assert [a["address"] for a in eom["message"]["rcpt_to"]] == ["a@example.net", "c@example.net"]


@pytest.mark.asyncio
async def test_rcpt_discard_discards_the_whole_message(engine: Engine) -> None:
    """A discard at rcpt is a message verdict: the MTA gets 'd' and the message ends."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.RCPT, Event.EOM})))
    engine.fake.set_default(FakeResponse.decision("discard"), event="rcpt")
    result = await engine.send()
    assert result.rcpt == [Discard()]
    assert result.eom is None
    assert engine.events("policy") == ["rcpt"]


# ------------------------------------------------------------------ quarantine


@pytest.mark.asyncio
async def test_quarantine_before_eom_is_sent_at_eom(engine: Engine) -> None:
    """A quarantine at rcpt is answered 'c' and ends as a Quarantine modification at eom, with its reason."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.RCPT, Event.EOM})))
    engine.fake.set_default(FakeResponse.decision("quarantine", reason="looks odd"), event="rcpt")
    result = await engine.send()
    assert result.rcpt == [Continue()]
    assert result.eom is not None
    assert result.eom.modifications == (Quarantine(reason=b"looks odd"),)
    assert result.eom.reply == Continue()


@pytest.mark.asyncio
async def test_quarantine_without_reason_gets_a_default(engine: Engine) -> None:
    """A quarantine without a reason still puts a non-empty text on the wire."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.EOM})))
    engine.fake.set_default(FakeResponse.decision("quarantine"))
    result = await engine.send()
    assert result.eom is not None
    (quarantine,) = result.eom.modifications
    assert isinstance(quarantine, Quarantine)
    assert quarantine.reason


@pytest.mark.asyncio
async def test_later_reject_wins_over_quarantine(engine: Engine) -> None:
    """A reject at eom wins over a quarantine remembered from mail: no 'q' on the wire."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.MAIL, Event.EOM})))
    engine.fake.set_default(FakeResponse.decision("quarantine", reason="hold"), event="mail")
    engine.fake.set_default(FakeResponse.decision("reject"), event="eom")
    result = await engine.send()
    assert result.eom is not None
    assert result.eom.modifications == ()
    assert result.eom.reply == Reject()


@pytest.mark.asyncio
async def test_quarantine_at_connect_applies_to_every_message(engine: Engine) -> None:
    """A quarantine at connect is sent at the end of every message of the session."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.CONNECT})))
    engine.fake.set_default(FakeResponse.decision("quarantine", reason="suspicious client"))
    client = await engine.client()
    first = await client.send_message(Envelope(), MESSAGE)
    second = await client.send_transaction(Envelope(), MESSAGE)
    for result in (first, second):
        assert result.eom is not None
        assert result.eom.modifications == (Quarantine(reason=b"suspicious client"),)
    assert engine.events("policy") == ["connect"]


# ------------------------------------------------------------------------ skip


@pytest.mark.asyncio
async def test_skip_at_header_stops_headers_for_that_endpoint(engine: Engine) -> None:
    """A skip at header means no more headers for the endpoint; the MTA still gets 'c' (SKIP is body only)."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.HEADER, Event.EOM})))
    engine.fake.set_default(FakeResponse.decision("skip"), event="header")
    result = await engine.send()
    assert result.headers == [Continue(), Continue(), Continue()]
    assert engine.events("policy") == ["header", "eom"]


@pytest.mark.asyncio
async def test_skip_at_body_sends_skip(engine: Engine) -> None:
    """When the only body subscriber skips, no endpoint needs the body and SKIP was negotiated: 's'."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.BODY, Event.EOM})))
    engine.fake.set_default(FakeResponse.decision("skip"), event="body")
    result = await engine.send(LONG_MESSAGE)
    assert result.body == [Skip()]
    assert result.eom is not None
    assert engine.events("policy") == ["body", "eom"]


@pytest.mark.asyncio
async def test_skip_at_body_without_skip_negotiated(engine: Engine) -> None:
    """An MTA that does not offer SKIP gets 'c' for every chunk; the endpoint still sees one body event."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.BODY})))
    engine.fake.set_default(FakeResponse.decision("skip"))
    client = await engine.client(protocol=ALL_PROTOCOL & ~Protocol.SKIP)
    assert not client.negotiated.protocol & Protocol.SKIP  # type: ignore[union-attr]
    result = await engine.send(LONG_MESSAGE, client=client)
    assert result.body == [Continue(), Continue(), Continue()]
    assert engine.events("policy") == ["body"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "other",
    [
        pytest.param({"events": frozenset({Event.EOM}), "include_body": True}, id="include_body"),
        pytest.param({"events": frozenset({Event.BODY}), "mode": Mode.OBSERVE}, id="observe-subscriber"),
        pytest.param({"events": frozenset({Event.BODY})}, id="enforcing-subscriber-continues"),
    ],
)
async def test_skip_at_body_not_sent_while_body_is_needed(engine: Engine, other: dict[str, object]) -> None:
    """'s' is not sent while another endpoint needs the body (include_body, observe or enforcing subscriber)."""
    await engine.start(
        engine.endpoint("policy", events=frozenset({Event.BODY})),
        engine.endpoint("other", **other),
    )
    engine.fake.set_default(FakeResponse.decision("skip"), path="/policy")
    result = await engine.send(LONG_MESSAGE)
    assert result.body == [Continue(), Continue(), Continue()]
    assert engine.events("policy") == ["body"]
    await engine.settle()
    if other.get("include_body"):
        (eom,) = engine.bodies("other", "eom")
        assert base64.b64decode(eom["message"]["body"]["base64"]) == LONG_MESSAGE.split(b"\r\n\r\n", 1)[1]


# ---------------------------------------------------------------------- accept


@pytest.mark.asyncio
async def test_accept_waits_for_every_enforcing_endpoint(engine: Engine) -> None:
    """One endpoint's accept answers 'c' while another still decides; the accepter is asked no more."""
    await engine.start(
        engine.endpoint("a", events=frozenset({Event.MAIL, Event.RCPT, Event.EOM})),
        engine.endpoint("b", events=frozenset({Event.MAIL, Event.RCPT, Event.EOM})),
    )
    engine.fake.set_default(FakeResponse.decision("accept"), path="/a", event="mail")
    client = await engine.client()
    result = await engine.send(client=client)
    assert result.mail == Continue()
    assert result.eom is not None
    assert result.eom.reply == Continue()
    assert engine.events("a") == ["mail"]
    assert engine.events("b") == ["mail", "rcpt", "eom"]
    # accept at mail covers that message only
    await client.send_transaction(Envelope(), MESSAGE)
    assert engine.events("a") == ["mail", "mail"]


@pytest.mark.asyncio
async def test_accept_from_every_endpoint_sends_accept(engine: Engine) -> None:
    """When every enforcing endpoint accepted and nothing is pending, the MTA gets 'a'."""
    await engine.start(
        engine.endpoint("a", events=frozenset({Event.MAIL, Event.EOM})),
        engine.endpoint("b", events=frozenset({Event.MAIL, Event.EOM})),
        engine.endpoint("watch", events=frozenset({Event.MAIL}), mode=Mode.OBSERVE),
    )
    engine.fake.set_default(FakeResponse.decision("accept"), event="mail")
    result = await engine.send()
    assert result.mail == Accept()
    assert result.stopped_at == "mail"


@pytest.mark.asyncio
async def test_accept_with_pending_modification_answers_continue(engine: Engine) -> None:
    """An accept with a modification is answered 'c' (an 'a' would skip eom) and the change arrives at eom."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.MAIL, Event.EOM})))
    engine.fake.set_default(
        FakeResponse.decision("accept", modifications=[{"op": "add_header", "name": "X-Seen", "value": "yes"}]),
        event="mail",
    )
    result = await engine.send()
    assert result.mail == Continue()
    assert result.eom is not None
    assert result.eom.modifications == (AddHeader(name=b"X-Seen", value=b" yes"),)
    assert result.eom.reply == Continue()
    assert engine.events("policy") == ["mail"]


@pytest.mark.asyncio
async def test_accept_with_pending_quarantine_answers_continue(engine: Engine) -> None:
    """An accept after a quarantine is answered 'c' so that the quarantine still reaches eom."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.MAIL, Event.RCPT, Event.EOM})))
    engine.fake.set_default(FakeResponse.decision("quarantine", reason="hold"), event="mail")
    engine.fake.set_default(FakeResponse.decision("accept"), event="rcpt")
    result = await engine.send()
    assert result.rcpt == [Continue()]
    assert result.eom is not None
    assert result.eom.modifications == (Quarantine(reason=b"hold"),)
    assert engine.events("policy") == ["mail", "rcpt"]


@pytest.mark.asyncio
async def test_accept_at_connect_covers_the_connection(engine: Engine) -> None:
    """An accept at connect ends the endpoint's part for every message of the connection."""
    await engine.start(
        engine.endpoint("a", events=frozenset({Event.CONNECT, Event.MAIL, Event.EOM})),
        engine.endpoint("b", events=frozenset({Event.MAIL})),
    )
    engine.fake.set_default(FakeResponse.decision("accept"), path="/a", event="connect")
    client = await engine.client()
    first = await client.send_message(Envelope(), MESSAGE)
    second = await client.send_transaction(Envelope(), MESSAGE)
    assert first.connect == Continue()  # b has not decided yet
    assert first.eom is not None
    assert second.eom is not None
    assert engine.events("a") == ["connect"]
    assert engine.events("b") == ["mail", "mail"]
