"""PCA basis: an orthogonal rotation onto the principal axes, so that every prefix is the best linear truncation.

For a model not trained with a Matryoshka loss, the coordinates carry no order: the first m raw
dims are an arbitrary m of d. With R (d, d) the eigenvectors of the covariance of calibration
vectors, by descending eigenvalue, the rotated vector ``x @ R`` puts the most variance first:
among all m-dim orthogonal projections, its first m coordinates keep the most variance of the
calibration set (Eckart-Young), so a prefix of ``x @ R`` is the best *linear* truncation.

The map is applied **without translation** (``b = 0``): ``center_axes`` only chooses the matrix the
axes come from (the covariance, default, or the uncentred second moment ``XᵀX / n``), never shifts
x. R is orthogonal, so ``⟨xR, yR⟩ = ⟨x, y⟩`` and ``‖xR − yR‖ = ‖x − y‖``: full-dimensional scores and
rankings are exactly unchanged (to float32 rounding), only the order of the coordinates is new.
The map takes a collection's own space to itself (home -> home) and is applied to gallery and
queries alike; truncation then comes after it (``matryoshka.then_truncate``).

The artefact is an :class:`~.base.AffineTransform` of kind ``"pca_basis"`` (W = R for both sides,
b = 0), so it persists and composes with the existing machinery. Input: a
:class:`~.base.Calibration` (its home side, doc_home and query_home stacked: the collection's own
vectors) or a plain (n, d) array. Eigenvector signs are fixed (largest-magnitude entry positive)
so a fit is deterministic.

On debdesc (axes from the 10k docs + 10k queries of ``fit/``; dev R@10 of the m-dim re-normalized
prefix, as a fraction of full-dim R@10; ``bench/matryoshka.py``): MiniLM keeps 0.853 at m = 64
(raw truncation 0.831), e5-small 0.676 (raw 0.640). Uncentred axes: 0.852 and 0.631.

Covered by ``tests/test_matryoshka_transforms.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .base import AffineTransform, Calibration, FitResult, configure
from .procrustes import orthogonality_error

__all__ = [
    "REPORT_DIMS",
    "PCABasisConfig",
    "calibration_vectors",
    "fit_pca_basis",
    "principal_axes",
    "retained_variance",
]

REPORT_DIMS = (16, 32, 64, 128, 256)  #: prefix sizes whose retained variance goes into ``info`` (plus d)


def calibration_vectors(cal_or_vectors: Calibration | np.ndarray) -> np.ndarray:
    """The vectors a home-space fit uses, (n, d) float64: a Calibration's doc_home and query_home stacked, or
    the array itself. Raises ValueError for a non-2-d array, fewer than 2 rows or non-finite values."""
    if isinstance(cal_or_vectors, Calibration):
        parts = [a for a in (cal_or_vectors.doc_home, cal_or_vectors.query_home) if len(a)]
        if len({a.shape[1] for a in parts if a.ndim == 2}) > 1:
            raise ValueError(f"doc_home and query_home differ in dim: {[a.shape for a in parts]}")
        x = np.vstack(parts) if parts else np.zeros((0, 0))
    else:
        x = np.asarray(cal_or_vectors)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"vectors must be a 2-d numeric array (n, d), got shape {x.shape}")
    if len(x) < 2 or x.shape[1] < 1:
        raise ValueError(f"need at least 2 vectors of dim >= 1, got shape {x.shape}")
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        row = int(np.flatnonzero(~np.isfinite(x).all(1))[0])
        raise ValueError(f"vectors have non-finite values (NaN or Inf), first in row {row}")
    return x


def principal_axes(x: np.ndarray, center_axes: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(R (d, d), eigenvalues (d,)), float64: eigenvectors of cov(x) (or XᵀX/n) as columns, by descending
    eigenvalue, each with its largest-magnitude entry positive. x : (n, d)."""
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean(0) if center_axes else x
    C = xc.T @ xc / len(x)
    w, V = np.linalg.eigh((C + C.T) / 2)
    order = np.argsort(-w, kind="stable")
    w, V = np.maximum(w[order], 0.0), V[:, order]
    signs = np.sign(V[np.abs(V).argmax(0), np.arange(V.shape[1])])
    return V * np.where(signs == 0, 1.0, signs), w


def retained_variance(eigenvalues: np.ndarray, dims: tuple[int, ...]) -> dict[str, float]:
    """{str(m): fraction of the total variance in the first m axes} for each m <= d (and m = d)."""
    w = np.asarray(eigenvalues, dtype=np.float64)
    total = max(float(w.sum()), np.finfo(np.float64).tiny)
    ms = sorted({m for m in dims if 0 < m < len(w)} | {len(w)})
    return {str(m): float(w[:m].sum() / total) for m in ms}


@dataclass(frozen=True)
class PCABasisConfig:
    """How :func:`fit_pca_basis` fits: ``center_axes`` picks the covariance (True) or XᵀX / n; validated on
    construction."""

    center_axes: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.center_axes, bool):
            raise ValueError(f"center_axes must be a bool, got {self.center_axes!r}")

    def get_config_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_pca_basis(
    cal_or_vectors: Calibration | np.ndarray,
    config: PCABasisConfig | None = None,
    *,
    progress: Callable[[str, float], None] | None = None,
    **overrides: Any,
) -> FitResult:
    """Fits the rotation onto the principal axes of the home-space calibration vectors.

    Returns a FitResult with an AffineTransform(kind="pca_basis"): W = R (d, d) with RᵀR = I, b = 0.
    ``info``: ``n`` vectors, ``centered_axes``, ``ortho_error`` (‖RᵀR − I‖_F of the stored float32 R),
    ``eigenvalues`` (d, descending) and ``retained_variance`` ({m: fraction}, :data:`REPORT_DIMS` and d)."""
    cfg = configure(PCABasisConfig, config, overrides)
    center_axes = cfg.center_axes
    x = calibration_vectors(cal_or_vectors)
    if progress is not None:
        progress("covariance", 0.1)
    R, w = principal_axes(x, center_axes)
    if progress is not None:
        progress("eigh", 0.9)
    d = R.shape[0]
    saved = {"kind": "pca_basis", **cfg.get_config_dict()}
    t = AffineTransform({"query": R}, {"query": np.zeros(d)}, saved, kind="pca_basis")
    info: dict[str, Any] = {
        "n": len(x),
        "centered_axes": center_axes,
        "ortho_error": orthogonality_error(t.W["query"]),
        "eigenvalues": [float(v) for v in w],
        "retained_variance": retained_variance(w, REPORT_DIMS),
    }
    if progress is not None:
        progress("done", 1.0)
    return FitResult(t, info, [])
