"""Per-event budgets, the max_concurrency cap, error-body quotes and the debug line of the call step.

Against real aiohttp servers (tests/fakes/webhooks.py) and the real ``Metrics``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import orjson
import pytest
import pytest_asyncio

from milterbridge.config import EndpointSettings
from milterbridge.endpoint import CallResult, Endpoint, build_endpoints, call_endpoint
from milterbridge.metrics import Metrics
from milterbridge.milter.constants import ALL_ACTIONS, Event
from milterbridge.policy.model import Decision, Failure
from milterbridge.webhook import WebhookClient
from tests.fakes.webhooks import FakeResponse, FakeWebhooks, RecordedRequest

BODY = orjson.dumps({"event": "eom", "id": "evt_1", "data": {}})
WAIT = "milterbridge_webhook_queue_wait_seconds"


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeWebhooks]:
    async with FakeWebhooks() as server:
        yield server


@pytest_asyncio.fixture
async def client() -> AsyncIterator[WebhookClient]:
    async with WebhookClient() as webhook_client:
        yield webhook_client


class Gate:
    """A fake's script that holds every request until ``open()``, counting those in flight."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.in_flight = 0
        self.most_in_flight = 0

    async def __call__(self, request: RecordedRequest) -> FakeResponse:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.opened.wait()
        finally:
            self.in_flight -= 1
        return FakeResponse.decision("continue")

    def open(self) -> None:
        self.opened.set()


async def _call(client: WebhookClient, endpoint: Endpoint, metrics: Metrics, event: Event = Event.EOM) -> CallResult:
    return await call_endpoint(
        client, endpoint, "evt_1", BODY, event=event, allowed_actions=ALL_ACTIONS, observer=metrics
    )


def _reason(result: CallResult) -> str:
    assert isinstance(result.outcome, Failure), result.outcome
    return result.outcome.reason


def _with(settings: EndpointSettings, **changes: Any) -> EndpointSettings:
    return replace(settings, **changes)


def _sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


# -- per-event budgets ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_event_budget_replaces_timeout_for_that_event(fake: FakeWebhooks, client: WebhookClient) -> None:
    """A call at rcpt has its timeouts entry as budget; eom keeps timeout."""
    metrics = Metrics()
    fake.set_default(FakeResponse.decision().after(0.5))
    settings = fake.endpoint("policy", events=frozenset({Event.RCPT, Event.EOM}), timeout=5.0, retry=False)
    (endpoint,) = build_endpoints([_with(settings, timeouts=((Event.RCPT, 0.2),))])
    assert endpoint.timeouts[Event.RCPT] == 0.2
    assert endpoint.timeouts[Event.EOM] == 5.0
    rcpt = await _call(client, endpoint, metrics, Event.RCPT)
    assert "no answer within 0.2 s" in _reason(rcpt)
    assert rcpt.elapsed < 0.45
    eom = await _call(client, endpoint, metrics, Event.EOM)
    assert isinstance(eom.outcome, Decision)
    assert _sample(metrics, "milterbridge_webhook_requests_total", endpoint="policy", event="rcpt", outcome="timeout")
    assert _sample(metrics, WAIT + "_count", endpoint="policy") is None  # no cap: never observed


# -- max_concurrency -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_no_cap_builds_no_slots(fake: FakeWebhooks) -> None:
    """max_concurrency = 0 (the default) gives the endpoint no semaphore at all."""
    (endpoint,) = build_endpoints([fake.endpoint("policy")])
    assert endpoint.slots is None
    (capped,) = build_endpoints([fake.endpoint("policy", max_concurrency=2)])
    assert capped.slots is not None


@pytest.mark.asyncio
async def test_calls_over_the_cap_queue_and_the_wait_is_measured(fake: FakeWebhooks, client: WebhookClient) -> None:
    """With max_concurrency = 1, three calls reach the endpoint one at a time; each wait is observed."""
    metrics = Metrics()
    gate = Gate()
    fake.set_default(gate)
    (endpoint,) = build_endpoints([fake.endpoint("policy", max_concurrency=1, timeout=5.0)])
    calls = [asyncio.create_task(_call(client, endpoint, metrics)) for _ in range(3)]
    await fake.wait_until(lambda: len(fake.requests) == 1)
    await asyncio.sleep(0.1)
    assert len(fake.requests) == 1  # the other two wait for the slot, nothing sent
    assert endpoint.slots is not None
    assert endpoint.slots.locked()
    gate.open()
    results = await asyncio.gather(*calls)
    assert all(isinstance(result.outcome, Decision) for result in results)
    assert len(fake.requests) == 3
    assert gate.most_in_flight == 1
    assert _sample(metrics, WAIT + "_count", endpoint="policy") == 3
    waited = _sample(metrics, WAIT + "_sum", endpoint="policy")
    assert waited is not None
    assert waited >= 0.2  # two calls waited at least the 0.1 s sleep each
    assert not endpoint.slots.locked()


@pytest.mark.asyncio
async def test_no_slot_within_the_budget_is_a_timeout_the_breaker_ignores(
    fake: FakeWebhooks, client: WebhookClient
) -> None:
    """A call that gets no slot in its event's budget fails as timeout, sends nothing and leaves the breaker closed."""
    metrics = Metrics()
    gate = Gate()
    fake.set_default(gate)
    settings = fake.endpoint(
        "policy",
        events=frozenset({Event.RCPT, Event.EOM}),
        max_concurrency=1,
        timeout=5.0,
        retry=False,
        breaker_min_calls=1,
        breaker_failure_rate=1.0,
    )
    (endpoint,) = build_endpoints([_with(settings, timeouts=((Event.RCPT, 0.2),))])
    holder = asyncio.create_task(_call(client, endpoint, metrics, Event.EOM))
    await fake.wait_until(lambda: len(fake.requests) == 1)
    queued = await _call(client, endpoint, metrics, Event.RCPT)
    reason = _reason(queued)
    assert "waited 0.2 s for a free call slot (max_concurrency = 1); nothing was sent" in reason
    assert reason.startswith("webhook 'policy' (")
    assert 0.2 <= queued.elapsed < 0.45
    assert queued.action == "failure"
    assert len(fake.requests) == 1
    assert str(endpoint.breaker.state) == "closed"  # one counted failure would have opened it
    assert _sample(metrics, "milterbridge_webhook_requests_total", endpoint="policy", event="rcpt", outcome="timeout")
    gate.open()
    assert isinstance((await holder).outcome, Decision)
    assert isinstance((await _call(client, endpoint, metrics, Event.RCPT)).outcome, Decision)  # the slot is free
    assert _sample(metrics, WAIT + "_count", endpoint="policy") == 3
    waited = _sample(metrics, WAIT + "_sum", endpoint="policy")
    assert waited is not None
    assert waited >= 0.2


@pytest.mark.asyncio
async def test_a_queued_call_that_runs_out_of_budget_is_not_charged_to_the_endpoint(
    fake: FakeWebhooks, client: WebhookClient
) -> None:
    """A call that waited for its slot and then times out on what was left of its budget is a
    timeout for that message, but says nothing about the endpoint: the breaker stays closed."""
    metrics = Metrics()
    gate = Gate()
    first = True

    async def script(request: RecordedRequest) -> FakeResponse:
        nonlocal first
        if first:
            first = False
            return await gate(request)
        await asyncio.sleep(0.4)  # slower than what the queued call has left, faster than its budget
        return FakeResponse.decision("continue")

    fake.set_default(script)
    settings = fake.endpoint(
        "policy",
        events=frozenset({Event.RCPT, Event.EOM}),
        max_concurrency=1,
        timeout=5.0,
        retry=False,
        breaker_min_calls=2,
        breaker_failure_rate=0.5,
    )
    (endpoint,) = build_endpoints([_with(settings, timeouts=((Event.RCPT, 0.6),))])
    holder = asyncio.create_task(_call(client, endpoint, metrics, Event.EOM))
    await fake.wait_until(lambda: len(fake.requests) == 1)
    queued = asyncio.create_task(_call(client, endpoint, metrics, Event.RCPT))
    await asyncio.sleep(0.35)
    gate.open()  # the queued call gets its slot with about 0.25 s of its 0.6 s left
    result = await queued
    assert "no answer within" in _reason(result)
    assert len(fake.requests) == 2  # it was sent, and timed out on the rest of its budget
    # With the holder's success, one counted failure would make half of two calls: open.
    assert str(endpoint.breaker.state) == "closed"
    assert isinstance((await holder).outcome, Decision)


@pytest.mark.asyncio
async def test_a_cancelled_waiter_takes_no_slot(fake: FakeWebhooks, client: WebhookClient) -> None:
    """A call cancelled while it waits for a slot (the MTA left) leaves the slots as they were."""
    metrics = Metrics()
    gate = Gate()
    fake.set_default(gate)
    (endpoint,) = build_endpoints([fake.endpoint("policy", max_concurrency=1, timeout=5.0)])
    holder = asyncio.create_task(_call(client, endpoint, metrics))
    await fake.wait_until(lambda: len(fake.requests) == 1)
    waiter = asyncio.create_task(_call(client, endpoint, metrics))
    await asyncio.sleep(0.05)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    gate.open()
    await holder
    assert endpoint.slots is not None
    assert not endpoint.slots.locked()
    assert len(fake.requests) == 1


def test_reload_keeps_slots_of_an_unchanged_endpoint(fake: FakeWebhooks) -> None:
    """Equal settings share the semaphore (and breaker) across a reload; a changed cap gets new ones."""
    (old,) = build_endpoints([fake.endpoint("policy", max_concurrency=2)])
    (same,) = build_endpoints([fake.endpoint("policy", max_concurrency=2)], [old])
    assert same.slots is old.slots
    assert same.breaker is old.breaker
    (changed,) = build_endpoints([fake.endpoint("policy", max_concurrency=3)], [same])
    assert changed.slots is not old.slots
    assert changed.breaker is not old.breaker
    (uncapped,) = build_endpoints([fake.endpoint("policy")], [changed])
    assert uncapped.slots is None


# -- what a failed or debugged call says ------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "quoted"),
    [
        pytest.param(b'{"error": "bad signature"}', 'answered 401: {"error": "bad signature"}', id="json"),
        pytest.param(b"line\r\nforged\x1b[31m\x7f", "answered 401: line\\x0d\\x0aforged\\x1b[31m\\x7f", id="controls"),
        pytest.param(b"caf\xc3\xa9 \xff", "answered 401: caf\u00e9 \\xff", id="not-utf8"),
        pytest.param(b"x" * 300, "answered 401: " + "x" * 200 + "...", id="cut-at-200"),
        pytest.param(b"", "answered 401", id="empty"),
    ],
)
@pytest.mark.asyncio
async def test_error_status_quotes_the_start_of_the_body(
    fake: FakeWebhooks, client: WebhookClient, body: bytes, quoted: str
) -> None:
    """The failure of a non-2xx answer quotes its first 200 bytes, control characters escaped."""
    fake.set_default(FakeResponse.status_code(401, body))
    (endpoint,) = build_endpoints([fake.endpoint("policy", retry=False)])
    reason = _reason(await _call(client, endpoint, Metrics()))
    assert reason == f"webhook 'policy' ({fake.url()}): {quoted}"


@pytest.mark.asyncio
async def test_error_body_echoing_our_headers_does_not_quote_them(fake: FakeWebhooks, client: WebhookClient) -> None:
    """An error page that echoes the request's headers (a proxy, a debug page) does not put the
    endpoint's configured token into the failure text, whole or as its credentials part."""
    token = "s3cr3t-token-value"
    fake.set_default(FakeResponse.status_code(502, f"Authorization: Bearer {token}; seen {token}".encode()))
    settings = fake.endpoint("policy", retry=False, headers=(("Authorization", f"Bearer {token}"),))
    (endpoint,) = build_endpoints([settings])
    reason = _reason(await _call(client, endpoint, Metrics()))
    assert token not in reason
    assert "answered 502: Authorization: <redacted>; seen <redacted>" in reason


@pytest.mark.asyncio
async def test_debug_logs_request_size_and_answer(
    fake: FakeWebhooks, client: WebhookClient, caplog: pytest.LogCaptureFixture
) -> None:
    """At debug each call logs the request's size and the start of the answer's body; not above debug."""
    fake.set_default(FakeResponse.decision("continue", reason="looks \u00e9 fine"))
    (endpoint,) = build_endpoints([fake.endpoint("policy")])
    caplog.set_level(logging.INFO, logger="milterbridge.dispatch")
    await _call(client, endpoint, Metrics())
    assert [r for r in caplog.records if r.levelno == logging.DEBUG] == []
    caplog.set_level(logging.DEBUG, logger="milterbridge.dispatch")
    await _call(client, endpoint, Metrics())
    (record,) = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert record.getMessage() == "webhook policy at eom: ok"
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["request_bytes"] == len(BODY)
    assert fields["request"] == BODY.decode()  # the JSON sent, as long as it is under 1 KiB
    assert fields["status"] == 200
    assert fields["webhook_id"] == "evt_1"
    assert orjson.loads(fields["response"]) == {"action": "continue", "reason": "looks \u00e9 fine"}
