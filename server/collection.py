"""One collection at run time: its writes, reads, searches, recovery and maintenance.

Every write follows the same order under the collection's write lock: checks
(done by the caller, at the boundary) -> one store transaction (durable on
return) -> apply to the in-memory :class:`~.segments.Segments` -> acknowledge.
So an acknowledged write is in the store (survives ``kill -9``) and in the
next search's snapshot (read-your-writes). Searches take no lock.

A collection whose index cannot be built is *failed* (``failures.py``) instead
of taking the process down: one that cannot even be opened (an index spec the
service no longer accepts, a missing basis transform) answers every point RPC
with FAILED_PRECONDITION; one whose training or merge raised keeps taking writes
but answers searches with FAILED_PRECONDITION, and the build is retried with an
exponential back-off (sooner once new writes arrive), never in a tight loop.
Covered by ``tests/test_index_safety.py``; compaction by ``tests/test_compaction.py``.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import checkpoint
from .compaction import COMPACT_FRACTION, COMPACT_MIN_DEAD, compact, merge_dropping_dead
from .device import Device
from .errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from .failures import BuildFailures, Failure
from .funnel import check_funnel, rerank, shrink
from .index_spec import IndexSpec
from .metrics import Metrics
from .pipeline import map_queries
from .routes import Route
from .segments import Segments, Snapshot
from .store import CollectionRow, SpaceRow, Store
from .transforms import Transform

__all__ = ["SEARCH_STAGES", "Collection", "PointRecord"]

SEARCH_STAGES = ("validate", "transform", "index", "fetch")  #: stages of interlingua_search_seconds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PointRecord:
    id: str
    vectors: dict[str, bytes]  #: space -> packed float32 vector
    payload: str | None
    sequence: int


class Collection:
    def __init__(
        self,
        row: CollectionRow,
        home: SpaceRow,
        store: Store,
        folder: Path,
        metrics: Metrics,
        basis: Transform | None = None,
        basis_report: dict[str, Any] | None = None,
        device: Device | None = None,
    ) -> None:
        self.row = row
        self.device = device or Device.parse("cpu")  #: where the sealed index and query maps run
        #: home -> home transform (pca_basis, mrl_adapter) applied to every vector before indexing
        self.basis = basis
        self.basis_report = basis_report or {}
        self.name = row.name
        self.home = home
        self.store = store
        self.folder = folder
        self.metrics = metrics
        #: dimensions the index holds: a Matryoshka prefix, or all of them
        self.index_dims = row.prefix_dims or home.dim
        self.failures = BuildFailures()
        broken = ""
        try:
            self.spec = IndexSpec.parse(row.index_spec, self.index_dims, home.metric, row.ef_construction)
        except InvalidArgument as e:  # a spec an earlier version accepted: never build it
            self.spec, broken = IndexSpec.parse("Flat", self.index_dims, home.metric), e.message
        train_min = row.train_min_points
        if self.spec.needs_training and train_min < self.spec.min_train_points:
            log.warning(
                "collection %s: train_min_points raised from %d to %d, the fewest points its index trains on",
                self.name,
                train_min,
                self.spec.min_train_points,
            )
            train_min = self.spec.min_train_points
        self.segments = Segments(self.spec, train_min, self.device, row.name)
        #: prefix collections: (label epoch, every home vector by label in full dimension) for reranking;
        #: one reference, swapped whole, so a search pairs its snapshot's labels with the same numbering
        self.full: tuple[int, np.ndarray] = (0, np.zeros((1024 if row.prefix_dims else 0, home.dim), np.float32))
        self.routes: Mapping[str, Route] = {}  #: replaced whole on every change (one reference swap)
        self.lock = threading.Lock()  # serializes writes (and drop)
        self.maint_lock = threading.Lock()  # serializes merges, checkpoints and drop
        self.dropped = False
        self.pids: dict[str, int] = {}  # point id -> home label, or -1 without a home vector
        self.counts: dict[str, int] = {}  # space -> stored vectors
        self.next_label = row.next_label
        self.last_sequence = row.last_sequence
        self.checkpoint_sequence = 0
        self.last_write = time.monotonic()
        self.compactions = 0  #: sealed-index rebuilds that reclaimed dead labels since start-up
        self.compact_not_before = 0.0  #: time.monotonic() before which no compaction is tried (after one raised)
        #: interlingua_search_seconds children, looked up once rather than per search
        self.stage_timers = {s: metrics.search_seconds.labels(self.name, s) for s in SEARCH_STAGES}
        metrics.compactions.labels(self.name)  # exported at 0 from the start
        self.dead_gauge = metrics.dead_labels.labels(self.name)
        if broken:
            self.fail(broken, permanent=True)

    # -- recovery ------------------------------------------------------------------------------

    def recover(self, compact_fraction: float = COMPACT_FRACTION, compact_min_dead: int = COMPACT_MIN_DEAD) -> int:
        """Loads the checkpoint (if usable) and replays newer home vectors from the store.
        Returns the number of replayed vectors. A collection that cannot be opened loads its counts only."""
        d, cid = self.home.dim, self.row.cid
        if self.failure is not None and self.failure.permanent:
            self.counts = self.store.vector_counts(cid)
            self.publish_gauges()
            return 0
        ids, labels = self.store.home_labels(cid, self.home.name)
        # d is the index's: a prefix collection's checkpoint holds prefix_dims (save_checkpoint writes index.d)
        ck = checkpoint.load(self.folder, spec=self.spec.spec, d=self.index_dims, metric=self.home.metric)
        if ck is not None and ck.nsealed > self.next_label:
            log.warning("checkpoint of %s is ahead of the store; rebuilding", self.name)
            ck = None
        nsealed = ck.nsealed if ck else 0
        # Prefix collections keep every live vector for reranking: read them all once, else the tail.
        read_labels, read_x = self.store.home_vectors_from(cid, 0 if self.row.prefix_dims else nsealed, d)
        tail = read_labels >= nsealed
        fresh_labels, fresh_x = read_labels[tail], read_x[tail]
        # Compact the tail: live labels past the checkpoint become nsealed, nsealed+1, ... so no
        # placeholder row for a dead label ever enters an index (HNSW graphs degrade on them).
        dense = np.arange(nsealed, nsealed + len(fresh_labels), dtype=np.int64)
        if not np.array_equal(fresh_labels, dense) or self.next_label != nsealed + len(fresh_labels):
            self.store.relabel(cid, fresh_labels, dense, next_label=nsealed + len(fresh_labels))
            labels = labels.copy()
            labels[labels >= nsealed] = dense
            self.next_label = nsealed + len(fresh_labels)
        if self.row.prefix_dims:
            read_labels = read_labels.copy()
            read_labels[tail] = dense  # as relabelled above
            full = np.zeros((max(self.next_label, 1024), d), dtype=np.float32)
            full[read_labels] = self.to_basis(read_x)
            self.full = (self.segments.snapshot.epoch, full)
        fresh_x = self.index_view(self.to_basis(fresh_x))
        sealed = ck.index if ck else None
        self.segments.restore(sealed, self.next_label, ids, labels, fresh_x, self.last_sequence)
        self.checkpoint_sequence = ck.sequence if ck else 0
        self.pids = dict.fromkeys(self.store.point_ids(cid), -1)
        self.pids.update(zip(ids, labels.tolist(), strict=True))
        self.counts = self.store.vector_counts(cid)
        self.metrics.recovery_replayed.inc(len(fresh_labels))
        self.publish_gauges()
        if self.segments.wants_merge(0, 0.0, idle=True):  # rebuild or catch up before serving
            self.maintain(force=True)
        compact(self, fraction=compact_fraction, min_dead=compact_min_dead)  # dead labels of the checkpoint
        return len(fresh_labels)

    # -- writes (callers validated the input) ---------------------------------------------------

    def upsert(self, space: SpaceRow, ids: list[str], x: np.ndarray, payloads: Sequence[str | None]) -> int:
        """x : shape (n, d) float32, already normalized for cosine spaces. Returns the sequence."""
        home = space.name == self.home.name
        with self.lock:
            self._check_live()
            if home:
                first: int | None = self.next_label
                dead = [lab for pid in ids if (lab := self.pids.get(pid, -1)) >= 0]
                new_vectors = len(ids) - len(dead)
            else:
                first, dead = None, []
                new_vectors = len(ids) - len(self.store.existing_vectors(self.row.cid, space.name, ids))
            seq = self.store.upsert(self.row.cid, space.name, ids, x, payloads, first)
            if first is not None:
                x = self.to_basis(x)  # the store keeps the vectors as given; the index sees the basis
                if self.row.prefix_dims:  # full vectors first: a published label is always rerankable
                    epoch, old = self.full
                    full = old
                    if full.shape[0] < first + len(ids):
                        full = np.zeros((max(2 * full.shape[0], first + len(ids)), full.shape[1]), np.float32)
                        full[: old.shape[0]] = old
                    full[first : first + len(ids)] = x
                    self.full = (epoch, full)
                self.segments.append(first, ids, self.index_view(x), dead, seq)
                self.next_label += len(ids)
                self.pids.update(zip(ids, range(first, first + len(ids)), strict=True))
            else:
                for pid in ids:
                    self.pids.setdefault(pid, -1)
            self.counts[space.name] = self.counts.get(space.name, 0) + new_vectors
            self.last_sequence, self.last_write = seq, time.monotonic()
        self.metrics.points.labels(self.name, space.name).set(self.counts[space.name])
        s = self.segments.snapshot
        self.dead_gauge.set(s.ndead_sealed + s.ndead_fresh)  # overwrites kill labels
        return seq

    def delete(self, ids: list[str], missing_ok: bool) -> tuple[int, int]:
        """Deletes points; returns (deleted, sequence)."""
        with self.lock:
            self._check_live()
            present = [pid for pid in ids if pid in self.pids]
            if len(present) < len(ids) and not missing_ok:
                missing = [pid for pid in ids if pid not in self.pids]
                raise NotFound(_missing_message(self.name, missing))
            if not present:
                return 0, 0
            removed = self.store.vectors_per_space(self.row.cid, present)
            seq = self.store.delete(self.row.cid, present)
            dead = [lab for pid in present if (lab := self.pids.pop(pid)) >= 0]
            self.segments.kill(dead, seq)
            for space, n in removed.items():
                self.counts[space] -= n
            self.last_sequence, self.last_write = seq, time.monotonic()
        self.publish_gauges()
        return len(present), seq

    def _check_live(self) -> None:
        if self.dropped:
            raise NotFound(f"collection {self.name!r} was deleted")
        if self.failure is not None and self.failure.permanent:
            raise FailedPrecondition(f"collection {self.name!r} failed: {self.failure.reason}")

    # -- failure -------------------------------------------------------------------------------

    def state(self) -> str:
        """The state: "failed", or the index state ("exact", "training" or "ready")."""
        return "failed" if self.failure is not None else self.segments.state()

    @property
    def failure(self) -> Failure | None:
        """Why the collection's index cannot be served (None: it can)."""
        return self.failures.current

    def fail(self, reason: str, *, permanent: bool = False) -> None:
        """Marks the collection failed; a build failure is retried after a back-off."""
        delay = self.failures.fail(reason, permanent=permanent, sequence=self.last_sequence)
        if permanent:
            log.error("collection %s is failed and will not be served until it is fixed: %s", self.name, reason)
        else:
            log.warning("collection %s is failed (%s); retrying in %.0fs or on new writes", self.name, reason, delay)
        self.publish_gauges()

    def check_search(self, ef_search: int | None, nprobe: int | None) -> None:
        """FAILED_PRECONDITION on a failed collection, then the index's own parameter checks."""
        if self.failure is not None:
            raise FailedPrecondition(f"collection {self.name!r} failed: {self.failure.reason}")
        self.segments.check_params(ef_search, nprobe)

    def num_points(self) -> int:
        if self.failure is not None and self.failure.permanent:
            return self.store.point_count(self.row.cid)
        return len(self.pids)

    # -- reads ---------------------------------------------------------------------------------

    def get(self, ids: list[str], with_vectors: bool, with_payload: bool, spaces: set[str]) -> list[PointRecord]:
        self._check_live()
        missing = [pid for pid in ids if pid not in self.pids]
        if missing:
            raise NotFound(_missing_message(self.name, missing))
        meta = self.store.points(self.row.cid, ids)
        vecs = self.store.vectors(self.row.cid, ids) if with_vectors else {}
        out = []
        for pid in ids:
            if pid not in meta:  # deleted between the check and the read
                raise NotFound(_missing_message(self.name, [pid]))
            payload, seq = meta[pid]
            v = {s: b for s, b in sorted(vecs.get(pid, {}).items()) if not spaces or s in spaces}
            out.append(PointRecord(pid, v, payload if with_payload else None, seq))
        return out

    def index_bytes_per_vector(self) -> int:
        """FAISS code size of one vector in this collection's index (from the spec: no index is built)."""
        return self.spec.bytes_per_vector

    def recall_at_dims(self) -> dict[int, float]:
        """Recall@10 per prefix dimension from the basis transform's report (``recall_at_dims``), if any."""
        return {int(m): float(r) for m, r in self.basis_report.get("recall_at_dims", {}).items()}

    def to_basis(self, x: np.ndarray, side: str = "doc") -> np.ndarray:
        """x (n, d) in the collection's basis (re-normalized for cosine), or x itself without one.
        Queries are mapped on the collection's device; documents always in numpy, so what the
        index and its checkpoints hold does not depend on the device."""
        if self.basis is None or not len(x):
            return x
        device = self.device if side == "query" else None
        return map_queries(self.basis, x, self.home.metric, self.home.dim, side, device)

    def index_view(self, x: np.ndarray) -> np.ndarray:
        """What the index holds of vectors x (n, d): their Matryoshka prefix, or x itself."""
        if not self.row.prefix_dims:
            return x
        return shrink(x, self.row.prefix_dims, normalize=self.home.metric != "l2")

    def search(
        self,
        xq: np.ndarray,
        k: int,
        ef_search: int | None,
        nprobe: int | None,
        funnel: tuple[int, list[tuple[int, int]]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, Snapshot]:
        """xq : (nq, d) in the home space. Returns D (nq, k), ids (nq, k) object array, snapshot.

        Prefix collections search ``funnel`` = (shortlist_k, stages) from :func:`~.funnel.check_funnel`."""
        if self.failure is not None:
            raise FailedPrecondition(f"collection {self.name!r} failed: {self.failure.reason}")
        if self.row.prefix_dims:
            shortlist_k, stages = funnel or check_funnel(self.home.dim, self.row.prefix_dims, k, None, [])
            for _ in range(8):  # a compaction renumbered the labels between the search and the read: again
                _, I0, snap = self.segments.search(self.index_view(xq), shortlist_k, ef_search, nprobe)
                epoch, full = self.full
                if epoch == snap.epoch:
                    break
            else:
                raise Unavailable(f"collection {self.name!r} is being compacted; retry the search")
            D, I = rerank(xq, full, I0, stages, self.home.metric)
        else:
            D, I, snap = self.segments.search(xq, k, ef_search, nprobe)
        ids = snap.ids[np.maximum(I, 0)]
        ids[I < 0] = ""
        return D, ids, snap

    def payloads(self, ids: np.ndarray) -> list[str]:
        """Payloads aligned with ``ids`` (any shape, flattened), "" where none."""
        flat = [str(p) for p in ids.ravel()]
        meta = self.store.points(self.row.cid, sorted({p for p in flat if p}))
        return [(meta[p][0] or "") if p in meta else "" for p in flat]

    # -- maintenance ---------------------------------------------------------------------------

    def maintain(
        self,
        *,
        min_fresh: int = 0,
        fraction: float = 0.0,
        idle_seconds: float = 0.0,
        force: bool = False,
        checkpoint_after: bool = True,
        compact_fraction: float | None = None,
        compact_min_dead: int = COMPACT_MIN_DEAD,
    ) -> bool:
        """Merges the fresh segment (training the index first if needed) and checkpoints it, then
        compacts when dead labels pass ``compact_fraction`` (None: never). A build that raises marks
        the collection failed (:meth:`fail`) instead; it is retried after a back-off. Returns True
        after a merge."""
        if not self.failures.may_build(self.last_sequence):
            return False
        idle = force or time.monotonic() - self.last_write >= idle_seconds
        merged = None
        if self.segments.wants_merge(min_fresh, fraction, idle):
            with self.maint_lock:
                if self.dropped:
                    return False
                dead_rows = self.segments.snapshot.ndead_fresh  # then merge only the live rows, renumbering
                try:
                    merged = merge_dropping_dead(self) if dead_rows else self.segments.merge()
                except Exception as e:  # FAISS throws RuntimeError; MemoryError and the like fail it too
                    self.fail(f"building index {self.spec.spec!r} failed: {_reason(e)}")
                    return False
                if self.failure is not None:
                    log.info("collection %s: its index was built; no longer failed", self.name)
                    self.failures.clear()
                self.publish_gauges()
                if merged is not None and checkpoint_after and merged.sealed is not None:
                    self.save_checkpoint(merged.sealed, merged.sequence)
        if compact_fraction is not None:
            compact(self, fraction=compact_fraction, min_dead=compact_min_dead, checkpoint_after=checkpoint_after)
        return merged is not None

    def save_checkpoint(self, index: Any, sequence: int) -> None:
        """Writes the sealed ``index`` (labels 0 .. ntotal-1, every write up to ``sequence``) as the
        checkpoint that :meth:`recover` loads; the caller holds ``maint_lock``."""
        start = time.perf_counter()
        checkpoint.save(self.folder, index, sequence=sequence, spec=self.spec.spec, metric=self.home.metric)
        self.checkpoint_sequence = sequence
        self.metrics.checkpoint_seconds.observe(time.perf_counter() - start)

    def drop(self) -> None:
        with self.maint_lock, self.lock:
            self.dropped = True
            self.store.drop_collection(self.row.cid)
            shutil.rmtree(self.folder, ignore_errors=True)
        for space in self.counts:
            self.metrics.points.remove(self.name, space)
        for gauge in (self.metrics.index_ready, self.metrics.dead_labels, self.metrics.collection_failed):
            gauge.remove(self.name)
        self.metrics.compactions.remove(self.name)
        for stage in SEARCH_STAGES:
            self.metrics.search_seconds.remove(self.name, stage)

    def publish_gauges(self) -> None:
        for space, n in self.counts.items():
            self.metrics.points.labels(self.name, space).set(n)
        self.metrics.index_ready.labels(self.name).set(1 if self.state() == "ready" else 0)
        s = self.segments.snapshot
        self.dead_gauge.set(s.ndead_sealed + s.ndead_fresh)
        self.metrics.collection_failed.labels(self.name).set(1 if self.failure is not None else 0)


def _reason(e: BaseException) -> str:
    """One line of an exception for a failure reason: FAISS's own message without its source location."""
    text = " ".join(str(e).split()) or type(e).__name__
    text = text.rsplit("Error: ", 1)[-1]
    return text if len(text) <= 300 else text[:297] + "..."


def _missing_message(collection: str, missing: list[str]) -> str:
    shown = ", ".join(repr(p) for p in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return f"{len(missing)} id(s) not found in collection {collection!r}: {shown}{more}"
