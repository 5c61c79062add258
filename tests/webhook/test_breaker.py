"""CircuitBreaker on its own, with an injected clock: rate, minimum calls, window, probes."""

from __future__ import annotations

import pytest

from milterbridge.webhook import BreakerState, CircuitBreaker


class FakeClock:
    """A settable monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _breaker(clock: FakeClock, **settings: float) -> CircuitBreaker:
    return CircuitBreaker(clock=clock, **settings)  # type: ignore[arg-type]


def _state(breaker: CircuitBreaker) -> BreakerState:
    # A call, not the property itself, so that mypy does not keep an earlier assert's narrowing.
    return breaker.state


def _calls(breaker: CircuitBreaker, *, ok: int = 0, failed: int = 0) -> None:
    """Report ``ok`` successes, then ``failed`` failures, each with its own ticket."""
    for _ in range(ok):
        breaker.record_success(breaker.allow())
    for _ in range(failed):
        breaker.record_failure(breaker.allow())


def _open(clock: FakeClock, **settings: float) -> CircuitBreaker:
    """A breaker that one failure opens (min_calls 1)."""
    breaker = _breaker(clock, min_calls=1, **settings)
    _calls(breaker, failed=1)
    assert _state(breaker) is BreakerState.OPEN
    return breaker


def test_rate_under_the_threshold_stays_closed() -> None:
    """40% then 45% failures stay closed at a rate of 0.5; the call that reaches 50% opens."""
    clock = FakeClock()
    breaker = _breaker(clock, failure_rate=0.5, min_calls=10)
    _calls(breaker, ok=6, failed=4)
    assert _state(breaker) is BreakerState.CLOSED
    _calls(breaker, failed=1)  # 5 of 11
    assert _state(breaker) is BreakerState.CLOSED
    _calls(breaker, failed=1)  # 6 of 12
    assert _state(breaker) is BreakerState.OPEN
    assert not breaker.allow()


def test_minimum_calls() -> None:
    """Failures alone do not open the breaker until the window holds min_calls calls."""
    clock = FakeClock()
    breaker = _breaker(clock, failure_rate=0.5, min_calls=20)
    _calls(breaker, failed=19)
    assert _state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    _calls(breaker, failed=1)
    assert _state(breaker) is BreakerState.OPEN


def test_rate_of_one_needs_every_call_to_fail() -> None:
    """At failure_rate 1.0 a single success in the window keeps the breaker closed."""
    clock = FakeClock()
    breaker = _breaker(clock, failure_rate=1.0, min_calls=3)
    _calls(breaker, ok=1, failed=10)
    assert _state(breaker) is BreakerState.CLOSED


def test_window_slides() -> None:
    """Calls older than the window stop counting; those inside it still count."""
    clock = FakeClock()
    slid = _breaker(clock, min_calls=4, window=10.0)
    _calls(slid, failed=3)
    clock.now += 10.0
    _calls(slid, failed=1)  # the first three slid out: 1 call in the window
    assert _state(slid) is BreakerState.CLOSED

    clock.now += 100.0
    kept = _breaker(clock, min_calls=4, window=10.0)
    _calls(kept, failed=3)
    clock.now += 8.5
    _calls(kept, failed=1)  # all four are inside the last 10 s
    assert _state(kept) is BreakerState.OPEN


def test_successes_slide_out_too() -> None:
    """Old successes leave the window, so a later run of failures is judged on its own."""
    clock = FakeClock()
    breaker = _breaker(clock, min_calls=4, window=2.0)
    _calls(breaker, ok=50)
    clock.now += 1.0
    _calls(breaker, failed=4)  # 4 of 54: closed
    assert _state(breaker) is BreakerState.CLOSED
    clock.now += 1.5  # the successes (1.5 buckets older than the failures) slid out
    _calls(breaker, failed=1)  # 5 of 5
    assert _state(breaker) is BreakerState.OPEN


def test_probe_backoff_doubles_up_to_the_reset() -> None:
    """The trial comes after 1 s, then 2, 4, 8 s after each failed one, capped at max_delay."""
    clock = FakeClock()
    breaker = _open(clock, probe_delay=1.0, max_delay=10.0)
    waits = []
    for _ in range(6):
        wait = breaker.probe_delay
        waits.append(wait)
        clock.now += wait - 0.25
        assert _state(breaker) is BreakerState.OPEN
        assert not breaker.allow()
        clock.now += 0.25
        assert _state(breaker) is BreakerState.HALF_OPEN
        trial = breaker.allow()
        assert trial
        breaker.record_failure(trial)
        assert _state(breaker) is BreakerState.OPEN
    assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_successful_trial_closes_and_clears_the_window() -> None:
    """A good trial closes the breaker, forgets the old calls and resets the probe delay."""
    clock = FakeClock()
    breaker = _breaker(clock, min_calls=4, probe_delay=1.0, max_delay=30.0)
    _calls(breaker, ok=2, failed=2)
    assert _state(breaker) is BreakerState.OPEN
    clock.now += 1.0
    breaker.record_failure(breaker.allow())  # a failed trial: the next wait is 2 s
    clock.now += 2.0
    breaker.record_success(breaker.allow())
    assert _state(breaker) is BreakerState.CLOSED
    assert breaker.probe_delay == 1.0
    _calls(breaker, failed=3)  # would open if the four calls before still counted
    assert _state(breaker) is BreakerState.CLOSED
    _calls(breaker, failed=1)
    assert _state(breaker) is BreakerState.OPEN
    assert breaker.probe_delay == 1.0


def test_one_trial_at_a_time_and_a_cancelled_trial_frees_its_slot() -> None:
    """Half-open lets one trial out; releasing it lets the next call be the trial."""
    clock = FakeClock()
    breaker = _open(clock, probe_delay=1.0)
    clock.now += 1.0
    trial = breaker.allow()
    assert trial
    assert not breaker.allow()
    breaker.release(trial)
    second = breaker.allow()
    assert second
    assert not breaker.allow()
    breaker.record_success(trial)  # the released trial's late answer no longer decides
    assert _state(breaker) is BreakerState.HALF_OPEN
    breaker.record_success(second)
    assert _state(breaker) is BreakerState.CLOSED


def test_a_trial_that_never_reports_stops_blocking() -> None:
    """A trial with no result blocks other trials only for max_delay."""
    clock = FakeClock()
    breaker = _open(clock, probe_delay=1.0, max_delay=5.0)
    clock.now += 1.0
    assert breaker.allow()
    clock.now += 4.5
    assert not breaker.allow()
    clock.now += 0.5
    assert breaker.allow()


def test_calls_from_before_the_opening_do_not_count() -> None:
    """Results of calls admitted while closed neither close an open breaker nor lengthen its wait."""
    clock = FakeClock()
    breaker = _breaker(clock, min_calls=2, probe_delay=1.0)
    in_flight = [breaker.allow() for _ in range(5)]
    breaker.record_failure(in_flight[0])
    breaker.record_failure(in_flight[1])
    assert _state(breaker) is BreakerState.OPEN
    breaker.record_success(in_flight[2])
    assert _state(breaker) is BreakerState.OPEN
    breaker.record_failure(in_flight[3])
    assert breaker.probe_delay == 1.0
    clock.now += 1.0
    trial = breaker.allow()
    breaker.record_failure(in_flight[4])  # a late one during the trial
    assert breaker.probe_delay == 1.0
    breaker.record_success(trial)
    assert _state(breaker) is BreakerState.CLOSED


def test_min_calls_zero_disables_the_breaker() -> None:
    """With min_calls 0 nothing is counted and every call goes out."""
    clock = FakeClock()
    breaker = _breaker(clock, min_calls=0)
    _calls(breaker, failed=1000)
    assert breaker.allow()
    assert _state(breaker) is BreakerState.CLOSED


@pytest.mark.parametrize(
    "settings",
    [
        {"failure_rate": 0.0},
        {"failure_rate": 1.5},
        {"min_calls": -1},
        {"window": 0.0},
        {"probe_delay": 0.0},
        {"max_delay": -1.0},
    ],
    ids=lambda s: next(iter(s)),
)
def test_invalid_settings_are_refused(settings: dict[str, float]) -> None:
    """Out-of-range settings raise ValueError instead of building a breaker that never works."""
    with pytest.raises(ValueError, match=next(iter(settings))):
        _breaker(FakeClock(), **settings)
