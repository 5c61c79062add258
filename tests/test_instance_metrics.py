"""Summing the workers' metrics pages (instance_metrics.WorkerSum), without processes."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from milterbridge.instance_metrics import WORKERS_METRIC, Page, WorkerSum, parse_page
from milterbridge.metrics import Metrics


def page(messages: int = 0, *, active: int = 0, draining: bool = False, seconds: tuple[float, ...] = ()) -> Page:
    """A worker's real page after ``messages`` accepted messages and the given gauges."""
    metrics = Metrics()
    for _ in range(messages):
        metrics.message("accepted")
    for _ in range(active):
        metrics.connection_opened()
    for value in seconds:
        metrics.webhook("policy", "eom", "ok", value)
    metrics.set_draining(draining)
    return parse_page(metrics.render()[0].decode())


class Registry:
    """Renders a WorkerSum the way the instance view does, and reads samples back."""

    def __init__(self, total: WorkerSum) -> None:
        self.total = total

    def samples(self, answered: list[int]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        families = self.total.families(answered)

        class Collected:
            def collect(self):  # type: ignore[no-untyped-def]
                return families

        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collected())  # type: ignore[arg-type]
        text = generate_latest(registry).decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


ACCEPTED = ("milterbridge_messages_total", (("outcome", "accepted"),))
ACTIVE = ("milterbridge_connections_active", ())
DRAINING = ("milterbridge_draining", ())


def test_counters_and_gauges_are_summed_over_the_workers():
    total = WorkerSum(2)
    total.update(0, 100, page(3, active=2))
    total.update(1, 101, page(4, active=1))
    samples = Registry(total).samples([0, 1])
    assert samples[ACCEPTED] == 7
    assert samples[ACTIVE] == 3
    assert samples[(WORKERS_METRIC, (("state", "up"),))] == 2
    assert samples[(WORKERS_METRIC, (("state", "down"),))] == 0


def test_histograms_are_summed_bucket_by_bucket():
    total = WorkerSum(2)
    total.update(0, 100, page(seconds=(0.002, 0.2)))
    total.update(1, 101, page(seconds=(0.002,)))
    samples = Registry(total).samples([0, 1])
    labels = (("endpoint", "policy"), ("event", "eom"))
    assert samples[("milterbridge_webhook_request_duration_seconds_count", labels)] == 3
    assert samples[("milterbridge_webhook_request_duration_seconds_bucket", (*labels, ("le", "0.0025")))] == 2
    assert samples[("milterbridge_webhook_request_duration_seconds_sum", labels)] == pytest.approx(0.204)


def test_created_samples_are_left_out():
    text = Metrics().render()[0].decode()
    assert "milterbridge_messages_created" in text
    assert not [name for name in parse_page(text) if name.endswith("_created")]


def test_a_worker_that_does_not_answer_keeps_its_counts_but_not_its_gauges():
    total = WorkerSum(2)
    total.update(0, 100, page(3, active=2))
    total.update(1, 101, page(4, active=1))
    samples = Registry(total).samples([1])
    assert samples[ACCEPTED] == 7
    assert samples[ACTIVE] == 1
    assert samples[(WORKERS_METRIC, (("state", "down"),))] == 1


def test_a_restarted_worker_adds_to_what_its_predecessor_counted():
    total = WorkerSum(2)
    total.update(0, 100, page(3))
    total.update(1, 101, page(4))
    total.update(1, 202, page(0))  # a new process in slot 1
    assert Registry(total).samples([0, 1])[ACCEPTED] == 7
    total.update(1, 202, page(2))
    assert Registry(total).samples([0, 1])[ACCEPTED] == 9
    total.update(1, 303, page(1))  # and another
    assert Registry(total).samples([0, 1])[ACCEPTED] == 10


def test_gauge_rules():
    """The draining flag is the largest, the start time the earliest; the rest is summed."""
    total = WorkerSum(2)
    first, second = page(draining=True), page()
    first["process_start_time_seconds"].samples[("process_start_time_seconds", ())] = 50.0
    second["process_start_time_seconds"].samples[("process_start_time_seconds", ())] = 40.0
    total.update(0, 100, first)
    total.update(1, 101, second)
    samples = Registry(total).samples([0, 1])
    assert samples[DRAINING] == 1
    assert samples[("process_start_time_seconds", ())] == 40.0
    assert samples[("milterbridge_info", (("version", samples_version(samples)),))] == 1


def samples_version(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> str:
    (version,) = [dict(labels)["version"] for name, labels in samples if name == "milterbridge_info"]
    return version


@functools.cache
def counted_page(messages: int) -> Page:
    """``page(messages)``, built once per count (WorkerSum never changes a page it is given)."""
    return page(messages)


# (worker, restarted?, messages counted since the last read)
steps = st.lists(st.tuples(st.integers(0, 2), st.booleans(), st.integers(0, 5)), max_size=30)


@given(steps)
def test_the_sum_never_goes_back_and_counts_every_read_message_once(history):
    """Whatever the order of reads and restarts, the sum is what every process counted, and never falls."""
    total = WorkerSum(3)
    pids = [1, 2, 3]
    counted = [0, 0, 0]  # of the current process in each slot
    finished = 0  # counted by processes that were replaced
    last = 0.0
    next_pid = 10
    for worker, restarted, more in history:
        if restarted:
            finished += counted[worker]
            counted[worker] = 0
            pids[worker] = next_pid
            next_pid += 1
        counted[worker] += more
        total.update(worker, pids[worker], counted_page(counted[worker]))
        now = Registry(total).samples([0, 1, 2]).get(ACCEPTED, 0.0)
        assert now >= last
        assert now == finished + sum(counted)
        last = now
