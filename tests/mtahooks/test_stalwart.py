"""Stalwart's own MTA hook format: requests from the contract's examples, answers turned into decisions."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from milterbridge.milter.constants import Event
from milterbridge.mtahooks import STAGES, Before, HookAnswerError, hook_request, stalwart_decision, stalwart_request
from milterbridge.policy.parse import parse_decision
from tests.mtahooks.test_answer import BEFORE, apply_contract
from tests.mtahooks.test_request import example
from tests.mtahooks.test_schemas import STAGED, validator


def decide(answer: Any, event: Event = Event.EOM, before: Before = BEFORE) -> dict[str, Any] | None:
    """The decision, after checking that the bridge's parser accepts it at ``event``."""
    decision = stalwart_decision(answer, before)
    parse_decision(decision, event, max_modifications=1000)
    return decision


# -- requests ---------------------------------------------------------------------------------


def test_the_data_stage_carries_headers_body_and_size():
    ours = example("request-eom")
    request = stalwart_request(ours, Event.EOM)
    assert request["context"] == {
        "stage": "data",
        "client": {
            "ip": "192.0.2.1",
            "port": 54321,
            "ptr": "mail.example.org",
            "helo": "mail.example.org",
            "activeConnections": 1,
        },
        "sasl": None,
        "tls": hook_request(ours, Event.EOM)["tls"],  # the same helper, the same members
        "server": {"name": "mx.example.net", "ip": "198.51.100.25", "port": None},
        "queue": {"id": "4dFk2R0xyzz9sWF"},
        "protocol": {"version": 1},
    }
    assert request["context"]["tls"]["cipher"] == "TLS_AES_256_GCM_SHA384"
    assert request["envelope"]["from"] == {
        "address": "alice@example.org",
        "parameters": {"SIZE": "1834", "BODY": "8BITMIME"},
    }
    assert [rcpt["address"] for rcpt in request["envelope"]["to"]] == ["bob@example.net", "carol@example.net"]
    message = request["message"]
    assert message["headers"][0] == ["From", " Alice <alice@example.org>\r\n"]
    assert message["headers"][1] == ["To", " Bob <bob@example.net>,\r\n\tCarol <carol@example.net>\r\n"]
    assert message["headers"][2] == ["Subject", " Caf\ufffd cr\ufffdme\r\n"]  # Latin-1 bytes, decoded as Stalwart does
    assert [name for name, _ in message["headers"]] == [h["name"] for h in ours["message"]["headers"]]
    assert message["serverHeaders"] == []
    body = base64.b64decode(ours["message"]["body"]["base64"])
    assert message["contents"] == body.decode("utf-8", "replace")
    assert message["size"] == len(base64.b64decode(hook_request(ours, Event.EOM)["rawMessage"]))


def test_without_the_body_there_are_no_contents():
    ours = example("request-eom")
    del ours["message"]["body"]
    message = stalwart_request(ours, Event.EOM)["message"]
    assert message["contents"] is None
    assert message["size"] is None
    assert len(message["headers"]) == len(ours["message"]["headers"])


def test_before_data_there_is_no_message():
    request = stalwart_request(example("request-eom"), Event.RCPT)
    assert request["context"]["stage"] == "rcpt"
    assert request["message"] is None
    assert request["envelope"]["to"][-1]["parameters"] == {
        "NOTIFY": "SUCCESS,FAILURE",
        "ORCPT": "rfc822;carol@example.net",
    }


def test_connect_has_neither_envelope_nor_queue_but_a_server():
    ours = example("request-eom")
    del ours["message"]
    ours["session"]["macros"] = {}
    request = stalwart_request(ours, Event.CONNECT)
    assert request["context"]["stage"] == "connect"
    assert request["envelope"] is None
    assert request["context"]["queue"] is None
    assert request["context"]["server"] == {"name": None, "ip": None, "port": None}


def test_the_null_sender_is_an_empty_address():
    ours = example("request-eom")
    ours["message"]["mail_from"] = {"address": "", "raw": "<>", "args": []}
    assert stalwart_request(ours, Event.MAIL)["envelope"]["from"] == {"address": "", "parameters": {}}


def test_sasl_and_server_port_come_from_the_macros():
    ours = example("request-eom")
    ours["message"]["macros"] |= {"{auth_authen}": "alice", "{auth_type}": "PLAIN"}
    ours["session"]["macros"]["{daemon_port}"] = "587"
    context = stalwart_request(ours, Event.EOM)["context"]
    assert context["sasl"] == {"login": "alice", "method": "PLAIN"}
    assert context["server"]["port"] == 587


def test_stages_are_the_mta_hook_ones():
    assert [stalwart_request(example("request-eom"), e)["context"]["stage"] for e in STAGES] == [
        "connect",
        "ehlo",
        "mail",
        "rcpt",
        "data",
    ]
    with pytest.raises(KeyError):
        stalwart_request(example("request-eom"), Event.HEADER)


@pytest.mark.parametrize(("event", "payload"), STAGED, ids=[f"{e}-{i}" for i, (e, _) in enumerate(STAGED)])
def test_requests_from_the_contracts_examples_fit_the_schema(event, payload):
    request = stalwart_request(payload, Event(event))
    validator("stalwart-request").validate(request)
    assert request["context"]["stage"] == STAGES[Event(event)]
    assert (request["message"] is not None) == (Event(event) == Event.EOM)


def test_the_request_schema_refuses_what_stalwart_does_not_send():
    request = stalwart_request(example("request-eom"), Event.EOM)
    context = request["context"]
    client = {key: value for key, value in context["client"].items() if key != "helo"}
    broken: list[dict[str, Any]] = [
        {**request, "context": {**context, "stage": "DATA"}},  # the docs' spelling, not the code's
        {**request, "context": {**context, "protocol": {"version": "1.0"}}},
        {**request, "context": {**context, "client": {**client, "ehlo": "mail.example.org"}}},
        {**request, "message": {**request["message"], "headers": [{"name": "From", "value": " a"}]}},
        {**request, "extra": 1},
    ]
    for document in broken:
        assert not validator("stalwart-request").is_valid(document)


# -- answers: actions and the response -----------------------------------------------------------


@pytest.mark.parametrize("answer", [None, {}])
def test_no_answer_is_continue(answer):
    assert decide(answer) is None


@pytest.mark.parametrize("answer", [{"action": "accept"}, {"action": None, "response": None, "modifications": None}])
def test_accept_is_continue(answer):
    assert decide(answer) == {"action": "continue"}


@pytest.mark.parametrize("spelling", ["enhancedStatus", "enhanced_status"])
def test_reject_with_a_response(spelling):
    answer = {"action": "reject", "response": {"status": 554, spelling: "5.7.1", "message": "policy"}}
    assert decide(answer) == {"action": "reject", "reply": {"code": 554, "enhanced": "5.7.1", "text": "policy"}} | {
        "reason": "policy"
    }


def test_reject_with_a_4xx_status_is_a_tempfail():
    answer = {"action": "reject", "response": {"status": 451, "enhanced_status": "4.7.1", "message": "later"}}
    assert decide(answer, Event.RCPT) == {
        "action": "tempfail",
        "reply": {"code": 451, "enhanced": "4.7.1", "text": "later"},
        "reason": "later",
    }


def test_reject_without_a_response():
    assert decide({"action": "reject"}, Event.MAIL) == {"action": "reject"}


def test_reject_and_disconnect_is_a_421():
    answer = {
        "action": "reject",
        "response": {"status": 550, "enhancedStatus": "5.7.1", "message": "go away", "disconnect": True},
    }
    assert decide(answer, Event.HELO) == {
        "action": "tempfail",
        "reply": {"code": 421, "enhanced": "4.7.0", "text": "go away"},  # a 5.x.x code cannot go with 421
        "reason": "go away",
    }
    answer["response"] |= {"enhancedStatus": "4.3.2", "message": None}
    assert decide(answer, Event.HELO) == {
        "action": "tempfail",
        "reply": {"code": 421, "enhanced": "4.3.2", "text": "closing the connection"},
    }


def test_disconnect_is_not_carried_out_with_the_other_actions():
    """Stalwart does not read the response of accept and quarantine; a discard must stay a discard."""
    response = {"status": 250, "enhancedStatus": "2.0.0", "message": "ok", "disconnect": True}
    assert decide({"action": "accept", "response": response}) == {"action": "continue", "reason": "ok"}
    assert decide({"action": "discard", "response": response}) == {"action": "discard", "reason": "ok"}
    assert decide({"action": "quarantine", "response": response}) == {"action": "quarantine", "reason": "ok"}


def test_quarantine_and_discard():
    assert decide({"action": "quarantine"}) == {"action": "quarantine", "reason": "quarantined by the scanner"}
    assert decide({"action": "discard"}) == {"action": "discard"}


# -- answers: modifications ------------------------------------------------------------------


def modifications(*items: dict[str, Any]) -> list[dict[str, Any]]:
    decision = decide({"action": "accept", "modifications": list(items)})
    assert decision is not None
    return decision.get("modifications", [])


@pytest.mark.parametrize(
    ("item", "ops"),
    [
        (
            {"type": "changeFrom", "value": "new@example.org", "parameters": {"RET": "HDRS", "ENVID": None}},
            [{"op": "change_from", "address": "new@example.org", "args": ["RET=HDRS", "ENVID"]}],
        ),
        ({"type": "changeFrom", "value": "<>"}, [{"op": "change_from", "address": ""}]),
        (
            {"type": "addRecipient", "value": "archive@example.org", "parameters": {"NOTIFY": "NEVER"}},
            [{"op": "add_rcpt", "address": "archive@example.org", "args": ["NOTIFY=NEVER"]}],
        ),
        (
            {"type": "addRcpt", "value": "<archive@example.org>", "parameters": None},
            [{"op": "add_rcpt", "address": "archive@example.org"}],
        ),
        (
            {"type": "deleteRecipient", "value": "bob@example.net"},
            [{"op": "delete_rcpt", "address": "bob@example.net"}],
        ),
        ({"type": "deleteRcpt", "value": "CAROL@example.net"}, [{"op": "delete_rcpt", "address": "carol@example.net"}]),
        (
            {"type": "replaceContents", "value": "new body\r\n"},
            [{"op": "replace_body", "base64": base64.b64encode(b"new body\r\n").decode()}],
        ),
        (
            {"type": "addHeader", "name": "X-Scanned", "value": "yes"},
            [{"op": "insert_header", "index": 5, "name": "X-Scanned", "value": "yes"}],
        ),
        (
            {"type": "insertHeader", "index": 0, "name": "X-First", "value": "1"},
            [{"op": "insert_header", "index": 0, "name": "X-First", "value": "1"}],
        ),
        (
            {"type": "insertHeader", "index": 2, "name": "X-Third", "value": "3"},
            [{"op": "insert_header", "index": 2, "name": "X-Third", "value": "3"}],
        ),
        (
            {"type": "changeHeader", "index": 2, "name": "x-spam", "value": " new"},
            [{"op": "change_header", "name": "X-Spam", "index": 2, "value": " new"}],
        ),
        (
            {"type": "changeHeader", "index": 1, "name": "Subject", "value": ""},
            [{"op": "delete_header", "name": "Subject", "index": 1}],
        ),
        (
            {"type": "deleteHeader", "index": 1, "name": "X-Spam"},
            [{"op": "delete_header", "name": "X-Spam", "index": 1}],
        ),
    ],
)
def test_each_modification(item, ops):
    assert modifications(item) == ops


def test_modifications_apply_to_the_message_as_the_ones_before_left_it():
    ops = modifications(
        {"type": "deleteHeader", "index": 1, "name": "X-Spam"},
        {"type": "deleteHeader", "index": 1, "name": "X-Spam"},  # the second one, now the first
        {"type": "insertHeader", "index": 3, "name": "X-After-Subject", "value": "1"},
        {"type": "changeHeader", "index": 1, "name": "X-After-Subject", "value": "2"},
        {"type": "addRecipient", "value": "dave@example.org"},
        {"type": "deleteRecipient", "value": "dave@example.org"},
    )
    assert ops == [
        {"op": "delete_header", "name": "X-Spam", "index": 1},
        {"op": "delete_header", "name": "X-Spam", "index": 2},
        {"op": "insert_header", "index": 3, "name": "X-After-Subject", "value": "2"},
    ]


def test_a_value_copied_from_the_request_is_no_change():
    request = stalwart_request(example("request-eom"), Event.EOM)
    name, value = request["message"]["headers"][1]  # folded, with CRLF line ends
    before = Before(headers=((name, " Bob <bob@example.net>,\n\tCarol <carol@example.net>"),))
    answer = {"modifications": [{"type": "changeHeader", "index": 1, "name": name, "value": value}]}
    assert decide(answer, before=before) == {"action": "continue"}


def test_the_docs_example_answer():
    """https://stalw.art/docs/api/mta-hooks/response, with a recipient and headers the message has."""
    before = Before(
        headers=(("From", " a@example.com"), ("X-Mailer", " m"), ("Subject", " s")), rcpts=("jane@foobar.com",)
    )
    answer = {
        "action": "accept",
        "response": {"status": 250, "enhancedStatus": "2.0.0", "message": "Message accepted", "disconnect": False},
        "modifications": [
            {"type": "changeFrom", "value": "new@example.com", "parameters": {"size": 54321}},
            {"type": "addRecipient", "value": "tom@example.com", "parameters": None},
            {"type": "deleteRecipient", "value": "jane@foobar.com"},
            {"type": "replaceContents", "value": "This is the new body\r\n"},
            {"type": "addHeader", "name": "X-Spam-Status", "value": "No"},
            {"type": "insertHeader", "index": 1, "name": "X-Filtered-By", "value": "Custom Filter v1.1"},
            {"type": "changeHeader", "index": 1, "name": "Subject", "value": "This is the new subject"},
            {"type": "deleteHeader", "index": 1, "name": "X-Mailer"},
        ],
    }
    validator("stalwart-answer").validate(answer)
    assert decide(answer, before=before) == {
        "action": "continue",
        "reason": "Message accepted",
        "modifications": [
            {"op": "change_from", "address": "new@example.com", "args": ["size=54321"]},
            {"op": "delete_rcpt", "address": "jane@foobar.com"},
            {"op": "add_rcpt", "address": "tom@example.com"},
            {"op": "delete_header", "name": "X-Mailer", "index": 1},
            {"op": "change_header", "name": "Subject", "index": 1, "value": "This is the new subject"},
            {"op": "insert_header", "index": 1, "name": "X-Filtered-By", "value": "Custom Filter v1.1"},
            {"op": "insert_header", "index": 3, "name": "X-Spam-Status", "value": "No"},
            {"op": "replace_body", "base64": base64.b64encode(b"This is the new body\r\n").decode()},
        ],
    }


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ([], "answer: expected an object"),
        ({"action": "accept", "set": []}, "unknown member 'set'"),
        ({"action": "tempfail"}, "/action: 'tempfail' is not one of"),
        ({"action": "reject", "response": {"status": 700}}, "/response/status: expected an SMTP reply code"),
        ({"action": "reject", "response": {"status": True}}, "/response/status"),
        ({"action": "reject", "response": {"code": 550}}, "/response: unknown member 'code'"),
        ({"action": "reject", "response": {"message": 5}}, "/response/message: expected text"),
        ({"action": "reject", "response": {"enhancedStatus": "5.7.1", "enhanced_status": "5.7.1"}}, "give one"),
        ({"action": "reject", "response": {"disconnect": "yes"}}, "/response/disconnect: expected true or false"),
        ({"modifications": {"type": "addHeader"}}, "/modifications: expected an array"),
        ({"modifications": ["addHeader"]}, "/modifications/0: expected an object with a type"),
        ({"modifications": [{"type": "addHeaders"}]}, "/modifications/0/type: unknown type 'addHeaders'"),
        ({"modifications": [{"type": "addHeader", "name": "X"}]}, "/modifications/0/value: addHeader needs value"),
        ({"modifications": [{"type": "deleteRcpt", "value": "a@b.c", "x": 1}]}, "deleteRcpt has no member 'x'"),
        ({"modifications": [{"type": "addHeader", "name": 1, "value": "v"}]}, "/modifications/0/name: expected text"),
        (
            {"modifications": [{"type": "changeHeader", "index": 0, "name": "Subject", "value": "x"}]},
            "/modifications/0/index: expected a number from 1",
        ),
        (
            {"modifications": [{"type": "deleteHeader", "index": 3, "name": "X-Spam"}]},
            "/modifications/0/index: there is no X-Spam header number 3",
        ),
        (
            {"modifications": [{"type": "deleteHeader", "index": 1, "name": "X-Missing"}]},
            "there is no X-Missing header number 1",
        ),
        (
            {"modifications": [{"type": "insertHeader", "index": 6, "name": "X", "value": "1"}]},
            "/modifications/0/index: index 6 is out of range",
        ),
        (
            {"modifications": [{"type": "deleteRecipient", "value": "dave@example.org"}]},
            "/modifications/0/value: 'dave@example.org' is not a recipient",
        ),
        ({"modifications": [{"type": "addRecipient", "value": "<>"}]}, "a recipient needs an address"),
        (
            {"modifications": [{"type": "changeFrom", "value": "a@b.c", "parameters": ["SIZE=1"]}]},
            "/modifications/0/parameters: expected a map",
        ),
        (
            {"modifications": [{"type": "changeFrom", "value": "a@b.c", "parameters": {"SIZE": 1.5}}]},
            "/modifications/0/parameters/SIZE: expected text or null",
        ),
        (
            {"modifications": [{"type": "replaceContents", "value": "a"}, {"type": "replaceContents", "value": "b"}]},
            "/modifications/1: only one replaceContents per answer",
        ),
    ],
)
def test_invalid_answers_name_the_member(answer, error):
    with pytest.raises(HookAnswerError, match=error):
        stalwart_decision(answer, BEFORE)


# -- the answer schema and the code agree ---------------------------------------------------------

ANSWERS: list[Any] = [
    {},
    {"action": "reject", "response": {"status": 550, "enhanced_status": "5.7.1", "message": "no", "disconnect": False}},
    {"action": "discard", "response": {"enhancedStatus": "2.0.0", "message": None}},
    {"action": None, "modifications": [{"type": "addRcpt", "value": "a@example.org"}]},
    {"modifications": [{"type": "deleteRcpt", "value": "bob@example.net"}, {"type": "changeFrom", "value": ""}]},
    {"modifications": [{"type": "insertHeader", "index": 0, "name": "X-A", "value": "1"}]},
    {"modifications": [{"type": "changeHeader", "index": 2, "name": "X-Spam", "value": "x"}]},
]
REFUSED: list[Any] = [
    {"action": "disconnect"},
    {"action": "accept", "extra": 1},
    {"response": {"status": 550, "enhancedStatus": "5.7.1", "enhanced_status": "5.7.1"}},
    {"modifications": [{"type": "changeHeader", "index": 0, "name": "Subject", "value": "x"}]},
    {"modifications": [{"type": "addHeader", "name": "X-A"}]},
    {"modifications": [{"type": "removeHeader", "index": 1, "name": "X-Spam"}]},
]


@pytest.mark.parametrize("answer", ANSWERS)
def test_answers_the_bridge_carries_out_fit_the_schema(answer):
    validator("stalwart-answer").validate(answer)
    decide(answer)


@pytest.mark.parametrize("answer", REFUSED)
def test_answers_outside_the_schema_are_refused_by_the_bridge(answer):
    assert not validator("stalwart-answer").is_valid(answer)
    with pytest.raises(HookAnswerError):
        stalwart_decision(answer, BEFORE)


# -- the header numbering, against the contract's model -------------------------------------------

names = st.sampled_from(["A", "B", "X-Spam"])
values = st.sampled_from([" 1", " 2", " 3"])
operation = st.one_of(
    st.tuples(st.just("addHeader"), names, values),
    st.tuples(st.just("insertHeader"), st.integers(0, 12), names, values),
    st.tuples(st.just("changeHeader"), st.integers(1, 4), names, values),
    st.tuples(st.just("deleteHeader"), st.integers(1, 4), names),
)


def nth(headers: list[tuple[str, str]], name: str, index: int) -> int | None:
    same = [position for position, (other, _) in enumerate(headers) if other.lower() == name.lower()]
    return same[index - 1] if index <= len(same) else None


@given(st.lists(st.tuples(names, values), max_size=6), st.lists(operation, max_size=8))
def test_header_changes_give_the_list_the_modifications_describe(before, operations):
    """Whatever the modifications, the bridge's header ops turn the request's headers into the list they
    describe, applied in order with the numbering the module documents."""
    before = tuple(before)
    current = list(before)
    items: list[dict[str, Any]] = []
    for op in operations:  # keep the ones that name a header or position that exists, applying them as we go
        if op[0] == "addHeader":
            current.append((op[1], op[2]))
            items.append({"type": "addHeader", "name": op[1], "value": op[2]})
        elif op[0] == "insertHeader" and op[1] <= len(current):
            current.insert(op[1], (op[2], op[3]))
            items.append({"type": "insertHeader", "index": op[1], "name": op[2], "value": op[3]})
        elif op[0] in ("changeHeader", "deleteHeader") and (position := nth(current, op[2], op[1])) is not None:
            item = {"type": op[0], "index": op[1], "name": op[2]}
            if op[0] == "changeHeader":
                current[position] = (current[position][0], op[3])
                items.append(item | {"value": op[3]})
            else:
                del current[position]
                items.append(item)
    decision = stalwart_decision({"modifications": items}, Before(headers=before)) or {}
    assert apply_contract(before, decision.get("modifications", [])) == current
