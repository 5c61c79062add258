"""Serving filters: make_app on a real loopback server, Filter.handle for any server, and the bridge end to end."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestServer

from milterbridge import sdk
from milterbridge.client import Envelope
from milterbridge.config import Config, EndpointSettings, ServerSettings
from milterbridge.milter.constants import Event
from milterbridge.milter.messages import AddHeader, Continue, ReplaceBody, ReplyCode, TempFail
from milterbridge.webhook.signing import Signer
from tests import contract
from tests.harness import LOOPBACK, BridgeHarness

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
OTHER = "whsec_" + base64.b64encode(b"\x07" * 32).decode()


def payload(name: str) -> dict[str, Any]:
    return copy.deepcopy(contract.SPEC["components"]["examples"][name]["value"])


def signed(
    document: dict[str, Any], secret: str = SECRET, *, msg_id: str | None = None
) -> tuple[bytes, dict[str, str]]:
    """A request body and the headers the bridge would send with it."""
    body = json.dumps(document).encode()
    msg_id = msg_id or document["id"]
    ts = int(time.time())
    return body, {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": Signer([secret]).sign(msg_id, ts, body),
        "Content-Type": "application/json",
    }


def policy(request: sdk.Request) -> sdk.Decision | None:
    """The filter under test: reject one recipient, tag every message, fail on a magic header."""
    if isinstance(request, sdk.RcptRequest) and request.data.address == "bad@example.net":
        return sdk.reject(550, "5.1.1", "No such user here", reason="unknown user")
    if isinstance(request, sdk.EomRequest):
        if request.message.header("X-Crash"):
            raise RuntimeError("boom")
        if request.message.header("X-Skip"):
            return sdk.skip()  # not legal at eom: the SDK answers 500 instead of sending it
        body = request.message.body.bytes if request.message.body else b""
        return sdk.continue_(modifications=[sdk.add_header("X-Checked", "yes"), sdk.replace_body(body.upper())])
    if isinstance(request, sdk.HeaderRequest):
        return None
    return sdk.continue_()


async def async_policy(request: sdk.Request) -> sdk.Decision | None:
    await asyncio.sleep(0)
    return policy(request)


@pytest_asyncio.fixture(params=[policy, async_policy], ids=["sync", "async"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[BaseTestServer]:
    app = sdk.make_app(request.param, secrets=[OTHER, SECRET], path="/filter")
    async with TestServer(app, host="127.0.0.1") as test_server:
        yield test_server


async def post(server: BaseTestServer, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.make_url("/filter"), data=body, headers=headers) as response,
    ):
        return response.status, await response.read(), response.content_type


@pytest.mark.asyncio
async def test_a_decision_is_200_json_valid_for_the_event(server: BaseTestServer) -> None:
    document = payload("request-rcpt")
    document["data"]["address"] = "bad@example.net"
    status, body, content_type = await post(server, *signed(document))
    assert (status, content_type) == (200, "application/json")
    decision = json.loads(body)
    assert decision["reply"] == {"code": 550, "enhanced": "5.1.1", "text": "No such user here"}
    contract.validate_decision("rcpt", decision)


@pytest.mark.asyncio
async def test_none_and_notifications_are_204(server: BaseTestServer) -> None:
    assert (await post(server, *signed(payload("request-header"))))[:2] == (204, b"")
    assert (await post(server, *signed(payload("request-close"))))[:2] == (204, b"")


@pytest.mark.asyncio
async def test_bad_signature_is_401_and_a_replay_too(server: BaseTestServer) -> None:
    body, headers = signed(payload("request-connect-inet"))
    assert (await post(server, body, headers))[0] == 200
    status, answer, _ = await post(server, body, headers)
    assert status == 401
    assert b"already received" in answer
    forged_body, forged = signed(payload("request-helo"), "whsec_" + base64.b64encode(b"x" * 32).decode())
    assert (await post(server, forged_body, forged))[0] == 401
    unsigned = {k: v for k, v in signed(payload("request-helo"))[1].items() if k != "webhook-signature"}
    assert (await post(server, forged_body, unsigned))[0] == 401


@pytest.mark.asyncio
async def test_a_malformed_request_is_400(server: BaseTestServer) -> None:
    document = payload("request-helo")
    del document["session"]
    status, answer, _ = await post(server, *signed(document))
    assert (status, answer) == (400, b"request: 'session' is missing")
    assert (await post(server, *signed({"id": "wh-x"}, msg_id="wh-x")))[0] == 400


@pytest.mark.asyncio
async def test_handler_failure_and_invalid_decision_are_500(
    server: BaseTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    crash = payload("request-eom")
    crash["message"]["headers"].append({"name": "X-Crash", "value": " 1"})
    with caplog.at_level(logging.ERROR, logger="milterbridge.sdk"):
        assert (await post(server, *signed(crash)))[:2] == (500, b"the handler failed")
        illegal = payload("request-eom")
        illegal["id"] = "wh-other"
        illegal["message"]["headers"].append({"name": "X-Skip", "value": " 1"})
        assert (await post(server, *signed(illegal)))[0] == 500
    assert "RuntimeError: boom" in caplog.text
    assert "action: skip is not allowed at eom" in caplog.text


# ---------------------------------------------------------------- framework-neutral


def test_filter_handle_for_any_server() -> None:
    """handle(body, headers) gives the same answers without an event loop (e.g. under WSGI)."""
    filter_ = sdk.Filter(policy, secrets=[SECRET])
    document = payload("request-rcpt")
    document["data"]["address"] = "bad@example.net"
    status, body = filter_.handle(*signed(document))
    assert status == 200
    assert json.loads(body)["action"] == "reject"
    assert filter_.handle(*signed(document))[0] == 401  # the same call again: a replay
    assert filter_.handle(*signed(payload("request-helo"), OTHER))[0] == 401
    assert filter_.handle(b"{}", {})[0] == 401
    assert sdk.Filter(policy, secrets=None).handle(b"{}", {}) == (400, b"request: 'event' is missing")


def test_handle_refuses_a_coroutine_handler() -> None:
    status, _ = sdk.Filter(async_policy, secrets=None).handle(*signed(payload("request-helo")))
    assert status == 500


@pytest.mark.asyncio
async def test_make_app_takes_a_filter() -> None:
    with pytest.raises(ValueError, match="not both"):
        sdk.make_app(sdk.Filter(policy, secrets=None), secrets=[SECRET])
    app = sdk.make_app(sdk.Filter(policy, secrets=[SECRET]), secrets=None, path="/filter")
    async with TestServer(app, host="127.0.0.1") as test_server:
        assert (await post(test_server, *signed(payload("request-helo"))))[0] == 200
        assert (await post(test_server, *signed(payload("request-mail"), OTHER)))[0] == 401


# ---------------------------------------------------------------- the bridge, end to end


@pytest.mark.asyncio
async def test_the_bridge_against_an_sdk_filter() -> None:
    """A bridge with a signing secret calls an SDK filter: the recipient is refused, the header added."""
    app = sdk.make_app(async_policy, secrets=[SECRET], path="/filter")
    wrong = sdk.make_app(policy, secrets=[OTHER], path="/filter")
    async with TestServer(app, host="127.0.0.1") as good, TestServer(wrong, host="127.0.0.1") as bad:
        events = frozenset({Event.RCPT, Event.HEADER, Event.EOM})
        endpoint = EndpointSettings(
            name="sdk", url=str(good.make_url("/filter")), events=events, secrets=(SECRET,), include_body=True
        )
        config = Config(server=ServerSettings(listen=LOOPBACK), endpoints=(endpoint,))
        envelope = Envelope(recipients=(b"<good@example.net>", b"<bad@example.net>"))
        message = b"From: a@example.org\r\nSubject: hi\r\n\r\nHello\r\n"
        async with BridgeHarness(config) as bridge:
            result = await (await bridge.client()).send_message(envelope, message)
        assert isinstance(result.rcpt[0], Continue)
        refused = result.rcpt[1]
        assert isinstance(refused, ReplyCode)
        assert refused.text.startswith(b"550 5.1.1 No such user here")
        assert result.eom is not None
        assert isinstance(result.eom.reply, Continue)
        assert AddHeader(name=b"X-Checked", value=b" yes") in result.eom.modifications
        new_body = b"".join(m.data for m in result.eom.modifications if isinstance(m, ReplaceBody))
        assert new_body == b"HELLO\r\n"

        # The same bridge against a filter that knows another secret: 401, and on_error (tempfail) applies.
        endpoint = EndpointSettings(name="sdk", url=str(bad.make_url("/filter")), events=events, secrets=(SECRET,))
        config = Config(server=ServerSettings(listen=LOOPBACK), endpoints=(endpoint,))
        async with BridgeHarness(config) as bridge:
            result = await (await bridge.client()).send_message(envelope, message)
        # Every recipient gets on_error's 451, so the transaction ends at RCPT.
        assert result.rcpt == [TempFail(), TempFail()]
        assert result.stopped_at == "rcpt"


def test_web_is_aiohttp() -> None:
    assert isinstance(sdk.make_app(policy, secrets=None), web.Application)


# ---------------------------------------------------------------- the documented filter

DOCS = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"


def test_the_filter_in_the_docs_works() -> None:
    """docs/webhooks.md's SDK filter, run as written, refuses the blocked recipient and tags the message."""
    blocks = re.findall(r"```python\n(.*?)\n```", DOCS.read_text(encoding="utf-8"), re.DOTALL)
    [source] = [b for b in blocks if "from milterbridge import sdk" in b]
    namespace: dict[str, Any] = {"__name__": "docs_filter"}
    exec(compile(source, str(DOCS), "exec"), namespace)
    filter_ = sdk.Filter(namespace["check"], secrets=[SECRET])
    rcpt = payload("request-rcpt")
    rcpt["data"]["address"] = "Nobody@example.net"
    status, body = filter_.handle(*signed(rcpt))
    assert status == 200
    assert json.loads(body)["reply"]["code"] == 550
    status, body = filter_.handle(*signed(payload("request-eom")))
    assert status == 200
    assert json.loads(body)["modifications"][0]["name"] == "X-Filtered"
    assert filter_.handle(*signed(payload("request-helo")))[0] == 204
