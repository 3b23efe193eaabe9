"""Post-hoc basis transformation (after BT², Zhou et al., ICCV 2023): an isometry that extends the home space.

T (d_new, d_home + Δ) acts as ``x @ T`` with ``T Tᵀ = I_d_new``, so ⟨xT, x'T⟩ = ⟨x, x'⟩: an item
re-embedded later by the new model and stored as ``T(x_new)`` scores against ``T(q_new)`` exactly
as new-vs-new. Its first d_home coordinates (the prefix block A) approximate the home space, so an
old item stored as ``[x_home, 0]`` (:func:`pad_home`) scores ⟨x A, x_home⟩ against a new query.

Construction (pure functions, each tested alone):

1. A (d_new, d_home) = ridge least squares of the home vectors on the new vectors
   (:func:`~.affine.ridge_path`), with its singular values clipped to <= 1
   (:func:`clip_spectral`), so that ``I − A Aᵀ`` is PSD.
2. The suffix B' = (I − A Aᵀ)^(1/2) restricted to its range (:func:`complete_isometry`): with the
   eigendecomposition I − A Aᵀ = Q diag(μ) Qᵀ, B' = Q₊ diag(√μ₊) keeps the Δ eigenvalues μ > tol
   (largest first) and drops the directions where A already has singular value 1. Then
   A Aᵀ + B'B'ᵀ = I, i.e. T Tᵀ = I, and Δ = rank(I − A Aᵀ) <= d_new.

No bias: a translation would break ⟨xT, x'T⟩ = ⟨x, x'⟩ for inner-product scoring, so b = 0 on both
sides. Two ways to fit A with b = 0 were measured on debdesc (``bench/transforms.py``: fit on the
10k doc + 10k query pairs of ``fit/``; the 20k ``dev/`` new queries search the 20k old docs, cosine):

* ``center=False`` (default): A fitted on the raw pairs, so the linear map itself carries the new
  mean (norm ~0.9) onto the home mean (~0.35). Dev R@1 0.353, R@10 0.658 (Δ = 226: 158 of 384
  singular values clipped, the largest was 12.6). That beats the unconstrained ridge affine map
  with per-side biases (R@10 0.570): clipping caps the low-variance directions that least squares
  amplifies, and ranking against home items ignores the overall scale of x A.
* ``center=True``: A fitted on per-side centred pairs and the bias b = μy − μx A dropped. Dev R@1
  0.015, R@10 0.062: useless, since the dropped bias would have moved every home item's score by ⟨b, y⟩.

Covered by ``tests/test_transforms_linear.py``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .affine import ridge_path
from .base import SIDES, AffineTransform, Calibration, FitResult, check_bool, configure, pad_home
from .procrustes import Progress, biases, centred_pairs, orthogonality_error, relative_residual, side_means

__all__ = ["BasisConfig", "BasisTransform", "clip_spectral", "complete_isometry", "fit_basis", "pad_home"]

TOL = 1e-10  #: eigenvalues of I − AAᵀ at or below this are dropped (singular value 1 in A)


def clip_spectral(W: np.ndarray) -> tuple[np.ndarray, int, float]:
    """W (d_new, d_home) with its singular values clipped to <= 1: (A, how many were >= 1, largest before)."""
    U, S, Vt = np.linalg.svd(np.asarray(W, np.float64), full_matrices=False)
    return (U * np.minimum(S, 1.0)) @ Vt, int((S >= 1.0).sum()), float(S[0]) if len(S) else 0.0


def complete_isometry(A: np.ndarray, tol: float = TOL) -> np.ndarray:
    """T = [A, B'] (d_new, d_home + Δ) with T Tᵀ = I, from A (d_new, d_home) of spectral norm <= 1; float64.

    B' (d_new, Δ) = Q₊ diag(√μ₊) from I − A Aᵀ = Q diag(μ) Qᵀ, keeping μ > tol, largest first."""
    A = np.asarray(A, np.float64)
    if A.ndim != 2:
        raise ValueError(f"A must be a 2-d array, got shape {A.shape}")
    norm = float(np.linalg.norm(A, 2)) if A.size else 0.0
    if norm > 1 + 1e-8:
        raise ValueError(f"A has spectral norm {norm:.6g} > 1; clip its singular values first")
    K = np.eye(A.shape[0]) - A @ A.T
    mu, Q = np.linalg.eigh((K + K.T) / 2)
    keep = np.flatnonzero(mu > tol)[::-1]
    return np.hstack([A, Q[:, keep] * np.sqrt(mu[keep])])


class BasisTransform(AffineTransform):
    """x -> x @ T (b = 0), T (d_new, d_home + Δ) with T Tᵀ = I; ``config["d_home"]`` marks the prefix."""

    kind = "basis"

    def __init__(
        self, W: dict[str, np.ndarray], b: dict[str, np.ndarray], config: dict[str, Any], kind: str | None = None
    ) -> None:
        super().__init__(W, b, config, kind)
        d_home = self.config.get("d_home")
        if isinstance(d_home, bool) or not isinstance(d_home, int) or not 1 <= d_home <= self.d_out:
            raise ValueError(f"config['d_home'] must be an integer in [1, {self.d_out}], got {d_home!r}")
        self.d_home = d_home

    def arrays(self) -> dict[str, np.ndarray]:
        """W_*, b_* and ``d_home`` (shape (1,) int64), so the artefact marks its prefix even without its config."""
        return {**super().arrays(), "d_home": np.array([self.d_home], dtype=np.int64)}

    @classmethod
    def from_arrays(
        cls, d_in: int, d_out: int, config: dict[str, Any], arrays: dict[str, np.ndarray]
    ) -> BasisTransform:
        if "d_home" not in config and "d_home" in arrays:
            config = {**config, "d_home": int(np.asarray(arrays["d_home"]).ravel()[0])}
        W, b = {s: arrays[f"W_{s}"] for s in SIDES}, {s: arrays[f"b_{s}"] for s in SIDES}
        return cls(W, b, config, kind=config.get("kind", "basis"))

    @property
    def delta(self) -> int:
        """Δ: how many coordinates the new model adds beyond the home space."""
        return self.d_out - self.d_home

    def pad_home(self, x_home: np.ndarray) -> np.ndarray:
        """[x_home, 0] (n, d_home + Δ) float32 from x_home (n, d_home): old items in the extended space."""
        x = np.asarray(x_home)
        if x.ndim != 2 or x.shape[1] != self.d_home:
            raise ValueError(f"x_home must have shape (n, {self.d_home}), got {x.shape}")
        return pad_home(x, self.d_out)


@dataclass(frozen=True)
class BasisConfig:
    """How :func:`fit_basis` fits (see the module docstring); validated on construction."""

    ridge: float = 1e-2
    center: bool = False

    def __post_init__(self) -> None:
        ridge = self.ridge
        if isinstance(ridge, bool) or not isinstance(ridge, int | float) or not math.isfinite(ridge) or ridge < 0:
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
        check_bool("center", self.center)

    def get_config_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_basis(
    cal: Calibration, config: BasisConfig | None = None, *, progress: Progress | None = None, **overrides: Any
) -> FitResult:
    """Fits the basis transformation T = [A, B'] (see the module docstring); b = 0 on both sides.

    ``info``: ``delta``, ``residual`` (of the served prefix x A against the home vectors,
    :func:`~.procrustes.relative_residual`), ``residual_ls`` (the unclipped least-squares map, with its
    bias when centred: the unconstrained reference), ``clipped`` (singular values >= 1), ``sv_max``
    (largest before clipping), ``isometry_error`` (‖T Tᵀ − I‖_F of the float32 T), ``centered``."""
    cfg = configure(BasisConfig, config, overrides)
    ridge, center = cfg.ridge, cfg.center
    means = side_means(cal, center)
    Xc, Yc = centred_pairs(cal, means)
    [W] = ridge_path(Xc.T @ Xc, Xc.T @ Yc, [ridge])
    if progress is not None:
        progress("lstsq", 0.5)
    A, clipped, sv_max = clip_spectral(W)
    T = complete_isometry(A)
    d_home = A.shape[1]
    zero = {s: np.zeros(d_home) for s in means}
    saved = {"kind": "basis", "d_home": d_home, **cfg.get_config_dict()}
    t = BasisTransform({"query": T}, {"query": np.zeros(T.shape[1])}, saved)
    info: dict[str, Any] = {
        "delta": t.delta,
        "residual": relative_residual(cal, A, zero),
        "residual_ls": relative_residual(cal, W, biases(W, means) if center else zero),
        "clipped": clipped,
        "sv_max": sv_max,
        "isometry_error": orthogonality_error(t.W["query"]),
        "centered": center,
    }
    if progress is not None:
        progress("done", 1.0)
    return FitResult(t, info)
