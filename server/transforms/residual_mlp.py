"""Affine map plus a small residual MLP (in the spirit of Drift-Adapter, Vejendla, EMNLP 2025).

B(x) = A(x) + MLP(x) on per-side centred input x − mean_new[side], with the
per-side home mean added to the output, where A is affine (initialized from the
centred Procrustes solution) and MLP = Linear(d_new, h) → ReLU → Linear(h, d_home)
with its last layer zero-initialized, so training starts exactly at Procrustes.
Training is that of ``lambda_orthogonal.py`` (:func:`train_map`: w_fit·MSE +
w_con·InfoNCE, or SupCon with labels, Adam), with an optional L_λ on A's W
(``lam``, default inf: none).

ReLU rather than GELU: the serve-time forward is plain numpy (no torch import),
and ReLU is exact there. The centering is folded into the biases, so serving is::

    y = x @ W + b[side] + relu(x @ W1 + b1[side]) @ W2 + b2

with b[side] = mean_home[side] − mean_new[side] @ W + b_A and
b1[side] = b_1 − mean_new[side] @ W1 (the same function as centring x first).

The loss weights, temperature, batch size and learning rate are those of
``lambda_orthogonal`` (measured there). ``hidden`` and ``epochs`` measured on debdesc
(fit split → dev R@10 of T(dev new_query) against the 20k dev old_doc gallery, one
torch thread; centred Procrustes 0.509, λ-orthogonal with λ = inf 0.692):

=======  ======  =====  ======
hidden   epochs  R@10   fit s
=======  ======  =====  ======
256      10      0.705  12
512      5       0.697  6
512      10      0.714  16
512      20      0.718  25
1024     10      0.718  19
=======  ======  =====  ======

``hidden = 512``, ``epochs = 10``: 1024 gains 0.004 for twice the serve-time MLP cost
(the MLP already costs ~2.7x the affine matmul per query at 512). ``lam = 6`` on A's
W gave 0.699: off by default.

Covered by ``tests/test_transforms_torch.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import SIDES, Calibration, FitResult, Transform, check_threads, configure
from .train_config import TrainConfig

if TYPE_CHECKING:
    from .train import AffineMap

__all__ = ["ResidualMLPConfig", "ResidualMLPTransform", "build_module", "fit_residual_mlp", "to_transform"]


class ResidualMLPTransform(Transform):
    """x -> x @ W + b[side] + relu(x @ W1 + b1[side]) @ W2 + b2 (numpy only; centering folded into biases).

    W : (d_in, d_out), b[side] : (d_out,), W1 : (d_in, h), b1[side] : (h,), W2 : (h, d_out), b2 : (d_out,).
    """

    kind = "residual_mlp"

    def __init__(
        self,
        W: np.ndarray,
        b: dict[str, np.ndarray],
        W1: np.ndarray,
        b1: dict[str, np.ndarray],
        W2: np.ndarray,
        b2: np.ndarray,
        config: dict[str, Any],
    ) -> None:
        if W.ndim != 2 or W1.ndim != 2 or W2.ndim != 2:
            raise ValueError(f"W, W1 and W2 must be 2-d, got {W.shape}, {W1.shape} and {W2.shape}")
        super().__init__(int(W.shape[0]), int(W.shape[1]), {**config, "kind": self.kind})
        h = int(W1.shape[1])
        self.W = np.ascontiguousarray(W, dtype=np.float32)
        self.W1 = np.ascontiguousarray(W1, dtype=np.float32)
        self.W2 = np.ascontiguousarray(W2, dtype=np.float32)
        self.b2 = np.ascontiguousarray(b2, dtype=np.float32)
        self.b = {s: np.ascontiguousarray(b[s], dtype=np.float32) for s in SIDES if s in b}
        self.b1 = {s: np.ascontiguousarray(b1[s], dtype=np.float32) for s in SIDES if s in b1}
        if set(self.b) != set(SIDES) or set(self.b1) != set(SIDES):
            raise ValueError(f"b and b1 need one vector per side {SIDES}, got {sorted(b)} and {sorted(b1)}")
        shapes_ok = (
            self.W1.shape[0] == self.d_in
            and self.W2.shape == (h, self.d_out)
            and self.b2.shape == (self.d_out,)
            and all(self.b[s].shape == (self.d_out,) and self.b1[s].shape == (h,) for s in SIDES)
        )
        if not shapes_ok:
            raise ValueError(
                f"shapes do not chain: W {self.W.shape}, W1 {self.W1.shape}, W2 {self.W2.shape}, b2 {self.b2.shape}, "
                f"b {[self.b[s].shape for s in SIDES]}, b1 {[self.b1[s].shape for s in SIDES]}"
            )

    @property
    def hidden(self) -> int:
        return int(self.W1.shape[1])

    def apply(self, x: np.ndarray, side: str = "query") -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"x must have shape (n, {self.d_in}), got {x.shape}")
        hid = x @ self.W1
        hid += self.b1[side]
        np.maximum(hid, 0, out=hid)
        y = hid @ self.W2
        y += x @ self.W
        y += self.b[side] + self.b2
        return y

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "W": self.W,
            "W1": self.W1,
            "W2": self.W2,
            "b2": self.b2,
            **{f"b_{s}": self.b[s] for s in SIDES},
            **{f"b1_{s}": self.b1[s] for s in SIDES},
        }

    @classmethod
    def from_arrays(
        cls, d_in: int, d_out: int, config: dict[str, Any], arrays: dict[str, np.ndarray]
    ) -> ResidualMLPTransform:
        t = cls(
            arrays["W"],
            {s: arrays[f"b_{s}"] for s in SIDES},
            arrays["W1"],
            {s: arrays[f"b1_{s}"] for s in SIDES},
            arrays["W2"],
            arrays["b2"],
            config,
        )
        if (t.d_in, t.d_out) != (d_in, d_out):
            raise ValueError(f"arrays map {t.d_in} -> {t.d_out}, expected {d_in} -> {d_out}")
        return t


def build_module(d_new: int, d_home: int, hidden: int, W0: np.ndarray, seed: int = 0) -> AffineMap:
    """The torch model: AffineMap(W0) with residual Linear(d_new, hidden) → ReLU → Linear(hidden, d_home).

    The first layer gets torch's default Linear init from a generator seeded with ``seed`` (the global
    RNG is not touched); the last layer is all zeros, so the model starts as the affine map.
    """
    from .train import AffineMap
    from .train.maps import residual_branch

    if hidden < 1:
        raise ValueError(f"hidden must be >= 1, got {hidden}")
    return AffineMap(d_new, d_home, W0, residual=residual_branch(d_new, hidden, d_home, seed))


def to_transform(model: AffineMap, mean_new: dict[str, np.ndarray], config: dict[str, Any]) -> ResidualMLPTransform:
    """Folds the per-side input centring (x − mean_new[side]) into the serve-time biases."""
    from torch import nn

    mlp = model.residual
    if not (isinstance(mlp, nn.Sequential) and len(mlp) == 3):
        raise ValueError("model has no residual MLP: build it with build_module")
    first, last = mlp[0], mlp[2]
    if not (isinstance(first, nn.Linear) and isinstance(last, nn.Linear)):
        raise ValueError("model has no residual MLP: build it with build_module")
    W, b_a = model.W.detach().numpy(), model.b.detach().numpy()
    W1, b_1 = first.weight.detach().numpy().T, first.bias.detach().numpy()
    W2, b2 = last.weight.detach().numpy().T, last.bias.detach().numpy()
    b = {s: b_a - mean_new[s] @ W for s in SIDES}
    b1 = {s: b_1 - mean_new[s] @ W1 for s in SIDES}
    return ResidualMLPTransform(W, b, W1, b1, W2, b2, config)


@dataclass(frozen=True)
class ResidualMLPConfig(TrainConfig):
    """How :func:`fit_residual_mlp` fits: the training fields of :class:`~.train_config.TrainConfig`, the MLP
    width ``hidden``, an optional L_λ on A's W (``lam``, ``alpha``; default inf: none) and the torch
    ``threads``. Validated on construction (imports torch)."""

    hidden: int = 1024
    lam: float = math.inf
    alpha: float = 5.0
    threads: int | None = None

    def __post_init__(self) -> None:
        from .train import LambdaOrthogonalityLoss

        hidden = self.hidden
        if isinstance(hidden, bool) or not isinstance(hidden, int) or not 1 <= hidden <= 16384:
            raise ValueError(f"hidden must be an integer in [1, 16384], got {hidden!r}")
        super().__post_init__()
        LambdaOrthogonalityLoss(self.lam, self.alpha)
        check_threads(self.threads)


def fit_residual_mlp(
    cal: Calibration,
    config: ResidualMLPConfig | None = None,
    *,
    progress: Callable[[dict[str, float]], None] | None = None,
    **overrides: Any,
) -> FitResult:
    """Fits B = A + MLP on all pairs with the task loss (``train/``; no held-out slice, no sweep).

    Returns a FitResult with a :class:`ResidualMLPTransform`; ``info`` has ``hidden``, ``ortho_gap`` (of A's W),
    ``procrustes_scale``, ``relevance`` (task links used) and ``seconds``; ``history`` the named terms per epoch.
    """
    import torch  # only fitting needs torch

    from .lambda_orthogonal import procrustes_init
    from .train import LambdaOrthogonalityLoss, TaskData, orthogonality_gap, torch_threads, train_map

    conf = configure(ResidualMLPConfig, config, overrides)
    cfg, hidden, seed = conf.train_config(), conf.hidden, conf.seed
    ortho = LambdaOrthogonalityLoss(conf.lam, conf.alpha)
    start = time.perf_counter()
    with torch_threads(conf.threads):
        data = TaskData.build(cal, cfg.hard_negatives)
        W0, scale = procrustes_init(cal)
        model = build_module(W0.shape[0], W0.shape[1], hidden, W0, seed)
        history = train_map(model, data, cfg, lambda: ortho(model.W), progress)
        saved = {"hidden": hidden, **ortho.get_config_dict(), **cfg.get_config_dict()}
        transform = to_transform(model, data.mean_new, saved)
        gap = float(orthogonality_gap(torch.tensor(transform.W, dtype=torch.float64)))
    info = {"init": "procrustes", "hidden": hidden, "procrustes_scale": scale, "ortho_gap": gap}
    info.update(relevance=len(cal.links()), seconds=time.perf_counter() - start)
    return FitResult(transform, info, history)
