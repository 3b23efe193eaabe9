"""Failed index builds: why a collection cannot be served, and when to try building again.

A collection whose index cannot be built is marked failed instead of taking the
process down or retrying in a tight loop (``IVF4,PQ48`` with 10 points once failed
training every 0.1 s: 202 tracebacks in 22 s). :class:`BuildFailures` holds the
current :class:`Failure` and the back-off: a failed build is retried after 1 s,
2 s, 4 s ... up to 5 min, or 1 s after the failure once new writes arrive (new
data may make it trainable); a *permanent* failure (the collection could not be
opened) is never retried. Covered by ``tests/test_index_safety.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["RETRY_FIRST_SECONDS", "RETRY_MAX_SECONDS", "BuildFailures", "Failure"]

RETRY_FIRST_SECONDS = 1.0  #: a failed build is retried after this long, doubling at each failure...
RETRY_MAX_SECONDS = 300.0  #: ...up to this; new writes bring the retry forward to RETRY_FIRST_SECONDS


@dataclass(frozen=True)
class Failure:
    """Why a collection's index cannot be served."""

    reason: str
    at: float  #: server time of the failure, seconds since the Unix epoch
    permanent: bool  #: the collection could not be opened: every point RPC fails, nothing is retried


class BuildFailures:
    """The current failure of one collection's index build (None: healthy) and its back-off."""

    def __init__(self) -> None:
        self.current: Failure | None = None
        self._count = 0  # consecutive failures
        self._failed_at = self._retry_at = 0.0  # time.monotonic() of the last failure and of its retry
        self._sequence = 0  # the collection's last write sequence at the last failure

    def fail(self, reason: str, *, permanent: bool, sequence: int) -> float:
        """Records a failure; returns the seconds until a retry (without new writes)."""
        self._count += 1
        delay = min(RETRY_FIRST_SECONDS * 2.0 ** (self._count - 1), RETRY_MAX_SECONDS)
        self._failed_at = time.monotonic()
        self._retry_at, self._sequence = self._failed_at + delay, sequence
        self.current = Failure(reason, time.time(), permanent)
        return delay

    def clear(self) -> None:
        """The build succeeded."""
        self.current, self._count = None, 0

    def may_build(self, sequence: int) -> bool:
        """False while a failed build waits for its retry; ``sequence`` is the collection's last write."""
        f = self.current
        if f is None:
            return True
        if f.permanent:
            return False
        now = time.monotonic()
        if sequence != self._sequence:
            return now >= min(self._retry_at, self._failed_at + RETRY_FIRST_SECONDS)
        return now >= self._retry_at
