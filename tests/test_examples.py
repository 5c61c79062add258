"""The example filters in examples/, each driven through the bridge with the MTA-side client."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from wsgiref.simple_server import WSGIRequestHandler, make_server

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from milterbridge.client import Envelope
from milterbridge.config import Config, EndpointSettings, ServerSettings
from milterbridge.milter import messages as m
from milterbridge.milter.constants import Event
from tests.harness import LOOPBACK, BridgeHarness

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SECRET = "whsec_" + "c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seQ=="


def load(relative: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(relative.replace("/", "_").removesuffix(".py"), EXAMPLES / relative)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, as an import would: dataclasses look their module up there.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest_asyncio.fixture
async def allowlist_url() -> AsyncIterator[str]:
    runner = web.AppRunner(load("aiohttp-allowlist/filter.py").make_app(SECRET), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/milter"
    await runner.cleanup()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def tagger_url() -> Iterator[str]:
    server = make_server("127.0.0.1", 0, load("wsgi-tagger/filter.py").make_app([SECRET]), handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    thread.join()
    server.server_close()


async def run(endpoints: tuple[EndpointSettings, ...], envelope: Envelope, message: bytes):
    config = Config(server=ServerSettings(listen=LOOPBACK), endpoints=endpoints)
    async with BridgeHarness(config) as bridge:
        milter = await bridge.client()
        result = await milter.send_message(envelope, message)
        await milter.quit()
        await bridge.settle()
    return result


@pytest.mark.asyncio
async def test_allowlist_refuses_foreign_recipient_and_tags_spam(allowlist_url: str) -> None:
    """The aiohttp example refuses a recipient outside its domains and tags spam words."""
    endpoint = EndpointSettings(
        name="allowlist",
        url=allowlist_url,
        events=frozenset({Event.RCPT, Event.EOM}),
        include_body=True,
        secrets=(SECRET,),
    )
    envelope = Envelope(recipients=(b"<ok@example.com>", b"<x@elsewhere.org>"))
    result = await run((endpoint,), envelope, b"Subject: you are a winner\r\n\r\nclaim your lottery prize\r\n")
    assert result.rcpt[0] == m.Continue()
    assert isinstance(result.rcpt[1], m.ReplyCode)
    assert result.rcpt[1].text == b"550 5.7.1 relaying to elsewhere.org is not allowed"
    assert result.eom is not None
    assert m.AddHeader(name=b"X-Spam-Flag", value=b" YES") in result.eom.modifications
    assert m.AddHeader(name=b"X-Spam-Words", value=b" lottery, winner") in result.eom.modifications
    assert result.eom.reply == m.Continue()


@pytest.mark.asyncio
async def test_allowlist_quarantines_on_three_hits(allowlist_url: str) -> None:
    """Three spam words in subject and body put the message on hold with the reason."""
    endpoint = EndpointSettings(
        name="allowlist", url=allowlist_url, events=frozenset({Event.EOM}), include_body=True, secrets=(SECRET,)
    )
    result = await run((endpoint,), Envelope(), b"Subject: lottery winner\r\n\r\nviagra inside\r\n")
    assert result.eom is not None
    assert m.Quarantine(reason=b"spam words: viagra, lottery, winner") in result.eom.modifications


@pytest.mark.asyncio
async def test_allowlist_refuses_unsigned_requests(allowlist_url: str) -> None:
    """Without the secret the example answers 401, and the endpoint's on_error (tempfail) applies."""
    endpoint = EndpointSettings(name="allowlist", url=allowlist_url, events=frozenset({Event.EOM}))
    result = await run((endpoint,), Envelope(), b"Subject: hi\r\n\r\nhello\r\n")
    assert result.final == m.TempFail()


def signed_headers(body: bytes, timestamp: float, secret: str = SECRET) -> dict[str, str]:
    """Standard Webhooks headers for ``body`` at ``timestamp``, signed by the reference library."""
    when = datetime.fromtimestamp(timestamp, UTC)
    return {
        "webhook-id": "evt_test",
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": Webhook(secret).sign("evt_test", when, body),
    }


#: A whole rcpt request of the contract, as the bridge sends it.
RCPT_BODY = json.dumps(
    {
        "event": "rcpt",
        "id": "evt_test",
        "timestamp": "2024-01-01T00:00:00Z",
        "session": {
            "id": "s1",
            "client": {"name": "client.example", "address": "192.0.2.1", "port": 25, "family": "inet"},
            "helo": "client.example",
            "macros": {},
        },
        "message": {
            "id": "m1",
            "queue_id": None,
            "mail_from": {"address": "a@example.org", "raw": "<a@example.org>", "args": []},
            "rcpt_to": [],
            "headers": [],
            "macros": {},
        },
        "data": {"address": "ok@example.com", "raw": "<ok@example.com>", "args": []},
    }
).encode()


async def post_status(url: str, headers: dict[str, str], body: bytes = RCPT_BODY) -> int:
    """POST ``body`` to the example server and return the status."""
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as response:
        return response.status


@pytest.mark.asyncio
async def test_allowlist_accepts_a_fresh_signed_request(allowlist_url: str) -> None:
    """The control case of the refusals below: a request signed just now is answered 200."""
    assert await post_status(allowlist_url, signed_headers(RCPT_BODY, time.time())) == 200


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "age",
    [
        pytest.param(301, id="5min-1s-old"),
        pytest.param(3600, id="an-hour-old"),
        pytest.param(-301, id="5min-1s-ahead"),
    ],
)
async def test_allowlist_refuses_replayed_requests(allowlist_url: str, age: float) -> None:
    """A correctly signed request whose timestamp is over 5 minutes away from now gets 401."""
    assert await post_status(allowlist_url, signed_headers(RCPT_BODY, time.time() - age)) == 401


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "drop",
    [
        pytest.param(("webhook-signature",), id="no-signature"),
        pytest.param(("webhook-timestamp",), id="no-timestamp"),
        pytest.param(("webhook-id",), id="no-id"),
        pytest.param(("webhook-id", "webhook-timestamp", "webhook-signature"), id="no-headers"),
    ],
)
async def test_allowlist_refuses_unsigned_requests_directly(allowlist_url: str, drop: tuple[str, ...]) -> None:
    """With a secret set, a request missing any Standard Webhooks header gets 401 (never a 500)."""
    headers = {k: v for k, v in signed_headers(RCPT_BODY, time.time()).items() if k not in drop}
    assert await post_status(allowlist_url, headers) == 401


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"webhook-signature": "v1,AAAA"}, id="wrong-signature"),
        pytest.param({"webhook-signature": "v1,caf\u00e9"}, id="non-ascii-signature"),
        pytest.param({"webhook-timestamp": "soon"}, id="timestamp-not-a-number"),
        pytest.param({"webhook-id": "evt_other"}, id="other-id"),
    ],
)
async def test_allowlist_refuses_tampered_requests(allowlist_url: str, change: dict[str, str]) -> None:
    """A signature that does not cover these exact headers and body gets 401."""
    headers = signed_headers(RCPT_BODY, time.time()) | change
    assert await post_status(allowlist_url, headers) == 401


@pytest.mark.asyncio
async def test_allowlist_refuses_another_key(allowlist_url: str) -> None:
    """A fresh request signed with a key other than the example's gets 401."""
    other_key = "whsec_" + "b3RoZXIta2V5LWZvci10ZXN0cy1vbmx5"
    assert await post_status(allowlist_url, signed_headers(RCPT_BODY, time.time(), other_key)) == 401


@pytest.mark.asyncio
async def test_allowlist_refuses_a_replayed_webhook_id(allowlist_url: str) -> None:
    """The same signed request a second time (same webhook-id) is a replay: 401."""
    headers = signed_headers(RCPT_BODY, time.time())
    assert await post_status(allowlist_url, headers) == 200
    assert await post_status(allowlist_url, headers) == 401


@pytest.mark.asyncio
async def test_allowlist_refuses_a_body_that_is_not_a_request(allowlist_url: str) -> None:
    """A correctly signed body that is not a webhook request of the contract gets 400."""
    body = json.dumps({"event": "rcpt", "data": {"address": "ok@example.com"}}).encode()
    assert await post_status(allowlist_url, signed_headers(body, time.time()), body) == 400


@pytest.mark.asyncio
async def test_wsgi_tagger_adds_headers_and_archive_recipient(tagger_url: str) -> None:
    """The WSGI example tags the message and adds the archive recipient with NOTIFY=NEVER."""
    endpoint = EndpointSettings(name="tagger", url=tagger_url, events=frozenset({Event.EOM}), secrets=(SECRET,))
    envelope = Envelope(mail_from=b"<boss@example.com>", recipients=(b"<a@example.net>", b"<b@example.net>"))
    result = await run((endpoint,), envelope, b"Subject: report\r\n\r\nnumbers\r\n")
    assert result.eom is not None
    mods = result.eom.modifications
    assert m.AddRecipientWithArgs(address=b"<archive@example.com>", args=b"NOTIFY=NEVER") in mods
    assert m.AddHeader(name=b"X-Filtered-By", value=b" wsgi-tagger") in mods
    assert m.AddHeader(name=b"X-Recipient-Count", value=b" 2") in mods


@pytest.mark.asyncio
async def test_wsgi_tagger_refuses_unsigned_requests(tagger_url: str) -> None:
    """Without the secret the WSGI example answers 401, and the endpoint's on_error (tempfail) applies."""
    endpoint = EndpointSettings(name="tagger", url=tagger_url, events=frozenset({Event.EOM}))
    result = await run((endpoint,), Envelope(), b"Subject: report\r\n\r\nnumbers\r\n")
    assert result.final == m.TempFail()
    assert await post_status(tagger_url, {}) == 401


@pytest.mark.parametrize("example", ["aiohttp-allowlist/filter.py", "wsgi-tagger/filter.py"])
@pytest.mark.parametrize("secret", [None, "", "  "], ids=["unset", "empty", "blank"])
def test_an_example_does_not_start_without_a_secret(example: str, secret: str | None) -> None:
    """Without FILTER_SECRET the example exits 2 with a message instead of answering unsigned requests."""
    env = {k: v for k, v in os.environ.items() if k != "FILTER_SECRET"}
    if secret is not None:
        env["FILTER_SECRET"] = secret
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / example), "--host", "127.0.0.1", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,  # an example that starts serves until killed: the test fails here
        check=False,
    )
    assert run.returncode == 2
    assert "set FILTER_SECRET to the endpoint's whsec_ secret" in run.stderr


@pytest.mark.parametrize(("example", "empty"), [("aiohttp-allowlist/filter.py", " "), ("wsgi-tagger/filter.py", [])])
def test_make_app_needs_a_secret(example: str, empty: object) -> None:
    """make_app refuses to build a filter that would answer unsigned requests."""
    with pytest.raises(ValueError, match="no secret given"):
        load(example).make_app(empty)
