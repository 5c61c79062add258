"""Benchmark results: the value types, the printed tables, the target ratios and the plot."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench.profiles import MIB, PROFILES

#: Concurrency at which the issue's throughput and CPU targets are read.
RATIO_CONCURRENCY = 16
#: Above this busy fraction of its core, the load generator, not the target, limits throughput.
SATURATED = 0.9
#: The 50 MiB target: peak RSS must stay under 2 x body_memory_bytes + this.
PEAK_RSS_ALLOWANCE_BYTES = 60 * MIB


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepPoint:
    """One target at one concurrency level of a throughput profile."""

    profile: str
    target: str
    concurrency: int
    messages: int
    errors: int
    elapsed_seconds: float
    messages_per_second: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    #: CPU time of the milter process (and its children) per message, µs.
    cpu_us_per_message: float
    #: The bridge's endpoint process, µs per message (None for the references).
    endpoint_cpu_us_per_message: float | None
    rss_bytes: int
    peak_rss_bytes: int
    #: Busy fraction of the load generator's core: the load generator, plus the
    #: endpoint when it shares that core (near 1.0: throughput is a lower bound).
    loadgen_busy: float
    #: Busy fraction of the milter's core (CPU time of the milter over the run).
    milter_busy: float
    error_samples: tuple[str, ...] = ()


def median_point(rounds: Sequence[SweepPoint]) -> SweepPoint:
    """One point from the same point measured in several rounds: each figure is the median.

    Counts (messages, errors) and the elapsed time are summed; RSS is the largest seen.
    """
    first = rounds[0]
    if len(rounds) == 1:
        return first

    def med(values: Iterable[float]) -> float:
        return statistics.median(values)

    endpoint = [p.endpoint_cpu_us_per_message for p in rounds if p.endpoint_cpu_us_per_message is not None]
    return replace(
        first,
        messages=sum(p.messages for p in rounds),
        errors=sum(p.errors for p in rounds),
        elapsed_seconds=sum(p.elapsed_seconds for p in rounds),
        messages_per_second=med(p.messages_per_second for p in rounds),
        p50_ms=med(p.p50_ms for p in rounds),
        p90_ms=med(p.p90_ms for p in rounds),
        p99_ms=med(p.p99_ms for p in rounds),
        cpu_us_per_message=med(p.cpu_us_per_message for p in rounds),
        endpoint_cpu_us_per_message=med(endpoint) if endpoint else None,
        rss_bytes=max(p.rss_bytes for p in rounds),
        peak_rss_bytes=max(p.peak_rss_bytes for p in rounds),
        loadgen_busy=med(p.loadgen_busy for p in rounds),
        milter_busy=med(p.milter_busy for p in rounds),
        error_samples=tuple(sample for p in rounds for sample in p.error_samples)[:5],
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class IdlePoint:
    """RSS of a target before and after opening many idle milter connections."""

    target: str
    connections: int
    rss_before_bytes: int
    rss_after_bytes: int
    error: str | None = None

    @property
    def delta_bytes(self) -> int:
        return self.rss_after_bytes - self.rss_before_bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class SinglePoint:
    """One big message through a fresh target: its peak RSS."""

    target: str
    body_bytes: int
    peak_rss_before_bytes: int
    peak_rss_bytes: int
    seconds: float
    errors: int
    error_samples: tuple[str, ...] = ()
    #: The target's body_memory_bytes (the bridge only): sets the peak RSS budget.
    body_memory_bytes: int | None = None

    @property
    def budget_bytes(self) -> int | None:
        if self.body_memory_bytes is None:
            return None
        return 2 * self.body_memory_bytes + PEAK_RSS_ALLOWANCE_BYTES


@dataclass(slots=True, kw_only=True)
class Results:
    """Everything one run measured, plus what could not be measured and why."""

    header: dict[str, str] = field(default_factory=dict)
    sweeps: list[SweepPoint] = field(default_factory=list)
    idle: list[IdlePoint] = field(default_factory=list)
    single: list[SinglePoint] = field(default_factory=list)
    #: (profile, target) -> why it did not run (not installed, failed to start).
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        """Any error in a measured point, or a target that failed (not merely not installed)."""
        if any(p.errors for p in self.sweeps) or any(p.errors for p in self.single):
            return True
        if any(p.error for p in self.idle):
            return True
        return any(not reason.startswith("not installed") for reason in self.skipped.values())

    def sweep(self, profile: str, target: str, concurrency: int) -> SweepPoint | None:
        for point in self.sweeps:
            if (point.profile, point.target, point.concurrency) == (profile, target, concurrency):
                return point
        return None

    def to_json(self) -> str:
        data = {
            "header": self.header,
            "sweeps": [asdict(p) for p in self.sweeps],
            "idle": [asdict(p) | {"delta_bytes": p.delta_bytes} for p in self.idle],
            "single": [asdict(p) | {"budget_bytes": p.budget_bytes} for p in self.single],
            "skipped": self.skipped,
            "targets": [line for line in target_lines(self)],
        }
        return json.dumps(data, indent=2)


# ------------------------------------------------------------------ tables


def _mib(n: int) -> str:
    return f"{n / MIB:.1f}"


def sweep_table(points: Sequence[SweepPoint]) -> list[str]:
    head = (
        f"  {'target':<12} {'conc':>5} {'msg/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
        f"{'CPU µs/msg':>11} {'endpt µs/msg':>12} {'RSS MiB':>8} {'peak MiB':>9} {'errors':>7} "
        f"{'gen core':>9} {'milter core':>12}"
    )
    lines = [head]
    for p in points:
        endpoint = f"{p.endpoint_cpu_us_per_message:.0f}" if p.endpoint_cpu_us_per_message is not None else "-"
        mark = "*" if p.loadgen_busy >= SATURATED else " "
        lines.append(
            f"  {p.target:<12} {p.concurrency:>5} {p.messages_per_second:>7.0f}{mark} {p.p50_ms:>8.2f} "
            f"{p.p90_ms:>8.2f} {p.p99_ms:>8.2f} {p.cpu_us_per_message:>11.0f} {endpoint:>12} {_mib(p.rss_bytes):>8} "
            f"{_mib(p.peak_rss_bytes):>9} {p.errors:>7} {p.loadgen_busy:>9.0%} {p.milter_busy:>12.0%}"
        )
    if any(p.loadgen_busy >= SATURATED for p in points):
        lines.append(
            f"  * the load generator's core was at least {SATURATED:.0%} busy: that throughput is a lower bound "
            "(CPU µs/msg is still exact)"
        )
    return lines


def idle_table(points: Sequence[IdlePoint]) -> list[str]:
    lines = [
        f"  {'target':<12} {'conns':>6} {'RSS before MiB':>15} {'RSS after MiB':>14} {'delta MiB':>10} {'KiB/conn':>9}"
    ]
    for p in points:
        if p.error:
            lines.append(f"  {p.target:<12} error: {p.error}")
            continue
        per_conn = p.delta_bytes / 1024 / p.connections if p.connections else 0.0
        lines.append(
            f"  {p.target:<12} {p.connections:>6} {_mib(p.rss_before_bytes):>15} {_mib(p.rss_after_bytes):>14} "
            f"{_mib(p.delta_bytes):>10} {per_conn:>9.1f}"
        )
    return lines


def single_table(points: Sequence[SinglePoint]) -> list[str]:
    lines = [f"  {'target':<12} {'body MiB':>9} {'peak before MiB':>16} {'peak MiB':>9} {'seconds':>8} {'errors':>7}"]
    for p in points:
        lines.append(
            f"  {p.target:<12} {_mib(p.body_bytes):>9} {_mib(p.peak_rss_before_bytes):>16} {_mib(p.peak_rss_bytes):>9} "
            f"{p.seconds:>8.2f} {p.errors:>7}"
        )
    return lines


def render(results: Results) -> str:
    """The whole printed report: header, one table per profile, skips, errors, targets."""
    out = [f"{k}: {v}" for k, v in results.header.items()]
    for key, profile in PROFILES.items():
        sweeps = [p for p in results.sweeps if p.profile == key]
        idle = [p for p in results.idle] if key == "d" else []
        single = [p for p in results.single] if key == "e" else []
        skipped = {k: v for k, v in results.skipped.items() if k.startswith(f"({key}) ")}
        if not (sweeps or idle or single or skipped):
            continue
        out.append("")
        out.append(f"({key}) {profile.title}")
        if sweeps:
            out.extend(sweep_table(sweeps))
        if idle:
            out.extend(idle_table(idle))
        if single:
            out.extend(single_table(single))
        for name, reason in skipped.items():
            out.append(f"  {name.split(' ', 1)[1]}: skipped: {reason}")
    errors = [(p.profile, p.target, p.concurrency, s) for p in results.sweeps for s in p.error_samples]
    errors += [("e", p.target, 1, s) for p in results.single for s in p.error_samples]
    if errors:
        out.append("")
        out.append("Errors (samples)")
        out.extend(f"  ({prof}) {target} at {conc}: {text}" for prof, target, conc, text in errors[:20])
    out.append("")
    out.append("Targets")
    out.extend("  " + line for line in target_lines(results))
    return "\n".join(out)


# ------------------------------------------------------------------ targets


def _ratio_concurrency(results: Results, profile: str) -> int | None:
    """16 when it was run, else the closest concurrency that was."""
    levels = sorted({p.concurrency for p in results.sweeps if p.profile == profile})
    if not levels:
        return None
    return min(levels, key=lambda c: (abs(c - RATIO_CONCURRENCY), -c))


def _ratio(results: Results, profile: str, what: str, target: str, reference: str, conc: int | None) -> str:
    label = f"({profile}) {what} {target} / {reference}"
    if conc is None:
        return f"{label}: n/a (profile not run)"
    a, b = results.sweep(profile, target, conc), results.sweep(profile, reference, conc)
    missing = [name for name, p in ((target, a), (reference, b)) if p is None]
    if missing or a is None or b is None:
        return f"{label} at {conc} concurrent: n/a ({', '.join(missing)} not run)"
    if what == "throughput":
        x, y, unit = a.messages_per_second, b.messages_per_second, "msg/s"
    else:
        x, y, unit = a.cpu_us_per_message, b.cpu_us_per_message, "µs/msg"
    ratio = f"{x / y:.2f}x" if y else "n/a"
    return f"{label} at {conc} concurrent: {ratio} ({x:.0f} vs {y:.0f} {unit})"


def target_lines(results: Results) -> Iterable[str]:
    """The ratios the issue asks for, each on one line, 'n/a' with the reason when unmeasured."""
    conc_a = _ratio_concurrency(results, "a")
    for reference in ("pymilter-all", "pymilter"):
        yield _ratio(results, "a", "throughput", "bridge", reference, conc_a)
        yield _ratio(results, "a", "CPU/msg", "bridge", reference, conc_a)
    yield _ratio(results, "a", "CPU/msg", "bridge", "minimal-all", conc_a)
    conc_b = _ratio_concurrency(results, "b")
    yield _ratio(results, "b", "throughput", "bridge", "minimal", conc_b)
    yield _ratio(results, "b", "CPU/msg", "bridge", "minimal", conc_b)
    conc_c = _ratio_concurrency(results, "c")
    yield _ratio(results, "c", "throughput", "bridge", "pymilter", conc_c)
    yield _ratio(results, "c", "CPU/msg", "bridge", "pymilter", conc_c)
    yield _latency_line(results)
    yield from _idle_lines(results)
    yield from _single_lines(results)


def _latency_line(results: Results) -> str:
    # The issue compares with our minimal in-process milter (asking for the same events).
    label = "(a) p99 latency at 1 concurrent, bridge - minimal"
    a, b = results.sweep("a", "bridge", 1), results.sweep("a", "minimal", 1)
    if a is None or b is None:
        missing = [n for n, p in (("bridge", a), ("minimal", b)) if p is None]
        return f"{label}: n/a ({', '.join(missing)} not run at 1 concurrent)"
    return f"{label}: {a.p99_ms - b.p99_ms:+.2f} ms ({a.p99_ms:.2f} vs {b.p99_ms:.2f} ms)"


def _idle_lines(results: Results) -> Iterable[str]:
    if not results.idle:
        yield "(d) idle connections RSS delta: n/a (profile not run)"
        return
    for p in results.idle:
        if p.error:
            yield f"(d) {p.connections} idle connections RSS delta, {p.target}: n/a ({p.error})"
        else:
            yield (
                f"(d) {p.connections} idle connections RSS delta, {p.target}: {_mib(p.delta_bytes)} MiB "
                f"({p.delta_bytes / 1024 / max(p.connections, 1):.1f} KiB per connection)"
            )


def _single_lines(results: Results) -> Iterable[str]:
    bridge = [p for p in results.single if p.target == "bridge"]
    if not bridge:
        yield "(e) big message peak RSS vs 2 x body_memory_bytes + 60 MiB: n/a (bridge not run)"
    for p in bridge:
        budget = p.budget_bytes
        if p.errors:
            verdict = "n/a (the message failed)"
        elif budget is None:
            verdict = "n/a (no body_memory_bytes)"
        else:
            verdict = "within" if p.peak_rss_bytes <= budget else "OVER"
        budget_text = f"{_mib(budget)} MiB" if budget is not None else "?"
        yield (
            f"(e) {_mib(p.body_bytes)} MiB message peak RSS, bridge: {_mib(p.peak_rss_bytes)} MiB vs budget "
            f"{budget_text} (2 x body_memory_bytes + 60 MiB): {verdict}"
        )
    for p in results.single:
        if p.target != "bridge":
            yield f"(e) {_mib(p.body_bytes)} MiB message peak RSS, {p.target} (reference): {_mib(p.peak_rss_bytes)} MiB"


# ------------------------------------------------------------------ plot


def plot(results: Results, path: Path) -> str | None:
    """Throughput vs concurrency, one panel per sweep profile; returns why not, or None when written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or the 'bench' extra)"
    profiles = [k for k in PROFILES if any(p.profile == k for p in results.sweeps)]
    if not profiles:
        return "no throughput profile was run"
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    targets = list(dict.fromkeys(p.target for p in results.sweeps))
    # One colour per target across every panel.
    colours = {t: f"C{n}" for n, t in enumerate(targets)}
    fig, axes = plt.subplots(1, len(profiles), figsize=(5.5 * len(profiles), 4.2), squeeze=False)
    for ax, key in zip(axes[0], profiles, strict=True):
        points = [p for p in results.sweeps if p.profile == key]
        for target in targets:
            series = sorted((p.concurrency, p.messages_per_second) for p in points if p.target == target)
            if series:
                ax.plot([c for c, _ in series], [v for _, v in series], marker="o", label=target, color=colours[target])
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sorted({p.concurrency for p in points})))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("concurrent milter connections")
        ax.set_ylabel("messages/s")
        ax.set_title(f"({key}) {PROFILES[key].title}", fontsize=9)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    machine = results.header.get("machine", "")
    fig.suptitle(f"milterbridge benchmark: throughput vs concurrency  {machine}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
