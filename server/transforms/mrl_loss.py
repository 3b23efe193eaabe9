"""Torch side of the Matryoshka adapter (``mrl_adapter.py``): the losses and the trainable map.

Kept apart from ``mrl_adapter.py`` so that serving an adapter (numpy) never imports torch; this
module is imported only when an adapter is fitted.

* :class:`MatryoshkaLoss` wraps any inner pairwise loss ``inner(a, b, *extra)`` and sums it over the
  nesting dims: ``Σ_m w_m · inner(shrink(a, m), shrink(b, m), *extra)``, where :func:`shrink_t`
  truncates then L2-normalizes (the same rule as ``matryoshka.shrink``). Dims and weights are
  validated in ``__init__``; ``forward`` returns the named terms ``m<dim>`` and their weighted sum
  ``total``; ``get_config_dict()`` gives dims, weights and the inner loss's own settings.
* :class:`SimilarityDistillationLoss`: MSE between the in-batch query x doc cosine similarities of
  the (prefix) outputs and fixed teacher similarities, the raw full-dim ones (after the unsupervised
  loss of Matryoshka-Adaptor, Yoon et al., EMNLP 2024): it keeps the model's own geometry.
* The inner contrastive loss is ``train.losses.InfoNCELoss`` (in-batch, cosine, temperature τ).
* :class:`AdapterMap`: ``x @ W`` (W starts at the PCA rotation) plus an optional residual MLP
  ``Linear(d, h) → ReLU → Linear(h, d)`` whose last layer starts at zero, so training starts at PCA.

Covered by ``tests/test_matryoshka_transforms.py``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .train.maps import residual_branch

__all__ = ["AdapterMap", "MatryoshkaLoss", "SimilarityDistillationLoss", "cosine_sims", "shrink_t"]


def shrink_t(x: Tensor, m: int) -> Tensor:
    """The first m columns of x (b, d), L2-normalized per row: truncate, then normalize."""
    return F.normalize(x[:, :m], dim=1)


def cosine_sims(a: Tensor, b: Tensor) -> Tensor:
    """(n_a, n_b) cosine similarities of the rows of a (n_a, d) and b (n_b, d)."""
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


class MatryoshkaLoss(nn.Module):
    """Σ_m w_m · inner(shrink_t(a, m), shrink_t(b, m), *extra) over the nesting dims.

    Args:
        inner: a pairwise loss module ``inner(a, b, *extra) -> scalar`` with ``get_config_dict()``.
        dims: the nesting dims, strictly increasing integers >= 1 (the last is usually d).
        weights: one weight >= 0 per dim, not all 0 (default: all 1).
        d: when given, every dim must be <= d.
    """

    def __init__(
        self, inner: nn.Module, dims: Sequence[int], weights: Sequence[float] | None = None, d: int | None = None
    ) -> None:
        super().__init__()
        dims = list(dims)
        if not dims:
            raise ValueError("dims must not be empty")
        if any(isinstance(m, bool) or not isinstance(m, int | np.integer) or m < 1 for m in dims):
            raise ValueError(f"dims must be integers >= 1, got {dims}")
        if any(b <= a for a, b in itertools.pairwise(dims)):
            raise ValueError(f"dims must be strictly increasing, got {dims}")
        if d is not None and dims[-1] > d:
            raise ValueError(f"dims must be <= d={d}, got {dims}")
        weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
        if len(weights) != len(dims):
            raise ValueError(f"weights must have one entry per dim ({len(dims)}), got {len(weights)}")
        if not all(w >= 0 and math.isfinite(w) for w in weights) or not any(w > 0 for w in weights):
            raise ValueError(f"weights must be finite, >= 0 and not all 0, got {weights}")
        if not callable(getattr(inner, "get_config_dict", None)):
            raise ValueError(f"inner must have get_config_dict(), got {type(inner).__name__}")
        self.inner = inner
        self.dims, self.weights = [int(m) for m in dims], weights

    def forward(self, a: Tensor, b: Tensor, *extra: Tensor) -> dict[str, Tensor]:
        """{"m<dim>": inner loss at that prefix, ..., "total": weighted sum}; a, b : (batch, d)."""
        if a.shape != b.shape or a.ndim != 2 or a.shape[1] < self.dims[-1]:
            raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must be (batch, >= {self.dims[-1]})")
        terms = {f"m{m}": self.inner(shrink_t(a, m), shrink_t(b, m), *extra) for m in self.dims}
        total = sum((w * terms[f"m{m}"] for m, w in zip(self.dims, self.weights, strict=True)), a.new_zeros(()))
        return {**terms, "total": total}

    def get_config_dict(self) -> dict[str, Any]:
        inner: dict[str, Any] = cast(Any, self.inner).get_config_dict()
        return {"dims": list(self.dims), "weights": list(self.weights), **inner}


class SimilarityDistillationLoss(nn.Module):
    """MSE between cosine_sims(a, b) (batch, batch) and fixed ``teacher`` similarities of the same shape."""

    def forward(self, a: Tensor, b: Tensor, teacher: Tensor) -> Tensor:
        S = cosine_sims(a, b)
        if teacher.shape != S.shape:
            raise ValueError(f"teacher must have shape {tuple(S.shape)}, got {tuple(teacher.shape)}")
        return F.mse_loss(S, teacher)

    def get_config_dict(self) -> dict[str, Any]:
        return {}


class AdapterMap(nn.Module):
    """x (b, d) -> x @ W (+ Linear(d, h) → ReLU → Linear(h, d) when hidden > 0); W starts at ``W0`` (d, d).

    The MLP's first layer has torch's default Linear init from a generator seeded with ``seed`` (the global
    RNG is not touched); its last layer is all zeros, so the map starts as x @ W0.
    """

    def __init__(self, W0: np.ndarray, hidden: int = 0, seed: int = 0) -> None:
        super().__init__()
        if W0.ndim != 2 or W0.shape[0] != W0.shape[1]:
            raise ValueError(f"W0 must be a square 2-d array, got shape {W0.shape}")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
            raise ValueError(f"hidden must be an integer >= 0, got {hidden!r}")
        d = int(W0.shape[0])
        self.W = nn.Parameter(torch.tensor(np.asarray(W0, dtype=np.float32)))
        self.mlp: nn.Sequential | None = None
        if hidden:
            self.mlp = residual_branch(d, hidden, d, seed)

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.W
        return y if self.mlp is None else y + self.mlp(x)

    def numpy_weights(self) -> dict[str, np.ndarray]:
        """W (d, d), and with the MLP W1 (d, h), b1 (h,), W2 (h, d), b2 (d,): the serve-time arrays."""
        out = {"W": self.W.detach().numpy().copy()}
        if self.mlp is not None:
            first, last = self.mlp[0], self.mlp[2]
            if not (isinstance(first, nn.Linear) and isinstance(last, nn.Linear)):
                raise TypeError(f"the MLP must be Linear, ReLU, Linear, got {self.mlp}")
            out["W1"] = first.weight.detach().numpy().T.copy()
            out["b1"] = first.bias.detach().numpy().copy()
            out["W2"] = last.weight.detach().numpy().T.copy()
            out["b2"] = last.bias.detach().numpy().copy()
        return out
