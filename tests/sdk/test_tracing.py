"""The SDK continues the bridge's trace: each request in a SERVER span under its ``traceparent``.

Spans go to the OpenTelemetry SDK's in-memory exporter through a provider given to the Filter.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from milterbridge import sdk
from tests import contract

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7
HEADERS = {"traceparent": f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"}
#: The contract's example eom request.
EXAMPLE = contract.SPEC["components"]["examples"]["request-eom"]["value"]
EOM = json.dumps(EXAMPLE).encode()


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


def provider_for(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def request_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "milterbridge eom"]
    return span


def check_request_span(span: ReadableSpan) -> None:
    assert span.kind is SpanKind.SERVER
    assert span.context.trace_id == TRACE_ID
    assert span.parent is not None
    assert span.parent.span_id == PARENT_ID
    assert span.attributes["milterbridge.event"] == "eom"
    assert span.attributes["milterbridge.webhook_id"] == EXAMPLE["id"]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_the_request_span_continues_the_trace_and_holds_the_handlers_spans(exporter, asynchronous):
    provider = provider_for(exporter)
    tracer = provider.get_tracer("the filter")

    def check(request: sdk.Request) -> sdk.Decision:
        with tracer.start_as_current_span("look up the sender"):
            return sdk.reject(550, "5.7.1", "no", reason="test")

    async def check_async(request: sdk.Request) -> sdk.Decision:
        return check(request)

    filter_ = sdk.Filter(check_async if asynchronous else check, secrets=None, tracer_provider=provider)
    status, _ = asyncio.run(filter_.handle_async(EOM, HEADERS))
    assert status == 200
    span = request_span(exporter)
    check_request_span(span)
    assert span.attributes["milterbridge.decision"] == "reject"
    (own,) = [s for s in exporter.get_finished_spans() if s.name == "look up the sender"]
    assert own.context.trace_id == TRACE_ID
    assert own.parent is not None
    assert own.parent.span_id == span.context.span_id


def test_the_synchronous_entry_point_traces_too(exporter):
    filter_ = sdk.Filter(lambda request: sdk.continue_(), secrets=None, tracer_provider=provider_for(exporter))
    assert filter_.handle(EOM, HEADERS)[0] == 200
    check_request_span(request_span(exporter))


def test_a_failing_handler_marks_its_span(exporter):
    def broken(request: sdk.Request) -> sdk.Decision:
        raise RuntimeError("boom")

    filter_ = sdk.Filter(broken, secrets=None, tracer_provider=provider_for(exporter))
    assert filter_.handle(EOM, HEADERS)[0] == 500
    span = request_span(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert [event.name for event in span.events] == ["exception"]


def test_without_a_traceparent_the_request_starts_a_trace(exporter):
    filter_ = sdk.Filter(lambda request: None, secrets=None, tracer_provider=provider_for(exporter))
    assert filter_.handle(EOM, {})[0] == 204
    span = request_span(exporter)
    assert span.parent is None


def test_make_app_takes_the_provider_once():
    filter_ = sdk.Filter(lambda request: None, secrets=None)
    with pytest.raises(ValueError, match="not both"):
        sdk.make_app(filter_, secrets=None, tracer_provider=TracerProvider())


def test_the_header_is_found_in_any_case(exporter):
    """A WSGI-style header dict (Traceparent) continues the trace as well."""
    filter_ = sdk.Filter(lambda request: None, secrets=None, tracer_provider=provider_for(exporter))
    assert filter_.handle(EOM, {"Traceparent": HEADERS["traceparent"]})[0] == 204
    check_request_span(request_span(exporter))


def test_an_answer_the_bridge_would_refuse_marks_the_span(exporter):
    """A handler that returns something that is not a valid decision gets a 500 and an error status."""
    filter_ = sdk.Filter(lambda request: "reject", secrets=None, tracer_provider=provider_for(exporter))  # type: ignore[arg-type,return-value]
    assert filter_.handle(EOM, HEADERS)[0] == 500
    assert request_span(exporter).status.status_code is StatusCode.ERROR
