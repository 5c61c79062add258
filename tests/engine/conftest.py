"""The engine fixture: fake endpoints and one bridge (``tests.harness.BridgeHarness``) in one.

``engine`` yields an :class:`Engine` whose fake endpoint server is already running; a test
builds its endpoints from it and starts the bridge::

    async def test_x(engine):
        await engine.start(engine.endpoint("policy", events=frozenset({Event.RCPT})))
        engine.fake.set_default(FakeResponse.decision("reject"), path="/policy")
        result = await engine.send()                 # CONNECT, HELO, one transaction
        assert isinstance(result.rcpt[0], Reject)
        assert engine.events("policy") == ["rcpt"]

Each endpoint named ``name`` listens on the path ``/name`` of the one fake server. At teardown
every client is closed, the bridge drained and stopped (background calls awaited, the HTTP pool
closed), the fake server closed, every recorded request checked against the OpenAPI request
schema (``tests/contract.py``) and the loop checked for leaked tasks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio

from milterbridge.client import Envelope, MilterClient, TransactionResult
from milterbridge.config import Config, EndpointSettings, SendmailSettings, ServerSettings
from milterbridge.metrics import Metrics
from milterbridge.milter.constants import ALL_ACTIONS, ALL_PROTOCOL
from milterbridge.server import MilterServer
from tests import contract
from tests.conftest import assert_no_leaked_tasks
from tests.fakes.webhooks import FakeWebhooks, RecordedRequest
from tests.harness import LOOPBACK, BridgeHarness

#: The usual test message: three headers and a one-line body.
MESSAGE = b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: hello\r\n\r\nHello Bob.\r\n"
ENVELOPE = Envelope()


#: ``tests.contract``: every request is checked against the OpenAPI schema (``validate_requests``).
CONTRACT = contract


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
        self.harness: BridgeHarness | None = None

    def endpoint(self, name: str = "policy", **overrides: Any) -> EndpointSettings:
        """Settings of an endpoint served by the fake at ``/<name>``."""
        return self.fake.endpoint(name, path=f"/{name}", **overrides)

    async def start(
        self,
        *endpoints: EndpointSettings,
        server: ServerSettings | None = None,
        progress_interval: float | None = None,
        sendmail: SendmailSettings | None = None,
    ) -> Engine:
        """Start the bridge for ``endpoints``, its milter listener on 127.0.0.1:0 (whatever ``server.listen`` says)."""
        assert self.harness is None, "the engine starts one bridge"
        settings = dataclasses.replace(server or ServerSettings(), listen=LOOPBACK)
        if progress_interval is not None:
            settings = dataclasses.replace(settings, progress_interval=progress_interval)
        config = Config(server=settings, endpoints=tuple(endpoints), sendmail=sendmail or SendmailSettings())
        self.harness = BridgeHarness(config, metrics=self.metrics)
        await self.harness.start()
        return self

    @property
    def bridge(self) -> BridgeHarness:
        """The started bridge."""
        assert self.harness is not None, "call engine.start() first"
        return self.harness

    @property
    def config(self) -> Config:
        return self.bridge.config

    @property
    def server(self) -> MilterServer:
        return self.bridge.server

    @property
    def address(self) -> str:
        """The listener's milter address."""
        return self.bridge.address

    async def client(self, *, actions: int = ALL_ACTIONS, protocol: int = ALL_PROTOCOL) -> MilterClient:
        """A connected client that negotiated with Postfix's default offer (or the one given)."""
        return await self.bridge.client(actions=actions, protocol=protocol)

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

    def breaker_states(self) -> dict[str, str]:
        """The circuit breaker state per endpoint, as ``/metrics`` exports it."""
        return self.bridge.breaker_states()

    async def settle(self) -> None:
        """Wait for background calls (observe endpoints, notifications) to end."""
        await self.bridge.settle()

    async def aclose(self) -> None:
        """Close clients, drain the listener, finish background calls, close the HTTP pool."""
        if self.harness is not None:
            await self.harness.stop()

    def assert_clean(self) -> None:
        """No milter connection open, no milterbridge task running."""
        if self.harness is not None:
            self.harness.assert_clean()
        else:
            assert_no_leaked_tasks()


def validate_requests(fake: FakeWebhooks) -> None:
    """Every request the bridge sent validates against the OpenAPI request schema."""
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
    eng.assert_clean()
