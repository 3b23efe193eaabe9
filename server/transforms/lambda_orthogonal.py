"""λ-orthogonality regularized affine map (Ricci et al., NeurIPS 2025, §3.3).

An affine map B(x) = x @ W + b from the new space (d_new) into the home space
(d_home) is trained from the centred Procrustes solution (``procrustes.py``) with Adam on::

    total = w_fit · MSE(B(x_new), x_home) + w_con · InfoNCE(B(x_new), x_home) + L_λ(W)
    L_λ(W) = sigmoid(α · (‖WᵀW − I‖_F − λ)) · ‖WᵀW − I‖_F        (Frobenius norm, not squared; weight 1)

so W may leave the orthogonal group by about λ (in ‖WᵀW − I‖_F) before the
penalty bites: λ = 0 pulls W to an orthogonal map (which keeps the new model's
own neighbourhoods), λ = inf leaves a free affine map (best fit to the
calibration distribution). With integer labels the contrastive term is the
supervised contrastive loss (:class:`SupConLoss`) instead of InfoNCE. The MSE is
the element mean (``F.mse_loss``). The history holds the batch means of the named
terms ``fit``, ``contrastive``, ``ortho`` and ``total`` per epoch.

The contrastive term is **one-way**, new → home: each mapped new vector must
pick its own home vector out of the batch's home vectors. That is the serving
direction (mapped new queries search a home gallery); ``symmetric=True`` adds
home → mapped and averages, and measured no better (below).

Centering is per side, as in ``procrustes.py``: the map is trained on
x − mean_new[side] and predicts y with mean_home[side] added back, so the
artefact is an :class:`AffineTransform` of kind ``"lambda_orthogonal"`` with one
W shared by both sides and b[side] = mean_home[side] − mean_new[side] @ W + b.
Both losses see that serve-time output (home mean included), so the contrastive
term trains the same cosine geometry that the search uses.

λ selection (``lam=None``): a seeded ``holdout`` slice of each side's pairs is set
aside (``evaluate.split_calibration``); for every λ in ``lams`` a map is trained on
the rest and scored on the slice:

* cross-space identification: T(x_new(i)) searches its side's held-out home
  vectors for x_home(i) (cosine); Recall@10 and Recall@1 pooled over both sides;
* neighbourhood agreement: mean top-10 overlap of each held-out new vector's
  cosine neighbours among the mapped held-out vectors (both sides stacked) with
  its neighbours among the raw new vectors (the new model's own retrieval).

The λ with the best Recall@10 among those with agreement >= ``neighbourhood_floor``
wins (ties: Recall@1, then agreement); if none reaches the floor, the λ with the
highest agreement wins and ``info["floor_met"]`` is False (:func:`choose_lam`). The
chosen λ is then refitted on all pairs (the sweep maps saw only 1 − holdout of
them); ``info["sweep"]`` keeps the table.

Both sides are scored, not only queries, because identification saturates: on
debdesc the held-out query pairs give Recall@10 = 1.000 for every λ and Recall@1
0.996-0.999; pooled with the docs, Recall@1 rises 0.986 → 0.993 from λ = 0 to
λ >= 16, in the order of the dev task's Recall@10.

Defaults, measured on debdesc (fit split: 10k doc + 10k query pairs, e5-small →
MiniLM; dev: R@10 of T(dev new_query) against the 20k dev old_doc gallery, one
torch thread; centred Procrustes: 0.509, free least squares: 0.572):

* ``w_con = 1``, ``temperature = 0.05``: the contrastive term drives retrieval
  (λ = inf: 0.692; τ = 0.02: 0.661, τ = 0.1: 0.668; MSE alone: 0.568).
* ``w_fit = 1``: the MSE (~1.6e-3 per element) is a small anchor; w_fit = 10 gave
  0.693, w_fit = 100 0.682.
* ``symmetric = False``: symmetric gave 0.691.
* ``epochs = 10``, ``batch_size = 512``, ``lr = 1e-3``: 1/5/10/20 epochs give
  0.661/0.686/0.692/0.694; batch 256/1024 0.693/0.692. One fit ~8 s on one thread;
  the 8-λ sweep plus the refit 75 s on one thread.
* ``alpha = 5``: with α = 1 the gate opens ~7 below λ (λ = 0, 3 and 6 all end at
  ‖WᵀW − I‖_F < 1.1, λ = 12 at 5.1); with α = 5 the fit ends ~2 below λ (λ = 6, 12,
  22 → 4.4, 10.0, 19.6), so λ reads as the allowed gap and the default grid spreads.
* ``neighbourhood_floor = 0.6``: held-out agreement for λ = 0/3/6/12/16/22/36/inf was
  0.703/0.685/0.656/0.551/0.531/0.522/0.498/0.498 (an orthogonal W keeps 0.70, not
  1: centring and the home mean move cosine neighbours too). The largest drop on the
  grid is between λ = 6 and 12; 0.6 sits in it and keeps λ <= 6, i.e. >= 93% of the
  orthogonal map's agreement. Chosen λ = 6: dev R@10 0.661 (λ = 0: 0.649, λ = inf:
  0.692), dev agreement 0.71 vs 0.55 for λ = inf. Lower the floor to trade the new
  model's geometry for fit (0.5 picks λ = 16: 0.681).

Covered by ``tests/test_transforms_torch.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import SIDES, AffineTransform, Calibration, FitResult
from .evaluate import split_calibration
from .procrustes import fit_procrustes

__all__ = [
    "ALPHA",
    "DEFAULT_LAMS",
    "NEIGHBOURHOOD_FLOOR",
    "AffineMap",
    "InfoNCELoss",
    "LambdaOrthogonalityLoss",
    "Pairs",
    "SupConLoss",
    "TrainConfig",
    "choose_lam",
    "fit_lambda_orthogonal",
    "info_nce",
    "lambda_orthogonality",
    "neighbourhood_agreement",
    "orthogonality_gap",
    "procrustes_init",
    "recall_at_k",
    "sup_con",
    "torch_threads",
    "train_map",
]

DEFAULT_LAMS = (0.0, 3.0, 6.0, 12.0, 16.0, 22.0, 36.0, math.inf)
K = 10  #: neighbours for the held-out Recall@K and neighbourhood agreement
ALPHA = 5.0  #: steepness of the L_λ gate (module docstring: why)
NEIGHBOURHOOD_FLOOR = 0.6  #: least held-out neighbourhood agreement a swept λ must keep (module docstring: why)

Progress = Callable[[dict[str, float]], None]


# ---- the math, as pure functions -------------------------------------------------------------------------------


def orthogonality_gap(W: Tensor) -> Tensor:
    """‖WᵀW − I‖_F for W (d_new, d_home): 0 iff W has orthonormal columns."""
    gap: Tensor = torch.linalg.matrix_norm(W.T @ W - torch.eye(W.shape[1], dtype=W.dtype, device=W.device))
    return gap


def lambda_orthogonality(W: Tensor, lam: float, alpha: float) -> Tensor:
    """L_λ(W) = sigmoid(α(g − λ)) · g with g = ‖WᵀW − I‖_F; exactly 0 (no graph through W) for λ = inf."""
    if math.isinf(lam):
        return W.new_zeros(())
    gap = orthogonality_gap(W)
    return torch.sigmoid(alpha * (gap - lam)) * gap


def info_nce(pred: Tensor, target: Tensor, temperature: float, symmetric: bool = False) -> Tensor:
    """In-batch InfoNCE on cosine similarities: row i of pred (b, d) must pick row i of target (b, d).

    One-way (pred → target) unless ``symmetric``, which averages both directions.
    """
    logits = F.normalize(pred, dim=1) @ F.normalize(target, dim=1).T / temperature
    labels = torch.arange(len(pred), device=pred.device)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = (loss + F.cross_entropy(logits.T, labels)) / 2
    return loss


def sup_con(pred: Tensor, target: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Cross-space supervised contrastive loss (Khosla et al. 2020, L_out) with pred as anchors.

    For anchor i the positives are the targets j with labels[j] == labels[i] (its own pair
    included), the candidates all targets in the batch::

        L = mean_i −1/|P(i)| Σ_{p∈P(i)} log softmax_j(cos(pred_i, target_j) / τ)_p

    With all labels distinct it equals one-way :func:`info_nce`.
    """
    logits = F.normalize(pred, dim=1) @ F.normalize(target, dim=1).T / temperature
    log_prob = torch.log_softmax(logits, dim=1)
    positive = (labels[:, None] == labels[None, :]).to(log_prob.dtype)
    return -((log_prob * positive).sum(1) / positive.sum(1)).mean()


def recall_at_k(xq: np.ndarray, yb: np.ndarray, k: int = K) -> float:
    """Fraction of rows i whose own yb[i] is among the k cosine neighbours of xq[i] in yb.

    xq : (n, d) mapped new vectors, yb : (n, d) their home vectors, row-aligned.
    """
    S = _normalize(xq) @ _normalize(yb).T
    own = np.diagonal(S)[:, None]
    return float(((own < S).sum(1) < k).mean())


def neighbourhood_agreement(x: np.ndarray, tx: np.ndarray, k: int = K) -> float:
    """Mean |N_k(x_i) ∩ N_k(tx_i)| / k: cosine top-k neighbours (self excluded) before and after a map.

    x : (n, d_new) the new vectors, tx : (n, d_out) the same vectors mapped; 1.0 = neighbourhoods kept.
    """
    n = len(x)
    top = [_top_k(_normalize(a), k) for a in (x, tx)]
    member = np.zeros((n, n), dtype=bool)
    np.put_along_axis(member, top[0], True, axis=1)
    return float(np.take_along_axis(member, top[1], axis=1).sum() / (n * k))


def choose_lam(table: Sequence[dict[str, float]], floor: float) -> tuple[float, bool]:
    """(λ, floor met) from sweep rows (``lam``, ``recall_at_10``, ``recall_at_1``, ``neighbourhood_agreement``).

    The best Recall@10 among rows with agreement >= floor (ties, common as identification saturates:
    the better Recall@1, then the higher agreement, then the earlier row); if no row reaches the floor,
    the row with the highest agreement, and False.
    """
    kept = [row for row in table if row["neighbourhood_agreement"] >= floor]
    if kept:
        best = max(kept, key=lambda row: (row["recall_at_10"], row["recall_at_1"], row["neighbourhood_agreement"]))
    else:
        best = max(table, key=lambda row: (row["neighbourhood_agreement"], row["recall_at_10"]))
    return float(best["lam"]), bool(kept)


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    out: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return out


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    S = x @ x.T
    np.fill_diagonal(S, -np.inf)
    return np.argpartition(-S, k, axis=1)[:, :k]


# ---- modules ---------------------------------------------------------------------------------------------------


class LambdaOrthogonalityLoss(nn.Module):
    """L_λ(W) = sigmoid(α(‖WᵀW − I‖_F − λ)) · ‖WᵀW − I‖_F (weight 1); λ = inf disables it (exactly 0).

    Args:
        lam: the allowed deviation from orthogonality, >= 0, or ``math.inf`` for none.
        alpha: steepness of the sigmoid gate, > 0.
    """

    def __init__(self, lam: float = 0.0, alpha: float = ALPHA) -> None:
        super().__init__()
        if not lam >= 0:  # also rejects NaN
            raise ValueError(f"lam must be >= 0 or math.inf, got {lam}")
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
        self.lam, self.alpha = float(lam), float(alpha)

    def forward(self, W: Tensor) -> Tensor:
        return lambda_orthogonality(W, self.lam, self.alpha)

    def get_config_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "alpha": self.alpha}


class InfoNCELoss(nn.Module):
    """In-batch InfoNCE over cosine similarities of mapped new vectors vs their home vectors.

    Args:
        temperature: τ > 0 dividing the cosine logits.
        symmetric: also score home → mapped and average (default one-way, new → home).
    """

    def __init__(self, temperature: float = 0.05, symmetric: bool = False) -> None:
        super().__init__()
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        self.temperature, self.symmetric = float(temperature), bool(symmetric)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        return info_nce(pred, target, self.temperature, self.symmetric)

    def get_config_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "symmetric": self.symmetric}


class SupConLoss(nn.Module):
    """Supervised contrastive loss with integer labels (positives: same label), mapped new vs home.

    Args:
        temperature: τ > 0 dividing the cosine logits.
    """

    def __init__(self, temperature: float = 0.05) -> None:
        super().__init__()
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, pred: Tensor, target: Tensor, labels: Tensor) -> Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        if labels.shape != (len(pred),):
            raise ValueError(f"labels must have shape ({len(pred)},), got {tuple(labels.shape)}")
        return sup_con(pred, target, labels, self.temperature)

    def get_config_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature}


class AffineMap(nn.Module):
    """x -> x @ W + b (+ residual(x)) with W (d_new, d_home), b (d_home,); W starts at ``W0``, b at 0.

    ``residual`` is an optional branch added to the output (``residual_mlp.py`` passes its MLP);
    the λ penalty applies to W only.
    """

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


# ---- training --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """How a map is trained (shared with ``residual_mlp.py``); validated on construction."""

    w_fit: float = 1.0
    w_con: float = 1.0
    temperature: float = 0.05
    symmetric: bool = False
    epochs: int = 10
    batch_size: int = 512
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.w_fit >= 0 and self.w_con >= 0 and self.w_fit + self.w_con > 0):
            raise ValueError(f"w_fit and w_con must be >= 0 and not both 0, got {self.w_fit} and {self.w_con}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")

    def get_config_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Pairs:
    """Per-side pairs as float32, with the per-side means used to centre them (a side without pairs
    borrows the other side's means). x_new[s] : (n_s, d_new), x_home[s] : (n_s, d_home)."""

    x_new: dict[str, np.ndarray]
    x_home: dict[str, np.ndarray]
    labels: dict[str, np.ndarray] | None
    mean_new: dict[str, np.ndarray]
    mean_home: dict[str, np.ndarray]

    @classmethod
    def from_calibration(cls, cal: Calibration) -> Pairs:
        x_new = {"query": cal.query_new, "doc": cal.doc_new}
        x_home = {"query": cal.query_home, "doc": cal.doc_home}
        given = {"query": cal.query_labels, "doc": cal.doc_labels}
        present = [s for s in SIDES if len(x_new[s])]
        if not present:
            raise ValueError("calibration has no pairs")
        for s in present:
            if x_new[s].ndim != 2 or x_home[s].ndim != 2 or len(x_new[s]) != len(x_home[s]):
                raise ValueError(f"{s} pairs are not row-aligned: new {x_new[s].shape}, home {x_home[s].shape}")
        labels = {s: np.asarray(v, dtype=np.int64) for s in present if (v := given[s]) is not None}
        if labels and len(labels) != len(present):
            raise ValueError("labels must be given for every side with pairs or for none")
        for s, v in labels.items():
            if v.shape != (len(x_new[s]),):
                raise ValueError(f"{s}_labels must have shape ({len(x_new[s])},), got {v.shape}")
        x_new = {s: np.ascontiguousarray(x_new[s], dtype=np.float32) for s in present}
        x_home = {s: np.ascontiguousarray(x_home[s], dtype=np.float32) for s in present}
        mean_new = {s: x_new[s].mean(0) for s in SIDES if s in x_new}
        mean_home = {s: x_home[s].mean(0) for s in SIDES if s in x_home}
        for s in SIDES:
            mean_new.setdefault(s, mean_new[present[0]])
            mean_home.setdefault(s, mean_home[present[0]])
        return cls(x_new, x_home, labels or None, mean_new, mean_home)

    @property
    def sides(self) -> list[str]:
        return list(self.x_new)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(centred new x, home y, home-mean offset per row, labels or None) for training."""
        xc = np.vstack([self.x_new[s] - self.mean_new[s] for s in self.sides])
        y = np.vstack([self.x_home[s] for s in self.sides])
        off = np.vstack([np.broadcast_to(self.mean_home[s], self.x_home[s].shape) for s in self.sides])
        labels = None if self.labels is None else torch.tensor(np.concatenate([self.labels[s] for s in self.sides]))
        return torch.tensor(xc), torch.tensor(y), torch.tensor(off), labels


def procrustes_init(cal: Calibration) -> tuple[np.ndarray, float]:
    """W0 = s R of the centred, scaled Procrustes fit (``procrustes.py``); returns (W0 (d_new, d_home) float32, s)."""
    result = fit_procrustes(cal, center=True, scale=True)
    if not isinstance(result.transform, AffineTransform):
        raise TypeError(f"fit_procrustes returned {type(result.transform).__name__}, expected AffineTransform")
    return result.transform.W["query"].astype(np.float32), float(result.info["scale"])


def train_map(
    model: AffineMap,
    ortho: LambdaOrthogonalityLoss,
    pairs: Pairs,
    cfg: TrainConfig,
    progress: Progress | None = None,
) -> list[dict[str, float]]:
    """Adam on w_fit·MSE + w_con·(InfoNCE | SupCon) + L_λ(model.W); returns the named terms per epoch.

    ``model`` maps centred new vectors; the per-side home mean is added to its output before both
    losses. Batches are a seeded permutation cut into near-equal parts of about ``batch_size``.
    """
    x, y, off, labels = pairs.tensors()
    contrast: nn.Module = InfoNCELoss(cfg.temperature, cfg.symmetric) if labels is None else SupConLoss(cfg.temperature)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n_batches = max(1, math.ceil(len(x) / cfg.batch_size))
    history: list[dict[str, float]] = []
    for epoch in range(cfg.epochs):
        sums = dict.fromkeys(("fit", "contrastive", "ortho", "total"), 0.0)
        for idx in torch.tensor_split(torch.randperm(len(x), generator=gen), n_batches):
            pred = model(x[idx]) + off[idx]
            terms = {
                "fit": F.mse_loss(pred, y[idx]),
                "contrastive": contrast(pred, y[idx]) if labels is None else contrast(pred, y[idx], labels[idx]),
                "ortho": ortho(model.W),
            }
            total = cfg.w_fit * terms["fit"] + cfg.w_con * terms["contrastive"] + terms["ortho"]
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            for name, value in (*terms.items(), ("total", total)):
                sums[name] += float(value.detach())
        record = {name: value / n_batches for name, value in sums.items()}
        history.append(record)
        if progress is not None:
            progress({"lam": ortho.lam, "epoch": float(epoch + 1), **record})
    return history


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Runs the block with ``torch.set_num_threads(threads)`` (when given), restoring the old count after."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- fitting ---------------------------------------------------------------------------------------------------


def _fit_affine(
    cal: Calibration, lam: float, alpha: float, cfg: TrainConfig, progress: Progress | None
) -> tuple[AffineTransform, list[dict[str, float]], float]:
    """Trains one λ-regularized map on ``cal``; returns (transform, history, procrustes scale)."""
    pairs = Pairs.from_calibration(cal)
    W0, scale = procrustes_init(cal)
    model = AffineMap(W0.shape[0], W0.shape[1], W0)
    ortho = LambdaOrthogonalityLoss(lam, alpha)
    history = train_map(model, ortho, pairs, cfg, progress)
    W = model.W.detach().numpy()
    b0 = model.b.detach().numpy()
    b = {s: pairs.mean_home[s] - pairs.mean_new[s] @ W + b0 for s in SIDES}
    config = {"kind": "lambda_orthogonal", **ortho.get_config_dict(), **cfg.get_config_dict()}
    return AffineTransform(dict.fromkeys(SIDES, W), b, config, kind="lambda_orthogonal"), history, scale


def _gap(W: np.ndarray) -> float:
    return float(orthogonality_gap(torch.tensor(W, dtype=torch.float64)))


def _stage(progress: Progress | None, done: int, total: int, epochs: int) -> Progress | None:
    """Wraps ``progress`` for fit number ``done`` of ``total``: adds ``fraction``, the share of all epochs done."""
    if progress is None:
        return None
    report = progress

    def stage(record: dict[str, float]) -> None:
        report({**record, "fraction": (done * epochs + record["epoch"]) / (total * epochs)})

    return stage


def fit_lambda_orthogonal(
    cal: Calibration,
    *,
    lam: float | None = None,
    lams: Sequence[float] = DEFAULT_LAMS,
    alpha: float = ALPHA,
    w_fit: float = 1.0,
    w_con: float = 1.0,
    temperature: float = 0.05,
    symmetric: bool = False,
    epochs: int = 10,
    batch_size: int = 512,
    lr: float = 1e-3,
    holdout: float = 0.1,
    neighbourhood_floor: float = NEIGHBOURHOOD_FLOOR,
    seed: int = 0,
    threads: int | None = None,
    progress: Progress | None = None,
) -> FitResult:
    """Fits the λ-orthogonal affine map; with ``lam=None`` λ is swept over ``lams`` on a held-out slice.

    ``progress`` gets one record per epoch: ``lam``, ``epoch`` (within its fit), the named loss terms and
    ``fraction`` (of all the epochs of the sweep and the final fit). Returns a FitResult whose transform is
    an AffineTransform(kind="lambda_orthogonal"); ``info`` has the chosen ``lam``, the ``sweep`` table (per
    λ: held-out ``recall_at_10``, ``neighbourhood_agreement``, ``ortho_gap``; empty when ``lam`` is given),
    ``floor_met``, the final ``ortho_gap`` and ``seconds``; ``history`` is the final fit's.
    """
    cfg = TrainConfig(w_fit, w_con, temperature, symmetric, epochs, batch_size, lr, seed)
    LambdaOrthogonalityLoss(0.0, alpha)  # validates alpha before any work
    if lam is not None:
        LambdaOrthogonalityLoss(lam, alpha)
    else:
        if not lams:
            raise ValueError("lams must not be empty")
        for value in lams:
            LambdaOrthogonalityLoss(value, alpha)
        if not 0 < holdout < 1:
            raise ValueError(f"holdout must be in (0, 1), got {holdout}")
        if not 0 <= neighbourhood_floor <= 1:
            raise ValueError(f"neighbourhood_floor must be in [0, 1], got {neighbourhood_floor}")
    Pairs.from_calibration(cal)  # validates the pairs before any work
    start = time.perf_counter()
    info: dict[str, Any] = {"init": "procrustes", "neighbourhood_floor": neighbourhood_floor, "sweep": []}
    with torch_threads(threads):
        n_fits = 1
        if lam is None:
            n_fits += len(lams)
            lam, info["sweep"], info["floor_met"] = _sweep(
                cal, lams, alpha, cfg, holdout, neighbourhood_floor, progress
            )
        transform, history, scale = _fit_affine(cal, lam, alpha, cfg, _stage(progress, n_fits - 1, n_fits, epochs))
    info.update(lam=lam, procrustes_scale=scale, ortho_gap=_gap(transform.W["query"]))
    info["seconds"] = time.perf_counter() - start
    return FitResult(transform, info, history)


def _sweep(
    cal: Calibration,
    lams: Sequence[float],
    alpha: float,
    cfg: TrainConfig,
    holdout: float,
    floor: float,
    progress: Progress | None,
) -> tuple[float, list[dict[str, float]], bool]:
    """Trains one map per λ on the training slice and scores it on the held-out slice; returns
    (chosen λ, table, whether the chosen λ meets the floor)."""
    train, held = split_calibration(cal, holdout, cfg.seed)
    parts = [
        (side, np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y, dtype=np.float32))
        for side, x, y in (("doc", held.doc_new, held.doc_home), ("query", held.query_new, held.query_home))
        if len(x) > K
    ]
    if not parts or not (len(train.doc_new) + len(train.query_new)):
        raise ValueError(f"holdout={holdout} leaves too few pairs to score the sweep: need more than {K} held out")
    x_new = np.vstack([x for _, x, _ in parts])
    table: list[dict[str, float]] = []
    for i, lam in enumerate(lams):
        t, _, _ = _fit_affine(train, float(lam), alpha, cfg, _stage(progress, i, len(lams) + 1, cfg.epochs))
        mapped = [t.apply(x, side) for side, x, _ in parts]
        row = {"lam": float(lam)}
        for k in (K, 1):
            hits = sum(recall_at_k(m, y, k) * len(m) for m, (_, _, y) in zip(mapped, parts, strict=True))
            row[f"recall_at_{k}"] = hits / len(x_new)
        row["neighbourhood_agreement"] = neighbourhood_agreement(x_new, np.vstack(mapped))
        row["ortho_gap"] = _gap(t.W["query"])
        table.append(row)
    lam, met = choose_lam(table, floor)
    return lam, table, met
