"""The example filters in examples/, each driven through the bridge with the MTA-side client."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
import pytest_asyncio
from aiohttp import web

from milterbridge.client import Envelope, MilterClient
from milterbridge.config import Config, EndpointSettings
from milterbridge.dispatch import Dispatcher
from milterbridge.milter import messages as m
from milterbridge.milter.constants import Event
from milterbridge.webhook.client import WebhookClient
from tests.conftest import running_server

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SECRET = "whsec_" + "c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seQ=="


def load(relative: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(relative.replace("/", "_").removesuffix(".py"), EXAMPLES / relative)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
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
    server = make_server("127.0.0.1", 0, load("wsgi-tagger/filter.py").app, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    thread.join()
    server.server_close()


async def run(endpoints: tuple[EndpointSettings, ...], envelope: Envelope, message: bytes):
    config = Config(endpoints=endpoints)
    async with WebhookClient(config.endpoints) as client:
        dispatcher = Dispatcher(config, client)
        async with running_server(dispatcher) as server:
            milter = await MilterClient.open(server.bound[0])
            await milter.negotiate()
            result = await milter.send_message(envelope, message)
            await milter.quit()
        await dispatcher.aclose()
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


@pytest.mark.asyncio
async def test_wsgi_tagger_adds_headers_and_archive_recipient(tagger_url: str) -> None:
    """The WSGI example tags the message and adds the archive recipient with NOTIFY=NEVER."""
    endpoint = EndpointSettings(name="tagger", url=tagger_url, events=frozenset({Event.EOM}))
    envelope = Envelope(mail_from=b"<boss@example.com>", recipients=(b"<a@example.net>", b"<b@example.net>"))
    result = await run((endpoint,), envelope, b"Subject: report\r\n\r\nnumbers\r\n")
    assert result.eom is not None
    mods = result.eom.modifications
    assert m.AddRecipientWithArgs(address=b"<archive@example.com>", args=b"NOTIFY=NEVER") in mods
    assert m.AddHeader(name=b"X-Filtered-By", value=b" wsgi-tagger") in mods
    assert m.AddHeader(name=b"X-Recipient-Count", value=b" 2") in mods
