"""Per-endpoint conditions (``when``) through the whole bridge: who is called, counted and logged."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from milterbridge.client import Envelope
from milterbridge.conditional import ConditionalHandler
from milterbridge.config import Config, ServerSettings
from milterbridge.dispatch import ConnectionHandler, Dispatcher
from milterbridge.milter.constants import Event, MacroStage
from milterbridge.milter.messages import Accept, Continue
from milterbridge.milter.negotiation import Requirements
from milterbridge.milter.session import MilterSession
from milterbridge.policy.conditions import parse_condition
from milterbridge.policy.model import Mode, OnOversize
from milterbridge.snapshot import Snapshot, with_condition_macros
from milterbridge.webhook.client import WebhookClient
from tests.engine.conftest import MESSAGE, Engine


def when(**table: Any) -> Any:
    return parse_condition(table)


def skipped_count(engine: Engine, endpoint: str, reason: str) -> float:
    labels = {"endpoint": endpoint, "reason": reason}
    return engine.metrics.registry.get_sample_value("milterbridge_endpoint_skipped_total", labels) or 0.0


def message_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [getattr(r, "fields") for r in caplog.records if r.getMessage().startswith("message ")]  # noqa: B009


@pytest.mark.asyncio
async def test_client_selects_and_skips_for_the_whole_connection(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="milterbridge.dispatch")
    events = frozenset({Event.CONNECT, Event.EOM, Event.CLOSE})
    await engine.start(
        engine.endpoint("inside", events=events, when=when(client=["192.0.2.0/24"])),
        engine.endpoint("outside", events=events, when=when(client=["!192.0.2.0/24", "!10.0.0.0/8"])),
    )
    client = await engine.client()
    result = await engine.send(MESSAGE, client=client)  # the client is 192.0.2.1
    await client.quit()
    await engine.fake.wait_for(1, path="/inside", event="close")
    await engine.settle()
    assert isinstance(result.eom and result.eom.reply, Continue)
    assert engine.events("inside") == ["connect", "eom", "close"]
    assert engine.events("outside") == []  # not even close
    assert skipped_count(engine, "outside", "client") == 1
    assert skipped_count(engine, "inside", "client") == 0
    [line] = message_lines(caplog)
    assert line["skipped"] == {"outside": "client"}


@pytest.mark.asyncio
async def test_ipv6_client(engine: Engine) -> None:
    await engine.start(
        engine.endpoint("v6", when=when(client=["2001:db8::/32"])),
        engine.endpoint("v4", when=when(client=["192.0.2.0/24"])),
    )
    envelope = Envelope(client_address=b"IPv6:2001:db8::25")
    await engine.send(MESSAGE, envelope)
    assert engine.events("v6") == ["eom"]
    assert engine.events("v4") == []
    assert skipped_count(engine, "v4", "client") == 1


@pytest.mark.asyncio
async def test_daemon(engine: Engine) -> None:
    await engine.start(
        engine.endpoint("submission", when=when(daemon=["submission", "smtps"])),
        engine.endpoint("smtpd", when=when(daemon="smtpd")),
    )
    envelope = Envelope(connect_macros=((b"j", b"mta.example.test"), (b"{daemon_name}", b"submission")))
    await engine.send(MESSAGE, envelope)
    assert engine.events("submission") == ["eom"]
    assert engine.events("smtpd") == []
    assert skipped_count(engine, "smtpd", "daemon") == 1


@pytest.mark.asyncio
async def test_authenticated(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="milterbridge.dispatch")
    await engine.start(
        engine.endpoint("dlp", events=frozenset({Event.MAIL, Event.EOM}), when=when(authenticated=True)),
        engine.endpoint("inbound", events=frozenset({Event.MAIL, Event.EOM}), when=when(authenticated=False)),
    )
    # Logged in: {auth_authen} comes with MAIL.
    client = await engine.client()
    await client.open_session(Envelope())
    reply = await client.mail_from(b"<alice@example.org>", (), ((b"{auth_authen}", b"alice"),))
    assert reply == Continue()
    await client.rcpt_to(b"<bob@example.net>")
    eom = await client.end_of_message()
    assert eom.reply == Continue()
    assert engine.events("dlp") == ["mail", "eom"]
    assert engine.events("inbound") == []
    # Not logged in.
    await engine.send(MESSAGE)
    assert engine.events("dlp") == ["mail", "eom"]
    assert engine.events("inbound") == ["mail", "eom"]
    assert skipped_count(engine, "inbound", "authenticated") == 1
    assert skipped_count(engine, "dlp", "authenticated") == 1
    assert [line.get("skipped") for line in message_lines(caplog)] == [
        {"inbound": "authenticated"},
        {"dlp": "authenticated"},
    ]


@pytest.mark.asyncio
async def test_sender_domains_per_message(engine: Engine) -> None:
    await engine.start(engine.endpoint("policy"), engine.endpoint("ours", when=when(sender_domains=["*.example.com"])))
    client = await engine.client()
    await client.send_message(Envelope(mail_from=b"<a@Mail.Example.COM>"), MESSAGE)
    await client.send_transaction(Envelope(mail_from=b"<a@example.org>"), MESSAGE)
    assert engine.events("policy") == ["eom", "eom"]
    assert engine.events("ours") == ["eom"]
    assert skipped_count(engine, "ours", "sender_domains") == 1


@pytest.mark.asyncio
async def test_the_only_endpoint_skipped_accepts_early(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="milterbridge.dispatch")
    await engine.start(
        engine.endpoint("policy", events=frozenset({Event.MAIL, Event.EOM}), when=when(sender_domains="example.com")),
        engine.endpoint("shadow", events=frozenset({Event.MAIL, Event.ABORT}), mode=Mode.OBSERVE),
    )
    result = await engine.send(MESSAGE)  # from sender@example.org
    await engine.settle()
    assert result.mail == Accept()
    assert engine.events("policy") == []
    assert engine.events("shadow") == ["mail"]
    [line] = message_lines(caplog)
    assert line["outcome"] == "accepted"
    assert line["skipped"] == {"policy": "sender_domains"}


@pytest.mark.asyncio
async def test_skipped_observer_gets_no_abort(engine: Engine) -> None:
    await engine.start(
        engine.endpoint("policy", events=frozenset({Event.EOM})),
        engine.endpoint(
            "shadow", events=frozenset({Event.MAIL, Event.ABORT}), mode=Mode.OBSERVE, when=when(authenticated=True)
        ),
        engine.endpoint("watch", events=frozenset({Event.ABORT}), mode=Mode.OBSERVE),
    )
    client = await engine.client()
    await client.open_session(Envelope())
    await client.mail_from(b"<a@example.org>")
    await client.abort()
    await engine.fake.wait_for(1, path="/watch", event="abort")
    await engine.settle()
    assert engine.events("shadow") == []
    assert skipped_count(engine, "shadow", "authenticated") == 1


@pytest.mark.asyncio
async def test_recipient_domains_per_recipient_at_rcpt(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="milterbridge.dispatch")
    await engine.start(
        engine.endpoint(
            "partner", events=frozenset({Event.RCPT, Event.EOM}), when=when(recipient_domains=["example.com"])
        ),
    )
    client = await engine.client()
    both = Envelope(recipients=(b"<a@example.net>", b"<b@EXAMPLE.com>"))
    result = await client.send_message(both, MESSAGE)
    assert result.rcpt == [Continue(), Continue()]
    assert result.eom is not None
    assert result.eom.reply == Continue()
    assert [body["data"]["address"] for body in engine.bodies("partner", "rcpt")] == ["b@EXAMPLE.com"]
    assert engine.events("partner") == ["rcpt", "eom"]
    assert skipped_count(engine, "partner", "recipient_domains") == 1  # the one recipient
    # No recipient in its domains: never called, done with the message, so end-of-message accepts.
    result = await client.send_transaction(Envelope(recipients=(b"<c@example.org>",)), MESSAGE)
    assert result.rcpt == [Continue()]
    assert result.eom is not None
    assert result.eom.reply == Accept()
    assert engine.events("partner") == ["rcpt", "eom"]
    assert skipped_count(engine, "partner", "recipient_domains") == 3  # the recipient, then the message
    lines = message_lines(caplog)
    assert "skipped" not in lines[0]  # called for the message (one recipient matched) ...
    assert lines[0]["skipped_recipients"] == {"partner": 1}  # ... but not for the other one
    assert lines[1]["skipped"] == {"partner": "recipient_domains"}
    assert lines[1]["skipped_recipients"] == {"partner": 1}


@pytest.mark.asyncio
async def test_recipient_domains_at_eom_only(engine: Engine) -> None:
    """Not subscribed to rcpt: the recipients (folded in, no round trip) decide at end-of-message."""
    await engine.start(
        engine.endpoint("policy"),
        engine.endpoint("partner", when=when(recipient_domains=["*.example.com", "example.com"])),
    )
    client = await engine.client()
    await client.send_message(Envelope(recipients=(b"<a@example.net>",)), MESSAGE)
    await client.send_transaction(Envelope(recipients=(b"<a@example.net>", b"<b@sub.example.com>")), MESSAGE)
    assert engine.events("policy") == ["eom", "eom"]
    assert engine.events("partner") == ["eom"]
    assert skipped_count(engine, "partner", "recipient_domains") == 1


def test_handler_and_negotiation_without_when_are_unchanged(engine: Engine) -> None:
    """No endpoint with a when: the plain handler; the conditions ask for no macro Postfix's defaults lack."""
    plain = Config(endpoints=(engine.endpoint("policy"),))
    conditional = Config(
        endpoints=(engine.endpoint("policy", when=when(client="10.0.0.0/8", daemon="smtpd", authenticated=True)),)
    )
    assert type(Dispatcher(plain, WebhookClient())(MilterSession())) is ConnectionHandler
    assert type(Dispatcher(conditional, WebhookClient())(MilterSession())) is ConditionalHandler
    assert Snapshot(conditional).requirements == Snapshot(plain).requirements


def test_the_macros_a_condition_needs_are_requested() -> None:
    needed = with_condition_macros(Requirements(macros={}), [when(daemon="smtpd", authenticated=False)])
    assert needed.macros == {MacroStage.CONNECT: (b"{daemon_name}",), MacroStage.ENVFROM: (b"{auth_authen}",)}


@pytest.mark.asyncio
async def test_recipients_not_kept_over_a_limit_do_not_skip_an_endpoint(engine: Engine) -> None:
    """With on_oversize = continue, recipients over max_recipients go on without being kept: a
    recipient_domains endpoint cannot know whom the message reaches, so it is called, not skipped."""
    await engine.start(
        engine.endpoint("partner", when=when(recipient_domains=["example.com"])),
        server=ServerSettings(max_recipients=1, on_oversize=OnOversize.CONTINUE),
    )
    client = await engine.client()
    result = await client.send_message(Envelope(recipients=(b"<a@example.net>", b"<b@example.com>")), MESSAGE)
    assert result.eom is not None
    assert engine.events("partner") == ["eom"]
    assert skipped_count(engine, "partner", "recipient_domains") == 0
