"""Endpoint failures turn into the endpoint's on_error outcome (design.md §3.5)."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest

from milterbridge.app import connection_settings
from milterbridge.client import Envelope, MilterClient, MilterClientError
from milterbridge.config import Config, EndpointSettings, ServerSettings
from milterbridge.connection import MilterConnection
from milterbridge.dispatch import ConnectionHandler, Dispatcher
from milterbridge.metrics import Metrics
from milterbridge.milter.constants import Event
from milterbridge.milter.messages import Accept, AddHeader, Continue, Reject, Reply, TempFail
from milterbridge.policy.model import Mode, OnError
from milterbridge.server import MilterServer
from tests.engine.conftest import ENVELOPE, MESSAGE, Engine, closed_port
from tests.fakes.webhooks import FakeResponse, RecordedRequest

#: Seconds of budget for the timeout cases, and what we allow on top of it.
TIMEOUT = 0.3
SLACK = 0.7

ON_ERROR: dict[OnError, Reply] = {
    OnError.TEMPFAIL: TempFail(),
    OnError.CONTINUE: Continue(),
    OnError.ACCEPT: Accept(),
    OnError.REJECT: Reject(),
}


def _refused(engine: Engine, **kw: Any) -> EndpointSettings:
    return EndpointSettings(name="policy", url=f"http://127.0.0.1:{closed_port()}/policy", **kw)


def _scripted(response: Callable[[Engine], FakeResponse], **settings: Any) -> Callable[..., EndpointSettings]:
    def make(engine: Engine, **kw: Any) -> EndpointSettings:
        engine.fake.set_default(response(engine), path="/policy")
        return engine.endpoint("policy", **settings, **kw)

    return make


#: name -> a function building the failing endpoint (and scripting the fake).
FAILURES: dict[str, Callable[..., EndpointSettings]] = {
    "connection-refused": _refused,
    "connection-cut": _scripted(lambda e: FakeResponse.close_connection()),
    "timeout": _scripted(lambda e: FakeResponse.never_answer(), timeout=TIMEOUT),
    "status-500": _scripted(lambda e: FakeResponse.status_code(500, b"oops")),
    "redirect-302": _scripted(lambda e: FakeResponse.redirect(e.fake.url("/elsewhere"))),
    "invalid-json": _scripted(lambda e: FakeResponse.raw(b'{"action": "continue"')),
    "not-an-object": _scripted(lambda e: FakeResponse.raw(b'"continue"')),
    "schema-invalid": _scripted(lambda e: FakeResponse.json({"action": "continue", "extra": 1})),
    "unknown-action": _scripted(lambda e: FakeResponse.decision("maybe")),
    "oversized": _scripted(lambda e: FakeResponse.huge(4096), max_response_bytes=1024),
    "oversized-chunked": _scripted(lambda e: FakeResponse.huge(4096, chunked=True), max_response_bytes=1024),
}


def _failure_cases() -> list[Any]:
    return [
        pytest.param(kind, on_error, id=f"{kind}-{on_error.value}")
        for kind in FAILURES
        for on_error in (OnError.TEMPFAIL, OnError.CONTINUE, OnError.ACCEPT, OnError.REJECT)
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize(("kind", "on_error"), _failure_cases())
async def test_failure_gives_on_error_outcome(engine: Engine, kind: str, on_error: OnError) -> None:
    """A failed eom call merges as the endpoint's on_error action, within the endpoint's timeout."""
    endpoint = FAILURES[kind](engine, on_error=on_error)
    await engine.start(endpoint)
    started = time.monotonic()
    result = await engine.send()
    elapsed = time.monotonic() - started
    assert result.eom is not None
    assert result.eom.reply == ON_ERROR[on_error]
    assert result.eom.modifications == ()
    assert elapsed < endpoint.timeout + SLACK if kind == "timeout" else elapsed < SLACK
    if kind == "redirect-302":
        assert engine.fake.requests_for(path="/elsewhere") == []


@pytest.mark.asyncio
async def test_default_on_error_is_tempfail(engine: Engine) -> None:
    """Without on_error in the settings a failure is a tempfail."""
    engine.fake.set_default(FakeResponse.status_code(500))
    await engine.start(engine.endpoint("policy"))
    result = await engine.send()
    assert result.eom is not None
    assert result.eom.reply == TempFail()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("on_error", "expected"),
    [
        pytest.param(OnError.TEMPFAIL, TempFail(), id="tempfail"),
        pytest.param(OnError.REJECT, Reject(), id="reject"),
        pytest.param(OnError.CONTINUE, Continue(), id="continue"),
    ],
)
async def test_failure_at_rcpt_refuses_only_that_recipient(engine: Engine, on_error: OnError, expected: Reply) -> None:
    """A failure at rcpt applies on_error to that recipient only; the message goes on with the others."""

    def per_recipient(request: RecordedRequest) -> FakeResponse:
        if request.json["data"]["address"] == "flaky@example.net":
            return FakeResponse.status_code(500)
        return FakeResponse.decision("continue")

    engine.fake.set_default(per_recipient, event="rcpt")
    await engine.start(engine.endpoint("policy", events=frozenset({Event.RCPT, Event.EOM}), on_error=on_error))
    envelope = Envelope(recipients=(b"<flaky@example.net>", b"<fine@example.net>"))
    result = await engine.send(envelope=envelope)
    assert result.rcpt == [expected, Continue()]
    assert result.eom is not None
    (eom,) = engine.bodies("policy", "eom")
    kept = [a["address"] for a in eom["message"]["rcpt_to"]]
    assert kept == (["flaky@example.net", "fine@example.net"] if on_error is OnError.CONTINUE else ["fine@example.net"])


@pytest.mark.asyncio
async def test_failure_at_unknown_never_rejects_or_accepts(engine: Engine) -> None:
    """At unknown, on_error reject becomes a tempfail (Postfix ignores 5xx there)."""
    engine.fake.set_default(FakeResponse.status_code(500))
    await engine.start(engine.endpoint("policy", events=frozenset({Event.UNKNOWN}), on_error=OnError.REJECT))
    client = await engine.client()
    await client.open_session(Envelope())
    assert await client.unknown(b"XFOO") == TempFail()


@pytest.mark.asyncio
async def test_retry_once_on_503_then_success(engine: Engine) -> None:
    """A 503 is retried once inside the budget, and the second answer is used."""
    engine.fake.enqueue(
        FakeResponse.status_code(503),
        FakeResponse.decision("continue", modifications=[{"op": "add_header", "name": "X-Try", "value": "2"}]),
    )
    await engine.start(engine.endpoint("policy"))
    result = await engine.send()
    assert result.eom is not None
    assert result.eom.modifications == (AddHeader(name=b"X-Try", value=b" 2"),)
    assert len(engine.requests("policy")) == 2


@pytest.mark.asyncio
async def test_500_is_not_retried(engine: Engine) -> None:
    """A 500 is not retried: one request, then on_error."""
    engine.fake.set_default(FakeResponse.status_code(500))
    await engine.start(engine.endpoint("policy"))
    result = await engine.send()
    assert result.eom is not None
    assert result.eom.reply == TempFail()
    assert len(engine.requests("policy")) == 1


@pytest.mark.asyncio
async def test_slow_eom_sends_progress_keepalives(engine: Engine) -> None:
    """While a slow eom webhook runs the MTA receives SMFIR_PROGRESS, then the decision."""
    engine.fake.set_default(
        FakeResponse.decision("continue", modifications=[{"op": "add_header", "name": "X-Slow", "value": "1"}]).after(
            0.45
        )
    )
    await engine.start(engine.endpoint("policy"), progress_interval=0.1)
    result = await engine.send()
    assert result.eom is not None
    assert result.eom.progress >= 2
    assert result.eom.modifications == (AddHeader(name=b"X-Slow", value=b" 1"),)
    assert result.eom.reply == Continue()


@pytest.mark.asyncio
async def test_fast_eom_sends_no_progress(engine: Engine) -> None:
    """A quick eom answer comes without any keep-alive."""
    await engine.start(engine.endpoint("policy"), progress_interval=0.5)
    result = await engine.send()
    assert result.eom is not None
    assert result.eom.progress == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("on_error", [OnError.TEMPFAIL, OnError.REJECT], ids=lambda e: e.value)
async def test_circuit_breaker_stops_calling_a_failing_endpoint(engine: Engine, on_error: OnError) -> None:
    """Once the failure rate opens the breaker the endpoint is not called and on_error applies at once."""
    engine.fake.set_default(FakeResponse.never_answer())
    endpoint = engine.endpoint("policy", timeout=0.25, breaker_min_calls=2, breaker_probe=60.0, on_error=on_error)
    await engine.start(endpoint)
    client = await engine.client()
    await client.open_session(Envelope())
    timings = []
    for _ in range(4):
        started = time.monotonic()
        result = await client.send_transaction(Envelope(), MESSAGE)
        timings.append(time.monotonic() - started)
        assert result.eom is not None
        assert result.eom.reply == ON_ERROR[on_error]
    assert len(engine.requests("policy")) == 2
    assert min(timings[:2]) >= endpoint.timeout
    assert max(timings[2:]) < endpoint.timeout / 2  # no call, no waiting
    refused = {"endpoint": "policy", "event": "eom", "outcome": "breaker_open"}
    assert engine.metrics.registry.get_sample_value("milterbridge_webhook_requests_total", refused) == 2


@pytest.mark.asyncio
async def test_circuit_breaker_tries_again_after_the_probe_delay(engine: Engine) -> None:
    """After breaker_probe one trial call goes out; its success closes the breaker."""
    engine.fake.set_default(FakeResponse.status_code(500))
    await engine.start(engine.endpoint("policy", breaker_min_calls=2, breaker_probe=0.3))
    client = await engine.client()
    await client.open_session(Envelope())
    replies = [(await client.send_transaction(Envelope(), MESSAGE)).final for _ in range(3)]
    assert replies == [TempFail()] * 3
    assert len(engine.requests("policy")) == 2
    await asyncio.sleep(0.35)
    engine.fake.set_default(FakeResponse.decision("continue"))
    replies = [(await client.send_transaction(Envelope(), MESSAGE)).final for _ in range(2)]
    assert replies == [Continue()] * 2
    assert len(engine.requests("policy")) == 4


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["invalid-json", "unknown-action", "oversized"])
async def test_circuit_breaker_ignores_answers_about_one_message(engine: Engine, kind: str) -> None:
    """Invalid or oversized answers get on_error but never open the breaker: every message reaches the endpoint."""
    endpoint = FAILURES[kind](engine, breaker_min_calls=2)
    await engine.start(endpoint)
    client = await engine.client()
    await client.open_session(Envelope())
    for _ in range(4):
        result = await client.send_transaction(Envelope(), MESSAGE)
        assert result.eom is not None
        assert result.eom.reply == TempFail()
    assert len(engine.requests("policy")) == 4
    assert engine.breaker_states() == {"policy": "closed"}


@pytest.mark.asyncio
async def test_mta_leaving_cancels_the_webhook(engine: Engine) -> None:
    """When the MTA closes the connection during a slow eom call, the call is cancelled."""
    engine.fake.set_default(FakeResponse.never_answer())
    await engine.start(engine.endpoint("policy", timeout=5.0))
    client = await engine.client()
    await client.open_session(Envelope())
    task = asyncio.create_task(client.send_transaction(Envelope(), MESSAGE))
    await engine.fake.wait_for(1, path="/policy")
    await client.aclose()
    await engine.fake.wait_until(lambda: len(engine.fake.cancelled) == 1, timeout=2.0)
    with pytest.raises(MilterClientError):
        await task


@pytest.mark.asyncio
async def test_background_calls_are_capped_per_endpoint(engine: Engine) -> None:
    """Past max_background running calls an observe endpoint's calls are dropped and counted, and
    the enforcing decision is not held up by them."""
    engine.fake.set_default(FakeResponse.decision("continue").after(1.0), path="/shadow")
    engine.fake.set_default(FakeResponse.decision("reject"), path="/policy")
    shadow = engine.endpoint("shadow", mode=Mode.OBSERVE, max_background=2, timeout=2.0)
    await engine.start(engine.endpoint("policy"), shadow)
    client = await engine.client()
    await client.open_session(ENVELOPE)
    for _ in range(5):
        result = await client.send_transaction(ENVELOPE, MESSAGE)
        assert result.eom is not None
        assert isinstance(result.eom.reply, Reject)
    assert (
        engine.metrics.registry.get_sample_value("milterbridge_background_dropped_total", {"endpoint": "shadow"}) == 3
    )
    await engine.settle()
    assert len(engine.requests("shadow", "eom")) == 2
    assert len(engine.requests("policy", "eom")) == 5


class _BuggyClient:
    """A webhook client with a bug: ``post`` raises an error that is no webhook failure."""

    async def post(self, endpoint: EndpointSettings, body: object, *, webhook_id: str) -> object:
        raise RuntimeError("a bug")


@pytest.mark.asyncio
async def test_a_bridge_fault_tempfails_and_is_not_the_endpoints_on_error(caplog: pytest.LogCaptureFixture) -> None:
    """A fault of the bridge itself tempfails the message even with on_error = continue, is
    counted as an internal fault and logged with the message's outcome."""
    caplog.set_level(logging.INFO, logger="milterbridge.dispatch")
    metrics = Metrics()
    endpoint = EndpointSettings(name="policy", url="http://127.0.0.1:9/x", on_error=OnError.CONTINUE)
    config = Config(server=ServerSettings(listen=("inet:127.0.0.1:0",)), endpoints=(endpoint,))
    dispatcher = Dispatcher(config, _BuggyClient(), metrics=metrics)
    server = MilterServer(["inet:127.0.0.1:0"], dispatcher, connection_settings(config))
    await server.start()
    try:
        client = await MilterClient.open(server.bound[0])
        await client.negotiate()
        result = await client.send_message(ENVELOPE, MESSAGE)
        await client.aclose()
    finally:
        await server.shutdown(timeout=2.0)
        await dispatcher.aclose()
    assert result.eom is not None
    assert isinstance(result.eom.reply, TempFail)
    assert metrics.registry.get_sample_value("milterbridge_bridge_faults_total", {"kind": "internal"}) == 1
    assert metrics.registry.get_sample_value("milterbridge_messages_total", {"outcome": "tempfailed"}) == 1
    lines = [r for r in caplog.records if r.getMessage() == "message tempfailed"]
    assert len(lines) == 1
    assert "bridge fault" in lines[0].fields["reason"]  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_a_closed_connection_is_freed_without_the_cycle_collector(engine: Engine) -> None:
    """Nothing of a connection keeps a reference cycle: when it closes, reference counting frees
    its connection and handler at once; the cyclic collector would cost every one-message session.

    Counted among the objects the collector tracks (an unreachable cycle stays there while the
    collector is off), not by weak references: compiled classes take none."""

    def alive() -> int:
        return sum(1 for o in gc.get_objects() if isinstance(o, MilterConnection | ConnectionHandler))

    await engine.start(engine.endpoint("policy"))
    client = await engine.client()
    result = await client.send_message(ENVELOPE, MESSAGE)
    assert result.eom is not None
    gc.collect()
    assert alive() == 1 + 1  # this connection and its handler
    gc.disable()
    try:
        await client.quit()
        for _ in range(200):
            if not engine.server.state.connections:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the transport's own close callbacks
        assert alive() == 0
    finally:
        gc.enable()
