"""Outcomes that end a message before end-of-message are logged and counted for what they are."""

from __future__ import annotations

import pytest

from milterbridge.config import ServerSettings
from milterbridge.milter.constants import Event
from milterbridge.milter.messages import Accept, ReplyCode
from milterbridge.policy.model import Mode, OnOversize
from tests.engine.conftest import ENVELOPE, Engine
from tests.fakes.webhooks import FakeResponse

MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nbody\r\n"


def outcome_count(engine: Engine, outcome: str) -> float:
    value = engine.metrics.registry.get_sample_value("milterbridge_messages_total", {"outcome": outcome})
    return value or 0.0


@pytest.mark.asyncio
async def test_accept_before_eom_is_accepted_not_aborted(engine: Engine) -> None:
    """An accept at MAIL lets Postfix deliver: logged and counted as accepted, and no abort webhook."""
    engine.fake.set_default(FakeResponse.decision("accept"), path="/policy")
    await engine.start(
        engine.endpoint("policy", events=frozenset({Event.MAIL, Event.EOM})),
        engine.endpoint("watch", events=frozenset({Event.ABORT, Event.CLOSE}), mode=Mode.OBSERVE),
    )
    client = await engine.client()
    result = await engine.send(MESSAGE, client=client)  # ends with the ABORT Postfix sends after an accept
    await client.quit()
    # The close notification leaves once the bridge has handled every command of the connection,
    # the ABORT included; settling then waits for an abort notification that might have left too.
    await engine.fake.wait_for(1, path="/watch", event="close")
    await engine.settle()
    assert result.mail == Accept()
    assert outcome_count(engine, "accepted") == 1
    assert outcome_count(engine, "aborted") == 0
    assert engine.events("watch") == ["close"]


@pytest.mark.asyncio
async def test_oversize_at_body_is_counted_as_refused(engine: Engine) -> None:
    """A body refused as oversize at a body chunk is a tempfailed message, not an aborted one."""
    await engine.start(
        engine.endpoint("policy", events=frozenset({Event.BODY, Event.EOM})),
        server=ServerSettings(listen=("inet:127.0.0.1:0",), max_message_bytes=1000, on_oversize=OnOversize.TEMPFAIL),
    )
    message = MESSAGE.replace(b"body\r\n", b"x" * 5000 + b"\r\n")
    result = await engine.send(message)
    await engine.settle()
    assert isinstance(result.stopped_by, ReplyCode)
    assert result.stopped_by.text.startswith(b"451 4.3.4")
    assert outcome_count(engine, "tempfailed") == 1
    assert outcome_count(engine, "aborted") == 0


@pytest.mark.asyncio
async def test_observe_header_payload_has_only_headers_so_far(engine: Engine) -> None:
    """Each header webhook of an observe endpoint carries the headers up to and including its own."""
    await engine.start(
        engine.endpoint("policy", events=frozenset({Event.EOM})),
        engine.endpoint("watch", events=frozenset({Event.HEADER}), mode=Mode.OBSERVE),
    )
    await engine.send(MESSAGE)
    await engine.settle()
    seen = [[h["name"] for h in body["message"]["headers"]] for body in engine.bodies("watch", "header")]
    assert seen == [["From"], ["From", "To"], ["From", "To", "Subject"]]


@pytest.mark.asyncio
async def test_every_event_is_counted_when_only_eom_is_subscribed(engine: Engine) -> None:
    """Headers and recipients the session takes in without the dispatcher still count in events_total."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.EOM})))
    result = await engine.send()
    assert result.eom is not None

    def events(name: str) -> float:
        sample = engine.metrics.registry.get_sample_value("milterbridge_events_total", {"event": name})
        return sample or 0.0

    # MESSAGE has three headers; the default envelope two recipients.
    assert events("header") == 3
    assert events("rcpt") == len(ENVELOPE.recipients)
    assert events("mail") == events("eom") == events("connect") == events("helo") == 1
