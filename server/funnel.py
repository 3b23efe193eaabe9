"""Matryoshka funnel search: a shortlist from a prefix index, reranked with more dimensions.

After Kusupati et al. (NeurIPS 2022, adaptive / funnel retrieval): a collection created with
``prefix_dims = m`` indexes only the first m dimensions of each home vector (re-normalized for
cosine and ip, as :func:`~.transforms.matryoshka.shrink` does), which cuts index memory and search time by d/m; the full
vectors stay in the store and, by label, in memory. A search takes ``shortlist_k`` candidates from
the prefix index, then each funnel stage ``(dims, keep)`` rescores the survivors with their first
``dims`` dimensions and keeps the best ``keep``; a last stage always rescores with all d dimensions
and keeps k. With a large enough shortlist the result equals full-dimensional search
(``tests/test_funnel.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InvalidArgument
from .segments import best_k
from .transforms.matryoshka import shrink

__all__ = ["MAX_SHORTLIST", "check_funnel", "rerank", "shrink"]

MAX_SHORTLIST = 16384  #: most candidates a request may ask the prefix index for


def check_funnel(
    d: int, prefix_dims: int, k: int, shortlist_k: int | None, stages: Sequence[tuple[int, int]]
) -> tuple[int, list[tuple[int, int]]]:
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


def rerank(
    xq: np.ndarray, full: np.ndarray, I: np.ndarray, stages: Sequence[tuple[int, int]], metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Rescores candidate labels stage by stage.

    xq : (nq, d) full queries (normalized for cosine); full : (>= max label + 1, d) vectors by label;
    I : (nq, c) candidate labels, -1 for none. Returns D, I of shape (nq, keep of the last stage),
    sorted best first (inner product descending; squared L2 ascending), -1 / -inf (+inf) padding.
    """
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
