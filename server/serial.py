"""The serial hot path: one query, on a plain collection, in one function.

A single-query search pays its Python per call, and pays it cold: at 1M x 384 an HNSW search at
efSearch 384 reads several MB of vectors and graph, which evicts the interpreter's and numpy's
code and data from the CPU caches, so each numpy call or Python frame after it costs 5-15 µs
instead of ~1 µs (measured: the seven numpy calls of the batch normalization took 124 µs p50
after a 64 MB sweep, 7 µs warm). :func:`search_one` answers the common case with one Python frame
and a handful of C calls, the same answer ``Engine.search`` gives (``tests/test_serial.py``
compares them), and returns None for anything else, which then takes the full pipeline
(``pipeline.py``) and gets its checks and errors there:

* the engine is serving; the collection is an embedded one (not milvus), not failed, retired,
  migrating, prefix-indexed or with a basis transform; the query space is its home space
  (the identity route: no transform, no shadow);
* one query of the space's dimension, finite, with a norm in (0, MAX_NORM) (one FAISS
  ``fvec_norm_L2sqr`` call), normalized for a cosine space as ``validate.unpack_queries`` does;
* 1 <= k <= max_k; the index parameters pass ``Segments.check_params``;
* the snapshot holds only a sealed CPU index without dead labels, and the search parameters for
  this request were built by an earlier single-query search of the same index and defaults
  (``Segments._serial_params``), for a k up to the largest they serve (an HNSW's efSearch is at
  least k, k * k_factor under a refine stage: ``index_spec.search_params``); no payloads asked;
* an HNSW search that found fewer than k labels where more exist is left to the full path, which
  completes it (``Segments._search_sealed``).

Its metrics are the full path's: the stage timers (validate, transform 0, index) and the queries
counter.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from faiss import fvec_norm_L2sqr, swig_ptr

from .collection import Collection
from .lifecycle import Lifecycle
from .metrics import FOLD_EVERY
from .pipeline import SearchResult
from .query_sample import EVERY as QUERY_EVERY
from .routes import _IDENTITY_ROUTES, resolve
from .validate import FAST_MAX_NORM_SQ

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["search_one"]


def search_one(
    engine: Engine,
    collection: str,
    query_space: str,
    x: np.ndarray,
    k: int,
    ef_search: int | None,
    nprobe: int | None,
    k_factor: int | None,
    *,
    hnsw_only: bool = False,
) -> SearchResult | None:
    """The k nearest points of one query in ``collection``, or None when the request is not the plain
    case (module docstring): the caller then runs ``Engine.search``, which answers it or raises its
    error. ``x``: the query, C-contiguous little-endian float32 of any shape (its size is the
    dimension), only read. ``hnsw_only``: None for other indexes (their single-query search may open
    an OpenMP region: the embedded client then sets the thread's OpenMP threads first)."""
    t0 = time.perf_counter()
    if engine.state is not Lifecycle.SERVING:
        return None
    col = engine.collections.get(collection)
    migrations = engine.migrations
    if type(col) is not Collection or (migrations is not None and collection in migrations.active):
        return None
    space = engine.spaces.get(query_space)
    dim = x.size
    if space is None or space.dim != dim or not 0 < k <= engine.limits.max_k:
        return None
    if query_space != col.home.name or col.basis is not None or col.retired or col.row.spec.prefix_dims:
        return None
    seg = col.segments
    s = seg.snapshot
    sealed: Any = s.sealed  # (an `is` test against Snapshot.sealed_search would widen it back to Optional)
    if sealed is None or s.nfresh or s.ndead_sealed or s.sealed_search is not s.sealed or col.failures.current:
        return None
    if hnsw_only and not seg.spec.is_hnsw:
        return None
    # the parameters an earlier pipeline search built for this index, defaults and request, after its
    # checks (check_search) passed: the same request passes them again (the spec is the index's)
    owner, dflt, spec, fast, kmax = seg._serial_params
    same = owner is sealed and dflt is s.defaults and spec is seg.spec
    key = (ef_search, nprobe, k_factor)
    params = fast.get(key) if same else None
    # (the sealed index's d: no basis, no prefix); past kmax an HNSW needs a larger efSearch than these carry
    if params is None or col.index_dims != dim or k > kmax.get(key, 0):
        return None
    ss = float(fvec_norm_L2sqr(swig_ptr(x), dim))  # NaN and inf fail the comparison
    if not 0.0 < ss <= FAST_MAX_NORM_SQ:  # validate.unpack_queries' bound
        return None
    xq = x / np.float32(math.sqrt(ss)) if space.metric == "cosine" else x
    t1 = time.perf_counter()
    D = np.empty((1, k), dtype=np.float32)
    I = np.empty((1, k), dtype=np.int64)
    sealed.search_c(1, swig_ptr(xq), k, swig_ptr(D), swig_ptr(I), params)
    if I[0, k - 1] >= 0:  # every hit found (FAISS pads at the end)
        ids = s.ids[I]
    elif seg.spec.is_hnsw and np.count_nonzero(I >= 0) < min(k, s.nsealed):
        return None  # a graph search short of hits: the full path completes it from every code
    else:
        D[I < 0] = -np.inf if seg.largest else np.inf
        ids = s.ids[np.maximum(I, 0)]
        ids[I < 0] = ""
    t2 = time.perf_counter()
    timers = col.stage_timers  # the stage times and one query for the identity route's counter
    timers.append((t1 - t0, 0.0, t2 - t1, None, 1))
    n = len(timers)
    if n >= FOLD_EVERY:
        timers.fold()
    elif not n % QUERY_EVERY and col.query_sample is not None:  # an ``auto`` collection's recent queries
        col.query_sample.add(xq)
    route = _IDENTITY_ROUTES.get(query_space) or resolve(collection, query_space, query_space, col.routes)
    return SearchResult(D, ids, None, route, exact=False)
