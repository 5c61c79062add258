"""MTA Hooks scanners behind a real Postfix: registration, every stage, and every answer operation.

The scanner (tests/fakes/hooks_scanner.py) is written from the text of draft -01 alone. Postfix
runs with ``milter_default_action = accept``, so a gate left open would show as delivered mail.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from milterbridge.milter.constants import Event
from milterbridge.settings import EndpointProtocol, EndpointSettings
from tests.fakes.hooks_scanner import TOKEN, HooksScanner

from .bridge import BridgeRunner, blocking, body_of, header_lines, parse, smtp
from .postfix import PostfixInstance, make_message

pytestmark = pytest.mark.postfix

SENDER = "alice@example.org"
RCPTS = ["bob@example.net"]
DATE = ("Date", "Mon, 01 Jan 2024 00:00:00 +0000")
DELIVERY_HEADERS = ["Return-Path", "X-Original-To", "Delivered-To"]
SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "openapi" / "mta-hooks" / "request.schema.json").read_text())
ALL_EVENTS = frozenset({Event.CONNECT, Event.HELO, Event.MAIL, Event.RCPT, Event.EOM})


def scanner_endpoint(scanner: HooksScanner, events: frozenset[Event] = frozenset({Event.EOM}), **overrides: Any):
    return EndpointSettings(
        name="scanner",
        url=scanner.url(),
        protocol=EndpointProtocol.MTA_HOOKS,
        events=events,
        headers=(("Authorization", f"Bearer {TOKEN}"),),
        **{"include_body": True, **overrides},
    )


def ops(**lists: list[dict[str, Any]]) -> dict[str, Any]:
    return {name: value for name, value in lists.items() if value}


async def start(bridges: BridgeRunner, scanner: HooksScanner, **kwargs: Any):
    return await bridges.start(scanner_endpoint(scanner, **kwargs), default_action="accept")


@pytest.mark.asyncio
async def test_the_scanner_registers_and_sees_every_stage(mta: PostfixInstance, bridges: BridgeRunner) -> None:
    """Discovery, registration, one call per stage with the negotiated properties, deregistration at the stop."""
    async with HooksScanner() as scanner:
        bridge = await start(bridges, scanner, events=ALL_EVENTS)
        [registration] = scanner.active()
        assert registration.stages == ["connect", "ehlo", "mail", "rcpt", "data"]
        assert bridge.metric("milterbridge_mta_hooks_registered", endpoint="scanner") == 1
        assert "/rawMessage" in registration.properties

        message = make_message(subject="hooks", headers=[DATE])
        result = await smtp(mta, SENDER, ["bob@example.net", "carol@example.net"], message)

        assert result.accepted
        await blocking(mta.wait_for_delivery, 2)
        assert scanner.violations == []
        stages = [body["stage"] for _, _, body in scanner.calls]
        assert stages == ["connect", "ehlo", "mail", "rcpt", "rcpt", "data"]
        validator = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
        for _, _, body in scanner.calls:
            validator.validate(body)
        request_ids = [request_id for _, request_id, _ in scanner.calls]
        assert len(set(request_ids)) == len(request_ids)
        data = scanner.calls[-1][2]
        assert data["envelope"]["from"] == {"address": SENDER, "parameters": data["envelope"]["from"]["parameters"]}
        assert [to["address"] for to in data["envelope"]["to"]] == ["bob@example.net", "carol@example.net"]
        assert data["client"]["ip"] == "127.0.0.1"
        assert data["queue"]["id"]
        assert ("Subject", " hooks") in [(h["name"], h["value"]) for h in data["message"]["headers"]]
        raw = base64.b64decode(data["rawMessage"])
        assert b"Subject: hooks\r\n" in raw
        assert raw.endswith(b"Hello.\r\n")
        assert data["message"]["size"] == len(raw)
        assert scanner.calls[0][2]["envelope"] is None

        await bridge.stop()
        assert scanner.deregistered == [registration.id]


def _index(request: dict[str, Any], name: str) -> int:
    return next(i for i, h in enumerate(request["message"]["headers"]) if h["name"] == name)


def _header_edits(request: dict[str, Any]) -> dict[str, Any]:
    spam = _index(request, "X-Spam")
    return ops(
        set=[
            {"path": f"/message/headers/{_index(request, 'Subject')}/value", "value": " [scanned] hi"},
            {"path": f"/message/headers/{_index(request, 'To')}", "value": {"name": "to", "value": " x@example.net"}},
        ],
        add=[
            {"path": "/message/headers", "value": {"name": "X-Scanner", "value": " clean"}},
            {"path": "/message/headers", "value": {"name": "X-Top", "value": " top"}, "index": 0},
        ],
        # Deletes run last, on the array the adds left: X-Top moved X-Spam down by one.
        delete=[{"path": f"/message/headers/{spam + 1}"}],
    )


@pytest.mark.asyncio
async def test_header_operations_land_in_the_delivered_message(mta: PostfixInstance, bridges: BridgeRunner) -> None:
    """add (appended and at an index), set of a header and of a value, delete: in the draft's order, as delivered."""
    async with HooksScanner(answer=_header_edits) as scanner:
        await start(bridges, scanner)
        message = make_message(subject="hi", headers=[DATE, ("X-Spam", "yes")])
        result = await smtp(mta, SENDER, RCPTS, message)

        assert result.accepted
        [(_, raw)] = await blocking(mta.wait_for_delivery, 1)
        lines = header_lines(raw)
        names = [name for name, _ in lines]
        assert names == [*DELIVERY_HEADERS, "X-Top", "Received", "From", "To", "Subject", "Message-ID", "Date",
                         "X-Scanner"]  # fmt: skip
        values = dict(lines)
        assert values["Subject"] == " [scanned] hi"
        assert values["To"] == " x@example.net"
        assert values["X-Scanner"] == " clean"


@pytest.mark.asyncio
async def test_subject_envelope_and_recipients(mta: PostfixInstance, bridges: BridgeRunner) -> None:
    """set /message/subject, /envelope/from and /envelope/to/N; add /envelope/to; delete /envelope/to/0."""

    def answer(request: dict[str, Any]) -> dict[str, Any]:
        return ops(
            set=[
                {"path": "/message/subject", "value": "rewritten"},
                {"path": "/envelope/from", "value": {"address": "bounces@example.org", "parameters": {}}},
                {"path": "/envelope/to/1", "value": {"address": "dave@example.net", "parameters": {}}},
            ],
            add=[{"path": "/envelope/to", "value": {"address": "carol@example.net", "parameters": {}}}],
            delete=[{"path": "/envelope/to/0"}],
        )

    async with HooksScanner(answer=answer) as scanner:
        await start(bridges, scanner)
        rcpts = ["bob@example.net", "erin@example.net"]
        result = await smtp(mta, SENDER, rcpts, make_message(to=rcpts, subject="original"))

        assert result.accepted
        delivered = [parse(raw) for _, raw in await blocking(mta.wait_for_delivery, 2)]
        assert sorted(m["Delivered-To"] for m in delivered) == ["carol@example.net", "dave@example.net"]
        assert {m["Return-Path"] for m in delivered} == {"<bounces@example.org>"}
        assert {m["Subject"] for m in delivered} == {"rewritten"}
        assert await blocking(mta.wait_for_queue_idle) == []
        assert len(mta.maildir_messages()) == 2


@pytest.mark.asyncio
async def test_a_retried_call_keeps_its_request_id(mta: PostfixInstance, bridges: BridgeRunner) -> None:
    """A 503 is retried once with the same X-MTA-Hooks-Request-Id (the scanner can tell it is the same call)."""
    answers = iter([(503, {"error": {"code": "SCANNER_UNAVAILABLE", "message": "busy"}}), None])

    async with HooksScanner(answer=lambda request: next(answers)) as scanner:
        await start(bridges, scanner)
        result = await smtp(mta, SENDER, RCPTS, make_message())

        assert result.accepted
        await blocking(mta.wait_for_delivery, 1)
        [(_, first, _), (_, second, _)] = scanner.calls
        assert first == second


@pytest.mark.asyncio
async def test_raw_message_replaces_headers_and_body(mta: PostfixInstance, bridges: BridgeRunner) -> None:
    """set /rawMessage: the new message's headers and body are what Postfix delivers; edits of /message are ignored."""
    new = (
        b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: replaced\r\nX-Rewritten: yes\r\n\r\nNew body.\r\n"
    )

    def answer(request: dict[str, Any]) -> dict[str, Any]:
        return ops(
            set=[{"path": "/rawMessage", "value": base64.b64encode(new).decode()}],
            add=[{"path": "/message/headers", "value": {"name": "X-Ignored", "value": " yes"}}],
        )

    async with HooksScanner(answer=answer) as scanner:
        await start(bridges, scanner)
        result = await smtp(mta, SENDER, RCPTS, make_message(subject="original", headers=[DATE]))

        assert result.accepted
        [(_, raw)] = await blocking(mta.wait_for_delivery, 1)
        lines = header_lines(raw)
        assert [name for name, _ in lines] == [*DELIVERY_HEADERS, "Received", "From", "To", "Subject", "X-Rewritten"]
        assert dict(lines)["Subject"] == " replaced"
        assert body_of(raw).replace(b"\r\n", b"\n") == b"New body.\n"


def _action(action: str, response: dict[str, Any] | None = None) -> dict[str, Any]:
    operations = [{"path": "/action", "value": action}]
    if response is not None:
        operations.append({"path": "/response", "value": response})
    return {"set": operations}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("answer", "code", "text"),
    [
        pytest.param(_action("reject", {"code": 550, "enhancedCode": "5.7.1", "message": "spam"}), 550, "5.7.1 spam",
                     id="reject"),
        pytest.param(_action("reject", {"code": 451, "enhancedCode": "4.7.1", "message": "later"}), 451, "4.7.1 later",
                     id="reject-4xx"),
        pytest.param(_action("disconnect"), 421, "4.7.0 closing the connection", id="disconnect"),
        pytest.param({"set": [{"path": "/message/headers/0", "value": {"name": "X-Renamed", "value": " x"}}]}, 451,
                     None, id="invalid-answer-tempfails"),
    ],
)  # fmt: skip
async def test_refusals_at_data(
    mta: PostfixInstance, bridges: BridgeRunner, answer: dict[str, Any], code: int, text: str | None
) -> None:
    """reject (5xx, 4xx), disconnect, and an answer milter cannot carry out (on_error: tempfail): nothing delivered."""
    async with HooksScanner(answer=lambda request: answer) as scanner:
        bridge = await start(bridges, scanner)
        result = await smtp(mta, SENDER, RCPTS, make_message())

        reply = next(r for r in result.replies if r.step == "end_of_data")
        assert reply.code == code
        if text is not None:
            assert reply.text == text
        else:
            assert bridge.metric("milterbridge_webhook_requests_total", outcome="invalid_decision") == 1
        assert not result.accepted
        assert await blocking(mta.wait_for_queue_idle) == []
        assert mta.maildir_messages() == []


@pytest.mark.asyncio
async def test_discard_and_quarantine(mta: PostfixInstance, bridges: BridgeRunner) -> None:
    """discard: 250 and nothing delivered; quarantine: the message waits in the hold queue."""

    def answer(request: dict[str, Any]) -> dict[str, Any]:
        subject = request["message"]["headers"][_index(request, "Subject")]["value"].strip()
        return _action(subject)

    async with HooksScanner(answer=answer) as scanner:
        await start(bridges, scanner)
        discarded = await smtp(mta, SENDER, RCPTS, make_message(subject="discard"))
        quarantined = await smtp(mta, SENDER, RCPTS, make_message(subject="quarantine"))

        assert discarded.accepted
        assert quarantined.accepted
        held = await blocking(mta.wait_for_queue, 1, "hold")
        assert len(held) == 1
        assert "Subject: quarantine" in await blocking(mta.postcat, held[0].queue_id, headers=True)
        assert mta.maildir_messages() == []


@pytest.mark.asyncio
async def test_early_stages(mta: PostfixInstance, bridges: BridgeRunner) -> None:
    """A refusal at rcpt refuses that recipient only; disconnect at connect ends the session with 421."""

    def answer(request: dict[str, Any]) -> dict[str, Any] | None:
        if request["stage"] == "connect" and request["client"]["ehlo"] is None and scanner.calls[:-1]:
            return _action("disconnect")  # every session after the first
        if request["stage"] == "rcpt" and request["envelope"]["to"][-1]["address"] == "mallory@example.net":
            return _action("reject", {"code": 550, "enhancedCode": "5.1.1", "message": "no such user"})
        return None

    async with HooksScanner(answer=answer) as scanner:
        await start(bridges, scanner, events=frozenset({Event.CONNECT, Event.RCPT}))
        rcpts = ["bob@example.net", "mallory@example.net"]
        first = await smtp(mta, SENDER, rcpts, make_message(to=rcpts))
        second = await smtp(mta, SENDER, RCPTS, make_message())

        assert [(r.argument, r.code) for r in first.transaction.rcpts] == [
            ("bob@example.net", 250),
            ("mallory@example.net", 550),
        ]
        assert first.transaction.rcpts[1].text == "5.1.1 no such user"
        assert second.greeting.code == 421
        [(_, raw)] = await blocking(mta.wait_for_delivery, 1)
        assert parse(raw)["Delivered-To"] == "bob@example.net"


@pytest.mark.asyncio
async def test_without_a_registration_the_gate_stays_closed(mta: PostfixInstance, bridges: BridgeRunner) -> None:
    """A scanner that refuses the bridge's credentials: every call fails as not_registered, mail tempfails."""
    async with HooksScanner() as scanner:
        endpoint = dataclasses.replace(scanner_endpoint(scanner), headers=(("Authorization", "Bearer wrong"),))
        bridge = await bridges.start(endpoint, default_action="accept")
        result = await smtp(mta, SENDER, RCPTS, make_message())

        assert next(r for r in result.replies if r.step == "end_of_data").code == 451
        assert scanner.registrations == {}
        assert scanner.calls == []
        assert bridge.metric("milterbridge_webhook_requests_total", outcome="not_registered") == 1
        assert bridge.metric("milterbridge_mta_hooks_registered", endpoint="scanner") == 0
        assert await blocking(mta.wait_for_queue_idle) == []
        assert mta.maildir_messages() == []


@pytest.mark.asyncio
async def test_a_forgotten_registration_is_renewed(mta: PostfixInstance, bridges: BridgeRunner) -> None:
    """A scanner that lost its registrations answers 404: that message tempfails, the bridge registers again."""
    async with HooksScanner() as scanner:
        await start(bridges, scanner)
        [first] = scanner.active()
        scanner.forget()
        lost = await smtp(mta, SENDER, RCPTS, make_message(subject="lost"))
        assert next(r for r in lost.replies if r.step == "end_of_data").code == 451

        for _ in range(50):
            if scanner.active():
                break
            await asyncio.sleep(0.05)
        [second] = scanner.active()
        assert second.id != first.id
        result = await smtp(mta, SENDER, RCPTS, make_message(subject="found"))

        assert result.accepted
        [(_, raw)] = await blocking(mta.wait_for_delivery, 1)
        assert parse(raw)["Subject"] == "found"
        assert [registration for registration, _, _ in scanner.calls] == [second.id]


@pytest.mark.asyncio
async def test_an_expiring_registration_is_renewed_before_it_expires(
    mta: PostfixInstance, bridges: BridgeRunner
) -> None:
    """With a 2 s lifetime the bridge registers again within it, and mail keeps flowing on the new one."""
    async with HooksScanner(ttl=2.0) as scanner:
        await start(bridges, scanner)
        [first] = scanner.active()
        for _ in range(40):
            if len(scanner.registrations) > 1:
                break
            await asyncio.sleep(0.05)
        assert len(scanner.registrations) == 2
        result = await smtp(mta, SENDER, RCPTS, make_message())

        assert result.accepted
        assert scanner.calls[-1][0] != first.id


@pytest.mark.asyncio
async def test_a_stalwart_hook_filters_mail(mta: PostfixInstance, bridges: BridgeRunner) -> None:
    """protocol = "stalwart": Stalwart's request at data; its modifications and reject reach Postfix."""
    seen: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        subject = next(value for name, value in body["message"]["headers"] if name == "Subject").strip()
        if subject == "bad":
            return web.json_response(
                {"action": "reject", "response": {"status": 550, "enhanced_status": "5.7.1", "message": "no"}}
            )
        modifications = [
            {"type": "addHeader", "name": "X-Stalwart", "value": "checked"},
            {"type": "addRcpt", "value": "carol@example.net"},
            {"type": "deleteRecipient", "value": "bob@example.net"},
        ]
        return web.json_response({"action": "accept", "modifications": modifications})

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        endpoint = EndpointSettings(
            name="stalwart", url=str(server.make_url("/hook")), protocol=EndpointProtocol.STALWART, include_body=True
        )
        await bridges.start(endpoint, default_action="accept")
        refused = await smtp(mta, SENDER, RCPTS, make_message(subject="bad"))
        result = await smtp(mta, SENDER, RCPTS, make_message(subject="good"))
    finally:
        await server.close()

    refusal = next(r for r in refused.replies if r.step == "end_of_data")
    assert (refusal.code, refusal.text) == (550, "5.7.1 no")
    assert result.accepted
    [(_, raw)] = await blocking(mta.wait_for_delivery, 1)
    delivered = parse(raw)
    assert delivered["Delivered-To"] == "carol@example.net"
    assert delivered["X-Stalwart"] == "checked"
    assert seen[0]["context"]["stage"] == "data"
    assert seen[0]["envelope"]["to"] == [{"address": "bob@example.net", "parameters": {}}]
    assert seen[0]["message"]["contents"].replace("\r\n", "\n") == "Hello.\n"
