"""The metrics of one instance: every worker's page summed into one (no I/O here).

Under ``milterbridge serve --workers N`` each worker counts in its own process. The instance
view (``instance.InstancePages``) reads every worker's page and hands the text here;
``WorkerSum`` keeps what it needs across scrapes and renders the sum:

- Counters and histograms are summed over the workers. A worker's last page is kept, so a
  worker that does not answer (it died, or is being restarted) still counts what it had
  counted when it was last read, and when a new process takes its place, the old one's
  counts move into a retired total. The sum never goes back and never counts a process twice.
- Gauges are read from the workers that answered this scrape only, and summed, except for
  ``GAUGE_RULES``: the earliest start time, the smallest fd limit, the largest flag.
- ``_created`` samples are left out: a sum over processes that started at different times
  has no single creation time.
- ``milterbridge_workers{state}``: how many workers answered this scrape (``up``) and how
  many did not (``down``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["GAUGE_RULES", "WORKERS_METRIC", "Page", "WorkerSum", "parse_page"]

#: A sample: its name and its labels in sorted order.
SampleKey = tuple[str, tuple[tuple[str, str], ...]]

#: Gauges not summed over the workers, and how they are combined instead.
GAUGE_RULES: Final[Mapping[str, Callable[[Iterable[float]], float]]] = {
    "process_start_time_seconds": min,
    "process_max_fds": min,
    "milterbridge_draining": max,
    "milterbridge_info": max,
    "milterbridge_webhook_budget_seconds": max,  # the same in every worker, but for a reload in flight
    "milterbridge_mta_hooks_registered": min,  # registered only when every worker has it
}
#: Types whose samples only grow in one process: summed, and kept for workers that are gone.
_CUMULATIVE: Final = frozenset({"counter", "histogram"})
#: How many workers answered the scrape (up) or not (down).
WORKERS_METRIC: Final = "milterbridge_workers"


@dataclass(slots=True)
class Family:
    """One metric family of a page: its type and help, and its samples in page order."""

    name: str
    type: str
    documentation: str
    samples: dict[SampleKey, float] = field(default_factory=dict)


#: A parsed page: family name -> family, in page order.
Page = dict[str, Family]


def parse_page(text: str) -> Page:
    """Parse a Prometheus text page, leaving out the ``_created`` families of counters and histograms.

    Raises:
        ValueError: the text is not in the Prometheus text format.
    """
    families: Page = {}
    for metric in text_string_to_metric_families(text):
        family = Family(metric.name, metric.type, metric.documentation)
        for sample in metric.samples:
            family.samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        families[metric.name] = family
    for name in list(families):
        base = families.get(name.removesuffix("_created"))
        if name.endswith("_created") and base is not None and base.type in _CUMULATIVE:
            del families[name]
    return families


def _cumulative(page: Page) -> Page:
    """The counters and histograms of ``page``."""
    return {name: family for name, family in page.items() if family.type in _CUMULATIVE}


class WorkerSum:
    """The instance's sum, kept across scrapes; fed one ``update`` per worker read."""

    def __init__(self, workers: int) -> None:
        self.workers: Final = workers
        #: worker index -> (pid, its last page)
        self._last: dict[int, tuple[int, Page]] = {}
        #: What processes that were replaced had counted.
        self._retired: Page = {}

    def update(self, index: int, pid: int, page: Page) -> None:
        """Worker ``index`` answered as process ``pid`` with ``page``."""
        previous = self._last.get(index)
        if previous is not None and previous[0] != pid:
            self._retire(previous[1])
        self._last[index] = (pid, page)

    def _retire(self, page: Page) -> None:
        for name, family in _cumulative(page).items():
            kept = self._retired.setdefault(name, Family(name, family.type, family.documentation))
            for key, value in family.samples.items():
                kept.samples[key] = kept.samples.get(key, 0.0) + value

    def families(self, answered: Iterable[int]) -> list[Metric]:
        """The summed families; ``answered`` are the workers read for this scrape."""
        live = set(answered)
        merged: dict[str, Family] = {}
        gauges: dict[str, dict[SampleKey, list[float]]] = {}

        pages = [page for _, page in self._last.values()]
        for page in [*pages, self._retired]:  # the families in page order
            for name, family in page.items():
                merged.setdefault(name, Family(name, family.type, family.documentation))
        for page in [*pages, self._retired]:
            for name, family in _cumulative(page).items():
                into = merged[name].samples
                for key, value in family.samples.items():
                    into[key] = into.get(key, 0.0) + value
        for index, (_, page) in sorted(self._last.items()):
            if index not in live:
                continue
            for name, family in page.items():
                if family.type in _CUMULATIVE:
                    continue
                for key, value in family.samples.items():
                    gauges.setdefault(name, {}).setdefault(key, []).append(value)
        for name, samples in gauges.items():
            combine = GAUGE_RULES.get(name, sum)
            merged[name].samples = {key: combine(values) for key, values in samples.items()}
        up = len(live & set(range(self.workers)))
        help_text = "Workers of this instance that answered the scrape (up) or not (down)."
        workers = Family(WORKERS_METRIC, "gauge", help_text)
        workers.samples = {
            (WORKERS_METRIC, (("state", "up"),)): float(up),
            (WORKERS_METRIC, (("state", "down"),)): float(self.workers - up),
        }
        merged[WORKERS_METRIC] = workers
        return [_metric(family) for family in merged.values()]


def _metric(family: Family) -> Metric:
    metric = Metric(family.name, family.documentation, family.type)
    for (name, labels), value in family.samples.items():
        metric.add_sample(name, dict(labels), value)
    return metric
