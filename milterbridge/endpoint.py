"""An endpoint of one config snapshot, and the one step that calls it.

``build_endpoints`` is the one place endpoints are made (start-up, reload, preflight): each
``Endpoint`` holds its settings, the policy's view of them, its prepared HTTP state, its
per-event budgets, its circuit breaker and, with ``max_concurrency``, its call slots. A reload
builds a whole new tuple that replaces the old one; an endpoint whose settings did not change
at all keeps its breaker and slots. Sessions that started before keep the tuple they were given.

``call_endpoint`` is the step from an encoded request to an outcome: ask the breaker, wait for
a call slot (only with a cap), post within what is left of the event's budget, decode,
validate, count, and tell the breaker once, after the answer was validated
(docs/reliability.md §9)::

    result of the call                                  outcome            breaker
    breaker open (nothing sent)                         Failure            -
    hook endpoint without a registration (nothing sent) Failure            -
    no call slot within the event's budget              Failure            neither
    WebhookError whose endpoint_failure is True         Failure            failure
    WebhookError whose endpoint_failure is False        Failure            neither
    answer that is not JSON, or not a valid decision    Failure            success
    valid decision                                      Decision           success
    cancelled, SpoolError, any other exception          (propagates)       neither

Only the webhook client's errors and an invalid answer are the endpoint's doing. Anything else
(a body the bridge cannot read, a bug) propagates to the caller, uncounted: it is answered
there, never with the endpoint's ``on_error``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from milterbridge.config import EndpointSettings, TlsSettings
from milterbridge.hooks import HookCall
from milterbridge.milter.constants import Action, Event
from milterbridge.payload import DecodeError, decode
from milterbridge.policy.model import Decision, DecisionError, EndpointPolicy, Failure, Outcome
from milterbridge.policy.parse import parse_decision
from milterbridge.settings import EndpointProtocol
from milterbridge.webhook.breaker import CircuitBreaker
from milterbridge.webhook.client import BodySource, PreparedEndpoint, WebhookResponse, prepare_endpoint
from milterbridge.webhook.errors import AttemptOutcome, WebhookError, WebhookTimeoutError, body_preview

__all__ = [
    "CallObserver",
    "CallResult",
    "Endpoint",
    "WebhookPoster",
    "build_endpoints",
    "call_endpoint",
]

log = logging.getLogger("milterbridge.dispatch")
#: Response body bytes the debug log of a call shows.
_DEBUG_BODY_BYTES: Final = 1024


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One configured endpoint as a snapshot holds it; built by ``build_endpoints``."""

    settings: EndpointSettings
    #: What the policy needs to know of it (mode, on_error, its index for ties).
    policy: EndpointPolicy
    #: The request head, signer and TLS context for ``WebhookClient.post``.
    http: PreparedEndpoint
    #: Shared with the next snapshot's endpoint of the same name while its settings stay equal.
    breaker: CircuitBreaker
    #: The configured name (metrics label, log field): ``settings.name``.
    name: str
    #: The budget of a call in seconds, for every event: ``settings.timeouts``, else ``settings.timeout``.
    timeouts: Mapping[Event, float]
    #: ``max_concurrency`` call slots for this worker, shared like the breaker; None without a cap.
    slots: asyncio.Semaphore | None = None
    #: It speaks a hook format (``protocol`` mta-hooks or stalwart): its calls go through ``hooks.hook_call``.
    hook: bool = False


def build_endpoints(
    settings: Sequence[EndpointSettings],
    previous: Sequence[Endpoint] = (),
    *,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[Endpoint, ...]:
    """The endpoints of one config snapshot, in config order.

    An endpoint whose settings equal those of the endpoint of the same name in ``previous``
    keeps its breaker (and so its state) and its call slots; any change at all (a fixed URL, a
    new secret, a longer timeout) gives it a new, closed breaker, so a filter repaired while
    its breaker was open is called again after the reload. TLS files are read again
    (certificates are rotated under the same path); endpoints with equal TLS settings share
    one context. ``clock`` drives the new breakers. Raises ``ValueError``/``OSError`` like
    ``prepare_endpoint``, before anything is shared with ``previous``.
    """
    kept = {ep.name: ep for ep in previous}
    contexts: dict[TlsSettings, ssl.SSLContext] = {}
    endpoints = []
    for index, ep in enumerate(settings):
        http = prepare_endpoint(ep, contexts)
        old = kept.get(ep.name)
        if old is not None and old.settings == ep:
            breaker, slots = old.breaker, old.slots
        else:
            slots = asyncio.Semaphore(ep.max_concurrency) if ep.max_concurrency else None
            breaker = CircuitBreaker(
                failure_rate=ep.breaker_failure_rate,
                min_calls=ep.breaker_min_calls,
                window=ep.breaker_window,
                probe_delay=ep.breaker_probe,
                max_delay=ep.breaker_reset,
                clock=clock,
            )
        policy = EndpointPolicy(
            name=ep.name,
            index=index,
            events=ep.events,
            mode=ep.mode,
            on_error=ep.on_error,
            include_body=ep.include_body,
        )
        timeouts = dict.fromkeys(Event, ep.timeout) | dict(ep.timeouts)
        hook = ep.protocol is not EndpointProtocol.MILTERBRIDGE
        endpoints.append(Endpoint(ep, policy, http, breaker, ep.name, timeouts, slots, hook))
    return tuple(endpoints)


class WebhookPoster(Protocol):
    """The webhook client as a call needs it (``webhook.client.WebhookClient`` satisfies it)."""

    async def post(
        self,
        endpoint: PreparedEndpoint,
        body: bytes | BodySource,
        *,
        webhook_id: str,
        timeout: float | None = None,
        headers: bytes = b"",
    ) -> WebhookResponse: ...


class CallObserver(Protocol):
    """Metric hooks of one call (``milterbridge.metrics.Metrics`` satisfies it)."""

    def webhook(self, endpoint: str, event: str, outcome: str, seconds: float | None) -> None: ...
    def decision(self, endpoint: str, event: str, action: str, mode: str) -> None: ...
    def queue_wait(self, endpoint: str, seconds: float) -> None: ...


#: ``webhook_requests_total`` outcomes this step sets itself, as the plain strings metrics take.
_OK: Final = AttemptOutcome.OK.value
_BREAKER_OPEN: Final = AttemptOutcome.BREAKER_OPEN.value
_NOT_REGISTERED: Final = AttemptOutcome.NOT_REGISTERED.value
_INVALID_BODY: Final = AttemptOutcome.INVALID_BODY.value
_INVALID_DECISION: Final = AttemptOutcome.INVALID_DECISION.value
#: ``CallResult.action`` of a call that produced no decision.
FAILURE: Final = "failure"


# Not frozen: compiled, a frozen dataclass sets each field through object.__setattr__, and
# one of these is made per call. Nothing changes it after the call.
@dataclass(slots=True)
class CallResult:
    """What one call produced: the outcome for the policy, how long it took, and how it went."""

    outcome: Outcome
    #: The decision's action, or ``failure`` (the log line's and the metrics' name for it).
    action: str
    #: Seconds from the breaker's ticket to the validated answer (the message's log line).
    elapsed: float
    #: How the call ended, as ``webhook_requests_total`` counts it (``ok``, ``timeout``, ...).
    label: str = "ok"
    #: The HTTP status of the last answer, when one came.
    status: int | None = None
    #: HTTP requests made (2 with the retry; 0 when none was sent).
    attempts: int = 0


async def call_endpoint(
    client: WebhookPoster,
    endpoint: Endpoint,
    webhook_id: str,
    body: bytes | BodySource,
    *,
    event: Event,
    allowed_actions: Action,
    observer: CallObserver,
    budget: float | None = None,
    headers: bytes = b"",
    hook: HookCall | None = None,
) -> CallResult:
    """Post ``body`` (the encoded request) to ``endpoint`` and turn the answer into an outcome.

    The call has the event's budget (``endpoint.timeouts``, or ``budget`` when given), a wait
    for a call slot included; ``headers`` (lines ending in CRLF) go with every attempt.
    ``allowed_actions`` is what the MTA granted at negotiation. Counts the call with
    ``observer.webhook``, a decision with ``observer.decision`` and, with a cap, the wait for a
    slot with ``observer.queue_wait``; see the module docstring for what the breaker is told.
    ``hook``: a call to an MTA Hooks or Stalwart endpoint (``hooks.hook_call``), posted where
    it says, with its headers, its answer translated into a decision before it is validated;
    one that cannot be made fails as ``not_registered`` without a request.
    Raises only what is not the endpoint's doing (cancellation, ``SpoolError``, a bug), after
    giving the breaker ticket back uncounted.
    """
    settings = endpoint.settings
    breaker = endpoint.breaker
    started = time.monotonic()
    if budget is None:
        budget = endpoint.timeouts[event]
    outcome: Outcome
    response: WebhookResponse | None = None
    status: int | None = None
    attempts = 0
    http = endpoint.http
    if hook is not None:
        headers += hook.headers
        if hook.http is not None:
            http = hook.http
    # A hook call that cannot be made asks the breaker nothing: it is no verdict on the endpoint.
    ticket = breaker.allow() if hook is None or hook.http is not None else -1
    if ticket < 0:
        assert hook is not None
        label, outcome = _NOT_REGISTERED, Failure(reason=hook.unavailable)
    elif not ticket:
        label, outcome = _BREAKER_OPEN, Failure(reason=_BREAKER_OPEN)
    else:
        try:
            slots = endpoint.slots
            if slots is None:
                response = await client.post(http, body, webhook_id=webhook_id, timeout=budget, headers=headers)
            else:
                response = await _post_in_slot(
                    client, endpoint, http, slots, body, webhook_id, budget, observer, headers
                )
            status, attempts = response.status, response.attempts
            try:
                decoded = decode(response.body)
                if hook is not None:
                    try:
                        decoded = hook.translate(decoded)
                    except ValueError as bad_answer:
                        raise DecisionError(str(bad_answer)) from None
                outcome = parse_decision(
                    decoded,
                    event,
                    max_modifications=settings.max_modifications,
                    allowed_actions=allowed_actions,
                    allowed_ops=settings.allowed_ops,
                )
                label = _OK
            # Each clause names its exception differently: mypyc types a name by its first
            # clause, and a later clause of another type reusing it fails at run time.
            except DecodeError as bad_body:
                label, outcome = _INVALID_BODY, Failure(reason=f"invalid response body: {bad_body}")
            except DecisionError as bad_decision:
                label, outcome = _INVALID_DECISION, Failure(reason=f"invalid decision: {bad_decision}")
        except WebhookError as failed:
            status, attempts = failed.status, failed.attempts
            if failed.endpoint_failure:
                breaker.record_failure(ticket)
            else:
                breaker.release(ticket)
            label, outcome = str(failed.outcome), Failure(reason=str(failed))
        except BaseException:
            breaker.release(ticket)  # cancelled, or the bridge's own fault: not the endpoint's
            raise
        else:
            breaker.record_success(ticket)  # it answered, valid or not
    elapsed = time.monotonic() - started
    name = settings.name
    event_name = event.value
    observer.webhook(name, event_name, label, elapsed)
    if log.isEnabledFor(logging.DEBUG):
        _log_call(name, event_name, webhook_id, body, label, response)
    if isinstance(outcome, Decision):
        action = outcome.action.value
        observer.decision(name, event_name, action, settings.mode.value)
    else:
        action = FAILURE
    return CallResult(outcome, action, elapsed, label, status, attempts)


async def _post_in_slot(
    client: WebhookPoster,
    endpoint: Endpoint,
    http: PreparedEndpoint,
    slots: asyncio.Semaphore,
    body: bytes | BodySource,
    webhook_id: str,
    budget: float,
    observer: CallObserver,
    headers: bytes,
) -> WebhookResponse:
    """Post once one of the endpoint's call slots is free; the wait counts against ``budget``.

    Raises a ``WebhookTimeoutError`` that the breaker does not count when no slot came free in
    time (the endpoint is busy with this worker's other calls, not broken), nor when a call that
    had to wait runs out of what was left of its budget.
    """
    waiting = time.monotonic()
    queued = slots.locked()
    if queued:
        try:
            async with asyncio.timeout(budget):
                await slots.acquire()
        except TimeoutError:
            observer.queue_wait(endpoint.name, time.monotonic() - waiting)
            error = WebhookTimeoutError(
                f"waited {budget:g} s for a free call slot (max_concurrency = {endpoint.settings.max_concurrency}); "
                "nothing was sent",
                timeout=budget,
                endpoint=endpoint.name,
                url=endpoint.http.safe_url,
            )
            error.endpoint_failure = False
            raise error from None
    else:
        await slots.acquire()  # a free slot: taken without suspending
    waited = time.monotonic() - waiting
    observer.queue_wait(endpoint.name, waited)
    try:
        return await client.post(http, body, webhook_id=webhook_id, timeout=budget - waited, headers=headers)
    except WebhookTimeoutError as exc:
        if queued:
            # It had only what our own queue left of its budget: no verdict on the endpoint.
            exc.endpoint_failure = False
        raise
    finally:
        slots.release()


def _log_call(
    endpoint: str,
    event: str,
    webhook_id: str,
    request: bytes | BodySource,
    label: str,
    response: WebhookResponse | None,
) -> None:
    """The debug line of one call: the request's size and start, and the start of the answer's body."""
    fields: dict[str, object] = {"endpoint": endpoint, "event": event, "webhook_id": webhook_id}
    fields |= {"request_bytes": len(request), "outcome": label}
    if isinstance(request, bytes):  # a streamed eom body is not read again for the log
        fields["request"] = body_preview(request, _DEBUG_BODY_BYTES)
    if response is not None:
        fields |= {"status": response.status, "response": body_preview(response.body, _DEBUG_BODY_BYTES)}
    log.debug("webhook %s at %s: %s", endpoint, event, label, extra={"fields": fields})
