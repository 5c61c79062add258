"""Several endpoints: merge order, ties, modification collection and observe mode (design.md §3.4)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest

from milterbridge.client import Envelope
from milterbridge.milter.constants import Event, Protocol
from milterbridge.milter.messages import (
    Accept,
    AddHeader,
    ChangeSender,
    Continue,
    Discard,
    Quarantine,
    Reject,
    ReplaceBody,
    ReplyCode,
    TempFail,
)
from milterbridge.policy.model import Mode, OnError
from tests.engine.conftest import Engine
from tests.fakes.webhooks import FakeResponse, RecordedRequest

BOTH_AT_EOM = {"events": frozenset({Event.EOM})}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        pytest.param("continue", "reject", [Reject()], id="reject-over-continue"),
        pytest.param("reject", "continue", [Reject()], id="reject-listed-first"),
        pytest.param("tempfail", "reject", [Reject()], id="reject-over-tempfail"),
        pytest.param("discard", "tempfail", [TempFail()], id="tempfail-over-discard"),
        pytest.param("quarantine", "discard", [Discard()], id="discard-over-quarantine"),
        pytest.param("continue", "quarantine", [Quarantine(reason=b"q-second"), Continue()], id="quarantine"),
        pytest.param("accept", "continue", [Continue()], id="accept-needs-everyone"),
        pytest.param("accept", "accept", [Accept()], id="all-accept"),
    ],
)
async def test_most_severe_action_wins(engine: Engine, first: str, second: str, expected: list[Any]) -> None:
    """Two enforcing endpoints at eom: reject > tempfail > discard > quarantine > continue."""
    await engine.start(engine.endpoint("first", **BOTH_AT_EOM), engine.endpoint("second", **BOTH_AT_EOM))
    for name, action in (("first", first), ("second", second)):
        extra = {"reason": f"q-{name}"} if action == "quarantine" else {}
        engine.fake.set_default(FakeResponse.decision(action, **extra), path=f"/{name}")
    result = await engine.send()
    assert result.eom is not None
    assert [*result.eom.modifications, result.eom.reply] == expected
    assert engine.events("first") == engine.events("second") == ["eom"]


@pytest.mark.asyncio
@pytest.mark.parametrize("order", [("slow", "fast"), ("fast", "slow")], ids=["slow-listed-first", "fast-listed-first"])
async def test_tie_goes_to_the_endpoint_listed_first(engine: Engine, order: tuple[str, str]) -> None:
    """Equal actions: the endpoint listed first wins and supplies the reply, whoever answered first."""
    await engine.start(*(engine.endpoint(name, events=frozenset({Event.RCPT})) for name in order))
    engine.fake.set_default(
        FakeResponse.decision("reject", reply={"code": 550, "text": "said by slow"}).after(0.1), path="/slow"
    )
    engine.fake.set_default(FakeResponse.decision("reject", reply={"code": 554, "text": "said by fast"}), path="/fast")
    result = await engine.send()
    assert result.rcpt == [ReplyCode(text=f"{550 if order[0] == 'slow' else 554} said by {order[0]}".encode())]


@pytest.mark.asyncio
async def test_modifications_collected_from_every_endpoint(engine: Engine) -> None:
    """Both endpoints' ops are sent, in config order; for replace_body and change_from the first listed wins."""
    await engine.start(engine.endpoint("first"), engine.endpoint("second"))

    def ops(tag: str) -> list[dict[str, Any]]:
        return [
            {"op": "add_header", "name": f"X-{tag}", "value": tag},
            {"op": "replace_body", "base64": base64.b64encode(f"{tag}\r\n".encode()).decode()},
            {"op": "change_from", "address": f"{tag}@example.org"},
        ]

    engine.fake.set_default(FakeResponse.decision("continue", modifications=ops("second")), path="/second")
    engine.fake.set_default(FakeResponse.decision("continue", modifications=ops("first")).after(0.05), path="/first")
    result = await engine.send()
    assert result.eom is not None
    assert list(result.eom.modifications) == [
        ChangeSender(address=b"<first@example.org>"),
        AddHeader(name=b"X-first", value=b" first"),
        AddHeader(name=b"X-second", value=b" second"),
        ReplaceBody(data=b"first\r\n"),
    ]


@pytest.mark.asyncio
async def test_rcpt_recipient_and_message_verdicts_merge_apart(engine: Engine) -> None:
    """At rcpt a recipient reject and a message discard merge apart: recipient refused now, discard next."""
    rcpt = {"events": frozenset({Event.RCPT})}
    await engine.start(engine.endpoint("recipients", **rcpt), engine.endpoint("messages", **rcpt))
    engine.fake.enqueue(FakeResponse.decision("reject"), path="/recipients")
    engine.fake.enqueue(FakeResponse.decision("discard"), path="/messages")
    envelope = Envelope(recipients=(b"<one@example.net>", b"<two@example.net>"))
    result = await engine.send(envelope=envelope)
    assert result.rcpt == [Reject(), Discard()]
    assert result.eom is None


# ---------------------------------------------------------------------- observe

ALL_DECISION_EVENTS = frozenset(Event) - {Event.ABORT, Event.CLOSE, Event.UNKNOWN}


@pytest.mark.asyncio
async def test_observe_endpoint_gets_the_same_webhooks_and_is_never_applied(engine: Engine) -> None:
    """An observe endpoint sees every event the enforcing one sees; its reject and modifications change nothing."""
    await engine.start(
        engine.endpoint("enforce", events=ALL_DECISION_EVENTS),
        engine.endpoint("observe", events=ALL_DECISION_EVENTS, mode=Mode.OBSERVE),
    )
    engine.fake.set_default(
        FakeResponse.decision(
            "reject",
            reply={"code": 550, "text": "observer says no"},
            modifications=[{"op": "add_header", "name": "X-Observer", "value": "1"}],
        ),
        path="/observe",
    )
    result = await engine.send()
    assert result.final == Continue()
    assert result.eom is not None
    assert result.eom.modifications == ()
    await engine.settle()
    expected = ["connect", "helo", "mail", "rcpt", "data", "header", "header", "header", "eoh", "body", "eom"]
    assert engine.events("enforce") == expected
    assert sorted(engine.events("observe")) == sorted(expected)  # type: ignore[type-var]
    # the same payloads apart from the per-call id and timestamp
    enforce = {(b["event"], str(b["data"])): b for b in engine.bodies("enforce")}
    for body in engine.bodies("observe"):
        twin = enforce[(body["event"], str(body["data"]))]
        assert body["session"] == twin["session"]
        assert body["message"] == twin["message"]


@pytest.mark.asyncio
async def test_slow_observe_endpoint_never_delays_the_reply(engine: Engine) -> None:
    """The eom reply arrives while the observe endpoint has not answered yet."""
    gate = asyncio.Event()

    async def held(request: RecordedRequest) -> FakeResponse:
        await gate.wait()
        return FakeResponse.decision("reject")

    await engine.start(
        engine.endpoint("enforce", events=frozenset({Event.RCPT, Event.EOM})),
        engine.endpoint("observe", events=frozenset({Event.RCPT, Event.EOM}), mode=Mode.OBSERVE),
    )
    engine.fake.set_default(held, path="/observe")
    async with asyncio.timeout(3.0):
        result = await engine.send()
        await engine.fake.wait_for(2, path="/observe")
    assert result.rcpt == [Continue()]
    assert result.eom is not None
    assert result.eom.reply == Continue()
    assert not gate.is_set()
    gate.set()
    await engine.settle()


@pytest.mark.asyncio
async def test_observe_failure_never_triggers_on_error(engine: Engine) -> None:
    """A failing observe endpoint with on_error reject changes nothing."""
    await engine.start(
        engine.endpoint("enforce"),
        engine.endpoint("observe", mode=Mode.OBSERVE, on_error=OnError.REJECT, retry=False),
    )
    engine.fake.set_default(FakeResponse.status_code(500), path="/observe")
    result = await engine.send()
    assert result.eom is not None
    assert result.eom.reply == Continue()
    await engine.settle()
    assert engine.events("observe") == ["eom"]


@pytest.mark.asyncio
async def test_events_wanted_only_by_observe_endpoints_are_no_reply(engine: Engine) -> None:
    """An event only an observe endpoint wants is negotiated no-reply, and the observer still gets it."""
    await engine.start(
        engine.endpoint("enforce"),
        engine.endpoint("observe", events=frozenset({Event.RCPT, Event.EOM}), mode=Mode.OBSERVE),
    )
    client = await engine.client()
    assert client.negotiated is not None
    assert client.negotiated.protocol & Protocol.NR_RCPT
    result = await engine.send(client=client)
    assert result.rcpt == [None]  # no reply on the wire
    await engine.settle()
    assert sorted(engine.events("observe")) == ["eom", "rcpt"]  # type: ignore[type-var]


@pytest.mark.asyncio
async def test_observe_only_config_accepts_everything(engine: Engine) -> None:
    """With only an observe endpoint that rejects, every message still goes through."""
    await engine.start(engine.endpoint("observe", mode=Mode.OBSERVE))
    engine.fake.set_default(FakeResponse.decision("reject"))
    result = await engine.send()
    assert result.eom is not None
    assert isinstance(result.eom.reply, Continue | Accept)
    assert result.eom.modifications == ()
    await engine.settle()
    assert engine.events("observe") == ["eom"]
