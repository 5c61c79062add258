"""The webhook contract: the OpenAPI document, its examples, what it refuses, and the docs that quote it."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from openapi_spec_validator import validate
from standardwebhooks.webhooks import Webhook

from tests.contract import (
    DECISION_EVENTS,
    EVENTS,
    NOTIFICATION_EVENTS,
    SPEC,
    ValidationError,
    decision_examples,
    legal_actions,
    request_examples,
    validate_decision,
    validate_request,
)

DOCS_PATH = Path(__file__).resolve().parent.parent / "docs" / "webhooks.md"

#: design.md §3.3's table of actions legal per event.
LEGAL_ACTIONS = {
    "connect": {"continue", "accept", "reject", "tempfail", "quarantine"},
    "helo": {"continue", "accept", "reject", "tempfail", "quarantine"},
    "mail": {"continue", "accept", "reject", "tempfail", "discard", "quarantine"},
    "rcpt": {"continue", "accept", "reject", "tempfail", "discard", "quarantine"},
    "data": {"continue", "accept", "reject", "tempfail", "discard", "quarantine"},
    "eoh": {"continue", "accept", "reject", "tempfail", "discard", "quarantine"},
    "header": {"continue", "accept", "reject", "tempfail", "discard", "quarantine", "skip"},
    "body": {"continue", "accept", "reject", "tempfail", "discard", "quarantine", "skip"},
    "eom": {"continue", "accept", "reject", "tempfail", "discard", "quarantine"},
    "unknown": {"continue", "tempfail"},
}
ALL_ACTIONS = ("continue", "accept", "reject", "tempfail", "discard", "skip", "quarantine")
ALL_OPS = (
    "add_header",
    "insert_header",
    "change_header",
    "delete_header",
    "replace_body",
    "add_rcpt",
    "delete_rcpt",
    "change_from",
)


def _example(name: str) -> dict[str, Any]:
    return copy.deepcopy(SPEC["components"]["examples"][name]["value"])


def _with_mods(*mods: dict[str, Any]) -> dict[str, Any]:
    return {"action": "continue", "modifications": list(mods)}


def _add_header(name: str = "X-Tag", value: str = " yes") -> dict[str, Any]:
    return {"op": "add_header", "name": name, "value": value}


# ---------------------------------------------------------------- the document


def test_document_is_valid_openapi_31() -> None:
    """openapi-spec-validator accepts the document, and it declares OpenAPI 3.1."""
    validate(SPEC)
    assert SPEC["openapi"].startswith("3.1.")


def test_webhooks_are_exactly_the_fixed_events() -> None:
    """One webhook per fixed event name; abort and close are the notifications."""
    assert set(EVENTS) == set(LEGAL_ACTIONS) | {"abort", "close"}
    assert set(NOTIFICATION_EVENTS) == {"abort", "close"}
    assert set(DECISION_EVENTS) == set(LEGAL_ACTIONS)


@pytest.mark.parametrize("event", EVENTS)
def test_webhook_has_request_headers_and_responses(event: str) -> None:
    """Each webhook posts its own request schema with the fixed headers and answers 200, 204 and default."""
    post = SPEC["webhooks"][event]["post"]
    body = post["requestBody"]
    assert body["required"] is True
    media = body["content"]["application/json"]
    assert media["schema"]["$ref"] == f"#/components/schemas/{event.capitalize()}Request"
    params = [SPEC["components"]["parameters"][p["$ref"].rsplit("/", 1)[1]] for p in post["parameters"]]
    required = {p["name"]: p["required"] for p in params}
    assert required == {
        "webhook-id": True,
        "webhook-timestamp": True,
        "webhook-signature": False,
        "User-Agent": True,
        "traceparent": False,
    }
    assert {"200", "204", "default"} <= set(post["responses"])
    if event in DECISION_EVENTS:
        schema = post["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema["$ref"] == f"#/components/schemas/{event.capitalize()}Decision"


@pytest.mark.parametrize("event", EVENTS)
def test_every_event_has_a_request_example(event: str) -> None:
    """The document shows at least one request per event."""
    assert any(e == event for e, _ in request_examples())


@pytest.mark.parametrize(("event", "payload"), list(request_examples()))
def test_request_example_matches_its_schema(event: str, payload: dict[str, Any]) -> None:
    """Every request example validates against its webhook's request schema."""
    validate_request(event, payload)
    assert payload["event"] == event


@pytest.mark.parametrize(("event", "decision"), list(decision_examples()))
def test_decision_example_matches_its_schema(event: str, decision: object) -> None:
    """Every decision example validates against its event's decision schema."""
    validate_decision(event, decision)


def test_decision_examples_show_every_action_and_op() -> None:
    """The examples cover each action, each modification op, a multi-line reply and a quarantine reason."""
    decisions = [d for _, d in decision_examples()]
    assert {d["action"] for d in decisions} == set(ALL_ACTIONS)
    assert {m["op"] for d in decisions for m in d.get("modifications", [])} == set(ALL_OPS)
    assert any(isinstance(d.get("reply", {}).get("text"), list) for d in decisions)
    assert any(d["action"] == "quarantine" and d.get("reason") for d in decisions)


def test_request_ids_are_unique() -> None:
    """No two request examples share an id (it is the webhook-id)."""
    ids = [p["id"] for _, p in request_examples()]
    assert len(ids) == len(set(ids))


def test_request_examples_are_self_consistent() -> None:
    """data repeats what the event adds to session or message, as the descriptions say."""
    for event, p in request_examples():
        if event == "connect":
            assert p["data"] == p["session"]["client"]
        elif event == "helo":
            assert p["data"]["hostname"] == p["session"]["helo"]
        elif event == "mail":
            assert p["data"] == p["message"]["mail_from"]
            assert p["message"]["rcpt_to"] == []
        elif event == "rcpt":
            assert p["message"]["rcpt_to"][-1] == p["data"]
        elif event == "header":
            assert p["message"]["headers"][-1] == p["data"]
        body = (p["message"] or {}).get("body")
        if body is not None:
            size = len(base64.b64decode(body["base64"]))
            assert size < body["size"] if body.get("truncated") else size == body["size"]


def _b64_siblings(node: object) -> list[tuple[object, str]]:
    """(text value, base64) pairs found anywhere under node, by the <field>_b64 rule."""
    found: list[tuple[object, str]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key.endswith("_b64") and key != "macros_b64":
                text = node[key.removesuffix("_b64")]
                pairs = zip(text, value, strict=True) if isinstance(value, list) else [(text, value)]
                found.extend(pairs)
            elif key == "macros_b64":
                found.extend((node["macros"][name], v) for name, v in value.items())
            else:
                found.extend(_b64_siblings(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_b64_siblings(item))
    return found


def test_non_utf8_rule_holds_in_examples() -> None:
    """Each _b64 sibling holds bytes that are not UTF-8 and whose replacement decoding is the text field."""
    pairs = [pair for _, p in request_examples() for pair in _b64_siblings(p)]
    assert pairs, "the examples should show the non-UTF-8 rule at least once"
    for text, encoded in pairs:
        raw = base64.b64decode(encoded, validate=True)
        with pytest.raises(UnicodeDecodeError):
            raw.decode("utf-8")
        assert raw.decode("utf-8", "replace") == text


@pytest.mark.parametrize("event", DECISION_EVENTS)
def test_legal_actions_follow_the_design_table(event: str) -> None:
    """The decision schema accepts exactly the actions design §3.3 allows at this event."""
    assert legal_actions(event) == LEGAL_ACTIONS[event]


def test_limits_are_documented() -> None:
    """info.description states the response limits the schemas enforce."""
    text = SPEC["info"]["description"]
    for needle in ("512 bytes", "32 lines", "1000 modifications", "421", "doubles `%`", "CR, LF or NUL"):
        assert needle in text


def test_signature_as_described_verifies_with_standardwebhooks() -> None:
    """A signature built from the spec's prose, with two rotated keys, passes the standardwebhooks library."""
    description = SPEC["components"]["parameters"]["WebhookSignature"]["description"]
    assert "{webhook-id}.{webhook-timestamp}.{body}" in description
    old_key, new_key = b"old key bytes", b"new key bytes"
    body = json.dumps(_example("request-eom")).encode()
    webhook_id, timestamp = "evt_5c0e81d2a94b3f7e16d0c8a2", str(int(time.time()))
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    header = " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in (old_key, new_key)
    )
    assert re.fullmatch(SPEC["components"]["parameters"]["WebhookSignature"]["schema"]["pattern"], header)
    headers = {"webhook-id": webhook_id, "webhook-timestamp": timestamp, "webhook-signature": header}
    secret = "whsec_" + base64.b64encode(new_key).decode()
    assert Webhook(secret).verify(body, headers)["event"] == "eom"


@pytest.mark.parametrize("name", ["Decision", "Modification"])
def test_discriminators_are_pinned_by_const(name: str) -> None:
    """Each discriminator mapping target fixes the property with const, so picking the branch by it is exact."""
    schema = SPEC["components"]["schemas"][name]
    prop = schema["discriminator"]["propertyName"]
    mapping = schema["discriminator"]["mapping"]
    assert sorted(mapping.values()) == sorted(branch["$ref"] for branch in schema["oneOf"])
    for value, ref in mapping.items():
        target = SPEC["components"]["schemas"][ref.rsplit("/", 1)[1]]
        assert target["properties"][prop] == {"const": value}
        assert prop in target["required"]


def test_validate_rejects_unknown_events() -> None:
    """A name that is not an event, or a decision for a notification, is a usage error."""
    with pytest.raises(ValueError, match="unknown event"):
        validate_request("envfrom", {})
    with pytest.raises(ValueError, match="notification"):
        validate_decision("close", {"action": "continue"})


# ---------------------------------------------------------------- decisions the schema refuses

LINE_512 = "x" * 512
#: " Café" in Latin-1: a header value that is not UTF-8.
LATIN_1_B64 = base64.b64encode(b" Caf\xe9").decode()

INVALID_DECISIONS = [
    pytest.param("eom", {"action": "continue", "colour": "red"}, id="unknown-key"),
    pytest.param("eom", {}, id="no-action"),
    pytest.param("eom", {"action": "maybe"}, id="unknown-action"),
    pytest.param("eom", {"action": "CONTINUE"}, id="action-case"),
    pytest.param("eom", ["continue"], id="not-an-object"),
    pytest.param("eom", None, id="null"),
    pytest.param("connect", {"action": "discard"}, id="discard-at-connect"),
    pytest.param("helo", {"action": "discard"}, id="discard-at-helo"),
    pytest.param("eom", {"action": "skip"}, id="skip-at-eom"),
    pytest.param("rcpt", {"action": "skip"}, id="skip-at-rcpt"),
    pytest.param("unknown", {"action": "accept"}, id="accept-at-unknown"),
    pytest.param("unknown", {"action": "discard"}, id="discard-at-unknown"),
    pytest.param("unknown", {"action": "reject"}, id="reject-at-unknown"),
    pytest.param("unknown", {"action": "quarantine"}, id="quarantine-at-unknown"),
    pytest.param("unknown", {"action": "tempfail", "reply": {"code": 550}}, id="unknown-5xx"),
    pytest.param("eom", {"action": "continue", "reply": {"code": 250}}, id="reply-with-continue"),
    pytest.param("eom", {"action": "quarantine", "reply": {"code": 550}}, id="reply-with-quarantine"),
    pytest.param("rcpt", {"action": "accept", "reply": {"code": 550}}, id="reply-with-accept"),
    pytest.param("eom", {"action": "tempfail", "reply": {"code": 550}}, id="5xx-with-tempfail"),
    pytest.param("eom", {"action": "reject", "reply": {"code": 451}}, id="4xx-with-reject"),
    pytest.param("eom", {"action": "reject", "reply": {"code": 250}}, id="2xx-reply"),
    pytest.param("eom", {"action": "reject", "reply": {"code": "550"}}, id="code-as-string"),
    pytest.param("eom", {"action": "reject", "reply": {"text": "no"}}, id="reply-without-code"),
    pytest.param("eom", {"action": "reject", "reply": {"code": 550, "lang": "en"}}, id="reply-unknown-key"),
    pytest.param("eom", {"action": "reject", "reply": {"code": 550, "enhanced": "4.7.1"}}, id="enhanced-class-5-vs-4"),
    pytest.param(
        "eom", {"action": "tempfail", "reply": {"code": 451, "enhanced": "5.7.1"}}, id="enhanced-class-4-vs-5"
    ),
    pytest.param("eom", {"action": "reject", "reply": {"code": 550, "enhanced": "5.7"}}, id="enhanced-two-parts"),
    pytest.param("eom", {"action": "reject", "reply": {"code": 550, "enhanced": "5.7.1000"}}, id="enhanced-4-digits"),
    pytest.param("eom", {"action": "reject", "reply": {"code": 550, "text": "a\rb"}}, id="text-with-cr"),
    pytest.param("eom", {"action": "reject", "reply": {"code": 550, "text": "a\nb"}}, id="text-with-lf"),
    pytest.param("eom", {"action": "reject", "reply": {"code": 550, "text": "no\n"}}, id="text-trailing-lf"),
    pytest.param("eom", {"action": "reject", "reply": {"code": 550, "text": "a\x00"}}, id="text-with-nul"),
    pytest.param("eom", {"action": "reject", "reply": {"code": 550, "text": ["ok", "b\r\n"]}}, id="line-with-crlf"),
    pytest.param("eom", {"action": "reject", "reply": {"code": 550, "text": ["l"] * 33}}, id="33-lines"),
    pytest.param("eom", {"action": "reject", "reply": {"code": 550, "text": []}}, id="no-lines"),
    pytest.param("eom", {"action": "reject", "reply": {"code": 550, "text": ""}}, id="empty-text"),
    pytest.param("eom", {"action": "reject", "reply": {"code": 550, "text": ["a", ""]}}, id="empty-line"),
    pytest.param("eom", {"action": "reject", "reply": {"code": 550, "text": LINE_512 + "x"}}, id="513-chars"),
    pytest.param("eom", {"action": "reject", "reply": {"code": 550, "text": 7}}, id="text-not-string"),
    pytest.param("eom", {"action": "quarantine", "reason": "held\nfor review"}, id="reason-with-lf"),
    pytest.param("eom", {"action": "quarantine", "reason": "r" * 1001}, id="reason-too-long"),
    pytest.param("unknown", {"action": "tempfail", "modifications": [_add_header()]}, id="mods-at-unknown"),
    pytest.param("eom", _with_mods(*[_add_header()] * 1001), id="1001-modifications"),
    pytest.param("eom", {"action": "continue", "modifications": _add_header()}, id="mods-not-a-list"),
    pytest.param("eom", _with_mods({"op": "rewrite_body", "base64": ""}), id="unknown-op"),
    pytest.param("eom", _with_mods({"name": "X-A", "value": "1"}), id="no-op"),
    pytest.param("eom", _with_mods({**_add_header(), "index": 1}), id="add-header-with-index"),
    pytest.param("eom", _with_mods({"op": "add_header", "name": "X-A"}), id="add-header-without-value"),
    pytest.param("eom", _with_mods(_add_header(name="X-A:")), id="name-with-colon"),
    pytest.param("eom", _with_mods(_add_header(name="X A")), id="name-with-space"),
    pytest.param("eom", _with_mods(_add_header(name="")), id="empty-name"),
    pytest.param("eom", _with_mods(_add_header(name="X-Tëst")), id="name-not-ascii"),
    pytest.param("eom", _with_mods(_add_header(name="X-A\n")), id="name-trailing-lf"),
    pytest.param("eom", _with_mods(_add_header(name="X" * 257)), id="name-too-long"),
    pytest.param("eom", _with_mods(_add_header(value=" a\r\n\tb")), id="value-with-cr"),
    pytest.param("eom", _with_mods(_add_header(value=" a\nb")), id="value-lf-not-a-fold"),
    pytest.param("eom", _with_mods(_add_header(value=" a\n")), id="value-trailing-lf"),
    pytest.param("eom", _with_mods(_add_header(value=" a\x00")), id="value-with-nul"),
    pytest.param("eom", _with_mods(_add_header(value=" a\x01b")), id="value-with-soh"),
    pytest.param("eom", _with_mods(_add_header(value=" a\x1b[1m")), id="value-with-esc"),
    pytest.param("eom", _with_mods(_add_header(value=" a\x7f")), id="value-with-del"),
    pytest.param("eom", _with_mods(_add_header(value=" a\x85")), id="value-with-c1"),
    pytest.param("eom", _with_mods(_add_header(value=" a\n \n b")), id="value-whitespace-fold-line"),
    pytest.param("eom", _with_mods(_add_header(value=" a\n\t")), id="value-trailing-fold"),
    pytest.param("eom", _with_mods(_add_header(value="v" * 65537)), id="value-too-long"),
    pytest.param(
        "eom", _with_mods({"op": "change_header", "name": "X-A", "index": 0, "value": "1"}), id="change-index-0"
    ),
    pytest.param("eom", _with_mods({"op": "change_header", "name": "X-A", "value": "1"}), id="change-no-index"),
    pytest.param("eom", _with_mods({"op": "delete_header", "name": "X-A", "index": 0}), id="delete-index-0"),
    pytest.param("eom", _with_mods({"op": "delete_header", "name": "X-A", "index": "1"}), id="delete-index-string"),
    pytest.param("eom", _with_mods({"op": "delete_header", "name": "X-A", "index": 1, "value": ""}), id="delete-value"),
    pytest.param(
        "eom", _with_mods({"op": "insert_header", "name": "X-A", "index": -1, "value": "1"}), id="insert-index-neg"
    ),
    pytest.param("eom", _with_mods({"op": "insert_header", "name": "X-A", "value": "1"}), id="insert-no-index"),
    pytest.param("eom", _with_mods({"op": "replace_body", "base64": "abc"}), id="body-bad-base64"),
    pytest.param("eom", _with_mods({"op": "replace_body", "body": "hi"}), id="body-as-text"),
    pytest.param("eom", _with_mods({"op": "add_rcpt", "address": ""}), id="add-rcpt-empty"),
    pytest.param("eom", _with_mods({"op": "add_rcpt", "address": "a@b\r\n"}), id="add-rcpt-crlf"),
    pytest.param("eom", _with_mods({"op": "add_rcpt", "address": "<a@b>"}), id="add-rcpt-brackets"),
    pytest.param("eom", _with_mods({"op": "add_rcpt", "address": " a@b"}), id="add-rcpt-leading-space"),
    pytest.param("eom", _with_mods({"op": "delete_rcpt", "address": "a@b\t"}), id="delete-rcpt-trailing-tab"),
    pytest.param("eom", _with_mods({"op": "add_rcpt", "address": "a" * 1025}), id="address-too-long"),
    pytest.param("eom", _with_mods({"op": "add_rcpt", "address": "a@" + "b" * 253}), id="address-255"),
    pytest.param("eom", _with_mods({"op": "add_rcpt", "address": "bob"}), id="address-without-domain"),
    pytest.param("eom", _with_mods({"op": "add_rcpt", "address": "a..b@c"}), id="address-double-dot"),
    pytest.param("eom", _with_mods({"op": "add_rcpt", "address": "a b@c"}), id="address-unquoted-space"),
    pytest.param("eom", _with_mods({"op": "add_rcpt", "address": '"a\tb"@c'}), id="address-quoted-htab"),
    pytest.param("eom", _with_mods({"op": "add_rcpt", "address": "a@-b"}), id="address-hyphen-label"),
    pytest.param("eom", _with_mods({"op": "add_rcpt", "address": "a@b\x85"}), id="address-c1"),
    pytest.param("eom", _with_mods({"op": "add_rcpt", "address": "a@[256.0.0.1]"}), id="address-ipv4-256"),
    pytest.param("eom", _with_mods({"op": "add_rcpt", "address": "a@[tag:x]"}), id="address-general-literal"),
    pytest.param("eom", _with_mods({"op": "delete_rcpt", "address": ""}), id="delete-rcpt-null"),
    pytest.param("eom", _with_mods({"op": "change_from", "address": "<>"}), id="change-from-brackets"),
    pytest.param("eom", _with_mods({"op": "change_from", "address": "a@b", "args": ["RET=\x01"]}), id="arg-control"),
    pytest.param("eom", _with_mods({"op": "change_from", "address": "a@b", "args": [""]}), id="arg-empty"),
    pytest.param("eom", _with_mods({"op": "change_from", "address": "a@b", "args": ["X"] * 17}), id="17-args"),
    pytest.param("eom", _with_mods({"op": "delete_header", "name": "X", "index": 1_000_001}), id="index-huge"),
    pytest.param("eom", {"action": "continue", "reply": {}}, id="empty-reply-with-continue"),
    pytest.param(
        "eom", _with_mods({"op": "add_rcpt", "address": "a@b", "args": ["NOTIFY=NEVER ORCPT=x"]}), id="arg-space"
    ),
    pytest.param("eom", _with_mods({"op": "add_rcpt", "address": "a@b", "args": "NOTIFY=NEVER"}), id="args-string"),
    pytest.param("eom", _with_mods({"op": "delete_rcpt", "address": "a@b", "args": []}), id="delete-rcpt-args"),
    pytest.param("eom", _with_mods({"op": "change_from"}), id="change-from-no-address"),
    pytest.param("eom", _with_mods({"op": "add_header", "name": "X"}), id="no-value"),
    pytest.param("eom", _with_mods({"op": "add_header", "name": "X", "value": None}), id="null-value"),
    pytest.param("eom", _with_mods({**_add_header(), "value_b64": LATIN_1_B64}), id="value-and-value-b64"),
    pytest.param(
        "eom", _with_mods({"op": "change_header", "name": "X", "index": 1, "value_b64": "w6k"}), id="value-b64-unpadded"
    ),
    pytest.param(
        "eom", _with_mods({"op": "insert_header", "name": "X", "index": 0, "value_b64": "w 6k="}), id="value-b64-space"
    ),
]


@pytest.mark.parametrize(("event", "decision"), INVALID_DECISIONS)
def test_invalid_decision_is_rejected(event: str, decision: object) -> None:
    """The schema refuses a decision the bridge must treat as an endpoint failure."""
    with pytest.raises(ValidationError):
        validate_decision(event, decision)


VALID_DECISIONS = [
    pytest.param("connect", {"action": "tempfail", "reply": {"code": 421, "text": "closing"}}, id="421-at-connect"),
    pytest.param("connect", {"action": "quarantine"}, id="quarantine-no-reason"),
    pytest.param("unknown", {"action": "tempfail", "reply": {"code": 450, "enhanced": "4.5.1"}}, id="unknown-4xx"),
    pytest.param("unknown", {"action": "tempfail"}, id="unknown-no-reply"),
    pytest.param("eom", {"action": "reject", "reply": {"code": 599, "enhanced": "5.999.999"}}, id="599"),
    # 10 bytes of "550-5.7.1 " plus 500: the wire line the bridge checks stays under 512 bytes.
    pytest.param(
        "eom",
        {"action": "reject", "reply": {"code": 550, "enhanced": "5.7.1", "text": ["x" * 500] * 32}},
        id="32-lines",
    ),
    pytest.param("eom", {"action": "reject", "reply": {"code": 550, "text": "100% spam"}}, id="percent"),
    pytest.param("eom", {"action": "reject", "modifications": [_add_header()]}, id="reject-with-mods"),
    pytest.param("eom", _with_mods(*[_add_header()] * 1000), id="1000-modifications"),
    pytest.param("eom", _with_mods(_add_header(value=" a\n\tb\n c")), id="folded-value"),
    pytest.param("eom", _with_mods(_add_header(value="")), id="empty-value"),
    pytest.param("eom", _with_mods(_add_header(value="\n\tfirst line empty")), id="value-empty-first-line"),
    pytest.param("eom", _with_mods(_add_header(value="a\tb \u00e9")), id="value-htab-utf8"),
    pytest.param("eom", _with_mods({"op": "add_header", "name": "X", "value_b64": LATIN_1_B64}), id="add-value-b64"),
    pytest.param(
        "eom",
        _with_mods({"op": "insert_header", "name": "X", "index": 0, "value": None, "value_b64": LATIN_1_B64}),
        id="insert-value-b64-null-value",
    ),
    pytest.param(
        "eom",
        _with_mods({"op": "change_header", "name": "X", "index": 1, "value": " t", "value_b64": None}),
        id="change-value-null-value-b64",
    ),
    pytest.param("eom", _with_mods({"op": "change_from", "address": ""}), id="change-from-null-sender"),
    pytest.param("eom", _with_mods({"op": "add_rcpt", "address": "a@[192.0.2.1]"}), id="ipv4-literal"),
    pytest.param("eom", _with_mods({"op": "add_rcpt", "address": "a@[IPv6:2001:db8::1]"}), id="ipv6-literal"),
    pytest.param("eom", _with_mods({"op": "delete_rcpt", "address": '"a\\"b"@c'}), id="quoted-escaped-quote"),
    pytest.param("eom", _with_mods({"op": "add_rcpt", "address": "l" * 64 + "@" + "d" * 63 + ".org"}), id="long-ok"),
    pytest.param("eom", _with_mods(_add_header(name="X" * 256)), id="name-256"),
    pytest.param("eom", _with_mods({"op": "insert_header", "name": "X-A", "index": 0, "value": "1"}), id="insert-top"),
    pytest.param("eom", _with_mods({"op": "add_rcpt", "address": '"john doe"@example.org'}), id="quoted-local-part"),
    pytest.param(
        "eom",
        _with_mods({"op": "add_rcpt", "address": "rené@exämple.org", "args": ["ORCPT=utf-8;rené@exämple.org"]}),
        id="utf8-address",
    ),
    pytest.param("connect", {"action": "continue", "modifications": [_add_header()]}, id="mods-at-connect"),
    pytest.param("helo", {"action": "quarantine", "modifications": []}, id="mods-at-helo"),
    pytest.param("unknown", {"action": "tempfail", "modifications": []}, id="empty-mods-at-unknown"),
    pytest.param("unknown", {"action": "continue", "modifications": None}, id="null-mods-at-unknown"),
    pytest.param("eom", {"action": "continue", "reply": None, "reason": None, "modifications": None}, id="nulls"),
    pytest.param("eom", {"action": "reject", "reply": None}, id="reject-null-reply"),
    pytest.param("eom", {"action": "reject", "reply": {"code": 550, "enhanced": None, "text": None}}, id="reply-nulls"),
    pytest.param("eom", _with_mods({"op": "add_rcpt", "address": "a@b", "args": None}), id="null-args"),
    pytest.param("eom", {"action": "quarantine", "reason": "r" * 1000}, id="reason-1000"),
    pytest.param("eom", _with_mods({"op": "delete_header", "name": "X", "index": 1_000_000}), id="index-max"),
    pytest.param("eom", _with_mods({"op": "replace_body", "base64": ""}), id="empty-body"),
    pytest.param("mail", _with_mods({"op": "add_rcpt", "address": "a@b"}), id="mods-at-mail"),
    pytest.param("header", {"action": "skip", "modifications": [_add_header()]}, id="skip-with-mods"),
]


@pytest.mark.parametrize(("event", "decision"), VALID_DECISIONS)
def test_boundary_decision_is_accepted(event: str, decision: object) -> None:
    """Decisions at the edge of each limit are still valid."""
    validate_decision(event, decision)


#: Decisions the bridge's parser knowingly reads differently: it decodes a JSON ``null`` body
#: like an empty one, i.e. as continue, while the schema describes a 200 body as an object.
PARSER_ONLY = {"null"}


def _all_decisions() -> list[Any]:
    cases = [pytest.param(*p.values, id=p.id) for p in [*INVALID_DECISIONS, *VALID_DECISIONS]]
    cases += [pytest.param(e, d, id=f"example-{e}-{n}") for n, (e, d) in enumerate(decision_examples())]
    return cases


@pytest.mark.parametrize(("event", "decision"), _all_decisions())
def test_bridge_parser_agrees_with_the_schema(request: pytest.FixtureRequest, event: str, decision: object) -> None:
    """milterbridge.policy.parse accepts a decision exactly when the contract's schema does."""
    # Imported here so that a broken parser fails these cases only, not the whole module.
    from milterbridge.milter.constants import Event
    from milterbridge.policy.model import DecisionError
    from milterbridge.policy.parse import parse_decision

    try:
        validate_decision(event, decision)
        schema_accepts = True
    except ValidationError:
        schema_accepts = False
    try:
        parse_decision(decision, Event(event), max_modifications=1000)
        parser_accepts = True
    except DecisionError:
        parser_accepts = False
    if request.node.callspec.id in PARSER_ONLY:
        assert parser_accepts
        assert not schema_accepts
    else:
        assert parser_accepts == schema_accepts


# ---------------------------------------------------------------- requests the schema refuses


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    keys = path.split(".")

    def mutate(payload: dict[str, Any]) -> None:
        node: Any = payload
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[keys[-1]] = value

    return mutate


def _delete(path: str) -> Callable[[dict[str, Any]], None]:
    keys = path.split(".")

    def mutate(payload: dict[str, Any]) -> None:
        node: Any = payload
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]

    return mutate


INVALID_REQUESTS = [
    pytest.param("connect", "request-connect-inet", _set("extra", 1), id="unknown-top-key"),
    pytest.param("connect", "request-connect-inet", _delete("data"), id="missing-data"),
    pytest.param("rcpt", "request-mail", lambda p: None, id="event-mismatch"),
    pytest.param("connect", "request-connect-inet", _set("message", {}), id="message-at-connect"),
    pytest.param("helo", "request-helo", _set("message", _example("request-mail")["message"]), id="message-at-helo"),
    pytest.param(
        "close", "request-close", _set("message", _example("request-abort")["message"]), id="message-at-close"
    ),
    pytest.param("mail", "request-mail", _set("message", None), id="no-message-at-mail"),
    pytest.param("connect", "request-connect-inet", _set("timestamp", "2025-11-24T16:48:01+00:00"), id="not-z"),
    pytest.param("connect", "request-connect-inet", _set("timestamp", "2025-13-24T16:48:01Z"), id="bad-date"),
    pytest.param("connect", "request-connect-inet", _set("data.family", "ipv4"), id="bad-family"),
    pytest.param("connect", "request-connect-inet", _set("data.port", "54321"), id="port-string"),
    pytest.param("connect", "request-connect-inet", _set("data.port", 70000), id="port-range"),
    pytest.param("rcpt", "request-rcpt", _set("message.body", {"size": 0, "base64": ""}), id="body-before-eom"),
    pytest.param("eom", "request-eom", _set("message.body.size", -1), id="negative-size"),
    pytest.param("eom", "request-eom", _set("message.body.base64", "not base64!"), id="body-not-base64"),
    pytest.param("eoh", "request-eoh", _set("data", {"headers": 3}), id="data-not-empty"),
    pytest.param("header", "request-header", _set("data.value_b64", "=="), id="bad-b64-sibling"),
    pytest.param("mail", "request-mail", _delete("data.raw"), id="address-without-raw"),
    pytest.param("mail", "request-mail", _set("data.args", "SIZE=1"), id="args-not-list"),
    pytest.param("body", "request-body", _set("data.offset", -5), id="negative-offset"),
    pytest.param("header", "request-header", _set("message.headers.0.folded", True), id="header-extra-key"),
    pytest.param("connect", "request-connect-inet", _set("session.macros.j", None), id="macro-not-string"),
    pytest.param("connect", "request-connect-inet", _set("session.macros_b64", {}), id="empty-macros-b64"),
    pytest.param("unknown", "request-unknown", _set("data", {"cmd": "XFOO"}), id="unknown-wrong-key"),
]


@pytest.mark.parametrize(("event", "example", "mutate"), INVALID_REQUESTS)
def test_invalid_request_is_rejected(event: str, example: str, mutate: Callable[[dict[str, Any]], None]) -> None:
    """validate_request catches a payload that drifts from the contract."""
    payload = _example(example)
    mutate(payload)
    with pytest.raises(ValidationError):
        validate_request(event, payload)


def test_unknown_inside_a_transaction_carries_the_message() -> None:
    """At unknown, message may be null (outside a transaction) or the open message."""
    payload = _example("request-unknown")
    payload["message"] = _example("request-data")["message"]
    validate_request("unknown", payload)


# ---------------------------------------------------------------- docs/webhooks.md


def _docs() -> str:
    return DOCS_PATH.read_text(encoding="utf-8")


def _marked_blocks() -> list[tuple[str, str]]:
    """(marker, fenced block) for each ``<!-- contract: ... -->`` in the docs."""
    pattern = re.compile(r"<!-- contract: ([a-z ]+) -->\n```(?:json)?\n(.*?)\n```", re.DOTALL)
    return [(m.group(1), m.group(2)) for m in pattern.finditer(_docs())]


def test_docs_json_examples_follow_the_contract() -> None:
    """Each JSON block the docs mark as a request, decision or header validates against the spec."""
    checked = set()
    for marker, block in _marked_blocks():
        kind, _, event = marker.partition(" ")
        if kind == "actions":
            continue
        value = json.loads(block)
        if kind == "request":
            validate_request(event, value)
        elif kind == "decision":
            validate_decision(event, value)
        elif kind == "header":
            payload = _example("request-header-8bit")
            payload["data"] = value
            payload["message"]["headers"][-1] = value
            validate_request("header", payload)
            assert base64.b64decode(value["value_b64"]).decode("utf-8", "replace") == value["value"]
        else:
            pytest.fail(f"unknown docs marker {marker!r}")
        checked.add(kind)
    assert checked == {"request", "decision", "header"}


def test_docs_action_table_matches_the_spec() -> None:
    """The actions-per-event table in the docs says yes exactly where the decision schema allows the action."""
    text = _docs()
    table = text[text.index("<!-- contract: actions -->") :].split("\n\n", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[1:]]
    header, rows = rows[0], rows[2:]
    assert header[0] == "event"
    seen = {}
    for row in rows:
        event = row[0].strip("`")
        seen[event] = {action for action, cell in zip(header[1:], row[1:], strict=True) if cell.startswith("yes")}
    assert seen == {event: set(legal_actions(event)) for event in DECISION_EVENTS}


def _docs_filter_source() -> str:
    blocks: list[str] = re.findall(r"```python\n(.*?)\n```", _docs(), re.DOTALL)
    [source] = [b for b in blocks if "def make_app" in b]
    return source


@pytest.mark.asyncio
async def test_docs_minimal_filter_answers_within_the_contract() -> None:
    """The docs' aiohttp filter, run on loopback, refuses the blocked recipient and tags the message validly."""
    namespace: dict[str, Any] = {"__name__": "docs_minimal_filter"}
    exec(compile(_docs_filter_source(), str(DOCS_PATH), "exec"), namespace)
    blocked = _example("request-rcpt")
    blocked["data"]["address"] = "nobody@example.net"
    cases = [
        ("rcpt", blocked, 200, "reject"),
        ("rcpt", _example("request-rcpt"), 204, None),
        ("eom", _example("request-eom"), 200, "continue"),
        ("connect", _example("request-connect-inet"), 204, None),
    ]
    async with TestServer(namespace["make_app"](), host="127.0.0.1") as server, aiohttp.ClientSession() as http:
        for event, payload, status, action in cases:
            async with http.post(server.make_url("/milter"), json=payload) as resp:
                assert resp.status == status, event
                if status == 200:
                    decision = await resp.json()
                    validate_decision(event, decision)
                    assert decision["action"] == action
                    if event == "eom":
                        assert decision["modifications"][0]["op"] == "add_header"
