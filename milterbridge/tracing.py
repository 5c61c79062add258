"""Traces of the message path with OpenTelemetry (``pip install 'milterbridge[otel]'``).

Off unless ``[tracing] enabled = true``. Each worker then builds its ``Tracing`` from the
standard environment variables of the OpenTelemetry SDK:

- ``OTEL_TRACES_EXPORTER``: ``otlp`` (the default; OTLP over HTTP with protobuf, to
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``, default
  ``http://localhost:4318``, with ``OTEL_EXPORTER_OTLP_HEADERS``, ``..._TIMEOUT``,
  ``..._CERTIFICATE``), ``console`` (JSON on stdout) or ``none``;
- ``OTEL_SERVICE_NAME`` (default ``milterbridge``) and ``OTEL_RESOURCE_ATTRIBUTES``;
- ``OTEL_TRACES_SAMPLER`` and ``OTEL_TRACES_SAMPLER_ARG`` (default: every trace);
- ``OTEL_BSP_*``: the batch span processor that exports in a thread of its own.

What is traced (``Tracer``, milterbridge.spans):

- one trace per message: a SERVER span ``milter message`` from MAIL to the message's end,
  with ``milterbridge.session``, ``milterbridge.outcome``, ``milterbridge.reason`` and
  ``milterbridge.queue_id``;
- one CLIENT span ``POST`` per webhook call, a child of its message's span, with the
  OpenTelemetry HTTP client attributes (``http.request.method``, ``url.full`` without
  credentials or query, ``server.address``, ``server.port``, ``http.response.status_code``,
  ``http.request.resend_count`` for the retry, ``error.type`` and an error status when the
  call failed) and ``milterbridge.endpoint``, ``milterbridge.event``, ``milterbridge.outcome``
  (as ``webhook_requests_total`` counts it) and ``milterbridge.decision`` (the action, or
  ``failure``). Calls outside a message (connect, helo, the close notification) are traces of
  their own;
- every call sends the endpoint its span's W3C ``traceparent`` header, so that the filter's
  spans (milterbridge.sdk continues the trace) join the message's trace.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Mapping
from typing import Final
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import milterbridge
from milterbridge.endpoint import CallResult, Endpoint
from milterbridge.milter.constants import Event
from milterbridge.spans import MessageTrace

__all__ = ["EXPORTERS", "SHUTDOWN_TIMEOUT", "Tracing", "check_environment"]

log = logging.getLogger(__name__)

#: Seconds the spans left at shutdown get to be exported (deploy/systemd's TimeoutStopSec counts them).
SHUTDOWN_TIMEOUT: Final = 5.0
#: ``OTEL_TRACES_EXPORTER`` values the bridge understands.
EXPORTERS: Final = ("otlp", "console", "none")
_DEFAULT_SERVICE: Final = "milterbridge"
_OK: Final = "ok"
_PROPAGATOR: Final = TraceContextTextMapPropagator()


def check_environment(environ: Mapping[str, str] = os.environ) -> str:
    """The exporter ``environ`` asks for; raises ValueError for one the bridge cannot use."""
    exporter = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter not in EXPORTERS:
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter!r}: the bridge exports to one of {', '.join(EXPORTERS)}")
    if exporter == "otlp":
        protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        if protocol not in (None, "", "http/protobuf"):
            raise ValueError(f"OTLP protocol {protocol!r}: the bridge sends OTLP over http/protobuf only")
    return exporter


class _MessageSpan:
    """A message's span (``MessageTrace``) and the context its calls start in."""

    __slots__ = ("context", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.context = trace.set_span_in_context(span)

    def end(self, outcome: str, reason: str | None, queue_id: str | None) -> None:
        span = self.span
        span.set_attribute("milterbridge.outcome", outcome)
        if reason is not None:
            span.set_attribute("milterbridge.reason", reason)
        if queue_id is not None:
            span.set_attribute("milterbridge.queue_id", queue_id)
        span.end()


class _CallSpan:
    """The span of one webhook call (``CallTrace``)."""

    __slots__ = ("header", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        self.header = "".join(f"{name}: {value}\r\n" for name, value in carrier.items()).encode("ascii")

    def finish(self, result: CallResult | None, error: BaseException | None = None) -> None:
        span = self.span
        if result is None:
            if error is None or isinstance(error, asyncio.CancelledError):
                kind = "cancelled"
            else:
                kind = type(error).__qualname__  # a fault of the bridge, not the endpoint's answer
                span.record_exception(error)
            span.set_attribute("error.type", kind)
            span.set_status(Status(StatusCode.ERROR, kind))
        else:
            if result.status is not None:
                span.set_attribute("http.response.status_code", result.status)
            if result.attempts > 1:
                span.set_attribute("http.request.resend_count", result.attempts - 1)
            span.set_attribute("milterbridge.outcome", result.label)
            span.set_attribute("milterbridge.decision", result.action)
            if result.label != _OK:
                # The status code when an answer failed the call, as the HTTP conventions ask.
                failed = str(result.status) if result.label == "status_error" and result.status else result.label
                span.set_attribute("error.type", failed)
                span.set_status(Status(StatusCode.ERROR, result.label))
        span.end()


class Tracing:
    """The bridge's ``Tracer`` with OpenTelemetry: spans from ``provider``."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("milterbridge", milterbridge.__version__)
        #: endpoint name -> the attributes every call span to it has
        self._endpoint_attributes: dict[tuple[str, str], dict[str, str | int]] = {}

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Tracing:
        """A ``Tracing`` configured by the OTEL_* variables (module docstring); ValueError for bad ones."""
        exporter_name = check_environment(environ)
        resource = Resource.create({"service.version": milterbridge.__version__})
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": _DEFAULT_SERVICE}))
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        exporter: SpanExporter | None = None
        if exporter_name == "otlp":
            exporter = OTLPSpanExporter()
        elif exporter_name == "console":
            exporter = ConsoleSpanExporter()
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Export what is left and stop, waiting ``timeout`` seconds at most (blocking: call it from a thread).

        A collector that does not answer must not hold up the process's exit: what is not
        exported by then is dropped (the export goes on in a daemon thread until the exit).
        """
        stopping = threading.Thread(target=self.provider.shutdown, name="milterbridge-tracing-shutdown", daemon=True)
        stopping.start()
        stopping.join(timeout)
        if stopping.is_alive():
            log.warning("tracing: the spans not exported within %g s of the shutdown are dropped", timeout)

    def message(self, session_id: str) -> MessageTrace:
        span = self._tracer.start_span(
            "milter message", context=Context(), kind=SpanKind.SERVER, attributes={"milterbridge.session": session_id}
        )
        return _MessageSpan(span)

    def call(self, parent: MessageTrace | None, endpoint: Endpoint, event: Event) -> _CallSpan:
        context = parent.context if isinstance(parent, _MessageSpan) else Context()
        attributes = dict(self._attributes(endpoint))
        attributes["milterbridge.event"] = event.value
        span = self._tracer.start_span("POST", context=context, kind=SpanKind.CLIENT, attributes=attributes)
        return _CallSpan(span)

    def _attributes(self, endpoint: Endpoint) -> dict[str, str | int]:
        key = (endpoint.name, endpoint.settings.url)
        known = self._endpoint_attributes.get(key)
        if known is None:
            url = urlsplit(endpoint.settings.url)
            known = {
                "http.request.method": "POST",
                "url.full": endpoint.http.safe_url,
                "server.address": url.hostname or "",
                "server.port": url.port or (443 if url.scheme == "https" else 80),
                "milterbridge.endpoint": endpoint.name,
            }
            self._endpoint_attributes[key] = known
        return known
