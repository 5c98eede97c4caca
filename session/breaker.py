"""A circuit breaker that lets the session store skip a failing Redis for a while."""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["CircuitBreaker"]


class CircuitBreaker:
    """Open after `threshold` consecutive failures; allow a probe again after `cooldown`.

    While open, `allow()` is False and a read goes straight to PostgreSQL, so
    a Redis that is down costs reads one timeout per burst, not one per call.
    The store never lets it stop a write's cache update: the breaker only
    guesses that Redis is still down, and may be wrong for a cool-down.
    After the cool-down every caller may probe; one more failure opens it
    again, one success closes it. Thread-safe.
    """

    def __init__(self, *, threshold: int, cooldown: float, clock: Callable[[], float]) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be >= 1, not {threshold!r}")
        if cooldown < 0:
            raise ValueError(f"cooldown must be >= 0, not {cooldown!r}")
        self._threshold = threshold
        self._cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0  # consecutive failures, the current burst
        self._opened_at: float | None = None

    @property
    def is_open(self) -> bool:
        """Return True while calls are being skipped."""
        return not self.allow()

    def allow(self) -> bool:
        """Return True if a call may go to Redis now."""
        if self._opened_at is None:
            # Closed: no lock on the hot path. A call racing the opening may still
            # go to Redis, as one that ran a moment earlier would have.
            return True
        with self._lock:
            if self._opened_at is None:
                return True
            elapsed = self._clock() - self._opened_at
            # A clock that went backwards must not keep the breaker open for ever.
            return elapsed >= self._cooldown or elapsed < 0

    def record_failure(self) -> bool:
        """Count a failure; return True if it is the first of a burst (log that one)."""
        with self._lock:
            self._failures += 1
            if self._failures >= self._threshold:
                self._opened_at = self._clock()
            return self._failures == 1

    def record_success(self) -> int:
        """Close the breaker; return how many failures the burst that just ended had."""
        if self._failures == 0 and self._opened_at is None:
            return 0  # closed, nothing to reset: no lock on every successful call
        with self._lock:
            failures = self._failures
            self._failures = 0
            self._opened_at = None
            return failures
