"""Run milterbridge and fake webhook endpoints next to the real Postfix, for end-to-end tests.

The bridge is ``app.Bridge`` (through ``tests.harness.BridgeHarness``, without the admin
listener) inside the test's own event loop, so a test can stop it halfway through and see
what Postfix does with a milter that is gone.

smtplib and the Postfix commands block, so the SMTP side runs in a worker thread
(``await smtp(...)``, ``await blocking(...)``) while the bridge and the fake endpoints keep
serving in the loop.

Fixtures (re-exported by ``conftest.py``)::

    async def test_x(mta, webhooks, bridges):
        webhooks.set_default(FakeResponse.decision("reject"), event="eom")
        bridge = await bridges.start(webhooks.endpoint("policy"))   # Postfix now points at it
        result = await smtp(mta, SENDER, [RCPT], make_message())
        await bridge.stop()                                          # the milter is down now

``mta`` is the session's Postfix with an empty queue and Maildir, like the harness's
``postfix`` fixture, but it keeps the milter settings of the previous test: every bridge
listens on one fixed loopback address per run, so Postfix is reloaded only when a test
needs other settings (a unix socket, another ``milter_default_action``, other timeouts).
That keeps the suite fast and avoids the postlogd wedge described at ``PostfixInstance.settle_logging``.

``bridges.start`` binds that fixed address unless told otherwise, then makes sure Postfix
points at it with the given ``default_action`` and ``set_milter`` keywords;
``point_postfix=False`` leaves Postfix alone.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.message
import email.policy
import functools
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from milterbridge.config import Config, EndpointSettings, SendmailSettings, ServerSettings
from milterbridge.metrics import Metrics
from milterbridge.server import MilterServer
from tests.fakes.webhooks import FakeWebhooks
from tests.harness import BridgeHarness
from tests.ops.conftest import BridgeLauncher

from .postfix import (
    DEFAULT_HELO,
    MILTER_TIMEOUTS,
    PostfixInstance,
    SmtpResult,
    free_port,
)

__all__ = [
    "BIG_BODY_MAX_BYTES",
    "BigFakeWebhooks",
    "BridgeRunner",
    "RunningBridge",
    "blocking",
    "body_of",
    "bridges",
    "configure_milter",
    "decode_b64",
    "header_lines",
    "milter_listen",
    "mta",
    "parse",
    "smtp",
    "webhooks",
]

_P = ParamSpec("_P")
_T = TypeVar("_T")

#: Request bodies FakeWebhooks must accept for the multi-MiB message test (base64 of 5 MiB
#: plus JSON); aiohttp's default ``client_max_size`` of 1 MiB would answer 413.
BIG_BODY_MAX_BYTES = 32 * 1024 * 1024


async def blocking(func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Run a blocking call (SMTP, a Postfix command, a poll) in a thread so the loop keeps serving."""
    return await asyncio.to_thread(functools.partial(func, *args, **kwargs))


async def smtp(
    postfix: PostfixInstance,
    mail_from: str,
    rcpts: Sequence[str],
    message: bytes,
    *,
    helo: str = DEFAULT_HELO,
    port: int | None = None,
) -> SmtpResult:
    """One SMTP session with one transaction against ``postfix`` (its listener, or ``port``), run in a thread."""
    return await blocking(postfix.send, mail_from, rcpts, message, helo=helo, port=port)


def parse(raw: bytes) -> email.message.EmailMessage:
    """A delivered message, parsed with the modern policy (for header look-ups)."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


def header_lines(raw: bytes) -> list[tuple[str, str]]:
    """The header block of a delivered file as (name, raw value) in file order, folds kept.

    The value is everything after the colon, leading whitespace included, with continuation
    lines joined by LF, which is how Postfix hands headers to a milter.
    """
    head = raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("utf-8", "replace")
    out: list[tuple[str, str]] = []
    for line in head.split("\n"):
        if line[:1] in (" ", "\t") and out:
            name, value = out[-1]
            out[-1] = (name, f"{value}\n{line}")
        else:
            name, _, value = line.partition(":")
            out.append((name, value))
    return out


def body_of(raw: bytes) -> bytes:
    """The body of a delivered file, exactly as stored (virtual(8) writes LF line ends)."""
    return raw.split(b"\n\n", 1)[1]


def decode_b64(text: str) -> bytes:
    """Strict base64 decoding of a payload field."""
    return base64.b64decode(text, validate=True)


def _milter_params(address: str | None, default_action: str, milter: Mapping[str, Any]) -> dict[str, str]:
    """The main.cf values ``PostfixInstance.set_milter`` writes for these arguments."""
    return {
        "smtpd_milters": address or "",
        "milter_default_action": default_action,
        "milter_protocol": str(milter.get("protocol", "6")),
        "milter_connect_timeout": milter.get("connect_timeout", MILTER_TIMEOUTS["milter_connect_timeout"]),
        "milter_command_timeout": milter.get("command_timeout", MILTER_TIMEOUTS["milter_command_timeout"]),
        "milter_content_timeout": milter.get("content_timeout", MILTER_TIMEOUTS["milter_content_timeout"]),
        **milter.get("macros", {}),
    }


def _main_cf(postfix: PostfixInstance) -> dict[str, str]:
    """main.cf as ``name -> value`` (postconf writes one ``name = value`` per line)."""
    values = {}
    for line in (postfix.config_dir / "main.cf").read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith(("#", " ", "\t")):
            values[name.strip()] = value.strip()
    return values


def configure_milter(
    postfix: PostfixInstance, address: str | None, default_action: str = "tempfail", **milter: Any
) -> bool:
    """``postfix.set_milter(...)`` unless main.cf already says so; return True when Postfix was reloaded."""
    wanted = _milter_params(address, default_action, milter)
    current = _main_cf(postfix)
    if all(current.get(name) == value for name, value in wanted.items()):
        return False
    postfix.set_milter(address, default_action, **milter)  # settles postlogd before and after
    return True


class RunningBridge:
    """One started bridge: its config, listener and metrics; ``stop`` takes the milter down."""

    def __init__(self, harness: BridgeHarness) -> None:
        self.harness = harness

    @property
    def config(self) -> Config:
        return self.harness.config

    @property
    def server(self) -> MilterServer:
        """The milter listener (its ``state`` holds the open connections)."""
        return self.harness.server

    @property
    def metrics(self) -> Metrics:
        return self.harness.metrics

    @property
    def address(self) -> str:
        """The first bound address in Postfix's syntax (``inet:127.0.0.1:PORT`` or ``unix:/path``)."""
        return self.harness.address

    def metric(self, sample: str, **labels: str) -> float:
        """The sum of the samples named ``sample`` whose labels include ``labels`` (0 when none)."""
        text = self.metrics.render()[0].decode()
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def breaker_states(self) -> dict[str, str]:
        """The circuit breaker state per endpoint, as ``/metrics`` exports it."""
        return self.harness.breaker_states()

    async def stop(self, drain_timeout: float = 2.0) -> None:
        """Stop listening, drain for up to ``drain_timeout`` seconds, close the webhook pool (idempotent)."""
        await self.harness.stop(drain_timeout)


class BridgeRunner:
    """Starts bridges for one test and stops every one of them at the end."""

    def __init__(self, postfix: PostfixInstance | None, listen: str) -> None:
        #: The MTA ``start`` points at the bridge; None for one that is pointed at ``listen`` already (Sendmail).
        self.postfix = postfix
        #: The run's fixed milter address; the default for ``start``.
        self.listen = listen
        self.started: list[RunningBridge] = []

    async def start(
        self,
        *endpoints: EndpointSettings,
        listen: Sequence[str] | None = None,
        server: Mapping[str, Any] | None = None,
        sendmail: SendmailSettings | None = None,
        point_postfix: bool = True,
        default_action: str = "tempfail",
        **milter: Any,
    ) -> RunningBridge:
        """Start a bridge for ``endpoints``; point Postfix's ``smtpd_milters`` at it unless told not to.

        ``server`` overrides ``ServerSettings`` fields (``listen`` is taken from ``listen``), ``sendmail``
        is the config's ``[sendmail]``;
        ``default_action`` and ``milter`` go to ``PostfixInstance.set_milter``.
        """
        settings = ServerSettings(**{**(server or {}), "listen": tuple(listen or (self.listen,))})
        config = Config(server=settings, endpoints=tuple(endpoints), sendmail=sendmail or SendmailSettings())
        harness = BridgeHarness(config)
        await harness.start()
        bridge = RunningBridge(harness)
        self.started.append(bridge)
        if point_postfix and self.postfix is not None:
            await blocking(configure_milter, self.postfix, bridge.address, default_action, **milter)
        return bridge

    async def aclose(self) -> None:
        """Stop every bridge this runner started."""
        for bridge in reversed(self.started):
            await bridge.stop()


class BigFakeWebhooks(FakeWebhooks):
    """FakeWebhooks that accepts request bodies up to ``BIG_BODY_MAX_BYTES`` (include_body of MiBs)."""

    async def serve(self) -> None:
        """Start listening with a raised request size limit (idempotent)."""
        if self._server is not None:
            return
        # FakeWebhooks builds a default web.Application (1 MiB limit); this one differs only
        # in client_max_size, and reuses the same handler and shutdown events.
        self._changed = asyncio.Event()
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=BIG_BODY_MAX_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server(shutdown_timeout=0.5)
        self._server = server


@pytest_asyncio.fixture
async def webhooks() -> AsyncIterator[FakeWebhooks]:
    """A started fake endpoint server on 127.0.0.1 that also takes multi-MiB requests."""
    async with BigFakeWebhooks() as fake:
        yield fake


@pytest_asyncio.fixture
async def processes(tmp_path: Path) -> AsyncIterator[BridgeLauncher]:
    """``milterbridge serve`` processes (the ``tests/ops`` launcher); every one is killed when the test ends."""
    launcher = BridgeLauncher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.kill_all()


@pytest.fixture(scope="session")
def milter_listen() -> str:
    """The loopback address every bridge of this run listens on, unless a test says otherwise."""
    return f"inet:127.0.0.1:{free_port()}"


@pytest.fixture
def mta(postfix_instance: PostfixInstance) -> PostfixInstance:
    """The run's Postfix with an empty queue and Maildir; milter settings stay as the last test left them."""
    postfix_instance.settle_logging()
    # A delivery still in flight would land after the Maildir is emptied.
    postfix_instance.wait_for_queue_idle(timeout=5.0)
    postfix_instance.delete_all()
    postfix_instance.clear_maildir()
    return postfix_instance


@pytest_asyncio.fixture
async def bridges(mta: PostfixInstance, milter_listen: str) -> AsyncIterator[BridgeRunner]:
    """Start bridges with ``await bridges.start(...)``; all are stopped after the test."""
    runner = BridgeRunner(mta, milter_listen)
    try:
        yield runner
    finally:
        await runner.aclose()
