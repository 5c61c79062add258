"""Prometheus metrics: one ``Metrics`` object per process, with its own registry.

The connection, the server and the dispatcher call plain methods on it (``message("accepted")``,
``webhook("policy", "eom", "ok", 0.012)``); none of them touches prometheus_client. The calls sit
on the hot path, so label children are resolved once and kept in dicts keyed by the label values:
after the first call for a label set, a call is a dict lookup and an ``inc``. The series touched
for every webhook call (``webhook_requests_total``,
``webhook_request_duration_seconds``, ``decisions_total``) skip prometheus_client's objects (and
their locks) altogether: plain dicts, exported by collectors at scrape time. The bridge calls
them from its event loop only.

Names follow style.md §3 (``milterbridge_<noun>_<unit>``, counters end in ``_total``, durations in
``_seconds``). Label values are bounded by construction: endpoint names from the config, the fixed
event names, actions, modes and outcomes. Addresses, queue ids and URLs never become labels.

The registry is private (never prometheus_client's global ``REGISTRY``), so several ``Metrics``
can live in one process, as the tests do. Circuit breaker states are not pushed: a collector asks
a callable (normally ``Dispatcher.breaker_states``) at scrape time, and the milter events
received are counted by the sessions themselves and read the same way
(``ServerState.event_counts``).

Counters also expose prometheus_client's ``_created`` samples; the switch that removes them
(``prometheus_client.disable_created_metrics``) is process-wide, so it is left to the composition root.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    generate_latest,
)

import milterbridge
from milterbridge.metric_series import (
    BREAKER_STATES,
    DURATION_BUCKETS,
    PREFIX,
    BreakerCollector,
    BreakerSource,
    BudgetCollector,
    BudgetSource,
    Children,
    CounterTally,
    EventCollector,
    EventSource,
    HistogramTally,
    RegistrationCollector,
    RegistrationSource,
)
from milterbridge.milter.context import Limit

__all__ = [
    "PREFIX",
    "MESSAGE_OUTCOMES",
    "WEBHOOK_OUTCOMES",
    "BREAKER_STATES",
    "REFUSAL_REASONS",
    "TIMEOUT_STAGES",
    "DURATION_BUCKETS",
    "BreakerSource",
    "BudgetSource",
    "RegistrationSource",
    "EventSource",
    "Metrics",
]

log = logging.getLogger(__name__)

#: How a message ended (``messages_total{outcome}``).
MESSAGE_OUTCOMES: Final = ("accepted", "rejected", "tempfailed", "discarded", "quarantined", "aborted")
#: How one webhook call ended (``webhook_requests_total{outcome}``); the client's ``AttemptOutcome``
#: values plus ``invalid_decision``, which only the dispatcher can tell.
WEBHOOK_OUTCOMES: Final = (
    "ok",
    "timeout",
    "connection_error",
    "tls_error",
    "status_error",
    "redirect",
    "too_large",
    "invalid_body",
    "invalid_decision",
    "breaker_open",
    "not_registered",
    "cancelled",
)
#: Why a connection was closed at accept (``connections_refused_total{reason}``); the same
#: strings as ``milterbridge.admission.REFUSAL_REASONS``.
REFUSAL_REASONS: Final = ("not_allowed", "max_connections")
#: Which timeout closed a connection (``connection_timeouts_total{stage}``).
TIMEOUT_STAGES: Final = ("negotiate", "idle")


#: Outcomes of calls that sent no request.
_NO_REQUEST: Final = frozenset({"breaker_open", "not_registered"})


class Metrics:
    """The bridge's metrics and the registry that holds them.

    Every method is cheap and never raises for a label value it has not seen before. The
    object also satisfies the webhook client's ``WebhookObserver`` protocol (``on_attempt``).
    """

    def __init__(self, *, version: str = milterbridge.__version__) -> None:
        self.registry: Final = CollectorRegistry(auto_describe=False)
        registry = self.registry

        self._connections_active = Gauge(
            PREFIX + "connections_active", "Milter connections currently open.", registry=registry
        )
        self._connections = Counter(PREFIX + "connections_total", "Milter connections accepted.", registry=registry)
        self._connections_refused = Children(
            Counter(
                PREFIX + "connections_refused_total",
                "Milter connections closed at accept, by reason (not_allowed, max_connections).",
                ("reason",),
                registry=registry,
            ),
            REFUSAL_REASONS,
        )
        self._connections_over_limit = Counter(
            PREFIX + "connections_over_limit_total",
            "Milter connections accepted over server.max_connections and answered with a tempfail (no webhook).",
            registry=registry,
        )
        self._connection_timeouts = Children(
            Counter(
                PREFIX + "connection_timeouts_total",
                "Milter connections closed by a timeout, by stage (negotiate, idle).",
                ("stage",),
                registry=registry,
            ),
            TIMEOUT_STAGES,
        )
        messages = Counter(PREFIX + "messages_total", "Messages finished, by outcome.", ("outcome",), registry=registry)
        self._messages = Children(messages, MESSAGE_OUTCOMES)
        # Counted in a plain dict (no lock, one dict update per milter command) and
        # exported at scrape time: this is the hottest counter of all.
        self._events = EventCollector()
        registry.register(self._events)
        # Touched by every webhook call: plain dicts, exported at scrape time.
        self._webhook_requests = CounterTally(
            PREFIX + "webhook_requests",
            "Webhook calls, by endpoint, event and outcome (one per call; a retry is inside it).",
            ("endpoint", "event", "outcome"),
        )
        registry.register(self._webhook_requests)
        self._webhook_duration = HistogramTally(
            PREFIX + "webhook_request_duration_seconds",
            "Webhook call duration in seconds, retry included; calls refused by the breaker are not observed.",
            ("endpoint", "event"),
            DURATION_BUCKETS,
        )
        registry.register(self._webhook_duration)
        self._queue_wait = HistogramTally(
            PREFIX + "webhook_queue_wait_seconds",
            "Seconds a webhook call waited for one of its endpoint's max_concurrency slots (endpoints with a cap).",
            ("endpoint",),
            DURATION_BUCKETS,
        )
        registry.register(self._queue_wait)
        self._retries = Children(
            Counter(
                PREFIX + "webhook_retries_total",
                "Webhook requests retried, by endpoint.",
                ("endpoint",),
                registry=registry,
            )
        )
        self._decisions = CounterTally(
            PREFIX + "decisions",
            "Decisions answered by endpoints (observe mode included), by endpoint, event, action and mode.",
            ("endpoint", "event", "action", "mode"),
        )
        registry.register(self._decisions)
        self._breakers = BreakerCollector()
        registry.register(self._breakers)
        self._budgets = BudgetCollector()
        registry.register(self._budgets)
        self._registrations = RegistrationCollector()
        registry.register(self._registrations)
        self._progress = Counter(
            PREFIX + "progress_keepalives_total",
            "Progress keepalives sent to the MTA while a decision was pending.",
            registry=registry,
        )
        self._protocol_errors = Counter(
            PREFIX + "protocol_errors_total", "Milter connections closed for a protocol error.", registry=registry
        )
        self._body_spooled = Counter(
            PREFIX + "body_spooled_total", "Message bodies that were spooled to a temporary file.", registry=registry
        )
        self._body_spool_bytes = Gauge(
            PREFIX + "body_spool_bytes", "Bytes currently held in body spool files.", registry=registry
        )
        self._oversize = Counter(
            PREFIX + "oversize_messages_total",
            "Messages over a per-message limit (server.max_message_bytes, max_headers, ...), by limit.",
            ("limit",),
            registry=registry,
        )
        for limit in Limit:
            self._oversize.labels(limit)
        self._bridge_faults = Counter(
            PREFIX + "bridge_faults_total",
            "Messages or recipients tempfailed by a fault of the bridge itself, by kind (spool, internal).",
            ("kind",),
            registry=registry,
        )
        for kind in ("spool", "internal"):
            self._bridge_faults.labels(kind)
        self._background_dropped = Counter(
            PREFIX + "background_dropped_total",
            "Observe and notification calls dropped because the endpoint's max_background were running.",
            ("endpoint",),
            registry=registry,
        )
        self._modifications_adjusted = Counter(
            PREFIX + "modifications_adjusted_total",
            "Modifications sent other than asked, by endpoint, op and reason "
            "(added_instead: a change_header past the last header of its name, sent as an add).",
            ("endpoint", "op", "reason"),
            registry=registry,
        )
        self._endpoint_skipped = Counter(
            PREFIX + "endpoint_skipped_total",
            "Endpoint calls not made because of the endpoint's when, by endpoint and the condition key that "
            "did not match (once per connection, message or recipient skipped).",
            ("endpoint", "reason"),
            registry=registry,
        )
        reloads = Counter(
            PREFIX + "config_reloads_total",
            "Configuration reloads (SIGHUP), by result: ok or refused.",
            ("result",),
            registry=registry,
        )
        self._reload_ok = reloads.labels("ok")
        self._reload_refused = reloads.labels("refused")
        self._draining = Gauge(
            PREFIX + "draining", "1 while the server drains for shutdown, else 0.", registry=registry
        )
        info = Gauge(PREFIX + "info", "Build information; always 1.", ("version",), registry=registry)
        self._tasks = Gauge(PREFIX + "asyncio_tasks", "asyncio tasks alive in this process.", registry=registry)
        self._buffered = Gauge(
            PREFIX + "buffered_bytes",
            "Bytes all connections hold of server.max_buffered_bytes (headers, recipients, bodies in memory).",
            registry=registry,
        )
        # process_resident_memory_bytes, process_open_fds, process_cpu_seconds_total, ...
        ProcessCollector(registry=registry)
        info.labels(version).set(1)

    # -- connections (server, connection) -----------------------------------------------

    def connection_opened(self) -> None:
        """A milter connection was accepted."""
        self._connections.inc()
        self._connections_active.inc()

    def connection_closed(self) -> None:
        """An accepted milter connection ended (call once per ``connection_opened``)."""
        self._connections_active.dec()

    def connection_refused(self, reason: str) -> None:
        """A connection was closed at accept (``REFUSAL_REASONS``); it counts neither as opened nor as active."""
        self._connections_refused.get(reason).inc()

    def connection_overflow(self) -> None:
        """An accepted connection (already counted as opened) is served over the limit with a tempfail."""
        self._connections_over_limit.inc()

    def connection_timeout(self, stage: str) -> None:
        """A connection was closed by a timeout (``TIMEOUT_STAGES``)."""
        self._connection_timeouts.get(stage).inc()

    def progress(self) -> None:
        """One progress keepalive was sent."""
        self._progress.inc()

    def protocol_error(self) -> None:
        """A connection was closed for a protocol error."""
        self._protocol_errors.inc()

    # -- messages and events (dispatcher) -----------------------------------------------

    def message(self, outcome: str) -> None:
        """A message ended with ``outcome`` (one of ``MESSAGE_OUTCOMES``)."""
        self._messages.get(outcome).inc()

    def webhook(self, endpoint: str, event: str, outcome: str, seconds: float | None) -> None:
        """A webhook call ended; ``seconds`` is its duration, retry included.

        Calls that sent no request (``breaker_open``, ``not_registered``, or ``seconds`` None) are counted but not
        observed in the duration histogram, which would otherwise fill with zeros.
        """
        self._webhook_requests.inc((endpoint, event, outcome))
        if seconds is not None and outcome not in _NO_REQUEST:
            self._webhook_duration.observe((endpoint, event), seconds)

    def decision(self, endpoint: str, event: str, action: str, mode: str) -> None:
        """``endpoint`` answered ``action`` for ``event`` in ``mode`` (enforce or observe)."""
        self._decisions.inc((endpoint, event, action, mode))

    def queue_wait(self, endpoint: str, seconds: float) -> None:
        """A call to ``endpoint`` (which has max_concurrency) waited ``seconds`` for a slot, or gave up then."""
        self._queue_wait.observe((endpoint,), seconds)

    def declare_endpoints(self, names: Iterable[str]) -> None:
        """Start the per-endpoint counters that have no other first sample at 0 for ``names``.

        So that ``webhook_retries_total`` and ``background_dropped_total`` exist from the start
        (a rate or an alert over them then sees the first increase), not from their first event.
        """
        for name in names:
            self._retries.get(name)
            self._background_dropped.labels(name)

    def on_attempt(self, endpoint: str, attempt: int, outcome: str, elapsed: float) -> None:
        """``WebhookObserver``: count retries; the call as a whole is counted by ``webhook``."""
        if attempt > 1:
            self._retries.get(endpoint).inc()

    # -- bodies ---------------------------------------------------------------------------

    def spooled(self, nbytes: int, *, new_file: bool = True) -> None:
        """A body went to a new spool file holding ``nbytes`` (counted in ``body_spooled_total``).

        With ``new_file=False``: ``nbytes`` more were written to a spool file already counted.
        The ``body_spool_bytes`` gauge stays right only if every byte added here is later taken
        away by ``unspooled``.
        """
        if new_file:
            self._body_spooled.inc()
        self._body_spool_bytes.inc(nbytes)

    def unspooled(self, nbytes: int) -> None:
        """A spool file holding ``nbytes`` was closed."""
        self._body_spool_bytes.dec(nbytes)

    def oversize(self, limit: str) -> None:
        """A message went over ``limit`` (a ``[server]`` key, e.g. ``max_headers``)."""
        self._oversize.labels(limit).inc()

    def background_dropped(self, endpoint: str) -> None:
        """An observe or notification call to ``endpoint`` was dropped: max_background were running."""
        self._background_dropped.labels(endpoint).inc()

    def modification_adjusted(self, endpoint: str, op: str, reason: str) -> None:
        """An op of ``endpoint`` went on the wire other than asked (``reason`` an AdjustReason)."""
        self._modifications_adjusted.labels(endpoint, op, reason).inc()

    def endpoint_skipped(self, endpoint: str, reason: str) -> None:
        """``endpoint`` was not called for a connection, message or recipient: its ``when`` key ``reason`` failed."""
        self._endpoint_skipped.labels(endpoint, reason).inc()

    def bridge_fault(self, kind: str) -> None:
        """A fault of the bridge itself (``spool`` I/O, an ``internal`` error) tempfailed a message."""
        self._bridge_faults.labels(kind).inc()

    # -- lifecycle (app) -----------------------------------------------------------------

    def reload(self, ok: bool) -> None:
        """A configuration reload (SIGHUP) was applied, or refused (the running config stays)."""
        (self._reload_ok if ok else self._reload_refused).inc()

    def set_draining(self, draining: bool) -> None:
        """The server started (True) or stopped (False) draining."""
        self._draining.set(1 if draining else 0)

    def set_buffered_source(self, source: Callable[[], float]) -> None:
        """Read the bytes held by all connections from ``source`` at each scrape."""
        self._buffered.set_function(source)

    def set_task_source(self, source: Callable[[], float]) -> None:
        """Read the number of live asyncio tasks from ``source`` at each scrape."""
        self._tasks.set_function(source)

    def set_event_source(self, source: EventSource | None) -> None:
        """Where ``events_total`` reads the milter events received, at scrape time."""
        self._events.source = source

    def set_breaker_source(self, source: BreakerSource | None) -> None:
        """Read breaker states from ``source`` at each scrape (None: export none)."""
        self._breakers.source = source

    def set_budget_source(self, source: BudgetSource | None) -> None:
        """Read the endpoints' budgets per event from ``source`` at each scrape (None: export none)."""
        self._budgets.source = source

    def set_registration_source(self, source: RegistrationSource | None) -> None:
        """Read whether each MTA Hooks endpoint has a registration from ``source`` at each scrape."""
        self._registrations.source = source

    # -- exposition ---------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The registry in the Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
