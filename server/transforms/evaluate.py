"""Retrieval reports for a transform: what searching the home gallery with mapped new queries costs.

:func:`evaluate` scores four ways of searching with exact FAISS top-k (``faiss.knn``; cosine =
inner product on L2-normalized rows): home->home (xq_home vs xb_home, the service today),
new->new (xq_new vs xb_new, what re-indexing would give), raw new->home (xq_new vs xb_home,
about chance; None when the dims differ) and transformed new->home (``apply_to_home(t, xq_new)``
vs xb_home; the gallery is ``[xb_home, 0]`` for a basis transform). For each: Recall@1,
Recall@k (the fraction of a query's relevant items in its top r, averaged over queries) and
MRR@k; with labels also CMC top-1/top-5 and mAP over the full ranking. Then the compatibility
figures: ECC margin R@k(T(new)->home) − R@k(home->home) (Shen et al., CVPR 2020: >= 0 means
the new queries may replace the old ones), retention R@k(T(new)->home) / R@k(home->home) (what users
keep of today's recall; ``retention_vs_new``: / R@k(new->new), what a full re-index would give), the
negative-flip rate (queries right at top-1 home->home and wrong after), the mean top-k overlap
of T(new)->home with new->new (neighbourhood agreement), ‖WᵀW − I‖_F of the query-side W and
the microseconds per query the transform adds (1024-query batch, best of 5).

:func:`label_free_report` needs only held-out calibration pairs: each T(x_new(i)) must find its own
x_home(i) among the held-out home items (cross-identification). :func:`split_calibration` makes
that held-out slice. Every figure is a plain float (or None): the dicts are JSON-serializable.
Covered by ``tests/test_evaluate.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import faiss
import numpy as np

from .base import SIDES, Calibration, Transform, apply_to_home, pad_home
from .mining import FAISS_METRIC

__all__ = [
    "METRICS",
    "evaluate",
    "held_rows",
    "hits",
    "knn",
    "label_free_report",
    "label_metrics",
    "neighbourhood_agreement",
    "ranking_metrics",
    "split_calibration",
    "us_per_query",
]

METRICS = ("cosine", "ip", "l2")
US_BATCH = 1024  #: queries per batch when timing ``us_per_query`` (the service maps a request's batch at once)


def held_rows(cal: Calibration, holdout: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(doc rows, query rows), sorted: the pairs :func:`split_calibration` holds out, found without copying a
    vector (a request checks its split sizes with it)."""
    rng = np.random.default_rng(seed)
    m, n = len(cal.query_new), len(cal.doc_new)
    q_perm = rng.permutation(m)
    q_held = np.sort(q_perm[: min(m, round(holdout * m))])
    if cal.query_relevant is not None:
        in_held = np.zeros(n, dtype=bool)
        for i in q_held:
            in_held[np.asarray(cal.query_relevant[i], dtype=np.int64)] = True
        d_held = np.flatnonzero(in_held)
    else:
        d_perm = rng.permutation(n)
        d_held = np.sort(d_perm[: min(n, round(holdout * n))])
    return d_held, q_held


def split_calibration(cal: Calibration, holdout: float, seed: int = 0) -> tuple[Calibration, Calibration]:
    """(rest, held-out): round(holdout · n) seeded random pairs of each side go to the held-out slice.

    With training relevance (``cal.query_relevant``) the queries are drawn first and the held-out docs are
    exactly their relevant docs, so each held-out query finds its answers in the held-out slice and no
    fitted query was trained towards a held-out doc (links that cross the split are dropped)."""
    m, n = len(cal.query_new), len(cal.doc_new)
    d_held, q_held = held_rows(cal, holdout, seed)
    parts = {
        "doc": (np.setdiff1d(np.arange(n), d_held), d_held),
        "query": (np.setdiff1d(np.arange(m), q_held), q_held),
    }

    def take(j: int) -> Calibration:
        d, q = parts["doc"][j], parts["query"][j]
        relevant = None
        if cal.query_relevant is not None:
            new_row = np.full(n, -1, dtype=np.int64)
            new_row[d] = np.arange(len(d))
            relevant = tuple(
                (lambda r: r[r >= 0])(new_row[np.asarray(cal.query_relevant[i], dtype=np.int64)]) for i in q
            )
        return Calibration(
            cal.doc_new[d],
            cal.doc_home[d],
            cal.query_new[q],
            cal.query_home[q],
            None if cal.doc_labels is None else cal.doc_labels[d],
            None if cal.query_labels is None else cal.query_labels[q],
            relevant,
        )

    return take(0), take(1)


def _prep(x: np.ndarray, metric: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(x, dtype=np.float32)


def knn(xq: np.ndarray, xb: np.ndarray, k: int, metric: str) -> np.ndarray:
    """I (nq, min(k, nb)) int64: exact top-k gallery rows of each query, best first (rows prepared for ``metric``)."""
    xq, xb = np.ascontiguousarray(xq, dtype=np.float32), np.ascontiguousarray(xb, dtype=np.float32)
    _, I = faiss.knn(xq, xb, min(k, len(xb)), FAISS_METRIC[metric])
    return np.asarray(I, dtype=np.int64)


def hits(I: np.ndarray, relevant: Sequence[np.ndarray] | None) -> np.ndarray:
    """(nq, k) bool: I[i, j] is relevant to query i (``relevant=None``: gallery row i only)."""
    if relevant is None:
        H: np.ndarray = np.arange(len(I))[:, None] == I
        return H
    return np.stack([np.isin(row, rel) for row, rel in zip(I, relevant, strict=True)])


def ranking_metrics(H: np.ndarray, n_relevant: np.ndarray, k: int) -> dict[str, float]:
    """From hits H (nq, k) and each query's count of relevant items (nq,): r1, r{k} (recall) and mrr{k}."""
    first = np.where(H.any(1), H.argmax(1) + 1, 0)
    rr = np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0)
    return {
        "r1": float((H[:, :1].sum(1) / n_relevant).mean()),
        f"r{k}": float((H.sum(1) / n_relevant).mean()),
        f"mrr{k}": float(rr.mean()),
    }


def label_metrics(
    xq: np.ndarray, xb: np.ndarray, q_labels: np.ndarray, b_labels: np.ndarray, metric: str, chunk: int = 1024
) -> dict[str, float]:
    """CMC top-1/top-5 and mAP over the full ranking; queries whose label is absent from the gallery are skipped."""
    cmc1, cmc5, aps = [], [], []
    bb = (xb.astype(np.float64) ** 2).sum(1) if metric == "l2" else None
    for i0 in range(0, len(xq), chunk):
        S = xq[i0 : i0 + chunk].astype(np.float64) @ xb.T.astype(np.float64)
        if bb is not None:
            S = 2 * S - bb  # −‖q − b‖² up to a per-query constant
        order = np.argsort(-S, axis=1, kind="stable")
        for row, lab in zip(order, q_labels[i0 : i0 + chunk], strict=True):
            rel = b_labels[row] == lab
            if not rel.any():
                continue
            pos = np.flatnonzero(rel) + 1
            cmc1.append(bool(rel[0]))
            cmc5.append(bool(rel[:5].any()))
            aps.append(float((np.arange(1, len(pos) + 1) / pos).mean()))
    if not aps:
        return {"cmc1": 0.0, "cmc5": 0.0, "map": 0.0}
    return {"cmc1": float(np.mean(cmc1)), "cmc5": float(np.mean(cmc5)), "map": float(np.mean(aps))}


def neighbourhood_agreement(I_a: np.ndarray, I_b: np.ndarray) -> float:
    """Mean over queries of |top-k(a) ∩ top-k(b)| / k for two (nq, k) id arrays."""
    return float(np.mean([len(np.intersect1d(a, b)) for a, b in zip(I_a, I_b, strict=True)]) / I_a.shape[1])


def us_per_query(t: Transform, xq_new: np.ndarray, home_metric: str, n: int = 1024, repeats: int = 5) -> float:
    """Microseconds per query of ``apply_to_home`` on an n-query batch (xq_new tiled), best of ``repeats``."""
    x = np.ascontiguousarray(np.resize(np.asarray(xq_new, np.float32), (n, xq_new.shape[1])))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        apply_to_home(t, x, home_metric)
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def _gallery(t: Transform, xb_home: np.ndarray) -> np.ndarray:
    """xb_home, zero-padded to t.d_out for a transform that extends the home space (``d_home``, a basis)."""
    d_home = xb_home.shape[1]
    if t.d_out == d_home:
        return xb_home
    if getattr(t, "d_home", t.config.get("d_home")) == d_home:
        return pad_home(xb_home, t.d_out)
    raise ValueError(f"the transform maps to d_out={t.d_out} but the home gallery has d={d_home}")


def _check(name: str, x: np.ndarray, d: int | None = None) -> None:
    if not isinstance(x, np.ndarray) or x.ndim != 2 or (d is not None and x.shape[1] != d):
        shape = getattr(x, "shape", None)
        raise ValueError(f"{name} must be a 2-d array of shape (n, {d if d is not None else 'd'}), got {shape}")


def evaluate(
    t: Transform,
    *,
    home_metric: str = "cosine",
    xq_new: np.ndarray,
    xq_home: np.ndarray,
    xb_new: np.ndarray,
    xb_home: np.ndarray,
    relevant: Sequence[np.ndarray] | None = None,
    query_labels: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
    k: int = 10,
    cache: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The retrieval report (module docstring) of t on queries xq_* (nq, d_*) against galleries xb_* (nb, d_*).

    ``relevant``: None (query i's only relevant item is gallery row i; needs nq == nb) or one array of
    gallery rows per query. Keys: ``{home,new,raw,transformed}_{r1,r<k>,mrr<k>}`` (raw: None when
    d_new != d_home), with labels ``..._{cmc1,cmc5,map}``; ``ecc_margin``, ``retention``, ``retention_vs_new``,
    ``neg_flip``, ``nbr_agreement``, ``ortho_error`` (None when not linear), ``us_per_query`` (µs per query of a
    ``us_per_query_batch``-query batch, best of 5), ``k``, ``nq``, ``nb``.
    ``cache``: a dict kept by the caller across calls on the *same* data, to reuse the baseline searches."""
    if home_metric not in METRICS:
        raise ValueError(f"home_metric must be one of {', '.join(METRICS)}, got {home_metric!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    _check("xq_new", xq_new, t.d_in)
    _check("xb_new", xb_new, t.d_in)
    _check("xq_home", xq_home)
    _check("xb_home", xb_home, xq_home.shape[1])
    nq, nb = len(xq_new), len(xb_new)
    if len(xq_home) != nq or len(xb_home) != nb:
        raise ValueError(
            f"row counts differ: xq_new {nq} vs xq_home {len(xq_home)}, xb_new {nb} vs xb_home {len(xb_home)}"
        )
    if relevant is None and nq != nb:
        raise ValueError(
            f"relevant=None means query i's relevant item is gallery row i, so nq ({nq}) must equal nb ({nb})"
        )
    if relevant is not None:
        if len(relevant) != nq:
            raise ValueError(f"relevant has {len(relevant)} entries for {nq} queries")
        relevant = [np.asarray(r, dtype=np.int64).ravel() for r in relevant]
        bad = [i for i, r in enumerate(relevant) if len(r) == 0 or r.min() < 0 or r.max() >= nb]
        if bad:
            raise ValueError(f"relevant[{bad[0]}] must be a non-empty array of gallery rows in [0, {nb})")
    if (query_labels is None) != (gallery_labels is None):
        raise ValueError("query_labels and gallery_labels must be given together")
    if query_labels is not None and gallery_labels is not None and (len(query_labels), len(gallery_labels)) != (nq, nb):
        raise ValueError(f"labels must have {nq} (query) and {nb} (gallery) entries")
    gallery = _prep(_gallery(t, np.asarray(xb_home)), home_metric)
    n_rel = np.ones(nq) if relevant is None else np.array([len(np.unique(r)) for r in relevant], dtype=np.float64)
    cache = {} if cache is None else cache
    runs: dict[str, tuple[Callable[[], np.ndarray], Callable[[], np.ndarray]]] = {
        "home": (lambda: _prep(xq_home, home_metric), lambda: _prep(xb_home, home_metric)),
        "new": (lambda: _prep(xq_new, home_metric), lambda: _prep(xb_new, home_metric)),
        "raw": (lambda: _prep(xq_new, home_metric), lambda: _prep(xb_home, home_metric)),
        "transformed": (lambda: apply_to_home(t, xq_new, home_metric), lambda: gallery),
    }
    out: dict[str, Any] = {"k": k, "nq": nq, "nb": nb}
    I_all: dict[str, np.ndarray] = {}
    for mode, (q, b) in runs.items():
        key, cacheable = f"{mode}:{home_metric}:{k}", mode != "transformed"
        if mode == "raw" and xq_new.shape[1] != xb_home.shape[1]:
            out.update({f"raw_{m}": None for m in ("r1", f"r{k}", f"mrr{k}")})
            continue
        if cacheable and key in cache:
            I, extra = cache[key]
        else:
            xq, xb = q(), b()
            I = knn(xq, xb, k, home_metric)
            extra = {}
            if query_labels is not None and gallery_labels is not None:
                extra = label_metrics(xq, xb, np.asarray(query_labels), np.asarray(gallery_labels), home_metric)
            if cacheable:
                cache[key] = (I, extra)
        I_all[mode] = I
        out.update({f"{mode}_{m}": v for m, v in ranking_metrics(hits(I, relevant), n_rel, k).items()})
        out.update({f"{mode}_{m}": v for m, v in extra.items()})
    rk = f"r{k}"
    out["ecc_margin"] = out[f"transformed_{rk}"] - out[f"home_{rk}"]
    out["retention"] = out[f"transformed_{rk}"] / out[f"home_{rk}"] if out[f"home_{rk}"] > 0 else None
    out["retention_vs_new"] = out[f"transformed_{rk}"] / out[f"new_{rk}"] if out[f"new_{rk}"] > 0 else None
    top1_home, top1_t = hits(I_all["home"][:, :1], relevant)[:, 0], hits(I_all["transformed"][:, :1], relevant)[:, 0]
    out["neg_flip"] = float((top1_home & ~top1_t).mean())
    out["nbr_agreement"] = neighbourhood_agreement(I_all["transformed"], I_all["new"])
    form = t.affine("query")
    if form is not None:
        from .procrustes import orthogonality_error

        out["ortho_error"] = orthogonality_error(form[0])
    else:
        out["ortho_error"] = None
    out["us_per_query"] = us_per_query(t, xq_new, home_metric, n=US_BATCH)
    out["us_per_query_batch"] = US_BATCH  # the figure is per query of a batch this size, best of 5: not one query
    return out


def label_free_report(t: Transform, held_out: Calibration, home_metric: str = "cosine", k: int = 10) -> dict[str, Any]:
    """Cross-identification on held-out pairs, per side with pairs: T(x_new(i)) searches that side's held-out
    home items for x_home(i) (``{side}_xid_{r1,r<k>,mrr<k>}``), and ``{side}_nbr_agreement`` of that top-k
    with x_new(i)'s top-k among the held-out new items; ``{side}_n`` pairs; ``"label_free": True``."""
    if home_metric not in METRICS:
        raise ValueError(f"home_metric must be one of {', '.join(METRICS)}, got {home_metric!r}")
    out: dict[str, Any] = {"label_free": True}
    for side in SIDES:
        x_new, x_home = (
            (held_out.query_new, held_out.query_home) if side == "query" else (held_out.doc_new, held_out.doc_home)
        )
        out[f"{side}_n"] = len(x_new)
        if not len(x_new):
            continue
        I = knn(apply_to_home(t, x_new, home_metric, side), _prep(_gallery(t, x_home), home_metric), k, home_metric)
        out.update({f"{side}_xid_{m}": v for m, v in ranking_metrics(hits(I, None), np.ones(len(I)), k).items()})
        xn = _prep(x_new, home_metric)
        out[f"{side}_nbr_agreement"] = neighbourhood_agreement(I, knn(xn, xn, k, home_metric))
    return out
