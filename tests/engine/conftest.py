"""The engine fixture: fake endpoints, webhook client, dispatcher and milter listener in one.

``engine`` yields an :class:`Engine` whose fake endpoint server is already running; a test
builds its endpoints from it and starts the bridge::

    async def test_x(engine):
        await engine.start(engine.endpoint("policy", events=frozenset({Event.RCPT})))
        engine.fake.set_default(FakeResponse.decision("reject"), path="/policy")
        result = await engine.send()                 # CONNECT, HELO, one transaction
        assert isinstance(result.rcpt[0], Reject)
        assert engine.events("policy") == ["rcpt"]

Each endpoint named ``name`` listens on the path ``/name`` of the one fake server. At teardown
every client is closed, the listener drained, background calls awaited, the HTTP pool and the
fake server closed, every recorded request checked against the OpenAPI request schema (when
``tests/contract.py`` is present) and the loop checked for leaked tasks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import socket
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import pytest_asyncio

from milterbridge.app import connection_settings
from milterbridge.client import Envelope, MilterClient, TransactionResult
from milterbridge.config import Config, EndpointSettings, ServerSettings
from milterbridge.dispatch import Dispatcher
from milterbridge.metrics import Metrics
from milterbridge.milter.constants import ALL_ACTIONS, ALL_PROTOCOL
from milterbridge.server import MilterServer
from milterbridge.webhook.client import WebhookClient
from tests.conftest import assert_no_leaked_tasks
from tests.fakes.webhooks import FakeWebhooks, RecordedRequest

#: The usual test message: three headers and a one-line body.
MESSAGE = b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: hello\r\n\r\nHello Bob.\r\n"
ENVELOPE = Envelope()


def _load_contract() -> ModuleType | None:
    """tests/contract.py when it exists (it is written alongside these tests)."""
    try:
        return importlib.import_module("tests.contract")
    except ModuleNotFoundError as exc:
        if exc.name != "tests.contract":
            raise  # the module is there but broken: say so rather than skip validation
        return None


CONTRACT = _load_contract()


def closed_port() -> int:
    """A loopback TCP port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class Engine:
    """One bridge wired to one fake endpoint server; see the module docstring."""

    def __init__(self, fake: FakeWebhooks) -> None:
        self.fake = fake
        self.metrics = Metrics()
        self.config: Config | None = None
        self.webhooks: WebhookClient | None = None
        self.dispatcher: Dispatcher | None = None
        self.server: MilterServer | None = None
        self._clients: list[MilterClient] = []

    def endpoint(self, name: str = "policy", **overrides: Any) -> EndpointSettings:
        """Settings of an endpoint served by the fake at ``/<name>``."""
        return self.fake.endpoint(name, path=f"/{name}", **overrides)

    async def start(
        self,
        *endpoints: EndpointSettings,
        server: ServerSettings | None = None,
        progress_interval: float | None = None,
    ) -> Engine:
        """Start the webhook client, the dispatcher and a listener on 127.0.0.1:0."""
        server_settings = server or ServerSettings(listen=("inet:127.0.0.1:0",))
        self.config = Config(server=server_settings, endpoints=tuple(endpoints))
        self.webhooks = WebhookClient(endpoints, observer=self.metrics)
        await self.webhooks.start()
        self.dispatcher = Dispatcher(self.config, self.webhooks, metrics=self.metrics)
        settings = connection_settings(self.config)
        if progress_interval is not None:
            settings = dataclasses.replace(settings, progress_interval=progress_interval)
        self.server = MilterServer(["inet:127.0.0.1:0"], self.dispatcher, settings)
        await self.server.start()
        return self

    @property
    def address(self) -> str:
        """The listener's milter address."""
        assert self.server is not None, "call engine.start() first"
        return self.server.bound[0]

    async def client(self, *, actions: int = ALL_ACTIONS, protocol: int = ALL_PROTOCOL) -> MilterClient:
        """A connected client that negotiated with Postfix's default offer (or the one given)."""
        client = await MilterClient.open(self.address)
        self._clients.append(client)
        await client.negotiate(actions=actions, protocol=protocol)
        return client

    async def send(
        self, message: bytes = MESSAGE, envelope: Envelope = ENVELOPE, client: MilterClient | None = None
    ) -> TransactionResult:
        """CONNECT, HELO and one transaction on a new (or the given) client."""
        client = client or await self.client()
        return await client.send_message(envelope, message)

    def requests(self, name: str, event: str | None = None) -> list[RecordedRequest]:
        """Requests the endpoint ``name`` received (of ``event``)."""
        return self.fake.requests_for(path=f"/{name}", event=event)

    def bodies(self, name: str, event: str | None = None) -> list[dict[str, Any]]:
        """The JSON bodies of :meth:`requests`."""
        return [r.json for r in self.requests(name, event)]

    def events(self, name: str) -> list[str | None]:
        """Event names the endpoint ``name`` received, in arrival order."""
        return self.fake.events(path=f"/{name}")

    async def settle(self) -> None:
        """Wait for background calls (observe endpoints, notifications) to end."""
        assert self.dispatcher is not None
        await self.dispatcher.aclose(timeout=5.0)

    async def aclose(self) -> None:
        """Close clients, drain the listener, finish background calls, close the HTTP pool."""
        for client in self._clients:
            await client.aclose()
        if self.server is not None:
            await self.server.shutdown(timeout=2.0)
            for _ in range(3):
                await asyncio.sleep(0)
            assert not self.server.state.connections
        if self.dispatcher is not None:
            await self.dispatcher.aclose(timeout=5.0)
        if self.webhooks is not None:
            await self.webhooks.aclose()


def validate_requests(fake: FakeWebhooks) -> None:
    """Every request the bridge sent validates against the OpenAPI request schema."""
    if CONTRACT is None:
        return
    for request in fake.requests:
        assert request.event is not None, f"request without an event: {request.body[:200]!r}"
        CONTRACT.validate_request(request.event, request.json)


@pytest_asyncio.fixture
async def engine() -> AsyncIterator[Engine]:
    """An :class:`Engine` with its fake endpoint server running; torn down and leak-checked."""
    async with FakeWebhooks() as fake:
        eng = Engine(fake)
        try:
            yield eng
        finally:
            await eng.aclose()
    # Sleep a tick so that aiohttp's closed transports finish before the leak check.
    await asyncio.sleep(0)
    validate_requests(fake)
    assert_no_leaked_tasks()
