"""One collection's index side: its state, recovery, merges, checkpoints and failures.

:class:`CollectionIndex` holds what a collection keeps in memory beside the store (the
:class:`~.segments.Segments`, point id -> label map, counts, prefix vectors for reranking) and
keeps it right: :meth:`~CollectionIndex.recover` loads the checkpoint and replays newer home
vectors, :meth:`~CollectionIndex.maintain` merges, checkpoints and compacts. A collection whose
index cannot be built is *failed* (``failures.py``) instead of taking the process down: one that
cannot even be opened (an index spec the service no longer accepts, a missing basis transform)
answers every point RPC with FAILED_PRECONDITION; one whose training or merge raised keeps taking
writes but answers searches with FAILED_PRECONDITION, and the build is retried with an exponential
back-off (sooner once new writes arrive), never in a tight loop. The request surface (writes,
reads, search) is :class:`~.collection.Collection`. An ``auto`` collection's maintenance also runs
the index advisor once it holds enough points, and rebuilds onto its choice (``advisor_auto.py``).
Covered by ``tests/test_durability.py`` (recovery), ``tests/test_index_safety.py``,
``tests/test_compaction.py`` and ``tests/test_advisor.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import checkpoint
from .advisor_auto import auto_rebuild, stored_status
from .compaction import COMPACT_FRACTION, COMPACT_MIN_DEAD, compact, merge_dropping_dead, regraph
from .device import Device
from .errors import InvalidArgument
from .failures import BuildFailures, Failure
from .funnel import shrink
from .index_spec import IndexSpec
from .metrics import Metrics, StageTimes
from .pipeline import map_queries
from .query_sample import QuerySample
from .routes import IDENTITY, Route
from .segments import Segments
from .store import CollectionRow, SpaceRow, Store
from .transforms import Transform

__all__ = ["SEARCH_STAGES", "CollectionIndex"]

SEARCH_STAGES = ("validate", "transform", "index", "fetch")  #: stages of interlingua_search_seconds

log = logging.getLogger(__name__)


class CollectionIndex:
    """The state of one collection and its recovery, maintenance and failure; see :class:`~.collection.Collection`."""

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
        self.name = row.spec.name
        self.home = home
        self.store = store
        self.folder = folder
        self.metrics = metrics
        #: dimensions the index holds: a Matryoshka prefix, or all of them
        self.index_dims = row.spec.index_dims(home)
        self.failures = BuildFailures()
        broken = ""
        try:
            self.spec = row.spec.parse_index(home)
        except InvalidArgument as e:  # a spec an earlier version accepted: never build it
            self.spec, broken = IndexSpec.parse("Flat", self.index_dims, home.metric), e.message
        train_min = row.spec.train_min_points
        if self.spec.needs_training and train_min < self.spec.min_train_points:
            log.warning(
                "collection %s: train_min_points raised from %d to %d, the fewest points its index trains on",
                self.name,
                train_min,
                self.spec.min_train_points,
            )
            train_min = self.spec.min_train_points
        self.segments = Segments(self.spec, train_min, self.device, self.name, row.spec.search_defaults())
        #: prefix collections: (label epoch, every home vector by label in full dimension) for reranking;
        #: one reference, swapped whole, so a search pairs its snapshot's labels with the same numbering
        self.full: tuple[int, np.ndarray] = (0, np.zeros((1024 if row.spec.prefix_dims else 0, home.dim), np.float32))
        self.routes: Mapping[str, Route] = {}  #: replaced whole on every change (one reference swap)
        self.lock = threading.Lock()  # serializes writes (and drop)
        self.maint_lock = threading.Lock()  # serializes merges, checkpoints and drop
        self.dropped = False
        #: set when a finished migration reopened the collection as a new object: writes to this one fail
        self.retired = ""
        #: while a move copies the collection (``backends/move.py``): the ids deleted since its start
        self.deletes_seen: list[str] | None = None
        self.pids: dict[str, int] = {}  # point id -> home label, or -1 without a home vector
        self.counts: dict[str, int] = {}  # space -> stored vectors
        self.next_label = row.next_label
        self.last_sequence = row.last_sequence
        self.checkpoint_sequence = 0
        self.last_write = time.monotonic()
        self.compactions = 0  #: sealed-index rebuilds that reclaimed dead labels since start-up
        self.compact_not_before = 0.0  #: time.monotonic() before which no compaction is tried (after one raised)
        #: interlingua_search_seconds children, fed by one append per search (engine.search)
        self.stage_timers = StageTimes(
            metrics.search_seconds,
            self.name,
            SEARCH_STAGES,
            queries=metrics.search_queries.labels(self.name, home.name, IDENTITY),
        )
        metrics.compactions.labels(self.name)  # exported at 0 from the start
        self.dead_gauge = metrics.dead_labels.labels(self.name)
        #: ``auto`` collections: where the index advisor stands (CollectionInfo.advisor_status)
        self.advisor_status = stored_status(row.spec)
        self.auto_not_before = 0.0  #: time.monotonic() before which the advisor is not run again (after a failure)
        #: collections with a recall target: their recent queries, which the tuning pass searches (query_sample.py)
        self.query_sample = QuerySample(home.dim) if row.spec.target_recall else None
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
        read_labels, read_x = self.store.home_vectors_from(cid, 0 if self.row.spec.prefix_dims else nsealed, d)
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
        if self.row.spec.prefix_dims:
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
        if not self.row.spec.prefix_dims:
            return x
        return shrink(x, self.row.spec.prefix_dims, normalize=self.home.metric != "l2")

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
        compacts when dead labels pass ``compact_fraction`` (None: never); an ``auto`` collection with
        enough points then runs the index advisor and rebuilds onto its choice (not when ``force``d:
        at start-up and shutdown). A build that raises marks the collection failed (:meth:`fail`)
        instead; it is retried after a back-off. Returns True after a merge."""
        if not self.failures.may_build(self.last_sequence):
            return False
        merged = self._merge_and_compact(
            min_fresh, fraction, idle_seconds, force, checkpoint_after, compact_fraction, compact_min_dead
        )
        if not force and self.row.spec.target_recall:  # auto: advised, then tuned as it grows
            auto_rebuild(self)
        return merged

    def _merge_and_compact(
        self,
        min_fresh: int,
        fraction: float,
        idle_seconds: float,
        force: bool,
        checkpoint_after: bool,
        compact_fraction: float | None,
        compact_min_dead: int,
    ) -> bool:
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
        if not force and time.monotonic() - self.last_write >= idle_seconds:  # never mid bulk load, nor at shutdown
            regraph(self, checkpoint_after=checkpoint_after)
        return merged is not None

    def save_checkpoint(self, index: Any, sequence: int) -> None:
        """Writes the sealed ``index`` (labels 0 .. ntotal-1, every write up to ``sequence``) as the
        checkpoint that :meth:`recover` loads; the caller holds ``maint_lock``."""
        start = time.perf_counter()
        checkpoint.save(self.folder, index, sequence=sequence, spec=self.spec.spec, metric=self.home.metric)
        self.checkpoint_sequence = sequence
        self.metrics.checkpoint_seconds.observe(time.perf_counter() - start)

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
