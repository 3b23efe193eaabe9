"""Request-time caps of a fit, so no FitTransform can hold the memory or the fit worker for hours.

:class:`StreamBudget` counts a FitTransform stream while it is assembled (serialized bytes, calibration
pairs, evaluation queries, gallery pairs) and raises :class:`~.errors.ResourceExhausted` as soon as one
passes its cap in :class:`~.config.Limits`: a 1.17 GB stream once took the server to 4.85 GB RSS before
the fit even started. :func:`check_steps` refuses step counts over their caps (``ValueError``, INVALID_ARGUMENT
on the request thread): ``{"epochs": 10000000}`` once ran for hours and queued every other fit. Each
kind's config dataclass checks the same bounds again (``TrainConfig``, ``ProcrustesConfig``, ``AffineConfig``,
``MRLAdapterConfig``), and every other value, when the request builds it (``transforms.fit.build_config``,
right after :func:`check_steps`). The time budget of a running fit is :mod:`.fit_jobs`'. Covered by
``tests/test_fit_limits.py`` and ``tests/test_fit_validation.py``.
"""

from __future__ import annotations

from typing import Any

from .config import Limits
from .errors import ResourceExhausted
from .transforms.procrustes import MAX_REFINE_STEPS
from .transforms.train_config import MAX_EPOCHS

__all__ = ["MAX_EPOCHS", "STEP_KNOBS", "StreamBudget", "check_steps"]

#: config key -> (least, most) of every kind's step-count knobs (the kinds check both; here: the caps)
STEP_KNOBS = {
    "epochs": (1, MAX_EPOCHS),  # lambda_orthogonal, residual_mlp, mrl_adapter
    "sweep_epochs": (1, MAX_EPOCHS),  # lambda_orthogonal: per swept λ
    "task_epochs": (0, MAX_EPOCHS),  # procrustes, affine: task refinement
    "refine_steps": (0, MAX_REFINE_STEPS),  # procrustes: Stiefel refinement when d_new > d_home
}


def check_steps(config: dict[str, Any]) -> None:
    """Raises ValueError naming the first step-count knob of ``config`` over its cap. Other bad values
    (negative, not an integer) are the kind's config dataclass's to refuse, built on the request next."""
    for key, (_, high) in STEP_KNOBS.items():
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > high:
            raise ValueError(f"{key} must be at most {high}, got {value}")


class StreamBudget:
    """Counts one FitTransform stream against ``limits``; ResourceExhausted the moment a cap is passed."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.bytes = self.pairs = self.eval_queries = self.gallery = 0

    def message(self, nbytes: int, i: int) -> None:
        """Counts message ``i`` of ``nbytes`` serialized bytes, before it is decoded."""
        self.bytes += nbytes
        cap = self.limits.max_fit_bytes
        if self.bytes > cap:
            raise ResourceExhausted(
                f"message {i}: the FitTransform stream reached {self.bytes} bytes, over max_fit_bytes={cap}"
            )

    def add(self, what: str, n: int, i: int) -> None:
        """Counts ``n`` more items of ``what``: "pairs" (fitted calibration pairs), "eval_queries" or
        "gallery" (doc pairs with ids, the evaluation gallery)."""
        total = getattr(self, what) + n
        setattr(self, what, total)
        cap = getattr(self.limits, _CAPS[what])
        if total > cap:
            raise ResourceExhausted(f"message {i}: {total} {_NAMES[what]} are over {_CAPS[what]}={cap}")


_CAPS = {"pairs": "max_fit_pairs", "eval_queries": "max_eval_queries", "gallery": "max_eval_gallery"}
_NAMES = {"pairs": "calibration pairs", "eval_queries": "evaluation queries", "gallery": "gallery pairs (with ids)"}
