"""Matryoshka funnel search: a shortlist from a prefix index, reranked with more dimensions.

After Kusupati et al. (NeurIPS 2022, adaptive / funnel retrieval): a collection created with
``prefix_dims = m`` indexes only the first m dimensions of each home vector (re-normalized for
cosine and ip, as :func:`~.transforms.matryoshka.shrink` does), which cuts index memory and search time by d/m; the full
vectors stay in the store and, by label, in memory. A search takes ``shortlist_k`` candidates from
the prefix index, then each funnel stage ``(dims, keep)`` rescores the survivors with their first
``dims`` dimensions and keeps the best ``keep``; a last stage always rescores with all d dimensions
and keeps k. With a large enough shortlist the result equals full-dimensional search
(``tests/test_funnel.py``).

A batch of queries is reranked in row chunks whose candidate vectors (nq x shortlist x d float32)
fit :data:`CANDIDATE_BUDGET_BYTES`, and every search of a prefix collection (``pipeline.run``: live,
shadow, migration) goes in such chunks too, the engine's shortlist first cut to the labels the
collection holds (:func:`clamp_funnel`): each query is scored alone, so the results equal one pass
(``tests/test_reply_limits.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InvalidArgument
from .segments import best_k
from .transforms.matryoshka import shrink

__all__ = [
    "CANDIDATE_BUDGET_BYTES",
    "MAX_SHORTLIST",
    "Funnel",
    "check_funnel",
    "chunk_rows",
    "clamp_funnel",
    "rerank",
    "shrink",
]

MAX_SHORTLIST = 16384  #: most candidates a request may ask the prefix index for
#: bytes of candidates one chunk of queries holds: nq x shortlist_k x (d float32 dims + the
#: ~``CANDIDATE_OVERHEAD`` bytes of FAISS's distance and label, their merge and the scores). At
#: nq=1024, shortlist_k=16384, d=16 one pass once needed > 1 GiB (a MemoryError, INTERNAL then)
CANDIDATE_BUDGET_BYTES = 256 << 20
CANDIDATE_OVERHEAD = 64

Funnel = tuple[int, list[tuple[int, int]]]  #: (shortlist_k, stages + the full stage), from check_funnel


def check_funnel(
    d: int, prefix_dims: int, k: int, shortlist_k: int | None, stages: Sequence[tuple[int, int]]
) -> Funnel:
    """Checks a request's funnel against a collection; returns (shortlist_k, stages + the full stage)."""
    if not prefix_dims:
        if shortlist_k is not None or stages:
            raise InvalidArgument(
                "shortlist_k and funnel apply to collections created with prefix_dims; this one indexes all dims"
            )
        return k, []
    sk = shortlist_k if shortlist_k is not None else max(10 * k, 100)
    if not k <= sk <= MAX_SHORTLIST:
        raise InvalidArgument(f"shortlist_k is {sk}; it must be between k={k} and {MAX_SHORTLIST}")
    prev_dims, prev_keep = prefix_dims, sk
    for i, (dims, keep) in enumerate(stages):
        if not prev_dims < dims < d:
            raise InvalidArgument(
                f"funnel[{i}].dims is {dims}; stage dims must increase, above the prefix ({prefix_dims}) and below "
                f"d={d} (the last stage, all {d} dims, is implicit)"
            )
        if not k <= keep <= prev_keep:
            raise InvalidArgument(f"funnel[{i}].keep is {keep}; it must be between k={k} and the previous {prev_keep}")
        prev_dims, prev_keep = dims, keep
    return sk, [*stages, (d, k)]


def clamp_funnel(funnel: Funnel, k: int, nlive: int) -> Funnel:
    """``funnel`` with its shortlist, and its stages' keeps, cut to max(k, nlive): an index holding
    ``nlive`` live labels returns no more candidates (FAISS pads with -1), so the results are the same."""
    sk, stages = funnel
    cap = max(k, nlive)
    if sk <= cap:
        return funnel
    return cap, [(dims, min(keep, cap)) for dims, keep in stages]


def chunk_rows(c: int, d: int) -> int:
    """Queries per chunk whose c candidates each, of d dims, fit :data:`CANDIDATE_BUDGET_BYTES` (at least 1)."""
    return max(1, CANDIDATE_BUDGET_BYTES // max(1, c * (4 * d + CANDIDATE_OVERHEAD)))


def rerank(
    xq: np.ndarray, full: np.ndarray, I: np.ndarray, stages: Sequence[tuple[int, int]], metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Rescores candidate labels stage by stage.

    xq : (nq, d) full queries (normalized for cosine); full : (>= max label + 1, d) vectors by label;
    I : (nq, c) candidate labels, -1 for none. Returns D, I of shape (nq, keep of the last stage),
    sorted best first (inner product descending; squared L2 ascending), -1 / -inf (+inf) padding.
    Queries go in chunks of :func:`chunk_rows`: the (nq, c, dims) candidate vectors stay within
    :data:`CANDIDATE_BUDGET_BYTES`.
    """
    rows = chunk_rows(I.shape[1], xq.shape[1])
    if len(xq) <= rows:
        return _rerank(xq, full, I, stages, metric)
    parts = [_rerank(xq[i : i + rows], full, I[i : i + rows], stages, metric) for i in range(0, len(xq), rows)]
    return np.vstack([p[0] for p in parts]), np.vstack([p[1] for p in parts])


def _rerank(
    xq: np.ndarray, full: np.ndarray, I: np.ndarray, stages: Sequence[tuple[int, int]], metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`rerank` of one chunk of queries."""
    largest = metric != "l2"
    worst = np.float32(-np.inf if largest else np.inf)
    d = xq.shape[1]
    D = np.empty((len(xq), 0), dtype=np.float32)
    for dims, keep in stages:
        normalize = metric != "l2" and dims < d  # full-dim cosine vectors are normalized already
        q = shrink(xq, dims, normalize)
        cand = full[np.maximum(I, 0), :dims]  # (nq, c, dims)
        if normalize:
            cand = cand / np.maximum(np.linalg.norm(cand, axis=2, keepdims=True), 1e-12)
        if largest:
            S = np.einsum("qcd,qd->qc", cand, q)
        else:
            diff = cand - q[:, None, :]
            S = np.einsum("qcd,qcd->qc", diff, diff)
        S[I < 0] = worst
        kk = min(keep, S.shape[1])
        sel = best_k(-S if largest else S, kk)
        D = np.take_along_axis(S, sel, axis=1).astype(np.float32)
        I = np.take_along_axis(I, sel, axis=1)
        if kk < keep:  # fewer candidates than asked: pad
            D = np.hstack([D, np.full((len(D), keep - kk), worst, np.float32)])
            I = np.hstack([I, np.full((len(I), keep - kk), -1, np.int64)])
    I = np.where(worst == D, -1, I)
    return D, I
