"""Loss terms for the trained kinds, as pure functions and one small ``nn.Module`` each.

* :func:`info_nce`: cross-entropy over cosine logits, row i of ``pred`` (b, d) must pick row i of
  ``target`` (b, d) among the batch's targets and its own extra negatives ``hard`` (b, h, d); entries of
  ``mask`` (b, b + h), True where a candidate is another positive of row i, are left out of the softmax.
* :class:`TaskLoss`: the retrieval task the service serves (Ricci et al. train the λ-orthogonal map with
  the task's own supervised loss; ours is query -> doc retrieval): mapped new query i must rank its
  relevant home doc above the batch's other home docs and the hard negatives mined for it; plus the two
  identification terms (mapped new doc i -> home doc i, mapped new query i -> home query i) as
  regularizers. Returns the named terms ``task``, ``id_doc``, ``id_query`` and ``total``.
* :func:`sup_con`: the supervised contrastive loss used by the identification terms when pairs carry
  class labels (Khosla et al. 2020, L_out).
* :class:`LambdaOrthogonalityLoss`: L_λ(W) = sigmoid(α(‖WᵀW − I‖_F − λ)) · ‖WᵀW − I‖_F.

Covered by ``tests/test_task_loss.py`` (against a numpy reference) and ``tests/test_transforms_torch.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ALPHA",
    "InfoNCELoss",
    "LambdaOrthogonalityLoss",
    "TaskLoss",
    "info_nce",
    "lambda_orthogonality",
    "orthogonality_gap",
    "sup_con",
]

ALPHA = 5.0  #: steepness of the L_λ gate: with α = 5 a fit ends ~2 below λ, so λ reads as the allowed gap


def _positive_finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _weight(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def info_nce(
    pred: Tensor, target: Tensor, temperature: float, hard: Tensor | None = None, mask: Tensor | None = None
) -> Tensor:
    """Mean over rows of −log softmax(cos(pred_i, ·) / τ)_i over [target (b, d); hard_i (h, d)].

    pred : (b, d), target : (b, d), hard : (b, h, d) or None, mask : (b, b + h) bool or None (True: drop)."""
    p = F.normalize(pred, dim=1)
    logits = p @ F.normalize(target, dim=1).T
    if hard is not None and hard.shape[1]:
        logits = torch.cat([logits, torch.einsum("bd,bhd->bh", p, F.normalize(hard, dim=2))], dim=1)
    logits = logits / temperature
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(pred), device=pred.device))


def sup_con(pred: Tensor, target: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Cross-space supervised contrastive loss with pred (b, d) as anchors, target (b, d) as candidates and
    positives the targets sharing the anchor's label (b,); equals :func:`info_nce` when labels are distinct."""
    logits = F.normalize(pred, dim=1) @ F.normalize(target, dim=1).T / temperature
    log_prob = torch.log_softmax(logits, dim=1)
    positive = (labels[:, None] == labels[None, :]).to(log_prob.dtype)
    return -((log_prob * positive).sum(1) / positive.sum(1)).mean()


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


class LambdaOrthogonalityLoss(nn.Module):
    """L_λ(W) (weight 1); λ = inf disables it (exactly 0).

    Args:
        lam: the allowed deviation from orthogonality, >= 0, or ``math.inf`` (or "inf") for none.
        alpha: steepness of the sigmoid gate, > 0.
    """

    def __init__(self, lam: float | str = 0.0, alpha: float = ALPHA) -> None:
        super().__init__()
        if lam == "inf":  # strict JSON (a stored config, a FitTransform config_json) spells infinity so
            lam = math.inf
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not lam >= 0:  # also rejects NaN
            raise ValueError(f'lam must be >= 0 or math.inf ("inf" in JSON), got {lam!r}')
        self.lam, self.alpha = float(lam), _positive_finite("alpha", alpha)

    def forward(self, W: Tensor) -> Tensor:
        return lambda_orthogonality(W, self.lam, self.alpha)

    def get_config_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "alpha": self.alpha}


class InfoNCELoss(nn.Module):
    """In-batch InfoNCE: row i of pred (b, d) must pick row i of target (b, d) (``mrl_adapter``'s inner loss).

    Args:
        temperature: τ > 0 dividing the cosine logits.
        symmetric: also score target -> pred and average (default one-way).
    """

    def __init__(self, temperature: float = 0.05, symmetric: bool = False) -> None:
        super().__init__()
        self.temperature, self.symmetric = _positive_finite("temperature", temperature), bool(symmetric)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        loss = info_nce(pred, target, self.temperature)
        if self.symmetric:
            loss = (loss + info_nce(target, pred, self.temperature)) / 2
        return loss

    def get_config_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "symmetric": self.symmetric}


class TaskLoss(nn.Module):
    """w_task · InfoNCE(query -> relevant doc, in-batch + hard negatives) + w_id · (id_doc + id_query) / 2.

    Args:
        temperature: τ > 0 dividing the cosine logits of every term.
        w_task: weight of the query -> doc term (>= 0).
        w_id: weight of the mean of the two identification terms (>= 0); not both weights 0.
    """

    def __init__(self, temperature: float = 0.05, w_task: float = 1.0, w_id: float = 1.0) -> None:
        super().__init__()
        self.temperature = _positive_finite("temperature", temperature)
        self.w_task, self.w_id = _weight("w_task", w_task), _weight("w_id", w_id)
        if self.w_task + self.w_id == 0:
            raise ValueError("w_task and w_id must not both be 0")

    def identification(self, pred: Tensor, target: Tensor, labels: Tensor | None = None) -> Tensor:
        """Mapped new item i (b, d) must pick its own home item among the batch's (SupCon with labels)."""
        if labels is not None:
            return sup_con(pred, target, labels, self.temperature)
        return info_nce(pred, target, self.temperature)

    def forward(
        self,
        query: tuple[Tensor, Tensor, Tensor | None] | None,
        doc: tuple[Tensor, Tensor, Tensor | None] | None,
        task: tuple[Tensor, Tensor, Tensor | None, Tensor | None] | None,
    ) -> dict[str, Tensor]:
        """Named terms from (mapped, home, labels) query and doc pairs and the task batch (mapped queries
        (b, d), their relevant home docs (b, d), hard negatives (b, h, d) or None, false-negative mask or None).
        A part that is None contributes 0."""
        zero = next(t for part in (query, doc, task) if part is not None for t in part if t is not None).new_zeros(())
        terms = {
            "task": info_nce(task[0], task[1], self.temperature, task[2], task[3]) if task is not None else zero,
            "id_doc": self.identification(*doc) if doc is not None else zero,
            "id_query": self.identification(*query) if query is not None else zero,
        }
        n_id = (query is not None) + (doc is not None)
        ident = (terms["id_doc"] + terms["id_query"]) / max(n_id, 1)
        terms["total"] = self.w_task * terms["task"] + self.w_id * ident
        return terms

    def get_config_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "w_task": self.w_task, "w_id": self.w_id}
