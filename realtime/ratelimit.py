"""A token bucket for client messages (no I/O, injectable clock)."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """Allow bursts of ``burst`` messages, refilled at ``per_minute`` messages a minute.

    ``allow()`` returns False once the bucket is empty; the caller decides what
    to do (the worker closes the connection with 1008).
    """

    __slots__ = ("_clock", "_rate", "_stamp", "_tokens", "burst")

    def __init__(self, burst: int, per_minute: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self._rate = per_minute / 60.0
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def allow(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
