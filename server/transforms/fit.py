"""Fitting any kind by name: checks, a held-out slice, the fit and its label-free report.

:func:`validate_calibration` runs on the request thread and raises ``ValueError`` with the reason
(the service maps it to INVALID_ARGUMENT): misaligned pairs, dims that differ between the doc and
query sides, NaN/Inf, missing pairs, or fewer pairs than d_new for the full-rank kinds
(procrustes, affine, basis: XcᵀXc must be able to reach full rank). :func:`validate_config` checks
the config keys against the kind's schema in the kind registry (:mod:`.kinds`, which ``KINDS`` and the
kind sets here come from), :func:`build_config` every value (the kind's config dataclass, built), and
:func:`check_split` that the pairs are enough for the kind once the held-out slices are set aside, so a
request the fit would refuse for its config or its size is refused before it is queued.

:func:`fit_transform` then sets aside a seeded ``holdout`` slice of each side's pairs
(:func:`~.evaluate.split_calibration`), fits on the rest and returns the FitResult with the
label-free report of the slice (:func:`~.evaluate.label_free_report`); relevance-based reports need
evaluation queries and are the caller's (:func:`~.evaluate.evaluate`). ``progress(stage, fraction)``
gets the overall fraction done in [0, 1]. The torch kinds (``lambda_orthogonal``, ``residual_mlp``,
``mrl_adapter``) import torch only when fitted. The paired kinds (``mrl_adapter``) train on row-aligned
(query_home[i], doc_home[i]) positives, so they need as many query as doc pairs and their held-out slice
takes the same rows from both sides. Covered by ``tests/test_transforms_linear.py`` (the Matryoshka kinds:
``tests/test_matryoshka_transforms.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from ..migration.calibration import fit_score_calibration
from .base import Calibration, FitResult, apply_to_home
from .evaluate import METRICS, _gallery, _prep, held_rows, label_free_report, split_calibration
from .kinds import FULL_RANK_KINDS, HOME_KINDS, KINDS, PAIRED_KINDS, get_kind
from .lambda_orthogonal import K as SWEEP_K
from .mining import mining_knn
from .offsets import choose_offsets, task_recall
from .procrustes import Progress

__all__ = [
    "FULL_RANK_KINDS",
    "HOME_KINDS",
    "KINDS",
    "PAIRED_KINDS",
    "build_config",
    "check_split",
    "fit_transform",
    "fitter",
    "validate_calibration",
    "validate_config",
]

_FIT_SPAN = (0.05, 0.9)  #: the fitter's share of the overall progress


def fitter(kind: str) -> Callable[..., FitResult]:
    """The fit function of ``kind`` (``fit_<kind>(cal, config=None, *, progress=None, **overrides) -> FitResult``),
    looked up on its module."""
    return get_kind(kind).fitter()


def _n_pairs(cal: Calibration) -> int:
    return len(cal.doc_new) + len(cal.query_new)


def validate_calibration(cal: Calibration, kind: str) -> None:
    """Raises ValueError naming the first problem with ``cal`` for fitting ``kind``; returns None if fit-ready."""
    spec = get_kind(kind)
    arrays = {
        "doc_new": cal.doc_new,
        "doc_home": cal.doc_home,
        "query_new": cal.query_new,
        "query_home": cal.query_home,
    }
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray) or a.ndim != 2 or not np.issubdtype(a.dtype, np.number):
            raise ValueError(f"{name} must be a 2-d numeric array, got {getattr(a, 'shape', type(a).__name__)}")
    for side in ("doc", "query"):
        n_new, n_home = len(arrays[f"{side}_new"]), len(arrays[f"{side}_home"])
        if n_new != n_home:
            raise ValueError(f"{side}_new has {n_new} rows but {side}_home has {n_home}: pairs must be row-aligned")
    n_doc, n_query = len(cal.doc_new), len(cal.query_new)
    if n_doc + n_query == 0:
        raise ValueError("no calibration pairs: give doc pairs, query pairs or both")
    if n_doc and n_query:
        for model in ("new", "home"):
            d_doc, d_query = arrays[f"doc_{model}"].shape[1], arrays[f"query_{model}"].shape[1]
            if d_doc != d_query:
                raise ValueError(f"doc_{model} has d={d_doc} but query_{model} has d={d_query}: one model, one dim")
    for name, a in arrays.items():
        if len(a) and not np.isfinite(a).all():
            row = int(np.flatnonzero(~np.isfinite(a).all(1))[0])
            raise ValueError(f"{name} has non-finite values (NaN or Inf), first in row {row}")
    for side, labels, n in (("doc", cal.doc_labels, n_doc), ("query", cal.query_labels, n_query)):
        if labels is not None and len(labels) != n:
            raise ValueError(f"{side}_labels has {len(labels)} entries for {n} {side} pairs")
    if cal.query_relevant is not None:
        if len(cal.query_relevant) != n_query:
            raise ValueError(f"query_relevant has {len(cal.query_relevant)} entries for {n_query} query pairs")
        for i, rel in enumerate(cal.query_relevant):
            r = np.asarray(rel)
            if r.ndim != 1 or (len(r) and (not np.issubdtype(r.dtype, np.integer) or r.min() < 0 or r.max() >= n_doc)):
                raise ValueError(f"query_relevant[{i}] must list doc-pair rows in [0, {n_doc}), got {r.tolist()[:5]}")
    if spec.full_rank and n_doc + n_query < cal.d_new:
        raise ValueError(f"{kind} needs at least d_new={cal.d_new} pairs for a full-rank fit, got {n_doc + n_query}")
    if spec.paired and n_doc != n_query:
        raise ValueError(
            f"{kind} trains on (query_home[i], doc_home[i]) positive pairs: got {n_query} queries and {n_doc} docs"
        )


def validate_config(kind: str, config: dict[str, Any]) -> None:
    """Raises ValueError when ``config`` has keys outside ``kind``'s config schema (:attr:`.kinds.Kind.config`),
    names another kind, or has a ``pseudo_relevance`` that is not a bool. The values of the schema's keys are
    :func:`build_config`'s to check."""
    accepted = set(get_kind(kind).config)
    unknown = sorted(set(config) - accepted - {"kind"})
    if unknown:
        raise ValueError(
            f"unknown config key(s) for {kind}: {', '.join(unknown)}; accepted: {', '.join(sorted(accepted))}"
        )
    if config.get("kind", kind) != kind:
        raise ValueError(f"kind is {config['kind']!r} in the config but the transform is a {kind}")
    if not isinstance(config.get("pseudo_relevance", True), bool):
        raise ValueError(f"pseudo_relevance must be true or false, got {config['pseudo_relevance']!r}")


_NOT_SETTINGS = ("kind", "pseudo_relevance")  #: config keys fit_transform reads itself


def build_config(kind: str, config: dict[str, Any], d_home: int | None = None) -> Any:
    """``kind``'s config dataclass (:attr:`.kinds.Kind.settings`) built from ``config``, whose keys
    :func:`validate_config` checked: its ``__post_init__`` checks every value (type and range) with the
    message the fit would give, so a request is refused before its fit is queued. With ``d_home``, the dim
    of the vectors it maps into, also what needs the dim (``check_dim``: mrl_adapter's nesting dims).
    ValueError naming the key, the value and what is allowed."""
    settings = get_kind(kind).settings
    if settings is None:
        raise ValueError(f"{kind} has no config")
    try:
        cfg = settings(**{k: v for k, v in config.items() if k not in _NOT_SETTINGS})
    except TypeError as e:  # a check compared a value of a type it did not expect: still the request's fault
        raise ValueError(f"{kind} config {config!r} has a value of the wrong type: {e}") from None
    check_dim = getattr(cfg, "check_dim", None)
    if d_home is not None and check_dim is not None:
        check_dim(d_home)
    return cfg


def _pseudo(kind: str, cal: Calibration, config: dict[str, Any]) -> bool:
    """Whether :func:`fit_transform` trains ``kind`` on :func:`with_pseudo_relevance` of ``cal``."""
    both_sides = len(cal.query_new) > 0 and len(cal.doc_new) > 0
    return (
        cal.query_relevant is None
        and kind not in HOME_KINDS
        and both_sides
        and bool(config.get("pseudo_relevance", True))
    )


def _more(held: int) -> str:
    return "give more pairs or a smaller holdout" if held else "give more pairs"


def check_split(cal: Calibration, kind: str, config: dict[str, Any], settings: Any, holdout: float) -> None:
    """Raises ValueError when the pairs of ``cal`` cannot be enough for ``kind`` once :func:`fit_transform`
    sets its seeded ``holdout`` slice aside, and affine (without ``ridge``) or lambda_orthogonal (sweeping
    ``lams``) a slice of the rest to choose on (``settings``: the kind's built config): the message says how
    many are needed. No vector is copied (:func:`~.evaluate.held_rows`). Under pseudo relevance the held-out
    docs are the top hits of the held-out queries, known only once searched: the check then counts the fewest
    (one), so it refuses only what must fail."""
    n, m = len(cal.doc_new), len(cal.query_new)
    total = n + m
    if kind in PAIRED_KINDS:  # one permutation of the pairs, both sides alike (_split_paired)
        kept = n - min(n, round(holdout * n))
        if kept < 2:
            raise ValueError(
                f"{kind} needs at least 2 positive pairs left to fit; holdout {holdout:g} sets {n - kept} of the {n} "
                f"given aside, leaving {kept}: {_more(n - kept)}"
            )
        return
    pseudo = _pseudo(kind, cal, config)
    if pseudo:
        q_held = min(m, round(holdout * m))
        d_held = min(1, q_held)
    else:
        d_rows, q_rows = held_rows(cal, holdout)
        d_held, q_held = len(d_rows), len(q_rows)
    n_fit, m_fit = n - d_held, m - q_held
    fitted = n_fit + m_fit
    need, what = 1, "1 pair left to fit"
    if kind in FULL_RANK_KINDS:
        need, what = cal.d_new, f"d_new={cal.d_new} pairs left to fit (a full-rank fit)"
    elif kind in HOME_KINDS:
        need, what = 2, "2 vectors left to fit its axes"
    if fitted < need:
        raise ValueError(
            f"{kind} needs at least {what}; holdout {holdout:g} sets {total - fitted} of the {total} given aside, "
            f"leaving {fitted}: {_more(total - fitted)}"
        )
    relevance = pseudo or cal.query_relevant is not None
    if kind == "affine" and settings.ridge is None:  # affine.fit_affine: split_calibration of the fitted pairs
        h = settings.holdout
        inner_q = min(m_fit, round(h * m_fit))
        inner = inner_q if relevance else inner_q + min(n_fit, round(h * n_fit))  # relevance: docs follow queries
        if inner == 0 or (not relevance and inner == fitted):
            sides = f"{m_fit} fitted query pairs" if relevance else f"{fitted} fitted pairs"
            raise ValueError(
                f"affine chooses its ridge on a held-out slice (config holdout {h:g}) of the fitted pairs, and "
                f"{sides} leave it or the rest empty: give more pairs, another config holdout or a ridge"
            )
    if kind == "lambda_orthogonal" and settings.lam is None and len(settings.lams) > 1 and not relevance:
        h = settings.holdout  # lambda_orthogonal.identification scores a side with more than K held-out pairs
        held_doc, held_query = min(n_fit, round(h * n_fit)), min(m_fit, round(h * m_fit))
        if max(held_doc, held_query) <= SWEEP_K:
            raise ValueError(
                f"lambda_orthogonal sweeps lam on a held-out slice (config holdout {h:g}) of the fitted pairs "
                f"that needs more than {SWEEP_K} pairs on a side; {n_fit} doc and {m_fit} query pairs give "
                f"{held_doc} and {held_query}: give more pairs, another config holdout or a lam"
            )


def with_pseudo_relevance(cal: Calibration, home_metric: str) -> Calibration:
    """``cal`` with each calibration query's relevant doc set to the calibration doc the *old* model ranks first
    for it (home query vs home docs): without logged clicks, the task becomes "find what the old model's own
    query found", which is what the service promises its users. Only for calibrations with both sides and no
    training relevance of their own."""
    I = mining_knn(_prep(cal.query_home, home_metric), _prep(cal.doc_home, home_metric), 1, home_metric)
    return replace(cal, query_relevant=tuple(np.asarray(row, dtype=np.int64) for row in I))


def _scaled(progress: Progress, kind: str, epochs: Any) -> Callable[..., None]:
    """Maps a fitter's progress onto the fit's share of the overall fraction. Takes (stage, fraction) as the
    linear kinds call it, or one record per epoch as the torch kinds do: {"epoch": ..., "fraction": ..., ...}
    (without ``fraction``, epoch / ``epochs`` stands in for it)."""
    lo, hi = _FIT_SPAN
    last = [lo]

    def report(stage: str | dict[str, float], fraction: float | None = None) -> None:
        if isinstance(stage, dict):
            epoch = stage.get("epoch")
            fraction = stage.get("fraction")
            if fraction is None and epoch is not None and isinstance(epochs, int) and epochs > 0:
                fraction = min(float(epoch) / epochs, 1.0)
            stage = f"{kind} epoch {int(epoch)}" if epoch is not None else kind
        if fraction is not None:
            last[0] = max(last[0], lo + (hi - lo) * min(max(float(fraction), 0.0), 1.0))
        progress(stage, last[0])

    return report


def _split_paired(cal: Calibration, holdout: float, seed: int) -> tuple[Calibration, Calibration]:
    """Like :func:`~.evaluate.split_calibration`, with one seeded permutation for both sides, so row i of the
    query and doc arrays stays a positive pair in both parts (n_doc == n_query is checked before)."""
    perm = np.random.default_rng(seed).permutation(len(cal.doc_new))
    n_held = min(len(perm), round(holdout * len(perm)))

    def take(rows: np.ndarray) -> Calibration:
        labels = [None if v is None else v[rows] for v in (cal.doc_labels, cal.query_labels)]
        return Calibration(cal.doc_new[rows], cal.doc_home[rows], cal.query_new[rows], cal.query_home[rows], *labels)

    return take(np.sort(perm[n_held:])), take(np.sort(perm[:n_held]))


def heldout_task_report(
    t: Any, train: Calibration, held: Calibration, home_metric: str, k: int = 10, pseudo: bool = False
) -> dict[str, Any]:
    """Retention estimated without evaluation queries: on the held-out calibration queries and their relevant
    docs (training relevance), ``heldout_task_r<k>`` / ``heldout_home_r<k>`` (T(new) vs the old model's own
    queries) and ``estimated_retention``; without training relevance the figures are None and
    ``retention_estimate`` says why (no number is invented)."""
    mapped = task_recall(t, held, home_metric, k, train.doc_home)
    if mapped is None:
        return {
            "estimated_retention": None,
            "retention_estimate": "none: no evaluation queries and no training relevance in the held-out slice",
        }
    out: dict[str, Any] = {f"heldout_task_{m}": v for m, v in mapped.items()}
    if pseudo:  # relevance is the old model's own top-1: home->home finds it by construction, so no search
        out["estimated_retention"] = None
        out["retention_estimate"] = (
            "none: no evaluation queries and no training relevance (trained on pseudo relevance: heldout_task_* "
            "is how often T(new) finds the doc the old model ranked first)"
        )
        return out
    home = task_recall(None, held, home_metric, k, train.doc_home)
    if home is None:  # cannot happen: the same slice gave the mapped figures
        raise ValueError("the held-out slice lost its relevance")
    out.update({f"heldout_home_{m}": v for m, v in home.items()})
    out["estimated_retention"] = mapped[f"r{k}"] / home[f"r{k}"] if home[f"r{k}"] > 0 else None
    out["retention_estimate"] = (
        f"held-out calibration slice: {len(held.query_new)} queries searching their {len(held.doc_new)} relevant "
        f"docs among {len(held.doc_new) + len(train.doc_new)} calibration docs; the same slice chose the query offsets"
    )
    return out


CALIBRATION_DOCS = 65536  #: calibration docs (held-out first, then fitted) the score calibration is fitted among


def _score_calibration(
    t: Any, train: Calibration, held: Calibration, home_metric: str, new_metric: str
) -> dict[str, Any]:
    """The :class:`~interlingua.server.migration.calibration.ScoreCalibration` (as a dict) of T(held-out new
    queries) searching the old docs onto their native new-space scores, among the held-out and fitted docs (top
    scores rise with the gallery, so as many docs as the calibration has, up to ``CALIBRATION_DOCS``)."""
    doc_new = np.vstack([held.doc_new, train.doc_new])[:CALIBRATION_DOCS]
    doc_home = np.vstack([held.doc_home, train.doc_home])[:CALIBRATION_DOCS]
    mapped = apply_to_home(t, held.query_new, home_metric)
    docs = _prep(_gallery(t, doc_home), home_metric)
    fitted = fit_score_calibration(held.query_new, mapped, doc_new, docs, metric_new=new_metric, metric_old=home_metric)
    out: dict[str, Any] = fitted.to_dict()
    return out


def doc_moments(t: Any, x_src: np.ndarray, x_tgt: np.ndarray, target_metric: str) -> dict[str, Any]:
    """How to put a transform's doc side on the target model's own scale when it maps gallery vectors (a
    migration's forward upgrade): ``(y - mapped_mean) * ratio + target_mean`` with y = T(x_src, "doc") (unit rows
    for cosine), so mapped docs have the target docs' mean and mean distance to it (``bench/backfill.py``: without
    it, mapped rows sat off the native score scale and every native doc outranked every mapped one).
    x_src (n, d_in), x_tgt (n, d_out): the fit's doc pairs."""
    y = np.asarray(t.apply(np.ascontiguousarray(x_src, dtype=np.float32), "doc"), dtype=np.float64)
    if target_metric == "cosine":
        y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    z = np.asarray(x_tgt, dtype=np.float64)
    mf, mn = y.mean(0), z.mean(0)
    ratio = float(np.linalg.norm(z - mn, axis=1).mean() / max(np.linalg.norm(y - mf, axis=1).mean(), 1e-12))
    return {"mapped_mean": mf.tolist(), "target_mean": mn.tolist(), "ratio": ratio}


def fit_transform(
    kind: str,
    cal: Calibration,
    config: dict[str, Any],
    *,
    holdout: float = 0.1,
    seed: int = 0,
    home_metric: str = "cosine",
    new_metric: str = "cosine",
    progress: Progress | None = None,
) -> tuple[FitResult, dict[str, Any]]:
    """Validates, fits ``kind`` on all but a seeded ``holdout`` slice of each side's pairs, and reports on the slice.

    ``config`` is passed to the fitter as keywords, which build its config dataclass (plus ``seed`` when the
    dataclass has one and config has none),
    but for ``pseudo_relevance`` (default true): a new -> home kind fitted on doc and query pairs without
    training relevance trains on :func:`with_pseudo_relevance` instead. Returns (FitResult, report):
    :func:`~.evaluate.label_free_report` of the held-out slice plus ``relevance`` ("given", "pseudo" or
    "none"), the held-out task figures, ``holdout``, ``seed``, ``fit_pairs``, ``heldout_pairs`` and
    ``fit_seconds``. For a new -> home kind whose slice has query and doc pairs, ``FitResult.info`` gets
    ``score_calibration`` (:func:`_score_calibration`, onto the new space's ``new_metric`` scores): how a
    migration merges its old- and new-index scores."""
    validate_calibration(cal, kind)
    validate_config(kind, config)
    if isinstance(holdout, bool) or not isinstance(holdout, int | float) or not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout!r}")
    for name, metric in (("home_metric", home_metric), ("new_metric", new_metric)):
        if metric not in METRICS:
            raise ValueError(f"{name} must be one of {', '.join(METRICS)}, got {metric!r}")
    relevance = "given" if cal.query_relevant is not None else "none"
    if _pseudo(kind, cal, config):
        cal, relevance = with_pseudo_relevance(cal, home_metric), "pseudo"
    if progress is not None:
        progress("split", 0.0)
    train, held = _split_paired(cal, holdout, seed) if kind in PAIRED_KINDS else split_calibration(cal, holdout, seed)
    n_train, n_held = _n_pairs(train), _n_pairs(held)
    if kind in FULL_RANK_KINDS and n_train < cal.d_new:
        raise ValueError(
            f"{kind} needs at least d_new={cal.d_new} pairs for a full-rank fit; holdout {holdout} leaves {n_train} "
            f"of {n_train + n_held}"
        )
    fn, params = fitter(kind), get_kind(kind).params
    kwargs = {k: v for k, v in config.items() if k not in _NOT_SETTINGS}
    if "seed" in params and "seed" not in kwargs:
        kwargs["seed"] = seed
    if progress is not None:  # every fitter takes progress beside its config
        epochs = kwargs.get("epochs", params["epochs"].default if "epochs" in params else None)
        kwargs["progress"] = _scaled(progress, kind, epochs)
    t0 = time.perf_counter()
    result = fn(train, **kwargs)
    if kind not in HOME_KINDS and n_held:
        result.transform, chosen = choose_offsets(result.transform, train, held, home_metric)
        result.info.update(chosen)
    fit_seconds = time.perf_counter() - t0
    if progress is not None:
        progress("report", _FIT_SPAN[1])
    report: dict[str, Any] = {"label_free": True}
    if n_held:
        report = label_free_report(result.transform, held, home_metric)
        if kind not in HOME_KINDS:
            pseudo = relevance == "pseudo"
            report.update(heldout_task_report(result.transform, train, held, home_metric, pseudo=pseudo))
            if len(held.query_new) and len(held.doc_new):  # merges old- and new-index scores during a migration
                calibration = _score_calibration(result.transform, train, held, home_metric, new_metric)
                result.info["score_calibration"] = calibration
    if kind not in HOME_KINDS and len(train.doc_new) >= 2:  # a forward upgrade's gallery-side correction
        result.info["doc_moments"] = doc_moments(result.transform, train.doc_new, train.doc_home, home_metric)
    report.update(
        relevance=relevance,
        holdout=float(holdout),
        seed=seed,
        fit_pairs=n_train,
        heldout_pairs=n_held,
        fit_seconds=fit_seconds,
    )
    if progress is not None:
        progress("done", 1.0)
    return result, report
