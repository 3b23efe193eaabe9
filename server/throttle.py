"""Per-caller caps: a token bucket per API key, and open-stream slots per caller and overall.

:class:`RateLimiter` refills ``per_second`` tokens per key up to ``burst``; a call
without a token raises :class:`~.errors.RateLimited` with the seconds until the next
one. :class:`StreamSlots` bounds the streaming calls open at once (each holds a
worker thread): four idle ``SearchStream`` calls once took every worker of a
2-core server, so unary calls timed out. Covered by ``tests/test_hardening.py`` and
``tests/test_security.py``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

from .config import RateLimit
from .errors import RateLimited, ResourceExhausted

__all__ = ["RateLimiter", "StreamSlots"]


class RateLimiter:
    """Token buckets by key name; ``take(name, rate)`` spends one token or raises RateLimited."""

    def __init__(self, default: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.default = default
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)

    def take(self, name: str, per_second: float | None = None) -> None:
        rate = self.default.per_second if per_second is None else per_second
        if rate <= 0:
            return
        burst = float(self.default.burst or max(1.0, rate))
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.get(name, (burst, now))
            tokens = min(burst, tokens + (now - at) * rate)
            if tokens < 1.0:
                self._buckets[name] = (tokens, now)
                wait = (1.0 - tokens) / rate
                raise RateLimited(f"key {name!r} is over its rate limit of {rate:g} calls/s", retry_after=wait)
            self._buckets[name] = (tokens - 1.0, now)


class StreamSlots:
    """Counts open streams per caller and overall; ``acquire`` raises ResourceExhausted over a cap."""

    def __init__(self, total: int, per_caller: int) -> None:
        self.total, self.per_caller = total, per_caller
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()
        self._count = 0

    def acquire(self, caller: str) -> None:
        with self._lock:
            if self._count >= self.total:
                raise ResourceExhausted(f"{self._count} streams are open, the server's cap; retry later")
            if self._open[caller] >= self.per_caller:
                raise ResourceExhausted(
                    f"this client has {self._open[caller]} streams open, the cap per client; close one first"
                )
            self._open[caller] += 1
            self._count += 1

    def release(self, caller: str) -> None:
        with self._lock:
            self._open[caller] -= 1
            if self._open[caller] <= 0:
                del self._open[caller]
            self._count -= 1

    @property
    def open(self) -> int:
        return self._count
