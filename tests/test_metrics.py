"""Metrics: values move with the calls, labels stay bounded, the exposition parses."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

import milterbridge
from milterbridge.metrics import BREAKER_STATES, DURATION_BUCKETS, MESSAGE_OUTCOMES, Metrics
from milterbridge.milter.constants import Event
from milterbridge.webhook.client import WebhookObserver
from milterbridge.webhook.errors import AttemptOutcome


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_connections_gauge_and_counters(metrics):
    """Opened/closed move the active gauge; refused counts apart from accepted."""
    metrics.connection_opened()
    metrics.connection_opened()
    metrics.connection_closed()
    metrics.connection_refused("max_connections")
    assert value(metrics, "milterbridge_connections_active") == 1
    assert value(metrics, "milterbridge_connections_total") == 2
    assert value(metrics, "milterbridge_connections_refused_total", reason="max_connections") == 1


def test_message_outcomes_exist_at_zero_and_count(metrics):
    """Every message outcome is exported from the start; message() counts its own."""
    for outcome in MESSAGE_OUTCOMES:
        assert value(metrics, "milterbridge_messages_total", outcome=outcome) == 0
    metrics.message("accepted")
    metrics.message("accepted")
    metrics.message("quarantined")
    assert value(metrics, "milterbridge_messages_total", outcome="accepted") == 2
    assert value(metrics, "milterbridge_messages_total", outcome="quarantined") == 1
    assert value(metrics, "milterbridge_messages_total", outcome="rejected") == 0


def test_events_read_from_the_source_at_scrape_time(metrics):
    """events_total exports what the event source counts, read at each scrape."""
    counts = {Event.CONNECT: 1, Event.RCPT: 2}
    assert value(metrics, "milterbridge_events_total", event="rcpt") is None  # no source yet
    metrics.set_event_source(lambda: counts)
    assert value(metrics, "milterbridge_events_total", event="rcpt") == 2
    assert value(metrics, "milterbridge_events_total", event="connect") == 1
    assert value(metrics, "milterbridge_events_total", event="helo") is None
    counts[Event.EOM] = 3
    assert value(metrics, "milterbridge_events_total", event="eom") == 3


def test_a_failing_event_source_does_not_break_the_scrape(metrics):
    """A source that raises leaves events_total empty; the other series are still exported."""

    def broken() -> dict[str, int]:
        raise RuntimeError("boom")

    metrics.set_event_source(broken)
    metrics.message("accepted")
    assert value(metrics, "milterbridge_events_total", event="rcpt") is None
    assert value(metrics, "milterbridge_messages_total", outcome="accepted") == 1


def test_webhook_counts_and_observes_duration(metrics):
    """webhook() counts per endpoint/event/outcome and observes the duration."""
    metrics.webhook("policy", "eom", "ok", 0.004)
    metrics.webhook("policy", "eom", "timeout", 5.0)
    metrics.webhook("policy", "rcpt", "ok", 0.002)
    assert value(metrics, "milterbridge_webhook_requests_total", endpoint="policy", event="eom", outcome="ok") == 1
    assert value(metrics, "milterbridge_webhook_requests_total", endpoint="policy", event="eom", outcome="timeout") == 1
    count = "milterbridge_webhook_request_duration_seconds_count"
    assert value(metrics, count, endpoint="policy", event="eom") == 2
    assert value(metrics, "milterbridge_webhook_request_duration_seconds_sum", endpoint="policy", event="eom") == (
        pytest.approx(5.004)
    )
    bucket = "milterbridge_webhook_request_duration_seconds_bucket"
    assert value(metrics, bucket, endpoint="policy", event="eom", le="0.005") == 1
    assert value(metrics, bucket, endpoint="policy", event="eom", le="0.001") == 0
    assert value(metrics, bucket, endpoint="policy", event="eom", le="30.0") == 2


def test_webhook_series_match_prometheus_clients_own_counter_and_histogram(metrics):
    """The dict-kept webhook and decision series export exactly what prometheus_client's would.

    Values on a bucket bound count in that bucket (``le``), values above the last one only in
    ``+Inf``; ``_created`` is there for every series.
    """
    registry = CollectorRegistry(auto_describe=False)
    requests = Counter("milterbridge_webhook_requests_total", "x", ("endpoint", "event", "outcome"), registry=registry)
    duration = Histogram(
        "milterbridge_webhook_request_duration_seconds",
        "x",
        ("endpoint", "event"),
        buckets=DURATION_BUCKETS,
        registry=registry,
    )
    decisions = Counter("milterbridge_decisions_total", "x", ("endpoint", "event", "action", "mode"), registry=registry)
    calls = [
        ("a", "eom", "ok", 0.001),
        ("a", "eom", "ok", 0.0011),
        ("a", "rcpt", "timeout", 31.0),
        ("b", "eom", "ok", 0.0),
    ]
    for endpoint, event, outcome, seconds in calls:
        metrics.webhook(endpoint, event, outcome, seconds)
        metrics.decision(endpoint, event, "continue", "enforce")
        requests.labels(endpoint, event, outcome).inc()
        duration.labels(endpoint, event).observe(seconds)
        decisions.labels(endpoint, event, "continue", "enforce").inc()

    def samples(
        families: Iterable[Metric], names: tuple[str, ...]
    ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): (1.0 if s.name.endswith("_created") else s.value)
            for family in families
            if family.name in names
            for s in family.samples
        }

    names = ("milterbridge_webhook_requests", "milterbridge_webhook_request_duration_seconds", "milterbridge_decisions")
    ours = samples(text_string_to_metric_families(metrics.render()[0].decode()), names)
    reference = samples(text_string_to_metric_families(generate_latest(registry).decode()), names)
    assert ours == reference
    assert (
        value(metrics, "milterbridge_webhook_request_duration_seconds_bucket", endpoint="a", event="eom", le="0.001")
        == 1
    )
    assert (
        value(metrics, "milterbridge_webhook_request_duration_seconds_bucket", endpoint="a", event="rcpt", le="+Inf")
        == 1
    )
    assert (
        value(metrics, "milterbridge_webhook_request_duration_seconds_bucket", endpoint="a", event="rcpt", le="30.0")
        == 0
    )


def test_breaker_open_is_counted_but_not_timed(metrics):
    """A call the breaker refused sent nothing, so it adds no duration sample."""
    metrics.webhook("policy", "eom", "breaker_open", 0.0)
    metrics.webhook("policy", "eom", "ok", None)
    outcome = "breaker_open"
    assert value(metrics, "milterbridge_webhook_requests_total", endpoint="policy", event="eom", outcome=outcome) == 1
    assert value(metrics, "milterbridge_webhook_request_duration_seconds_count", endpoint="policy", event="eom") is None


def test_decisions(metrics):
    """decision() counts per endpoint/event/action/mode."""
    metrics.decision("policy", "eom", "reject", "enforce")
    metrics.decision("audit", "eom", "reject", "observe")
    metrics.decision("audit", "eom", "reject", "observe")
    labels = {"endpoint": "audit", "event": "eom", "action": "reject"}
    assert value(metrics, "milterbridge_decisions_total", mode="observe", **labels) == 2
    assert value(metrics, "milterbridge_decisions_total", mode="enforce", **labels) is None


def test_on_attempt_counts_only_retries(metrics):
    """As the webhook client's observer, only second attempts count (as retries)."""
    observer: WebhookObserver = metrics
    observer.on_attempt("policy", 0, AttemptOutcome.BREAKER_OPEN, 0.0)
    observer.on_attempt("policy", 1, AttemptOutcome.CONNECTION_ERROR, 0.01)
    observer.on_attempt("policy", 2, AttemptOutcome.OK, 0.02)
    assert value(metrics, "milterbridge_webhook_retries_total", endpoint="policy") == 1
    assert value(metrics, "milterbridge_webhook_requests_total", endpoint="policy", event="eom", outcome="ok") is None


def test_enum_and_str_labels_share_a_series(metrics):
    """An AttemptOutcome and its string value land in the same series."""
    metrics.webhook("policy", "eom", AttemptOutcome.TIMEOUT, 1.0)
    metrics.webhook("policy", "eom", "timeout", 1.0)
    assert value(metrics, "milterbridge_webhook_requests_total", endpoint="policy", event="eom", outcome="timeout") == 2


def test_simple_counters_and_gauges(metrics):
    """progress, protocol errors, spooling, oversize, reloads, draining and info."""
    metrics.progress()
    metrics.progress()
    metrics.protocol_error()
    metrics.spooled(1000)
    metrics.spooled(500, new_file=False)
    metrics.spooled(200, new_file=True)
    metrics.unspooled(1500)
    metrics.oversize("max_headers")
    metrics.reload(True)
    metrics.reload(False)
    metrics.reload(False)
    metrics.set_draining(True)
    assert value(metrics, "milterbridge_progress_keepalives_total") == 2
    assert value(metrics, "milterbridge_protocol_errors_total") == 1
    assert value(metrics, "milterbridge_body_spooled_total") == 2
    assert value(metrics, "milterbridge_body_spool_bytes") == 200
    assert value(metrics, "milterbridge_oversize_messages_total", limit="max_headers") == 1
    assert value(metrics, "milterbridge_config_reloads_total", result="ok") == 1
    assert value(metrics, "milterbridge_config_reloads_total", result="refused") == 2
    assert value(metrics, "milterbridge_draining") == 1
    metrics.set_draining(False)
    assert value(metrics, "milterbridge_draining") == 0
    assert value(metrics, "milterbridge_info", version=milterbridge.__version__) == 1


def test_breaker_collector_follows_the_source(metrics):
    """circuit_breaker_state is read from the callable at every scrape."""
    states = {"policy": "closed", "audit": "open"}
    metrics.set_breaker_source(lambda: states)
    for state in BREAKER_STATES:
        expected = 1 if state == "open" else 0
        assert value(metrics, "milterbridge_circuit_breaker_state", endpoint="audit", state=state) == expected
    assert value(metrics, "milterbridge_circuit_breaker_state", endpoint="policy", state="closed") == 1
    states["audit"] = "half_open"
    assert value(metrics, "milterbridge_circuit_breaker_state", endpoint="audit", state="half_open") == 1
    assert value(metrics, "milterbridge_circuit_breaker_state", endpoint="audit", state="open") == 0
    metrics.set_breaker_source(None)
    assert value(metrics, "milterbridge_circuit_breaker_state", endpoint="audit", state="open") is None


def test_breaker_source_failure_does_not_break_the_scrape(metrics, caplog):
    """A source that raises yields no breaker series, but the rest still renders."""

    def broken() -> dict[str, str]:
        raise RuntimeError("boom")

    metrics.set_breaker_source(broken)
    metrics.message("accepted")
    body, _ = metrics.render()
    assert b'milterbridge_messages_total{outcome="accepted"} 1.0' in body
    assert b"milterbridge_circuit_breaker_state{" not in body
    assert "milterbridge_circuit_breaker_state source failed" in caplog.text


def test_budget_collector_follows_the_source(metrics):
    """webhook_budget_seconds is read from the callable at every scrape; a failing source costs only it."""
    budgets = {("policy", "eom"): 5.0, ("policy", "rcpt"): 2.0}
    metrics.set_budget_source(lambda: budgets)
    assert value(metrics, "milterbridge_webhook_budget_seconds", endpoint="policy", event="eom") == 5.0
    budgets[("policy", "eom")] = 8.0
    assert value(metrics, "milterbridge_webhook_budget_seconds", endpoint="policy", event="eom") == 8.0

    def broken() -> dict[tuple[str, str], float]:
        raise RuntimeError("boom")

    metrics.set_budget_source(broken)
    assert value(metrics, "milterbridge_webhook_budget_seconds", endpoint="policy", event="eom") is None
    assert value(metrics, "milterbridge_info", version=milterbridge.__version__) == 1


def test_render_parses_as_prometheus_text(metrics):
    """render() gives text that the Prometheus parser reads back, with all our families."""
    metrics.set_breaker_source(lambda: {"policy": "closed"})
    metrics.webhook("policy", "eom", "ok", 0.01)
    metrics.decision("policy", "eom", "accept", "enforce")
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    # The parser strips _total from counter family names.
    expected = {
        "milterbridge_connections_active",
        "milterbridge_connections",
        "milterbridge_connections_refused",
        "milterbridge_messages",
        "milterbridge_webhook_requests",
        "milterbridge_webhook_request_duration_seconds",
        "milterbridge_decisions",
        "milterbridge_circuit_breaker_state",
        "milterbridge_progress_keepalives",
        "milterbridge_protocol_errors",
        "milterbridge_body_spooled",
        "milterbridge_body_spool_bytes",
        "milterbridge_oversize_messages",
        "milterbridge_config_reloads",
        "milterbridge_draining",
        "milterbridge_info",
    }
    assert expected <= set(families)
    assert all(name.startswith(("milterbridge_", "process_")) for name in families)
    assert "process_resident_memory_bytes" in families
    assert families["milterbridge_webhook_request_duration_seconds"].type == "histogram"


def test_registries_are_private():
    """Two Metrics do not share series, and the global registry stays untouched."""
    first, second = Metrics(), Metrics()
    first.message("accepted")
    assert value(first, "milterbridge_messages_total", outcome="accepted") == 1
    assert value(second, "milterbridge_messages_total", outcome="accepted") == 0
    assert REGISTRY.get_sample_value("milterbridge_messages_total", {"outcome": "accepted"}) is None


def test_declared_endpoints_start_their_counters_at_zero(metrics):
    """Retries and dropped background calls exist at 0 for a declared endpoint, before any happened."""
    assert value(metrics, "milterbridge_webhook_retries_total", endpoint="policy") is None
    metrics.declare_endpoints(["policy"])
    assert value(metrics, "milterbridge_webhook_retries_total", endpoint="policy") == 0
    assert value(metrics, "milterbridge_background_dropped_total", endpoint="policy") == 0
    metrics.on_attempt("policy", 2, "ok", 0.01)
    assert value(metrics, "milterbridge_webhook_retries_total", endpoint="policy") == 1
