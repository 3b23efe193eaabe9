"""λ-orthogonality regularized affine map (Ricci et al., NeurIPS 2025, §3.3), trained on the retrieval task.

An affine map B(x) = x @ W + b from the new space (d_new) into the home space (d_home) starts at the
centred Procrustes solution (``procrustes.py``) and is trained with Adam (``train/loop.py``) on::

    total = TaskLoss + L_λ(W)
    TaskLoss = w_task · InfoNCE(B(q_new) -> relevant home doc | batch docs + hard negatives)
             + w_id · (InfoNCE(B(d_new) -> home doc) + InfoNCE(B(q_new) -> home query)) / 2
    L_λ(W) = sigmoid(α · (‖WᵀW − I‖_F − λ)) · ‖WᵀW − I‖_F        (Frobenius norm, weight 1)

Ricci et al. train the map with the task's own supervised loss; the service's task is a new-model query
finding the old-model docs that answer it, so the task term needs training relevance
(``Calibration.query_relevant``, e.g. logged clicks); without it only the identification terms train
the map (the same item across models). Hard negatives are the home docs the old model ranks highest for
the home query (FAISS, ``train/data.py``). λ = 0 pulls W to an orthogonal map (the new model's own
geometry), λ = inf leaves a free affine map.

λ selection (``lam=None``): a seeded ``holdout`` slice is set aside (queries and their relevant docs,
``evaluate.split_calibration``), one map per λ in ``lams`` is trained on the rest and scored on the slice
by the task itself, held-out query -> doc Recall@10 (ties: MRR@10); without relevance by pooled
cross-identification Recall@10 (ties: Recall@1). Identification is not used when relevance is there: it
saturates (held-out query pairs give Recall@10 = 1.000 for every λ on debdesc). The chosen λ's map is
refitted on all pairs; ``info["sweep"]`` keeps the table. The weights, temperature and epochs are
measured in docs/TRANSFORMS.md ("Training for the task").

Covered by ``tests/test_transforms_torch.py`` and ``tests/test_task_loss.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .base import AffineTransform, Calibration, FitResult, check_threads, configure
from .evaluate import _prep, hits, knn, ranking_metrics, split_calibration
from .offsets import task_recall
from .procrustes import fit_procrustes
from .train_config import TrainConfig

__all__ = [
    "DEFAULT_LAMS",
    "K",
    "LambdaOrthogonalConfig",
    "choose_lam",
    "fit_lambda_orthogonal",
    "identification",
    "procrustes_init",
]

DEFAULT_LAMS = (0.0, 8.0, math.inf)
K = 10  #: the held-out Recall@K the sweep ranks by

Progress = Callable[[dict[str, float]], None]


def procrustes_init(cal: Calibration) -> tuple[np.ndarray, float]:
    """W0 = s R of the centred, scaled Procrustes fit; returns (W0 (d_new, d_home) float32, s)."""
    result = fit_procrustes(cal, center=True, scale=True, task_epochs=0)
    if not isinstance(result.transform, AffineTransform):
        raise TypeError(f"fit_procrustes returned {type(result.transform).__name__}, expected AffineTransform")
    return result.transform.W["query"].astype(np.float32), float(result.info["scale"])


def identification(t: AffineTransform, held: Calibration, k: int = K) -> dict[str, float]:
    """Pooled cross-identification on held-out pairs: T(x_new(i)) searches its side's held-out home items
    for x_home(i) (cosine); ``{r1, r<k>, mrr<k>}`` weighted by each side's pairs."""
    out = {"r1": 0.0, f"r{k}": 0.0, f"mrr{k}": 0.0}
    total = 0
    for side, x, y in (("doc", held.doc_new, held.doc_home), ("query", held.query_new, held.query_home)):
        if len(x) <= k:
            continue
        I = knn(_prep(t.apply(np.asarray(x, np.float32), side), "cosine"), _prep(y, "cosine"), k, "cosine")
        for name, v in ranking_metrics(hits(I, None), np.ones(len(I)), k).items():
            out[name] += v * len(I)
        total += len(I)
    if not total:
        raise ValueError(f"the held-out slice is too small to score: need more than {k} pairs on a side")
    return {name: v / total for name, v in out.items()}


def choose_lam(table: Sequence[dict[str, Any]], k: int = K) -> float:
    """The λ of the sweep row with the best held-out ``r<k>`` (ties: ``mrr<k>``, then the earlier row)."""
    best = max(enumerate(table), key=lambda e: (e[1][f"r{k}"], e[1][f"mrr{k}"], -e[0]))
    return float(best[1]["lam"])


def _fit_one(
    cal: Calibration, lam: float, alpha: float, cfg: TrainConfig, threads: int | None, progress: Progress | None
) -> tuple[AffineTransform, list[dict[str, float]], float]:
    """Trains one λ-regularized map on ``cal``; returns (transform, history, procrustes scale)."""
    from .train import AffineMap, LambdaOrthogonalityLoss, TaskData, to_affine, torch_threads, train_map

    ortho = LambdaOrthogonalityLoss(lam, alpha)
    with torch_threads(threads):
        data = TaskData.build(cal, cfg.hard_negatives)
        W0, scale = procrustes_init(cal)
        model = AffineMap(W0.shape[0], W0.shape[1], W0)
        history = train_map(model, data, cfg, lambda: ortho(model.W), progress)
    config = {"kind": "lambda_orthogonal", **ortho.get_config_dict(), **cfg.get_config_dict()}
    return to_affine(model, data.mean_new, config), history, scale


def _stage(progress: Progress | None, before: int, total: int, lam: float) -> Progress | None:
    """Wraps ``progress`` for a fit that starts after ``before`` of ``total`` epochs: adds ``lam`` and
    ``fraction``, the share of all epochs done."""
    if progress is None:
        return None
    report = progress

    def stage(record: dict[str, float]) -> None:
        report({**record, "lam": lam, "fraction": (before + record["epoch"]) / total})

    return stage


@dataclass(frozen=True)
class LambdaOrthogonalConfig(TrainConfig):
    """How :func:`fit_lambda_orthogonal` fits: the training fields of :class:`~.train_config.TrainConfig`, λ
    (``lam``, or None to sweep ``lams`` on a ``holdout`` slice, ``sweep_epochs`` each: default ``epochs // 2``),
    the L_λ steepness ``alpha`` and the torch ``threads``. Validated on construction (imports torch)."""

    lam: float | None = None
    lams: Sequence[float] = DEFAULT_LAMS
    alpha: float = 5.0
    sweep_epochs: int | None = None
    holdout: float = 0.1
    threads: int | None = None

    def __post_init__(self) -> None:
        from .train import LambdaOrthogonalityLoss

        super().__post_init__()
        self.sweep_config()  # validates sweep_epochs as a TrainConfig's epochs
        LambdaOrthogonalityLoss(0.0, self.alpha)  # validates alpha before any work
        lams = self.lams
        if isinstance(lams, str | bytes) or not isinstance(lams, Sequence):
            raise ValueError(f"lams must be a sequence of numbers, got {lams!r}")
        if not lams:
            raise ValueError("lams must not be empty")
        for value in (*lams, *([] if self.lam is None else [self.lam])):
            LambdaOrthogonalityLoss(value, self.alpha)
        holdout = self.holdout  # checked with a lam given too: a request's values all are
        if isinstance(holdout, bool) or not isinstance(holdout, int | float) or not 0 < holdout < 1:
            raise ValueError(f"holdout must be in (0, 1), got {holdout!r}")
        check_threads(self.threads)

    def grid(self) -> list[float]:
        """The λ values to fit: ``[lam]``, or ``lams`` to sweep."""
        return [self.lam] if self.lam is not None else list(self.lams)

    def sweep_config(self) -> TrainConfig:
        """How each swept λ trains: ``sweep_epochs`` epochs (default ``epochs // 2``, at least 1)."""
        epochs = max(1, self.epochs // 2) if self.sweep_epochs is None else self.sweep_epochs
        return replace(self.train_config(), epochs=epochs)


def fit_lambda_orthogonal(
    cal: Calibration,
    config: LambdaOrthogonalConfig | None = None,
    *,
    progress: Progress | None = None,
    **overrides: Any,
) -> FitResult:
    """Fits the λ-orthogonal affine map; with ``lam=None`` λ is swept over ``lams`` on a held-out slice.

    Each swept map trains ``sweep_epochs`` (default ``epochs // 2``: the sweep ranks λ, the refit trains
    the chosen one fully), the final map ``epochs``.

    Returns a FitResult whose transform is an AffineTransform(kind="lambda_orthogonal"); ``info`` has the
    chosen ``lam``, the ``sweep`` table (per λ: held-out ``r1``, ``r10``, ``mrr10``, ``ortho_gap``, and the
    ``sweep_metric``, ``sweep_epochs``), the final ``ortho_gap``, ``relevance`` (task links used) and ``seconds``."""
    conf = configure(LambdaOrthogonalConfig, config, overrides)
    cfg, sweep_cfg, grid = conf.train_config(), conf.sweep_config(), conf.grid()
    lam, alpha, epochs, threads = conf.lam, conf.alpha, conf.epochs, conf.threads
    start = time.perf_counter()
    info: dict[str, Any] = {"init": "procrustes", "sweep": [], "relevance": len(cal.links())}
    sweeping = lam is None and len(grid) > 1
    total = (len(grid) * sweep_cfg.epochs if sweeping else 0) + epochs  #: epochs of the whole fit, for progress
    if sweeping:
        train, held = split_calibration(cal, conf.holdout, conf.seed)
        use_task = held.query_relevant is not None and task_recall(None, held, "cosine", K) is not None
        info["sweep_metric"] = "heldout_task_recall" if use_task else "heldout_identification"
        info["sweep_epochs"] = sweep_cfg.epochs
        for i, value in enumerate(grid):
            stage = _stage(progress, i * sweep_cfg.epochs, total, value)
            t, _, _ = _fit_one(train, float(value), alpha, sweep_cfg, threads, stage)
            scores = task_recall(t, held, "cosine", K, train.doc_home) if use_task else identification(t, held)
            row = {"lam": float(value), **(scores or {}), "ortho_gap": _gap(t.W["query"])}
            info["sweep"].append(row)
        lam = choose_lam(info["sweep"])
    chosen = float(grid[0] if lam is None else lam)
    stage = _stage(progress, total - epochs, total, chosen)
    transform, history, scale = _fit_one(cal, chosen, alpha, cfg, threads, stage)
    info.update(lam=chosen, procrustes_scale=scale, ortho_gap=_gap(transform.W["query"]))
    info["seconds"] = time.perf_counter() - start
    return FitResult(transform, info, history)


def _gap(W: np.ndarray) -> float:
    import torch

    from .train import orthogonality_gap

    return float(orthogonality_gap(torch.tensor(W, dtype=torch.float64)))
