"""Backfill order advice: which not-yet-re-embedded points to re-embed first (SuggestBackfillOrder).

:func:`backfill_order` scores each point from its old-space vector only and returns the best first.
Methods (:data:`METHODS`):

* ``centre_distance``: Ricci et al. 2025 §3.6, the points farthest from their cluster centre first; FAISS
  k-means (no labels), ncentroids = sqrt(nb) clipped to [1, ``MAX_CENTROIDS``], seeded, trained on a seeded
  sample of at most ``TRAIN_PER_CENTROID`` points per centroid;
* ``centre_nearest``: the reverse (the points closest to their centre first);
* ``hubness``: the points most often among other points' top-10 (old space) first;
* ``crowding``: the points with the closest nearest neighbour first (dense regions, where a mapped query has
  the most near-duplicates to confuse its answer with);
* ``random``: a seeded permutation (the baseline).

The neighbour-based methods search exactly up to ``EXACT_LIMIT`` (nb²), else an IVF index built on the same
k-means centroids, over a seeded sample of at most ``HUB_QUERIES`` query points. The default is the method that
gave the largest area under Recall@10-vs-backfill-fraction on debdesc dev (``bench/backfill.py``,
docs/MIGRATION.md). Covered by ``tests/test_migration_math.py``.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

__all__ = ["DEFAULT_METHOD", "METHODS", "backfill_order", "kmeans_centre_distance"]

METHODS = ("centre_distance", "centre_nearest", "hubness", "crowding", "random")
DEFAULT_METHOD = "centre_distance"
MAX_CENTROIDS = 256  #: caps the assignment cost: 1M x 384 in ~10 s on 2 cores (1024 took 66 s, loaded)
TRAIN_PER_CENTROID = 64
NITER = 10
EXACT_LIMIT = 2**30  #: nb² up to which the neighbour methods search exactly (20k x 20k is 4e8)
HUB_QUERIES = 200_000  #: query points sampled by the neighbour methods past EXACT_LIMIT
HUB_K = 10
_METRIC = {"cosine": faiss.METRIC_INNER_PRODUCT, "ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


def _prep(xb: np.ndarray, metric: str) -> np.ndarray:
    if metric not in _METRIC:
        raise ValueError(f"metric must be one of {', '.join(_METRIC)}, got {metric!r}")
    x = np.ascontiguousarray(xb, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"xb must have shape (nb, d), got {x.shape}")
    if metric == "cosine":
        x = np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), dtype=np.float32)
    return x


def _kmeans(x: np.ndarray, metric: str, seed: int) -> faiss.Index:
    """A flat index over the k-means centroids of x (nb, d): ncentroids = sqrt(nb) clipped to [1, MAX_CENTROIDS]."""
    nb, d = x.shape
    nc = int(min(MAX_CENTROIDS, max(1, round(math.sqrt(nb)))))
    rng = np.random.default_rng(seed)
    sample = x if nb <= TRAIN_PER_CENTROID * nc else x[np.sort(rng.choice(nb, TRAIN_PER_CENTROID * nc, replace=False))]
    km = faiss.Kmeans(
        d,
        nc,
        niter=NITER,
        seed=seed,
        spherical=metric == "cosine",
        verbose=False,
        max_points_per_centroid=TRAIN_PER_CENTROID,
        min_points_per_centroid=1,
    )
    km.train(sample)
    index = faiss.IndexFlat(d, _METRIC[metric])
    index.add(np.ascontiguousarray(km.centroids, dtype=np.float32))
    return index


def kmeans_centre_distance(xb: np.ndarray, *, metric: str = "cosine", seed: int = 0) -> np.ndarray:
    """(nb,) float32: each point's distance to its nearest k-means centroid (1 - cosine for cosine/ip, the
    squared L2 distance for l2)."""
    x = _prep(xb, metric)
    if not len(x):
        return np.zeros(0, dtype=np.float32)
    D, _ = _kmeans(x, metric, seed).search(x, 1)
    dist = D[:, 0] if metric == "l2" else 1.0 - D[:, 0]
    return np.asarray(dist, dtype=np.float32)


def _neighbours(x: np.ndarray, metric: str, seed: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, D, I): the top-(k+1) of the query rows (all, or a seeded sample past EXACT_LIMIT) among x, self
    included (exact search, or IVF on the k-means centroids with nprobe 8)."""
    nb, d = x.shape
    rng = np.random.default_rng(seed)
    if nb * nb <= EXACT_LIMIT:
        rows = np.arange(nb)
        D, I = faiss.knn(x, x, min(k + 1, nb), _METRIC[metric])
        return rows, D, I
    rows = np.sort(rng.choice(nb, min(nb, HUB_QUERIES), replace=False))
    quantizer = _kmeans(x, metric, seed)
    index = faiss.IndexIVFFlat(quantizer, d, quantizer.ntotal, _METRIC[metric])
    index.is_trained = True
    index.add(x)
    index.nprobe = 8
    D, I = index.search(x[rows], k + 1)
    return rows, D, I


def _scores(x: np.ndarray, method: str, metric: str, seed: int) -> np.ndarray:
    """(nb,) float64: higher = re-embed earlier."""
    nb = len(x)
    if method == "random":
        return np.random.default_rng(seed).permutation(nb).astype(np.float64)
    if method in ("centre_distance", "centre_nearest"):
        dist = kmeans_centre_distance(x, metric=metric, seed=seed).astype(np.float64)
        return dist if method == "centre_distance" else -dist
    rows, D, I = _neighbours(x, metric, seed, HUB_K)
    self_hit = rows[:, None] == I
    if method == "hubness":
        counts = np.bincount(I[~self_hit & (I >= 0)], minlength=nb).astype(np.float64)
        return counts + 1e-6 * np.random.default_rng(seed).random(nb)  # ties in random order
    # crowding: the nearest other point's similarity (points outside the sample rank after the sampled ones)
    sim = np.where(self_hit | (I < 0), -np.inf, -D if metric == "l2" else D)
    out = np.full(nb, -np.inf)
    out[rows] = sim.max(1)
    return out


def backfill_order(
    xb: np.ndarray, n: int, *, metric: str = "cosine", seed: int = 0, method: str = DEFAULT_METHOD
) -> tuple[np.ndarray, np.ndarray]:
    """xb (nb, d) old-space vectors of the points not yet backfilled. Returns (rows (n',) int64 into xb, scores
    (n',) float32), best first (score descending, ties by row), n' = min(n, nb)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    x = _prep(xb, metric)
    nb = len(x)
    m = min(n, nb)
    if m == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    s = _scores(x, method, metric, seed)
    rows = np.lexsort((np.arange(nb), -s))[:m]
    return rows.astype(np.int64), s[rows].astype(np.float32)
