"""A per-endpoint circuit breaker that judges the endpoint's failure rate (design.md §3.5, §3.7).

The breaker counts the calls of the last ``window`` seconds in ten time buckets (memory stays
the same whatever the traffic) and opens when at least ``min_calls`` calls were made in that
window and at least ``failure_rate`` of them failed. A short burst of failures, such as the
refused connections of a bridge that starts a moment before its endpoint, stays under
``min_calls`` and opens nothing.

States, as a table of what happens on each input::

    state      allow()                                    success              failure
    closed     yes                                        counted              counted; over the rate -> open
    open       no, until the probe delay has passed;      -                    -
               then -> half_open and this call is the trial
    half_open  yes for one trial call at a time           closed, window       open again, probe delay
                                                          cleared              doubled (at most max_delay)

The first probe delay after opening is ``probe_delay``; each failed trial doubles it up to
``max_delay``; closing resets it. While open, the endpoint's ``on_error`` applies at once,
which spares the MTA a timeout per message.

``allow()`` hands out a ticket (0 means refused) that the caller gives back with its result.
Tickets from before the last change of state are stale and ignored, so calls that were in
flight when the breaker opened do not extend the backoff, and only the trial's own result
decides whether it closes. A trial whose caller is cancelled gives its slot back
(``release``); a trial that never reports (a bug) stops blocking after ``max_delay``.
``min_calls = 0`` disables the breaker.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from typing import Final

__all__ = ["BreakerState", "CircuitBreaker"]

#: Time buckets per window: the window slides in steps of a tenth of its length.
BUCKETS: Final = 10


class BreakerState(enum.StrEnum):
    """Breaker states; the values are the metrics label."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Failure-rate circuit breaker over a sliding window, with backed-off half-open trials.

    ``clock`` (monotonic seconds) is injectable for tests.
    """

    __slots__ = (
        "_calls",
        "_clock",
        "_delay",
        "_failure_rate",
        "_failures",
        "_max_delay",
        "_min_calls",
        "_opened_at",
        "_probe_delay",
        "_state",
        "_tick",
        "_ticket",
        "_total_calls",
        "_total_failures",
        "_trial_started",
        "_width",
    )

    def __init__(
        self,
        *,
        failure_rate: float = 0.5,
        min_calls: int = 20,
        window: float = 10.0,
        probe_delay: float = 1.0,
        max_delay: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < failure_rate <= 1:
            raise ValueError(f"failure_rate must be in (0, 1], got {failure_rate}")
        if min_calls < 0:
            raise ValueError(f"min_calls must be >= 0, got {min_calls}")
        for name, value in (("window", window), ("probe_delay", probe_delay), ("max_delay", max_delay)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self._failure_rate = failure_rate
        self._min_calls = min_calls
        self._width = window / BUCKETS
        self._probe_delay = probe_delay
        self._max_delay = max_delay
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._calls = [0] * BUCKETS
        self._failures = [0] * BUCKETS
        self._tick = 0
        self._total_calls = 0
        self._total_failures = 0
        #: The ticket of the current state; starts at 1 because 0 means "refused".
        self._ticket = 1
        self._opened_at = 0.0
        self._delay = min(probe_delay, max_delay)
        self._trial_started: float | None = None

    @property
    def state(self) -> BreakerState:
        """The state as metrics should see it (open turns half_open once the probe delay passed)."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self._delay:
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def probe_delay(self) -> float:
        """Seconds the breaker waits, once open, before its next trial call."""
        return self._delay

    def allow(self) -> int:
        """A ticket for a call that may go out now, or 0 when refused.

        In half_open a ticket makes the caller the trial. Give the ticket back with
        ``record_success``, ``record_failure`` or ``release``.
        """
        state = self._state
        if state is BreakerState.CLOSED:
            return self._ticket
        now = self._clock()
        if state is BreakerState.OPEN:
            if now - self._opened_at < self._delay:
                return 0
            self._state = BreakerState.HALF_OPEN
        elif self._trial_started is not None and now - self._trial_started < self._max_delay:
            return 0  # half_open with a trial already out
        # A new ticket: the result of an earlier trial that never reported no longer counts.
        self._ticket += 1
        self._trial_started = now
        return self._ticket

    def record_success(self, ticket: int) -> None:
        """The call with ``ticket`` succeeded: count it, or close after a successful trial."""
        if ticket != self._ticket or not self._min_calls:
            return
        if self._state is BreakerState.CLOSED:
            slot = self._slot()
            self._calls[slot] += 1
            self._total_calls += 1
            return
        # The trial worked: start afresh, so the failures that opened the breaker are forgotten.
        self._state = BreakerState.CLOSED
        self._clear()
        self._delay = min(self._probe_delay, self._max_delay)
        self._trial_started = None

    def record_failure(self, ticket: int) -> None:
        """The call with ``ticket`` failed: count it and open over the rate, or reopen after a trial."""
        if ticket != self._ticket or not self._min_calls:
            return
        if self._state is BreakerState.CLOSED:
            slot = self._slot()
            self._calls[slot] += 1
            self._failures[slot] += 1
            self._total_calls += 1
            self._total_failures += 1
            calls = self._total_calls
            if calls >= self._min_calls and self._total_failures / calls >= self._failure_rate:
                self._open(self._delay)
            return
        self._open(min(self._delay * 2, self._max_delay))

    def release(self, ticket: int) -> None:
        """The call with ``ticket`` ended without a verdict (cancelled, or not the endpoint's doing).

        It is not counted; a trial gives its slot back, so the next call becomes the trial.
        """
        if ticket == self._ticket and self._state is BreakerState.HALF_OPEN:
            self._trial_started = None

    def _open(self, delay: float) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._delay = delay
        self._trial_started = None
        self._ticket += 1  # calls still in flight report to a breaker that moved on

    def _slot(self) -> int:
        """The bucket of now, after dropping the buckets that slid out of the window."""
        tick = int(self._clock() / self._width)
        if tick > self._tick:
            if tick - self._tick >= BUCKETS:
                self._clear()
            else:
                for old in range(self._tick + 1, tick + 1):
                    slot = old % BUCKETS
                    self._total_calls -= self._calls[slot]
                    self._total_failures -= self._failures[slot]
                    self._calls[slot] = self._failures[slot] = 0
            self._tick = tick
        return self._tick % BUCKETS

    def _clear(self) -> None:
        self._calls = [0] * BUCKETS
        self._failures = [0] * BUCKETS
        self._total_calls = self._total_failures = 0
