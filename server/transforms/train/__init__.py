"""Torch training for the trained kinds: loss terms (``losses``), maps (``maps``), training tensors with
mined hard negatives (``data``) and the one training loop (``loop``). Imported only when a kind is fitted."""

from .data import Batch, TaskData, mine_hard_negatives
from .loop import MAX_EPOCHS, TrainConfig, torch_threads, train_map
from .losses import (
    ALPHA,
    InfoNCELoss,
    LambdaOrthogonalityLoss,
    TaskLoss,
    info_nce,
    lambda_orthogonality,
    orthogonality_gap,
    sup_con,
)
from .maps import AffineMap, OrthogonalMap, to_affine
from .refine import refine_linear

__all__ = [
    "ALPHA",
    "MAX_EPOCHS",
    "AffineMap",
    "Batch",
    "InfoNCELoss",
    "LambdaOrthogonalityLoss",
    "OrthogonalMap",
    "TaskData",
    "TaskLoss",
    "TrainConfig",
    "info_nce",
    "lambda_orthogonality",
    "mine_hard_negatives",
    "orthogonality_gap",
    "refine_linear",
    "sup_con",
    "to_affine",
    "torch_threads",
    "train_map",
]
