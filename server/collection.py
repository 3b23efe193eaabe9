"""One collection at run time: its writes, reads, searches, recovery and maintenance.

Every write follows the same order under the collection's write lock: checks
(done by the caller, at the boundary) -> one store transaction (durable on
return) -> apply to the in-memory :class:`~.segments.Segments` -> acknowledge.
So an acknowledged write is in the store (survives ``kill -9``) and in the
next search's snapshot (read-your-writes). Searches take no lock.
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
from .device import Device
from .errors import NotFound
from .funnel import check_funnel, rerank, shrink
from .metrics import Metrics
from .routes import Route, map_queries
from .segments import IndexSpec, Segments, Snapshot
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
        self.spec = IndexSpec.parse(row.index_spec, self.index_dims, home.metric, row.ef_construction)
        self.segments = Segments(self.spec, row.train_min_points, self.device, row.name)
        #: prefix collections: every home vector by label, full dimension, for reranking
        self.full = np.zeros((1024 if row.prefix_dims else 0, home.dim), dtype=np.float32)
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
        #: interlingua_search_seconds children, looked up once rather than per search
        self.stage_timers = {s: metrics.search_seconds.labels(self.name, s) for s in SEARCH_STAGES}

    # -- recovery ------------------------------------------------------------------------------

    def recover(self) -> int:
        """Loads the checkpoint (if usable) and replays newer home vectors from the store.
        Returns the number of replayed vectors."""
        d, cid = self.home.dim, self.row.cid
        ids, labels = self.store.home_labels(cid, self.home.name)
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
            self.full = np.zeros((max(self.next_label, 1024), d), dtype=np.float32)
            self.full[read_labels] = self.to_basis(read_x)
        fresh_x = self._index_view(self.to_basis(fresh_x))
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
                    full = self.full
                    if full.shape[0] < first + len(ids):
                        full = np.zeros((max(2 * full.shape[0], first + len(ids)), full.shape[1]), np.float32)
                        full[: self.full.shape[0]] = self.full
                    full[first : first + len(ids)] = x
                    self.full = full
                self.segments.append(first, ids, self._index_view(x), dead, seq)
                self.next_label += len(ids)
                self.pids.update(zip(ids, range(first, first + len(ids)), strict=True))
            else:
                for pid in ids:
                    self.pids.setdefault(pid, -1)
            self.counts[space.name] = self.counts.get(space.name, 0) + new_vectors
            self.last_sequence, self.last_write = seq, time.monotonic()
        self.metrics.points.labels(self.name, space.name).set(self.counts[space.name])
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

    # -- reads ---------------------------------------------------------------------------------

    def get(self, ids: list[str], with_vectors: bool, with_payload: bool, spaces: set[str]) -> list[PointRecord]:
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
        """FAISS code size of one vector in this collection's index."""
        sealed = self.segments.snapshot.sealed
        index = sealed if sealed is not None else self.spec.new_index()
        try:
            return int(index.sa_code_size())
        except RuntimeError:  # HNSW and a few others do not implement sa_code_size: flat storage
            return 4 * self.index_dims

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

    def _index_view(self, x: np.ndarray) -> np.ndarray:
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
        if self.row.prefix_dims:
            shortlist_k, stages = funnel or check_funnel(self.home.dim, self.row.prefix_dims, k, None, [])
            _, I0, snap = self.segments.search(self._index_view(xq), shortlist_k, ef_search, nprobe)
            D, I = rerank(xq, self.full, I0, stages, self.home.metric)
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
    ) -> bool:
        """Merges the fresh segment (training the index first if needed) and checkpoints it."""
        idle = force or time.monotonic() - self.last_write >= idle_seconds
        if not self.segments.wants_merge(min_fresh, fraction, idle):
            return False
        with self.maint_lock:
            if self.dropped:
                return False
            merged = self.segments.merge()
            self.publish_gauges()
            if merged is not None and checkpoint_after and merged.sealed is not None:
                start = time.perf_counter()
                checkpoint.save(
                    self.folder,
                    merged.sealed,
                    sequence=merged.sequence,
                    spec=self.spec.spec,
                    d=self.home.dim,
                    metric=self.home.metric,
                )
                self.checkpoint_sequence = merged.sequence
                self.metrics.checkpoint_seconds.observe(time.perf_counter() - start)
        return merged is not None

    def drop(self) -> None:
        with self.maint_lock, self.lock:
            self.dropped = True
            self.store.drop_collection(self.row.cid)
            shutil.rmtree(self.folder, ignore_errors=True)
        for space in self.counts:
            self.metrics.points.remove(self.name, space)
        self.metrics.index_ready.remove(self.name)
        for stage in SEARCH_STAGES:
            self.metrics.search_seconds.remove(self.name, stage)

    def publish_gauges(self) -> None:
        for space, n in self.counts.items():
            self.metrics.points.labels(self.name, space).set(n)
        self.metrics.index_ready.labels(self.name).set(1 if self.segments.state() == "ready" else 0)


def _missing_message(collection: str, missing: list[str]) -> str:
    shown = ", ".join(repr(p) for p in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return f"{len(missing)} id(s) not found in collection {collection!r}: {shown}{more}"
