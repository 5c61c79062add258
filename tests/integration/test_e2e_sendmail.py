"""The bridge behind a real Sendmail 8: decisions, modifications, payloads and failures.

The same ground as the Postfix suite (``test_e2e_actions``, ``test_e2e_modifications``,
``test_e2e_payload``, ``test_e2e_failures``), through the run's private Sendmail
(``sendmail.py``), whose filter points at the run's fixed bridge address with ``F=T`` and
Sendmail's default timeouts. The SMTP client's replies and the copies the capture mailer
delivered are the truth. Where Sendmail differs from Postfix (``sendmail-e2e.md``), the test
says so:

* a refusal at connect loses the endpoint's text: Sendmail keeps only its class (reject: a 554
  greeting and ``550 5.0.0 Command rejected`` at MAIL; tempfail: a normal greeting and ``451
  4.3.2 Please try again later`` at MAIL), and a 421 becomes Sendmail's own 421 greeting;
* a 421 at HELO answers the EHLO itself (``421 4.0.0 text``: Sendmail adds the enhanced code);
* a refusal without a reply text gets Sendmail's own: ``451 4.3.2 Please try again later``,
  ``550 5.7.1 Command rejected`` (``554`` at end-of-message);
* a 5xx at MAIL or RCPT gets the address in front of its first line (``<a@b>... text``), a 4xx
  does not;
* with the bridge down, ``F=T`` tempfails at MAIL and ``F=R`` refuses like a reject at connect;
* Sendmail knows the queue id from MAIL on (Postfix from DATA);
* an IPv6 client arrives in Sendmail's uncompressed form (``0:0:0:0:0:0:0:1``), and
  ``{client_addr}`` keeps the ``IPv6:`` tag.

Inserts at a header index above 0 are left to the tests of the index conversion.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from typing import Any

import pytest

from milterbridge.milter.constants import Event
from tests.fakes.webhooks import FakeResponse, FakeWebhooks, RecordedRequest

from .bridge import BridgeRunner, blocking, body_of, decode_b64, header_lines
from .postfix import DEFAULT_HELO, SmtpReply, SmtpResult, SmtpTransaction, make_message
from .sendmail import HOSTNAME, Delivered, SendmailInstance, queue_id_of
from .test_e2e_payload import BODY, HEADERS, _message, _text

pytestmark = pytest.mark.sendmail

SENDER = "alice@example.org"
RCPTS = ["bob@example.net", "carol@example.net"]
LINES = ["custom line one", "custom line two"]
DATE = ("Date", "Mon, 01 Jan 2024 00:00:00 +0000")


def _events(*names: str) -> frozenset[Event]:
    return frozenset(Event(name) for name in names)


def _reply_of(result: SmtpResult, step: str) -> SmtpReply:
    return next(reply for reply in result.replies if reply.step == step)


def _milter_port(milter_listen: str) -> int:
    return int(milter_listen.rsplit(":", 1)[1])


async def _send(
    sendmail: SendmailInstance, rcpts: list[str] | None = None, message: bytes | None = None, **kwargs: Any
) -> SmtpResult:
    rcpts = rcpts or RCPTS
    message = message or make_message(to=rcpts, headers=[DATE])
    return await blocking(sendmail.send, SENDER, rcpts, message, **kwargs)


async def _delivered(sendmail: SendmailInstance, count: int) -> list[Delivered]:
    """Exactly ``count`` copies: wait for them, then make sure no other copy follows."""
    await blocking(sendmail.wait_for_delivery, count)
    await blocking(sendmail.wait_for_empty_queue)
    got = sendmail.delivered()
    assert len(got) == count
    return got


def _nothing_delivered(sendmail: SendmailInstance) -> None:
    assert sendmail.delivered() == []
    assert sendmail.queue_ids() == []
    assert sendmail.quarantined() == {}


# --------------------------------------------------------------------------- decisions per stage

# (event, the SMTP step where the endpoint's reply shows up)
REFUSAL_STAGES = [
    pytest.param("helo", "mail", id="helo"),
    pytest.param("mail", "mail", id="mail"),
    pytest.param("data", "data", id="data"),
    pytest.param("eom", "end_of_data", id="eom"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("event", "step"), REFUSAL_STAGES)
@pytest.mark.parametrize(("action", "code"), [("reject", 550), ("tempfail", 451)])
async def test_refusal_reaches_the_client_with_custom_multiline_text(
    sendmail: SendmailInstance,
    webhooks: FakeWebhooks,
    sendmail_bridges: BridgeRunner,
    event: str,
    step: str,
    action: str,
    code: int,
) -> None:
    """A two-line reject/tempfail refuses at the right SMTP step with the endpoint's code, enhanced code and lines."""
    enhanced = f"{code // 100}.7.1"
    webhooks.set_default(
        FakeResponse.decision(action, reply={"code": code, "enhanced": enhanced, "text": LINES}), event=event
    )
    await sendmail_bridges.start(webhooks.endpoint("policy", events=_events(event)))
    mark = sendmail.log_mark()

    result = await _send(sendmail)

    refusal = _reply_of(result, step)
    lines = [f"{enhanced} {line}" for line in LINES]
    if event == "mail" and action == "reject":
        # Sendmail puts the address in front of a 5xx at MAIL (not of a 4xx).
        lines[0] = f"{enhanced} <{SENDER}>... {LINES[0]}"
    assert refusal.code == code
    assert refusal.text.split("\n") == lines
    assert result.greeting.code == 220
    # After a refusal at HELO, Sendmail still answers EHLO with 250 and refuses from MAIL on.
    assert result.ehlo is not None
    assert result.ehlo.code == 250
    assert not result.accepted
    _nothing_delivered(sendmail)
    assert webhooks.events() == [event]
    # Sendmail logs the reply's lines joined by a literal "\r\n".
    wire = re.escape(f"{code}-{enhanced} {LINES[0]}\\r\\n{code} {enhanced} {LINES[1]}")
    action_at = "" if event == "eom" else f"action={event}, "
    await blocking(sendmail.wait_for_log, rf"milter=bridge, {action_at}reject={wire}", since=mark)


#: Sendmail's own text for a refusal without a reply (the bridge answers a bare reject or tempfail).
BARE_REFUSALS = {
    ("reject", "mail"): (550, f"5.7.1 <{SENDER}>... Command rejected"),
    ("reject", "rcpt"): (550, f"5.7.1 <{RCPTS[0]}>... Command rejected"),
    ("reject", "data"): (550, "5.7.1 Command rejected"),
    # At end-of-message a bare reject is a 554 (Postfix: 550 5.7.1 Command rejected).
    ("reject", "eom"): (554, "5.7.1 Command rejected"),
    **{("tempfail", event): (451, "4.3.2 Please try again later") for event in ("mail", "rcpt", "data", "eom")},
}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("event", "step"), [("mail", "mail"), ("rcpt", "rcpt"), ("data", "data"), ("eom", "end_of_data")]
)
@pytest.mark.parametrize("action", ["reject", "tempfail"])
async def test_refusal_without_a_reply_gets_sendmails_default_text(
    sendmail: SendmailInstance,
    webhooks: FakeWebhooks,
    sendmail_bridges: BridgeRunner,
    event: str,
    step: str,
    action: str,
) -> None:
    """A reject or tempfail without ``reply`` shows Sendmail's default code and text."""
    webhooks.set_default(FakeResponse.decision(action), event=event)
    await sendmail_bridges.start(webhooks.endpoint("policy", events=_events(event)))

    result = await _send(sendmail, RCPTS[:1])

    refusal = _reply_of(result, step)
    assert (refusal.code, refusal.text) == BARE_REFUSALS[action, event]
    _nothing_delivered(sendmail)


# (answer, greeting, the reply to MAIL, Sendmail's log line): the endpoint's text never shows.
CONNECT_REFUSALS = [
    pytest.param(
        {"code": 550, "enhanced": "5.7.1", "text": LINES},
        (554, "mta.test ESMTP not accepting messages"),
        (550, "5.0.0 Command rejected"),
        "rejecting commands",
        id="reject",
    ),
    pytest.param(
        {"code": 451, "enhanced": "4.7.1", "text": LINES},
        (220, "mta.test ESMTP Sendmail 8.17.1.9/8.17.1.9; "),
        (451, "4.3.2 Please try again later"),
        "temp failing commands",
        id="tempfail",
    ),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("reply", "greeting", "mail", "logged"), CONNECT_REFUSALS)
async def test_connect_refusal_shows_sendmails_own_replies(
    sendmail: SendmailInstance,
    webhooks: FakeWebhooks,
    sendmail_bridges: BridgeRunner,
    reply: dict[str, Any],
    greeting: tuple[int, str],
    mail: tuple[int, str],
    logged: str,
) -> None:
    """At connect Sendmail keeps only the class of the answer: its generic greeting and MAIL reply, not the text."""
    action = "reject" if reply["code"] >= 500 else "tempfail"
    webhooks.set_default(FakeResponse.decision(action, reply=reply), event="connect")
    await sendmail_bridges.start(webhooks.endpoint("policy", events=_events("connect")))
    mark = sendmail.log_mark()

    result = await _send(sendmail)

    assert result.greeting.code == greeting[0]
    assert result.greeting.text.startswith(greeting[1])
    assert result.ehlo is not None
    assert result.ehlo.code == 250
    refusal = _reply_of(result, "mail")
    assert (refusal.code, refusal.text) == mail
    assert all("custom" not in r.text for r in result.replies)
    assert not result.accepted
    _nothing_delivered(sendmail)
    assert webhooks.events() == ["connect"]
    # The log has the endpoint's text, and what Sendmail made of it.
    await blocking(
        sendmail.wait_for_log, rf"action=connect, reject={reply['code']}-{reply['enhanced']} custom", since=mark
    )
    await blocking(sendmail.wait_for_log, rf"Milter: connect: host={HOSTNAME}, addr=127\.0\.0\.1, {logged}", since=mark)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("event", "step", "text"),
    [
        # At connect Sendmail sends its own 421 as the greeting.
        pytest.param("connect", "greeting", "4.7.0 mta.test closing connection", id="connect"),
        # At HELO the endpoint's text is shown, with an enhanced code Sendmail adds.
        pytest.param("helo", "ehlo", "4.0.0 going away", id="helo"),
    ],
)
async def test_421_closes_the_session(
    sendmail: SendmailInstance, webhooks: FakeWebhooks, sendmail_bridges: BridgeRunner, event: str, step: str, text: str
) -> None:
    """A 421 tempfail at connect or helo ends the SMTP session at once."""
    webhooks.set_default(FakeResponse.decision("tempfail", reply={"code": 421, "text": "going away"}), event=event)
    await sendmail_bridges.start(webhooks.endpoint("policy", events=_events(event)))

    result = await _send(sendmail)

    closing = _reply_of(result, step)
    assert (closing.code, closing.text) == (421, text)
    assert closing is result.replies[-1]
    assert result.transaction.mail is None
    _nothing_delivered(sendmail)


@pytest.mark.asyncio
@pytest.mark.parametrize(("action", "code", "enhanced"), [("reject", 550, "5.7.1"), ("tempfail", 451, "4.7.1")])
async def test_rcpt_refusal_refuses_only_that_recipient(
    sendmail: SendmailInstance,
    webhooks: FakeWebhooks,
    sendmail_bridges: BridgeRunner,
    action: str,
    code: int,
    enhanced: str,
) -> None:
    """A refusal at rcpt refuses one recipient (text kept, '%' intact); the others are delivered."""

    def per_recipient(request: RecordedRequest) -> FakeResponse:
        if request.json["data"]["address"] == "mallory@example.net":
            reply = {"code": code, "enhanced": enhanced, "text": ["no mail for 100% of mallory", "second line"]}
            return FakeResponse.decision(action, reply=reply)
        return FakeResponse.decision("continue")

    webhooks.set_default(per_recipient, event="rcpt")
    await sendmail_bridges.start(webhooks.endpoint("policy", events=_events("rcpt")))
    rcpts = ["bob@example.net", "mallory@example.net", "carol@example.net"]

    result = await _send(sendmail, rcpts)

    assert [(r.argument, r.code) for r in result.transaction.rcpts] == [
        ("bob@example.net", 250),
        ("mallory@example.net", code),
        ("carol@example.net", 250),
    ]
    # Sendmail puts the recipient in front of a 5xx (sendmail-e2e.md), not of a 4xx.
    prefix = "<mallory@example.net>... " if code >= 500 else ""
    assert result.transaction.rcpts[1].text.split("\n") == [
        f"{enhanced} {prefix}no mail for 100% of mallory",
        f"{enhanced} second line",
    ]
    assert result.accepted
    delivered = await _delivered(sendmail, 2)
    assert sorted(copy.recipient for copy in delivered) == ["bob@example.net", "carol@example.net"]


@pytest.mark.asyncio
@pytest.mark.parametrize("event", ["connect", "helo", "mail", "rcpt", "data", "eom"])
async def test_accept_delivers_and_ends_the_endpoints_events(
    sendmail: SendmailInstance, webhooks: FakeWebhooks, sendmail_bridges: BridgeRunner, event: str
) -> None:
    """accept lets the message through and the endpoint hears nothing more for that scope."""
    webhooks.set_default(FakeResponse.decision("accept"), event=event)
    await sendmail_bridges.start(webhooks.endpoint("policy", events=_events(event, "rcpt", "eom")))

    result = await _send(sendmail)

    assert result.accepted
    delivered = await _delivered(sendmail, 2)
    assert sorted(copy.recipient for copy in delivered) == sorted(RCPTS)
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
    sendmail: SendmailInstance, webhooks: FakeWebhooks, sendmail_bridges: BridgeRunner, event: str
) -> None:
    """discard: the client sees 250 after the dot, yet nothing is delivered or queued."""
    webhooks.set_default(FakeResponse.decision("discard"), event=event)
    await sendmail_bridges.start(webhooks.endpoint("policy", events=_events(event, "eom")))
    mark = sendmail.log_mark()

    result = await _send(sendmail)

    assert [r.code for r in result.transaction.rcpts] == [250, 250]
    assert result.accepted
    queue_id = queue_id_of(result.transaction)
    assert queue_id is not None
    for rcpt in RCPTS:
        await blocking(sendmail.wait_for_log, rf"{queue_id}: to=<{rcpt}>, .*stat=discarded", since=mark)
    _nothing_delivered(sendmail)
    # Like Postfix, Sendmail sends no more events of a discarded message.
    assert webhooks.events().count("eom") == (1 if event == "eom" else 0)


@pytest.mark.asyncio
@pytest.mark.parametrize("event", ["mail", "rcpt", "eom"])
async def test_quarantine_keeps_the_message_in_the_queue(
    sendmail: SendmailInstance, webhooks: FakeWebhooks, sendmail_bridges: BridgeRunner, event: str
) -> None:
    """quarantine: 250 to the client, the message stays queued as quarantined with the reason, nothing is delivered."""
    webhooks.set_default(FakeResponse.decision("quarantine", reason="looks like phishing"), event=event)
    await sendmail_bridges.start(webhooks.endpoint("policy", events=_events(event, "eom")))
    mark = sendmail.log_mark()

    result = await _send(sendmail)

    assert result.accepted
    queue_id = queue_id_of(result.transaction)
    assert queue_id is not None
    await blocking(sendmail.wait_for_log, rf"{queue_id}: milter=bridge, quarantine=looks like phishing", since=mark)
    await blocking(sendmail.wait_for_log, rf"{queue_id}: to=<{RCPTS[-1]}>, .*stat=quarantined", since=mark)
    assert sendmail.quarantined() == {queue_id: "looks like phishing"}
    assert sendmail.queue_ids() == []
    assert sendmail.delivered() == []


# --------------------------------------------------------------------------- modifications


async def _deliver_one(
    sendmail: SendmailInstance,
    webhooks: FakeWebhooks,
    sendmail_bridges: BridgeRunner,
    modifications: list[dict[str, Any]],
    *,
    headers: list[tuple[str, str]],
) -> bytes:
    webhooks.set_default(FakeResponse.decision("continue", modifications=modifications), event="eom")
    await sendmail_bridges.start(webhooks.endpoint("editor"))
    message = make_message(subject="hi", headers=[DATE, *headers])
    result = await _send(sendmail, RCPTS[:1], message)
    assert result.accepted, result.replies
    [copy] = await _delivered(sendmail, 1)
    return copy.raw


#: 8-bit bytes for value_b64: Latin-1 and UTF-8 in one value.
EIGHT_BIT = b"caf\xe9 cr\xe8me / gr\xc3\xbc\xc3\x9fe \xf0\x9f\x91\x8b"


@pytest.mark.asyncio
async def test_header_edits_land_as_asked(
    sendmail: SendmailInstance, webhooks: FakeWebhooks, sendmail_bridges: BridgeRunner
) -> None:
    """insert_header at 0, add_header (folded, and 8-bit value_b64), change_header and delete_header."""
    modifications: list[dict[str, Any]] = [
        # Index 0 is the very top: above Sendmail's own Received header.
        {"op": "insert_header", "index": 0, "name": "X-Top", "value": "top"},
        {"op": "add_header", "name": "X-Folded", "value": "first part\n\tsecond part\n  third part"},
        {"op": "add_header", "name": "X-Eight-Bit", "value_b64": base64.b64encode(EIGHT_BIT).decode()},
        {"op": "change_header", "name": "Subject", "index": 1, "value": "[SPAM] hi"},
        {"op": "delete_header", "name": "X-Spam", "index": 1},
        {"op": "change_header", "name": "X-Spam", "index": 2, "value": "changed second"},
    ]

    raw = await _deliver_one(
        sendmail, webhooks, sendmail_bridges, modifications, headers=[("X-Spam", "one"), ("X-Spam", "two")]
    )

    lines = header_lines(raw)
    assert [name for name, _ in lines] == [
        "X-Top",
        "Received",
        "From",
        "To",
        "Subject",
        "Message-ID",
        "Date",
        "X-Spam",
        "X-Folded",
        "X-Eight-Bit",
    ]
    values = dict(lines)
    assert values["X-Top"] == " top"
    assert values["Subject"] == " [SPAM] hi"
    assert values["X-Spam"] == " changed second"
    assert values["X-Folded"] == " first part\n\tsecond part\n  third part"
    assert f"by {HOSTNAME} (8.17" in values["Received"]
    # The 8-bit bytes are delivered exactly as the endpoint gave them.
    assert b"\nX-Eight-Bit: " + EIGHT_BIT + b"\n" in raw


@pytest.mark.asyncio
async def test_recipient_and_sender_changes_reach_the_envelope(
    sendmail: SendmailInstance, webhooks: FakeWebhooks, sendmail_bridges: BridgeRunner
) -> None:
    """add_rcpt delivers to the new recipient, delete_rcpt removes one, change_from sets the envelope sender."""
    webhooks.set_default(
        FakeResponse.decision(
            "continue",
            modifications=[
                {"op": "change_from", "address": "bounces@example.org"},
                {"op": "delete_rcpt", "address": "carol@example.net"},
                {"op": "add_rcpt", "address": "archive@example.org"},
            ],
        ),
        event="eom",
    )
    await sendmail_bridges.start(webhooks.endpoint("editor"))
    mark = sendmail.log_mark()

    result = await _send(sendmail)

    assert result.accepted
    delivered = await _delivered(sendmail, 2)
    assert sorted(copy.recipient for copy in delivered) == ["archive@example.org", "bob@example.net"]
    # The capture mailer's "From " line carries the envelope sender (no Return-Path: mailer without F=P).
    assert {copy.envelope_from for copy in delivered} == {"bounces@example.org"}
    queue_id = queue_id_of(result.transaction)
    await blocking(sendmail.wait_for_log, rf"{queue_id}: Milter \(bridge\) chgfrom: <bounces@example.org>", since=mark)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("new_body", "delivered"),
    [
        pytest.param(
            b"caf\xe9 \xff\xfe\x80\r\n.leading dot\r\n\r\nlast line\r\n",
            b"caf\xe9 \xff\xfe\x80\n.leading dot\n\nlast line\n",
            id="8bit-dot-empty-line",
        ),
        pytest.param(b"", b"", id="empty"),
        # Like Postfix, Sendmail ends a last line that has no line end.
        pytest.param(b"no line end", b"no line end\n", id="no-final-crlf"),
        pytest.param(b"bare\nline feeds\n", b"bare\nline feeds\n", id="bare-lf"),
    ],
)
async def test_replace_body_is_delivered_byte_for_byte(
    sendmail: SendmailInstance,
    webhooks: FakeWebhooks,
    sendmail_bridges: BridgeRunner,
    new_body: bytes,
    delivered: bytes,
) -> None:
    """A replacement body (8-bit, a leading dot, an empty line, no last line end, LF only) is delivered exactly."""
    modifications = [{"op": "replace_body", "base64": base64.b64encode(new_body).decode()}]

    raw = await _deliver_one(sendmail, webhooks, sendmail_bridges, modifications, headers=[])

    assert body_of(raw) == delivered
    assert dict(header_lines(raw))["Subject"] == " hi"


# --------------------------------------------------------------------------- payloads


def _send_exact(sendmail: SendmailInstance, message: bytes) -> SmtpTransaction:
    with sendmail.smtp_session() as session:
        return session.send(SENDER, RCPTS, message, mail_options=["BODY=8BITMIME"], fix_newlines=False)


@pytest.mark.asyncio
async def test_8bit_and_folded_headers_and_body_reach_the_endpoint_and_the_mailbox(
    sendmail: SendmailInstance, webhooks: FakeWebhooks, sendmail_bridges: BridgeRunner
) -> None:
    """8-bit, folded, unspaced and empty headers and an 8-bit body reach the endpoint and the mailbox exactly."""
    events = _events("connect", "helo", "mail", "rcpt", "header", "eom")
    await sendmail_bridges.start(webhooks.endpoint("recorder", events=events, include_body=True))

    transaction = await blocking(_send_exact, sendmail, _message())

    assert transaction.accepted, transaction
    expected = [(name, value) for _, name, value in HEADERS]
    per_event = [
        (_text(r.json["data"], "name"), _text(r.json["data"], "value")) for r in webhooks.requests_for(event="header")
    ]
    assert per_event == expected
    [eom] = webhooks.requests_for(event="eom")
    # Sendmail's own Received header is not shown to milters either.
    assert [(_text(h, "name"), _text(h, "value")) for h in eom.json["message"]["headers"]] == expected
    assert decode_b64(eom.json["message"]["body"]["base64"]) == BODY
    # Sendmail knows the queue id from MAIL on (Postfix only from DATA).
    queue_id = queue_id_of(transaction)
    assert eom.json["message"]["queue_id"] == queue_id
    [mail] = webhooks.requests_for(event="mail")
    assert mail.json["message"]["queue_id"] == queue_id
    assert mail.json["data"] == {"address": SENDER, "raw": f"<{SENDER}>", "args": ["BODY=8BITMIME"]}
    [connect] = webhooks.requests_for(event="connect")
    macros = connect.json["session"]["macros"]
    assert connect.json["data"]["address"] == "127.0.0.1"
    assert connect.json["data"]["family"] == "inet"
    assert connect.json["data"]["name"] == HOSTNAME
    assert macros["v"] == "8.17.1.9"
    assert macros["j"] == HOSTNAME
    assert macros["{daemon_name}"] == "MTA"
    assert macros["{client_addr}"] == "127.0.0.1"
    assert webhooks.requests_for(event="helo")[0].json["data"] == {"hostname": DEFAULT_HELO}
    delivered = await _delivered(sendmail, 2)
    for copy in delivered:
        # Every header as sent (folds and 8-bit bytes kept), below Sendmail's Received header.
        head, body = copy.raw.split(b"\n\n", 1)
        assert head.split(b"\n", 3)[0].startswith(b"Received: ")
        sent_head = b"\n".join(line for line, _, _ in HEADERS).replace(b"\r\n", b"\n")
        assert head.endswith(b"\n" + sent_head)
        assert body == BODY.replace(b"\r\n", b"\n")


BIG_LINE = b"%07d 0123456789abcdefghijklmnopqrstuvwxyz \xe9\xe8\xff ABCDEFGHIJKLMNOPQRSTUVWXYZ\r\n"


def _big_body(mebibytes: int, line: bytes = BIG_LINE) -> bytes:
    body = b"".join(line % n for n in range(mebibytes * 1024 * 1024 // len(line % 0) + 1))
    assert len(body) >= mebibytes * 1024 * 1024
    return body


@pytest.mark.asyncio
async def test_large_body_reaches_the_endpoint_whole_and_can_be_replaced(
    sendmail: SendmailInstance, webhooks: FakeWebhooks, sendmail_bridges: BridgeRunner
) -> None:
    """A 3 MiB body (about 50 chunks of 64 KiB) arrives whole with include_body; a 2 MiB replace_body is delivered."""
    body = _big_body(3)
    replacement = _big_body(2, b"%07d replaced \xc3\xa9\r\n")

    def digest_and_replace(request: RecordedRequest) -> FakeResponse:
        got = decode_b64(request.json["message"]["body"]["base64"])
        modifications = [
            {"op": "add_header", "name": "X-Body", "value": f"{len(got)} {hashlib.sha256(got).hexdigest()}"},
            {"op": "replace_body", "base64": base64.b64encode(replacement).decode()},
        ]
        return FakeResponse.decision("continue", modifications=modifications)

    webhooks.set_default(digest_and_replace, event="eom")
    endpoint = webhooks.endpoint("scanner", include_body=True, timeout=10.0, max_response_bytes=8 * 1024 * 1024)
    await sendmail_bridges.start(endpoint)
    head = make_message(subject="big", headers=[DATE]).split(b"\r\n\r\n", 1)[0]

    def send() -> SmtpTransaction:
        with sendmail.smtp_session() as session:
            return session.send(
                SENDER, RCPTS[:1], head + b"\r\n\r\n" + body, mail_options=["BODY=8BITMIME"], fix_newlines=False
            )

    transaction = await blocking(send)

    assert transaction.accepted, transaction
    [eom] = webhooks.requests_for(event="eom")
    assert eom.json["message"]["body"]["size"] == len(body)
    [copy] = await _delivered(sendmail, 1)
    assert dict(header_lines(copy.raw))["X-Body"] == f" {len(body)} {hashlib.sha256(body).hexdigest()}"
    assert body_of(copy.raw) == replacement.replace(b"\r\n", b"\n")


# --------------------------------------------------------------------------- keep-alives and failures


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("progress_interval", "outcome"),
    [
        pytest.param(0.5, (550, "5.7.1 slow but sure"), id="keepalives"),
        # The control case: no progress within R, so Sendmail gives up and applies F=T.
        pytest.param(10.0, (451, "4.3.2 Please try again later"), id="no-keepalives"),
    ],
)
async def test_progress_keepalives_outlast_sendmails_reply_timeout(
    sendmail: SendmailInstance,
    webhooks: FakeWebhooks,
    sendmail_bridges: BridgeRunner,
    milter_listen: str,
    progress_interval: float,
    outcome: tuple[int, str],
) -> None:
    """An eom endpoint slower than Sendmail's R=2s still decides, because the bridge sends progress."""
    await blocking(sendmail.set_milter, _milter_port(milter_listen), timeouts="S:10s;R:2s;E:5m")
    reply = {"code": 550, "enhanced": "5.7.1", "text": "slow but sure"}
    webhooks.set_default(FakeResponse.decision("reject", reply=reply).after(3.0), event="eom")
    await sendmail_bridges.start(
        webhooks.endpoint("slow", timeout=5.0), server={"progress_interval": progress_interval}
    )
    mark = sendmail.log_mark()

    result = await _send(sendmail, RCPTS[:1])

    end = result.transaction.end_of_data
    assert end is not None
    assert (end.code, end.text) == outcome
    _nothing_delivered(sendmail)
    if progress_interval > 2:
        await blocking(sendmail.wait_for_log, r"Milter \(bridge\): timeout before data read, where=eom", since=mark)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("flags", "greeting", "mail", "logged"),
    [
        pytest.param("T", 220, (451, "4.3.2 Please try again later"), "temp failing commands", id="F=T"),
        # F=R refuses like a reject at connect: a 554 greeting, then Sendmail's generic 550.
        pytest.param("R", 554, (550, "5.0.0 Command rejected"), "rejecting commands", id="F=R"),
    ],
)
async def test_bridge_down_applies_the_filters_flag(
    sendmail: SendmailInstance,
    webhooks: FakeWebhooks,
    sendmail_bridges: BridgeRunner,
    milter_listen: str,
    flags: str,
    greeting: int,
    mail: tuple[int, str],
    logged: str,
) -> None:
    """With the bridge gone, F=T tempfails and F=R rejects every MAIL; nothing is delivered."""
    await blocking(sendmail.set_milter, _milter_port(milter_listen), flags=flags)
    bridge = await sendmail_bridges.start(webhooks.endpoint("policy"))
    await bridge.stop()
    mark = sendmail.log_mark()

    result = await _send(sendmail)

    assert result.greeting.code == greeting
    refusal = result.transaction.mail
    assert refusal is not None
    assert (refusal.code, refusal.text) == mail
    assert result.transaction.rcpts == ()
    _nothing_delivered(sendmail)
    assert webhooks.requests == []
    await blocking(
        sendmail.wait_for_log, r"Milter \(bridge\): error connecting to filter: Connection refused", since=mark
    )
    await blocking(sendmail.wait_for_log, rf"Milter: initialization failed, {logged}", since=mark)


# --------------------------------------------------------------------------- sessions


@pytest.mark.asyncio
async def test_several_messages_in_one_session_get_their_own_decisions(
    sendmail: SendmailInstance, webhooks: FakeWebhooks, sendmail_bridges: BridgeRunner
) -> None:
    """Messages over one connection, one abandoned at RSET: each its own decision, message id and queue id."""

    def by_subject(request: RecordedRequest) -> FakeResponse:
        subject = next(h["value"] for h in request.json["message"]["headers"] if h["name"] == "Subject")
        if subject == " refuse me":
            return FakeResponse.decision("reject", reply={"code": 554, "enhanced": "5.7.1", "text": "refused"})
        return FakeResponse.decision(
            "continue", modifications=[{"op": "add_header", "name": "X-Seen", "value": subject.strip()}]
        )

    webhooks.set_default(by_subject, event="eom")
    events = _events("mail", "eom", "abort", "close")
    await sendmail_bridges.start(webhooks.endpoint("policy", events=events))

    def messages() -> tuple[list[SmtpTransaction], list[SmtpReply | None]]:
        with sendmail.smtp_session() as session:
            first = session.send(SENDER, ["bob@example.net"], make_message(subject="refuse me", headers=[DATE]))
            second = session.send(SENDER, ["carol@example.net"], make_message(subject="second", headers=[DATE]))
            # A transaction the client abandons: MAIL, then RSET.
            abandoned = [session.command("MAIL FROM:<abandoned@example.org>"), session.command("RSET")]
            third = session.send(SENDER, ["dave@example.net"], make_message(subject="third", headers=[DATE]))
        return [first, second, third], abandoned

    (first, second, third), abandoned = await blocking(messages)

    assert first.end_of_data is not None
    assert (first.end_of_data.code, first.end_of_data.text) == (554, "5.7.1 refused")
    assert second.accepted
    assert [reply.code if reply else None for reply in abandoned] == [250, 250]
    assert third.accepted
    delivered = await _delivered(sendmail, 2)
    assert sorted((c.recipient, dict(header_lines(c.raw))["X-Seen"]) for c in delivered) == [
        ("carol@example.net", " second"),
        ("dave@example.net", " third"),
    ]
    await webhooks.wait_for(1, event="close")
    mails = webhooks.requests_for(event="mail")
    eoms = webhooks.requests_for(event="eom")
    [abort] = webhooks.requests_for(event="abort")
    assert [r.json["data"]["address"] for r in mails] == [SENDER, SENDER, "abandoned@example.org", SENDER]
    assert len(eoms) == 3
    # One session id for the connection, a new message id per transaction (the abandoned one too).
    assert len({r.json["session"]["id"] for r in webhooks.requests}) == 1
    message_ids = [r.json["message"]["id"] for r in mails]
    assert len(set(message_ids)) == 4
    assert [r.json["message"]["id"] for r in eoms] == [message_ids[0], message_ids[1], message_ids[3]]
    assert abort.json["message"]["id"] == message_ids[2]
    # Sendmail has the queue id from MAIL on; every transaction gets its own.
    queue_ids = [r.json["message"]["queue_id"] for r in mails]
    assert [r.json["message"]["queue_id"] for r in eoms] == [queue_ids[0], queue_ids[1], queue_ids[3]]
    assert [queue_ids[1], queue_ids[3]] == [queue_id_of(second), queue_id_of(third)]
    assert len(set(queue_ids)) == 4
    assert [r.event for r in webhooks.requests if r.event in ("abort", "close")] == ["abort", "close"]


# --------------------------------------------------------------------------- IPv6


@pytest.mark.asyncio
async def test_ipv6_client_through_sendmail(
    sendmail: SendmailInstance, webhooks: FakeWebhooks, sendmail_bridges: BridgeRunner
) -> None:
    """A client on ::1: the payload's address is ``::1`` (no IPv6: tag, compressed); the macros are as
    Sendmail sent them."""
    if sendmail.smtp6_port is None:
        reason = "this machine has no IPv6 loopback (::1), so the IPv6 Sendmail test cannot run"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true, but {reason}", pytrace=False)
        pytest.skip(f"IPV6 SENDMAIL TEST SKIPPED: {reason}")
    await sendmail_bridges.start(webhooks.endpoint("policy", events=_events("connect", "eom")))

    result = await _send(sendmail, RCPTS[:1], ipv6=True)

    assert result.accepted
    [connect] = webhooks.requests_for(event="connect")
    client = connect.json["data"]
    assert client["family"] == "inet6"
    # Bare and compressed, as Postfix sends it, though Sendmail sends IPv6:0:0:0:0:0:0:0:1.
    assert client["address"] == "::1"
    # The name is the one the instance's hosts file gives ::1.
    assert client["name"] == "localhost"
    assert isinstance(client["port"], int)
    assert connect.json["session"]["client"] == client
    macros = connect.json["session"]["macros"]
    # Sendmail writes IPv6 addresses uncompressed and tags them in its macros.
    assert macros["{client_addr}"] == "IPv6:0:0:0:0:0:0:0:1"
    assert macros["{client_name}"] == "localhost"
    assert macros["_"] == "localhost [IPv6:0:0:0:0:0:0:0:1]"
    assert macros["{daemon_name}"] == "MTA-v6"
    assert macros["{daemon_addr}"] == "IPv6:0:0:0:0:0:0:0:1"
    [eom] = webhooks.requests_for(event="eom")
    assert eom.json["session"]["client"] == client
    [copy] = await _delivered(sendmail, 1)
    assert b"(localhost [IPv6:0:0:0:0:0:0:0:1])" in copy.raw


@pytest.mark.asyncio
async def test_mail_and_rcpt_macros_are_as_sendmail_sends_them(
    sendmail: SendmailInstance, webhooks: FakeWebhooks, sendmail_bridges: BridgeRunner
) -> None:
    """The message macros docs/sendmail.md lists: the queue id from MAIL on, the sender's and each
    recipient's address and mailer as Sendmail resolved them (here its test mailer, with no host)."""
    await sendmail_bridges.start(webhooks.endpoint("policy", events=_events("mail", "rcpt", "eom")))

    result = await _send(sendmail, RCPTS[:1])

    assert result.accepted
    [mail] = webhooks.requests_for(event="mail")
    [rcpt] = webhooks.requests_for(event="rcpt")
    [eom] = webhooks.requests_for(event="eom")
    sender = {"{mail_addr}": SENDER, "{mail_host}": "", "{mail_mailer}": "capture"}
    recipient = {"{rcpt_addr}": RCPTS[0], "{rcpt_host}": "", "{rcpt_mailer}": "capture"}
    queue_id = mail.json["message"]["macros"]["i"]
    assert queue_id == queue_id_of(result.transaction)
    assert mail.json["message"]["macros"] == {"i": queue_id, **sender}
    assert rcpt.json["message"]["macros"] == {"i": queue_id, **sender, **recipient}
    assert eom.json["message"]["macros"] == {"i": queue_id, **sender, **recipient}
    await _delivered(sendmail, 1)  # delivered before the next test empties the queue (else: a bounce to come)


@pytest.mark.asyncio
async def test_an_mta_hooks_scanner_filters_sendmails_mail(
    sendmail: SendmailInstance, sendmail_bridges: BridgeRunner
) -> None:
    """A registered MTA Hooks scanner (tests/fakes/hooks_scanner.py) behind Sendmail: a header added, a reject."""
    from milterbridge.settings import EndpointProtocol, EndpointSettings
    from tests.fakes.hooks_scanner import TOKEN, HooksScanner

    def answer(request: dict[str, Any]) -> dict[str, Any]:
        subject = next(h["value"].strip() for h in request["message"]["headers"] if h["name"] == "Subject")
        if subject == "bad":
            response = {"code": 550, "enhancedCode": "5.7.1", "message": "scanner says no"}
            return {"set": [{"path": "/action", "value": "reject"}, {"path": "/response", "value": response}]}
        return {"add": [{"path": "/message/headers", "value": {"name": "X-Scanned", "value": " yes"}}]}

    async with HooksScanner(answer=answer) as scanner:
        endpoint = EndpointSettings(
            name="scanner",
            url=scanner.url(),
            protocol=EndpointProtocol.MTA_HOOKS,
            headers=(("Authorization", f"Bearer {TOKEN}"),),
            include_body=True,
        )
        await sendmail_bridges.start(endpoint)
        refused = await _send(sendmail, RCPTS[:1], make_message(to=RCPTS[:1], subject="bad"))
        result = await _send(sendmail, RCPTS[:1], make_message(to=RCPTS[:1], subject="good"))

        assert (_reply_of(refused, "end_of_data").code, _reply_of(refused, "end_of_data").text) == (
            550,
            "5.7.1 scanner says no",
        )
        assert result.accepted
        [copy] = await _delivered(sendmail, 1)
        assert ("X-Scanned", " yes") in header_lines(copy.raw)
        data = scanner.calls[-1][2]
        assert data["stage"] == "data"
        assert data["queue"]["id"]
        assert scanner.violations == []
