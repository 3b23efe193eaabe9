"""Renumbering: merges that leave dead rows out, and compaction of a sealed index, while serving.

Overwrites and deletes leave dead labels, filtered at search time; a 3-minute overwrite soak
grew 255,000 of them beside 5,800 live points (RSS 171 -> 1,085 MB, search throughput /10), and
merges spent most of their time adding rows already dead to the HNSW graph. Two operations
renumber labels densely, in order, so dead ones leave the index:

- :func:`merge_dropping_dead`, the merge of a fresh segment that holds dead rows: only the live
  rows join the sealed index. Sealed labels keep their numbers, so the last checkpoint (which
  holds a prefix of them) stays valid;
- :func:`compact`, when more than ``min_dead`` sealed labels, and more than ``fraction`` of them,
  are dead: a new sealed index of every live vector, read from the store, built beside the live
  one (a trained index keeps its training). The checkpoint is deleted before the store is
  renumbered (a crash then rebuilds from the store) and rewritten after.

Both build the index under the maintenance lock while searches and writes go on, then, under the
write lock only (writes wait, searches do not), renumber the store's labels in one transaction
and swap the snapshot, the point map and the rerank vectors, one reference each
(:meth:`Segments.renumbered`). Labels written during the build are fresh and move down; labels
killed meanwhile stay dead. Recovery compacts too. Covered by ``tests/test_compaction.py``.

:func:`rebuild_onto` is a compaction onto another index spec: an ``auto`` collection's move onto
the index advisor's choice (``advisor_auto.py``). The new index is trained on a seeded sample of the
live vectors and filled with all of them beside the live one; under the write lock the snapshot
takes the new index with its spec and search defaults at once, and the store records the spec and
the operating point after the renumbering (a crash in between leaves the old spec over the new
numbering: the restart rebuilds it and the advisor runs again). Covered by ``tests/test_advisor.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from . import checkpoint
from .index_spec import IndexSpec, SearchDefaults
from .segment_merge import TRAIN_SAMPLE_MAX, check_finds_itself
from .segments import Snapshot

if TYPE_CHECKING:
    from .collection_index import CollectionIndex

__all__ = ["COMPACT_FRACTION", "COMPACT_MIN_DEAD", "compact", "merge_dropping_dead", "rebuild_onto", "regraph"]

log = logging.getLogger(__name__)

COMPACT_FRACTION = 0.5  #: compact when more than this fraction of the sealed labels are dead...
COMPACT_MIN_DEAD = 1024  #: ...and more than this many
RETRY_SECONDS = 60.0  #: wait after a compaction that raised


def merge_dropping_dead(col: CollectionIndex) -> Snapshot | None:
    """Merges the live rows of the fresh segment into a copy of the sealed index (training it
    first if needed) and renumbers; the caller holds ``col.maint_lock``. Returns the published
    snapshot with the sequence its index covers (None: nothing to merge)."""
    seg = col.segments
    s = seg.snapshot
    if s.nfresh == 0:
        return None
    keep = seg.live_fresh_rows(s)
    index = seg.merged_index(s, s.fresh[keep])
    new = _renumber(col, s, None, keep, index, drop_checkpoint=False)
    return dataclasses.replace(new, sequence=s.sequence) if new is not None else None


def compact(col: CollectionIndex, *, fraction: float, min_dead: int, checkpoint_after: bool = True) -> bool:
    """Compacts ``col`` if its dead sealed labels pass the thresholds. Returns True after a compaction."""
    seg = col.segments
    if col.failure is not None or time.monotonic() < col.compact_not_before:
        return False
    if not seg.wants_compaction(fraction, min_dead):
        return False
    try:
        return _compact(col, fraction, min_dead, checkpoint_after)
    except Exception:  # never in a tight loop: the maintenance thread comes back every 0.1 s
        col.compact_not_before = time.monotonic() + RETRY_SECONDS
        log.exception("compaction of %s failed; retrying in %.0fs", col.name, RETRY_SECONDS)
        return False


def regraph(col: CollectionIndex, *, checkpoint_after: bool = True) -> bool:
    """Rebuilds an HNSW graph grown by merges in one add once it has doubled (``wants_regraph``; the
    caller checks the collection is idle): the same path as a compaction. Returns True after one."""
    seg = col.segments
    if col.failure is not None or time.monotonic() < col.compact_not_before or not seg.wants_regraph():
        return False
    try:
        return _compact(col, 0.0, 0, checkpoint_after, rebuild_graph=True)
    except Exception:
        col.compact_not_before = time.monotonic() + RETRY_SECONDS
        log.exception("graph rebuild of %s failed; retrying in %.0fs", col.name, RETRY_SECONDS)
        return False


def _compact(
    col: CollectionIndex, fraction: float, min_dead: int, checkpoint_after: bool, *, rebuild_graph: bool = False
) -> bool:
    seg = col.segments
    with col.maint_lock:
        s = seg.snapshot
        wanted = seg.wants_regraph() if rebuild_graph else seg.wants_compaction(fraction, min_dead)
        if col.dropped or not wanted:
            return False
        t0 = time.perf_counter()
        labels, x = col.store.home_vectors_from(col.row.cid, 0, col.home.dim)
        keep = labels < s.nlabels  # alive when read: a subset of the labels alive in s
        labels = labels[keep]
        index = seg.compacted_index(s, col.index_view(col.to_basis(x[keep])))
        sealed_keep = labels[labels < s.nsealed]
        seq = col.checkpoint_sequence  # what the sealed index covers (merges wait on maint_lock)
        new = _renumber(col, s, sealed_keep, labels[labels >= s.nsealed] - s.nsealed, index, drop_checkpoint=True)
        if new is None:
            return False
        seg.graph_built_n = int(index.ntotal)
        if checkpoint_after:
            col.save_checkpoint(index, seq)
    col.compactions += 1
    col.metrics.compactions.labels(col.name).inc()
    col.publish_gauges()
    log.info(
        "%s %s: %d of %d labels were dead, %d remain, in %.2fs",
        "rebuilt the graph of" if rebuild_graph else "compacted",
        col.name,
        s.ndead_sealed + s.ndead_fresh,
        s.nlabels,
        len(labels),
        time.perf_counter() - t0,
    )
    return True


def rebuild_onto(
    col: CollectionIndex, spec: IndexSpec, defaults: SearchDefaults, operating_point: str, status: str = ""
) -> bool:
    """Rebuilds ``col``'s sealed index onto ``spec`` (searched with ``defaults`` where a request sets
    nothing) and records it, with ``operating_point`` (JSON), as the collection's index;
    ``advisor_status`` becomes ``status`` with the swap. Returns True once the new index serves
    (False: the collection was dropped meanwhile)."""
    seg = col.segments
    with col.maint_lock:
        s = seg.snapshot
        if col.dropped:
            return False
        t0 = time.perf_counter()
        labels, x = col.store.home_vectors_from(col.row.cid, 0, col.home.dim)
        keep = labels < s.nlabels  # alive when read: a subset of the labels alive in s
        labels = labels[keep]
        xb = np.ascontiguousarray(col.index_view(col.to_basis(x[keep])), dtype=np.float32)
        index = spec.new_index()
        if spec.needs_training:
            rows = np.arange(len(xb))
            if len(rows) > TRAIN_SAMPLE_MAX:
                rows = np.sort(np.random.default_rng(1234).choice(rows, TRAIN_SAMPLE_MAX, replace=False))
            index.train(xb[rows])
        if len(xb):
            index.add(xb)
            check_finds_itself(index, xb)
        sealed_keep = labels[labels < s.nsealed]
        fresh_keep = labels[labels >= s.nsealed] - s.nsealed
        train_min = max(spec.min_train_points, min(spec.default_train_min, len(xb))) if spec.needs_training else 0
        swap = (spec, defaults, operating_point, train_min, status)
        new = _renumber(col, s, sealed_keep, fresh_keep, index, drop_checkpoint=True, swap=swap)
        if new is None:
            return False
        col.save_checkpoint(index, s.sequence)  # every write up to s's is in it (deletes are labels)
    col.publish_gauges()
    log.info("rebuilt %s onto %s (%d vectors) in %.2fs", col.name, spec.spec, len(labels), time.perf_counter() - t0)
    return True


def _renumber(
    col: CollectionIndex,
    base: Snapshot,
    sealed_keep: np.ndarray | None,
    fresh_keep: np.ndarray,
    index: Any,
    *,
    drop_checkpoint: bool,
    swap: tuple[IndexSpec, SearchDefaults, str, int, str] | None = None,
) -> Snapshot | None:
    """Publishes ``index`` (built from ``base``) with the labels renumbered in memory and in the
    store, under the write lock. ``swap`` = (spec, defaults, operating point, train_min_points,
    advisor status): the index is of a new spec, which the snapshot, the segments and the store take
    with it. Returns the new snapshot (None: the collection was dropped)."""
    seg = col.segments
    search_copy = col.device.to_search_index(index, col.name)  # beside the live one, as the index
    with col.lock:
        if col.dropped:
            return None
        new, old2new = seg.renumbered(base, sealed_keep, fresh_keep, index, search_copy)
        if swap is not None:
            new = dataclasses.replace(new, spec=swap[0], defaults=swap[1])
        old = np.sort(np.fromiter((lab for lab in col.pids.values() if lab >= 0), dtype=np.int64))
        renumbered = old2new[old]
        if (renumbered < 0).any():  # a point's label missing from the new numbering: a bug
            raise RuntimeError(f"{col.name}: a live point has no label after renumbering")
        pids = {pid: int(old2new[lab]) if lab >= 0 else -1 for pid, lab in col.pids.items()}
        full = col.full[1]
        if col.row.spec.prefix_dims:
            full = np.zeros((max(new.nlabels, 1024), full.shape[1]), dtype=np.float32)
            moved = old2new >= 0
            full[old2new[moved]] = col.full[1][: len(old2new)][moved]
        if drop_checkpoint:  # sealed labels move: no checkpoint may pair with the new numbering
            checkpoint.remove(col.folder)
            col.checkpoint_sequence = 0
        changed = renumbered != old
        col.store.relabel(col.row.cid, old[changed], renumbered[changed], next_label=new.nlabels)
        if swap is not None:
            spec, defaults, point, train_min, status = swap
            col.store.set_index_spec(col.row.cid, spec.spec, point, train_min)
            row_spec = dataclasses.replace(col.row.spec, index_spec=spec.spec, operating_point=point)
            col.row = dataclasses.replace(col.row, spec=dataclasses.replace(row_spec, train_min_points=train_min))
            col.spec = seg.spec = spec
            seg.defaults, seg.train_min_points = defaults, train_min
            col.advisor_status = status or col.advisor_status
        col.full = (new.epoch, full)
        seg.publish(new)
        col.pids, col.next_label = pids, new.nlabels
    return new
