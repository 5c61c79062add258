"""MTA Hooks answers turned into the bridge's decisions, checked by the bridge's own parser."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from milterbridge.milter.constants import Event
from milterbridge.mtahooks import Before, HookAnswerError, to_decision
from milterbridge.policy.parse import parse_decision

HEADERS = (
    ("From", " Alice <alice@example.org>"),
    ("To", " Bob <bob@example.net>"),
    ("Subject", " hello"),
    ("X-Spam", " old"),
    ("X-Spam", " older"),
)
BEFORE = Before(headers=HEADERS, rcpts=("bob@example.net", "carol@example.net"))


def decide(answer: Any, event: Event = Event.EOM, before: Before = BEFORE) -> dict[str, Any] | None:
    """The decision, after checking that the bridge's parser accepts it at ``event``."""
    decision = to_decision(answer, before)
    parse_decision(decision, event, max_modifications=1000)
    return decision


@pytest.mark.parametrize("answer", [None, {}, {"set": None, "add": [], "delete": None}])
def test_no_change_is_continue(answer):
    assert decide(answer) in (None, {"action": "continue"})


def test_reject_with_a_response():
    answer = {
        "set": [
            {"path": "/action", "value": "reject"},
            {"path": "/response", "value": {"code": 550, "enhancedCode": "5.7.1", "message": "spam"}},
        ]
    }
    assert decide(answer) == {
        "action": "reject",
        "reply": {"code": 550, "enhanced": "5.7.1", "text": "spam"},
        "reason": "spam",
    }


def test_reject_with_a_4xx_response_is_a_tempfail():
    answer = {
        "set": [
            {"path": "/action", "value": "reject"},
            {"path": "/response/code", "value": 451},
            {"path": "/response/enhancedCode", "value": "4.7.1"},
            {"path": "/response/message", "value": "try later"},
        ]
    }
    assert decide(answer, Event.RCPT) == {
        "action": "tempfail",
        "reply": {"code": 451, "enhanced": "4.7.1", "text": "try later"},
        "reason": "try later",
    }


def test_disconnect_is_a_421():
    decision = decide({"set": [{"path": "/action", "value": "disconnect"}]}, Event.HELO)
    assert decision == {
        "action": "tempfail",
        "reply": {"code": 421, "enhanced": "4.7.0", "text": "closing the connection"},
    }


@pytest.mark.parametrize(("enhanced", "kept"), [("4.3.2", "4.3.2"), ("5.7.1", "4.7.0")])
def test_disconnect_keeps_only_a_4xx_enhanced_code(enhanced, kept):
    response = {"code": 550, "enhancedCode": enhanced, "message": "bye"}
    answer = {"set": [{"path": "/action", "value": "disconnect"}, {"path": "/response", "value": response}]}
    decision = decide(answer, Event.HELO)
    assert decision["reply"] == {"code": 421, "enhanced": kept, "text": "bye"}


def test_quarantine_and_discard():
    assert decide({"set": [{"path": "/action", "value": "quarantine"}]}) == {
        "action": "quarantine",
        "reason": "quarantined by the scanner",
    }
    assert decide({"set": [{"path": "/action", "value": "discard"}]}) == {"action": "discard"}


def test_accept_with_a_response_keeps_it_as_the_reason_only():
    answer = {"set": [{"path": "/response", "value": {"code": 250, "enhancedCode": None, "message": "ok"}}]}
    assert decide(answer) == {"action": "continue", "reason": "ok"}


def test_header_operations_in_the_drafts_order():
    """set, then add, then delete; each index means the list as the operations before left it."""
    answer = {
        "set": [{"path": "/message/headers/3/value", "value": " new"}],
        "add": [
            {"path": "/message/headers", "value": {"name": "X-Scanned", "value": " yes"}, "index": 0},
            {"path": "/message/headers", "value": {"name": "X-Last", "value": " 1"}},
        ],
        # After the adds, index 5 is the second X-Spam (older) and 2 is To.
        "delete": [{"path": "/message/headers/5"}, {"path": "/message/headers/2"}],
    }
    assert decide(answer)["modifications"] == [
        {"op": "delete_header", "name": "To", "index": 1},
        {"op": "change_header", "name": "X-Spam", "index": 1, "value": " new"},
        {"op": "delete_header", "name": "X-Spam", "index": 2},
        {"op": "insert_header", "index": 0, "name": "X-Scanned", "value": " yes"},
        {"op": "insert_header", "index": 4, "name": "X-Last", "value": " 1"},  # below the last survivor
    ]


def test_renaming_a_header_in_place_is_refused():
    with pytest.raises(HookAnswerError, match="renaming 'Subject' to 'X-Subject'"):
        to_decision({"set": [{"path": "/message/headers/2", "value": {"name": "X-Subject", "value": " x"}}]}, BEFORE)


def test_the_subject():
    assert decide({"set": [{"path": "/message/subject", "value": "[SPAM] hello"}]})["modifications"] == [
        {"op": "change_header", "name": "Subject", "index": 1, "value": " [SPAM] hello"}
    ]
    with pytest.raises(HookAnswerError, match="only ASCII"):
        to_decision({"set": [{"path": "/message/subject", "value": "café"}]}, BEFORE)


def test_envelope_operations():
    answer = {
        "set": [{"path": "/envelope/from", "value": {"address": None, "parameters": {}}}],
        "add": [
            {"path": "/envelope/to", "value": {"address": "archive@example.org", "parameters": {"NOTIFY": "NEVER"}}}
        ],
        "delete": [{"path": "/envelope/to/0"}],
    }
    assert decide(answer)["modifications"] == [
        {"op": "change_from", "address": ""},
        {"op": "delete_rcpt", "address": "bob@example.net"},
        {"op": "add_rcpt", "address": "archive@example.org", "args": ["NOTIFY=NEVER"]},
    ]


def test_a_recipient_at_an_index_is_refused():
    with pytest.raises(HookAnswerError, match="at the end"):
        to_decision({"add": [{"path": "/envelope/to", "value": {"address": "a@b.c"}, "index": 0}]}, BEFORE)


def test_a_raw_message_becomes_header_changes_and_a_body():
    raw = (
        b"X-Scanned: yes\r\nFrom: Alice <alice@example.org>\r\nTo: Bob <bob@example.net>\r\n"
        b"Subject: hello\r\nX-Spam: older\r\n\r\nnew body\r\n"
    )
    answer = {
        "set": [{"path": "/rawMessage", "value": base64.b64encode(raw).decode()}],
        "add": [{"path": "/message/headers", "value": {"name": "X-Ignored", "value": " 1"}}],  # rawMessage wins
    }
    assert decide(answer)["modifications"] == [
        {"op": "delete_header", "name": "X-Spam", "index": 1},
        {"op": "insert_header", "index": 0, "name": "X-Scanned", "value": " yes"},
        {"op": "replace_body", "base64": base64.b64encode(b"new body\r\n").decode()},
    ]


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ([], "expected an object"),
        ({"patch": []}, "unknown member 'patch'"),
        ({"set": [{"path": "/action", "value": "tempfail"}]}, "'tempfail' is not one of"),
        ({"set": [{"path": "/queue/id", "value": "x"}]}, "/queue/id: set is not supported"),
        ({"delete": [{"path": "/message/headers/9"}]}, "index 9 is out of range"),
        ({"delete": [{"path": "/message/headers/01"}]}, "'01' is not an index"),
        ({"set": [{"path": "action", "value": "reject"}]}, "expected a JSON Pointer"),
        ({"set": [{"path": "/response", "value": {"code": 700}}]}, "expected an SMTP reply code"),
        ({"set": [{"path": "/rawMessage", "value": "%%%"}]}, "not base64"),
        ({"add": [{"path": "/message/headers"}]}, "has no value"),
        ({"delete": [{"path": "/envelope/to/0", "value": 1}]}, "is not a delete operation"),
    ],
)
def test_answers_that_cannot_be_carried_out(answer, error):
    with pytest.raises(HookAnswerError, match=error):
        to_decision(answer, BEFORE)


# -- the header numbering, against a model of the contract ----------------------------------------


def apply_contract(before: tuple[tuple[str, str], ...], modifications: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """What the contract says the bridge's header ops do: numbering as in ``before``."""
    ordinal = []
    seen: dict[str, int] = {}
    for name, _ in before:
        seen[name.lower()] = seen.get(name.lower(), 0) + 1
        ordinal.append((name.lower(), seen[name.lower()]))
    values: list[str | None] = [value for _, value in before]
    inserts: dict[int, list[tuple[str, str]]] = {}
    for op in modifications:
        if op["op"] == "insert_header":
            inserts.setdefault(op["index"], []).append((op["name"], op["value"]))
            continue
        position = ordinal.index((op["name"].lower(), op["index"]))
        values[position] = None if op["op"] == "delete_header" else op["value"]
    result = list(inserts.get(0, []))
    for position, (name, _) in enumerate(before):
        if values[position] is not None:
            result.append((name, values[position]))
        result.extend(inserts.get(position + 1, []))
    return result


names = st.sampled_from(["A", "B", "X-Spam"])
values = st.sampled_from([" 1", " 2", " 3"])
operation = st.one_of(
    st.tuples(st.just("add"), names, values, st.integers(0, 12) | st.none()),
    st.tuples(st.just("delete"), st.integers(0, 12)),
    st.tuples(st.just("set"), st.integers(0, 12), values),
)


@given(st.lists(st.tuples(names, values), max_size=6), st.lists(operation, max_size=8))
def test_header_changes_give_the_list_the_operations_describe(before, operations):
    """Whatever the operations, the bridge's header ops turn the request's headers into the list the
    operations describe (applied in the draft's order)."""
    before = tuple(before)
    current = list(before)
    answer: dict[str, list[dict[str, Any]]] = {"set": [], "add": [], "delete": []}
    for kind in ("set", "add", "delete"):  # build a valid answer by simulating the draft's order
        for op in (o for o in operations if o[0] == kind):
            if kind == "add":
                _, name, value, index = op
                if index is not None and index > len(current):
                    continue
                current.insert(len(current) if index is None else index, (name, value))
                entry = {"path": "/message/headers", "value": {"name": name, "value": value}}
                answer["add"].append(entry | ({} if index is None else {"index": index}))
            elif kind == "delete" and op[1] < len(current):
                del current[op[1]]
                answer["delete"].append({"path": f"/message/headers/{op[1]}"})
            elif kind == "set" and op[1] < len(current):
                current[op[1]] = (current[op[1]][0], op[2])
                answer["set"].append({"path": f"/message/headers/{op[1]}/value", "value": op[2]})
    decision = to_decision(answer, Before(headers=before)) or {}
    assert apply_contract(before, decision.get("modifications", [])) == current
