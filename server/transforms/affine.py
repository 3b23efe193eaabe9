"""Affine least squares with a ridge: the unconstrained linear map from the new space to the home space.

The pairs are centred per side (as in ``procrustes.py``), W (d_new, d_home) solves the centred
normal equations ``(XcᵀXc + λ I) W = XcᵀYc`` in closed form, and b[side] = μy[side] − μx[side] W,
so the bias is not penalized and each side keeps its own offset while W is shared. λ is in the
units of XcᵀXc (a sum over pairs, not a mean), as in scikit-learn's ``Ridge(alpha=λ)``. λ = 0 is
the minimum-norm least-squares solution (pseudo-inverse; eigenvalues below d·eps·λmax are dropped).

With ``ridge=None`` λ is chosen from ``ridges`` on a held-out slice: a seeded split of each side's
pairs (:func:`~.evaluate.split_calibration`) is set aside, one W per λ is fitted on the rest (one
eigendecomposition of XcᵀXc serves the whole path, :func:`ridge_path`), and the λ with the lowest
held-out MSE (per element, bias included) wins; it is then refitted on all pairs. Covered by
``tests/test_transforms_linear.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import MAX_SEED, AffineTransform, Calibration, FitResult, check_int, check_threads, configure
from .evaluate import split_calibration
from .procrustes import (
    Progress,
    biases,
    centred_pairs,
    check_task_epochs,
    orthogonality_error,
    relative_residual,
    side_means,
)

__all__ = ["DEFAULT_RIDGES", "AffineConfig", "fit_affine", "mse", "ridge_path"]

DEFAULT_RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def ridge_path(C: np.ndarray, M: np.ndarray, ridges: Sequence[float]) -> list[np.ndarray]:
    """W(λ) = (C + λ I)⁻¹ M for every λ, from one eigendecomposition of C; float64.

    C : (d_new, d_new) symmetric PSD (XcᵀXc), M : (d_new, d_home) (XcᵀYc). Returns one (d_new, d_home)
    array per λ; λ = 0 gives the pseudo-inverse solution."""
    lam, Q = np.linalg.eigh((C + C.T) / 2)
    lam = np.maximum(lam, 0.0)
    QtM = Q.T @ M
    cutoff = len(lam) * np.finfo(np.float64).eps * max(float(lam[-1]), np.finfo(np.float64).tiny)
    out = []
    for r in ridges:
        inv = 1.0 / (lam + r) if r > 0 else np.where(lam > cutoff, 1.0 / np.maximum(lam, cutoff), 0.0)
        out.append(Q @ (QtM * inv[:, None]))
    return out


def mse(cal: Calibration, W: np.ndarray, b: dict[str, np.ndarray]) -> float:
    """Mean over pairs and coordinates of (x W + b[side] − y)²."""
    num, count = 0.0, 0
    for x, y, s in ((cal.doc_new, cal.doc_home, "doc"), (cal.query_new, cal.query_home, "query")):
        if len(x):
            num += float(((np.asarray(x, np.float64) @ W + b[s] - np.asarray(y, np.float64)) ** 2).sum())
            count += y.size
    return num / max(count, 1)


def _check_ridge(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _fit(cal: Calibration, ridges: Sequence[float]) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    means = side_means(cal, center=True)
    Xc, Yc = centred_pairs(cal, means)
    return [(W, biases(W, means)) for W in ridge_path(Xc.T @ Xc, Xc.T @ Yc, ridges)]


@dataclass(frozen=True)
class AffineConfig:
    """How :func:`fit_affine` fits; validated on construction. ``ridges``, ``holdout`` and ``seed`` choose λ
    when ``ridge`` is None; ``threads``: torch threads of the task refinement (None: torch's default)."""

    ridge: float | None = None
    ridges: Sequence[float] = DEFAULT_RIDGES
    holdout: float = 0.1
    seed: int = 0
    task_epochs: int = 5
    threads: int | None = None

    def __post_init__(self) -> None:
        check_task_epochs(self.task_epochs)
        check_threads(self.threads)
        check_int("seed", self.seed, 0, MAX_SEED)
        if self.ridge is not None:
            _check_ridge("ridge", self.ridge)
        ridges, holdout = self.ridges, self.holdout  # checked with a ridge given too: a request's values all are
        if isinstance(ridges, str) or not isinstance(ridges, Sequence) or len(ridges) == 0:
            raise ValueError(f"ridges must be a non-empty sequence, got {ridges!r}")
        for r in ridges:
            _check_ridge("every ridge in ridges", r)
        if isinstance(holdout, bool) or not isinstance(holdout, int | float) or not 0 < holdout < 1:
            raise ValueError(f"holdout must be in (0, 1), got {holdout!r}")

    def get_config_dict(self) -> dict[str, Any]:
        """What the artefact keeps: the ridge (the chosen one is the fit's, see :func:`fit_affine`), task_epochs."""
        return {"ridge": self.ridge, "task_epochs": self.task_epochs}


def fit_affine(
    cal: Calibration, config: AffineConfig | None = None, *, progress: Progress | None = None, **overrides: Any
) -> FitResult:
    """Fits the ridge affine map; with ``ridge=None`` λ is chosen on a seeded held-out slice.

    With training relevance and ``task_epochs`` > 0, W and b are then refined on the retrieval task for
    that many epochs (``train/refine.py``, W free); ``info["task_epochs"]`` says how many ran.

    Returns a FitResult with an AffineTransform(kind="affine"): W (d_new, d_home) shared, b[side] (d_home,).
    ``info``: ``ridge`` (chosen), ``heldout_mse`` ({str(λ): MSE}, empty when ``ridge`` is given),
    ``ortho_error`` (‖WᵀW − I‖_F, :func:`~.procrustes.orthogonality_error`), ``residual``."""
    cfg = configure(AffineConfig, config, overrides)
    ridge, ridges, holdout, seed, task_epochs = cfg.ridge, cfg.ridges, cfg.holdout, cfg.seed, cfg.task_epochs
    heldout_mse: dict[str, float] = {}
    if ridge is None:
        train, held = split_calibration(cal, holdout, seed)
        n_held, n_train = len(held.doc_new) + len(held.query_new), len(train.doc_new) + len(train.query_new)
        if n_held == 0 or n_train == 0:
            raise ValueError(
                f"holdout {holdout} of {n_held + n_train} pairs leaves no pairs to fit or to choose the ridge on; "
                "pass ridge or change holdout"
            )
        for i, (r, (W, b)) in enumerate(zip(ridges, _fit(train, ridges), strict=True)):
            heldout_mse[str(r)] = mse(held, W, b)
            if progress is not None:
                progress("ridge", (i + 1) / (len(ridges) + 1))
        ridge = float(ridges[int(np.argmin(list(heldout_mse.values())))])
    [(W, b)] = _fit(cal, [ridge])
    info: dict[str, Any] = {
        "ridge": ridge,
        "heldout_mse": heldout_mse,
        "ortho_error": orthogonality_error(W),
        "residual": relative_residual(cal, W, b),
    }
    saved = {"kind": "affine", **cfg.get_config_dict(), "ridge": ridge}
    t = AffineTransform({"query": W}, b, saved, kind="affine")
    info["task_epochs"] = 0
    history: list[dict[str, float]] = []
    if task_epochs and len(cal.links()):
        from .train import TrainConfig, refine_linear

        if progress is not None:
            progress("task refinement", 0.6)
        t, history = refine_linear(t, cal, TrainConfig(epochs=task_epochs), orthogonal=False, threads=cfg.threads)
        info["task_epochs"] = task_epochs
    if progress is not None:
        progress("done", 1.0)
    return FitResult(t, info, history)
