"""Token buckets for client messages and failed logins (no I/O, injectable clock)."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["KeyedThrottle", "TokenBucket"]


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

    def available(self) -> float:
        """Return the tokens in the bucket now (refilling it first)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        return self._tokens

    def allow(self) -> bool:
        if self.available() >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class KeyedThrottle:
    """A token bucket per key (a client address), for failures only, in bounded memory.

    ``allowed(key)`` tells whether ``key`` still has a token; ``failed(key)``
    spends one. At most ``max_keys`` buckets are kept: the least recently
    failed key is forgotten first (an attacker with many addresses only
    forgets old ones, it never grows the table).
    """

    __slots__ = ("_buckets", "_clock", "burst", "max_keys", "per_minute")

    def __init__(
        self, burst: int, per_minute: float, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst = burst
        self.per_minute = per_minute
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def allowed(self, key: str) -> bool:
        bucket = self._buckets.get(key)
        return bucket is None or bucket.available() >= 1.0

    def failed(self, key: str) -> None:
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = TokenBucket(self.burst, self.per_minute, self._clock)
            if len(self._buckets) >= self.max_keys:
                del self._buckets[next(iter(self._buckets))]
        self._buckets[key] = bucket  # most recent last
        bucket.allow()
