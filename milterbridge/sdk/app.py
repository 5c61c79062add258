"""Serving a filter: a framework-neutral :class:`Filter` and an aiohttp app factory.

A handler takes a :class:`~milterbridge.sdk.requests.Request` and returns a
:class:`~milterbridge.sdk.decisions.Decision` (or ``None`` for ``continue``); it may be a
plain function or a coroutine function. :class:`Filter` wraps it with signature checking
and turns one request into one response::

    status, body = Filter(handler, secrets=["whsec_..."]).handle(body_bytes, headers)

With OpenTelemetry's API installed (``pip install opentelemetry-api``, plus an SDK the filter
configures), each request is handled in a SERVER span ``milterbridge <event>`` that continues
the trace of the request's ``traceparent`` header: with ``[tracing] enabled`` on the bridge,
the filter's spans join the trace of the message. Spans the handler starts are its children,
a synchronous handler's too. Without the API, nothing is traced.

Answers: ``200`` with the decision as JSON; ``204`` for ``None`` and for the notifications
``abort`` and ``close`` (the bridge ignores their response); ``401`` when the request is not
authentic (:class:`~milterbridge.sdk.verify.Verifier`); ``400`` when the body is not a
request of the contract; ``500`` when the handler raised or returned a decision the bridge
would refuse at this event (logged on the ``milterbridge.sdk`` logger). The bridge counts
every answer but 200 and 204 as a failure of the endpoint and applies its ``on_error``.

:func:`make_app` serves a filter with aiohttp; other servers call :meth:`Filter.handle`
(synchronous handlers) or :meth:`Filter.handle_async`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Final, TypeAlias

from aiohttp import web

from .decisions import Decision
from .requests import Request, RequestError, parse_request
from .verify import DEFAULT_TOLERANCE, SignatureError, Verifier

__all__ = ["Handler", "Filter", "make_app", "DEFAULT_MAX_REQUEST_BYTES"]

Handler: TypeAlias = Callable[[Request], Decision | None] | Callable[[Request], Awaitable[Decision | None]]

#: Largest request body :func:`make_app` reads: above the bridge's default
#: ``max_body_bytes`` (10 MiB) in base64 with the rest of an eom payload.
DEFAULT_MAX_REQUEST_BYTES: Final = 32 * 1024 * 1024

_NOTIFICATIONS: Final = frozenset({"abort", "close"})
_log = logging.getLogger("milterbridge.sdk")

try:
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:  # tracing is optional
    _trace = None  # type: ignore[assignment]


class Filter:
    """A handler with its signature checks; see the module docstring.

    ``secrets`` are the endpoint's ``whsec_`` keys (any of them verifies a request); ``None``
    turns signature checking off, for a filter reachable only by the bridge over a trusted
    path. ``tracer_provider`` is where the request spans go (OpenTelemetry's global provider
    by default).
    """

    __slots__ = ("handler", "tracer_provider", "verifier")

    def __init__(
        self,
        handler: Handler,
        *,
        secrets: Sequence[str] | None,
        tolerance: float = DEFAULT_TOLERANCE,
        tracer_provider: Any = None,
    ) -> None:
        self.handler = handler
        self.verifier = None if secrets is None else Verifier(secrets, tolerance)
        self.tracer_provider = tracer_provider

    @contextlib.contextmanager
    def _span(self, request: Request, headers: Mapping[str, str]) -> Iterator[Any]:
        """The request's SERVER span, in the trace its ``traceparent`` names (None without OpenTelemetry)."""
        if _trace is None:
            yield None
            return
        tracer = _trace.get_tracer("milterbridge.sdk", tracer_provider=self.tracer_provider)
        # Header names in any case (a WSGI server's dict has Traceparent): the propagator looks up lower case.
        carrier = {name.lower(): value for name, value in headers.items()}
        with tracer.start_as_current_span(
            f"milterbridge {request.event}",
            context=_propagate.extract(carrier),
            kind=_trace.SpanKind.SERVER,
            attributes={"milterbridge.event": request.event, "milterbridge.webhook_id": request.id},
            record_exception=False,
        ) as span:
            yield span

    @staticmethod
    def _failed(span: Any, request: Request, error: BaseException) -> tuple[int, bytes]:
        """The 500 for a handler that raised ``error``, noted on its span."""
        _log.error("the handler failed at %s (webhook-id %s)", request.event, request.id, exc_info=error)
        if span is not None:
            span.record_exception(error)
            span.set_status(_trace.Status(_trace.StatusCode.ERROR, "the handler failed"))
        return 500, b"the handler failed"

    def _respond(self, span: Any, request: Request, decision: object) -> tuple[int, bytes]:
        """The answer to the handler's ``decision``, noted on its span."""
        answer = self._answer(request, decision)
        if span is not None:
            if isinstance(decision, Decision):
                span.set_attribute("milterbridge.decision", str(decision.action))
            if answer[0] == 500:
                span.set_status(_trace.Status(_trace.StatusCode.ERROR, "the handler's answer is not valid"))
        return answer

    def _admit(self, body: bytes, headers: Mapping[str, str]) -> Request | tuple[int, bytes]:
        if self.verifier is not None:
            try:
                self.verifier.verify(headers, body)
            except SignatureError as exc:
                _log.warning("refused a request: %s", exc)
                return 401, str(exc).encode()
        try:
            return parse_request(body)
        except RequestError as exc:
            _log.warning("refused a request: %s", exc)
            return 400, str(exc).encode()

    def _answer(self, request: Request, decision: object) -> tuple[int, bytes]:
        if decision is None or request.event in _NOTIFICATIONS:
            return 204, b""
        if not isinstance(decision, Decision):
            _log.error("the handler returned %r at %s, not a Decision", type(decision).__name__, request.event)
            return 500, b"the handler did not return a decision"
        try:
            return 200, decision.encode(request.event)
        except ValueError as exc:
            _log.error("the handler's decision at %s is not valid: %s", request.event, exc)
            return 500, b"the handler returned a decision that is not valid for this event"

    def handle(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        """Answer one request with a synchronous handler: ``(status, response body)``."""
        admitted = self._admit(body, headers)
        if not isinstance(admitted, Request):
            return admitted
        with self._span(admitted, headers) as span:
            try:
                decision = self.handler(admitted)
            except Exception as exc:
                return self._failed(span, admitted, exc)
            if inspect.isawaitable(decision):
                # A coroutine handler needs handle_async; close the coroutine that cannot be awaited here.
                if inspect.iscoroutine(decision):
                    decision.close()
                return self._failed(
                    span, admitted, TypeError("the handler is asynchronous: serve it with handle_async or make_app")
                )
            return self._respond(span, admitted, decision)

    async def handle_async(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        """Answer one request: a coroutine handler is awaited, a plain one runs in a worker thread."""
        admitted = self._admit(body, headers)
        if not isinstance(admitted, Request):
            return admitted
        with self._span(admitted, headers) as span:
            try:
                if inspect.iscoroutinefunction(self.handler):
                    decision = await self.handler(admitted)
                else:
                    # to_thread copies the context: the handler's spans are children of this one.
                    decision = await asyncio.to_thread(self.handler, admitted)
                    if inspect.isawaitable(decision):
                        decision = await decision
            except Exception as exc:
                return self._failed(span, admitted, exc)
            return self._respond(span, admitted, decision)


def make_app(
    handler: Handler | Filter,
    *,
    secrets: Sequence[str] | None,
    path: str = "/",
    tolerance: float = DEFAULT_TOLERANCE,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    tracer_provider: Any = None,
) -> web.Application:
    """An aiohttp application that answers ``POST path`` with ``handler``'s decisions.

    Run it with ``aiohttp.web.run_app(make_app(...), host=..., port=...)``. A :class:`Filter`
    may be given instead of a handler; ``secrets``, ``tolerance`` and ``tracer_provider``
    must then be left to it (pass ``secrets=None``).
    """
    if isinstance(handler, Filter):
        if secrets is not None or tracer_provider is not None:
            raise ValueError("give the secrets and the tracer provider to the Filter or to make_app, not both")
        filter_ = handler
    else:
        filter_ = Filter(handler, secrets=secrets, tolerance=tolerance, tracer_provider=tracer_provider)

    async def post(request: web.Request) -> web.Response:
        body = await request.read()
        status, answer = await filter_.handle_async(body, request.headers)
        content_type = "application/json" if status == 200 else "text/plain"
        if status == 204:
            return web.Response(status=204)
        return web.Response(status=status, body=answer, content_type=content_type)

    app = web.Application(client_max_size=max_request_bytes)
    app.router.add_post(path, post)
    return app
