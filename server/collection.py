"""One collection at run time, as requests see it: its writes, reads and searches.

Every write follows the same order under the collection's write lock: checks
(done by the caller, at the boundary) -> one store transaction (durable on
return) -> apply to the in-memory :class:`~.segments.Segments` -> acknowledge.
So an acknowledged write is in the store (survives ``kill -9``) and in the
next search's snapshot (read-your-writes). Searches take no lock. The state
behind it, its recovery, merges, checkpoints and failures are
:class:`~.collection_index.CollectionIndex`. Covered by ``tests/test_search.py``,
``tests/test_concurrency.py`` and ``tests/test_durability.py``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .collection_index import SEARCH_STAGES, CollectionIndex
from .errors import FailedPrecondition, NotFound, Unavailable
from .funnel import check_funnel, rerank
from .pipeline import check_mapped
from .segments import Snapshot
from .store import SpaceRow

#: SEARCH_STAGES: re-exported from collection_index.py
__all__ = ["SEARCH_STAGES", "Collection", "PointRecord"]


@dataclass(frozen=True)
class PointRecord:
    id: str
    vectors: dict[str, bytes]  #: space -> packed float32 vector
    payload: str | None
    sequence: int


class Collection(CollectionIndex):
    """One collection's request surface: upsert, delete, get, search, payloads and drop."""

    # -- writes (callers validated the input) ---------------------------------------------------

    def upsert(
        self, space: SpaceRow, ids: list[str], x: np.ndarray, payloads: Sequence[str | None], *, projected: bool = False
    ) -> int:
        """x : shape (n, d) float32, already normalized for cosine spaces. Returns the sequence.
        ``projected``: the vectors are a migration's forward projections (``server/migration``).
        Home vectors the index cannot hold (float16 codes: ``IndexSpec.check_vectors``) are
        INVALID_ARGUMENT before anything is written."""
        home = space.name == self.home.name
        with self.lock:
            self._check_live()
            xb = xi = x
            if home:
                xb, xi = self.indexable(x)
                first: int | None = self.next_label
                dead = [lab for pid in ids if (lab := self.pids.get(pid, -1)) >= 0]
                new_vectors = len(ids) - len(dead)
            else:
                first, dead = None, []
                new_vectors = len(ids) - len(self.store.existing_vectors(self.row.cid, space.name, ids))
            seq = self.store.upsert(self.row.cid, space.name, ids, x, payloads, first, projected=projected)
            if first is not None:
                if self.row.spec.prefix_dims:  # full vectors first: a published label is always rerankable
                    epoch, old = self.full
                    full = old
                    if full.shape[0] < first + len(ids):
                        full = np.zeros((max(2 * full.shape[0], first + len(ids)), full.shape[1]), np.float32)
                        full[: old.shape[0]] = old
                    full[first : first + len(ids)] = xb
                    self.full = (epoch, full)
                self.segments.append(first, ids, xi, dead, seq)
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

    def indexable(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Home vectors x (n, d) in the collection's basis, and as its index holds them (their
        Matryoshka prefix, or the same); INVALID_ARGUMENT naming the vector when the index cannot hold
        one (float16 codes: ``IndexSpec.check_vectors``), before anything is written."""
        xb = self.to_basis(x)  # the store keeps the vectors as given; the index sees the basis
        if self.basis is not None:  # a basis (an mrl_adapter's is not orthogonal) may take a vector out of bounds
            check_mapped(xb, "the collection's basis transform", what="vectors")
        xi = self.index_view(xb)
        what = "vectors (in the collection's basis)" if self.basis is not None else "vectors"
        self.segments.spec.check_vectors(xi, what=what)
        return xb, xi

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
            if self.deletes_seen is not None:
                self.deletes_seen.extend(present)
            dead = [lab for pid in present if (lab := self.pids.pop(pid)) >= 0]
            self.segments.kill(dead, seq)
            for space, n in removed.items():
                self.counts[space] -= n
            self.last_sequence, self.last_write = seq, time.monotonic()
        self.publish_gauges()
        return len(present), seq

    def _check_live(self) -> None:
        if self.retired:
            raise Unavailable(self.retired)
        if self.dropped:
            raise NotFound(f"collection {self.name!r} was deleted")
        if self.failure is not None and self.failure.permanent:
            raise FailedPrecondition(f"collection {self.name!r} failed: {self.failure.reason}")

    # -- reads ---------------------------------------------------------------------------------

    def check_search(self, ef_search: int | None, nprobe: int | None, k_factor: int | None = None) -> None:
        """FAILED_PRECONDITION on a failed collection, then the index's own parameter checks."""
        if self.failure is not None:
            raise FailedPrecondition(f"collection {self.name!r} failed: {self.failure.reason}")
        self.segments.check_params(ef_search, nprobe, k_factor)

    def num_points(self) -> int:
        if self.failure is not None and self.failure.permanent:
            return self.store.point_count(self.row.cid)
        return len(self.pids)

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

    def search(
        self,
        xq: np.ndarray,
        k: int,
        ef_search: int | None,
        nprobe: int | None,
        funnel: tuple[int, list[tuple[int, int]]] | None = None,
        *,
        k_factor: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, Snapshot]:
        """xq : (nq, d) in the home space. Returns D (nq, k), ids (nq, k) object array, snapshot.

        Prefix collections search ``funnel`` = (shortlist_k, stages) from :func:`~.funnel.check_funnel`."""
        if self.failure is not None:
            raise FailedPrecondition(f"collection {self.name!r} failed: {self.failure.reason}")
        if self.row.spec.prefix_dims:
            shortlist_k, stages = funnel or check_funnel(self.home.dim, self.row.spec.prefix_dims, k, None, [])
            for _ in range(8):  # a compaction renumbered the labels between the search and the read: again
                _, I0, snap = self.segments.search(self.index_view(xq), shortlist_k, ef_search, nprobe, k_factor)
                epoch, full = self.full
                if epoch == snap.epoch:
                    break
            else:
                raise Unavailable(f"collection {self.name!r} is being compacted; retry the search")
            D, I = rerank(xq, full, I0, stages, self.home.metric)
        else:
            D, I, snap = self.segments.search(xq, k, ef_search, nprobe, k_factor)
        if I.min() >= 0:  # every hit found (the common case: one numpy call less than the padding)
            return D, snap.ids[I], snap
        ids = snap.ids[np.maximum(I, 0)]
        ids[I < 0] = ""
        return D, ids, snap

    def payloads(self, ids: np.ndarray) -> list[str]:
        """Payloads aligned with ``ids`` (any shape, flattened), "" where none."""
        flat = [str(p) for p in ids.ravel()]
        meta = self.store.points(self.row.cid, sorted({p for p in flat if p}))
        return [(meta[p][0] or "") if p in meta else "" for p in flat]

    # -- DeleteCollection ----------------------------------------------------------------------

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


def _missing_message(collection: str, missing: list[str]) -> str:
    shown = ", ".join(repr(p) for p in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return f"{len(missing)} id(s) not found in collection {collection!r}: {shown}{more}"
