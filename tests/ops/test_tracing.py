"""Tracing with OpenTelemetry (milterbridge.tracing): a bridge run with the SDK's in-memory exporter.

Each test runs a real bridge (``tests.harness``) against real aiohttp endpoints on loopback
(``FakeWebhooks``, which records the ``traceparent`` each call carried) and reads the spans
the bridge finished from ``InMemorySpanExporter``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from milterbridge import sdk
from milterbridge.client import Envelope, MilterClientError
from milterbridge.config import Config, ServerSettings
from milterbridge.milter.constants import Event
from milterbridge.milter.messages import Continue
from milterbridge.policy.model import Mode, OnError
from milterbridge.tracing import Tracing, check_environment
from tests import contract
from tests.fakes.webhooks import FakeResponse, FakeWebhooks
from tests.harness import LOOPBACK, BridgeHarness

from .conftest import SOURCE_ROOT, free_port, send_message, write_config

MESSAGE = b"Subject: traced\r\n\r\nHello.\r\n"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.clear()


def tracing(exporter: InMemorySpanExporter) -> Tracing:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider)


def traceparent_of(span: ReadableSpan) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


@pytest.mark.asyncio
async def test_one_trace_per_message_with_a_span_per_call(webhooks: FakeWebhooks, spans: InMemorySpanExporter):
    """MAIL to end: a SERVER span; each call a CLIENT span in it, whose context the endpoint received."""
    webhooks.set_default(FakeResponse.decision("continue"))
    webhooks.set_default(FakeResponse.decision("reject", reason="no thanks"), event="eom")
    endpoint = webhooks.endpoint("policy", events=frozenset({Event.CONNECT, Event.RCPT, Event.EOM}))
    config = Config(server=ServerSettings(listen=LOOPBACK), endpoints=(endpoint,))
    async with BridgeHarness(config, tracer=tracing(spans)) as bridge:
        client = await bridge.client()
        await client.open_session(Envelope())
        await client.send_transaction(Envelope(), MESSAGE)
        await client.send_transaction(Envelope(), MESSAGE)
    finished = spans.get_finished_spans()
    messages = by_name(finished, "milter message")
    assert len(messages) == 2
    assert len({m.context.trace_id for m in messages}) == 2  # a trace each
    for message in messages:
        assert message.kind is SpanKind.SERVER
        assert message.attributes["milterbridge.outcome"] == "rejected"
        assert message.attributes["milterbridge.reason"].startswith("policy")
        calls = [s for s in finished if s.parent is not None and s.parent.span_id == message.context.span_id]
        assert sorted(c.attributes["milterbridge.event"] for c in calls) == ["eom", "rcpt"]
        for call in calls:
            assert call.name == "POST"
            assert call.kind is SpanKind.CLIENT
            assert call.context.trace_id == message.context.trace_id
            assert call.attributes["http.request.method"] == "POST"
            assert call.attributes["url.full"] == webhooks.url("/hook")
            assert call.attributes["server.address"] == "127.0.0.1"
            assert call.attributes["server.port"] == webhooks.port
            assert call.attributes["http.response.status_code"] == 200
            assert call.attributes["milterbridge.endpoint"] == "policy"
            assert call.attributes["milterbridge.outcome"] == "ok"
            assert "http.request.resend_count" not in call.attributes
            assert call.status.status_code is StatusCode.UNSET
        eom = next(c for c in calls if c.attributes["milterbridge.event"] == "eom")
        assert eom.attributes["milterbridge.decision"] == "reject"

    # The connect call comes before any message: a trace of its own.
    (connect,) = [s for s in finished if s.name == "POST" and s.attributes["milterbridge.event"] == "connect"]
    assert connect.parent is None
    # Every request carried its own span's context, in the W3C format the contract gives.
    sent = sorted(r.headers["traceparent"] for r in webhooks.requests)
    assert sent == sorted(traceparent_of(s) for s in finished if s.name == "POST")
    pattern = contract.SPEC["components"]["parameters"]["Traceparent"]["schema"]["pattern"]
    assert all(re.fullmatch(pattern, header) for header in sent)


@pytest.mark.asyncio
async def test_a_retry_and_a_failure_are_on_the_span(webhooks: FakeWebhooks, spans: InMemorySpanExporter):
    """A retried call says so (resend count); a failed one has an error status and error.type."""
    webhooks.enqueue(FakeResponse.status_code(503), FakeResponse.decision("continue"), event="rcpt")
    webhooks.set_default(FakeResponse.status_code(500), event="eom")
    endpoint = webhooks.endpoint("policy", events=frozenset({Event.RCPT, Event.EOM}), on_error=OnError.CONTINUE)
    config = Config(server=ServerSettings(listen=LOOPBACK), endpoints=(endpoint,))
    async with BridgeHarness(config, tracer=tracing(spans)) as bridge:
        client = await bridge.client()
        await client.send_message(Envelope(), MESSAGE)
    calls = {s.attributes["milterbridge.event"]: s for s in by_name(spans.get_finished_spans(), "POST")}
    rcpt, eom = calls["rcpt"], calls["eom"]
    assert rcpt.attributes["http.request.resend_count"] == 1
    assert rcpt.attributes["http.response.status_code"] == 200
    assert rcpt.status.status_code is StatusCode.UNSET
    assert eom.status.status_code is StatusCode.ERROR
    assert eom.attributes["error.type"] == "500"
    assert eom.attributes["milterbridge.outcome"] == "status_error"
    assert eom.attributes["milterbridge.decision"] == "failure"
    # The two requests of the retried call carried the same context.
    retried = [r.headers["traceparent"] for r in webhooks.requests_for(event="rcpt")]
    assert retried == [traceparent_of(rcpt)] * 2
    (message,) = by_name(spans.get_finished_spans(), "milter message")
    assert message.attributes["milterbridge.outcome"] == "accepted"


@pytest.mark.asyncio
async def test_without_a_tracer_no_header_is_sent(webhooks: FakeWebhooks):
    """Tracing off (the default): the requests carry no trace context."""
    webhooks.set_default(FakeResponse.decision("continue"))
    config = Config(server=ServerSettings(listen=LOOPBACK), endpoints=(webhooks.endpoint("policy"),))
    async with BridgeHarness(config) as bridge:
        client = await bridge.client()
        await client.send_message(Envelope(), MESSAGE)
    assert webhooks.requests
    assert not [r for r in webhooks.requests if "traceparent" in r.headers]


@pytest.mark.asyncio
async def test_abort_and_observe_calls_are_in_the_messages_trace(webhooks: FakeWebhooks, spans: InMemorySpanExporter):
    """The abort notification and an observe call (both in the background) are children of the message's span."""
    webhooks.set_default(FakeResponse.decision("continue"))
    policy = webhooks.endpoint("policy", events=frozenset({Event.RCPT}))
    watch = webhooks.endpoint("watch", path="/watch", events=frozenset({Event.MAIL, Event.ABORT}), mode=Mode.OBSERVE)
    config = Config(server=ServerSettings(listen=LOOPBACK), endpoints=(policy, watch))
    async with BridgeHarness(config, tracer=tracing(spans)) as bridge:
        client = await bridge.client()
        await client.open_session(Envelope())
        await client.mail_from(b"<a@example.org>")
        await client.rcpt_to(b"<b@example.net>")
        await client.abort()
        await webhooks.wait_for(1, path="/watch", event="abort")
        await bridge.settle()
    finished = spans.get_finished_spans()
    (message,) = by_name(finished, "milter message")
    assert message.attributes["milterbridge.outcome"] == "aborted"
    calls = {s.attributes["milterbridge.event"]: s for s in by_name(finished, "POST")}
    assert set(calls) == {"mail", "rcpt", "abort"}
    for call in calls.values():
        assert call.parent is not None
        assert call.parent.span_id == message.context.span_id


@pytest.mark.asyncio
async def test_a_cancelled_call_ends_its_span(webhooks: FakeWebhooks, spans: InMemorySpanExporter):
    """The MTA leaving during a slow call cancels it: the span ends, as an error of type cancelled."""
    webhooks.set_default(FakeResponse.never_answer())
    config = Config(server=ServerSettings(listen=LOOPBACK), endpoints=(webhooks.endpoint("policy", timeout=5.0),))
    async with BridgeHarness(config, tracer=tracing(spans)) as bridge:
        client = await bridge.client()
        await client.open_session(Envelope())
        sending = asyncio.create_task(client.send_transaction(Envelope(), MESSAGE))
        await webhooks.wait_for(1, event="eom")
        await client.aclose()
        with contextlib.suppress(MilterClientError):
            await sending
        await bridge.settle()
    (call,) = [s for s in by_name(spans.get_finished_spans(), "POST") if s.attributes["milterbridge.event"] == "eom"]
    assert call.status.status_code is StatusCode.ERROR
    assert call.attributes["error.type"] == "cancelled"
    (message,) = by_name(spans.get_finished_spans(), "milter message")
    assert message.attributes["milterbridge.outcome"] == "aborted"


class HangingExporter(SpanExporter):
    """An exporter whose collector never answers: shutting it down takes far too long."""

    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        time.sleep(5)


def test_shutdown_does_not_wait_for_a_hanging_collector(caplog):
    """Shutdown returns after its timeout and says the rest was dropped (systemd's stop timeout counts on it)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(HangingExporter()))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="milterbridge.tracing"):
        Tracing(provider).shutdown(timeout=0.2)
    assert time.monotonic() - started < 2
    assert "not exported within 0.2 s" in caplog.text


@pytest.mark.parametrize(
    ("environ", "error"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin'"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "http/protobuf only"),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, "http/protobuf only"),
    ],
)
def test_environment_the_bridge_cannot_use_is_refused(environ, error):
    with pytest.raises(ValueError, match=error.replace("(", r"\(")):
        check_environment(environ)


@pytest.mark.parametrize("exporter", ["otlp", "console", "none", ""])
def test_environment_it_can_use(exporter):
    assert check_environment({"OTEL_TRACES_EXPORTER": exporter}) == (exporter or "otlp")


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on loopback: ``POST /v1/traces`` with protobuf, the spans kept."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.arrived = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self.runner = web.AppRunner(app, access_log=None)

    async def start(self) -> str:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def _traces(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append((service, span))
        self.arrived.set()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    def named(self, name: str) -> list[Any]:
        return [span for _, span in self.spans if span.name == name]


def attributes(span: Any) -> dict[str, Any]:
    """An OTLP span's attributes as plain values."""
    values: dict[str, Any] = {}
    for attribute in span.attributes:
        value = attribute.value
        values[attribute.key] = getattr(value, value.WhichOneof("value"))
    return values


@pytest.mark.asyncio
async def test_spans_reach_an_otlp_receiver_and_the_filter_joins_the_trace(tmp_path, bridges):
    """A real ``serve`` with tracing on exports by OTLP/HTTP; an SDK filter's spans join each message's trace."""
    receiver = OtlpReceiver()
    exporter = InMemorySpanExporter()
    filter_provider = TracerProvider()
    filter_provider.add_span_processor(SimpleSpanProcessor(exporter))
    filter_tracer = filter_provider.get_tracer("the filter")

    def check(request: sdk.Request) -> sdk.Decision:
        with filter_tracer.start_as_current_span("look up the sender"):
            return sdk.continue_()

    filter_runner = web.AppRunner(sdk.make_app(check, secrets=None, tracer_provider=filter_provider), access_log=None)
    await filter_runner.setup()
    try:
        site = web.TCPSite(filter_runner, "127.0.0.1", 0)
        await site.start()
        filter_url = f"http://127.0.0.1:{filter_runner.addresses[0][1]}/"
        endpoint = {"name": "policy", "url": filter_url, "events": ["rcpt", "eom"], "timeout": 3}
        path = write_config(tmp_path, listen=[f"inet:127.0.0.1:{free_port()}"], endpoints=[endpoint])
        env = {
            "MILTERBRIDGE_TRACING__ENABLED": "true",
            "OTEL_EXPORTER_OTLP_ENDPOINT": await receiver.start(),
            "OTEL_SERVICE_NAME": "bridge-under-test",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        bridge = await bridges.start(path, env=env)
        for n in range(2):
            result = await send_message(bridge.milter, queue_id=f"T{n}")
            assert isinstance(result.final, Continue)
        bridge.send_signal(signal.SIGTERM)
        assert await bridge.wait_exit() == 0  # shutdown exports what is left
    finally:
        await filter_runner.cleanup()
        await receiver.runner.cleanup()

    assert {service for service, _ in receiver.spans} == {"bridge-under-test"}
    messages = receiver.named("milter message")
    assert len(messages) == 2
    assert sorted(attributes(m)["milterbridge.queue_id"] for m in messages) == ["T0", "T1"]
    calls = receiver.named("POST")
    assert len(calls) == 4
    filter_spans = {s.parent.span_id: s for s in exporter.get_finished_spans() if s.name.startswith("milterbridge ")}
    own = [s for s in exporter.get_finished_spans() if s.name == "look up the sender"]
    assert len(own) == 4
    for message in messages:
        mine = [c for c in calls if c.parent_span_id == message.span_id]
        assert sorted(attributes(c)["milterbridge.event"] for c in mine) == ["eom", "rcpt"]
        for call in mine:
            assert call.trace_id == message.trace_id
            assert attributes(call)["http.response.status_code"] == 200
            # The filter's request span is the child of the bridge's call span, in the same trace.
            served = filter_spans[int.from_bytes(call.span_id, "big")]
            assert served.context.trace_id == int.from_bytes(message.trace_id, "big")
            assert served.name == f"milterbridge {attributes(call)['milterbridge.event']}"
            (child,) = [s for s in own if s.parent is not None and s.parent.span_id == served.context.span_id]
            assert child.context.trace_id == served.context.trace_id


@pytest.mark.asyncio
async def test_tracing_on_without_the_extra_stops_the_start(tmp_path, bridges):
    """With OpenTelemetry not importable, tracing.enabled stops the start and says what to install."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "opentelemetry").mkdir()
    (blocker / "opentelemetry" / "__init__.py").write_text("raise ImportError('not installed here')\n")
    path = write_config(tmp_path, listen=[f"inet:127.0.0.1:{free_port()}"], server={"allow_no_endpoints": True})
    env = {"MILTERBRIDGE_TRACING__ENABLED": "true", "PYTHONPATH": f"{blocker}{os.pathsep}{SOURCE_ROOT}"}
    bridge = await bridges.start(path, env=env, wait_ready=False)
    assert await bridge.wait_exit() == 1
    assert "tracing.enabled is true, but OpenTelemetry cannot be imported" in bridge.stderr()
    assert "pip install 'milterbridge[otel]'" in bridge.stderr()
