"""The immutable view a search reads, and the label bitmap helpers the segments share.

A :class:`Snapshot` is one consistent view of a collection's vectors: the sealed FAISS index
(and its search copy on a GPU), the fresh rows searched by brute force, the ``alive`` bitmap
over labels (bit set = alive, the ``faiss.IDSelectorBitmap`` layout) and the label -> point id
array. Writers and merges (``segments.py``, ``segment_merge.py``) build the next snapshot beside
it and swap one reference. The helpers here grow the fresh arrays, set and read bitmap ranges,
pick the k best columns of a score matrix (:func:`best_k`) and drop dead labels from a search
run without a selector (:func:`drop_dead`). Covered by ``tests/test_segments.py`` (against brute
force) and ``tests/test_gpu.py`` (:func:`drop_dead` against the IDSelector search).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .index_spec import IndexSpec, SearchDefaults

__all__ = ["Snapshot", "best_k", "bit_slice", "drop_dead", "grow", "set_bits"]


@dataclass(frozen=True)
class Snapshot:
    """One consistent, immutable view of a collection's vectors for searches."""

    sealed: Any | None  #: faiss.Index over labels [0, nsealed), or None while untrained (always on the CPU)
    sealed_search: Any | None  #: what searches use: ``sealed`` itself, or its GpuSearchIndex copy
    nsealed: int
    fresh: np.ndarray  #: (capacity, d) float32; rows [0, nfresh) hold labels nsealed + row
    fresh_sqnorm: np.ndarray  #: (capacity,) squared norms of the fresh rows (l2)
    nfresh: int
    alive: np.ndarray  #: uint8 bitmap over labels, bit set = alive (IDSelectorBitmap layout)
    ids: np.ndarray  #: object array, label -> point id
    ndead_sealed: int  #: dead labels below nsealed (a selector is needed when > 0)
    ndead_fresh: int  #: dead labels in the fresh segment
    sequence: int  #: last write applied
    epoch: int = 0  #: label numbering: +1 at each compaction, which gives the live labels new numbers
    #: the spec ``sealed`` is built from, and the search parameters a request leaves unset: one
    #: snapshot pairs them with its index, so a search never mixes an old spec with a new index
    #: (an ``auto`` collection's rebuild onto the advisor's choice swaps all three at once)
    spec: IndexSpec | None = None
    defaults: SearchDefaults = field(default_factory=SearchDefaults)

    @property
    def nlabels(self) -> int:
        return self.nsealed + self.nfresh

    @property
    def search_on_gpu(self) -> bool:
        """True when the sealed index is searched through its GPU copy."""
        return self.sealed_search is not self.sealed


def grow(a: np.ndarray, need: int) -> np.ndarray:
    if need <= a.shape[0]:
        return a
    new = np.zeros((max(need, 2 * a.shape[0], 1024), *a.shape[1:]), dtype=a.dtype)
    new[: a.shape[0]] = a
    return new


def best_k(key: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k smallest ``key`` entries of each row, ascending: shape (nq, min(k, n))."""
    nq, n = key.shape
    kk = min(k, n)
    part = np.argpartition(key, kk - 1, axis=1)[:, :kk] if kk < n else np.tile(np.arange(n), (nq, 1))
    order = np.argsort(np.take_along_axis(key, part, axis=1), axis=1, kind="stable")
    sel: np.ndarray = np.take_along_axis(part, order, axis=1)
    return sel


def drop_dead(
    D: np.ndarray, I: np.ndarray, alive: np.ndarray, k: int, worst: np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """The k best live labels of each row of a search run without an IDSelector, in their order.

    D, I : shape (nq, k'), best first (I = -1 for no hit); alive : uint8 bitmap over labels (bit
    set = alive, the IDSelectorBitmap layout). Returns D, I of shape (nq, k), padded with ``worst``
    and -1. Over k' >= k + (dead labels in the index) candidates of an exact index this equals the
    IDSelector search (tests/test_gpu.py checks it on a Flat index).
    """
    nq, kp = I.shape
    live = I >= 0
    lab = I[live]
    live[live] = ((alive[lab >> 3] >> (lab & 7).astype(np.uint8)) & 1) == 1
    width = min(k, kp)
    order = np.argsort(~live, axis=1, kind="stable")[:, :width]  # live first, each in its rank order
    keep = np.take_along_axis(live, order, axis=1)
    Dk = np.full((nq, k), worst, dtype=np.float32)
    Ik = np.full((nq, k), -1, dtype=np.int64)
    Dk[:, :width] = np.where(keep, np.take_along_axis(D, order, axis=1), worst)
    Ik[:, :width] = np.where(keep, np.take_along_axis(I, order, axis=1), -1)
    return Dk, Ik


def set_bits(alive: np.ndarray, start: int, stop: int) -> None:
    """Sets the alive bits of labels start .. stop-1 in place."""
    b0, b1 = start >> 3, (stop + 7) >> 3
    bits = np.unpackbits(alive[b0:b1], bitorder="little")
    bits[start - 8 * b0 : stop - 8 * b0] = 1
    alive[b0:b1] = np.packbits(bits, bitorder="little")


def bit_slice(alive: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Alive flags (bool array) of labels start .. stop-1."""
    b0 = start >> 3
    bits = np.unpackbits(alive[b0 : (stop + 7) >> 3], bitorder="little")
    return bits[start - 8 * b0 : stop - 8 * b0].astype(bool)
