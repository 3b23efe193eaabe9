"""Learned Matryoshka adapter: a small map trained so that the prefixes of a non-MRL model's vectors retrieve well.

``pca_basis`` orders the coordinates by variance, which is not the same as by usefulness for
retrieval. The adapter f (d -> d) starts at the PCA rotation and is trained with a Matryoshka loss
over the nesting dims (default ``(16, 32, 64, 128, 256, d)``) on the calibration vectors of ONE
model, its home space: the positives are the row-aligned pairs (query_home[i], doc_home[i]), so
the calibration's query and doc rows must be relevant pairs (a query and the item it should find)::

    total = Σ_m w_m · InfoNCE(shrink(f(q), m), shrink(f(doc), m))
          + distill · Σ_m w_m · MSE(cos(shrink(f(q), m), shrink(f(doc), m)), cos(q, doc))

with ``shrink`` = truncate then L2-normalize, in-batch InfoNCE at temperature τ (symmetric by
default: queries pick docs and docs pick queries), and an optional similarity distillation that
pulls every prefix's query x doc cosine similarities toward the raw full-dim ones (the model's own
geometry). Adam (lr 1e-3), seeded permutation batches, torch imported only to fit
(``mrl_loss.py`` has the modules). f is linear (``x @ W``, W initialized at the PCA rotation), or with
``hidden > 0`` plus a residual ReLU MLP whose last layer starts at zero.

Serving is numpy: ``y = x @ W (+ relu(x @ W1 + b1) @ W2 + b2)``; the same map for both sides. It is
applied to **gallery and queries alike**, so the learned space *replaces* the raw one for the
collection. Unlike ``pca_basis``, W is not orthogonal and **full-dim scores change**: the adapter
is also a light supervised fine-tune on the calibration pairs, and its full-dim Recall@10 must be
reported beside the prefix figures (``bench/matryoshka.py`` does).

Defaults, measured on debdesc (fit on the 10k (query, doc) pairs of ``fit/``; dev: 20k queries vs
20k docs, R@10 of the re-normalized m-dim prefix as a fraction of the raw model's full-dim R@10;
two torch threads; ``bench/matryoshka.py`` for the default rows), e5-small (raw full-dim R@10 0.869):

=================================  =====  =====  ======  =====  ======
config                             m=32   m=64   m=128   m=384  fit s
=================================  =====  =====  ======  =====  ======
raw truncation                     0.347  0.640  0.881   1.000  –
pca_basis (the adapter's start)    0.327  0.676  0.900   1.000  0.1
10 epochs                          0.771  0.930  1.010   1.052  15
**30 epochs (default)**            0.831  0.952  1.007   1.045  16
50 epochs                          0.838  0.960  1.007   1.039  35
one-way InfoNCE (query -> doc)     0.830  0.953  1.009   1.048  16
weights 2,2,2,1,1,1                0.832  0.955  1.005   1.045  19
hidden = 512 (residual MLP)        0.837  0.960  1.008   1.044  26
distill = 10                       0.814  0.952  1.006   1.029  27
τ = 0.02                           0.819  0.941  1.002   1.044  16
center_axes = False (PCA start)    0.823  0.949  1.008   1.045  17
=================================  =====  =====  ======  =====  ======

MiniLM (raw full-dim 0.852), default: 0.880 / 0.977 / 1.011 / 1.040 (pca_basis 0.645 / 0.853 / 0.956 /
1.000). So: linear, 30 epochs, τ = 0.05, symmetric, equal weights, no distillation. The residual MLP
adds ~0.008 at m = 64 for a serve-time MLP; distillation keeps more of the raw geometry (full-dim
gain 1.029 instead of 1.045) at a small cost for small m. Part of the prefix gain is that fine-tune:
against the adapter's *own* full-dim R@10, e5-small keeps 0.911 at m = 64 and 0.963 at m = 128.

Covered by ``tests/test_matryoshka_transforms.py``.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import MAX_SEED, Calibration, FitResult, Transform, check_bool, check_int, check_threads, configure
from .matryoshka import check_m
from .pca_basis import principal_axes
from .train_config import MAX_EPOCHS

__all__ = [
    "NESTING_DIMS",
    "MRLAdapterConfig",
    "MRLAdapterTransform",
    "fit_mrl_adapter",
    "nesting_dims",
    "positive_pairs",
]

NESTING_DIMS = (16, 32, 64, 128, 256)  #: default nesting dims below d (d itself is always added)
_MLP = ("W1", "b1", "W2", "b2")


def nesting_dims(d: int, dims: Sequence[int] | None = None) -> tuple[int, ...]:
    """The nesting dims for dim d: ``dims`` with each checked to be in (0, d] (their order is
    :class:`~.mrl_loss.MatryoshkaLoss`'s to check), or :data:`NESTING_DIMS` below d, then d."""
    if dims is None:
        return (*(m for m in NESTING_DIMS if m < d), d)
    if isinstance(dims, str | bytes) or not len(dims):
        raise ValueError(f"dims must be a non-empty sequence of integers, got {dims!r}")
    return tuple(check_m(m, d)[0] for m in dims)


def _number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | float)


def _check_dims_weights(dims: Any, weights: Any) -> None:
    """What :class:`~.mrl_loss.MatryoshkaLoss` checks of ``dims`` and ``weights`` without d, with its messages."""
    if dims is not None:
        if isinstance(dims, str | bytes) or not isinstance(dims, Sequence) or not len(dims):
            raise ValueError(f"dims must be a non-empty sequence of integers, got {dims!r}")
        if any(isinstance(m, bool) or not isinstance(m, int | np.integer) or m < 1 for m in dims):
            raise ValueError(f"dims must be integers >= 1, got {list(dims)}")
        if any(b <= a for a, b in itertools.pairwise(dims)):
            raise ValueError(f"dims must be strictly increasing, got {list(dims)}")
    if weights is not None:
        if isinstance(weights, str | bytes) or not isinstance(weights, Sequence):
            raise ValueError(f"weights must be a sequence of numbers, got {weights!r}")
        if dims is not None and len(weights) != len(dims):
            raise ValueError(f"weights must have one entry per dim ({len(dims)}), got {len(weights)}")
        if not all(_number(w) and w >= 0 and math.isfinite(w) for w in weights) or not any(w > 0 for w in weights):
            raise ValueError(f"weights must be finite, >= 0 and not all 0, got {list(weights)}")


def positive_pairs(cal_or_pairs: Calibration | tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(queries (n, d), docs (n, d)) float32: a Calibration's query_home and doc_home (row i of each is a
    positive pair), or a (queries, docs) tuple. Raises ValueError unless row-aligned, 2-d, finite, n >= 2."""
    if isinstance(cal_or_pairs, Calibration):
        q, b = cal_or_pairs.query_home, cal_or_pairs.doc_home
    else:
        q, b = cal_or_pairs
    q, b = np.asarray(q), np.asarray(b)
    if q.ndim != 2 or b.ndim != 2 or q.shape != b.shape:
        raise ValueError(
            f"mrl_adapter needs row-aligned (query_i, doc_i) positive pairs of one model: got queries {q.shape} "
            f"and docs {b.shape}"
        )
    if len(q) < 2:
        raise ValueError(f"mrl_adapter needs at least 2 positive pairs, got {len(q)}")
    for name, a in (("queries", q), ("docs", b)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} have non-finite values (NaN or Inf)")
    return np.ascontiguousarray(q, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32)


class MRLAdapterTransform(Transform):
    """x (n, d) -> x @ W (+ relu(x @ W1 + b1) @ W2 + b2): the ``mrl_adapter`` kind, numpy only, both sides alike.

    W : (d, d); with the MLP W1 : (d, h), b1 : (h,), W2 : (h, d), b2 : (d,) (all four or none).
    """

    kind = "mrl_adapter"

    def __init__(self, W: np.ndarray, config: dict[str, Any], mlp: dict[str, np.ndarray] | None = None) -> None:
        W = np.ascontiguousarray(W, dtype=np.float32)
        if W.ndim != 2 or W.shape[0] != W.shape[1]:
            raise ValueError(f"W must be a square 2-d array, got shape {W.shape}")
        super().__init__(int(W.shape[0]), int(W.shape[1]), {**config, "kind": self.kind})
        self.W = W
        mlp = mlp or {}
        if mlp and set(mlp) != set(_MLP):
            raise ValueError(f"the MLP needs all of {', '.join(_MLP)}, got {', '.join(sorted(mlp))}")
        self.mlp = {k: np.ascontiguousarray(mlp[k], dtype=np.float32) for k in _MLP if k in mlp}
        if self.mlp:
            d, h = self.d_in, self.mlp["W1"].shape[-1]
            shapes = {k: v.shape for k, v in self.mlp.items()}
            if shapes != {"W1": (d, h), "b1": (h,), "W2": (h, d), "b2": (d,)}:
                raise ValueError(f"MLP shapes do not chain for d={d}: {shapes}")

    @property
    def hidden(self) -> int:
        return int(self.mlp["W1"].shape[1]) if self.mlp else 0

    def apply(self, x: np.ndarray, side: str = "query") -> np.ndarray:
        """x : (n, d) -> (n, d) float32, not normalized (``apply_to_home`` / ``shrink`` do that)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"x must have shape (n, {self.d_in}), got {x.shape}")
        y: np.ndarray = x @ self.W
        if self.mlp:
            hid = x @ self.mlp["W1"]
            hid += self.mlp["b1"]
            np.maximum(hid, 0, out=hid)
            y += hid @ self.mlp["W2"]
            y += self.mlp["b2"]
        return y

    def affine(self, side: str = "query") -> tuple[np.ndarray, np.ndarray] | None:
        """(W, 0) for the linear adapter; None with the MLP."""
        return None if self.mlp else (self.W, np.zeros(self.d_out, dtype=np.float32))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"W": self.W, **self.mlp}

    @classmethod
    def from_arrays(
        cls, d_in: int, d_out: int, config: dict[str, Any], arrays: dict[str, np.ndarray]
    ) -> MRLAdapterTransform:
        t = cls(arrays["W"], config, {k: arrays[k] for k in _MLP if k in arrays})
        if (t.d_in, t.d_out) != (d_in, d_out):
            raise ValueError(f"arrays map {t.d_in} -> {t.d_out}, expected {d_in} -> {d_out}")
        return t


@dataclass(frozen=True)
class MRLAdapterConfig:
    """How :func:`fit_mrl_adapter` trains (module docstring). Validated on construction, every field;
    :meth:`check_dim` adds what needs the dim d (``dims`` <= d, one weight per nesting dim), which the fit
    checks again (``nesting_dims``, ``MatryoshkaLoss``)."""

    dims: Sequence[int] | None = None
    weights: Sequence[float] | None = None
    temperature: float = 0.05
    symmetric: bool = True
    distill: float = 0.0
    hidden: int = 0
    center_axes: bool = True
    epochs: int = 30
    batch_size: int = 512
    lr: float = 1e-3
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        _check_dims_weights(self.dims, self.weights)
        for name, v, least in (("temperature", self.temperature, 0.0), ("lr", self.lr, 0.0)):
            if not _number(v) or not (v > least and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not _number(self.distill) or not (self.distill >= 0 and math.isfinite(self.distill)):
            raise ValueError(f"distill must be a finite number >= 0, got {self.distill!r}")
        check_bool("symmetric", self.symmetric)
        check_bool("center_axes", self.center_axes)
        # (least, most): the most as TrainConfig's batch and residual_mlp's width; epochs a request's cap
        for name, v, least, most in (
            ("epochs", self.epochs, 1, MAX_EPOCHS),
            ("batch_size", self.batch_size, 2, 65536),
            ("hidden", self.hidden, 0, 16384),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {v!r}")
            if v > most:
                raise ValueError(f"{name} must be at most {most}, got {v!r}")
        check_int("seed", self.seed, 0, MAX_SEED)
        check_threads(self.threads)

    def check_dim(self, d: int) -> None:
        """ValueError unless the nesting dims fit vectors of dim ``d`` and ``weights`` has one entry per
        nesting dim (:func:`nesting_dims`: ``dims``, or the defaults below d and d)."""
        ms = nesting_dims(d, self.dims)
        if self.weights is not None and len(self.weights) != len(ms):
            raise ValueError(f"weights must have one entry per dim ({len(ms)}), got {len(self.weights)}")

    def get_config_dict(self) -> dict[str, Any]:
        """What the artefact keeps beside the loss's own config (dims, weights, temperature, symmetric)."""
        keep = {"distill": float(self.distill), "hidden": self.hidden, "center_axes": self.center_axes}
        return {**keep, "epochs": self.epochs, "batch_size": self.batch_size, "lr": float(self.lr), "seed": self.seed}


def fit_mrl_adapter(
    cal_or_pairs: Calibration | tuple[np.ndarray, np.ndarray],
    config: MRLAdapterConfig | None = None,
    *,
    progress: Callable[[dict[str, float]], None] | None = None,
    **overrides: Any,
) -> FitResult:
    """Trains the adapter on the positive pairs (module docstring) from the PCA rotation of queries and docs.

    Returns a FitResult with an :class:`MRLAdapterTransform`; ``info``: ``init`` ("pca_basis"), ``dims``,
    ``hidden``, ``n_pairs``, ``seconds``; ``history``: per epoch the batch means of ``m<dim>`` (InfoNCE at
    that prefix), ``contrastive`` and ``distill`` (weighted sums) and ``total``."""
    import torch  # only fitting needs torch

    from .mrl_loss import AdapterMap, MatryoshkaLoss, SimilarityDistillationLoss, cosine_sims
    from .train import InfoNCELoss, torch_threads

    conf = configure(MRLAdapterConfig, config, overrides)
    dims, weights, distill, hidden, seed = conf.dims, conf.weights, conf.distill, conf.hidden, conf.seed
    epochs, batch_size = conf.epochs, conf.batch_size
    q, b = positive_pairs(cal_or_pairs)
    n, d = q.shape
    ms = nesting_dims(d, dims)
    contrast = MatryoshkaLoss(InfoNCELoss(conf.temperature, conf.symmetric), ms, weights, d)
    geometry = MatryoshkaLoss(SimilarityDistillationLoss(), ms, weights, d)
    start = time.perf_counter()
    with torch_threads(conf.threads):
        R, _ = principal_axes(np.vstack([b, q]), conf.center_axes)
        model = AdapterMap(R.astype(np.float32), hidden, seed)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=conf.lr)
        xq, xb = torch.from_numpy(q), torch.from_numpy(b)
        n_batches = max(1, math.ceil(n / batch_size))
        history: list[dict[str, float]] = []
        for epoch in range(epochs):
            sums: dict[str, float] = {}
            for idx in torch.tensor_split(torch.randperm(n, generator=gen), n_batches):
                yq, yb = model(xq[idx]), model(xb[idx])
                con = contrast(yq, yb)
                terms = {**{k: v for k, v in con.items() if k != "total"}, "contrastive": con["total"]}
                total = con["total"]
                if distill > 0:
                    with torch.no_grad():
                        teacher = cosine_sims(xq[idx], xb[idx])
                    terms["distill"] = geometry(yq, yb, teacher)["total"]
                    total = total + distill * terms["distill"]
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                for name, value in (*terms.items(), ("total", total)):
                    sums[name] = sums.get(name, 0.0) + float(value.detach())
            record = {name: value / n_batches for name, value in sums.items()}
            history.append(record)
            if progress is not None:
                progress({"epoch": float(epoch + 1), "fraction": (epoch + 1) / epochs, **record})
        weights_np = model.numpy_weights()
    saved = {**contrast.get_config_dict(), **conf.get_config_dict()}
    mlp = {k: weights_np[k] for k in _MLP if k in weights_np}
    transform = MRLAdapterTransform(weights_np["W"], saved, mlp or None)
    info = {"init": "pca_basis", "dims": list(ms), "hidden": hidden, "n_pairs": n}
    info["seconds"] = time.perf_counter() - start
    return FitResult(transform, info, history)
