"""Response parsing: every contract rule, with valid and invalid examples, at each event."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milterbridge.milter.constants import ALL_ACTIONS, Action, Event
from milterbridge.policy.model import (
    CONTINUE,
    ActionName,
    AddHeaderOp,
    AddRcptOp,
    ChangeFromOp,
    ChangeHeaderOp,
    Decision,
    DecisionError,
    DeleteHeaderOp,
    DeleteRcptOp,
    InsertHeaderOp,
    PolicyUsageError,
    ReplaceBodyOp,
    SmtpReply,
)
from milterbridge.policy.parse import parse_decision

E = Event
A = ActionName
DECISION_EVENTS = [E.CONNECT, E.HELO, E.MAIL, E.RCPT, E.DATA, E.HEADER, E.EOH, E.BODY, E.EOM, E.UNKNOWN]

# Written out from design.md §3.3 on purpose, not imported from the code under test.
LEGAL = {
    E.CONNECT: {A.CONTINUE, A.ACCEPT, A.REJECT, A.TEMPFAIL, A.QUARANTINE},
    E.HELO: {A.CONTINUE, A.ACCEPT, A.REJECT, A.TEMPFAIL, A.QUARANTINE},
    E.MAIL: {A.CONTINUE, A.ACCEPT, A.REJECT, A.TEMPFAIL, A.DISCARD, A.QUARANTINE},
    E.RCPT: {A.CONTINUE, A.ACCEPT, A.REJECT, A.TEMPFAIL, A.DISCARD, A.QUARANTINE},
    E.DATA: {A.CONTINUE, A.ACCEPT, A.REJECT, A.TEMPFAIL, A.DISCARD, A.QUARANTINE},
    E.HEADER: {A.CONTINUE, A.ACCEPT, A.REJECT, A.TEMPFAIL, A.DISCARD, A.QUARANTINE, A.SKIP},
    E.EOH: {A.CONTINUE, A.ACCEPT, A.REJECT, A.TEMPFAIL, A.DISCARD, A.QUARANTINE},
    E.BODY: {A.CONTINUE, A.ACCEPT, A.REJECT, A.TEMPFAIL, A.DISCARD, A.QUARANTINE, A.SKIP},
    E.EOM: {A.CONTINUE, A.ACCEPT, A.REJECT, A.TEMPFAIL, A.DISCARD, A.QUARANTINE},
    E.UNKNOWN: {A.CONTINUE, A.TEMPFAIL},
}


def parse(obj: object, event: Event = E.EOM, max_modifications: int = 100, allowed: Action | None = None) -> Decision:
    return parse_decision(obj, event, max_modifications=max_modifications, allowed_actions=allowed)


def mod(**fields: object) -> dict[str, object]:
    return {"action": "continue", "modifications": [fields]}


# ----------------------------------------------------------------- actions


@pytest.mark.parametrize("event", DECISION_EVENTS)
def test_none_is_continue(event):
    """A 204 or an empty body (None) is continue at every decision event."""
    assert parse(None, event) is CONTINUE


@pytest.mark.parametrize(
    ("event", "action"),
    [pytest.param(e, a, id=f"{e}-{a}") for e in DECISION_EVENTS for a in ActionName],
)
def test_action_table(event, action):
    """Each action is accepted exactly where design §3.3 allows it."""
    if action in LEGAL[event]:
        assert parse({"action": str(action)}, event).action is action
    else:
        with pytest.raises(DecisionError, match=f"{action} is not allowed at {event}"):
            parse({"action": str(action)}, event)


@pytest.mark.parametrize("event", [E.ABORT, E.CLOSE])
@pytest.mark.parametrize("obj", [None, {"action": "reject"}, "garbage", {"nonsense": 1}])
def test_notifications_parse_nothing(event, obj):
    """At abort and close the response is ignored, even when it is invalid."""
    assert parse(obj, event) is CONTINUE


def test_unknown_event_name_is_a_usage_error():
    """A string that is no event is the caller's bug, not the endpoint's."""
    with pytest.raises(PolicyUsageError):
        parse({"action": "continue"}, "negotiate")  # type: ignore[arg-type]


# ----------------------------------------------------------------- valid documents


def test_full_example_from_the_design():
    """The design's example response parses into the expected values."""
    doc = {
        "action": "reject",
        "reply": {"code": 550, "enhanced": "5.7.1", "text": ["Message refused", "see https://example.org/policy"]},
        "reason": "quarantine or log reason",
        "modifications": [
            {"op": "add_header", "name": "X-Spam-Score", "value": "7.1"},
            {"op": "insert_header", "index": 0, "name": "X-First", "value": "1"},
            {"op": "change_header", "name": "Subject", "index": 1, "value": "[SPAM] hi"},
            {"op": "delete_header", "name": "X-Tracking", "index": 1},
            {"op": "replace_body", "base64": base64.b64encode(b"new body\n").decode()},
            {"op": "add_rcpt", "address": "archive@example.org", "args": ["NOTIFY=NEVER"]},
            {"op": "delete_rcpt", "address": "bob@example.net"},
            {"op": "change_from", "address": "bounces@example.org", "args": []},
        ],
    }
    got = parse(doc, allowed=ALL_ACTIONS)
    assert got == Decision(
        action=A.REJECT,
        reply=SmtpReply(code=550, enhanced="5.7.1", lines=("Message refused", "see https://example.org/policy")),
        reason="quarantine or log reason",
        modifications=(
            AddHeaderOp(name="X-Spam-Score", value="7.1"),
            InsertHeaderOp(index=0, name="X-First", value="1"),
            ChangeHeaderOp(name="Subject", index=1, value="[SPAM] hi"),
            DeleteHeaderOp(name="X-Tracking", index=1),
            ReplaceBodyOp(body=b"new body\n"),
            AddRcptOp(address="archive@example.org", args=("NOTIFY=NEVER",)),
            DeleteRcptOp(address="bob@example.net"),
            ChangeFromOp(address="bounces@example.org", args=()),
        ),
    )


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        pytest.param(
            {"action": "continue", "reply": None, "reason": None, "modifications": None}, CONTINUE, id="nulls-absent"
        ),
        pytest.param(
            {"action": "tempfail", "reply": {"code": 451}},
            Decision(action=A.TEMPFAIL, reply=SmtpReply(code=451)),
            id="code-only",
        ),
        pytest.param(
            {"action": "reject", "reply": {"code": 554, "enhanced": None, "text": None}},
            Decision(action=A.REJECT, reply=SmtpReply(code=554)),
            id="reply-nulls",
        ),
        pytest.param(
            {"action": "reject", "reply": {"code": 550, "text": "one line"}},
            Decision(action=A.REJECT, reply=SmtpReply(code=550, lines=("one line",))),
            id="text-string",
        ),
        pytest.param(
            {"action": "tempfail", "reply": {"code": 421, "enhanced": "4.3.2", "text": ["bye"]}},
            Decision(action=A.TEMPFAIL, reply=SmtpReply(code=421, enhanced="4.3.2", lines=("bye",))),
            id="421",
        ),
        pytest.param(
            {"action": "reject", "reply": {"code": 550, "enhanced": "5.123.999", "text": ["é" * 245]}},
            Decision(action=A.REJECT, reply=SmtpReply(code=550, enhanced="5.123.999", lines=("é" * 245,))),
            id="long-utf8-line-that-fits",
        ),
        pytest.param(
            {"action": "quarantine", "reason": "spam score 12"},
            Decision(action=A.QUARANTINE, reason="spam score 12"),
            id="quarantine-reason",
        ),
        pytest.param({"action": "continue", "reason": "x" * 1000}, Decision(action=A.CONTINUE, reason="x" * 1000)),
    ],
)
def test_valid_documents(doc, expected):
    """Valid responses parse to the expected decision."""
    assert parse(doc) == expected


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        pytest.param({"op": "add_header", "name": "X-A", "value": ""}, AddHeaderOp(name="X-A", value=""), id="empty"),
        pytest.param(
            {"op": "add_header", "name": "X-A", "value": "a\n\tb\n c"},
            AddHeaderOp(name="X-A", value="a\n\tb\n c"),
            id="folded",
        ),
        pytest.param(
            {"op": "add_header", "name": "X-A", "value": "\n\tonly-fold"},
            AddHeaderOp(name="X-A", value="\n\tonly-fold"),
            id="fold-first",
        ),
        pytest.param(
            {"op": "add_header", "name": "X-\u00e9", "value": "x"}, None, id="non-ascii-name-refused-elsewhere"
        ),
        pytest.param(
            {"op": "insert_header", "index": 0, "name": "X", "value": "v"},
            InsertHeaderOp(index=0, name="X", value="v"),
            id="insert-0",
        ),
        pytest.param(
            {"op": "change_header", "name": "Subject", "index": 1_000_000, "value": "ünïcode"},
            ChangeHeaderOp(name="Subject", index=1_000_000, value="ünïcode"),
            id="change-max-index",
        ),
        pytest.param({"op": "replace_body", "base64": ""}, ReplaceBodyOp(body=b""), id="empty-body"),
        pytest.param({"op": "replace_body", "base64": "YQ=="}, ReplaceBodyOp(body=b"a"), id="padded"),
        pytest.param(
            {"op": "add_rcpt", "address": '"john doe"@example.org', "args": None},
            AddRcptOp(address='"john doe"@example.org'),
            id="quoted-local-part",
        ),
        pytest.param(
            {"op": "change_from", "address": "b@example.org", "args": ["RET=HDRS", "ENVID=abc"]},
            ChangeFromOp(address="b@example.org", args=("RET=HDRS", "ENVID=abc")),
            id="from-args",
        ),
    ],
)
def test_valid_ops(op, expected):
    """Valid modification ops parse into their values."""
    if expected is None:
        with pytest.raises(DecisionError):
            parse(mod(**op))
        return
    assert parse(mod(**op)).modifications == (expected,)


@pytest.mark.parametrize("event", [E.CONNECT, E.HELO, E.MAIL, E.RCPT, E.DATA, E.HEADER, E.EOH, E.BODY, E.EOM])
def test_modifications_allowed_at_every_decision_event_but_unknown(event):
    """Modifications may come at any decision event (they are deferred to eom)."""
    got = parse(mod(op="add_header", name="X-A", value="1"), event)
    assert got.modifications == (AddHeaderOp(name="X-A", value="1"),)


# ----------------------------------------------------------------- invalid documents

LONG = "x" * 513
INVALID = [
    # shape
    ([], "response: expected an object"),
    ("continue", "response: expected an object"),
    ({}, "'action' is required"),
    ({"action": None}, "'action' is required"),
    ({"action": "continue", "extra": 1}, "unknown key 'extra'"),
    ({"action": 1}, "action: expected a string"),
    ({"action": "bounce"}, "unknown action 'bounce'"),
    ({"action": "CONTINUE"}, "unknown action 'CONTINUE' \\(did you mean 'continue'\\?\\)"),
    ({"action": "Reject"}, "unknown action 'Reject' \\(did you mean 'reject'\\?\\)"),
    ({"action": "rejct"}, "unknown action 'rejct' \\(did you mean 'reject'\\?\\)"),
    # reply
    ({"action": "continue", "reply": {"code": 550}}, "allowed only with reject or tempfail"),
    ({"action": "discard", "reply": {"code": 550}}, "allowed only with reject or tempfail"),
    ({"action": "reject", "reply": {"code": 451}}, r"reply.code: must be between 500 and 599"),
    ({"action": "tempfail", "reply": {"code": 550}}, r"reply.code: must be between 400 and 499"),
    ({"action": "reject", "reply": {"code": True}}, "reply.code: expected an integer, got a boolean"),
    ({"action": "reject", "reply": {"code": 550.0}}, "reply.code: expected an integer"),
    ({"action": "reject", "reply": {"code": "550"}}, "reply.code: expected an integer"),
    ({"action": "reject", "reply": {}}, "reply: 'code' is required"),
    ({"action": "reject", "reply": "550 no"}, "reply: expected an object"),
    ({"action": "reject", "reply": {"code": 550, "message": "x"}}, "reply: unknown key 'message'"),
    ({"action": "reject", "reply": {"code": 550, "enhanced": "4.7.1"}}, "class 4 does not match code 550"),
    ({"action": "tempfail", "reply": {"code": 451, "enhanced": "5.7.1"}}, "class 5 does not match code 451"),
    ({"action": "reject", "reply": {"code": 550, "enhanced": "5.7"}}, "enhanced: expected the form"),
    ({"action": "reject", "reply": {"code": 550, "enhanced": "5.7.1000"}}, "enhanced: expected the form"),
    ({"action": "reject", "reply": {"code": 550, "enhanced": "5.x.1"}}, "enhanced: expected the form"),
    ({"action": "reject", "reply": {"code": 550, "enhanced": "5.7.1\n"}}, "enhanced: expected the form"),
    ({"action": "reject", "reply": {"code": 550, "enhanced": "5.\u0667.1"}}, "enhanced: expected the form"),
    ({"action": "reject", "reply": {"code": 550, "enhanced": 5.71}}, "enhanced: expected a string"),
    ({"action": "reject", "reply": {"code": 550, "text": []}}, "1 to 32 lines, got 0"),
    ({"action": "reject", "reply": {"code": 550, "text": ["l"] * 33}}, "1 to 32 lines, got 33"),
    ({"action": "reject", "reply": {"code": 550, "text": ["ok", "a\rb"]}}, r"reply.text\[1\]: must not contain CR"),
    ({"action": "reject", "reply": {"code": 550, "text": "a\nb"}}, "reply.text: must not contain CR, LF or NUL"),
    ({"action": "reject", "reply": {"code": 550, "text": "a\0b"}}, "must not contain CR, LF or NUL"),
    ({"action": "reject", "reply": {"code": 550, "text": LONG}}, "longer than 512 bytes"),
    ({"action": "reject", "reply": {"code": 550, "text": ""}}, "reply.text: must not be empty"),
    ({"action": "reject", "reply": {"code": 550, "text": ["a", ""]}}, r"reply.text\[1\]: must not be empty"),
    ({"action": "reject", "reply": {"code": 550, "text": ["é" * 257]}}, r"reply.text\[0\]: longer than 512 bytes"),
    ({"action": "reject", "reply": {"code": 550, "enhanced": "5.7.1", "text": "x" * 505}}, "code, enhanced code"),
    ({"action": "reject", "reply": {"code": 550, "text": "%" * 300}}, "doubled %"),
    ({"action": "reject", "reply": {"code": 550, "text": [1]}}, r"reply.text\[0\]: expected a string"),
    ({"action": "reject", "reply": {"code": 550, "text": {"a": 1}}}, "expected a string or an array"),
    ({"action": "reject", "reply": {"code": 550, "text": "\ud800"}}, "not valid Unicode"),
    # reason
    ({"action": "continue", "reason": "x" * 1001}, "reason: longer than 1000"),
    ({"action": "continue", "reason": "a\0b"}, "reason: must not contain"),
    ({"action": "continue", "reason": "a\nb"}, "reason: must not contain"),
    ({"action": "continue", "reason": 5}, "reason: expected a string"),
    # modifications list
    ({"action": "continue", "modifications": {}}, "modifications: expected an array"),
    ({"action": "continue", "modifications": ["add_header"]}, r"modifications\[0\]: expected an object"),
    (mod(name="X", value="1"), r"modifications\[0\].op: expected a string, got null"),
    (mod(op="add_headers", name="X", value="1"), "unknown op 'add_headers' \\(did you mean 'add_header'\\?\\)"),
    (mod(op="Change_Header", name="X", index=1, value="1"), "did you mean 'change_header'"),
    (mod(op="add_header", name="X", value="1", index=1), r"modifications\[0\]: unknown key 'index'"),
    (mod(op="add_header", name="X"), "'value' is required"),
    (mod(op="add_header", name="X", value=None), "'value' is required"),
    # header names
    (mod(op="add_header", name="", value="1"), "printable ASCII"),
    (mod(op="add_header", name="X A", value="1"), "printable ASCII"),
    (mod(op="add_header", name="X:A", value="1"), "without ':'"),
    (mod(op="add_header", name="X\x7f", value="1"), "printable ASCII"),
    (mod(op="add_header", name="X\u00e9", value="1"), "printable ASCII"),
    (mod(op="add_header", name="X" * 257, value="1"), "name: longer than 256"),
    (mod(op="add_header", name=1, value="1"), "name: expected a string"),
    # header values
    (mod(op="add_header", name="X", value="a\r\n b"), "control character U\\+000D"),
    (mod(op="add_header", name="X", value="a\0"), "control character U\\+0000"),
    (mod(op="add_header", name="X", value="a\nb"), "LF is allowed only to fold"),
    (mod(op="add_header", name="X", value="a\n"), "LF is allowed only to fold"),
    (mod(op="change_header", name="X", index=1, value="a\n\n b"), "LF is allowed only to fold"),
    (mod(op="change_header", name="X", index=1, value="a\n \n b"), "fold line must not be only whitespace"),
    (mod(op="add_header", name="X", value="v" * 65537), "value: longer than 65536"),
    (mod(op="add_header", name="X", value="\udcff"), "not valid Unicode"),
    (mod(op="add_header", name="X", value=["v"]), "value: expected a string"),
    # indexes
    (mod(op="insert_header", index=-1, name="X", value="1"), "index: must be between 0 and"),
    (mod(op="change_header", index=0, name="X", value="1"), "index: must be between 1 and"),
    (mod(op="delete_header", index=0, name="X"), "index: must be between 1 and"),
    (mod(op="delete_header", index=1_000_001, name="X"), "index: must be between 1 and 1000000"),
    (mod(op="delete_header", index=True, name="X"), "index: expected an integer, got a boolean"),
    (mod(op="delete_header", index="1", name="X"), "index: expected an integer"),
    (mod(op="delete_header", index=1.0, name="X"), "index: expected an integer"),
    (mod(op="delete_header", name="X"), "'index' is required"),
    (mod(op="delete_header", index=1, name="X", value="v"), "unknown key 'value'"),
    # body
    (mod(op="replace_body", base64="!!!!"), "not valid base64"),
    (mod(op="replace_body", base64="YQ"), "not valid base64"),
    (mod(op="replace_body", base64="YQ==\n"), "not valid base64"),
    (mod(op="replace_body", base64="Y Q=="), "not valid base64"),
    (mod(op="replace_body", base64="YR=="), "not canonical base64"),
    (mod(op="replace_body", base64="\u00e9"), "not valid base64"),
    (mod(op="replace_body", base64=None), "'base64' is required"),
    (mod(op="replace_body", body="YQ=="), "unknown key 'body'"),
    # addresses
    (mod(op="add_rcpt", address=""), "address: must not be empty"),
    (mod(op="add_rcpt", address="<a@b>"), "without angle brackets"),
    (mod(op="delete_rcpt", address="a@b>"), "the domain is not a domain name"),
    (mod(op="delete_rcpt", address="a@b\r"), "the domain is not a domain name"),
    (mod(op="change_from", address="a\0@b"), "the local part is neither"),
    (mod(op="change_from", address=" a@b"), "the local part is neither"),
    (mod(op="change_from", address="a" * 1025), "address: longer than 254"),
    (mod(op="change_from", address="a@\udcff"), "not valid Unicode"),
    (mod(op="change_from", address=["a@b"]), "address: expected a string"),
    (mod(op="delete_rcpt", address="a@b", args=[]), "unknown key 'args'"),
    # args
    (mod(op="add_rcpt", address="a@b", args="NOTIFY=NEVER"), "args: expected an array"),
    (mod(op="add_rcpt", address="a@b", args=["A"] * 17), "at most 16 arguments"),
    (mod(op="add_rcpt", address="a@b", args=[""]), r"args\[0\]: must be non-empty"),
    (mod(op="add_rcpt", address="a@b", args=["NOTIFY=NEVER ORCPT=x"]), "without whitespace"),
    (mod(op="add_rcpt", address="a@b", args=["A\tB"]), "without whitespace"),
    (mod(op="add_rcpt", address="a@b", args=["A\u00a0B"]), "without whitespace"),
    (mod(op="change_from", address="a@b", args=["RET=\r"]), "control characters"),
    (mod(op="change_from", address="a@b", args=[1]), r"args\[0\]: expected a string"),
    (mod(op="change_from", address="a@b", args=["E=" + "x" * 1023]), "longer than 1024"),
]


@pytest.mark.parametrize(("doc", "match"), [pytest.param(d, m, id=m[:40]) for d, m in INVALID])
def test_invalid_documents(doc, match):
    """Each broken rule is refused with a reason that names it."""
    with pytest.raises(DecisionError, match=match):
        parse(doc)


@pytest.mark.parametrize(
    ("reply", "wire"),
    [
        ({"code": 554}, b"554 Command rejected"),
        ({"code": 451, "enhanced": "4.7.1"}, b"451 4.7.1 Service unavailable - try again later"),
        ({"code": 550, "text": ["50% off", "bye"]}, b"550-50%% off\r\n550 bye"),
    ],
)
def test_reply_wire_form(reply, wire):
    """Without text Postfix's default text is sent; every wire line has a space or '-' after the code."""
    action = "reject" if reply["code"] >= 500 else "tempfail"
    got = parse({"action": action, "reply": reply})
    assert got.reply is not None
    assert got.reply.to_milter().text == wire


@pytest.mark.parametrize(
    ("reply", "wire"),
    [
        (SmtpReply(code=500, lines=("",)), b"500 Command rejected"),
        (SmtpReply(code=550, lines=("a", "")), b"550-a\r\n550  "),
        (SmtpReply(code=550, enhanced="5.7.1", lines=("a", "")), b"550-5.7.1 a\r\n550 5.7.1"),
    ],
)
def test_smtp_reply_never_writes_a_bare_code(reply, wire):
    """Built directly (not parsed), empty lines still give lines Postfix accepts."""
    assert reply.to_milter().text == wire


def test_no_hint_for_an_unrelated_word():
    """A word close to no action or op gets no guess."""
    for doc in ({"action": "bounce"}, mod(op="frobnicate")):
        with pytest.raises(DecisionError) as info:
            parse(doc)
        assert "did you mean" not in str(info.value)


def test_decision_error_is_a_value_error():
    """Generic ValueError handlers still catch a refused response."""
    with pytest.raises(ValueError):
        parse({"action": "nope"})


def test_unknown_refusals_must_be_4xx():
    """At unknown a tempfail with a 4xx reply is fine; reject is a schema error."""
    got = parse({"action": "tempfail", "reply": {"code": 421, "text": "bye"}}, E.UNKNOWN)
    assert got.reply == SmtpReply(code=421, lines=("bye",))
    with pytest.raises(DecisionError, match="reject is not allowed at unknown"):
        parse({"action": "reject", "reply": {"code": 550}}, E.UNKNOWN)


def test_no_modifications_at_unknown():
    """Modifications are refused at unknown; an empty list is harmless."""
    with pytest.raises(DecisionError, match="not allowed at unknown"):
        parse(mod(op="add_header", name="X", value="1"), E.UNKNOWN)
    assert parse({"action": "continue", "modifications": []}, E.UNKNOWN) == CONTINUE


def test_max_modifications():
    """The modification count is bounded by the endpoint's limit."""
    ops = [{"op": "add_header", "name": "X", "value": str(n)} for n in range(3)]
    assert len(parse({"action": "continue", "modifications": ops}, max_modifications=3).modifications) == 3
    with pytest.raises(DecisionError, match="at most 2, got 3"):
        parse({"action": "continue", "modifications": ops}, max_modifications=2)


@pytest.mark.parametrize(
    ("doc", "granted", "ok"),
    [
        pytest.param(mod(op="add_header", name="X", value="1"), Action.ADD_HEADERS, True, id="add-granted"),
        pytest.param(mod(op="add_header", name="X", value="1"), Action.CHANGE_HEADERS, False, id="add-missing"),
        pytest.param(mod(op="insert_header", index=0, name="X", value="1"), Action.NONE, False, id="insert"),
        pytest.param(mod(op="delete_header", index=1, name="X"), Action.CHANGE_HEADERS, True, id="delete"),
        pytest.param(mod(op="replace_body", base64=""), Action.ADD_HEADERS, False, id="body"),
        pytest.param(mod(op="add_rcpt", address="a@b"), Action.ADD_RCPT, True, id="rcpt-plain"),
        pytest.param(mod(op="add_rcpt", address="a@b", args=["NOTIFY=NEVER"]), Action.ADD_RCPT, False, id="rcpt-par"),
        pytest.param(mod(op="add_rcpt", address="a@b", args=["NOTIFY=NEVER"]), Action.ADD_RCPT_PAR, True, id="par"),
        pytest.param(mod(op="delete_rcpt", address="a@b"), Action.ADD_RCPT, False, id="delrcpt"),
        pytest.param(mod(op="change_from", address="a@b"), Action.CHANGE_FROM, True, id="chgfrom"),
        pytest.param({"action": "quarantine"}, Action.ADD_HEADERS, False, id="quarantine-missing"),
        pytest.param({"action": "quarantine"}, Action.QUARANTINE, True, id="quarantine-granted"),
    ],
)
def test_allowed_actions(doc, granted, ok):
    """An op or quarantine needing an action the MTA did not grant invalidates the response."""
    if ok:
        assert parse(doc, allowed=granted).action in (A.CONTINUE, A.QUARANTINE)
    else:
        with pytest.raises(DecisionError, match="not grant"):
            parse(doc, allowed=granted)
    # Without allowed_actions nothing is checked against the MTA.
    parse(doc)


# ----------------------------------------------------------------- properties

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
KEYS = st.sampled_from(["action", "reply", "reason", "modifications", "code", "text", "op", "name", "value", "index"])
NEAR_VALID = st.dictionaries(KEYS, JSON, max_size=4) | st.fixed_dictionaries(
    {"action": st.sampled_from([str(a) for a in ActionName])},
    optional={
        "reply": st.fixed_dictionaries({"code": st.integers(380, 620)}, optional={"text": JSON, "enhanced": JSON}),
        "modifications": st.lists(st.dictionaries(KEYS, JSON, max_size=4), max_size=3),
        "reason": JSON,
    },
)


@settings(max_examples=300, deadline=None)
@given(doc=JSON | NEAR_VALID, event=st.sampled_from(DECISION_EVENTS))
def test_parse_never_raises_anything_else(doc, event):
    """Any JSON value gives a legal Decision or a DecisionError, nothing else."""
    try:
        got = parse(doc, event, allowed=ALL_ACTIONS)
    except DecisionError:
        return
    assert got.action in LEGAL[event]
    if got.reply is not None:
        assert got.reply.to_milter().smtp_code == got.reply.code
