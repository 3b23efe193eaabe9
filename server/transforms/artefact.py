"""A fitted transform as a storable artefact: fit (or compose), evaluate, config, report, checksum, weights.

:func:`build_artefact` is the one path from calibration data to an artefact, shared by the service's
background fit job (``server/compat.py``) and the offline ``interlingua fit --offline`` command, so both
store the same config (the transform's own config, e.g. a basis's ``d_home`` or the ridge actually
chosen, under the caller's), the same JSON-clean report and the same checksum.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from interlingua.jsonsafe import finite

from .base import Calibration, Transform, checksum
from .evaluate import _prep, evaluate, hits, knn, ranking_metrics
from .fit import fit_transform
from .kinds import HOME_KINDS
from .matryoshka import shrink
from .pca_basis import REPORT_DIMS
from .procrustes import Progress

__all__ = ["Artefact", "EvalData", "build_artefact", "jsonable"]


@dataclass(frozen=True)
class EvalData:
    """Evaluation queries and gallery in both spaces: xq_* (nq, d), xb_* (nb, d); ``relevant`` is one array
    of gallery rows per query, or None when query i's only relevant item is gallery row i."""

    xq_new: np.ndarray
    xq_home: np.ndarray
    xb_new: np.ndarray
    xb_home: np.ndarray
    relevant: list[np.ndarray] | None = None
    query_labels: np.ndarray | None = None  #: (nq,) int64 class labels (CMC, mAP), with gallery_labels
    gallery_labels: np.ndarray | None = None  #: (nb,) int64


@dataclass(frozen=True)
class Artefact:
    transform: Transform
    kind: str
    config: dict[str, Any]  #: what was used, "kind" included: the checksum covers it
    report: dict[str, Any]  #: JSON-clean
    checksum: str

    def weights(self) -> bytes:
        """The transform's arrays as an ``np.savez`` archive."""
        buf = io.BytesIO()
        np.savez(buf, **self.transform.arrays())  # type: ignore[arg-type]
        return buf.getvalue()


def jsonable(o: Any) -> Any:
    """``json.dumps`` default for numpy scalars and arrays."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


_BOOKKEEPING = ("holdout", "seed", "fit_pairs", "heldout_pairs", "fit_seconds")


def prefix_recall(
    fn: Transform, e: EvalData, home_metric: str, dims: tuple[int, ...] = REPORT_DIMS, k: int = 10
) -> dict[str, float]:
    """Recall@k of the home-space evaluation queries against the gallery, both mapped by a home -> home
    transform and cut to each prefix m (re-normalized unless l2): {m: recall}, plus the full dim."""
    q, b = fn.apply(e.xq_home, "query"), fn.apply(e.xb_home, "doc")
    out = {}
    for m in [m for m in dims if m < fn.d_out] + [fn.d_out]:
        normalize = home_metric != "l2"
        I = knn(
            _prep(shrink(q, m, normalize), home_metric), _prep(shrink(b, m, normalize), home_metric), k, home_metric
        )
        H = hits(I, e.relevant)
        n_rel = np.ones(len(I)) if e.relevant is None else np.array([len(np.unique(r)) for r in e.relevant], float)
        out[str(m)] = ranking_metrics(H, n_rel, k)[f"r{k}"]
    return out


def build_artefact(
    kind: str,
    cal: Calibration,
    config: dict[str, Any],
    *,
    home_metric: str,
    holdout: float = 0.1,
    eval_data: EvalData | None = None,
    links: list[Transform] | None = None,
    progress: Progress | None = None,
) -> Artefact:
    """Fits ``kind`` on ``cal`` (or composes ``links`` for a chain), evaluates it, and packs the artefact.

    The report holds the label-free figures of the held-out slice and the fit's own numbers (``fit``);
    with ``eval_data`` also the relevance-based ones (``ecc_margin``, ``retention``, ...), and
    ``label_free`` is then False. Raises ValueError for bad data or config."""
    if kind == "chain":
        from .chain import compose

        fn = compose(links or [])
        report: dict[str, Any] = {"label_free": True}
    elif kind in HOME_KINDS:  # home -> home (a collection basis): cross-space figures would mean nothing
        result, fitted = fit_transform(kind, cal, config, holdout=holdout, home_metric=home_metric, progress=progress)
        fn = result.transform
        report = {key: fitted[key] for key in _BOOKKEEPING if key in fitted}
        report.update(fit=result.info, label_free=eval_data is None)
        if eval_data is not None:
            report["recall_at_dims"] = prefix_recall(fn, eval_data, home_metric)
        eval_data = None
    else:
        result, report = fit_transform(kind, cal, config, holdout=holdout, home_metric=home_metric, progress=progress)
        fn = result.transform
        report = {**report, "fit": result.info}
    if eval_data is not None:
        if progress is not None:
            progress("evaluate", 0.95)
        e = eval_data
        report.update(
            evaluate(
                fn,
                home_metric=home_metric,
                xq_new=e.xq_new,
                xq_home=e.xq_home,
                xb_new=e.xb_new,
                xb_home=e.xb_home,
                relevant=e.relevant,
                query_labels=e.query_labels,
                gallery_labels=e.gallery_labels,
            )
        )
        report["label_free"] = False  # relevance-based figures present; the *_xid_* ones stay label-free
    saved = {**fn.config, **config, "kind": kind}
    saved = finite(json.loads(json.dumps(saved, default=jsonable)))
    report = finite(json.loads(json.dumps(report, default=jsonable)))
    return Artefact(fn, kind, saved, report, checksum(kind, saved, fn.arrays()))
