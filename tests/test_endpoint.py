"""The endpoint call step and build_endpoints, against real aiohttp servers (tests/fakes/webhooks.py).

The breaker's own rules are in tests/webhook/test_breaker.py; here it is driven through
``call_endpoint`` with an injected clock, as the dispatcher drives it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from milterbridge.body import SpoolError
from milterbridge.config import EndpointSettings, TlsSettings
from milterbridge.endpoint import CallResult, Endpoint, build_endpoints, call_endpoint
from milterbridge.milter.constants import ALL_ACTIONS, Action, Event
from milterbridge.policy.model import ActionName, Decision, EndpointPolicy, Failure, Mode, ModOp, OnError
from milterbridge.webhook import WebhookClient, prepare_endpoint
from tests.fakes.webhooks import FakeResponse, FakeWebhooks

BODY = orjson.dumps({"event": "eom", "id": "evt_1", "data": {}})
#: Requests the fake answers with 500 (see ``counted_as``).
PROBE_BODY = orjson.dumps({"event": "probe"})


class FakeClock:
    """A settable monotonic clock for the breakers."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class RecordingCalls:
    """A CallObserver that keeps what it is told."""

    webhooks: list[tuple[str, str, str, float | None]] = field(default_factory=list)
    decisions: list[tuple[str, str, str, str]] = field(default_factory=list)
    waits: list[tuple[str, float]] = field(default_factory=list)

    def webhook(self, endpoint: str, event: str, outcome: str, seconds: float | None) -> None:
        self.webhooks.append((endpoint, event, outcome, seconds))

    def decision(self, endpoint: str, event: str, action: str, mode: str) -> None:
        self.decisions.append((endpoint, event, action, mode))

    def queue_wait(self, endpoint: str, seconds: float) -> None:
        self.waits.append((endpoint, seconds))

    @property
    def labels(self) -> list[str]:
        return [outcome for _, _, outcome, _ in self.webhooks]


class ExplodingBody:
    """A streamed body whose chunks() hits a bug of the bridge."""

    def __len__(self) -> int:
        return 10

    def chunks(self) -> Iterator[bytes]:
        raise RuntimeError("bug in the body source")


class UnreadableBody:
    """A spooled body whose file read fails after the first piece."""

    def __len__(self) -> int:
        return 200_000

    def chunks(self) -> Iterator[bytes]:
        yield b"x" * 100_000
        raise OSError(5, "Input/output error")


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeWebhooks]:
    async with FakeWebhooks() as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def calls() -> RecordingCalls:
    return RecordingCalls()


@pytest_asyncio.fixture
async def client() -> AsyncIterator[WebhookClient]:
    async with WebhookClient() as webhook_client:
        yield webhook_client


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _one(settings: EndpointSettings, clock: FakeClock) -> Endpoint:
    (endpoint,) = build_endpoints([settings], clock=clock)
    return endpoint


def _states(endpoints: tuple[Endpoint, ...]) -> dict[str, str]:
    return {ep.name: str(ep.breaker.state) for ep in endpoints}


async def _call(
    client: WebhookClient,
    endpoint: Endpoint,
    calls: RecordingCalls,
    body: Any = BODY,
    *,
    event: Event = Event.EOM,
    allowed_actions: Action = ALL_ACTIONS,
) -> CallResult:
    return await call_endpoint(
        client, endpoint, "evt_1", body, event=event, allowed_actions=allowed_actions, observer=calls
    )


def _reason(result: CallResult) -> str:
    assert isinstance(result.outcome, Failure), result.outcome
    return result.outcome.reason


async def counted_as(client: WebhookClient, endpoint: Endpoint, fake: FakeWebhooks) -> str:
    """How the breaker counted the one call made so far: ``failure``, ``success`` or ``neither``.

    The endpoint's breaker must be fresh with ``breaker_min_calls=2`` and
    ``breaker_failure_rate=1.0``. Failed probes through the same breaker tell the three apart:
    after a failure one failed probe opens it; after nothing two do; after a success two
    failures of three calls stay under the rate.
    """
    fake.set_default(FakeResponse.status_code(500), event="probe")
    settings = replace(endpoint.settings, timeout=5.0, retry=False)
    timeouts = dict.fromkeys(Event, 5.0)
    probe = replace(endpoint, settings=settings, http=prepare_endpoint(settings), timeouts=timeouts)
    ignored = RecordingCalls()
    await _call(client, probe, ignored, PROBE_BODY)
    if endpoint.breaker.state == "open":
        return "failure"
    await _call(client, probe, ignored, PROBE_BODY)
    assert ignored.labels == ["status_error", "status_error"]
    return "neither" if endpoint.breaker.state == "open" else "success"


def _counting(fake: FakeWebhooks, name: str = "policy", **overrides: Any) -> EndpointSettings:
    """Settings whose breaker ``counted_as`` can read."""
    return fake.endpoint(name, breaker_min_calls=2, breaker_failure_rate=1.0, retry=False, **overrides)


# -- outcomes and metrics --------------------------------------------------------------------


@pytest.mark.parametrize("mode", [Mode.ENFORCE, Mode.OBSERVE])
@pytest.mark.asyncio
async def test_decision(
    fake: FakeWebhooks, client: WebhookClient, clock: FakeClock, calls: RecordingCalls, mode: Mode
) -> None:
    """A valid answer is a Decision, counted as ok and as a decision in the endpoint's mode."""
    fake.set_default(FakeResponse.decision("reject", reason="spam"))
    endpoint = _one(fake.endpoint("policy", mode=mode), clock)
    result = await _call(client, endpoint, calls)
    assert result.outcome == Decision(action=ActionName.REJECT, reason="spam")
    assert result.action == "reject"
    assert 0 < result.elapsed < 5
    assert calls.webhooks == [("policy", "eom", "ok", result.elapsed)]
    assert calls.decisions == [("policy", "eom", "reject", mode.value)]
    assert fake.requests[0].headers["webhook-id"] == "evt_1"
    assert fake.requests[0].body == BODY


@pytest.mark.parametrize(
    ("answer", "label", "reason"),
    [
        pytest.param(FakeResponse.raw(b"{not json"), "invalid_body", "invalid response body: not JSON", id="syntax"),
        pytest.param(FakeResponse.raw(b"\xff\xfe{}"), "invalid_body", "invalid response body: not JSON", id="not-utf8"),
        pytest.param(
            FakeResponse.raw(b"[" * 2000 + b"]" * 2000),
            "invalid_body",
            "invalid response body: not JSON",
            id="too-deep",
        ),
        pytest.param(
            FakeResponse.raw(b'{"action": "continue"} trailing'),
            "invalid_body",
            "invalid response body: not JSON",
            id="trailing",
        ),
        pytest.param(
            FakeResponse.decision("explode"),
            "invalid_decision",
            "invalid decision: action: unknown action 'explode'",
            id="unknown-action",
        ),
        pytest.param(
            FakeResponse.status_code(500),
            "status_error",
            "webhook 'policy' (http://127.0.0.1:PORT/hook): answered 500",
            id="status",
        ),
        pytest.param(
            FakeResponse.huge(20_000),
            "too_large",
            "webhook 'policy' (http://127.0.0.1:PORT/hook): response body larger than 10000 bytes",
            id="too-large",
        ),
    ],
)
@pytest.mark.asyncio
async def test_failures(
    fake: FakeWebhooks,
    client: WebhookClient,
    clock: FakeClock,
    calls: RecordingCalls,
    answer: FakeResponse,
    label: str,
    reason: str,
) -> None:
    """A failed call is a Failure with the metric label and reason of its kind; no decision is counted."""
    fake.set_default(answer)
    endpoint = _one(fake.endpoint("policy", retry=False, max_response_bytes=10_000), clock)
    result = await _call(client, endpoint, calls)
    assert _reason(result).startswith(reason.replace("PORT", str(fake.port)))
    assert "trailing" not in _reason(result)  # the body is never echoed
    assert calls.webhooks == [("policy", "eom", label, result.elapsed)]
    assert calls.decisions == []
    assert result.action == "failure"


@pytest.mark.parametrize(
    ("decision", "settings", "allowed_actions", "why"),
    [
        pytest.param(
            {"action": "quarantine", "reason": "x"},
            {},
            ALL_ACTIONS & ~Action.QUARANTINE,
            "quarantine was not granted by the MTA",
            id="action-not-negotiated",
        ),
        pytest.param(
            {"action": "continue", "modifications": [{"op": "add_header", "name": "X-A", "value": "b"}]},
            {"allowed_ops": frozenset({ModOp.DELETE_HEADER})},
            ALL_ACTIONS,
            "add_header is not in this endpoint's allowed_ops",
            id="op-not-allowed",
        ),
        pytest.param(
            {"action": "continue", "modifications": [{"op": "add_header", "name": "X-A", "value": "b"}] * 2},
            {"max_modifications": 1},
            ALL_ACTIONS,
            "at most 1",
            id="too-many-modifications",
        ),
    ],
)
@pytest.mark.asyncio
async def test_answer_checked_against_negotiation_and_settings(
    fake: FakeWebhooks,
    client: WebhookClient,
    clock: FakeClock,
    calls: RecordingCalls,
    decision: dict[str, Any],
    settings: dict[str, Any],
    allowed_actions: Action,
    why: str,
) -> None:
    """allowed_actions, allowed_ops and max_modifications reach the decision parser."""
    fake.set_default(FakeResponse.json(decision))
    endpoint = _one(fake.endpoint("policy", **settings), clock)
    result = await _call(client, endpoint, calls, allowed_actions=allowed_actions)
    assert _reason(result).startswith("invalid decision: ")
    assert why in _reason(result)
    assert calls.labels == ["invalid_decision"]


@pytest.mark.asyncio
async def test_notification_answer_is_not_parsed(
    fake: FakeWebhooks, client: WebhookClient, clock: FakeClock, calls: RecordingCalls
) -> None:
    """At abort and close any valid JSON answer is a plain continue."""
    fake.set_default(FakeResponse.decision("reject"))
    endpoint = _one(fake.endpoint("policy"), clock)
    result = await _call(client, endpoint, calls, event=Event.CLOSE)
    assert isinstance(result.outcome, Decision)
    assert result.outcome.action is ActionName.CONTINUE
    assert calls.decisions == [("policy", "close", "continue", "enforce")]


# -- what the breaker counts (docs/reliability.md §9) ----------------------------------------


@pytest.mark.parametrize(
    ("answer", "counted"),
    [
        pytest.param(FakeResponse.decision("reject"), "success", id="decision"),
        pytest.param(FakeResponse.raw(b"not json"), "success", id="invalid-body"),
        pytest.param(FakeResponse.decision("explode"), "success", id="invalid-decision"),
        pytest.param(FakeResponse.status_code(500), "failure", id="status"),
        pytest.param(FakeResponse.redirect("http://127.0.0.1:1/"), "failure", id="redirect"),
        pytest.param(FakeResponse.never_answer(), "failure", id="timeout"),
        pytest.param(FakeResponse.huge(4096), "neither", id="too-large"),
    ],
)
@pytest.mark.asyncio
async def test_breaker_counts_each_result_once(
    fake: FakeWebhooks,
    client: WebhookClient,
    clock: FakeClock,
    calls: RecordingCalls,
    answer: FakeResponse,
    counted: str,
) -> None:
    """Each kind of result is one failure, one success or nothing, as reliability.md §9's table says."""
    fake.set_default(answer, event="eom")
    endpoint = _one(_counting(fake, timeout=0.2, max_response_bytes=1000), clock)
    await _call(client, endpoint, calls)
    assert await counted_as(client, endpoint, fake) == counted


@pytest.mark.asyncio
async def test_no_time_left_is_not_counted(
    fake: FakeWebhooks, client: WebhookClient, clock: FakeClock, calls: RecordingCalls
) -> None:
    """A call without budget fails as a timeout, sends nothing and leaves the breaker alone."""
    endpoint = _one(_counting(fake, timeout=0.0), clock)
    result = await _call(client, endpoint, calls)
    assert "no time left for the call" in _reason(result)
    assert calls.labels == ["timeout"]
    assert fake.requests == []
    assert await counted_as(client, endpoint, fake) == "neither"


@pytest.mark.asyncio
async def test_unexpected_exception_propagates_uncounted(
    fake: FakeWebhooks, client: WebhookClient, clock: FakeClock, calls: RecordingCalls
) -> None:
    """A bug inside the step propagates, is no metric outcome at all, and is not charged to the breaker."""
    endpoint = _one(_counting(fake), clock)
    with pytest.raises(RuntimeError, match="bug in the body source"):
        await _call(client, endpoint, calls, ExplodingBody())
    assert calls.webhooks == []
    assert calls.decisions == []
    assert await counted_as(client, endpoint, fake) == "neither"


@pytest.mark.asyncio
async def test_unreadable_body_propagates_uncounted(
    fake: FakeWebhooks, client: WebhookClient, clock: FakeClock, calls: RecordingCalls
) -> None:
    """A spooled body the bridge cannot read raises SpoolError (the bridge's fault), uncounted."""
    endpoint = _one(_counting(fake), clock)
    with pytest.raises(SpoolError, match="cannot read the message body"):
        await _call(client, endpoint, calls, UnreadableBody())
    assert calls.webhooks == []
    assert await counted_as(client, endpoint, fake) == "neither"


@pytest.mark.asyncio
async def test_cancelled_call_is_not_counted(
    fake: FakeWebhooks, client: WebhookClient, clock: FakeClock, calls: RecordingCalls
) -> None:
    """Cancelling a call (the MTA left) propagates and counts neither way."""
    fake.set_default(FakeResponse.never_answer(), event="eom")
    endpoint = _one(_counting(fake), clock)
    task = asyncio.create_task(_call(client, endpoint, calls))
    await fake.wait_for(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls.webhooks == []
    assert await counted_as(client, endpoint, fake) == "neither"


@pytest.mark.asyncio
async def test_a_trial_that_hits_a_bug_frees_its_slot(
    fake: FakeWebhooks, client: WebhookClient, clock: FakeClock, calls: RecordingCalls
) -> None:
    """A half-open trial that fails inside the bridge gives its slot back: the next call is the trial."""
    fake.set_default(FakeResponse.status_code(500))
    endpoint = _one(fake.endpoint("flaky", breaker_min_calls=1, retry=False), clock)
    await _call(client, endpoint, calls)
    clock.now += 1.0
    assert endpoint.breaker.state == "half_open"
    with pytest.raises(RuntimeError):
        await _call(client, endpoint, calls, ExplodingBody())
    fake.set_default(FakeResponse.decision())
    result = await _call(client, endpoint, calls)
    assert isinstance(result.outcome, Decision)
    assert endpoint.breaker.state == "closed"


@pytest.mark.asyncio
async def test_breaker_opens_and_half_opens(
    fake: FakeWebhooks, client: WebhookClient, clock: FakeClock, calls: RecordingCalls
) -> None:
    """Failures over the rate open the breaker (no request sent); after the probe delay a trial closes it."""
    endpoint = _one(fake.endpoint("flaky", breaker_min_calls=2, breaker_probe=10.0, retry=False), clock)
    fake.set_default(FakeResponse.status_code(500))
    for _ in range(2):
        await _call(client, endpoint, calls)
    assert endpoint.breaker.state == "open"
    result = await _call(client, endpoint, calls)
    assert result.outcome == Failure(reason="breaker_open")
    assert calls.labels == ["status_error", "status_error", "breaker_open"]
    assert calls.decisions == []
    assert len(fake.requests) == 2

    clock.now += 10.0
    assert endpoint.breaker.state == "half_open"
    fake.set_default(FakeResponse.decision())
    result = await _call(client, endpoint, calls)
    assert isinstance(result.outcome, Decision)
    assert endpoint.breaker.state == "closed"
    assert len(fake.requests) == 3


@pytest.mark.asyncio
async def test_breaker_failed_trial_doubles_the_wait(
    fake: FakeWebhooks, client: WebhookClient, clock: FakeClock, calls: RecordingCalls
) -> None:
    """A failed trial opens the breaker again, for twice the previous wait."""
    endpoint = _one(fake.endpoint("flaky", breaker_min_calls=1, breaker_probe=5.0, retry=False), clock)
    fake.set_default(FakeResponse.status_code(500))
    await _call(client, endpoint, calls)
    clock.now += 5.0
    await _call(client, endpoint, calls)
    assert endpoint.breaker.state == "open"
    clock.now += 9.5
    await _call(client, endpoint, calls)
    clock.now += 0.5
    await _call(client, endpoint, calls)
    assert calls.labels == ["status_error", "status_error", "breaker_open", "status_error"]
    assert len(fake.requests) == 3


@pytest.mark.asyncio
async def test_answers_about_one_message_do_not_count(
    fake: FakeWebhooks, client: WebhookClient, clock: FakeClock, calls: RecordingCalls
) -> None:
    """Oversized responses and answers that are not decisions leave the breaker closed."""
    settings = fake.endpoint("garbage", breaker_min_calls=2, breaker_failure_rate=0.5, max_response_bytes=100)
    endpoint = _one(settings, clock)
    fake.set_default(FakeResponse.huge(4096), event="eom")
    fake.set_default(FakeResponse.raw(b"not json"), event="rcpt")
    fake.set_default(FakeResponse.decision("explode"), event="helo")
    for _ in range(5):
        await _call(client, endpoint, calls)
        await _call(client, endpoint, calls, orjson.dumps({"event": "rcpt"}), event=Event.RCPT)
    await _call(client, endpoint, calls, orjson.dumps({"event": "helo"}), event=Event.HELO)
    assert calls.labels == ["too_large", "invalid_body"] * 5 + ["invalid_decision"]
    assert endpoint.breaker.state == "closed"
    fake.set_default(FakeResponse.status_code(500), event="eom")
    for _ in range(2):
        await _call(client, endpoint, calls)
    # 2 failures of 8 counted calls (the 6 invalid answers are successes): under 50%.
    assert calls.labels[-2:] == ["status_error", "status_error"]
    assert endpoint.breaker.state == "closed"


async def _serve_on(port: int) -> web.AppRunner:
    """The endpoint coming up late: a real aiohttp server on ``port`` that answers continue."""

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"action": "continue"})

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@pytest.mark.asyncio
async def test_endpoint_starting_late_is_probed_again_after_a_second(
    client: WebhookClient, clock: FakeClock, calls: RecordingCalls
) -> None:
    """With the defaults, 9 refused connections leave the breaker closed; once open, the probe 1 s later closes it."""
    port = _closed_port()
    endpoint = _one(EndpointSettings(name="late", url=f"http://127.0.0.1:{port}/hook"), clock)
    for _ in range(9):
        await _call(client, endpoint, calls)
    assert calls.labels == ["connection_error"] * 9
    assert endpoint.breaker.state == "closed"
    for _ in range(11):  # 20 calls, all failed: over 50% of at least 20
        await _call(client, endpoint, calls)
    assert endpoint.breaker.state == "open"

    runner = await _serve_on(port)
    try:
        clock.now += 0.5
        result = await _call(client, endpoint, calls)
        assert result.outcome == Failure(reason="breaker_open")
        clock.now += 0.5
        result = await _call(client, endpoint, calls)
        assert result.outcome == Decision(action=ActionName.CONTINUE)
        assert endpoint.breaker.state == "closed"
    finally:
        await runner.cleanup()


# -- build_endpoints -------------------------------------------------------------------------


def test_build_endpoints_in_config_order() -> None:
    """Each endpoint gets its policy view (index = config position) and its prepared request."""
    first = EndpointSettings(name="a", url="http://127.0.0.1:1/a", events=frozenset({Event.RCPT}))
    second = EndpointSettings(
        name="b", url="http://127.0.0.1:1/b", mode=Mode.OBSERVE, on_error=OnError.ACCEPT, include_body=True
    )
    endpoints = build_endpoints([first, second])
    assert [ep.name for ep in endpoints] == ["a", "b"]
    assert endpoints[0].policy == EndpointPolicy(name="a", index=0, events=frozenset({Event.RCPT}))
    assert endpoints[1].policy == EndpointPolicy(
        name="b", index=1, mode=Mode.OBSERVE, on_error=OnError.ACCEPT, include_body=True
    )
    assert [ep.http.settings for ep in endpoints] == [first, second]
    assert endpoints[0].breaker is not endpoints[1].breaker


def test_equal_tls_settings_share_a_context_within_one_build() -> None:
    """Endpoints with equal TLS settings share one context; the next build makes (reads) it again."""
    insecure = TlsSettings(verify=False)
    settings = [
        EndpointSettings(name="a", url="https://127.0.0.1:1/a", tls=insecure),
        EndpointSettings(name="b", url="https://127.0.0.1:1/b", tls=insecure),
        EndpointSettings(name="c", url="https://127.0.0.1:1/c"),
    ]
    first = build_endpoints(settings)
    contexts = [ep.http.origin.ssl for ep in first]
    assert contexts[0] is not None
    assert contexts[0] is contexts[1]
    assert contexts[2] is not contexts[0]
    again = build_endpoints(settings, first)
    assert again[0].http.origin.ssl is not contexts[0]


@pytest.mark.asyncio
async def test_build_endpoints_keeps_breaker_of_unchanged(
    fake: FakeWebhooks, client: WebhookClient, clock: FakeClock, calls: RecordingCalls
) -> None:
    """A reload keeps breaker state only for equal settings; any change resets it; dropped endpoints disappear."""
    fake.set_default(FakeResponse.status_code(500))
    fake.set_default(FakeResponse.decision(), path="/other")
    endpoints = build_endpoints(
        [fake.endpoint("a", breaker_min_calls=1, retry=False), fake.endpoint("b", path="/other")], clock=clock
    )
    for endpoint in endpoints:
        await _call(client, endpoint, calls)
    assert _states(endpoints) == {"a": "open", "b": "closed"}
    endpoints = build_endpoints([fake.endpoint("a", breaker_min_calls=1, retry=False)], endpoints, clock=clock)
    assert _states(endpoints) == {"a": "open"}
    changes: list[dict[str, Any]] = [
        {"timeout": 1.0},
        {"breaker_window": 5.0},
        {"path": "/moved"},
        {"headers": (("X-Fixed", "1"),)},
        {"secrets": ("whsec_" + "A" * 32,)},
    ]
    for change in changes:
        await _call(client, endpoints[0], calls)
        assert _states(endpoints) == {"a": "open"}, change
        endpoints = build_endpoints(
            [fake.endpoint("a", breaker_min_calls=1, retry=False, **change)], endpoints, clock=clock
        )
        assert _states(endpoints) == {"a": "closed"}, change


@pytest.mark.asyncio
async def test_sessions_from_before_a_reload_keep_their_endpoints(
    fake: FakeWebhooks, client: WebhookClient, clock: FakeClock, calls: RecordingCalls
) -> None:
    """Calls through an old snapshot's endpoint neither replace nor reset the new endpoint's breaker."""
    fake.set_default(FakeResponse.status_code(500), path="/new")
    fake.set_default(FakeResponse.no_content(), path="/old")
    (old,) = build_endpoints([fake.endpoint("policy", path="/old", breaker_min_calls=2, retry=False)], clock=clock)
    (new,) = build_endpoints(
        [fake.endpoint("policy", path="/new", breaker_min_calls=2, retry=False)], [old], clock=clock
    )
    for _ in range(2):
        await _call(client, old, calls)
        await _call(client, new, calls)
    assert new.breaker.state == "open"
    assert old.breaker.state == "closed"
    result = await _call(client, old, calls)  # the old session still works
    assert isinstance(result.outcome, Decision)
    assert fake.events(path="/old") == ["eom"] * 3


def test_failed_build_changes_nothing(tmp_path: Path, clock: FakeClock) -> None:
    """A reload naming an unreadable CA file raises; the running endpoints and their breakers stay."""
    settings = EndpointSettings(name="a", url="http://127.0.0.1:1/hook")
    running = build_endpoints([settings], clock=clock)
    broken = EndpointSettings(name="b", url="https://127.0.0.1:1/", tls=TlsSettings(ca_file=str(tmp_path / "x.pem")))
    with pytest.raises(OSError):
        build_endpoints([settings, broken], running, clock=clock)
    assert _states(running) == {"a": "closed"}
    assert build_endpoints([settings], running, clock=clock)[0].breaker is running[0].breaker


# -- hook endpoints (MTA Hooks, Stalwart) ------------------------------------------------------


def _hook(http: Any, translate: Any = lambda answer: answer, headers: bytes = b"X-Hook: 1\r\n", **kw: Any) -> Any:
    from milterbridge.hooks import HookCall

    return HookCall(http, headers, translate, **kw)


@pytest.mark.asyncio
async def test_a_hook_call_without_registration_sends_nothing_and_asks_no_breaker(
    fake: FakeWebhooks, client: WebhookClient, clock: FakeClock, calls: RecordingCalls
) -> None:
    endpoint = _one(_counting(fake), clock)
    hook = _hook(None, unavailable="not registered with the scanner")
    result = await call_endpoint(
        client, endpoint, "evt_1", b"", event=Event.EOM, allowed_actions=ALL_ACTIONS, observer=calls, hook=hook
    )
    assert _reason(result) == "not registered with the scanner"
    assert result.label == "not_registered"
    assert result.attempts == 0
    assert fake.requests == []
    assert calls.labels == ["not_registered"]
    assert await counted_as(client, endpoint, fake) == "neither"


@pytest.mark.asyncio
async def test_a_hook_call_goes_where_it_says_and_its_answer_is_translated(
    fake: FakeWebhooks, client: WebhookClient, clock: FakeClock, calls: RecordingCalls
) -> None:
    fake.set_default(FakeResponse.json({"verdict": "bad"}), path="/hook-endpoint")
    endpoint = _one(fake.endpoint("policy", retry=False), clock)

    def translate(answer: object) -> object:
        assert answer == {"verdict": "bad"}
        return {"action": "reject", "reason": "translated"}

    hook = _hook(fake.prepared("policy", path="/hook-endpoint"), translate)
    result = await call_endpoint(
        client, endpoint, "evt_1", BODY, event=Event.EOM, allowed_actions=ALL_ACTIONS, observer=calls, hook=hook
    )
    assert isinstance(result.outcome, Decision)
    assert result.outcome.action is ActionName.REJECT
    [request] = fake.requests
    assert request.path == "/hook-endpoint"
    assert request.headers["X-Hook"] == "1"


@pytest.mark.asyncio
async def test_an_answer_that_cannot_be_translated_is_an_invalid_decision(
    fake: FakeWebhooks, client: WebhookClient, clock: FakeClock, calls: RecordingCalls
) -> None:
    from milterbridge.mtahooks import HookAnswerError

    fake.set_default(FakeResponse.json({"set": [{"path": "/client/ip", "value": "x"}]}))
    endpoint = _one(_counting(fake), clock)

    def translate(answer: object) -> object:
        raise HookAnswerError("/client/ip: set is not supported there")

    hook = _hook(endpoint.http, translate)
    result = await call_endpoint(
        client, endpoint, "evt_1", BODY, event=Event.EOM, allowed_actions=ALL_ACTIONS, observer=calls, hook=hook
    )
    assert _reason(result) == "invalid decision: /client/ip: set is not supported there"
    assert calls.labels == ["invalid_decision"]
    assert await counted_as(client, endpoint, fake) == "success"
