"""The connected MTA, told by its ``v`` macro: header numbering, budgets cut to its waits, and the log
line when it stops waiting (milter/mta.py; sendmail-e2e.md)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import pytest

from milterbridge.client import Envelope, MilterClientError
from milterbridge.config import SendmailSettings, ServerSettings
from milterbridge.milter.constants import Event, MacroStage
from milterbridge.milter.messages import InsertHeader, TempFail
from milterbridge.milter.mta import SendmailTimeouts
from tests.engine.conftest import ENVELOPE, MESSAGE, Engine
from tests.fakes.webhooks import FakeResponse

SENDMAIL = dataclasses.replace(ENVELOPE, macros=((MacroStage.CONNECT, b"v", b"8.17.1.9"),))
POSTFIX = dataclasses.replace(ENVELOPE, macros=((MacroStage.CONNECT, b"v", b"Postfix 3.7.11"),))
OTHER = dataclasses.replace(ENVELOPE, macros=((MacroStage.CONNECT, b"v", b"Exim 4.97"),))

#: After the message's 2nd header (To), and at the very top.
INSERTS = [
    {"op": "insert_header", "index": 2, "name": "X-After-To", "value": "1"},
    {"op": "insert_header", "index": 0, "name": "X-Top", "value": "1"},
]


def _message_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.getMessage().startswith("message ")]  # type: ignore[attr-defined]


async def _message_line(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    """The one message line, once the bridge has logged it (it sees the connection close a moment later)."""
    for _ in range(500):
        if _message_lines(caplog):
            break
        await asyncio.sleep(0.01)
    (line,) = _message_lines(caplog)
    return line


async def _inserts(engine: Engine, envelope: Envelope) -> list[InsertHeader]:
    result = await engine.send(MESSAGE, envelope)
    assert result.eom is not None
    return [m for m in result.eom.modifications if isinstance(m, InsertHeader)]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("envelope", "mta", "header_lines", "after_to"),
    [
        pytest.param(POSTFIX, "auto", 9, 3, id="postfix"),
        pytest.param(SENDMAIL, "auto", 9, 10, id="sendmail-stock-cf"),
        pytest.param(SENDMAIL, "auto", 11, 12, id="sendmail-11-H-lines"),
        pytest.param(SENDMAIL, "postfix", 9, 3, id="sendmail-told-postfix"),
        pytest.param(POSTFIX, "sendmail", 9, 10, id="postfix-told-sendmail"),
    ],
)
async def test_inserts_follow_the_mta(
    engine: Engine, envelope: Envelope, mta: str, header_lines: int, after_to: int
) -> None:
    """An insert after the message's N-th header goes out in the numbering of the MTA the v macro names
    (or ``[server] mta`` forces): Postfix counts its Received, Sendmail its cf's H lines."""
    engine.fake.set_default(FakeResponse.decision("continue", modifications=INSERTS), path="/policy")
    await engine.start(
        engine.endpoint("policy"),
        server=ServerSettings(mta=mta),
        sendmail=SendmailSettings(header_lines=header_lines),
    )
    inserts = await _inserts(engine, envelope)
    # In listed order: after To (entries above the message, then From and To), then the very top.
    assert [(m.name, m.index) for m in inserts] == [(b"X-After-To", after_to), (b"X-Top", 0)]


@pytest.mark.asyncio
async def test_an_unknown_mta_is_taken_for_postfix_said_once(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="milterbridge.dispatch")
    engine.fake.set_default(FakeResponse.decision("continue", modifications=INSERTS), path="/policy")
    await engine.start(engine.endpoint("policy"))
    for _ in range(2):
        inserts = await _inserts(engine, OTHER)
        assert [(m.name, m.index) for m in inserts] == [(b"X-After-To", 3), (b"X-Top", 0)]
    warnings = [r.getMessage() for r in caplog.records if "cannot tell the MTA" in r.getMessage()]
    assert warnings == [
        "cannot tell the MTA from its v macro ('Exim 4.97'); following Postfix's header numbering and timeouts; "
        "set [server] mta to say which MTA connects"
    ]


@pytest.mark.asyncio
async def test_a_configured_mta_the_v_macro_contradicts_is_kept_and_said_once(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="milterbridge.dispatch")
    engine.fake.set_default(FakeResponse.decision("continue", modifications=INSERTS), path="/policy")
    await engine.start(engine.endpoint("policy"), server=ServerSettings(mta="postfix"))
    for _ in range(2):
        inserts = await _inserts(engine, SENDMAIL)
        assert [(m.name, m.index) for m in inserts] == [(b"X-After-To", 3), (b"X-Top", 0)]
    warnings = [r.getMessage() for r in caplog.records if "[server] mta" in r.getMessage()]
    assert warnings == [
        "[server] mta is postfix, but the v macro ('8.17.1.9') names sendmail: header inserts and timeouts "
        "follow postfix"
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("event", "timeouts"),
    [pytest.param(Event.RCPT, "R:3s", id="rcpt-within-R"), pytest.param(Event.EOM, "E:3s", id="eom-within-E")],
)
async def test_a_budget_longer_than_sendmail_waits_is_cut(engine: Engine, event: Event, timeouts: str) -> None:
    """At a Sendmail connection a 20 s budget ends after limit - 2 = 1 s (Sendmail's whole-second clock and
    the answer's time kept back): the endpoint's
    on_error answers before Sendmail gives up."""
    engine.fake.set_default(FakeResponse.never_answer(), path="/policy")
    await engine.start(
        engine.endpoint("policy", events=frozenset({event}), timeout=20.0),
        sendmail=SendmailSettings(timeouts=SendmailTimeouts.parse(timeouts)),
    )
    started = time.monotonic()
    result = await engine.send(MESSAGE, SENDMAIL)
    elapsed = time.monotonic() - started
    refused = result.rcpt[0] if event is Event.RCPT else result.eom.reply if result.eom else None
    assert isinstance(refused, TempFail)
    assert 0.9 <= elapsed < 5.0


@pytest.mark.asyncio
async def test_when_sendmail_stops_waiting_the_log_says_so(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    """The MTA closes the connection while the endpoints decide end-of-message: the message line says
    that the MTA gave up and why, not that the client ended the message."""
    caplog.set_level(logging.INFO, logger="milterbridge.dispatch")
    engine.fake.set_default(FakeResponse.never_answer(), path="/policy")
    await engine.start(engine.endpoint("policy", timeout=10.0))
    client = await engine.client()
    await client.open_session(SENDMAIL)
    await client.mail_from(b"<alice@example.org>")
    await client.rcpt_to(b"<bob@example.net>")
    await client.header(b"Subject", b" hi")
    await client.end_of_headers()
    eom = asyncio.ensure_future(client.end_of_message())
    await engine.fake.wait_for(1, path="/policy", event="eom")
    await client.aclose()  # Sendmail's E ran out
    with pytest.raises(MilterClientError):
        await eom
    line = await _message_line(caplog)
    assert line["outcome"] == "aborted"
    assert line["reason"].startswith("Sendmail stopped waiting for the eom answer after ")
    # Long before E (300 s in the config): Sendmail's T= must say otherwise.
    assert line["reason"].endswith(
        "s and closed the connection (sooner than its E limit in [sendmail] timeouts (300s): a keep-alive came "
        "later than its R, or the filter's T= differs from [sendmail] timeouts); its own failure action applies"
    )


@pytest.mark.asyncio
async def test_a_client_abort_is_still_the_clients(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="milterbridge.dispatch")
    await engine.start(engine.endpoint("policy", events=frozenset({Event.RCPT})))
    client = await engine.client()
    await client.open_session(SENDMAIL)
    await client.mail_from(b"<alice@example.org>")
    await client.rcpt_to(b"<bob@example.net>")
    await client.abort()
    await client.quit()
    line = await _message_line(caplog)
    assert line["reason"] == "ended by the client before end-of-message"
