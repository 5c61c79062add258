"""Every modification kind on the milter wire: numbering, encoding, order, deferral and dropping."""

from __future__ import annotations

import base64
import logging
from typing import Any

import pytest

from milterbridge.client import Envelope
from milterbridge.message_log import log_dropped_modifications
from milterbridge.metrics import Metrics
from milterbridge.milter.constants import ALL_ACTIONS, Action, Event
from milterbridge.milter.messages import (
    AddHeader,
    AddRecipient,
    AddRecipientWithArgs,
    ChangeHeader,
    ChangeSender,
    Continue,
    Discard,
    InsertHeader,
    Modification,
    Quarantine,
    Reject,
    RemoveRecipient,
    ReplaceBody,
    TempFail,
)
from milterbridge.policy.apply import plan_modifications
from milterbridge.policy.model import AnyOp, ChangeHeaderOp, OnError
from tests.engine.conftest import Engine
from tests.fakes.webhooks import FakeResponse

#: Headers as the endpoints receive them: From, X-A (1st), Subject, X-A (2nd).
MESSAGE = b"From: a@example.org\r\nX-A: one\r\nSubject: hi\r\nX-A: two\r\n\r\nbody\r\n"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def eom_with(engine: Engine, *ops: dict[str, Any], **start: Any) -> tuple[Modification, ...]:
    """Start a bridge whose one eom endpoint answers continue with ``ops``; the modifications sent."""
    await engine.start(engine.endpoint("policy"), **start)
    engine.fake.set_default(FakeResponse.decision("continue", modifications=list(ops)))
    result = await engine.send(MESSAGE)
    assert result.eom is not None
    assert result.eom.reply == Continue()
    return result.eom.modifications


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("op", "expected"),
    [
        pytest.param(
            {"op": "add_header", "name": "X-Spam", "value": "7.1"},
            [AddHeader(name=b"X-Spam", value=b" 7.1")],
            id="add-space-prepended",
        ),
        pytest.param(
            {"op": "add_header", "name": "X-Tab", "value": "\tv"},
            [AddHeader(name=b"X-Tab", value=b"\tv")],
            id="add-leading-tab-kept",
        ),
        pytest.param(
            {"op": "add_header", "name": "X-Fold", "value": "a\n\tb"},
            [AddHeader(name=b"X-Fold", value=b" a\n\tb")],
            id="add-folded-with-lf",
        ),
        pytest.param(
            {"op": "insert_header", "index": 0, "name": "X-Top", "value": "1"},
            [InsertHeader(index=0, name=b"X-Top", value=b" 1")],
            id="insert-top",
        ),
        pytest.param(
            # after the 2nd received header: Postfix counts its hidden Received header too
            {"op": "insert_header", "index": 2, "name": "X-Mid", "value": "1"},
            [InsertHeader(index=3, name=b"X-Mid", value=b" 1")],
            id="insert-counts-hidden-received",
        ),
        pytest.param(
            {"op": "insert_header", "index": 99, "name": "X-End", "value": "1"},
            [InsertHeader(index=5, name=b"X-End", value=b" 1")],
            id="insert-past-the-end",
        ),
        pytest.param(
            {"op": "change_header", "name": "X-A", "index": 2, "value": "zwei"},
            [ChangeHeader(index=2, name=b"X-A", value=b" zwei")],
            id="change",
        ),
        pytest.param(
            {"op": "change_header", "name": "X-Missing", "index": 1, "value": "v"},
            [AddHeader(name=b"X-Missing", value=b" v")],
            id="change-missing-becomes-add",
        ),
        pytest.param(
            {"op": "delete_header", "name": "X-A", "index": 1},
            [ChangeHeader(index=1, name=b"X-A", value=b"")],
            id="delete",
        ),
        pytest.param({"op": "delete_header", "name": "X-A", "index": 3}, [], id="delete-missing-dropped"),
        pytest.param(
            {"op": "add_header", "name": "X-Latin", "value_b64": b64(b"Caf\xe9 cr\xe8me")},
            [AddHeader(name=b"X-Latin", value=b" Caf\xe9 cr\xe8me")],
            id="add-value-b64-exact-bytes",
        ),
        pytest.param(
            {"op": "insert_header", "index": 0, "name": "X-Top", "value_b64": b64(b"\t\xff\n\t\x80")},
            [InsertHeader(index=0, name=b"X-Top", value=b"\t\xff\n\t\x80")],
            id="insert-value-b64-folded",
        ),
        pytest.param(
            {"op": "change_header", "name": "Subject", "index": 1, "value_b64": b64(b" \xe9t\xe9")},
            [ChangeHeader(index=1, name=b"Subject", value=b" \xe9t\xe9")],
            id="change-value-b64",
        ),
        pytest.param(
            {"op": "add_rcpt", "address": "archive@example.org"},
            [AddRecipient(address=b"<archive@example.org>")],
            id="add-rcpt",
        ),
        pytest.param(
            {"op": "add_rcpt", "address": "archive@example.org", "args": ["NOTIFY=NEVER", "ORCPT=rfc822;x@y"]},
            [AddRecipientWithArgs(address=b"<archive@example.org>", args=b"NOTIFY=NEVER ORCPT=rfc822;x@y")],
            id="add-rcpt-with-args",
        ),
        pytest.param(
            {"op": "delete_rcpt", "address": "rcpt@example.net"},
            [RemoveRecipient(address=b"<rcpt@example.net>")],
            id="delete-rcpt",
        ),
        pytest.param(
            {"op": "change_from", "address": "bounces@example.org", "args": ["RET=HDRS", "ENVID=abc"]},
            [ChangeSender(address=b"<bounces@example.org>", args=b"RET=HDRS ENVID=abc")],
            id="change-from-with-args",
        ),
        pytest.param(
            {"op": "change_from", "address": "bounces@example.org"},
            [ChangeSender(address=b"<bounces@example.org>")],
            id="change-from",
        ),
    ],
)
async def test_modification_on_the_wire(engine: Engine, op: dict[str, Any], expected: list[Modification]) -> None:
    """One modification op at eom arrives as the right milter modification, before the final reply."""
    assert list(await eom_with(engine, op)) == expected


@pytest.mark.asyncio
async def test_change_past_the_last_header_is_logged_and_counted(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A change_header past the last Subject goes out as an add, with a log line and a count."""
    caplog.set_level(logging.INFO, logger="milterbridge.dispatch")
    mods = await eom_with(engine, {"op": "change_header", "name": "Subject", "index": 2, "value": "[SPAM] hi"})
    assert list(mods) == [AddHeader(name=b"Subject", value=b" [SPAM] hi")]
    [line] = [r for r in caplog.records if r.getMessage() == "modification adjusted"]
    assert line.getMessage() == "modification adjusted"
    fields = getattr(line, "fields")  # noqa: B009 (set through extra=)
    assert (fields["endpoint"], fields["op"], fields["why"]) == ("policy", "change_header", "added_instead")
    assert fields["note"] == "change_header past the last Subject: added instead"
    labels = {"endpoint": "policy", "op": "change_header", "reason": "added_instead"}
    assert engine.metrics.registry.get_sample_value("milterbridge_modifications_adjusted_total", labels) == 1


def test_adjusted_modifications_are_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    """log_dropped_modifications logs an adjusted op with its note and counts it by endpoint, op and reason."""
    caplog.set_level(logging.INFO, logger="milterbridge.dispatch")
    metrics = Metrics()
    ops: list[tuple[str, list[AnyOp]]] = [("policy", [ChangeHeaderOp(name="Subject", index=2, value="x")])]
    plan = plan_modifications(ops, [(b"Subject", b" hi")], actions=ALL_ACTIONS)
    log_dropped_modifications("s-1", plan.dropped, plan.adjusted, metrics)
    [line] = caplog.records
    assert line.getMessage() == "modification adjusted"
    assert getattr(line, "fields") == {  # noqa: B009 (set through extra=)
        "session": "s-1",
        "endpoint": "policy",
        "op": "change_header",
        "why": "added_instead",
        "note": "change_header past the last Subject: added instead",
    }
    labels = {"endpoint": "policy", "op": "change_header", "reason": "added_instead"}
    assert metrics.registry.get_sample_value("milterbridge_modifications_adjusted_total", labels) == 1


@pytest.mark.asyncio
async def test_header_edits_keep_their_indexes(engine: Engine) -> None:
    """Deletes and changes of the same name go highest index first, each with its original index."""
    mods = await eom_with(
        engine,
        {"op": "delete_header", "name": "X-A", "index": 1},
        {"op": "change_header", "name": "x-a", "index": 2, "value": "two!"},
    )
    assert list(mods) == [
        ChangeHeader(index=2, name=b"x-a", value=b" two!"),
        ChangeHeader(index=1, name=b"X-A", value=b""),
    ]


@pytest.mark.asyncio
async def test_insert_index_accounts_for_deleted_headers(engine: Engine) -> None:
    """An insert after a deleted header counts only the headers that survive, plus Postfix's Received."""
    mods = await eom_with(
        engine,
        {"op": "insert_header", "index": 2, "name": "X-After-XA", "value": "1"},
        {"op": "delete_header", "name": "From", "index": 1},
    )
    # From is gone: X-A is the 1st visible header, so "after X-A" is Postfix index 1 (Received) + 1.
    assert list(mods) == [
        ChangeHeader(index=1, name=b"From", value=b""),
        InsertHeader(index=2, name=b"X-After-XA", value=b" 1"),
    ]


@pytest.mark.asyncio
async def test_replace_body_chunked_with_crlf(engine: Engine) -> None:
    """replace_body goes as ReplaceBody pieces of at most 65535 bytes, with LF turned into CRLF."""
    new_body = b"".join(b"line %05d of the new body\n" % n for n in range(3000))
    wire_body = new_body.replace(b"\n", b"\r\n")
    mods = await eom_with(engine, {"op": "replace_body", "base64": b64(new_body)})
    assert all(isinstance(m, ReplaceBody) for m in mods)
    sizes = [len(m.data) for m in mods]  # type: ignore[attr-defined]
    assert sizes == [65535, len(wire_body) - 65535]
    assert b"".join(m.data for m in mods) == wire_body  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_replace_body_empty(engine: Engine) -> None:
    """An empty replacement body is one empty ReplaceBody piece (it empties the body)."""
    assert list(await eom_with(engine, {"op": "replace_body", "base64": ""})) == [ReplaceBody(data=b"")]


ALL_KINDS_SHUFFLED: list[dict[str, Any]] = [
    {"op": "replace_body", "base64": b64(b"new\r\n")},
    {"op": "add_header", "name": "X-Added", "value": "1"},
    {"op": "insert_header", "index": 1, "name": "X-Inserted", "value": "1"},
    {"op": "change_header", "name": "Subject", "index": 1, "value": "[x] hi"},
    {"op": "add_rcpt", "address": "new@example.org"},
    {"op": "delete_header", "name": "X-A", "index": 2},
    {"op": "delete_rcpt", "address": "rcpt@example.net"},
    {"op": "change_from", "address": "bounces@example.org"},
]
FIXED_ORDER: list[Modification] = [
    ChangeSender(address=b"<bounces@example.org>"),
    RemoveRecipient(address=b"<rcpt@example.net>"),
    AddRecipient(address=b"<new@example.org>"),
    ChangeHeader(index=2, name=b"X-A", value=b""),  # position 4
    ChangeHeader(index=1, name=b"Subject", value=b" [x] hi"),  # position 3
    InsertHeader(index=2, name=b"X-Inserted", value=b" 1"),
    AddHeader(name=b"X-Added", value=b" 1"),
    ReplaceBody(data=b"new\r\n"),
]


@pytest.mark.asyncio
async def test_fixed_order_whatever_the_response_order(engine: Engine) -> None:
    """The fixed order: sender, rcpt removals, rcpt adds, header edits, inserts, adds, body, quarantine."""
    await engine.start(engine.endpoint("policy"))
    engine.fake.set_default(FakeResponse.decision("quarantine", reason="why", modifications=ALL_KINDS_SHUFFLED))
    result = await engine.send(MESSAGE)
    assert result.eom is not None
    assert list(result.eom.modifications) == [*FIXED_ORDER, Quarantine(reason=b"why")]
    assert result.eom.reply == Continue()


@pytest.mark.asyncio
async def test_modifications_from_earlier_events_are_applied_at_eom(engine: Engine) -> None:
    """Ops returned at mail, rcpt, header, eoh and body are kept and sent at eom, in the fixed order."""
    events = frozenset({Event.MAIL, Event.RCPT, Event.HEADER, Event.EOH, Event.BODY, Event.EOM})
    await engine.start(engine.endpoint("policy", events=events))
    fake = engine.fake
    ops = ALL_KINDS_SHUFFLED
    fake.set_default(FakeResponse.decision("continue", modifications=ops[6:]), event="mail")
    fake.set_default(FakeResponse.decision("continue", modifications=[ops[4]]), event="rcpt")
    # at the first header (From): insert after it, the only header the endpoint has seen
    fake.enqueue(FakeResponse.decision("continue", modifications=[ops[2]]), event="header")
    fake.set_default(FakeResponse.decision("continue", modifications=[ops[1], ops[3], ops[5]]), event="eoh")
    fake.set_default(FakeResponse.decision("continue", modifications=[ops[0]]), event="body")
    result = await engine.send(MESSAGE)
    assert result.mail == Continue()
    assert result.rcpt == [Continue()]
    assert result.eom is not None
    assert list(result.eom.modifications) == FIXED_ORDER
    assert result.eom.reply == Continue()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("refusal", "expected"),
    [
        pytest.param("reject", Reject(), id="reject"),
        pytest.param("tempfail", TempFail(), id="tempfail"),
        pytest.param("discard", Discard(), id="discard"),
    ],
)
async def test_modifications_dropped_when_message_refused_at_eom(engine: Engine, refusal: str, expected: Any) -> None:
    """Kept ops and the eom ops are not sent when the message is rejected, tempfailed or discarded."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.MAIL, Event.EOM})))
    engine.fake.set_default(FakeResponse.decision("continue", modifications=ALL_KINDS_SHUFFLED[:4]), event="mail")
    engine.fake.set_default(FakeResponse.decision(refusal, modifications=ALL_KINDS_SHUFFLED[4:]), event="eom")
    result = await engine.send(MESSAGE)
    assert result.eom is not None
    assert result.eom.modifications == ()
    assert result.eom.reply == expected


@pytest.mark.asyncio
async def test_modifications_of_a_refused_message_do_not_leak_into_the_next(engine: Engine) -> None:
    """Ops kept for a message refused at eoh are forgotten: the next message on the connection is clean."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.MAIL, Event.EOH, Event.EOM})))
    fake = engine.fake
    fake.enqueue(FakeResponse.decision("continue", modifications=ALL_KINDS_SHUFFLED), event="mail")
    fake.enqueue(FakeResponse.decision("reject"), event="eoh")
    client = await engine.client()
    first = await client.send_message(Envelope(), MESSAGE)
    assert first.eoh == Reject()
    assert first.eom is None
    second = await client.send_transaction(Envelope(), MESSAGE)
    assert second.eom is not None
    assert second.eom.modifications == ()
    assert engine.events("policy") == ["mail", "eoh", "mail", "eoh", "eom"]


@pytest.mark.asyncio
async def test_modifications_dropped_when_their_endpoint_later_fails(engine: Engine) -> None:
    """Ops an endpoint returned at mail are taken back when that endpoint fails at eom (on_error continue)."""
    await engine.start(
        engine.endpoint("policy", events=frozenset({Event.MAIL, Event.EOM}), on_error=OnError.CONTINUE, retry=False)
    )
    engine.fake.set_default(FakeResponse.decision("continue", modifications=ALL_KINDS_SHUFFLED), event="mail")
    engine.fake.set_default(FakeResponse.status_code(500), event="eom")
    result = await engine.send(MESSAGE)
    assert result.eom is not None
    assert result.eom.modifications == ()
    assert result.eom.reply == Continue()


@pytest.mark.asyncio
async def test_modifications_at_connect_apply_to_every_message(engine: Engine) -> None:
    """Ops returned at connect are sent at the end of every message of the session."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.CONNECT})))
    engine.fake.set_default(
        FakeResponse.decision("continue", modifications=[{"op": "add_header", "name": "X-Client", "value": "ok"}])
    )
    client = await engine.client()
    for result in (
        await client.send_message(Envelope(), MESSAGE),
        await client.send_transaction(Envelope(), MESSAGE),
    ):
        assert result.eom is not None
        assert result.eom.modifications == (AddHeader(name=b"X-Client", value=b" ok"),)


@pytest.mark.asyncio
async def test_op_the_mta_did_not_grant_makes_the_response_invalid(engine: Engine) -> None:
    """A replace_body when the MTA did not offer CHGBODY invalidates the whole response: on_error, nothing applied."""
    await engine.start(engine.endpoint("policy"))
    engine.fake.set_default(
        FakeResponse.decision(
            "continue",
            modifications=[
                {"op": "add_header", "name": "X-Ok", "value": "1"},
                {"op": "replace_body", "base64": b64(b"x")},
            ],
        )
    )
    client = await engine.client(actions=ALL_ACTIONS & ~Action.CHANGE_BODY)
    result = await engine.send(MESSAGE, client=client)
    assert result.eom is not None
    assert result.eom.modifications == ()
    assert result.eom.reply == TempFail()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"op": "add_header", "name": "X:Bad", "value": "1"}, id="colon-in-name"),
        pytest.param({"op": "add_header", "name": "X-Bad", "value": "a\r\nb"}, id="cr-in-value"),
        pytest.param({"op": "add_header", "name": "X-Bad", "value": "a\nb"}, id="lf-not-a-fold"),
        pytest.param({"op": "change_header", "name": "X-A", "index": 0, "value": "1"}, id="index-zero"),
        pytest.param({"op": "add_rcpt", "address": "<x@example.org>"}, id="brackets-in-address"),
        pytest.param({"op": "replace_body", "base64": "not base64!"}, id="bad-base64"),
        pytest.param({"op": "rename_header", "name": "X-A"}, id="unknown-op"),
    ],
)
async def test_invalid_modification_invalidates_the_response(engine: Engine, bad: dict[str, Any]) -> None:
    """One invalid op makes the whole response a failure: the valid ops are not applied either."""
    await engine.start(engine.endpoint("policy"))
    engine.fake.set_default(
        FakeResponse.decision("continue", modifications=[{"op": "add_header", "name": "X-Ok", "value": "1"}, bad])
    )
    result = await engine.send(MESSAGE)
    assert result.eom is not None
    assert result.eom.modifications == ()
    assert result.eom.reply == TempFail()
