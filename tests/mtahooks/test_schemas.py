"""openapi/mta-hooks/: the JSON Schemas of MTA Hooks -01 requests and answers, and the code held to them."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from milterbridge.milter.constants import Event
from milterbridge.mtahooks import STAGES, Before, HookAnswerError, hook_request, to_decision
from tests import contract

SCHEMAS = Path(__file__).resolve().parents[2] / "openapi" / "mta-hooks"


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


STAGED = [(event, payload) for event, payload in contract.request_examples() if Event(event) in STAGES]


def test_every_stage_has_a_contract_example():
    assert {Event(event) for event, _ in STAGED} == set(STAGES)


@pytest.mark.parametrize(("event", "payload"), STAGED, ids=[f"{e}-{i}" for i, (e, _) in enumerate(STAGED)])
def test_hook_requests_from_the_contracts_examples_fit_the_schema(event, payload):
    request = hook_request(payload, Event(event))
    validator("request").validate(request)
    assert request["stage"] == STAGES[Event(event)]


def test_the_schema_refuses_what_the_draft_does_not_have():
    request = hook_request(contract.SPEC["components"]["examples"]["request-eom"]["value"], Event.EOM)
    for broken in ({**request, "stage": "auth"}, {**request, "protocol": {"version": 1}}, {**request, "extra": 1}):
        assert not validator("request").is_valid(broken)


RAW = base64.b64encode(b"Subject: hi\r\n\r\nbody\r\n").decode()
ANSWERS: list[Any] = [
    {},
    {"set": [{"path": "/action", "value": "reject"}, {"path": "/response", "value": {"code": 550, "message": "no"}}]},
    {"set": [{"path": "/response/code", "value": 451}]},
    {"set": [{"path": "/message/headers/0/value", "value": " x"}, {"path": "/message/subject", "value": "s"}]},
    {"add": [{"path": "/message/headers", "value": {"name": "X-A", "value": " 1"}, "index": 0}]},
    {"add": [{"path": "/envelope/to", "value": {"address": "a@example.org", "parameters": {}}}]},
    {"delete": [{"path": "/message/headers/1"}, {"path": "/envelope/to/0"}]},
    {
        "set": [
            {"path": "/envelope/from", "value": {"address": None, "parameters": {}}},
            {"path": "/rawMessage", "value": RAW},
        ]
    },
]
REFUSED: list[Any] = [
    {"set": [{"path": "/queue/id", "value": "x"}]},
    {"set": [{"path": "/message/headers/01", "value": {"name": "To", "value": " x"}}]},
    {"delete": [{"path": "/action"}]},
    {"add": [{"path": "/message/headers/0", "value": {"name": "X", "value": " 1"}}]},
    {"patch": []},
]
BEFORE = Before(headers=(("From", " a"), ("To", " b")), rcpts=("b@example.net",))


@pytest.mark.parametrize("answer", ANSWERS)
def test_answers_the_bridge_carries_out_fit_the_schema(answer):
    validator("answer").validate(answer)
    to_decision(answer, BEFORE)


@pytest.mark.parametrize("answer", REFUSED)
def test_answers_outside_the_schema_are_refused_by_the_bridge(answer):
    assert not validator("answer").is_valid(answer)
    with pytest.raises(HookAnswerError):
        to_decision(answer, BEFORE)
