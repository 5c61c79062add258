"""What the message's log line says about each endpoint call, and concurrency caps under load."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from milterbridge.milter.constants import Event
from milterbridge.milter.messages import Continue, Reject, TempFail
from tests.engine.conftest import Engine
from tests.fakes.webhooks import FakeResponse


def _message_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.getMessage().startswith("message ")]  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_every_endpoints_reason_is_in_the_message_line(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    """The reasons of the endpoints that did not decide the message are logged with their decisions too."""
    caplog.set_level(logging.INFO, logger="milterbridge.dispatch")
    engine.fake.set_default(FakeResponse.decision("reject", reason="spam score 9"), path="/scanner")
    engine.fake.set_default(FakeResponse.decision("continue", reason="no links"), path="/links")
    engine.fake.set_default(FakeResponse.decision("continue"), path="/quiet")
    await engine.start(engine.endpoint("scanner"), engine.endpoint("links"), engine.endpoint("quiet"))
    result = await engine.send()
    assert result.eom is not None
    assert isinstance(result.eom.reply, Reject)
    (line,) = _message_lines(caplog)
    assert line["reason"] == "scanner: spam score 9"  # the winner, as before
    reasons = {call["endpoint"]: call.get("reason") for call in line["endpoints"]}
    assert reasons == {"scanner": "spam score 9", "links": "no links", "quiet": None}
    assert all("error" not in call for call in line["endpoints"])


@pytest.mark.asyncio
async def test_error_answer_body_is_in_the_message_line(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    """A 401 with a JSON error is logged with the start of its body, not only its status."""
    caplog.set_level(logging.INFO, logger="milterbridge.dispatch")
    engine.fake.set_default(FakeResponse.status_code(401, b'{"error": "bad signature"}'), path="/policy")
    await engine.start(engine.endpoint("policy", retry=False))
    result = await engine.send()
    assert result.eom is not None
    assert isinstance(result.eom.reply, TempFail)
    (line,) = _message_lines(caplog)
    (call,) = line["endpoints"]
    assert call["error"].endswith('answered 401: {"error": "bad signature"}')


@pytest.mark.asyncio
async def test_concurrency_cap_under_load(engine: Engine) -> None:
    """Eight messages at once through an endpoint capped at two: at most two calls in flight, all answered."""
    in_flight = 0
    most = 0

    async def slow(request: object) -> FakeResponse:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.05)
        finally:
            in_flight -= 1
        return FakeResponse.decision("continue")

    engine.fake.set_default(slow, path="/policy")
    await engine.start(engine.endpoint("policy", max_concurrency=2, timeouts=((Event.EOM, 5.0),)))
    results = await asyncio.gather(*(engine.send() for _ in range(8)))
    assert all(r.eom is not None and isinstance(r.eom.reply, Continue) for r in results)
    assert most == 2
    assert len(engine.requests("policy", "eom")) == 8
    count = engine.metrics.registry.get_sample_value(
        "milterbridge_webhook_queue_wait_seconds_count", {"endpoint": "policy"}
    )
    assert count == 8
