"""Training tensors for the trained kinds: centred pairs, relevance links and FAISS-mined hard negatives.

:meth:`TaskData.build` centres each side's new vectors by that side's mean (the means are folded into the
serve-time biases afterwards), keeps the home vectors as they are (every term scores cosines), turns
``Calibration.query_relevant`` into (query row, doc row) links and mines ``hard_negatives`` per link with
FAISS in the home space: the home docs the *old* model ranks highest for the home query, minus the
query's relevant docs, i.e. the docs a mapped query is most likely to be confused with.
:meth:`TaskData.batches` cuts one epoch into task batches (links) and identification batches (the pairs
no link covers; every pair when there is no relevance). Covered by ``tests/test_task_loss.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..base import SIDES, Calibration
from ..mining import mining_knn

__all__ = ["Batch", "TaskData", "mine_hard_negatives"]


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    out: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(out)


def mine_hard_negatives(
    xq_home: np.ndarray, xb_home: np.ndarray, relevant: tuple[np.ndarray, ...], h: int
) -> np.ndarray:
    """(m, h) int64: for each home query (m, d), the h home docs (nb, d) nearest by cosine that are not
    among its relevant rows; -1 pads when the gallery has too few."""
    m = len(xq_home)
    out = np.full((m, h), -1, dtype=np.int64)
    if h == 0 or m == 0 or len(xb_home) == 0:
        return out
    extra = max((len(r) for r in relevant), default=0)
    I = mining_knn(_unit(xq_home), _unit(xb_home), h + extra, "ip")
    for i, (row, rel) in enumerate(zip(I, relevant, strict=True)):
        keep = row[(row >= 0) & ~np.isin(row, rel)][:h]
        out[i, : len(keep)] = keep
    return out


@dataclass(frozen=True)
class Batch:
    """One step's rows: ``links`` (b, 2) (query, doc) task pairs with ``hard`` (b, h) negatives and the
    false-negative ``mask`` (b, b + h); or, for an identification batch, ``query`` / ``doc`` rows only."""

    query: Tensor | None
    doc: Tensor | None
    links: Tensor | None = None
    hard: Tensor | None = None
    mask: Tensor | None = None


@dataclass(frozen=True)
class TaskData:
    """xq (m, d_new) / xd (n, d_new): new vectors centred per side; yq (m, d_home) / yd (n, d_home): home
    vectors; ql / dl: labels or None; links (L, 2); hard (L, h); mean_new[side] (d_new,) float32."""

    xq: Tensor
    yq: Tensor
    xd: Tensor
    yd: Tensor
    ql: Tensor | None
    dl: Tensor | None
    links: Tensor
    hard: Tensor
    mean_new: dict[str, np.ndarray]

    @classmethod
    def build(cls, cal: Calibration, hard_negatives: int = 0) -> TaskData:
        """From calibration pairs (see the module docstring); raises ValueError for unusable pairs."""
        sides = {"query": (cal.query_new, cal.query_home), "doc": (cal.doc_new, cal.doc_home)}
        present = [s for s in SIDES if len(sides[s][0])]
        if not present:
            raise ValueError("calibration has no pairs")
        for s in present:
            x, y = sides[s]
            if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
                raise ValueError(f"{s} pairs are not row-aligned: new {x.shape}, home {y.shape}")
        mean_new = {s: np.asarray(sides[s][0], np.float32).mean(0) for s in present}
        for s in SIDES:
            mean_new.setdefault(s, mean_new[present[0]])
        xq, xd = (np.asarray(sides[s][0], np.float32) - mean_new[s] for s in ("query", "doc"))
        links = cal.links()
        relevant = cal.query_relevant or ()
        hard = np.zeros((len(links), 0), dtype=np.int64)
        if len(links) and hard_negatives:
            per_query = mine_hard_negatives(cal.query_home, cal.doc_home, tuple(relevant), hard_negatives)
            hard = per_query[links[:, 0]]
            hard = np.where(hard < 0, links[:, 1:2], hard)  # too small a gallery: repeat the positive, masked
        labels = [
            None if v is None else torch.as_tensor(np.asarray(v, np.int64)) for v in (cal.query_labels, cal.doc_labels)
        ]
        return cls(
            torch.as_tensor(np.ascontiguousarray(xq)),
            torch.as_tensor(np.ascontiguousarray(cal.query_home, dtype=np.float32)),
            torch.as_tensor(np.ascontiguousarray(xd)),
            torch.as_tensor(np.ascontiguousarray(cal.doc_home, dtype=np.float32)),
            labels[0],
            labels[1],
            torch.as_tensor(links),
            torch.as_tensor(hard),
            mean_new,
        )

    @property
    def n_units(self) -> int:
        """Rows one epoch visits: links plus the pairs no link covers."""
        return len(self.links) + len(self._rest("query")) + len(self._rest("doc"))

    def _rest(self, side: str) -> Tensor:
        n = len(self.xq if side == "query" else self.xd)
        covered = torch.zeros(n, dtype=torch.bool)
        if len(self.links):
            covered[self.links[:, 0 if side == "query" else 1]] = True
        return torch.nonzero(~covered).ravel()

    def _mask(self, links: Tensor, hard: Tensor) -> Tensor:
        """(b, b + h) True where an in-batch doc (other than the row's own) or a padded negative is relevant."""
        n_doc = max(len(self.xd), 1)
        keys = self.links[:, 0] * n_doc + self.links[:, 1]  # sorted: links are np.unique rows
        cand = links[:, 0:1] * n_doc + torch.cat([links[:, 1][None, :].expand(len(links), -1), hard], dim=1)
        at = torch.searchsorted(keys, cand).clamp_(max=len(keys) - 1)
        relevant = keys[at] == cand
        relevant[:, : len(links)].fill_diagonal_(False)
        return relevant

    def batches(self, batch_size: int, gen: torch.Generator) -> Iterator[Batch]:
        """One epoch: seeded task batches over the links, then identification batches over the rest."""
        if len(self.links):
            order = torch.randperm(len(self.links), generator=gen)
            for idx in torch.split(order, batch_size):
                links, hard = self.links[idx], self.hard[idx]
                yield Batch(links[:, 0], links[:, 1], links, hard, self._mask(links, hard))
        rest = {s: self._rest(s) for s in SIDES}
        perms = {s: rest[s][torch.randperm(len(rest[s]), generator=gen)] for s in SIDES}
        n_steps = max((len(p) + batch_size - 1) // batch_size for p in perms.values())
        for step in range(n_steps):
            part = {s: perms[s][step * batch_size : (step + 1) * batch_size] for s in SIDES}
            yield Batch(*(part[s] if len(part[s]) > 1 else None for s in SIDES))
