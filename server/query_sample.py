"""A bounded sample of a collection's recent search queries, in its home space, for tuning.

An ``auto`` collection's search parameters are tuned on the whole index (``advisor_auto.py``). Its
stored vectors are the only queries it has at first, and they are the easy case: a stored vector's
neighbours are its own cluster, while real queries often fall between clusters (another model's
query side, questions against answers). Measured on 20k clustered 32-d vectors in HNSW32: stored
vectors reach Recall@10 0.99 at efSearch 10, queries drawn further from the clusters 0.78, and need
efSearch 96 for 0.95. So every ``auto`` collection keeps the last :data:`CAPACITY` query vectors
its searches saw (every :data:`EVERY`-th search call, up to :data:`ROWS_PER_CALL` of its rows, as
the index sees them before the basis: after the route's transform, normalized for cosine), and the
tuning pass searches them once it has :data:`MIN_QUERIES`.

The sample lives in memory only: a restart starts a new one (the tuning falls back to stored
vectors until it refills). Covered by ``tests/test_advisor.py``.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["CAPACITY", "EVERY", "MIN_QUERIES", "ROWS_PER_CALL", "QuerySample"]

CAPACITY = 1000  #: most recent query vectors kept
EVERY = 16  #: one search call in this many is sampled
ROWS_PER_CALL = 64  #: most rows taken from one sampled call (a batch)
MIN_QUERIES = 500  #: fewest sampled queries the tuning pass searches (else stored vectors)


class QuerySample:
    """The last ``capacity`` query vectors of dimension ``d`` offered, in a ring buffer.

    :meth:`offer` is called by every search call (it counts them and keeps one in ``every``);
    :meth:`add` keeps rows unconditionally (the serial path counts its calls itself).
    """

    def __init__(self, d: int, capacity: int = CAPACITY, every: int = EVERY) -> None:
        if d < 1 or capacity < 1 or every < 1:
            raise ValueError(f"d, capacity and every must be >= 1 (got {d}, {capacity}, {every})")
        self.d, self.capacity, self.every = d, capacity, every
        self._x = np.empty((0, d), dtype=np.float32)  # grown to capacity on first use
        self._pos = 0  #: next row to write
        self._filled = 0
        self.added = 0  #: rows added since start (more than it holds once the ring has wrapped)
        self._calls = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._filled

    def offer(self, xq: np.ndarray) -> None:
        """Counts one search call of queries ``xq`` (nq, d) and keeps up to ``ROWS_PER_CALL`` of its
        rows if it is the ``every``-th (not thread-exact: a lost count only moves the sampling)."""
        self._calls += 1
        if self._calls % self.every == 0:
            self.add(xq)

    def add(self, xq: np.ndarray) -> None:
        """Keeps the first ``ROWS_PER_CALL`` rows of ``xq``, shape (nq, d) or (d,) float32 (copied);
        rows of another dimension are ignored."""
        x = xq.reshape(-1, xq.shape[-1])[:ROWS_PER_CALL]
        if x.shape[1] != self.d:
            return
        with self._lock:
            if len(self._x) < self.capacity:
                self._x = np.empty((self.capacity, self.d), dtype=np.float32)
            m = min(len(x), self.capacity)
            end = self._pos + m
            if end <= self.capacity:
                self._x[self._pos : end] = x[:m]
            else:
                split = self.capacity - self._pos
                self._x[self._pos :] = x[:split]
                self._x[: m - split] = x[split:m]
            self._pos = end % self.capacity
            self._filled = min(self.capacity, self._filled + m)
            self.added += m

    def take(self) -> np.ndarray:
        """A copy of the kept queries, shape (len(self), d) float32."""
        with self._lock:
            return self._x[: self._filled].copy()
