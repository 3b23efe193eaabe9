"""The torch maps the trained kinds fit, each starting at a closed-form solution.

* :class:`AffineMap`: x -> x @ W + b (+ residual(x)); W starts at ``W0`` (the centred Procrustes map),
  b at 0; ``residual`` is the optional branch of ``residual_mlp``.
* :class:`OrthogonalMap`: x -> s · x @ Q + b with Q (d_new, d_home) kept exactly orthonormal by
  ``torch.nn.utils.parametrizations.orthogonal`` and a learned isotropic scale s: the task refinement
  of ``procrustes``, which stays a (scaled) isometry.

Both expose ``W`` (the serve-time matrix) and ``b``; :func:`to_affine` folds the per-side input centring
into an :class:`~..base.AffineTransform`. Covered by ``tests/test_task_loss.py``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from ..base import SIDES, AffineTransform

__all__ = ["AffineMap", "OrthogonalMap", "residual_branch", "to_affine"]


def residual_branch(d_in: int, hidden: int, d_out: int, seed: int = 0) -> nn.Sequential:
    """Linear(d_in, hidden) → ReLU → Linear(hidden, d_out) that outputs exactly 0 at the start: the first
    layer gets torch's default Linear init from a generator seeded with ``seed`` (the global RNG is not
    touched), the last layer is all zeros. The MLP branch of ``residual_mlp`` and ``mrl_adapter``."""
    first = nn.Linear(d_in, hidden, device="meta").to_empty(device="cpu")  # no init from the global RNG
    last = nn.Linear(hidden, d_out, device="meta").to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        nn.init.kaiming_uniform_(first.weight, a=math.sqrt(5), generator=gen)  # = nn.Linear's default
        first.bias.uniform_(-1 / math.sqrt(d_in), 1 / math.sqrt(d_in), generator=gen)
        last.weight.zero_()
        last.bias.zero_()
    return nn.Sequential(first, nn.ReLU(), last)


class AffineMap(nn.Module):
    """x -> x @ W + b (+ residual(x)) with W (d_new, d_home) from ``W0`` (identity-like when None), b (d_home,) 0."""

    def __init__(
        self, d_new: int, d_home: int, W0: np.ndarray | None = None, residual: nn.Module | None = None
    ) -> None:
        super().__init__()
        if d_new < 1 or d_home < 1:
            raise ValueError(f"d_new and d_home must be >= 1, got {d_new} and {d_home}")
        if W0 is None:
            W0 = np.eye(d_new, d_home, dtype=np.float32)
        if W0.shape != (d_new, d_home):
            raise ValueError(f"W0 must have shape ({d_new}, {d_home}), got {W0.shape}")
        self.W = nn.Parameter(torch.tensor(np.asarray(W0, dtype=np.float32)))
        self.b = nn.Parameter(torch.zeros(d_home))
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.W + self.b
        return y if self.residual is None else y + self.residual(x)


class OrthogonalMap(nn.Module):
    """x -> s · x @ Q + b, Q (d_new, d_home) orthonormal (columns or rows, whichever is the smaller side).

    Starts at ``s0 · Q0`` (Q0 orthonormal, e.g. Procrustes' R); raises ValueError when Q0 is not."""

    def __init__(self, Q0: np.ndarray, s0: float = 1.0) -> None:
        super().__init__()
        Q0 = np.asarray(Q0, dtype=np.float32)
        small = min(Q0.shape)
        G = Q0.T @ Q0 if Q0.shape[0] >= Q0.shape[1] else Q0 @ Q0.T
        if Q0.ndim != 2 or not np.allclose(G, np.eye(small), atol=1e-3):
            raise ValueError(f"Q0 must be a 2-d matrix with orthonormal columns or rows, got shape {Q0.shape}")
        if not (s0 > 0 and np.isfinite(s0)):
            raise ValueError(f"s0 must be a finite number > 0, got {s0!r}")
        self.linear = nn.Linear(Q0.shape[0], Q0.shape[1], bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor(Q0.T))
        parametrizations.orthogonal(self.linear)
        self.log_s = nn.Parameter(torch.tensor(float(np.log(s0))))
        self.b = nn.Parameter(torch.zeros(Q0.shape[1]))

    @property
    def Q(self) -> Tensor:
        q: Tensor = self.linear.weight.T
        return q

    @property
    def W(self) -> Tensor:
        return torch.exp(self.log_s) * self.Q

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = torch.exp(self.log_s) * self.linear(x) + self.b
        return out


def to_affine(
    model: AffineMap | OrthogonalMap, mean_new: dict[str, np.ndarray], config: dict[str, Any]
) -> AffineTransform:
    """The serve-time form of a map trained on per-side centred input: W, b[side] = b − mean_new[side] @ W."""
    with torch.no_grad():
        W = model.W.detach().numpy().astype(np.float64)
        b0 = model.b.detach().numpy().astype(np.float64)
    b = {s: b0 - mean_new[s].astype(np.float64) @ W for s in SIDES}
    return AffineTransform(dict.fromkeys(SIDES, W), b, config, kind=config.get("kind"))
