"""Nearest neighbours for training-time mining: hard negatives (``train/data.py``) and pseudo relevance
(``fit.py``). Exact while it is cheap, an IVF index past that, so that a large calibration set cannot
stall a fit inside one FAISS call (a fit's time budget is checked between steps, not inside one).
Kept apart from ``evaluate.py`` (which imports the linear kinds) so the torch training can use it
without an import cycle. Covered by ``tests/test_task_loss.py``.
"""

from __future__ import annotations

import faiss
import numpy as np

__all__ = ["EXACT_LIMIT", "FAISS_METRIC", "mining_knn"]

FAISS_METRIC = {"cosine": faiss.METRIC_INNER_PRODUCT, "ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}

EXACT_LIMIT = 2**30  #: nq · nb up to which :func:`mining_knn` searches exactly (10k x 10k is 1e8)


def mining_knn(xq: np.ndarray, xb: np.ndarray, k: int, metric: str, seed: int = 0) -> np.ndarray:
    """I (nq, min(k, nb)) int64: the top-k rows of xb (nb, d) for each row of xq (nq, d), both prepared for
    ``metric`` (cosine: unit rows). Exact while nq · nb <= ``EXACT_LIMIT``, else an IVF index (nlist =
    4·sqrt(nb), trained on a seeded sample of at most 64·nlist rows, nprobe 16)."""
    xq, xb = np.ascontiguousarray(xq, dtype=np.float32), np.ascontiguousarray(xb, dtype=np.float32)
    k = min(k, len(xb))
    if len(xq) * len(xb) <= EXACT_LIMIT:
        _, I = faiss.knn(xq, xb, k, FAISS_METRIC[metric])
        return np.asarray(I, dtype=np.int64)
    nlist = int(4 * np.sqrt(len(xb)))
    quantizer = faiss.IndexFlat(xb.shape[1], FAISS_METRIC[metric])
    index = faiss.IndexIVFFlat(quantizer, xb.shape[1], nlist, FAISS_METRIC[metric])
    sample = np.random.default_rng(seed).choice(len(xb), min(len(xb), 64 * nlist), replace=False)
    index.train(xb[np.sort(sample)])
    index.add(xb)
    index.nprobe = 16
    _, I = index.search(xq, k)
    return np.asarray(I, dtype=np.int64)
