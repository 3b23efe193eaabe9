"""Score calibration between the two indexes of a migrating collection, and the merge of their top-k lists.

During a migration a new-model query q searches the old index (points not yet re-embedded) with T(q) and the
new-space index (re-embedded points) with q itself. The two score scales differ, so the old scores are mapped
onto the new scale by a :class:`ScoreCalibration` before :func:`merge_topk`:
``scale * D + level * mean(D[:, :depth]) + bias``, where the middle term is a per-query offset read from the old
search's own top-``depth`` scores (``level`` 0: a global affine map).

:func:`fit_score_calibration` fits it on held-out pairs (queries with their new and mapped vectors, docs with
their new and old vectors). Methods (:data:`METHODS`):

* ``level`` (default): per query, the new search's top-``depth`` mean L_n is predicted from the old search's
  L_o by least squares over the queries (L_n ≈ c·L_o + bias), and scores within a query are scaled by the ratio
  of the two searches' within-query spreads (scale); level = c − scale. A global map cannot fix that one query's
  mapped scores run high and another's low while their native scores do not: on debdesc dev it dipped 0.006
  below β = 0 at its best, the per-query level did not (docs/MIGRATION.md);
* ``lsq``: least squares of the new score on the old score over each query's top-k docs by either score;
* ``moments``: the same pairs' mean and standard deviation matched;
* ``top``: each query's mean top-1 and top-k scores matched between the two searches.

Scores follow FAISS: ``cosine`` / ``ip`` are inner products (higher is better), ``l2`` squared distances (lower
is better); the calibration maps old scores onto the new metric's scale whatever the signs, and a fit whose
slope would reverse the old ranking falls back to ``moments``. The fit depends on the gallery's size (top scores
rise with it): fit on as many docs as the calibration has. Covered by ``tests/test_migration_math.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

__all__ = [
    "IDENTITY",
    "METHODS",
    "ScoreCalibration",
    "candidate_scores",
    "fit_score_calibration",
    "higher_is_better",
    "merge_topk",
]

METHODS = ("level", "lsq", "moments", "top")
DEPTH = 10  #: top scores per query that give its level
_FAISS_METRIC = {"cosine": faiss.METRIC_INNER_PRODUCT, "ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
_F32_MAX = float(np.finfo(np.float32).max)


def higher_is_better(metric: str) -> bool:
    """True for the similarity metrics (cosine, ip), False for l2 (squared distances)."""
    if metric not in _FAISS_METRIC:
        raise ValueError(f"metric must be one of {', '.join(_FAISS_METRIC)}, got {metric!r}")
    return metric != "l2"


@dataclass(frozen=True)
class ScoreCalibration:
    """Old-index scores -> new-index scale: ``scale * D + level * mean(D[:, :depth]) + bias`` per query."""

    scale: float
    bias: float
    n: int  #: queries (level) or (query, doc) pairs it was fitted on (0 for identity)
    source: str  #: where it came from, in words ("identity: <why>" when not fitted)
    level: float = 0.0  #: weight of the query's own old top-``depth`` mean (0: a global affine map)
    depth: int = DEPTH  #: how many of the old search's top scores give the query's level

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) for v in (self.scale, self.bias, self.level)) or self.scale == 0:
            raise ValueError(f"score calibration needs a finite non-zero scale, finite bias and level, got {self}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")

    def query_level(self, D: np.ndarray) -> np.ndarray:
        """(nq,) the mean of each row's first ``depth`` finite scores of D (nq, k), sorted best first (0 when none).
        Search the old index with k >= depth: fewer columns give a level biased towards the top."""
        top = np.asarray(D, dtype=np.float64)[:, : self.depth]
        ok = np.isfinite(top) & (np.abs(top) < _F32_MAX)
        level: np.ndarray = np.where(ok, top, 0.0).sum(1) / np.maximum(ok.sum(1), 1)
        return level

    def apply(self, D: np.ndarray, levels: np.ndarray | None = None) -> np.ndarray:
        """D (nq, k) old-index scores, each row best first -> (nq, k) float32 on the new scale (padding scores
        stay finite). ``levels`` (nq,): each query's level when D is not its whole old list's top (the milvus
        backend searches the points not backfilled apart: ``query_level`` of the whole list's top-``depth``)."""
        D64 = np.asarray(D, dtype=np.float64)
        if D64.ndim != 2:
            raise ValueError(f"D must have shape (nq, k), got {D64.shape}")
        out = D64 * self.scale + self.bias
        if self.level:
            lv = self.query_level(D64) if levels is None else np.asarray(levels, dtype=np.float64)
            out += self.level * lv[:, None]
        return np.clip(out, -_F32_MAX, _F32_MAX).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scale": float(self.scale),
            "bias": float(self.bias),
            "level": float(self.level),
            "depth": int(self.depth),
            "n": int(self.n),
            "source": str(self.source),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScoreCalibration:
        return cls(
            float(d["scale"]),
            float(d["bias"]),
            int(d.get("n", 0)),
            str(d.get("source", "")),
            float(d.get("level", 0.0)),
            int(d.get("depth", DEPTH)),
        )


IDENTITY = ScoreCalibration(1.0, 0.0, 0, "identity: not fitted")


def _prep(x: np.ndarray, metric: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(x, dtype=np.float32)


def _pair_scores(xq: np.ndarray, xb: np.ndarray, rows: np.ndarray, metric: str) -> np.ndarray:
    """S (nq, c): the score of xq[i] against xb[rows[i, j]] (rows (nq, c) int64, -1 -> NaN)."""
    S = np.full(rows.shape, np.nan, dtype=np.float64)
    for i0 in range(0, len(xq), 1024):
        r = rows[i0 : i0 + 1024]
        xbr = xb[np.maximum(r, 0)]  # (b, c, d)
        q = xq[i0 : i0 + 1024, None, :]
        s = ((xbr - q) ** 2).sum(-1) if metric == "l2" else (xbr * q).sum(-1)
        S[i0 : i0 + 1024] = np.where(r >= 0, s, np.nan)
    return S


def candidate_scores(
    xq_new: np.ndarray,
    xq_mapped: np.ndarray,
    xb_new: np.ndarray,
    xb_old: np.ndarray,
    k: int = 20,
    metric_new: str = "cosine",
    metric_old: str = "cosine",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(S_old, S_new, rows), each (nq, 2k'): for each query its top-k' docs by the new score and by the old score
    (k' = min(k, nb); a doc in both appears once, the repeat is -1 / NaN), with both scores of each."""
    xq_new, xb_new = _prep(xq_new, metric_new), _prep(xb_new, metric_new)
    xq_mapped, xb_old = _prep(xq_mapped, metric_old), _prep(xb_old, metric_old)
    k = min(k, len(xb_new))
    _, I_new = faiss.knn(xq_new, xb_new, k, _FAISS_METRIC[metric_new])
    _, I_old = faiss.knn(xq_mapped, xb_old, k, _FAISS_METRIC[metric_old])
    rows = np.sort(np.hstack([I_new, I_old]).astype(np.int64), axis=1)
    rows[:, 1:][rows[:, 1:] == rows[:, :-1]] = -1
    S_old = _pair_scores(xq_mapped, xb_old, rows, metric_old)
    S_new = _pair_scores(xq_new, xb_new, rows, metric_new)
    return S_old, S_new, rows


def _moments(s_old: np.ndarray, s_new: np.ndarray, sign: float) -> tuple[float, float]:
    scale = sign * float(s_new.std()) / max(float(s_old.std()), 1e-12)
    return scale, float(s_new.mean() - scale * s_old.mean())


def _fit_level(
    xq_new: np.ndarray,
    xq_mapped: np.ndarray,
    xb_new: np.ndarray,
    xb_old: np.ndarray,
    depth: int,
    metric_new: str,
    metric_old: str,
    sign: float,
) -> ScoreCalibration:
    """The ``level`` method (module docstring): top-``depth`` of each search, within-query spread ratio, levels."""
    depth = min(depth, len(xb_new))
    D_new, _ = faiss.knn(_prep(xq_new, metric_new), _prep(xb_new, metric_new), depth, _FAISS_METRIC[metric_new])
    D_old, _ = faiss.knn(_prep(xq_mapped, metric_old), _prep(xb_old, metric_old), depth, _FAISS_METRIC[metric_old])
    D_new, D_old = D_new.astype(np.float64), D_old.astype(np.float64)
    L_new, L_old = D_new.mean(1), D_old.mean(1)
    var_old = float(D_old.var(1).mean()) if depth > 1 else float(L_old.var())
    var_new = float(D_new.var(1).mean()) if depth > 1 else float(L_new.var())
    if var_old < 1e-18 or var_new < 1e-18 or len(xq_new) < 2 or L_old.std() < 1e-9:
        scale, bias = _moments(D_old.ravel(), D_new.ravel(), sign) if D_old.std() > 1e-9 else (1.0, 0.0)
        how = f"moments over {D_old.size} top-{depth} scores (no spread within or across queries to fit levels on)"
        return ScoreCalibration(scale or 1.0, bias, len(xq_new), how, 0.0, depth)
    scale = sign * float(np.sqrt(var_new / var_old))
    c, bias = np.polyfit(L_old, L_new, 1)
    how = f"level over the top-{depth} of {len(xq_new)} queries among {len(xb_new)} docs"
    return ScoreCalibration(scale, float(bias), len(xq_new), how, float(c) - scale, depth)


def fit_score_calibration(
    xq_new: np.ndarray,
    xq_mapped: np.ndarray,
    xb_new: np.ndarray,
    xb_old: np.ndarray,
    *,
    k: int = 20,
    metric_new: str = "cosine",
    metric_old: str = "cosine",
    method: str = "level",
    depth: int = DEPTH,
) -> ScoreCalibration:
    """Fits old-index scores -> new-index scores over the candidates that matter (each query's top-k by either
    score). xq_new (nq, d_new) raw new-model queries, xq_mapped (nq, d_old) = T(xq_new), xb_new (nb, d_new) /
    xb_old (nb, d_old) paired docs (row i = the same item). Identity (with the reason in ``source``) when there is
    nothing to fit on. ``level`` uses each query's top-``depth`` lists instead of the top-k candidates."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    sign = 1.0 if higher_is_better(metric_new) == higher_is_better(metric_old) else -1.0
    if len(xq_new) != len(xq_mapped) or len(xb_new) != len(xb_old):
        raise ValueError(f"unpaired rows: {len(xq_new)} vs {len(xq_mapped)} queries, {len(xb_new)} vs {len(xb_old)}")
    if not len(xq_new) or not len(xb_new) or k < 1:
        return ScoreCalibration(1.0, 0.0, 0, "identity: no query or doc pairs to fit on")
    if method == "level":
        return _fit_level(xq_new, xq_mapped, xb_new, xb_old, depth, metric_new, metric_old, sign)
    S_old, S_new, rows = candidate_scores(xq_new, xq_mapped, xb_new, xb_old, k, metric_new, metric_old)
    ok = rows >= 0
    s_old, s_new = S_old[ok], S_new[ok]
    if s_old.std() < 1e-9 or s_new.std() < 1e-9:
        return ScoreCalibration(1.0, 0.0, 0, f"identity: constant scores over {len(s_old)} pairs")
    used = method
    if method == "lsq":
        scale, bias = np.polyfit(s_old, s_new, 1)
        scale, bias = float(scale), float(bias)
    elif method == "top":  # per query: top-1 and the mean top-k' of each search, in "higher is better" terms
        so = 1.0 if higher_is_better(metric_old) else -1.0
        sn = 1.0 if higher_is_better(metric_new) else -1.0
        kk = min(k, len(xb_new))
        top_old = np.sort(np.where(ok, so * S_old, -np.inf), 1)[:, -kk:]
        top_new = np.sort(np.where(ok, sn * S_new, -np.inf), 1)[:, -kk:]
        o1, ok_, n1, nk = top_old[:, -1].mean(), top_old.mean(), top_new[:, -1].mean(), top_new.mean()
        a = float((n1 - nk) / (o1 - ok_)) if abs(o1 - ok_) > 1e-12 else 0.0
        scale, bias = sn * so * a, sn * float(n1 - a * o1)
    else:
        scale, bias = _moments(s_old, s_new, sign)
    if scale * sign <= 0:  # would reverse the old list's own order: keep the order, match the spread
        (scale, bias), used = (
            _moments(s_old, s_new, sign),
            f"moments (the {method} slope {scale:.3g} had the wrong sign)",
        )
    return ScoreCalibration(scale, bias, len(s_old), f"{used} over {len(s_old)} top-{k} pairs of {len(xq_new)} queries")


def merge_topk(
    D_old: np.ndarray,
    I_old: np.ndarray,
    D_new: np.ndarray,
    I_new: np.ndarray,
    k: int,
    *,
    higher_is_better: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Merges two top-k lists: D_old (nq, k1) already calibrated, D_new (nq, k2), I_* (nq, k*) object arrays of
    point ids ('' = padding). An id in both lists keeps its new-index entry (ties go to the new entry).
    Returns (D (nq, k) float32, I (nq, k) object) sorted best first, '' padded (score -inf; +inf when lower is
    better)."""
    I_old, I_new = np.asarray(I_old, dtype=object), np.asarray(I_new, dtype=object)
    nq = len(I_old)
    if I_new.shape[0] != nq or np.shape(D_old) != I_old.shape or np.shape(D_new) != I_new.shape:
        raise ValueError(
            f"shapes differ: D_old {np.shape(D_old)} I_old {I_old.shape} D_new {np.shape(D_new)} I_new {I_new.shape}"
        )
    D = np.hstack([np.asarray(D_new, np.float64), np.asarray(D_old, np.float64)]).reshape(nq, -1)
    I = np.hstack([I_new, I_old]).reshape(nq, -1)
    dropped = (I == "") | np.isnan(D)
    if I_old.shape[1] and I_new.shape[1]:
        dup = (I_old[:, :, None] == I_new[:, None, :]).any(2) & (I_old != "")
        dropped[:, I_new.shape[1] :] |= dup
    key = np.where(dropped, np.inf, -D if higher_is_better else D)
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    D_out = np.take_along_axis(D, order, 1)
    I_out = np.take_along_axis(I, order, 1)
    gone = np.take_along_axis(dropped, order, 1)
    worst = -np.inf if higher_is_better else np.inf
    D_out[gone], I_out[gone] = worst, ""
    if order.shape[1] < k:  # fewer candidates than k: pad
        pad = k - order.shape[1]
        D_out = np.hstack([D_out, np.full((nq, pad), worst)])
        I_out = np.hstack([I_out, np.full((nq, pad), "", dtype=object)])
    return D_out.astype(np.float32), I_out
