"""Orthogonal Procrustes: the rotation (or isometric embedding) that best maps new vectors onto home vectors.

With X the new vectors (n, d_new) and Y the home vectors (n, d_home), both centred per side
(``center=True``: doc pairs by the doc means, query pairs by the query means; a side without
pairs borrows the other side's means), the SVD ``XcᵀYc = U Σ Vᵀ`` gives ``R = U Vᵀ`` and the
isotropic scale ``s = trace(Σ) / ‖Xc‖_F²`` (``scale=True``; the least-squares scale for R). The
serve map per side is ``y = (x − μx[side]) s R + μy[side]``, stored as ``W = s R`` and
``b[side] = μy[side] − μx[side] W``: an :class:`AffineTransform` of kind ``"procrustes"``.

Shapes of R (d_new, d_home):

* ``d_new == d_home``: R is orthogonal (RᵀR = RRᵀ = I), the exact Procrustes solution.
* ``d_new < d_home``: R has orthonormal *rows* (RRᵀ = I_d_new): x -> x R is an isometric
  embedding into the home space, norms and inner products are kept; U Vᵀ is still exact,
  because ‖Xc R‖_F = ‖Xc‖_F for every such R.
* ``d_new > d_home``: R has orthonormal *columns* (RᵀR = I_d_home), a projection: ‖Xc R‖_F now
  depends on R, so U Vᵀ is only a starting point. :func:`refine_stiefel` then runs Riemannian
  gradient descent on the Stiefel manifold (projected gradient, QR retraction, Armijo
  backtracking, scale re-fitted at every step), which never increases the loss.

Uncentred Procrustes (``center=False``) must map the new model's common mean (norm ~0.9 on
debdesc) onto the home mean (norm ~0.35) by a rotation, which it cannot: on debdesc (fit on
``fit/``, the 20k ``dev/`` new queries search the 20k old docs) it reaches R@10 0.050 against 0.509
for the centred map. It is kept for comparison (``tests/test_transforms_linear.py`` checks the
claim on a 500-row slice of debdesc).

Pure functions shared by the linear kinds (``affine.py``, ``basis.py``) live here:
:func:`side_means`, :func:`centred_pairs`, :func:`relative_residual`, :func:`orthogonality_error`.
Covered by ``tests/test_transforms_linear.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import SIDES, AffineTransform, Calibration, FitResult, check_bool, check_threads, configure

__all__ = [
    "ProcrustesConfig",
    "Progress",
    "centred_pairs",
    "check_task_epochs",
    "fit_procrustes",
    "orthogonality_error",
    "procrustes_rotation",
    "refine_stiefel",
    "relative_residual",
    "side_means",
    "stiefel_loss",
]

Progress = Callable[[str, float], None]
MAX_REFINE_STEPS = 10_000  #: a fit is a request: Stiefel refinement steps are capped (default 200)
Means = dict[str, tuple[np.ndarray, np.ndarray]]  #: side -> (μx (d_new,), μy (d_home,)), float64


def _side(cal: Calibration, side: str) -> tuple[np.ndarray, np.ndarray]:
    if side == "doc":
        return cal.doc_new, cal.doc_home
    return cal.query_new, cal.query_home


def side_means(cal: Calibration, center: bool = True) -> Means:
    """Per side: (mean of the new vectors (d_new,), mean of the home vectors (d_home,)), float64.

    A side without pairs takes the other side's means; ``center=False`` gives zeros."""
    means: Means = {}
    for s in SIDES:
        x, y = _side(cal, s)
        if not center:
            means[s] = (np.zeros(cal.d_new), np.zeros(cal.d_home))
        elif len(x):
            means[s] = (np.asarray(x, np.float64).mean(0), np.asarray(y, np.float64).mean(0))
    for s, other in zip(SIDES, SIDES[::-1], strict=True):
        if s not in means:
            means[s] = means[other]
    return means


def centred_pairs(cal: Calibration, means: Means) -> tuple[np.ndarray, np.ndarray]:
    """Every pair centred by its own side's means, docs first: Xc (n, d_new), Yc (n, d_home), float64."""
    xs, ys = [], []
    for s in ("doc", "query"):
        x, y = _side(cal, s)
        xs.append(np.asarray(x, np.float64) - means[s][0])
        ys.append(np.asarray(y, np.float64) - means[s][1])
    return np.vstack(xs), np.vstack(ys)


def biases(W: np.ndarray, means: Means) -> dict[str, np.ndarray]:
    """b[side] = μy[side] − μx[side] W (d_home,), so that x W + b = (x − μx) W + μy."""
    return {s: means[s][1] - means[s][0] @ W for s in SIDES}


def relative_residual(cal: Calibration, W: np.ndarray, b: dict[str, np.ndarray]) -> float:
    """Σ‖x W + b[side] − y‖² / Σ‖y − ȳ[side]‖² over all pairs: 0 is exact, 1 is as good as each side's mean.

    The denominator is always per-side centred, so centred and uncentred fits compare on one scale."""
    num = den = 0.0
    for s, ybar in side_means(cal, center=True).items():
        x, y = _side(cal, s)
        if len(x):
            y = np.asarray(y, np.float64)
            num += float(((np.asarray(x, np.float64) @ W + b[s] - y) ** 2).sum())
            den += float(((y - ybar[1]) ** 2).sum())
    return num / max(den, np.finfo(np.float64).tiny)


def orthogonality_error(W: np.ndarray) -> float:
    """‖WᵀW − I‖_F when d_in >= d_out (orthonormal columns), else ‖WWᵀ − I‖_F (orthonormal rows).

    W : (d_in, d_out). The smaller Gram matrix is the one an isometry (or projection) makes I."""
    W = np.asarray(W, np.float64)
    G = W.T @ W if W.shape[0] >= W.shape[1] else W @ W.T
    return float(np.linalg.norm(G - np.eye(len(G))))


def procrustes_rotation(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """R = U Vᵀ from the thin SVD of M = XcᵀYc (d_new, d_home); returns (R (d_new, d_home), Σ (min(d),))."""
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    return U @ Vt, S


def stiefel_loss(R: np.ndarray, s: float, C: np.ndarray, M: np.ndarray, yy: float) -> float:
    """‖s Xc R − Yc‖_F² from C = XcᵀXc (d_new, d_new), M = XcᵀYc (d_new, d_home), yy = ‖Yc‖_F²."""
    loss = s * s * np.einsum("ij,ij->", R, C @ R) - 2 * s * np.einsum("ij,ij->", R, M) + yy
    return max(float(loss), 0.0)  # >= 0 up to the cancellation error of the expansion


def _best_scale(R: np.ndarray, C: np.ndarray, M: np.ndarray) -> float:
    """argmin_s ‖s Xc R − Yc‖²: ⟨Xc R, Yc⟩ / ‖Xc R‖² (trace(Σ)/‖Xc‖² when R is U Vᵀ and isometric)."""
    return float(np.einsum("ij,ij->", R, M) / max(np.einsum("ij,ij->", R, C @ R), np.finfo(np.float64).tiny))


def _qf(A: np.ndarray) -> np.ndarray:
    """The Q factor of A (d, p), d >= p, with a positive diagonal in R: the QR retraction onto the Stiefel manifold."""
    Q, Rr = np.linalg.qr(A)
    signs = np.where(np.diag(Rr) < 0, -1.0, 1.0)
    return Q * signs


def refine_stiefel(
    R: np.ndarray,
    C: np.ndarray,
    M: np.ndarray,
    yy: float,
    *,
    scale: bool,
    steps: int,
    progress: Progress | None = None,
) -> tuple[np.ndarray, float, list[dict[str, float]]]:
    """Minimizes ‖s Xc R − Yc‖² over R (d_new, d_home) with RᵀR = I, from R; returns (R, s, history).

    Each step re-fits s (when ``scale``), takes the Riemannian gradient ``G − R sym(RᵀG)`` of the
    Euclidean gradient ``G = 2 s (s C R − M)``, and retracts ``R − η ξ`` by QR with Armijo
    backtracking (η starts at 1/L, L = 2 s² λmax(C)). A step is kept only if it lowers the loss,
    so the result is never worse than the start."""
    s = _best_scale(R, C, M) if scale else 1.0
    loss = stiefel_loss(R, s, C, M, yy)
    history = [{"step": 0.0, "loss": loss, "scale": s}]
    lmax = float(np.linalg.eigvalsh(C)[-1])
    for step in range(1, steps + 1):
        if scale:
            s = _best_scale(R, C, M)
            loss = stiefel_loss(R, s, C, M, yy)
        G = 2 * s * (s * (C @ R) - M)
        sym = R.T @ G
        xi = G - R @ ((sym + sym.T) / 2)
        g2 = float((xi**2).sum())
        if g2 <= 1e-30 * max(abs(loss), 1.0):
            break
        eta, accepted = 1.0 / max(2 * s * s * lmax, 1e-300), False
        for _ in range(30):
            R_new = _qf(R - eta * xi)
            new = stiefel_loss(R_new, s, C, M, yy)
            if new <= loss - 1e-4 * eta * g2:
                accepted = True
                break
            eta /= 2
        if not accepted:
            break
        decrease = loss - new
        R, loss = R_new, new
        history.append({"step": float(step), "loss": loss, "scale": s})
        if progress is not None:
            progress("refine", step / steps)
        if decrease <= 1e-12 * max(abs(loss), 1.0):
            break
    return R, s, history


@dataclass(frozen=True)
class ProcrustesConfig:
    """How :func:`fit_procrustes` fits; validated on construction. ``threads``: torch threads of the task
    refinement (None: torch's default)."""

    center: bool = True
    scale: bool = True
    refine_steps: int = 200
    task_epochs: int = 5
    threads: int | None = None

    def __post_init__(self) -> None:
        check_bool("center", self.center)
        check_bool("scale", self.scale)
        check_task_epochs(self.task_epochs)
        check_threads(self.threads)
        steps = self.refine_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"refine_steps must be an integer >= 0, got {steps!r}")
        if steps > MAX_REFINE_STEPS:
            raise ValueError(f"refine_steps must be at most {MAX_REFINE_STEPS}, got {steps!r}")

    def get_config_dict(self) -> dict[str, Any]:
        """What the artefact keeps (``threads`` is how, not what, so it is left out)."""
        keep = ("center", "scale", "refine_steps", "task_epochs")
        return {name: getattr(self, name) for name in keep}


def check_task_epochs(task_epochs: Any) -> None:
    """ValueError unless ``task_epochs`` (task refinement of the linear kinds) is an integer in [0, 1000]."""
    if isinstance(task_epochs, bool) or not isinstance(task_epochs, int) or not 0 <= task_epochs <= 1000:
        raise ValueError(f"task_epochs must be an integer in [0, 1000], got {task_epochs!r}")


def fit_procrustes(
    cal: Calibration, config: ProcrustesConfig | None = None, *, progress: Progress | None = None, **overrides: Any
) -> FitResult:
    """Fits the (centred, scaled) Procrustes map from ``cal``'s new vectors to its home vectors.

    Returns a FitResult with an AffineTransform(kind="procrustes"): W (d_new, d_home) shared by both
    sides, b[side] (d_home,) from each side's means. ``info``: ``residual`` (:func:`relative_residual`),
    ``scale``, ``ortho_error`` (of R, :func:`orthogonality_error`), ``centered``, ``refined`` (steps
    taken; d_new > d_home only), ``loss_uvt`` and ``loss`` (‖s Xc R − Yc‖² before/after refining).

    With training relevance (``cal.query_relevant``) and ``task_epochs`` > 0 the rotation is then refined
    on the retrieval task for that many epochs, kept a scaled isometry (``train/refine.py``);
    ``info["task_epochs"]`` says how many ran."""
    cfg = configure(ProcrustesConfig, config, overrides)
    center, scale, refine_steps, task_epochs = cfg.center, cfg.scale, cfg.refine_steps, cfg.task_epochs
    means = side_means(cal, center)
    Xc, Yc = centred_pairs(cal, means)
    C, M, yy = Xc.T @ Xc, Xc.T @ Yc, float((Yc**2).sum())
    R, S = procrustes_rotation(M)
    if progress is not None:
        progress("svd", 0.5)
    d_new, d_home = M.shape
    s = float(S.sum() / max((Xc**2).sum(), np.finfo(np.float64).tiny)) if scale else 1.0
    loss_uvt = stiefel_loss(R, s, C, M, yy)
    history: list[dict[str, float]] = [{"step": 0.0, "loss": loss_uvt, "scale": s}]
    if d_new > d_home and refine_steps:
        R, s, history = refine_stiefel(R, C, M, yy, scale=scale, steps=refine_steps, progress=progress)
    W = s * R
    b = biases(W, means)
    info: dict[str, Any] = {
        "residual": relative_residual(cal, W, b),
        "scale": s,
        "ortho_error": orthogonality_error(R),
        "centered": center,
        "refined": len(history) - 1,
        "loss_uvt": loss_uvt,
        "loss": stiefel_loss(R, s, C, M, yy),
    }
    t = AffineTransform({"query": W}, b, {"kind": "procrustes", **cfg.get_config_dict()}, kind="procrustes")
    info["task_epochs"] = 0
    if task_epochs and len(cal.links()) and d_new >= d_home:
        from .train import TrainConfig, refine_linear

        if progress is not None:
            progress("task refinement", 0.6)
        t, task_history = refine_linear(
            t, cal, TrainConfig(epochs=task_epochs), orthogonal=True, scale=s, threads=cfg.threads
        )
        history += [{"step": float(len(history) + i), **h} for i, h in enumerate(task_history)]
        info["task_epochs"] = task_epochs
    if progress is not None:
        progress("done", 1.0)
    return FitResult(t, info, history)
