"""A per-endpoint circuit breaker (design.md §3.5).

States, as a table of what happens on each input::

    state      allow()                                  success   failure
    closed     yes                                      count=0   count+1; at the threshold -> open
    open       no, until reset_timeout has passed;      closed    stays open
               then -> half_open and this call is the trial
    half_open  yes for one trial call at a time         closed    open (the reset timer restarts)

``revoke_success`` turns the last success into a failure (the caller found the answer invalid).

An endpoint that keeps failing is not called while the breaker is open: its ``on_error``
applies at once, which spares the MTA a timeout per message. A trial whose caller is cancelled
gives its slot back (``release``); a trial that never reports (a bug) stops blocking after
another ``reset_timeout``. A threshold of 0 disables the breaker.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(enum.StrEnum):
    """Breaker states; the values are the metrics label."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Consecutive-failure circuit breaker with a half-open trial; ``clock`` is injectable."""

    __slots__ = (
        "_clock",
        "_failures",
        "_failures_before_success",
        "_opened_at",
        "_reset_timeout",
        "_state",
        "_state_before_success",
        "_threshold",
        "_trial_started",
    )

    def __init__(
        self,
        *,
        failure_threshold: int,
        reset_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 0:
            raise ValueError(f"failure_threshold must be >= 0, got {failure_threshold}")
        if reset_timeout < 0:
            raise ValueError(f"reset_timeout must be >= 0, got {reset_timeout}")
        self._threshold = failure_threshold
        self._reset_timeout = reset_timeout
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_started: float | None = None
        self._failures_before_success = 0
        self._state_before_success = BreakerState.CLOSED

    @property
    def state(self) -> BreakerState:
        """The state as metrics should see it (open turns half_open once the reset time passed)."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self._reset_timeout:
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def consecutive_failures(self) -> int:
        """Failures since the last success."""
        return self._failures

    def allow(self) -> bool:
        """Whether a call may go out now; in half_open, a True makes the caller the trial."""
        state = self._state
        if state is BreakerState.CLOSED:
            return True
        now = self._clock()
        if state is BreakerState.OPEN:
            if now - self._opened_at < self._reset_timeout:
                return False
            self._state = BreakerState.HALF_OPEN
        elif self._trial_started is not None and now - self._trial_started < self._reset_timeout:
            return False  # half_open with a trial already out
        self._trial_started = now
        return True

    def record_success(self) -> None:
        """A call succeeded: close (any success is evidence the endpoint works)."""
        self._failures_before_success = self._failures
        self._state_before_success = self._state
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._trial_started = None

    def record_failure(self) -> None:
        """A call failed: count it, and open at the threshold (or at once after a failed trial)."""
        self._failures += 1
        if self._threshold == 0:
            return
        if self._state is BreakerState.HALF_OPEN or (
            self._state is BreakerState.CLOSED and self._failures >= self._threshold
        ):
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
            self._trial_started = None

    def revoke_success(self) -> None:
        """The last success turned out to be a failure (e.g. an invalid decision body).

        Restores the count the success reset and records a failure, so an endpoint that
        answers 200 with garbage opens the breaker like one that answers 500. With calls in
        flight concurrently "the last success" is approximate, which is good enough here.
        """
        self._failures = self._failures_before_success
        if self._state is BreakerState.CLOSED:
            self._state = self._state_before_success
        self.record_failure()

    def release(self) -> None:
        """A call ended without a verdict (cancelled by the caller): free the trial slot."""
        self._trial_started = None
