"""Decision builders: every output passes the bridge's parser and the OpenAPI schema; bad input fails at once."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import pytest

from milterbridge import sdk
from milterbridge.milter.constants import Event
from milterbridge.policy.model import ActionName, ChangeHeaderOp, ReplaceBodyOp, SmtpReply
from milterbridge.policy.parse import MAX_HEADER_NAME_BYTES, MAX_REASON_CHARS, parse_decision
from tests import contract

MODIFICATIONS: list[sdk.Modification] = [
    sdk.add_header("X-Spam-Score", " 7.1\n\t(bayes 3.2)"),
    sdk.insert_header(0, "X-Trace", "checked"),
    sdk.change_header("Subject", 1, " [SPAM] hello"),
    sdk.delete_header("X-Spam-Flag"),
    sdk.delete_header("Received", 2),
    sdk.add_rcpt("archive@example.org", ["NOTIFY=NEVER"]),
    sdk.add_rcpt("copy@example.org"),
    sdk.delete_rcpt("carol@example.net"),
    sdk.change_from("bounces@example.org", ["RET=HDRS"]),
    sdk.change_from(""),
    sdk.replace_body(b"new body\r\n\xff\x00"),
]

DECISIONS: list[sdk.Decision] = [
    sdk.continue_(),
    sdk.continue_(reason="tagged", modifications=MODIFICATIONS),
    sdk.accept(reason="done"),
    sdk.reject(),
    sdk.reject(550, "5.7.1", "No thanks", reason="spam score 12.3"),
    sdk.reject(554, text=["first line", "see https://example.org/policy 100%"]),
    sdk.tempfail(),
    sdk.tempfail(451, "4.7.1", "Greylisted", reason="greylist"),
    sdk.tempfail(421),
    sdk.discard(reason="trap address"),
    sdk.quarantine("suspected phishing"),
    sdk.quarantine(),
    sdk.skip(),
]


@pytest.mark.parametrize("decision", DECISIONS, ids=lambda d: str(d.action))
def test_every_builder_passes_the_parser_and_the_schema_at_every_legal_event(decision: sdk.Decision) -> None:
    """Wherever the action is legal, the encoded decision passes parse_decision and the event's OpenAPI schema."""
    legal = [e for e in contract.DECISION_EVENTS if str(decision.action) in contract.legal_actions(e)]
    assert legal
    for event in legal:
        if event == "unknown" and decision.modifications:
            with pytest.raises(ValueError, match="modifications: not allowed at unknown"):
                decision.encode(event)
            continue
        document = json.loads(decision.encode(event))
        parsed = parse_decision(document, Event(event), max_modifications=sdk.MAX_MODIFICATIONS)
        assert parsed.action == decision.action
        contract.validate_decision(event, document)


def test_the_parsed_decision_is_what_was_built() -> None:
    """The bridge reads back the reply, the reason and the modifications the builders were given."""
    body = b"new body\r\n\xff"
    decision = sdk.reject(
        550,
        "5.7.1",
        "No thanks",
        reason="spam",
        modifications=[sdk.change_header("Subject", 2, " x"), sdk.replace_body(body)],
    )
    parsed = parse_decision(json.loads(decision.encode("eom")), Event.EOM, max_modifications=1000)
    assert parsed.action is ActionName.REJECT
    assert parsed.reply == SmtpReply(code=550, enhanced="5.7.1", lines=("No thanks",))
    assert parsed.reason == "spam"
    assert parsed.modifications == (ChangeHeaderOp(name="Subject", index=2, value=" x"), ReplaceBodyOp(body=body))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: sdk.reject(450), "reject: reply.code: must be between 500 and 599"),
        (lambda: sdk.tempfail(550), "tempfail: reply.code: must be between 400 and 499"),
        (lambda: sdk.reject(550, "4.7.1"), "reject: reply.enhanced: class 4 does not match code 550"),
        (lambda: sdk.reject(550, "5.7"), "reject: reply.enhanced: expected the form 5.7.1"),
        (lambda: sdk.reject(550, text=""), "reject: reply.text: must not be empty"),
        (lambda: sdk.reject(550, text="a\r\nb"), "reject: reply.text: must not contain CR, LF or NUL"),
        (lambda: sdk.reject(550, text=["x"] * 33), "reject: reply.text: 1 to 32 lines"),
        (lambda: sdk.reject(550, text="x" * 600), "reject: reply.text: longer than 512 bytes"),
        (lambda: sdk.reject(enhanced="5.7.1"), "reply: a code is needed"),
        (lambda: sdk.continue_(reason="a\nb"), "continue: reason: must not contain CR, LF or NUL"),
        (lambda: sdk.accept(reason="x" * (MAX_REASON_CHARS + 1)), "accept: reason: longer than 1000"),
        (lambda: sdk.add_header("X Bad", "v"), "add_header: name: 'X Bad' must be printable ASCII"),
        (lambda: sdk.add_header("X-" + "a" * MAX_HEADER_NAME_BYTES, "v"), "add_header: name: longer than 256"),
        (lambda: sdk.add_header("X-A", "a\nb"), "add_header: value: LF is allowed only to fold"),
        (lambda: sdk.add_header("X-A", "a\x00"), "add_header: value: control character U+0000"),
        (lambda: sdk.insert_header(-1, "X-A", "v"), "insert_header: index: must be between 0 and"),
        (lambda: sdk.change_header("X-A", 0, "v"), "change_header: index: must be between 1 and"),
        (lambda: sdk.delete_header("X-A", 0), "delete_header: index: must be between 1 and"),
        (lambda: sdk.add_rcpt(""), "add_rcpt: address: must not be empty"),
        (lambda: sdk.add_rcpt("<a@example.org>"), "add_rcpt: address:"),
        (lambda: sdk.delete_rcpt("no-at-sign"), "delete_rcpt: address:"),
        (lambda: sdk.add_rcpt("a@example.org", ["NOTIFY=NEVER FAILURE"]), "add_rcpt: args[0]: must be non-empty"),
        (lambda: sdk.change_from("a@example.org", ["X"] * 17), "change_from: args: at most 16 arguments"),
        (
            lambda: sdk.continue_(modifications=[sdk.delete_header("X-A")] * (sdk.MAX_MODIFICATIONS + 1)),
            "continue: modifications: at most 1000",
        ),
    ],
)
def test_invalid_input_raises_value_error_with_the_rule(build: Callable[[], object], message: str) -> None:
    """A builder refuses what the bridge would refuse, at once, naming the rule."""
    with pytest.raises(ValueError) as info:
        build()
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    ("decision", "event"),
    [
        (sdk.discard(), "connect"),
        (sdk.reject(550), "unknown"),
        (sdk.accept(), "unknown"),
        (sdk.skip(), "eom"),
        (sdk.quarantine("x"), "unknown"),
    ],
)
def test_encode_refuses_an_action_the_event_does_not_allow(decision: sdk.Decision, event: str) -> None:
    """encode(event) checks the per-event action table, like the bridge."""
    with pytest.raises(ValueError, match=f"is not allowed at {event}"):
        decision.encode(event)
    with pytest.raises(contract.ValidationError):
        contract.validate_decision(event, decision.to_json())


def test_a_decision_built_by_hand_is_still_checked_on_encode() -> None:
    """The dataclasses can be built directly, but encode() runs the bridge's parser all the same."""
    bad = sdk.Decision(ActionName.CONTINUE, reply=sdk.Reply(550))
    with pytest.raises(ValueError, match="reply: allowed only with reject or tempfail"):
        bad.encode()
    with pytest.raises(ValueError, match="unknown event"):
        sdk.continue_().encode("bogus")


def test_values_are_immutable_and_comparable() -> None:
    """Builders give frozen values: equal inputs, equal decisions, usable as dict keys."""
    first = sdk.reject(550, text=["a", "b"], modifications=[sdk.add_rcpt("a@example.org", ["NOTIFY=NEVER"])])
    second = sdk.reject(550, text=("a", "b"), modifications=(sdk.add_rcpt("a@example.org", ("NOTIFY=NEVER",)),))
    assert first == second
    assert {first: 1}[second] == 1
    assert json.loads(first.encode()) == first.to_json()
    assert sdk.replace_body(b"\xff").to_json() == {"op": "replace_body", "base64": "/w=="}


def test_header_values_as_bytes_go_as_value_b64_exactly() -> None:
    """Bytes (e.g. Latin-1 text a legacy reader expects) are sent as value_b64, which the bridge accepts."""
    raw = "Caf\u00e9 r\u00e9sum\u00e9".encode("latin-1")
    for mod in (
        sdk.add_header("X-Note", raw),
        sdk.insert_header(0, "X-Note", raw),
        sdk.change_header("X-Note", 1, raw),
    ):
        document = mod.to_json()
        assert "value" not in document
        assert base64.b64decode(document["value_b64"]) == raw
    with pytest.raises(ValueError, match="value"):
        sdk.add_header("X-Note", b"a\x00b")  # the bytes follow the same rules as text
