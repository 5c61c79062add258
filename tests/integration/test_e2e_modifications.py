"""Every modification an endpoint can ask for, as it ends up in the message Postfix delivers.

Header indexes in a decision refer to ``message.headers`` as the endpoint received it; the
bridge converts them to Postfix's numbering, which counts Postfix's own Received header for
inserts and shifts after every delete (``milter-protocol.md`` §6.1). These tests read the
delivered Maildir file (and, for envelope details, ``postcat -e`` of a held copy).
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from tests.fakes.webhooks import FakeResponse, FakeWebhooks

from .bridge import BridgeRunner, blocking, body_of, header_lines, parse, smtp
from .postfix import PostfixInstance, make_message

pytestmark = pytest.mark.postfix

SENDER = "alice@example.org"
DATE = ("Date", "Mon, 01 Jan 2024 00:00:00 +0000")
#: Added by virtual(8) at delivery, above everything else.
DELIVERY_HEADERS = ["Return-Path", "X-Original-To", "Delivered-To"]


def _eom_endpoint(webhooks: FakeWebhooks, modifications: list[dict[str, Any]], action: str = "continue") -> None:
    webhooks.set_default(FakeResponse.decision(action, modifications=modifications, reason="held"), event="eom")


async def _deliver_one(
    mta: PostfixInstance,
    webhooks: FakeWebhooks,
    bridges: BridgeRunner,
    modifications: list[dict[str, Any]],
    *,
    headers: list[tuple[str, str]],
) -> bytes:
    _eom_endpoint(webhooks, modifications)
    await bridges.start(webhooks.endpoint("editor"))
    result = await smtp(mta, SENDER, ["bob@example.net"], make_message(subject="hi", headers=[DATE, *headers]))
    assert result.accepted
    [(_, raw)] = await blocking(mta.wait_for_delivery, 1)
    return raw


@pytest.mark.asyncio
async def test_header_edits_keep_order_and_values(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    """Insert (top and middle), add (folded), change and delete land where and as the endpoint said."""
    modifications: list[dict[str, Any]] = [
        # Index 0 is the very top: above Postfix's own Received header.
        {"op": "insert_header", "index": 0, "name": "X-Top", "value": "top"},
        # After the 2nd header the endpoint saw (To), not after Postfix's Received.
        {"op": "insert_header", "index": 2, "name": "X-After-To", "value": "after to"},
        {"op": "add_header", "name": "X-Added", "value": "first part\n\tsecond part"},
        {"op": "change_header", "name": "Subject", "index": 1, "value": "[SPAM] hi"},
        # Both refer to the headers as sent: deleting #1 first must not shift #2.
        {"op": "delete_header", "name": "X-Spam", "index": 1},
        {"op": "change_header", "name": "X-Spam", "index": 2, "value": "changed second"},
        {"op": "delete_header", "name": "X-Tracking", "index": 1},
        {"op": "delete_header", "name": "X-Tracking", "index": 2},
    ]
    raw = await _deliver_one(
        mta,
        webhooks,
        bridges,
        modifications,
        headers=[("X-Spam", "one"), ("X-Spam", "two"), ("X-Tracking", "a"), ("X-Tracking", "b")],
    )

    lines = header_lines(raw)
    assert [name for name, _ in lines] == [
        *DELIVERY_HEADERS,
        "X-Top",
        "Received",
        "From",
        "To",
        "X-After-To",
        "Subject",
        "Message-ID",
        "Date",
        "X-Spam",
        "X-Added",
    ]
    values = dict(lines)
    # A value without leading whitespace gets one space; folds are kept, with LF on the wire.
    assert values["X-Top"] == " top"
    assert values["X-After-To"] == " after to"
    assert values["Subject"] == " [SPAM] hi"
    assert values["X-Spam"] == " changed second"
    assert values["X-Added"] == " first part\n\tsecond part"
    assert "(Postfix) with ESMTP id" in values["Received"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("modifications", "expected"),
    [
        pytest.param(
            [
                {"op": "change_header", "name": "X-A", "index": 3, "value": "three"},
                {"op": "delete_header", "name": "X-A", "index": 1},
                {"op": "delete_header", "name": "X-A", "index": 2},
            ],
            [("X-B", " 1"), ("X-A", " three")],
            id="delete-lower-indexes-then-change-a-higher-one",
        ),
        pytest.param(
            [{"op": "insert_header", "index": 9, "name": "X-Last-Seen", "value": "end"}],
            [("X-A", " 1"), ("X-A", " 2"), ("X-B", " 1"), ("X-A", " 3"), ("X-Last-Seen", " end")],
            id="insert-after-the-last-header",
        ),
        pytest.param(
            [
                {"op": "insert_header", "index": 7, "name": "X-New", "value": "new"},
                {"op": "add_header", "name": "X-A", "value": "added"},
                {"op": "change_header", "name": "X-A", "index": 2, "value": "second"},
            ],
            [("X-A", " 1"), ("X-A", " second"), ("X-New", " new"), ("X-B", " 1"), ("X-A", " 3"), ("X-A", " added")],
            id="insert-and-add-do-not-shift-change-indexes",
        ),
        pytest.param(
            [
                {"op": "change_header", "name": "x-b", "index": 1, "value": "lower-case name matches"},
                {"op": "change_header", "name": "X-Missing", "index": 1, "value": "appended"},
                {"op": "delete_header", "name": "X-Nothing", "index": 1},
            ],
            # Postfix rewrites the whole line, so the name takes the endpoint's spelling.
            [
                ("X-A", " 1"),
                ("X-A", " 2"),
                ("x-b", " lower-case name matches"),
                ("X-A", " 3"),
                ("X-Missing", " appended"),
            ],
            id="change-ignores-case-and-a-missing-one-is-appended",
        ),
    ],
)
async def test_header_index_conversion(
    mta: PostfixInstance,
    webhooks: FakeWebhooks,
    bridges: BridgeRunner,
    modifications: list[dict[str, Any]],
    expected: list[tuple[str, str]],
) -> None:
    """Indexes that refer to the endpoint's header list give the same result in Postfix's numbering."""
    raw = await _deliver_one(
        mta,
        webhooks,
        bridges,
        modifications,
        headers=[("X-A", "1"), ("X-A", "2"), ("X-B", "1"), ("X-A", "3")],
    )

    # From, To, Subject, Message-ID, Date come first (5 headers), then the ones under test.
    lines = header_lines(raw)
    received = [name for name, _ in lines].index("Received")
    assert [name for name, _ in lines[received + 1 : received + 6]] == ["From", "To", "Subject", "Message-ID", "Date"]
    assert lines[received + 6 :] == expected


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("new_body", "delivered"),
    [
        pytest.param(
            b"caf\xe9 \xff\xfe\x80\r\n.leading dot\r\n\r\nlast line\r\n",
            b"caf\xe9 \xff\xfe\x80\n.leading dot\n\nlast line\n",
            id="8bit-dot-empty-line",
        ),
        # Postfix still writes a last line that has no line end (milter-protocol.md §8.7).
        pytest.param(b"no line end", b"no line end\n", id="no-final-crlf"),
        # Source-derived in milter-protocol.md §8.7: one empty 'b' packet empties the body.
        pytest.param(b"", b"", id="empty"),
        # Longer than line_length_limit (2048): stored as continuation records, delivered whole.
        pytest.param(b"x" * 5000 + b"\r\nend\r\n", b"x" * 5000 + b"\nend\n", id="long-line"),
    ],
)
async def test_replace_body_is_delivered_byte_for_byte(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner, new_body: bytes, delivered: bytes
) -> None:
    """A replacement body (8-bit bytes, leading dot, empty, long lines) is delivered exactly, with LF line ends."""
    modifications = [{"op": "replace_body", "base64": base64.b64encode(new_body).decode()}]

    raw = await _deliver_one(mta, webhooks, bridges, modifications, headers=[])

    # Postfix stores lines without CR and virtual(8) writes them with LF.
    assert body_of(raw) == delivered
    assert parse(raw)["Subject"] == "hi"


@pytest.mark.asyncio
async def test_recipient_and_sender_changes_reach_the_envelope(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    """add_rcpt, delete_rcpt and change_from decide who gets the message and its Return-Path."""
    _eom_endpoint(
        webhooks,
        [
            {"op": "change_from", "address": "bounces@example.org"},
            {"op": "delete_rcpt", "address": "carol@example.net"},
            {"op": "add_rcpt", "address": "archive@example.org"},
        ],
    )
    await bridges.start(webhooks.endpoint("editor"))
    rcpts = ["bob@example.net", "carol@example.net"]

    result = await smtp(mta, SENDER, rcpts, make_message(to=rcpts))

    assert result.accepted
    await blocking(mta.wait_for_delivery, 2)
    assert await blocking(mta.wait_for_queue_idle) == []
    delivered = [parse(raw) for _, raw in mta.maildir_messages()]
    assert sorted(message["Delivered-To"] for message in delivered) == ["archive@example.org", "bob@example.net"]
    assert {message["Return-Path"] for message in delivered} == {"<bounces@example.org>"}


@pytest.mark.asyncio
async def test_esmtp_args_of_envelope_changes_reach_the_queue_file(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    """add_rcpt with NOTIFY= and change_from with RET=/ENVID= are recorded by Postfix (seen in a held copy)."""
    _eom_endpoint(
        webhooks,
        [
            {"op": "change_from", "address": "bounces@example.org", "args": ["RET=HDRS", "ENVID=env-42"]},
            {"op": "add_rcpt", "address": "plain@example.org"},
            {"op": "add_rcpt", "address": "quiet@example.org", "args": ["NOTIFY=NEVER"]},
            {"op": "delete_rcpt", "address": "carol@example.net"},
        ],
        action="quarantine",
    )
    await bridges.start(webhooks.endpoint("editor"))
    rcpts = ["bob@example.net", "carol@example.net"]

    result = await smtp(mta, SENDER, rcpts, make_message(to=rcpts))

    assert result.accepted
    [entry] = await blocking(mta.wait_for_queue, 1, "hold")
    envelope = await blocking(mta.postcat, entry.queue_id, envelope=True)
    assert "sender: bounces@example.org\n" in envelope
    assert "named_attribute: envelope_id=env-42\n" in envelope
    assert "named_attribute: ret_flags=2\n" in envelope  # DSN_RET_HDRS
    assert "canceled_recipient: carol@example.net\n" in envelope
    # NOTIFY=NEVER is flag 1 and is written just before the recipient it belongs to.
    assert "named_attribute: notify_flags=1\noriginal_recipient: quiet@example.org\n" in envelope
    assert "notify_flags=1\noriginal_recipient: plain@example.org" not in envelope
    await blocking(mta.release_held)
    await blocking(mta.wait_for_delivery, 3)
    delivered = [parse(raw) for _, raw in mta.maildir_messages()]
    assert sorted(m["Delivered-To"] for m in delivered) == ["bob@example.net", "plain@example.org", "quiet@example.org"]


@pytest.mark.asyncio
async def test_two_endpoints_edit_the_same_headers(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    """Each endpoint's indexes refer to the headers it was sent, even when the other one deletes or inserts."""
    first = [
        {"op": "delete_header", "name": "X-A", "index": 1},
        {"op": "insert_header", "index": 0, "name": "X-Top-1", "value": "1"},
        {"op": "insert_header", "index": 6, "name": "X-After-A1-From-1", "value": "1"},
    ]
    second = [
        {"op": "change_header", "name": "X-A", "index": 2, "value": "two changed"},
        {"op": "insert_header", "index": 0, "name": "X-Top-2", "value": "2"},
        {"op": "insert_header", "index": 6, "name": "X-After-A1-From-2", "value": "2"},
    ]
    webhooks.set_default(FakeResponse.decision("continue", modifications=first), path="/one", event="eom")
    webhooks.set_default(FakeResponse.decision("continue", modifications=second), path="/two", event="eom")
    await bridges.start(webhooks.endpoint("one", path="/one"), webhooks.endpoint("two", path="/two"))
    headers = [DATE, ("X-A", "1"), ("X-A", "2"), ("X-A", "3")]

    result = await smtp(mta, SENDER, ["bob@example.net"], make_message(subject="hi", headers=headers))

    assert result.accepted
    [(_, raw)] = await blocking(mta.wait_for_delivery, 1)
    lines = header_lines(raw)
    assert [name for name, _ in lines[3:6]] == ["X-Top-1", "X-Top-2", "Received"]
    # The endpoint listed first goes first where both insert at the same place.
    assert lines[6 + 5 :] == [
        ("X-After-A1-From-1", " 1"),
        ("X-After-A1-From-2", " 2"),
        ("X-A", " two changed"),
        ("X-A", " 3"),
    ]
