"""The bridge under test: ``app.Bridge`` built from a ``Config`` and run in the test's own loop.

The engine, hostile and end-to-end suites all start their bridge here, so they test the
composition ``milterbridge serve`` runs (webhook client, dispatcher, milter listener,
metrics), without the admin HTTP listener unless a test asks for it::

    config = Config(server=ServerSettings(listen=LOOPBACK), endpoints=(fake.endpoint("policy"),))
    async with BridgeHarness(config) as bridge:
        client = await bridge.client()            # negotiated; closed when the bridge stops
        result = await client.send_message(Envelope(), message)
        await bridge.settle()                     # notifications and observe calls have ended
        bridge.metrics.registry.get_sample_value("milterbridge_messages_total", {"outcome": "accepted"})

Leaving the block stops the bridge (``stop``: the clients close, the listener drains for
up to two seconds, background calls end, the HTTP pool closes) and, when the block raised
nothing, checks that no connection and no milterbridge task is left (``assert_clean``).
Only ``app.Bridge``'s public surface is used: its constructor, ``start``, ``settle``,
``shutdown``, ``reload``, ``metrics``, ``settings`` and ``server``.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Final, Self

from milterbridge.app import Bridge
from milterbridge.client import MilterClient
from milterbridge.config import Config
from milterbridge.connection import ConnectionSettings
from milterbridge.metrics import BREAKER_STATES, Metrics
from milterbridge.milter.constants import ALL_ACTIONS, ALL_PROTOCOL
from milterbridge.server import MilterServer
from milterbridge.spans import Tracer
from tests.conftest import assert_no_leaked_tasks

#: ``server.listen`` for a milter listener on a free loopback port.
LOOPBACK: Final = ("inet:127.0.0.1:0",)
#: ``admin_listen`` for an admin HTTP listener on a free loopback port.
ADMIN_LOOPBACK: Final = "127.0.0.1:0"
#: Seconds ``stop`` lets in-flight messages finish before it closes their connections.
DRAIN_TIMEOUT: Final = 2.0


class BridgeHarness:
    """One ``app.Bridge`` for a test; see the module docstring.

    ``admin`` adds the admin HTTP listener on a free loopback port; ``metrics`` is where the
    bridge counts (a new ``Metrics`` by default); ``config_path`` is the file ``reload`` reads;
    ``tracer`` traces its messages.
    """

    def __init__(
        self,
        config: Config,
        *,
        admin: bool = False,
        metrics: Metrics | None = None,
        config_path: str | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.bridge = Bridge(
            config,
            config_path=config_path,
            admin_listen=ADMIN_LOOPBACK if admin else "",
            metrics=metrics,
            tracer=tracer,
        )
        self._clients: list[MilterClient] = []
        self._started = False
        self._stopped = False

    @property
    def config(self) -> Config:
        """The config in force (``reload`` replaces it)."""
        return self.bridge.config

    @property
    def metrics(self) -> Metrics:
        return self.bridge.metrics

    @property
    def server(self) -> MilterServer:
        """The milter listener (its ``state`` holds the open connections)."""
        return self.bridge.server

    @property
    def settings(self) -> ConnectionSettings:
        """What each milter connection runs with, the shared memory budget included."""
        return self.bridge.settings

    @property
    def address(self) -> str:
        """The first bound milter address, as Postfix writes it (``inet:127.0.0.1:PORT``, ``unix:/path``)."""
        return self.bridge.server.bound[0]

    @property
    def admin_address(self) -> str:
        """``host:port`` of the admin HTTP listener (only with ``admin=True``)."""
        assert self.bridge.admin is not None, "this bridge has no admin listener (admin=True)"
        host, port = self.bridge.admin.bound
        return f"{host}:{port}"

    async def start(self) -> Self:
        """Start the bridge: the webhook client, the milter listener and the admin listener if any."""
        assert not self._started, "a harness starts its bridge once"
        assert not self._stopped, "this harness was stopped"
        await self.bridge.start()  # on failure it closes what it opened
        self._started = True
        return self

    async def client(self, *, actions: int = ALL_ACTIONS, protocol: int = ALL_PROTOCOL) -> MilterClient:
        """A connected client that negotiated (Postfix's offer unless told otherwise); closed by ``stop``."""
        client = await MilterClient.open(self.address)
        self._clients.append(client)
        await client.negotiate(actions=actions, protocol=protocol)
        return client

    def reload(self) -> bool:
        """What SIGHUP does: re-read ``config_path`` and apply its endpoints, or refuse it."""
        return self.bridge.reload()

    def breaker_states(self) -> dict[str, str]:
        """The circuit breaker state per endpoint, as ``/metrics`` exports it."""
        states: dict[str, str] = {}
        for family in self.metrics.registry.collect():
            if family.name != "milterbridge_circuit_breaker_state":
                continue
            for sample in family.samples:
                if sample.value == 1.0 and sample.labels["state"] in BREAKER_STATES:
                    states[sample.labels["endpoint"]] = sample.labels["state"]
        return states

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait for the background calls (notifications, observe endpoints) to end."""
        await self.bridge.settle(timeout)

    async def stop(self, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        """Close the clients, then drain and stop the bridge (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        for client in self._clients:
            await client.aclose()
        if self._started:
            await self.bridge.shutdown(drain_timeout)
        # A closed connection's task ends a few loop turns after its socket.
        for _ in range(3):
            await asyncio.sleep(0)

    def assert_clean(self) -> None:
        """After ``stop``: no milter connection is open and no milterbridge task still runs."""
        assert not self.server.state.connections, f"connections left: {self.server.state.connections}"
        assert_no_leaked_tasks()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
        if exc is None:
            await asyncio.sleep(0)  # aiohttp's closed transports finish
            self.assert_clean()
