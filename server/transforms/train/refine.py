"""Task refinement of a closed-form linear map (``procrustes``, ``affine``): a few epochs of the task loss.

:func:`refine_linear` starts at the fitted query map exactly (W, and b folded onto centred input) and
trains it with :func:`~.loop.train_map`: ``orthogonal=True`` keeps W = s·Q with Q orthonormal
(:class:`~.maps.OrthogonalMap`, so ``procrustes`` stays a scaled isometry), otherwise W is free. Only
with training relevance: without it the closed form already solves the identification problem it
would train on. Covered by ``tests/test_task_loss.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..base import AffineTransform, Calibration
from .data import TaskData
from .loop import TrainConfig, torch_threads, train_map
from .maps import AffineMap, OrthogonalMap, to_affine

__all__ = ["refine_linear"]


def refine_linear(
    t: AffineTransform,
    cal: Calibration,
    cfg: TrainConfig,
    *,
    orthogonal: bool,
    scale: float = 1.0,
    threads: int | None = None,
) -> tuple[AffineTransform, list[dict[str, float]]]:
    """(refined transform of t's kind and config, history). ``scale``: s in W = s·Q when ``orthogonal``."""
    data = TaskData.build(cal, cfg.hard_negatives)
    W = t.W["query"].astype(np.float64)
    b0 = t.b["query"].astype(np.float64) + data.mean_new["query"].astype(np.float64) @ W
    model: AffineMap | OrthogonalMap
    if orthogonal:
        model = OrthogonalMap((W / scale).astype(np.float32), scale)
    else:
        model = AffineMap(W.shape[0], W.shape[1], W.astype(np.float32))
    with torch.no_grad():
        model.b.copy_(torch.tensor(b0, dtype=torch.float32))
    with torch_threads(threads):
        history = train_map(model, data, cfg)
    config: dict[str, Any] = {**t.config, "task_refinement": cfg.get_config_dict()}
    return to_affine(model, data.mean_new, config), history
