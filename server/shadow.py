"""Shadow searches: a route's candidate transform run beside the live one, off the reply path.

A route with a shadow (``Routes.set_shadow``) mirrors a sampled fraction of its live query
batches here: the same checked :class:`~.pipeline.Query` runs through the same
:func:`~.pipeline.run` with the candidate's transform instead of the live one (so the
collection's basis applies to both), on one background thread, and the top-k agreement of each
query with the live reply is exported (``interlingua_shadow_agreement``) with the time it took
(``interlingua_shadow_seconds``). At most ``SHADOW_QUEUE_MAX`` batches wait; beyond that new
ones are dropped rather than queued. Covered by ``tests/test_pipeline.py`` and
``tests/test_routes.py``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np

from .errors import InvalidArgument
from .metrics import Metrics
from .pipeline import Query, run

__all__ = ["SHADOW_QUEUE_MAX", "ShadowRunner"]

log = logging.getLogger(__name__)
SHADOW_QUEUE_MAX = 64  #: pending shadow batches beyond which new ones are dropped


class ShadowRunner:
    def __init__(self, metrics: Metrics, omp_threads: int = 1) -> None:
        self.metrics = metrics
        set_omp, omp = faiss.omp_set_num_threads, (omp_threads,)
        self._pool = ThreadPoolExecutor(1, "interlingua-shadow", initializer=set_omp, initargs=omp)
        self._slots = threading.BoundedSemaphore(SHADOW_QUEUE_MAX)
        self._rng = random.Random(0)

    def close(self) -> None:
        """Drops queued shadow searches and waits for a running one."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, q: Query, ids: np.ndarray) -> None:
        """Mirrors ``q`` to its route's shadow candidate, if sampled; ``ids`` (nq, k) is the live reply."""
        sh, route, col, k = q.route.shadow, q.route, q.col, q.params.k
        if sh is None or self._rng.random() >= sh.sample_rate or not self._slots.acquire(blocking=False):
            return

        def shadow() -> None:
            try:
                t0 = time.perf_counter()
                cand = run(q, sh.fn).ids  # the map in numpy: the device stays with live searches
                self.metrics.shadow_seconds.labels(col.name, route.query_space, sh.transform).observe(
                    time.perf_counter() - t0
                )
                overlap = [len(set(a) & set(b) - {""}) / k for a, b in zip(ids.tolist(), cand.tolist(), strict=True)]
                agreement = self.metrics.shadow_agreement.labels(col.name, route.query_space, sh.transform)
                for o in overlap:
                    agreement.observe(o)
            except InvalidArgument as e:  # the candidate maps a query past a query's bounds (pipeline.check_mapped)
                log.warning("shadow search of %r through %r refused: %s", col.name, sh.transform, e.message)
            except Exception:
                log.exception("shadow search failed")
            finally:
                self._slots.release()

        self._pool.submit(shadow)
