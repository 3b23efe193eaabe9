"""The one query pipeline: route -> home space -> the collection's basis -> index -> ids.

Every search of a collection reads this one way, live or shadow::

    prepare: resolve the route (FAILED_PRECONDITION without one), check k, unpack the queries,
             check the index parameters and the funnel, L2-normalize for cosine query spaces
    run:     map through a transform into the home space (none for the identity route)
             -> the collection's basis transform (if it has one) -> the index -> labels to ids;
             a mapped query is checked as a query is (INVALID_ARGUMENT: not finite, or past MAX_NORM)

:func:`prepare` gives a :class:`Query`, checked once; :func:`run` maps it with the transform it
is given: the live search (``engine.search``) with the route's, the shadow (``shadow.py``) with
the candidate's, so a candidate is scored on exactly the path the live transform serves.
:class:`SearchParams` mirrors the proto's ``SearchRequest.k`` and ``SearchParams``. Covered by
``tests/test_pipeline.py`` (shadow of the live transform agrees on every id, with a basis too),
``tests/test_search.py``, ``tests/test_funnel.py``, ``tests/test_routes.py`` and ``tests/test_fit_validation.py``
(a query its route maps past MAX_NORM).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import validate as v
from .config import Limits
from .errors import InvalidArgument
from .funnel import Funnel, check_funnel, chunk_rows
from .routes import Route, resolve
from .store import SpaceRow

if TYPE_CHECKING:
    from .backends.base import AnyCollection
    from .backends.milvus import MilvusView
    from .device import Device
    from .segments import Snapshot

__all__ = ["Hits", "Query", "SearchParams", "SearchResult", "check_mapped", "map_queries", "prepare", "run"]


@dataclass(frozen=True)
class SearchParams:
    """A search's parameters: ``SearchRequest.k`` and the proto's ``SearchParams`` (None: not set)."""

    k: int
    ef_search: int | None = None  #: HNSW
    nprobe: int | None = None  #: IVF
    shortlist_k: int | None = None  #: prefix collections: candidates from the prefix index
    funnel: tuple[tuple[int, int], ...] = ()  #: prefix collections: (dims, keep) rerank stages
    k_factor: int | None = None  #: refine stage: k * k_factor candidates re-ranked


@dataclass(slots=True)  # not frozen, never changed: see Query
class SearchResult:
    """What ``Engine.search`` returns (``serial.search_one`` too)."""

    D: np.ndarray  #: scores, shape (nq, k) float32
    ids: np.ndarray  #: point ids, shape (nq, k) object ("" pads missing hits)
    payloads: list[str] | None  #: nq*k JSON payloads, row-major, with with_payload
    route: Route
    exact: bool


#: Query and Hits are never changed once built (dataclasses.replace makes new ones), but are not
#: frozen: a frozen dataclass's __init__ sets each field through object.__setattr__, ~1.2 µs more
#: per object, and a search builds one of each
@dataclass(slots=True)
class Query:
    """A checked query batch on one collection: what a live search and its shadow share."""

    col: AnyCollection
    space: SpaceRow  #: the query space
    route: Route  #: from the query space to the collection's home space
    xq: np.ndarray  #: (nq, d_query) float32, L2-normalized for cosine query spaces
    params: SearchParams
    funnel: Funnel  #: (k, []) for a collection that indexes all dims


@dataclass(slots=True)
class Hits:
    D: np.ndarray  #: scores, shape (nq, k) float32
    ids: np.ndarray  #: point ids, shape (nq, k) object ("" pads missing hits)
    snapshot: Snapshot | MilvusView  #: the snapshot searched (the milvus backend: what the engine searched)
    map_seconds: float  #: the transform into the home space (0.0 without one)
    transform_seconds: float  #: the transform and the basis together
    index_seconds: float  #: the index search and labels -> ids


def map_queries(
    fn: Any,
    xq: np.ndarray,
    home_metric: str,
    home_dim: int,
    side: str = "query",
    device: Device | None = None,
    *,
    label: str | None = None,
) -> np.ndarray:
    """Applies a transform to a batch (queries by default). A basis transform maps into (home + Δ)
    dims; against a gallery of old items indexed as [x_old, 0] only its first ``home_dim``
    coordinates score. On a GPU ``device`` a linear transform runs there (``Device.apply_affine``);
    otherwise, and for non-linear kinds, ``fn.apply`` runs in numpy as on the CPU.

    Mapped queries are checked as queries sent in the home space are (:func:`check_mapped`, before
    the cosine normalization, which would turn an overflow into a zero or NaN query): a transform
    can take a query accepted in its own space past ``validate.MAX_NORM``. ``label`` names the
    transform in that error (default: its kind). Documents (``side="doc"``) are not checked here:
    ``Collection.upsert`` maps them after their write is stored."""
    y = device.apply_affine(fn, xq, side) if device is not None and device.is_gpu else None
    if y is None:
        y = fn.apply(xq, side)
    y = y[:, :home_dim]
    if side == "query":
        check_mapped(y, label or f"the {getattr(fn, 'kind', '?')} transform")
    if home_metric == "cosine":
        y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(y, dtype=np.float32)


def check_mapped(y: np.ndarray, label: str, what: str = "queries") -> None:
    """InvalidArgument naming the first of ``y`` (n, d), ``what`` mapped by ``label``, that is not finite
    or has an L2 norm above ``validate.MAX_NORM``: such a query scores inf or NaN against every point
    (an l2 index then returns arbitrary ids or none). One max/min pass over the batch when every norm is
    bounded by sqrt(d) * max|y| (the common case); the norms, in float64, only otherwise."""
    if not len(y) or max(float(y.max()), -float(y.min())) * math.sqrt(y.shape[1]) <= v.MAX_NORM:
        return  # False for NaN: NaN goes on to the norms
    norms = np.linalg.norm(np.asarray(y, dtype=np.float64), axis=1)
    bad = np.flatnonzero(~(norms <= v.MAX_NORM))
    if len(bad):
        i = int(bad[0])
        raise InvalidArgument(
            f"{what}: vector {i} is mapped by {label} to L2 norm {norms[i]:.3g}; the limit is {v.MAX_NORM:g} "
            "(scores and squared distances must stay finite in float32)"
        )


def prepare(
    col: AnyCollection,
    space: SpaceRow,
    data: bytes,
    dim: int,
    params: SearchParams,
    limits: Limits,
    route: Route | None = None,
) -> Query:
    """Resolves the route (unless a migration gives one, ``server/migration/search.py``) and checks
    everything a search needs, in the order errors are reported."""
    route = route or resolve(col.name, col.home.name, space.name, col.routes)
    k = params.k
    if k <= 0 or k > limits.max_k:
        v.check_k(k, limits)  # its error
    cosine = space.metric == "cosine"
    xq, normalized = v.unpack_queries(data, dim, space.dim, cosine=cosine, what="queries", limit=limits.max_nq)
    if params.ef_search is not None or params.nprobe is not None or params.k_factor is not None:
        col.check_search(params.ef_search, params.nprobe, params.k_factor)
    elif col.failure is not None:
        col.check_search(None, None, None)  # its error
    prefix_dims = col.row.spec.prefix_dims
    if prefix_dims or params.shortlist_k is not None or params.funnel:
        funnel = check_funnel(col.home.dim, prefix_dims, k, params.shortlist_k, params.funnel)
    else:
        funnel = (k, [])  # what check_funnel gives a collection that indexes all dims
    if cosine and not normalized:
        xq = v.normalize_rows(xq, what="queries")
    return Query(col, space, route, xq, params, funnel)


def run(q: Query, fn: Any, device: Device | None = None) -> Hits:
    """Searches ``q`` with queries mapped by ``fn`` (None: the identity route) into the home space,
    then through the collection's basis. ``device`` runs the map (None: numpy on this thread).
    InvalidArgument when a mapped query leaves the bounds of a query (:func:`check_mapped`)."""
    col, p = q.col, q.params
    t0 = time.perf_counter()
    if fn is None:
        xh = q.xq
    else:
        label = f"transform {q.route.transform!r}" if fn is q.route.fn else None
        xh = map_queries(fn, q.xq, col.home.metric, col.home.dim, device=device, label=label)
    t1 = time.perf_counter()
    xb = col.to_basis(xh, "query")
    sample = getattr(col, "query_sample", None)  # an ``auto`` collection's recent queries (query_sample.py)
    if sample is not None:  # offered once the basis took them too: the advisor maps them again
        sample.offer(xh)
    t2 = time.perf_counter()
    D, ids, snap = _search(col, xb, p, q.funnel)
    return Hits(D, ids, snap, t1 - t0, t2 - t0, time.perf_counter() - t2)


def _search(col: AnyCollection, xb: np.ndarray, p: SearchParams, funnel: Funnel) -> tuple[np.ndarray, np.ndarray, Any]:
    """``col.search`` of queries xb (nq, d); a prefix collection's batch in row chunks whose candidates
    fit ``funnel.CANDIDATE_BUDGET_BYTES`` (each query is searched alone: the hits are those of one
    search; the snapshot returned is the last chunk's)."""
    shortlist_k, stages = funnel
    rows = chunk_rows(shortlist_k, col.home.dim) if stages else len(xb)
    if len(xb) <= rows:
        return col.search(xb, p.k, p.ef_search, p.nprobe, funnel, k_factor=p.k_factor)
    parts = [
        col.search(xb[i : i + rows], p.k, p.ef_search, p.nprobe, funnel, k_factor=p.k_factor)
        for i in range(0, len(xb), rows)
    ]
    return np.vstack([h[0] for h in parts]), np.vstack([h[1] for h in parts]), parts[-1][2]
