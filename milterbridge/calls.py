"""The endpoint calls of one connection: those a reply waits for, and those in the background.

A request built for an event is encoded once per endpoint (its own webhook id, and for an
endpoint with ``include_body`` at eom the message body) and handed to
``endpoint.call_endpoint``, which posts it and turns the answer into an outcome. Calls a
reply waits for (enforcing endpoints) run at once and their outcomes come back by endpoint
name; observe calls and the abort/close notifications run in the background.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, Protocol

from milterbridge import payload as pl
from milterbridge.background import BackgroundCalls
from milterbridge.body import BodyBuffer
from milterbridge.endpoint import CallObserver, CallResult, Endpoint, WebhookPoster, call_endpoint
from milterbridge.hooks import GONE_STATUSES, HookBook, HookCall, hook_call
from milterbridge.message_log import MessageLog, log_call_failure
from milterbridge.milter.constants import ALL_ACTIONS, Event
from milterbridge.policy.model import EndpointPolicy, Failure, Outcome
from milterbridge.spans import CallTrace, MessageTrace, Tracer

log = logging.getLogger("milterbridge.dispatch")

#: A request encoded for one call: its webhook id, its body, and for a hook endpoint how to call it.
Prepared = tuple[str, bytes | pl.StreamedRequest, HookCall | None]


class CallMetrics(CallObserver, Protocol):
    def bridge_fault(self, kind: str) -> None: ...


def _encoded(
    request: pl.JSON,
    endpoint: Endpoint,
    event: Event,
    body: BodyBuffer | None = None,
    *,
    stream: bool = False,
    hooks: HookBook | None = None,
) -> Prepared:
    """Encode a request for ``endpoint`` now (the context it was built from keeps changing after
    this event); with ``body``, the message body too when the endpoint has include_body. A hook
    endpoint (``protocol``) gets its own format (``hooks.hook_call``) for ``event``."""
    webhook_id = pl.new_id("evt")
    if endpoint.hook:
        encoded, hook = hook_call(request, event, endpoint.http, webhook_id, body, hooks)
        return webhook_id, encoded, hook
    settings = endpoint.settings
    part = (
        pl.BodyPart(body, settings.max_body_bytes, stream=stream)
        if body is not None and settings.include_body
        else None
    )
    return webhook_id, pl.encode_request(request, webhook_id, part), None


async def _traced(span: CallTrace, calling: Coroutine[Any, Any, CallResult]) -> CallResult:
    """Await the call and finish its span with the result (None when it was cancelled or the bridge failed)."""
    try:
        result = await calling
    except BaseException as exc:
        span.finish(None, exc)
        raise
    span.finish(result)
    return result


class ConnectionCalls:
    """Makes one connection's endpoint calls; failures are logged with its session id."""

    def __init__(
        self,
        client: WebhookPoster,
        background: BackgroundCalls,
        metrics: CallMetrics,
        session_id: str,
        message_log: MessageLog,
        endpoints: Sequence[Endpoint],
        tracer: Tracer | None = None,
        hooks: HookBook | None = None,
    ) -> None:
        self.client = client
        #: The registrations of the MTA Hooks endpoints, for their calls.
        self.hooks = hooks
        #: With tracing on: each call gets a span, in its message's trace.
        self.tracer = tracer
        #: The snapshot's endpoints, in config order (a policy's ``index``).
        self.endpoints = endpoints
        self.background = background
        self.metrics = metrics
        self.session_id = session_id
        self.message_log = message_log
        #: What the MTA lets us do, once negotiated (decisions needing more are invalid).
        self.actions = ALL_ACTIONS
        #: Event -> the longest budget a call the MTA waits for may have at the connected MTA
        #: (``ReplyLimits.budget_caps``); a shorter endpoint budget is kept.
        self.budget_caps: Mapping[Event, float] = {}

    async def decide(
        self, event: Event, policies: Sequence[EndpointPolicy], request: pl.JSON, body: BodyBuffer | None = None
    ) -> dict[str, Outcome]:
        """Call the endpoints of ``policies`` at once; their outcomes by name, for the message's log line too.

        Raises only for a fault of the bridge (see ``endpoint.call_endpoint``); then no call is
        left running.
        """
        calls = []
        for policy in policies:
            endpoint = self.endpoints[policy.index]
            calls.append((endpoint, _encoded(request, endpoint, event, body, stream=True, hooks=self.hooks)))
        cap = self.budget_caps.get(event)
        parent = self.message_log.trace
        if len(calls) == 1:
            endpoint, prepared = calls[0]
            return {endpoint.name: await self._call(event, endpoint, prepared, parent, cap=cap)}
        # return_exceptions: a bridge fault in one call must not leave the others running on.
        results = await asyncio.gather(
            *(self._call(event, ep, prepared, parent, cap=cap) for ep, prepared in calls), return_exceptions=True
        )
        outcomes: dict[str, Outcome] = {}
        for (endpoint, _), result in zip(calls, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            outcomes[endpoint.name] = result
        return outcomes

    def observe(self, event: Event, policy: EndpointPolicy, request: pl.JSON, body: BodyBuffer | None = None) -> None:
        """Call the observe endpoint of ``policy`` in the background (its call is not in the message's log line).

        ``body``: the eom request gets the body bytes now (the call outlives the buffer); raises
        SpoolError when they cannot be read.
        """
        endpoint = self.endpoints[policy.index]
        if self.background.has_room(endpoint.settings):
            prepared = _encoded(request, endpoint, event, body, stream=False, hooks=self.hooks)
            self._spawn(event, endpoint, prepared)

    def notify(self, event: Event, endpoints: Sequence[Endpoint], request: pl.JSON) -> None:
        """Tell ``endpoints`` about an ``abort`` or ``close``, in the background."""
        for endpoint in endpoints:
            if self.background.has_room(endpoint.settings):
                self._spawn(event, endpoint, _encoded(request, endpoint, event))

    async def _call(
        self,
        event: Event,
        endpoint: Endpoint,
        prepared: Prepared,
        parent: MessageTrace | None,
        *,
        record: bool = True,
        cap: float | None = None,
    ) -> Outcome:
        webhook_id, body, hook = prepared
        budget = endpoint.timeouts[event]
        if cap is not None and cap < budget:
            budget = cap
        span = None if self.tracer is None else self.tracer.call(parent, endpoint, event)
        calling = call_endpoint(
            self.client,
            endpoint,
            webhook_id,
            body,
            event=event,
            allowed_actions=self.actions,
            observer=self.metrics,
            budget=budget,
            headers=b"" if span is None else span.header,
            hook=hook,
        )
        result = await (calling if span is None else _traced(span, calling))
        if hook is not None and hook.registration is not None and result.status in GONE_STATUSES:
            assert self.hooks is not None
            self.hooks.report_gone(endpoint.name, hook.registration)
        outcome = result.outcome
        event_name = event.value
        failure = outcome if isinstance(outcome, Failure) else None
        if record:
            if failure is None:
                self.message_log.call(endpoint.name, event_name, result.action, result.elapsed, reason=outcome.reason)
            else:
                self.message_log.call(endpoint.name, event_name, result.action, result.elapsed, failure.reason)
        if failure is not None:
            log_call_failure(self.session_id, endpoint.name, event_name, failure, endpoint.settings.on_error.value)
        return outcome

    def _spawn(self, event: Event, endpoint: Endpoint, prepared: Prepared) -> None:
        # The trace is the message's at the time of the event: the call may outlive it.
        coroutine = self._background_call(event, endpoint, prepared, self.message_log.trace)
        self.background.spawn(coroutine, endpoint.settings)

    async def _background_call(
        self, event: Event, endpoint: Endpoint, prepared: Prepared, parent: MessageTrace | None
    ) -> None:
        try:
            outcome = await self._call(event, endpoint, prepared, parent, record=False)
        except Exception:
            self.metrics.bridge_fault("internal")
            if event is Event.ABORT or event is Event.CLOSE:
                log.exception("bug: %s notification to %s failed", event.value, endpoint.name)
            else:
                log.exception("bug: observe call to %s at %s failed", endpoint.name, event.value)
            return
        if event is Event.ABORT or event is Event.CLOSE or not log.isEnabledFor(logging.INFO):
            return
        action = "failure" if isinstance(outcome, Failure) else outcome.action.value
        fields = {"session": self.session_id, "endpoint": endpoint.name, "event": event.value}
        fields |= {"action": action, "mode": "observe"}
        log.info("observe endpoint %s at %s: %s", endpoint.name, event.value, action, extra={"fields": fields})
