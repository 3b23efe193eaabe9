"""Background work on a collection's segments: merges, training and renumbering.

:class:`SegmentMerges` is the half of :class:`~.segments.Segments` that the maintenance thread
drives: it says when the fresh segment wants a merge (:meth:`~SegmentMerges.wants_merge`) or the
sealed index a compaction, builds the next sealed index beside the live one (a clone with the
fresh rows added, or, untrained, a new index trained on a seeded sample of at most
``TRAIN_SAMPLE_MAX`` live rows, which must then find its own vectors) and publishes it with one
reference swap, so searches never wait. :meth:`~SegmentMerges.renumbered` gives the snapshot
after a merge that drops dead rows or a compaction (``compaction.py``), labels dense and in
order. Covered by ``tests/test_segments.py`` (searches before and after a merge),
``tests/test_compaction.py``, ``tests/test_index_safety.py`` (degenerate training data) and
``tests/test_index_robustness.py`` (vectors of the largest accepted norms).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import faiss
import numpy as np

from .device import Device
from .index_spec import IndexSpec
from .segment_snapshot import Snapshot, bit_slice

__all__ = ["REGRAPH_GROWTH", "REGRAPH_MIN", "TRAIN_SAMPLE_MAX", "SegmentMerges", "check_finds_itself"]

TRAIN_SAMPLE_MAX = 262144  #: most vectors used to train an index
REGRAPH_MIN = 50_000  #: an HNSW graph grown by merges is rebuilt in one add from this many vectors...
REGRAPH_GROWTH = 2.0  #: ...once it holds this many times the vectors of its last one-add build


def check_finds_itself(index: Any, xb: np.ndarray) -> None:
    """Raises RuntimeError when a newly trained index finds none of a sample of its own vectors:
    training on degenerate data (e.g. every vector the same) can leave NaNs in a PCA or a codebook,
    and such an index answers every search with nothing (label -1) or with NaN scores (a fast-scan
    PQ's labels came back with NaN distances) instead of failing. A hit is a label with a score that
    is not NaN, whatever its size: vectors of the accepted norms (up to ``validate.MAX_NORM``, 1e18)
    score up to ~1e36, and a lossy code (SQ4, PQ) of such vectors still finds them, if not exactly
    (a bound of 1e30 here failed an ip IVF4,Flat of norms 5e15 and l2 SQ4 or PQ of norms 3e17)."""
    xq = np.ascontiguousarray(xb[:: max(1, len(xb) // 16)][:16], dtype=np.float32)
    D, I = index.search(xq, 1)
    found = (I[:, 0] >= 0) & ~np.isnan(D[:, 0])
    if not found.any():
        raise RuntimeError(
            f"the trained index finds none of {len(xq)} of its own vectors (degenerate training data, e.g. all"
            " vectors the same, left NaNs in a transform or codebook)"
        )


class SegmentMerges:
    """Merges, training and renumbering of :class:`~.segments.Segments`, which sets these
    attributes in its ``__init__``; run by the maintenance thread (one at a time per collection)."""

    spec: IndexSpec
    device: Device
    name: str
    d: int
    train_min_points: int
    training: bool
    graph_built_n: int  #: vectors of the sealed index's last one-add build (merges grow it further)
    snapshot: Snapshot
    _merge_lock: threading.Lock
    _swap_lock: threading.Lock

    def state(self) -> str:
        s = self.snapshot
        if s.sealed is not None:
            return "ready"
        return "training" if self.training else "exact"

    def live_fresh(self) -> int:
        s = self.snapshot
        return s.nfresh - s.ndead_fresh

    def wants_merge(self, min_fresh: int, fraction: float, idle: bool) -> bool:
        s = self.snapshot
        if s.sealed is None:  # untrained: train once enough live points exist
            return not self.training and self.spec.needs_training and self.live_fresh() >= self.train_min_points
        return s.nfresh > 0 and (idle or s.nfresh >= max(min_fresh, int(fraction * s.nsealed)))

    def merge(self) -> Snapshot | None:
        """Builds the next sealed index beside the live one (training it first if needed), adds
        the fresh rows to it and swaps it in; labels keep their numbers, dead rows included (see
        :meth:`renumbered` for a merge that drops them). Returns the published snapshot (None:
        nothing to do)."""
        with self._merge_lock:
            s = self.snapshot
            if s.nfresh == 0:
                return None
            index = self.merged_index(s, s.fresh[: s.nfresh])
            if s.sealed is None:  # built in one add: the graph a one-shot build gives
                self.graph_built_n = int(index.ntotal)
            search_copy = self.device.to_search_index(index, self.name)  # beside the live one, as the index
            with self._swap_lock:
                cur = self.snapshot
                rest = cur.nfresh - s.nfresh
                fresh, sq = self._rest_of_fresh(cur, s.nfresh)
                nsealed = s.nsealed + s.nfresh
                bits = bit_slice(cur.alive, 0, cur.nlabels) if cur.nlabels else np.zeros(0, bool)
                new = dataclasses.replace(
                    cur,
                    sealed=index,
                    sealed_search=search_copy,
                    nsealed=nsealed,
                    fresh=fresh,
                    fresh_sqnorm=sq,
                    nfresh=rest,
                    ndead_sealed=int(nsealed - np.count_nonzero(bits[:nsealed])),
                    ndead_fresh=int(rest - np.count_nonzero(bits[nsealed:])),
                    sequence=cur.sequence,
                )
                self.snapshot = new
            # the checkpoint of this index covers the writes up to s.sequence
            return dataclasses.replace(new, sequence=s.sequence)

    def merged_index(self, s: Snapshot, xb: np.ndarray) -> Any:
        """A copy of ``s.sealed`` (or, untrained, a new index trained on s's live fresh rows) with
        xb, shape (n, d), added: the index of a merge, built beside the live one."""
        if s.sealed is None:
            self.training = True
            try:
                index = self._trained(s, s.fresh[: s.nfresh])
            finally:
                self.training = False
        else:
            index = faiss.clone_index(s.sealed)
        if len(xb):
            index.add(np.ascontiguousarray(xb, dtype=np.float32))
            if s.sealed is None:
                check_finds_itself(index, xb)
        return index

    def live_fresh_rows(self, s: Snapshot) -> np.ndarray:
        """Rows of s's fresh segment whose label is alive in s, ascending: shape (n,) int64."""
        return np.flatnonzero(bit_slice(s.alive, s.nsealed, s.nlabels)) if s.nfresh else np.zeros(0, np.int64)

    def _rest_of_fresh(self, cur: Snapshot, consumed: int) -> tuple[np.ndarray, np.ndarray]:
        """New fresh arrays holding cur's fresh rows from ``consumed`` on (the writes since a merge began)."""
        rest = cur.nfresh - consumed
        cap = max(2 * rest, 1024)
        fresh = np.zeros((cap, self.d), dtype=np.float32)
        fresh[:rest] = cur.fresh[consumed : cur.nfresh]
        sq = np.zeros(cap, dtype=np.float32)
        sq[:rest] = cur.fresh_sqnorm[consumed : cur.nfresh]
        return fresh, sq

    # -- renumbering merges and compaction (see compaction.py) ---------------------------------

    def wants_regraph(self) -> bool:
        """True when an HNSW graph grown by merges holds at least ``REGRAPH_MIN`` vectors and
        ``REGRAPH_GROWTH`` times the vectors of its last one-add build, and nothing is fresh: rebuilt
        in one add (FAISS inserts a batch in random order), it needs the efSearch of a one-shot build.
        Grown batch by batch in arrival order, 1M tiled debdesc vectors (M=32, efConstruction=100)
        needed efSearch 512 for Recall@10 0.95 (0.9404 at 384) against 384 (0.9522) built at once."""
        s = self.snapshot
        return (
            s.sealed is not None
            and self.spec.is_hnsw
            and s.nfresh == 0
            and s.nsealed >= max(REGRAPH_MIN, REGRAPH_GROWTH * self.graph_built_n)
        )

    def wants_compaction(self, fraction: float, min_dead: int) -> bool:
        """True when more than ``min_dead`` sealed labels, and more than ``fraction`` of them, are dead."""
        s = self.snapshot
        return s.sealed is not None and s.ndead_sealed > min_dead and s.ndead_sealed > fraction * s.nsealed

    def compacted_index(self, s: Snapshot, xb: np.ndarray) -> Any:
        """A new sealed index holding xb, shape (m, d): the live vectors of s in label order.
        A trained index keeps its training (cloned, then emptied); the others are built anew."""
        if self.spec.needs_training:
            sealed: Any = s.sealed
            index = faiss.clone_index(sealed)
            index.reset()
        else:
            index = self.spec.new_index()
        if len(xb):
            index.add(np.ascontiguousarray(xb, dtype=np.float32))
        return index

    def renumbered(
        self, base: Snapshot, sealed_keep: np.ndarray | None, fresh_keep: np.ndarray, index: Any, search_copy: Any
    ) -> tuple[Snapshot, np.ndarray]:
        """The snapshot after a renumbering merge or compaction, and old label -> new label (-1:
        dropped), shape (nlabels,).

        ``index`` holds, as rows 0..m-1, base's sealed labels ``sealed_keep`` (ascending; None: all
        of them, unmoved) then base's fresh rows ``fresh_keep`` (ascending); every other label below
        base.nlabels is dropped, and the labels written since base follow, in order, as the new
        fresh segment. Run under the collection's write lock, then :meth:`publish`: no append or
        kill may come between. A label killed since base stays dead under its new number."""
        cur = self.snapshot
        if cur.nsealed != base.nsealed:  # merges and compactions are serialized: a bug, never input
            raise RuntimeError(f"{self.name}: the sealed index changed during a rebuild")
        nb = base.nlabels
        kept = np.concatenate(
            [np.arange(base.nsealed) if sealed_keep is None else sealed_keep, base.nsealed + fresh_keep]
        ).astype(np.int64)
        bits = bit_slice(cur.alive, 0, cur.nlabels) if cur.nlabels else np.zeros(0, dtype=bool)
        listed = np.zeros(nb, dtype=bool)
        listed[kept] = True
        if (bits[:nb] & ~listed).any():  # the rebuilt index must hold every label still alive
            raise RuntimeError(f"{self.name}: a live label is missing from the rebuilt index")
        m, rest = len(kept), cur.nlabels - nb
        old2new = np.full(cur.nlabels, -1, dtype=np.int64)
        old2new[kept] = np.arange(m)
        old2new[nb:] = np.arange(m, m + rest)
        n = m + rest
        alive = np.zeros((n + 7) // 8 + 1, dtype=np.uint8)
        alive[: (n + 7) // 8] = np.packbits(np.concatenate([bits[kept], bits[nb:]]), bitorder="little")
        ids = np.empty(max(n, 1024), dtype=object)
        ids[:m] = cur.ids[kept]
        ids[m:n] = cur.ids[nb : cur.nlabels]
        fresh, sq = self._rest_of_fresh(cur, base.nfresh)
        new = dataclasses.replace(
            cur,
            sealed=index,
            sealed_search=search_copy,
            nsealed=m,
            fresh=fresh,
            fresh_sqnorm=sq,
            nfresh=rest,
            alive=alive,
            ids=ids,
            ndead_sealed=int(m - np.count_nonzero(bits[kept])),
            ndead_fresh=int(rest - np.count_nonzero(bits[nb:])),
            epoch=cur.epoch + 1,
        )
        return new, old2new

    def publish(self, s: Snapshot) -> None:
        """Makes ``s`` the snapshot searches read (one reference swap)."""
        with self._swap_lock:
            self.snapshot = s

    def _trained(self, s: Snapshot, rows: np.ndarray) -> Any:
        live = np.flatnonzero(bit_slice(s.alive, s.nsealed, s.nlabels))
        rng = np.random.default_rng(1234)
        if live.size > TRAIN_SAMPLE_MAX:
            live = np.sort(rng.choice(live, TRAIN_SAMPLE_MAX, replace=False))
        index = self.spec.new_index()
        index.train(np.ascontiguousarray(rows[live]))
        return index
