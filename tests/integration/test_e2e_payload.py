"""What the webhook sees is what Postfix sent: client, HELO, envelope, headers and body, byte for byte.

One SMTP session with known bytes goes through Postfix; an endpoint subscribed to every
event records the payloads. Text that is not UTF-8 arrives as replacement text plus an exact
``*_b64`` sibling (``payload.py``, and the spec); bodies are always base64.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from milterbridge.config import EndpointSettings
from milterbridge.milter.constants import Event
from tests.fakes.webhooks import FakeResponse, FakeWebhooks, RecordedRequest

from .bridge import BridgeRunner, blocking, decode_b64, smtp
from .postfix import DEFAULT_HELO, PostfixInstance, SmtpTransaction, make_message

pytestmark = pytest.mark.postfix

SENDER = "alice@example.org"
RCPTS = ["bob@example.net", "carol@example.net"]

#: Header lines as sent (CRLF), and the (name, value) each one must reach the endpoint as:
#: the leading space kept (HDR_LEADSPC), folds joined with LF, 8-bit bytes untouched.
HEADERS: list[tuple[bytes, bytes, bytes]] = [
    (b"From: Alice <alice@example.org>", b"From", b" Alice <alice@example.org>"),
    (b"To: bob@example.net, carol@example.net", b"To", b" bob@example.net, carol@example.net"),
    (
        b"Subject: a folded\r\n\tsubject line\r\n  with two folds",
        b"Subject",
        b" a folded\n\tsubject line\n  with two folds",
    ),
    (b"Message-ID: <payload-1@client.milterbridge.test>", b"Message-ID", b" <payload-1@client.milterbridge.test>"),
    (b"Date: Mon, 01 Jan 2024 00:00:00 +0000", b"Date", b" Mon, 01 Jan 2024 00:00:00 +0000"),
    (b"X-Latin1: caf\xe9 cr\xe8me", b"X-Latin1", b" caf\xe9 cr\xe8me"),
    ("X-Utf8: grüße 👋".encode(), b"X-Utf8", " grüße 👋".encode()),
    (b"X-No-Space:tight", b"X-No-Space", b"tight"),
    (b"X-Two-Spaces:  padded ", b"X-Two-Spaces", b"  padded "),
    (b"X-Empty:", b"X-Empty", b""),
]
#: The body as Postfix hands it to milters: CRLF line ends, dots unstuffed, 8-bit kept.
BODY = b"first line\r\n.a line that starts with a dot\r\n\r\n8-bit: \xe9\xff\x80\r\n\ttabbed\r\nlast line\r\n"


def _message() -> bytes:
    head = b"\r\n".join(line for line, _, _ in HEADERS)
    return head + b"\r\n\r\n" + BODY


def _text(obj: dict[str, Any], key: str) -> bytes:
    """The exact bytes of a text field: ``key_b64`` when present, else the UTF-8 text."""
    if f"{key}_b64" in obj:
        return decode_b64(obj[f"{key}_b64"])
    value = obj[key]
    assert isinstance(value, str)
    return value.encode()


def _send(mta: PostfixInstance) -> SmtpTransaction:
    with mta.smtp_session() as session:
        return session.send(
            SENDER,
            RCPTS,
            _message(),
            mail_options=["BODY=8BITMIME"],
            rcpt_options=["NOTIFY=SUCCESS,DELAY"],
            fix_newlines=False,
        )


@pytest.fixture
def recorder(webhooks: FakeWebhooks) -> EndpointSettings:
    """An endpoint that subscribes to every decision event, gets the body and extra macros."""
    events = frozenset(Event(name) for name in ("connect", "helo", "mail", "rcpt", "data", "header", "eoh", "eom"))
    return webhooks.endpoint("recorder", events=events, include_body=True, macros=("{daemon_port}", "{client_port}"))


def _one(webhooks: FakeWebhooks, event: str) -> dict[str, Any]:
    [request] = webhooks.requests_for(event=event)
    document: dict[str, Any] = request.json
    return document


@pytest.mark.asyncio
async def test_envelope_and_client_as_postfix_sent_them(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner, recorder: EndpointSettings
) -> None:
    """connect/helo/mail/rcpt payloads carry the client address, HELO name, sender and recipients with args."""
    await bridges.start(recorder)

    transaction = await blocking(_send, mta)

    assert transaction.accepted
    connect = _one(webhooks, "connect")
    client = connect["data"]
    assert client["address"] == "127.0.0.1"
    assert client["family"] == "inet"
    assert isinstance(client["port"], int)
    assert client["port"] > 0
    # Without a verified name (smtpd_peername_lookup = no) Postfix puts the bracketed address
    # in the CONNECT packet, sendmail style, while the {client_name} macro says "unknown".
    assert client["name"] == "[127.0.0.1]"
    assert connect["session"]["macros"]["{client_name}"] == "unknown"
    assert connect["session"]["client"] == client
    assert connect["message"] is None
    assert connect["session"]["macros"]["{client_addr}"] == "127.0.0.1"
    assert connect["session"]["macros"]["j"] == "mta.milterbridge.test"
    assert connect["session"]["macros"]["{daemon_port}"] == str(mta.smtp_port)
    assert connect["session"]["macros"]["{client_port}"] == str(client["port"])

    helo = _one(webhooks, "helo")
    assert helo["data"] == {"hostname": DEFAULT_HELO}
    assert helo["session"]["helo"] == DEFAULT_HELO

    mail = _one(webhooks, "mail")
    assert mail["data"]["address"] == SENDER
    assert mail["data"]["raw"] == f"<{SENDER}>"
    assert mail["data"]["args"] == ["BODY=8BITMIME"]
    # Postfix never has the queue id at MAIL (milter-protocol.md §8.3).
    assert mail["message"]["queue_id"] is None
    assert mail["session"]["helo"] == DEFAULT_HELO

    rcpt_requests = webhooks.requests_for(event="rcpt")
    assert [r.json["data"]["address"] for r in rcpt_requests] == RCPTS
    assert [r.json["data"]["raw"] for r in rcpt_requests] == [f"<{a}>" for a in RCPTS]
    assert all(r.json["data"]["args"] == ["NOTIFY=SUCCESS,DELAY"] for r in rcpt_requests)
    # At rcpt the list already ends with the recipient being decided.
    assert [[a["address"] for a in r.json["message"]["rcpt_to"]] for r in rcpt_requests] == [RCPTS[:1], RCPTS]

    eom = _one(webhooks, "eom")
    assert eom["message"]["mail_from"]["address"] == SENDER
    assert [a["address"] for a in eom["message"]["rcpt_to"]] == RCPTS
    assert eom["session"]["client"] == client


@pytest.mark.asyncio
async def test_headers_arrive_byte_exact(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner, recorder: EndpointSettings
) -> None:
    """Folded, 8-bit, UTF-8, unspaced and empty headers reach the endpoint exactly, per event and in the list."""
    await bridges.start(recorder)

    transaction = await blocking(_send, mta)

    assert transaction.accepted
    expected = [(name, value) for _, name, value in HEADERS]
    per_event = [(_text(r.json["data"], "name"), _text(r.json["data"], "value")) for r in _requests(webhooks, "header")]
    assert per_event == expected
    listed = [(_text(h, "name"), _text(h, "value")) for h in _one(webhooks, "eom")["message"]["headers"]]
    # Postfix's own Received header is never shown to milters.
    assert listed == expected
    latin1 = next(h for h in _one(webhooks, "eom")["message"]["headers"] if h["name"] == "X-Latin1")
    assert latin1["value"] == " caf\ufffd cr\ufffdme"
    utf8 = next(h for h in _one(webhooks, "eom")["message"]["headers"] if h["name"] == "X-Utf8")
    assert "value_b64" not in utf8


@pytest.mark.asyncio
async def test_body_and_queue_id_at_end_of_message(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner, recorder: EndpointSettings
) -> None:
    """include_body gives the body exactly as Postfix sent it; queue_id at eom is the one the client was told."""
    await bridges.start(recorder)

    transaction = await blocking(_send, mta)

    assert transaction.accepted
    eom = _one(webhooks, "eom")
    body = eom["message"]["body"]
    assert base64.b64decode(body["base64"], validate=True) == BODY
    assert body["size"] == len(BODY)
    assert not body.get("truncated", False)
    assert transaction.queue_id is not None
    assert eom["message"]["queue_id"] == transaction.queue_id
    assert eom["message"]["macros"]["i"] == transaction.queue_id
    # Postfix has the queue id from DATA on; the body is sent only at eom.
    assert _one(webhooks, "data")["message"]["queue_id"] == transaction.queue_id
    assert all("body" not in (r.json["message"] or {}) for r in webhooks.requests if r.event != "eom")
    assert webhooks.events() == [
        "connect",
        "helo",
        "mail",
        "rcpt",
        "rcpt",
        "data",
        *["header"] * len(HEADERS),
        "eoh",
        "eom",
    ]


@pytest.mark.asyncio
async def test_refused_recipient_is_left_out_of_later_payloads(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    """A recipient the endpoint refused at rcpt is missing from the eom payload's rcpt_to."""

    def refuse_carol(request: RecordedRequest) -> FakeResponse:
        if request.json["data"]["address"] == "carol@example.net":
            return FakeResponse.decision("reject")
        return FakeResponse.decision("continue")

    webhooks.set_default(refuse_carol, event="rcpt")
    await bridges.start(webhooks.endpoint("recorder", events=frozenset({Event.RCPT, Event.EOM})))
    rcpts = ["bob@example.net", "carol@example.net", "dave@example.net"]

    result = await smtp(mta, SENDER, rcpts, make_message(to=rcpts))

    assert [r.code for r in result.transaction.rcpts] == [250, 550, 250]
    assert result.accepted
    eom = _one(webhooks, "eom")
    assert [a["address"] for a in eom["message"]["rcpt_to"]] == ["bob@example.net", "dave@example.net"]


def _requests(webhooks: FakeWebhooks, event: str) -> list[RecordedRequest]:
    return webhooks.requests_for(event=event)


@pytest.mark.asyncio
async def test_abort_and_close_notifications_follow_postfix(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    """One abort for the transaction that ended at RSET, none for complete messages, one close per session."""

    def refuse_nobody(request: RecordedRequest) -> FakeResponse:
        if request.json["data"]["address"] == "nobody@example.net":
            return FakeResponse.decision("reject")
        return FakeResponse.decision("continue")

    webhooks.set_default(refuse_nobody, event="rcpt")
    events = frozenset({Event.RCPT, Event.EOM, Event.ABORT, Event.CLOSE})
    await bridges.start(webhooks.endpoint("lifecycle", events=events))

    def three_transactions() -> list[SmtpTransaction]:
        with mta.smtp_session() as session:
            return [
                session.send(SENDER, ["bob@example.net"], make_message(subject="one")),
                # Every recipient refused: the client sends RSET and Postfix aborts the transaction.
                session.send(SENDER, ["nobody@example.net"], make_message(subject="never")),
                session.send(SENDER, ["carol@example.net"], make_message(subject="two")),
            ]

    first, refused, second = await blocking(three_transactions)

    assert first.accepted
    assert second.accepted
    assert refused.data is None
    await webhooks.wait_for(1, event="close")
    [abort] = webhooks.requests_for(event="abort")
    assert abort.json["message"]["mail_from"]["address"] == SENDER
    assert abort.json["message"]["rcpt_to"] == []
    notified = [r.event for r in webhooks.requests if r.event in ("eom", "abort", "close")]
    # Notifications run in the background, so only the counts and the final close are fixed.
    assert sorted(notified) == ["abort", "close", "eom", "eom"]
    assert notified[-1] == "close"
