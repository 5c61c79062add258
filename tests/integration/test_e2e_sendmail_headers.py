"""Header positions and MTA timeouts through the real Postfix and Sendmail side by side.

``insert_header`` index N lands after the N-th header of ``message.headers`` whichever MTA is
connected: the bridge tells Postfix from Sendmail by the ``v`` macro and converts the index to
that MTA's numbering (milter/mta.py). And Sendmail's ``E`` limit: the bridge answers within it
when ``[sendmail] timeouts`` matches the filter's ``T=``, and says what happened when it does not.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import pytest

from milterbridge.config import SendmailSettings
from milterbridge.milter.constants import Event
from milterbridge.milter.mta import SendmailTimeouts
from milterbridge.policy.model import OnError
from tests.fakes.webhooks import FakeResponse, FakeWebhooks

from .bridge import BridgeRunner, blocking, header_lines
from .postfix import PostfixInstance
from .sendmail import SendmailInstance

pytestmark = [pytest.mark.postfix, pytest.mark.sendmail]

SENDER = "alice@example.org"
RCPT = "bob@example.net"
#: The message's headers, as the endpoint receives them (Date and Message-ID given, so neither MTA adds one).
HEADERS = [
    ("From", " alice@example.org"),
    ("To", " bob@example.net"),
    ("Subject", " positions"),
    ("Date", " Sun, 06 Dec 2026 08:00:00 +0000"),
    ("Message-ID", " <positions@example.org>"),
    ("X-A", " a"),
    ("X-B", " b"),
]
MESSAGE = ("".join(f"{name}:{value}\r\n" for name, value in HEADERS) + "\r\nbody\r\n").encode()
#: An insert at every gap (and past the end), a delete and a change, from one answer.
MODIFICATIONS: list[dict[str, Any]] = [
    *({"op": "insert_header", "index": i, "name": f"X-Ins-{i}", "value": "v"} for i in range(9)),
    {"op": "delete_header", "name": "X-A", "index": 1},
    {"op": "change_header", "name": "Subject", "index": 1, "value": " changed"},
]
#: Where the docs say each lands: 0 above the MTA's Received, N after the N-th header, past the end at the end.
EXPECTED = [
    "X-Ins-0",
    "Received",
    "From",
    "X-Ins-1",
    "To",
    "X-Ins-2",
    "Subject",
    "X-Ins-3",
    "Date",
    "X-Ins-4",
    "Message-ID",
    "X-Ins-5",
    "X-Ins-6",  # X-A, deleted, was the 6th
    "X-B",
    "X-Ins-7",
    "X-Ins-8",
]
#: Headers the delivery itself puts on top (Postfix's virtual(8)): not the milter's doing.
DELIVERY_HEADERS = {"Return-Path", "Delivered-To", "X-Original-To"}


def _positions_endpoint(webhooks: FakeWebhooks) -> Any:
    webhooks.set_default(FakeResponse.decision("continue", modifications=MODIFICATIONS), event="eom")
    return webhooks.endpoint("positions", events=frozenset({Event.EOM}))


def _assert_positions(raw: bytes) -> None:
    lines = [(name, value) for name, value in header_lines(raw) if name not in DELIVERY_HEADERS]
    assert [name for name, _ in lines] == EXPECTED
    assert dict(lines)["Subject"] == " changed"


@pytest.mark.asyncio
async def test_inserts_land_after_the_nth_header_through_postfix(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    await bridges.start(_positions_endpoint(webhooks))
    result = await blocking(mta.send, SENDER, [RCPT], MESSAGE)
    assert result.accepted, result.replies
    [(_name, raw)] = await blocking(mta.wait_for_delivery, 1)
    _assert_positions(raw)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("extra_cf", "cf_lines"),
    [
        pytest.param("", 9, id="stock-cf"),
        # A site H line that shows only for a mailer with flag Z (none here): one more entry above the message.
        pytest.param("H?Z?X-Site: here", 10, id="one-more-H-line"),
    ],
)
async def test_inserts_land_after_the_nth_header_through_sendmail(
    sendmail: SendmailInstance, webhooks: FakeWebhooks, sendmail_bridges: BridgeRunner, extra_cf: str, cf_lines: int
) -> None:
    """The same answer as through Postfix, the same places, with ``[sendmail] header_lines`` matching the cf."""
    await blocking(sendmail.set_milter, sendmail.milter_port, extra_cf=extra_cf)
    assert sendmail.cf_header_lines() == cf_lines
    await sendmail_bridges.start(_positions_endpoint(webhooks), sendmail=SendmailSettings(header_lines=cf_lines))
    result = await blocking(sendmail.send, SENDER, [RCPT], MESSAGE)
    assert result.accepted, result.replies
    [copy] = await blocking(sendmail.wait_for_delivery, 1)
    _assert_positions(copy.raw)


@pytest.mark.asyncio
async def test_a_wrong_header_lines_setting_shifts_the_inserts(
    sendmail: SendmailInstance, webhooks: FakeWebhooks, sendmail_bridges: BridgeRunner
) -> None:
    """The limit docs/sendmail.md names: with header_lines one short, every insert after header N lands one earlier."""
    webhooks.set_default(
        FakeResponse.decision(
            "continue", modifications=[{"op": "insert_header", "index": 2, "name": "X-Ins", "value": "v"}]
        ),
        event="eom",
    )
    await sendmail_bridges.start(webhooks.endpoint("positions"), sendmail=SendmailSettings(header_lines=8))
    result = await blocking(sendmail.send, SENDER, [RCPT], MESSAGE)
    assert result.accepted
    [copy] = await blocking(sendmail.wait_for_delivery, 1)
    assert [name for name, _ in header_lines(copy.raw)][:5] == ["Received", "From", "X-Ins", "To", "Subject"]


def _message_line(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    [line] = [r.fields for r in caplog.records if r.getMessage().startswith("message ")]  # type: ignore[attr-defined]
    return line


@pytest.mark.asyncio
async def test_the_bridge_answers_within_sendmails_e(
    sendmail: SendmailInstance,
    webhooks: FakeWebhooks,
    sendmail_bridges: BridgeRunner,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """T=...;E:4s and [sendmail] timeouts saying so: a 20 s eom budget is cut to 2 s (Sendmail's whole-second
    clock and the answer kept back), so the endpoint's on_error (reject) answers, not Sendmail's own
    failure action (F=T: 451)."""
    caplog.set_level(logging.INFO, logger="milterbridge.dispatch")
    await blocking(sendmail.set_milter, sendmail.milter_port, timeouts="S:10s;R:10s;E:4s")
    webhooks.set_default(FakeResponse.decision("continue").after(6.0), event="eom")
    await sendmail_bridges.start(
        webhooks.endpoint("slow", timeout=20.0, on_error=OnError.REJECT),
        server={"progress_interval": 0.5},
        sendmail=SendmailSettings(timeouts=SendmailTimeouts.parse("S:10s;R:10s;E:4s")),
    )
    result = await blocking(sendmail.send, SENDER, [RCPT], MESSAGE)
    end = next(r for r in result.replies if r.step == "end_of_data")
    assert end.code == 554, result.replies
    line = _message_line(caplog)
    assert line["outcome"] == "rejected"
    [call] = line["endpoints"]
    assert 1.9 <= call["ms"] / 1000 < 2.9


@pytest.mark.asyncio
async def test_when_sendmails_e_runs_out_the_log_says_so(
    sendmail: SendmailInstance,
    webhooks: FakeWebhooks,
    sendmail_bridges: BridgeRunner,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """T=...;E:3s but [sendmail] timeouts left at E:5m: keep-alives do not help, Sendmail gives up at 3 s
    (F=T: 451), and the message line says that Sendmail stopped waiting and which setting to fix."""
    caplog.set_level(logging.INFO, logger="milterbridge.dispatch")
    await blocking(sendmail.set_milter, sendmail.milter_port, timeouts="S:10s;R:10s;E:3s")
    mark = sendmail.log_mark()
    webhooks.set_default(FakeResponse.decision("continue").after(6.0), event="eom")
    await sendmail_bridges.start(webhooks.endpoint("slow", timeout=20.0), server={"progress_interval": 0.5})
    result = await blocking(sendmail.send, SENDER, [RCPT], MESSAGE)
    end = next(r for r in result.replies if r.step == "end_of_data")
    assert (end.code, end.text) == (451, "4.3.2 Please try again later")
    await blocking(sendmail.wait_for_log, r"milter_data\(bridge\): EOM ACK/NAK timeout", since=mark)
    for _ in range(50):  # the bridge logs the message when it sees the connection close
        if any(r.getMessage().startswith("message ") for r in caplog.records):
            break
        await asyncio.sleep(0.1)
    line = _message_line(caplog)
    assert line["outcome"] == "aborted"
    # Sendmail counts E in whole seconds: 3 s is 2 to 3 here.
    assert re.match(
        r"Sendmail stopped waiting for the eom answer after [23]\.\ds and closed the connection", line["reason"]
    )
    assert line["reason"].endswith(
        "(sooner than its E limit in [sendmail] timeouts (300s): a keep-alive came later than its R, or the "
        "filter's T= differs from [sendmail] timeouts); its own failure action applies"
    )


@pytest.mark.asyncio
async def test_a_cut_budget_fails_closed_through_postfix_that_would_accept(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    """A budget cut to an MTA's waits ends in the endpoint's on_error, never in a pass: here Postfix
    (milter_default_action = accept) connects to a bridge told ``mta = "sendmail"`` with R:3s, so an
    endpoint that never answers is cut to 1 s and the recipient gets the bridge's tempfail."""
    webhooks.set_default(FakeResponse.never_answer(), event="rcpt")
    await bridges.start(
        webhooks.endpoint("silent", events=frozenset({Event.RCPT}), timeout=20.0),
        server={"mta": "sendmail"},
        sendmail=SendmailSettings(timeouts=SendmailTimeouts.parse("R:3s")),
        default_action="accept",
    )
    result = await blocking(mta.send, SENDER, [RCPT], MESSAGE)
    rcpt = next(r for r in result.replies if r.step == "rcpt")
    assert rcpt.code == 451, result.replies
    assert not result.accepted
    assert mta.maildir_messages() == []
