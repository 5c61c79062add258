"""The metric series the bridge keeps outside prometheus_client's objects, and their naming.

``Metrics`` (metrics.py) is what the bridge calls. The series touched for every webhook call
live here as plain dicts exported by collectors at scrape time (no prometheus_client locks or
objects per call); so do the breaker states and the sessions' event counts, which are read from
their owners when scraped.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from typing import Final, Generic, TypeVar

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from milterbridge.milter.constants import Event

log = logging.getLogger("milterbridge.metrics")

PREFIX: Final = "milterbridge_"
#: Every breaker state is exported for every endpoint (1 for the current one), so a query can
#: select ``state="open"`` without knowing which series exist.
BREAKER_STATES: Final = ("closed", "open", "half_open")
#: Webhook durations: 1 ms (a local filter) to 30 s (the longest sensible endpoint timeout).
DURATION_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Returns the breaker state per endpoint name, e.g. ``Dispatcher.breaker_states``.
BreakerSource = Callable[[], Mapping[str, str]]
#: Returns the budget in seconds per (endpoint name, event name), e.g. ``Dispatcher.budgets``.
BudgetSource = Callable[[], Mapping[tuple[str, str], float]]
#: Returns, per MTA Hooks endpoint name, whether its calls have a registration.
RegistrationSource = Callable[[], Mapping[str, bool]]
#: Returns the milter commands received per event name, e.g. ``ServerState.event_counts``.
EventSource = Callable[[], Mapping[Event, int]]


_T = TypeVar("_T")


class SourcedGauge(Generic[_T]):
    """A labelled gauge built at scrape time from a callable source (None: no samples).

    A source that raises costs only its own samples: the rest of the scrape still matters.
    """

    name: str
    documentation: str
    labels: tuple[str, ...]

    def __init__(self) -> None:
        self.source: Callable[[], _T] | None = None

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labels)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        # Present so the registry reserves the name without calling the source at registration.
        return [self._family()]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = self._family()
        source = self.source
        if source is None:
            return [family]
        try:
            self._add(family, source())
        except Exception:
            log.exception("%s source failed", self.name)
            return [self._family()]
        return [family]

    def _add(self, family: GaugeMetricFamily, data: _T) -> None:
        raise NotImplementedError


class BreakerCollector(SourcedGauge[Mapping[str, str]]):
    """``circuit_breaker_state`` from the breaker source (a ``BreakerSource``) at scrape time."""

    name = PREFIX + "circuit_breaker_state"
    documentation = "Circuit breaker state per endpoint: 1 for the current state, 0 for the others."
    labels = ("endpoint", "state")

    def _add(self, family: GaugeMetricFamily, data: Mapping[str, str]) -> None:
        for endpoint, state in sorted(data.items()):
            current = str(state)
            for known in BREAKER_STATES:
                family.add_metric((endpoint, known), 1.0 if known == current else 0.0)
            if current not in BREAKER_STATES:
                family.add_metric((endpoint, current), 1.0)


class BudgetCollector(SourcedGauge[Mapping[tuple[str, str], float]]):
    """``webhook_budget_seconds`` from the budget source (a ``BudgetSource``) at scrape time."""

    name = PREFIX + "webhook_budget_seconds"
    documentation = "Seconds a call to the endpoint may take at the event (timeout or timeouts), per subscribed event."
    labels = ("endpoint", "event")

    def _add(self, family: GaugeMetricFamily, data: Mapping[tuple[str, str], float]) -> None:
        for (endpoint, event), seconds in sorted(data.items()):
            family.add_metric((endpoint, event), float(seconds))


class RegistrationCollector(SourcedGauge[Mapping[str, bool]]):
    """``mta_hooks_registered`` from the registration source (a ``RegistrationSource``) at scrape time."""

    name = PREFIX + "mta_hooks_registered"
    documentation = "1 while the MTA Hooks endpoint has a registration its calls can use, else 0."
    labels = ("endpoint",)

    def _add(self, family: GaugeMetricFamily, data: Mapping[str, bool]) -> None:
        for endpoint, registered in sorted(data.items()):
            family.add_metric((endpoint,), 1.0 if registered else 0.0)


class EventCollector:
    """``events_total`` from the event source (the sessions' own counts), read at scrape time."""

    name: Final = PREFIX + "events"
    documentation: Final = "Milter events received, by event name."

    def __init__(self) -> None:
        self.source: EventSource | None = None

    def describe(self) -> Iterable[CounterMetricFamily]:
        return [CounterMetricFamily(self.name, self.documentation, labels=("event",))]

    def collect(self) -> Iterable[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=("event",))
        if self.source is None:
            return [family]
        try:
            counts = {str(event): count for event, count in self.source().items()}
        except Exception:
            log.exception("event count source failed")
            return [family]
        for event, count in sorted(counts.items()):
            family.add_metric((event,), float(count))
        return [family]


class Tally:
    """What the dict-kept series share: name, help, label names, and when each label set began."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name: Final = name
        self.documentation: Final = documentation
        self.labels: Final = labels
        self._created: dict[tuple[str, ...], float] = {}

    def _family(self) -> Metric:
        raise NotImplementedError

    def describe(self) -> Iterable[Metric]:
        return [self._family()]


class CounterTally(Tally):
    """A labelled counter kept in a plain dict (label values -> count), exported at scrape time.

    ``inc`` is a dict update: no lock and no child object, which matters for the counters every
    webhook call touches. It is exported like prometheus_client's own counters, ``_created``
    (when a label set was first counted) included.
    """

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        super().__init__(name, documentation, labels)
        self.counts: dict[tuple[str, ...], int] = {}

    def inc(self, key: tuple[str, ...]) -> None:
        count = self.counts.get(key)
        if count is None:
            self._created[key] = time.time()
            count = 0
        self.counts[key] = count + 1

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labels)

    def collect(self) -> Iterable[CounterMetricFamily]:
        family = self._family()
        for key, count in sorted(self.counts.items()):
            family.add_metric(key, float(count), created=self._created[key])
        return [family]


class HistogramTally(Tally):
    """A labelled histogram kept in plain lists (per label set: a count per bucket, then the sum).

    ``observe`` is a bisect and two list updates; buckets are made cumulative at scrape time.
    Exported like prometheus_client's histograms: ``_bucket``, ``_count``, ``_sum`` and
    ``_created``.
    """

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> None:
        super().__init__(name, documentation, labels)
        self._bounds: Final = tuple(sorted(buckets))
        # repr() writes bounds below 1e6 as prometheus_client does ("0.001", "1.0"); the
        # DURATION_BUCKETS are (a test compares the two expositions).
        self._le: Final = (*(repr(float(b)) for b in self._bounds), "+Inf")
        self._series: dict[tuple[str, ...], list[float]] = {}

    def observe(self, key: tuple[str, ...], value: float) -> None:
        series = self._series.get(key)
        if series is None:
            self._created[key] = time.time()
            series = self._series[key] = [0.0] * (len(self._le) + 1)
        series[bisect_left(self._bounds, value)] += 1  # the first bucket with value <= le
        series[-1] += value

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labels)

    def collect(self) -> Iterable[HistogramMetricFamily]:
        family = self._family()
        for key, series in sorted(self._series.items()):
            cumulative = 0.0
            buckets = []
            for le, count in zip(self._le, series, strict=False):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(key, buckets, series[-1])
            family.add_sample(self.name + "_created", dict(zip(self.labels, key, strict=True)), self._created[key])
        return [family]


_M = TypeVar("_M", Counter, Histogram)


class Children(Generic[_M]):
    """Label children of one metric, resolved once per label set (a str for one label, else a tuple)."""

    __slots__ = ("_cache", "_metric")

    def __init__(self, metric: _M, preset: Iterable[str | tuple[str, ...]] = ()) -> None:
        self._metric: _M = metric
        self._cache: dict[str | tuple[str, ...], _M] = {}
        # Known label sets are created at once so their series exist (at 0) from the start.
        for key in preset:
            self.get(key)

    def get(self, key: str | tuple[str, ...]) -> _M:
        child = self._cache.get(key)
        if child is None:
            values = (key,) if isinstance(key, str) else key
            child = self._cache[key] = self._metric.labels(*values)
        return child
