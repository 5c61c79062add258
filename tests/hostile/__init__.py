"""Hostile-input tests: fuzzing, illegal sequences, abusive MTAs and broken endpoints.

Shared pieces live here so the test modules stay about their cases:

* :data:`BUDGET` — example counts for the hypothesis tests. The default is short
  enough for CI; ``HYPOTHESIS_PROFILE=long`` multiplies it for a longer local run
  (see docs/reliability.md).
* :class:`Bridge` — the bridge under test (``tests.harness.BridgeHarness``, so
  ``app.Bridge``) for a fake endpoint server, its milter listener on 127.0.0.1.
* :func:`well_behaved` — one complete, ordinary message, used as the "someone else
  still gets served" check next to every hostile case.
* :func:`rss_kib` — this process's resident memory from ``/proc/self/status``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest

from milterbridge.client import Envelope, MilterClient, TransactionResult
from milterbridge.config import Config, EndpointSettings, ServerSettings
from milterbridge.metrics import Metrics
from tests.fakes.webhooks import FakeWebhooks
from tests.harness import LOOPBACK, BridgeHarness

#: True for ``HYPOTHESIS_PROFILE=long``: every example budget below grows.
LONG_RUN = os.environ.get("HYPOTHESIS_PROFILE", "").lower() == "long"


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """Hypothesis example counts for one run of the hostile suite."""

    #: Random frame/garbage streams through a negotiated session.
    fuzz_examples: int
    #: Runs of the session state machine (each up to ``session_steps`` commands).
    session_examples: int
    session_steps: int
    #: Runs of the dispatcher state machine (real sockets and HTTP: kept small).
    dispatch_examples: int
    dispatch_steps: int


CI_BUDGET = Budget(fuzz_examples=2_000, session_examples=300, session_steps=60, dispatch_examples=20, dispatch_steps=30)
LONG_BUDGET = Budget(
    fuzz_examples=100_000, session_examples=10_000, session_steps=100, dispatch_examples=500, dispatch_steps=50
)
BUDGET = LONG_BUDGET if LONG_RUN else CI_BUDGET
#: Per-test time limit for the hypothesis tests: the project's 60 s, or an hour for the long run.
budget_timeout = pytest.mark.timeout(3600 if LONG_RUN else 60)

#: The usual test message: three headers and a one-line body.
MESSAGE = b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: hello\r\n\r\nHello Bob.\r\n"


def rss_kib() -> int:
    """Resident set size of this process in KiB (VmRSS in /proc/self/status)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS line in /proc/self/status")


def host_port(address: str) -> tuple[str, int]:
    """``inet:127.0.0.1:PORT`` -> ("127.0.0.1", PORT)."""
    host, port = address.removeprefix("inet:").rsplit(":", 1)
    return host, int(port)


async def well_behaved(address: str, message: bytes = MESSAGE) -> TransactionResult:
    """A complete, ordinary session (negotiate, connect, helo, one message, quit)."""
    client = await MilterClient.open(address)
    try:
        await client.negotiate()
        result = await client.send_message(Envelope(), message)
        await client.quit()
    finally:
        await client.aclose()
    return result


class Bridge(BridgeHarness):
    """The bridge under test for the endpoints of ``fake``, its milter listener on 127.0.0.1.

    ``async with Bridge(fake, endpoint, ...) as bridge`` starts it; leaving closes the
    clients, drains the listener, awaits background calls, closes the HTTP pool and, unless
    the block raised, checks that no connection and no milterbridge task is left.
    ``server`` gives the other settings (its ``listen`` is replaced); ``metrics`` is where the
    bridge counts.
    """

    def __init__(
        self,
        fake: FakeWebhooks,
        *endpoints: EndpointSettings,
        server: ServerSettings | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        settings = replace(server or ServerSettings(), listen=LOOPBACK)
        super().__init__(Config(server=settings, endpoints=endpoints), metrics=metrics)
        self.fake = fake

    async def session(self, client: MilterClient, envelope: Envelope | None = None) -> TransactionResult:
        """CONNECT and HELO on ``client``."""
        return await client.open_session(envelope or Envelope())


def endpoint(fake: FakeWebhooks, name: str = "policy", **overrides: Any) -> EndpointSettings:
    """Settings of an endpoint served by ``fake`` at ``/<name>`` (breaker off unless asked)."""
    overrides.setdefault("breaker_min_calls", 0)
    return fake.endpoint(name, path=f"/{name}", **overrides)


__all__: Sequence[str] = (
    "BUDGET",
    "LONG_RUN",
    "MESSAGE",
    "Bridge",
    "Budget",
    "budget_timeout",
    "endpoint",
    "host_port",
    "rss_kib",
    "well_behaved",
)
