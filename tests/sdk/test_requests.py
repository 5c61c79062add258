"""The SDK's request types agree with the OpenAPI contract and parse what the bridge sends without loss."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any

import pytest

from milterbridge.client import Envelope
from milterbridge.config import Config, ServerSettings
from milterbridge.milter.constants import Event
from milterbridge.sdk import (
    REQUEST_TYPES,
    Body,
    EmptyData,
    EomRequest,
    HeaderRequest,
    RequestError,
    UnknownRequest,
    parse_request,
)
from tests import contract
from tests.fakes.webhooks import FakeWebhooks
from tests.harness import LOOPBACK, BridgeHarness

SCHEMAS: Mapping[str, Any] = contract.SPEC["components"]["schemas"]


# ---------------------------------------------------------------- the schema walk


def _resolve(node: Mapping[str, Any]) -> Mapping[str, Any]:
    """The object schema behind a property: $ref followed, allOf of one taken, a null branch dropped."""
    while True:
        if "$ref" in node:
            node = SCHEMAS[node["$ref"].rsplit("/", 1)[1]]
        elif "allOf" in node and "properties" not in node:
            (node,) = node["allOf"]
        elif "oneOf" in node:
            (node,) = [branch for branch in node["oneOf"] if branch.get("type") != "null"]
        else:
            return node


def _nullable(node: Mapping[str, Any]) -> bool:
    if node.get("type") == "null":
        return True
    return any(branch.get("type") == "null" for branch in node.get("oneOf", ()))


def _sdk_name(contract_name: str) -> str:
    return contract_name.removesuffix("_b64") + "_bytes" if contract_name.endswith("_b64") else contract_name


def _unwrap(hint: Any) -> tuple[set[Any], bool]:
    """The types inside a field's hint (through unions and tuple[...]) and whether None is one."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    inner: set[Any] = set()
    for arg in args:
        if typing.get_origin(arg) is tuple:
            inner.add(typing.get_args(arg)[0])
        elif arg is not type(None):
            inner.add(arg)
    return inner, type(None) in args


def _walk(cls: type, schema: Mapping[str, Any], where: str, seen: set[str]) -> None:
    properties: Mapping[str, Any] = schema.get("properties", {})
    fields = {f.name for f in dataclasses.fields(cls)}
    assert fields == {_sdk_name(p) for p in properties}, where
    hints = typing.get_type_hints(cls)
    for name, node in properties.items():
        here = f"{where}.{name}"
        seen.add(here)
        inner, optional = _unwrap(hints[_sdk_name(name)])
        if name.endswith("_b64"):
            assert inner <= {bytes} or typing.get_origin(hints[_sdk_name(name)]) is Mapping, here
            continue
        target = _resolve(node)
        if (target.get("type") == "object" and "properties" in target) or target is SCHEMAS["EmptyData"]:
            (sdk_type,) = inner
            assert isinstance(sdk_type, type), here
            assert dataclasses.is_dataclass(sdk_type), here
            _walk(sdk_type, target, here, seen)
        if _nullable(node) and node.get("type") != "null":
            assert optional, f"{here} may be null"
        elif node.get("type") == "null":
            assert not inner, f"{here} is always null"
            assert optional, f"{here} is always null"


@pytest.mark.parametrize("event", contract.EVENTS)
def test_every_schema_property_is_a_field_and_back(event: str) -> None:
    """Per event the schema's properties, nested, are exactly the SDK's fields (``x_b64`` is ``x_bytes``)."""
    media = contract.SPEC["webhooks"][event]["post"]["requestBody"]["content"]["application/json"]
    schema = _resolve(media["schema"])
    seen: set[str] = set()
    _walk(REQUEST_TYPES[event], schema, event, seen)
    # The walk went into the nested objects, not only the envelope.
    assert f"{event}.session.client.address_b64" in seen
    assert set(REQUEST_TYPES) == set(contract.EVENTS)


# ---------------------------------------------------------------- without loss


def _b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _absent(value: object) -> bool:
    return value is None or value == () or value is False or isinstance(value, EmptyData)


def assert_lossless(obj: object, document: Mapping[str, Any], where: str = "request") -> None:
    """Every key of ``document`` is on ``obj`` with the same value (``_b64`` decoded); every other field is empty."""
    covered: set[str] = set()
    for key, value in document.items():
        attr = _sdk_name(key)
        covered.add(attr)
        here = f"{where}.{key}"
        got = getattr(obj, attr)
        if key == "macros_b64":
            assert all(got[name] == _b64(v) for name, v in value.items()), here
        elif key.endswith("_b64"):
            assert got == (tuple(_b64(v) for v in value) if isinstance(value, list) else _b64(value)), here
        elif key == "macros":
            assert dict(got) == value, here
        elif isinstance(value, dict):
            assert_lossless(got, value, here)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            assert len(got) == len(value), here
            for n, (item, item_doc) in enumerate(zip(got, value, strict=True)):
                assert_lossless(item, item_doc, f"{here}[{n}]")
        elif isinstance(value, list):
            assert got == tuple(value), here
        else:
            assert got == value, here
    for field in dataclasses.fields(obj):  # type: ignore[arg-type]
        name = field.name
        if name in covered:
            continue
        got = getattr(obj, name)
        text_key = name.removesuffix("_bytes")
        if name.endswith("_bytes") and text_key in document:
            # No _b64 sibling: the exact bytes are the text's UTF-8.
            text = document[text_key]
            if text_key == "macros":
                expected = {k: v.encode() for k, v in text.items()}
                assert {k: got[k] for k in expected} == expected
            elif isinstance(text, list):
                assert got == tuple(t.encode() for t in text), f"{where}.{name}"
            else:
                assert got == (None if text is None else text.encode()), f"{where}.{name}"
        else:
            assert _absent(got), f"{where}.{name} is set but not in the request"


@pytest.mark.parametrize(("event", "payload"), list(contract.request_examples()))
def test_contract_examples_parse_without_loss(event: str, payload: dict[str, Any]) -> None:
    """Every request example of the document becomes its event's type, with every key and byte kept."""
    request = parse_request(json.dumps(payload).encode())
    assert type(request) is REQUEST_TYPES[event]
    assert_lossless(request, payload)


@pytest.mark.asyncio
async def test_requests_the_bridge_sends_parse_without_loss() -> None:
    """A real bridge, every event, an 8-bit header, ESMTP args, an unknown command: all parse without loss."""
    envelope = Envelope(mail_args=(b"SIZE=99", b"BODY=8BITMIME"), rcpt_args=((b"NOTIFY=NEVER",),))
    message = b"From: a@example.org\r\nSubject: Caf\xe9\r\nX-Long: one\r\n two\r\n\r\nHello\r\n"
    async with FakeWebhooks() as fake:
        endpoint = fake.endpoint("all", events=frozenset(Event), include_body=True)
        config = Config(server=ServerSettings(listen=LOOPBACK), endpoints=(endpoint,))
        async with BridgeHarness(config) as bridge:
            client = await bridge.client()
            await client.send_message(envelope, message)
            await client.unknown(b"XFOO \xff")
            await client.mail_from(b"<b@example.org>")
            await client.abort()
            await client.quit()
            await bridge.settle()
        recorded = list(fake.requests)
    events = {r.json["event"] for r in recorded}
    assert events == {e.value for e in Event}
    for r in recorded:
        request = parse_request(r.body)
        assert type(request) is REQUEST_TYPES[r.json["event"]]
        assert_lossless(request, r.json)
    eom = next(parse_request(r.body) for r in recorded if r.json["event"] == "eom")
    assert isinstance(eom, EomRequest)
    assert isinstance(eom.message.body, Body)
    assert eom.message.body.bytes == b"Hello\r\n"
    subject = eom.message.header("subject")
    assert subject is not None
    assert subject.value_bytes == b" Caf\xe9"
    assert eom.message.mail_from.args == ("SIZE=99", "BODY=8BITMIME")
    unknown = next(parse_request(r.body) for r in recorded if r.json["event"] == "unknown")
    assert isinstance(unknown, UnknownRequest)
    assert unknown.data.command_bytes == b"XFOO \xff"


# ---------------------------------------------------------------- malformed


def _example(name: str) -> dict[str, Any]:
    example: dict[str, Any] = copy.deepcopy(contract.SPEC["components"]["examples"][name]["value"])
    return example


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.pop("session"), "request: 'session' is missing"),
        (lambda p: p.update(event="bogus"), "request.event: unknown event 'bogus'"),
        (lambda p: p.update(message=None), "request.message: required at header"),
        (lambda p: p["data"].update(value=3), "request.data.value: expected a string, got a number"),
        (lambda p: p["data"].update(value_b64="!!"), "request.data.value_b64: not valid base64"),
        (lambda p: p["session"]["client"].update(port=True), "request.session.client.port: expected a non-negative"),
        (lambda p: p["message"]["rcpt_to"][0].update(args="x"), "request.message.rcpt_to[0].args: expected an array"),
    ],
)
def test_malformed_requests_name_the_place(change: Any, message: str) -> None:
    """A request that breaks the shape raises RequestError saying where."""
    payload = _example("request-header")
    change(payload)
    with pytest.raises(RequestError) as info:
        parse_request(json.dumps(payload).encode())
    assert str(info.value).startswith(message)


def test_not_json_and_not_an_object() -> None:
    """Bytes that are not JSON, and JSON that is not an object, are RequestErrors."""
    with pytest.raises(RequestError, match="not JSON"):
        parse_request(b"{")
    with pytest.raises(RequestError, match="expected an object, got an array"):
        parse_request(b"[]")


def test_unknown_keys_are_ignored_and_values_are_read_only() -> None:
    """A key a later minor version may add is ignored; the parsed request cannot be changed."""
    payload = _example("request-header")
    payload["future"] = {"x": 1}
    payload["data"]["extra"] = True
    request = parse_request(json.dumps(payload).encode())
    assert isinstance(request, HeaderRequest)
    assert request.data.name == payload["data"]["name"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.id = "x"  # type: ignore[misc,unused-ignore]
    with pytest.raises(TypeError):
        request.session.macros["j"] = "x"  # type: ignore[index]
