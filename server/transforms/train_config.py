"""How the trained kinds train: :class:`TrainConfig`, importable without torch (the kind registry reads the
kinds' config dataclasses, which extend it, at import time; torch is imported only to validate the loss
arguments, when a config is built). ``train/loop.py`` runs it. Covered by ``tests/test_transforms_torch.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .base import MAX_SEED, check_int

__all__ = ["MAX_EPOCHS", "TrainConfig"]

MAX_EPOCHS = 1000  #: a fit is a request: its epochs are capped


@dataclass(frozen=True)
class TrainConfig:
    """How a map is trained. Defaults measured on debdesc (docs/TRANSFORMS.md, "Training for the task")."""

    epochs: int = 10
    batch_size: int = 512
    lr: float = 1e-3
    temperature: float = 0.03
    w_task: float = 1.0
    w_id: float = 1.0
    hard_negatives: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        from .train.losses import TaskLoss

        TaskLoss(self.temperature, self.w_task, self.w_id)  # validates the loss arguments
        for name, low, high in (("epochs", 1, MAX_EPOCHS), ("batch_size", 2, 65536), ("hard_negatives", 0, 64)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or not (0 < self.lr <= 1):
            raise ValueError(f"lr must be a number in (0, 1], got {self.lr!r}")
        check_int("seed", self.seed, 0, MAX_SEED)  # numpy's default_rng takes no negative seed

    def train_config(self) -> TrainConfig:
        """The training fields alone, as a plain TrainConfig (what ``train_map`` reads)."""
        return TrainConfig(**{f: getattr(self, f) for f in TRAIN_FIELDS})

    def get_config_dict(self) -> dict[str, Any]:
        return asdict(self)


TRAIN_FIELDS = tuple(TrainConfig.__dataclass_fields__)  #: the fields a kind's config inherits from TrainConfig
