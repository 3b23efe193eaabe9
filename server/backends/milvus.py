"""A collection whose points and ANN search live in a Milvus engine: the ``milvus`` backend.

:class:`MilvusCollection` answers the request surface of :class:`~..collection.Collection` (upsert,
delete, get, search, payloads, counts, state, drop) over one Milvus collection
(``milvus_schema.py``); Interlingua keeps what is its own: the collection's row, spaces, routes and
transforms in the local SQLite store, the route resolution and the query transform before the
search (``pipeline.py``: a new-model query reaches this backend already in the home space, and
through the collection's basis transform, if any: :meth:`MilvusCollection.to_basis`), checks
and gRPC errors. Writes keep the embedded backend's semantics under the collection's write lock: a
write takes its sequence number from the store (one durable transaction), reads the rows it
touches, merges (an upsert in one space keeps the point's other vectors, and its payload when none
is given; a new point takes the next dense key: ``milvus_table.py``, "Keys") and upserts whole rows,
at consistency level Strong, so the next search sees an
acknowledged write (read-your-writes). Searches return what the embedded backend returns: scores
(IP for cosine and ip, squared L2 for l2), ids, "" and -inf (+inf for l2) padding. One front-end
per Milvus collection: two front-ends writing the same points could interleave their
read-merge-write. The collection's state and engine calls are :class:`~.milvus_table.MilvusTable`'s.
Covered by ``tests/test_backends.py``, the API suite run on both backends, and
``tests/test_milvus_basis.py`` (basis collections on both backends).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..collection import PointRecord, _missing_message
from ..collection_index import SEARCH_STAGES
from ..errors import FailedPrecondition, InterlinguaError, InvalidArgument, NotFound
from ..funnel import check_funnel, rerank, shrink
from ..pipeline import map_queries
from ..store import SpaceRow
from ..transforms import Transform
from .milvus_schema import MAX_ID_CHARS, MAX_PAYLOAD_BYTES, MAX_VECTOR_FIELDS
from .milvus_table import CHUNK, KEY_FIELD, MilvusTable, as_vector, flush, key_map

__all__ = ["RECOUNT_SECONDS", "MilvusCollection", "MilvusView"]

log = logging.getLogger(__name__)
RECOUNT_SECONDS = 10.0  #: least time between two counts the maintenance thread makes of one collection


@dataclass(frozen=True)
class MilvusView:
    """What a search read, as the embedded backend's ``Snapshot`` tells it: ``sealed`` is None for an
    exact (FLAT) search, else the engine's index type."""

    sealed: str | None
    sequence: int


class MilvusCollection(MilvusTable):
    """One collection in a Milvus engine; the request surface of :class:`~..collection.Collection`."""

    backend = "milvus"

    # -- writes --------------------------------------------------------------------------------

    def upsert(
        self,
        space: SpaceRow,
        ids: list[str],
        x: np.ndarray,
        payloads: Sequence[str | None],
        *,
        projected: bool = False,
    ) -> int:
        """x : shape (n, d) float32, already normalized for cosine spaces. Returns the sequence."""
        self._check_live()
        self._loaded_basis()  # its error before the write takes a sequence number
        fields = self._fields()
        f = fields.get(space.name)
        if f is None:
            raise FailedPrecondition(self._no_field_message(space.name, fields))
        for i, pid in enumerate(ids):  # (a server may allow longer ids: limits.max_id_bytes)
            if len(pid) * 4 > MAX_ID_CHARS and len(pid.encode()) > MAX_ID_CHARS:
                raise InvalidArgument(
                    f"ids[{i}] is {len(pid.encode())} bytes of UTF-8; the milvus backend holds ids of at most"
                    f" {MAX_ID_CHARS} bytes"
                )
        for i, p in enumerate(payloads):
            if p is not None and len(p.encode()) > MAX_PAYLOAD_BYTES:
                raise InvalidArgument(f"payloads[{i}] is over {MAX_PAYLOAD_BYTES} bytes, the milvus backend's limit")
        with self.lock, self.writing():
            self._check_live()
            self._ensure_counted()
            keep = ["payload"] if any(p is None for p in payloads) else []  # (the old payload stays: read it)
            old = self._rows(ids, self.key_out(["id", *keep, "spaces", *fields.values()]))
            seq, key = self.stamp(len(ids) - len(old))
            rows, new_vectors = [], 0
            zeros = {fld: np.zeros(self.spaces[sp].dim, np.float32) for sp, fld in fields.items()}
            for i, pid in enumerate(ids):  # ids are unique in a request (validate.py)
                prev = old.get(pid)
                have = set(prev["spaces"]) if prev else set()
                new_vectors += f not in have
                have.add(f)
                row: dict[str, Any] = {"id": pid, "seq": seq, "spaces": sorted(have)}
                row["payload"] = payloads[i] if payloads[i] is not None else (prev["payload"] if prev else None)
                for fld, zero in zeros.items():  # no vector in a space: zeros, and not in ``spaces``
                    row[fld] = x[i] if fld == f else (as_vector(prev[fld]) if prev and fld in have else zero)
                rows.append(row)
            self.derive_fields(rows)
            self.give_keys(rows, old, key)  # an existing point keeps its key, a new one takes the next ("Keys")
            if f != self.home_field and len(old) < len(ids):
                self.may_lack_home = True  # new points without a home vector: searches filter from now
            try:
                self.write_rows(rows, old)
            except BaseException:
                self.forget_counts()  # the engine may hold part of it: count again when next needed
                raise
            if self.npoints is not None:
                self.npoints += len(ids) - len(old)
            self.counts[space.name] = self.counts.get(space.name, 0) + new_vectors
            self.may_lack_home = False  # the counts tell from here
            self.last_sequence, self.last_write = seq, time.monotonic()
            self.unflushed += len(ids) if f == self.home_field else 0
        self.metrics.points.labels(self.name, space.name).set(self.counts[space.name])
        return seq

    def delete(self, ids: list[str], missing_ok: bool) -> tuple[int, int]:
        """Deletes points; returns (deleted, sequence)."""
        with self.lock, self.writing():
            self._check_live()
            self._ensure_counted()
            old = self._rows(list(dict.fromkeys(ids)), ["id", "spaces"])
            if len(old) < len(set(ids)) and not missing_ok:
                raise NotFound(_missing_message(self.name, [pid for pid in ids if pid not in old]))
            if not old:
                return 0, 0
            seq = self.store.stamp(self.row.cid)
            present = list(old)
            try:
                keys = {pid: r[KEY_FIELD] for pid, r in old.items()} if self.keyed else None  # (read just now)
                for i in range(0, len(present), CHUNK):
                    self.delete_rows(present[i : i + CHUNK], keys)
            except BaseException:
                self.forget_counts()
                raise
            by_field = {f: s for s, f in self._fields().items()}
            for r in old.values():
                for f in r["spaces"]:
                    if f in by_field and by_field[f] in self.counts:
                        self.counts[by_field[f]] -= 1
            if self.npoints is not None:
                self.npoints -= len(present)
            self.last_sequence, self.last_write = seq, time.monotonic()
        self.publish_gauges()
        return len(present), seq

    def _check_live(self) -> None:
        if self.dropped:
            raise NotFound(f"collection {self.name!r} was deleted")

    # -- reads ---------------------------------------------------------------------------------

    def _no_field_message(self, space: str, fields: dict[str, str]) -> str:
        """Why a write in ``space`` is refused: the collection's vector fields, and what took them."""
        taken = [w for w, on in (("basis", self.basis_field), ("Matryoshka prefix", self.prefix_field)) if on]
        extra = f", {len(taken)} of them for its {' and '.join(taken)} field{'s' * (len(taken) > 1)}" if taken else ""
        return (
            f"collection {self.name!r} (backend milvus) has no vector field for space {space!r}: its fields are fixed"
            f" when it is created, {MAX_VECTOR_FIELDS} vector fields at most{extra}, so the home space and the oldest"
            f" other spaces registered then ({', '.join(sorted(fields))}); Milvus Lite cannot add a field. Create"
            " the collection on backend 'embedded' to hold vectors in more spaces"
        )

    def _prefix(self, x: np.ndarray) -> np.ndarray:
        """x (n, d) -> its first ``prefix_dims`` dims (n, m), re-normalized for cosine and ip (``funnel.shrink``)."""
        return shrink(x, self.prefix_dims, normalize=self.home.metric != "l2")

    def derive_fields(self, rows: list[dict[str, Any]]) -> None:
        """Engine rows (with their home field and ``spaces``) get the fields computed from the home vector,
        as the embedded index holds it: a basis collection's basis field (:meth:`to_basis`, doc side; zeros
        for a point without a home vector), a prefix collection's prefix field (:meth:`_prefix` of the full
        field's vector: zeros stay zeros). One batch for all rows."""
        if not rows or not (self.basis_field or self.prefix_dims):
            return
        full = np.stack([r[self.home_field] for r in rows])
        if self.basis_field:
            has = np.array([self.home_field in r["spaces"] for r in rows])
            full = self.to_basis(full)
            full[~has] = 0.0
            for row, v in zip(rows, full, strict=True):
                row[self.basis_field] = v
        if self.prefix_dims:
            for row, v in zip(rows, self._prefix(full), strict=True):
                row[self.prefix_field] = v

    def check_search(self, ef_search: int | None, nprobe: int | None, k_factor: int | None = None) -> None:
        self.index.check_params(ef_search, nprobe, k_factor)

    def get(
        self,
        ids: list[str],
        with_vectors: bool,
        with_payload: bool,
        spaces: set[str],
    ) -> list[PointRecord]:
        self._check_live()
        fields = self._fields()
        want = {f: s for s, f in fields.items() if not spaces or s in spaces} if with_vectors else {}
        rows = self._rows(ids, ["id", *(["payload"] if with_payload else []), "seq", "spaces", *want])
        missing = [pid for pid in ids if pid not in rows]
        if missing:
            raise NotFound(_missing_message(self.name, missing))
        out = []
        for pid in ids:
            r = rows[pid]
            vecs = {want[f]: as_vector(r[f]).astype("<f4").tobytes() for f in r["spaces"] if f in want}
            out.append(
                PointRecord(pid, dict(sorted(vecs.items())), r["payload"] if with_payload else None, int(r["seq"]))
            )
        return out

    def search(
        self,
        xq: np.ndarray,
        k: int,
        ef_search: int | None,
        nprobe: int | None,
        funnel: tuple[int, list[tuple[int, int]]] | None = None,
        k_factor: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, MilvusView]:
        """xq : (nq, d) in the home space, through the basis for a basis collection (``pipeline.run``:
        :meth:`to_basis`, query side). Returns D (nq, k), ids (nq, k) object array, the view searched.
        Fewer than k hits: ids "" and D -inf (+inf for l2), as the embedded backend pads.

        A prefix collection searches its prefix field for ``funnel`` = (shortlist_k, stages)
        (:func:`~..funnel.check_funnel`) candidates, their full vectors (the basis field's, or the home
        field's) returned with the hits, and reranks them through the stages as the embedded backend
        does (:func:`~..funnel.rerank`)."""
        nq = len(xq)
        largest = self.home.metric != "l2"
        fields = self.fields if self.fields is not None else self._fields()
        flt = self._home_filter() if len(fields) > 1 else ""
        view = MilvusView(None if self.index.exact else self.index.index_type, self.last_sequence)
        if self.prefix_dims:
            limit, stages = funnel or check_funnel(self.home.dim, self.prefix_dims, k, None, [])
            xs, out = self._prefix(xq), ["id", self.full_field]
        else:
            limit, stages, xs, out = k, [], xq, ["id"]
        params = self.index.search_params(self.home.metric, limit, ef_search, nprobe)
        data = list(np.ascontiguousarray(xs, dtype=np.float32))
        hits = self._call(
            "search",
            lambda c: c.search(
                self.mname, data=data, limit=limit, anns_field=self.index_field, search_params=params, filter=flt,
                output_fields=out, timeout=self.engines.timeout,
            ),
        )  # fmt: skip
        if self.prefix_dims:
            return (*self._rerank(xq, hits, limit, stages), view)
        D = np.full((nq, k), -np.inf if largest else np.inf, dtype=np.float32)
        ids = np.full((nq, k), "", dtype=object)
        for i, row in enumerate(hits):
            for j, h in enumerate(row[:k]):
                D[i, j] = h["distance"]
                ids[i, j] = h["id"]
        return D, ids, view

    def _home_filter(self) -> str:
        """The filter that leaves out points without a home vector (their home field holds zeros), or ""
        when every point has one, which the front-end's exact counts tell (the maintenance thread counts
        them after a start, or after another front-end of a shared registry wrote: :meth:`maintain`).
        Milvus Lite evaluates the filter row by row in Python: with it, an nq=1 search of 5,000 points
        took ~340 ms, without it ~22 ms (bench/registry.py's note)."""
        npoints = self.npoints
        if (
            npoints is None
            or not self._counts_known
            or self.may_lack_home
            or npoints > self._counts.get(self.home.name, 0)
        ):
            return f'array_contains(spaces, "{self.home_field}")'  # (counts unknown: the maintenance counts)
        return ""

    def _rerank(
        self, xq: np.ndarray, hits: Any, limit: int, stages: list[tuple[int, int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The prefix search's ``hits`` (nq lists of at most ``limit``, with their full vectors) reranked
        with ``stages``: D (nq, k), ids (nq, k), "" where fewer were found."""
        labels: list[str] = []
        full = np.zeros((max(1, sum(min(len(row), limit) for row in hits)), self.home.dim), np.float32)
        I = np.full((len(xq), limit), -1, np.int64)
        for i, row in enumerate(hits):
            for j, h in enumerate(row[:limit]):
                I[i, j] = len(labels)
                full[len(labels)] = as_vector(h[self.full_field])
                labels.append(str(h["id"]))
        D, I = rerank(np.ascontiguousarray(xq, dtype=np.float32), full, I, stages, self.home.metric)
        names = np.array([*labels, ""], dtype=object)
        return D, names[np.where(I < 0, len(labels), I)]

    def payloads(self, ids: np.ndarray) -> list[str]:
        """Payloads aligned with ``ids`` (any shape, flattened), "" where none."""
        flat = [str(p) for p in ids.ravel()]
        rows = self._rows(sorted({p for p in flat if p}), ["id", "payload"])
        return [(rows[p]["payload"] or "") if p in rows else "" for p in flat]

    def state(self) -> str:
        return "ready"

    def to_basis(self, x: np.ndarray, side: str = "doc") -> np.ndarray:
        """x (n, d) in the collection's basis (re-normalized for cosine), or x itself without one, as the
        embedded backend maps them (``CollectionIndex.to_basis``; in numpy on both sides here: the engine
        searches). FAILED_PRECONDITION when the basis transform is not loaded in this front-end."""
        basis = self._loaded_basis()
        if basis is None or not len(x):
            return x
        return map_queries(basis, x, self.home.metric, self.home.dim, side)

    def _loaded_basis(self) -> Transform | None:
        """The basis transform (None without one); FAILED_PRECONDITION when it is not loaded here."""
        if self.basis_field and self.basis is None:
            raise FailedPrecondition(
                f"collection {self.name!r}'s basis transform {self.row.spec.basis_transform!r} is not loaded in this"
                " front-end; restart it once the transform is registered"
            )
        return self.basis

    # -- maintenance: the engine's own ---------------------------------------------------------

    def maintain(self, *, idle_seconds: float = 0.0, force: bool = False, **_: Any) -> bool:
        """Flushes the collection once its writes have been idle ``idle_seconds`` (or when ``force``d, at
        shutdown), as the embedded backend merges: the engine then seals its growing segment and builds
        the index on it. A write in progress is not idle: a bulk load whose upserts each take longer than
        ``idle_seconds`` was flushed after nearly every batch, one small segment each, which Milvus Lite
        then merged and indexed again and again (and searched by brute force meanwhile). The flush holds
        the write lock and the table's ``flush_gate``: writes and reads by id wait for it. True after a
        flush; an unreachable engine is tried again at the next call."""
        if not force and not self.dropped:
            self._count_when_idle()
        if not self.unflushed or self.dropped:
            return False
        if not self.lock.acquire(blocking=force):  # a write is in progress (at shutdown: wait for it)
            return False
        try:  # writes wait for the flush, and reads by id (flush_gate: Milvus Lite answered one partly)
            if not force and time.monotonic() - self.last_write < idle_seconds:
                return False
            n = self.unflushed
            try:
                with self.flush_gate.exclusive():
                    for name in (self.mname, key_map(self.mname)) if self.keyed else (self.mname,):
                        self._call("flush", functools.partial(flush, name, self.engines.timeout))
            except InterlinguaError as e:
                log.warning("flush of milvus collection %s failed: %s", self.name, e.message)
                return False
            self.unflushed = max(0, self.unflushed - n)
            return True
        finally:
            self.lock.release()

    def _count_when_idle(self) -> None:
        """Counts the collection in the engine when its counts are unknown (after a start, a failed write, or
        another front-end's write), at most every ``RECOUNT_SECONDS`` and never waiting for a write, so that
        searches of a collection with several vector fields can leave out the home filter (:meth:`_home_filter`)."""
        if (self.npoints is not None and self._counts_known) or time.monotonic() < self._next_count:
            return
        if not self.lock.acquire(blocking=False):
            return
        try:
            self._next_count = time.monotonic() + RECOUNT_SECONDS
            self._ensure_counted()
        except InterlinguaError as e:  # the engine is down: tried again later
            log.debug("counting milvus collection %s failed: %s", self.name, e.message)
        finally:
            self.lock.release()

    def drop(self) -> None:
        """Drops the Milvus collection, then the collection's row (routes with it) from the store."""
        with self.lock:
            self.drop_engine_side()
            self.detach()

    def detach(self) -> None:
        """Forgets the collection here, leaving the engine's: another front-end of a shared registry
        dropped it (``shared.py``), or :meth:`drop` did."""
        self.dropped = True
        self.store.drop_collection(self.row.cid)
        for space in self.counts:
            with contextlib.suppress(KeyError):
                self.metrics.points.remove(self.name, space)
        for gauge in (self.metrics.index_ready, self.metrics.collection_failed):
            with contextlib.suppress(KeyError):
                gauge.remove(self.name)
        for stage in SEARCH_STAGES:
            self.metrics.search_seconds.remove(self.name, stage)
