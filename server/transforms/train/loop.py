"""The one training loop of the trained kinds: Adam over :class:`~.data.TaskData` batches.

:class:`TrainConfig` (``train_config.py``, torch-free) holds how a map is trained (validated on construction,
persisted with the artefact);
:func:`train_map` runs it: each task batch scores the mapped queries against their relevant home docs,
the batch's other docs and the mined hard negatives (:class:`~.losses.TaskLoss`), plus the two
identification terms; each identification batch only the latter. An optional ``penalty`` (the L_λ of
``lambda_orthogonal``) is added every step. Returns the batch means of the named terms per epoch.
Covered by ``tests/test_task_loss.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..train_config import MAX_EPOCHS, TrainConfig
from .data import Batch, TaskData
from .losses import TaskLoss

__all__ = ["MAX_EPOCHS", "Progress", "TrainConfig", "torch_threads", "train_map"]

Progress = Callable[[dict[str, float]], None]


def train_map(
    model: nn.Module,
    data: TaskData,
    cfg: TrainConfig,
    penalty: Callable[[], Tensor] | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[dict[str, float]]:
    """Trains ``model`` (centred new vectors -> home space) in place; returns the named terms per epoch
    (``task``, ``id_doc``, ``id_query``, ``penalty``, ``total``). ``should_stop`` ends training early."""
    loss = TaskLoss(cfg.temperature, cfg.w_task, cfg.w_id)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history: list[dict[str, float]] = []
    for epoch in range(cfg.epochs):
        sums = dict.fromkeys(("task", "id_doc", "id_query", "penalty", "total"), 0.0)
        steps = 0
        for batch in data.batches(cfg.batch_size, gen):
            if batch.query is None and batch.doc is None:
                continue
            with parametrize.cached():  # an orthogonal map's Q is computed once per step, not per forward
                terms = _step_terms(model, data, batch, loss)
                terms["penalty"] = penalty() if penalty is not None else terms["total"].new_zeros(())
                total = terms["total"] + terms["penalty"]
                opt.zero_grad(set_to_none=True)
                total.backward()  # type: ignore[no-untyped-call]
            opt.step()
            terms["total"] = total
            for name in sums:
                sums[name] += float(terms[name].detach())
            steps += 1
        record = {name: value / max(steps, 1) for name, value in sums.items()}
        history.append(record)
        if progress is not None:
            progress({"epoch": float(epoch + 1), **record})
        if should_stop is not None and should_stop():
            break
    return history


def _step_terms(model: nn.Module, data: TaskData, batch: Batch, loss: TaskLoss) -> dict[str, Tensor]:
    """The named loss terms of one batch: task (links), id_query and id_doc."""
    q = d = task = None
    if batch.query is not None:
        q = (model(data.xq[batch.query]), data.yq[batch.query], _at(data.ql, batch.query))
    if batch.doc is not None:
        d = (model(data.xd[batch.doc]), data.yd[batch.doc], _at(data.dl, batch.doc))
    if batch.links is not None and q is not None and batch.hard is not None:
        hard = data.yd[batch.hard] if batch.hard.shape[1] else None
        task = (q[0], data.yd[batch.links[:, 1]], hard, batch.mask)
    terms: dict[str, Tensor] = loss(q, d, task)
    return terms


def _at(labels: Tensor | None, rows: Tensor) -> Tensor | None:
    return None if labels is None else labels[rows]


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Runs the block with ``torch.set_num_threads(threads)`` (when given), restoring the old count after."""
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
