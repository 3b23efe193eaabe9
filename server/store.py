"""The source of truth: an embedded SQLite store in WAL mode with synchronous=FULL.

It holds spaces, collections, points (id, payload, sequence) and their vectors
per space. Every write runs in one transaction stamped with the next value of a
global, monotonically increasing sequence number; the call returns only after
the commit is durable, so an acknowledged write survives ``kill -9``. FAISS
indexes are derived from this store (see ``checkpoint.py``).

Home-space vectors carry a *label*: the int64 id of the vector in its
collection's FAISS index. Labels are allocated in increasing order;
overwriting a point's home vector gives it a new label, and the old label is
dead (filtered at search time). Renumbering (``compaction.py``: a merge that
leaves dead fresh rows out, a compaction, recovery) gives the live labels new,
dense numbers in one transaction (:meth:`Store.relabel`), so a label names a
vector only within one numbering, and freed numbers are taken again.

This module holds the spaces, collections, points and vectors; the connections
(writers share one behind a lock, readers have one per thread), the schema and the
write transaction are in ``store_core.py``, the transforms and routes in
``store_registry.py``. Covered by the durability tests in
``tests/test_durability.py``, the renumbering tests in ``tests/test_compaction.py``
and the schema migration test in ``tests/test_index_options.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .collection_spec import SPEC_COLUMNS, CollectionSpec
from .errors import AlreadyExists
from .store_core import vector_rows
from .store_migrations import MigrationTables
from .store_registry import RegistryTables, RouteRow, TransformRow

#: RouteRow and TransformRow: re-exported from store_registry.py
__all__ = ["CollectionRow", "RouteRow", "SpaceRow", "Store", "TransformRow"]


@contextlib.contextmanager
def _unique(kind: str, name: str) -> Iterator[None]:
    """A unique-name violation as AlreadyExists (the engine's locks should make it unreachable)."""
    try:
        yield
    except sqlite3.IntegrityError:
        raise AlreadyExists(f"{kind} {name!r} already exists") from None


_CHUNK = 900  # bound host parameters per statement


@dataclass(frozen=True)
class SpaceRow:
    name: str
    dim: int
    metric: str
    description: str
    created_at: float


@dataclass(frozen=True)
class CollectionRow:
    cid: int
    spec: CollectionSpec  #: the creation parameters, as checked and stored
    created_at: float
    next_label: int
    last_sequence: int


#: a collection row's columns: cid, created_at, next_label, last_sequence, then the spec's fields
_COLLECTION_COLUMNS = ", ".join(("cid", "created_at", "next_label", "last_sequence", *SPEC_COLUMNS))


def _collection_row(r: tuple[Any, ...]) -> CollectionRow:
    cid, created_at, next_label, last_sequence, *spec = r
    return CollectionRow(cid, CollectionSpec(*spec), created_at, next_label, last_sequence)


def _chunks(seq: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(seq), _CHUNK):
        yield seq[i : i + _CHUNK]


class Store(RegistryTables, MigrationTables):
    """SQLite store at ``path`` (created if missing): spaces, collections, points and vectors here;
    the connections and transactions in :class:`~.store_core.StoreCore`, transforms and routes in
    :class:`~.store_registry.RegistryTables`, migrations in :class:`~.store_migrations.MigrationTables`."""

    # -- writes: each is one durable transaction (``_tx``) and returns its sequence number -------

    def add_space(self, row: SpaceRow) -> int:
        with _unique("space", row.name), self._tx() as seq:
            self._w.execute(
                "INSERT INTO spaces VALUES (?,?,?,?,?)",
                (row.name, row.dim, row.metric, row.description, row.created_at),
            )
        return seq

    def add_collection(self, spec: CollectionSpec) -> CollectionRow:
        """Writes a checked spec (:meth:`CollectionSpec.checked`) as a new collection's row."""
        name = spec.name
        with _unique("collection", name), self._tx() as seq:
            self._w.execute(
                f"INSERT INTO collections (created_at, last_sequence, {', '.join(SPEC_COLUMNS)})"
                f" VALUES (?,?,{','.join('?' * len(SPEC_COLUMNS))})",
                (time.time(), seq, *dataclasses.astuple(spec)),
            )
        row = self.collection(name)
        if row is None:
            raise RuntimeError(f"collection {name!r} vanished after its commit")  # a bug, not input
        return row

    def drop_collection(self, cid: int) -> int:
        with self._tx() as seq:
            for table in ("vectors", "points", "routes", "collections", "migrations"):
                self._w.execute(f"DELETE FROM {table} WHERE cid=?", (cid,))
            self._w.execute("DELETE FROM meta WHERE key=?", (f"keys:{cid}",))
        return seq

    def set_backend(self, cid: int, backend: str, uri: str) -> int:
        """Switches collection ``cid`` to ``backend`` at ``uri`` (``MoveCollection``): one durable transaction."""
        with self._tx() as seq:
            self._w.execute(
                "UPDATE collections SET backend=?, backend_uri=?, train_min_points=0 WHERE cid=?", (backend, uri, cid)
            )
        return seq

    def purge_points(self, cid: int, limit: int) -> int:
        """Deletes up to ``limit`` points of collection ``cid`` with their vectors (a moved collection's
        leftovers, in transactions of bounded size); returns how many, 0 once none is left."""
        with self._tx():
            pids = [r[0] for r in self._w.execute("SELECT pid FROM points WHERE cid=? LIMIT ?", (cid, limit))]
            rows = [(cid, pid) for pid in pids]
            self._w.executemany("DELETE FROM vectors WHERE cid=? AND pid=?", rows)
            self._w.executemany("DELETE FROM points WHERE cid=? AND pid=?", rows)
            if not pids:  # vectors without a point: none are written, but leave nothing behind
                self._w.execute("DELETE FROM vectors WHERE cid=?", (cid,))
        return len(pids)

    def stamp(self, cid: int) -> int:
        """One durable transaction that only takes the next sequence number as collection ``cid``'s
        last write: a ``milvus`` collection's writes carry it (their points live in the engine)."""
        with self._tx() as seq:
            self._w.execute("UPDATE collections SET last_sequence=? WHERE cid=?", (seq, cid))
        return seq

    # -- a milvus collection's primary keys --------------------------------------------------------
    # Dense INT64 keys (``backends/milvus_table.py``, "Keys"): a counter per collection in ``meta``, under
    # ``keys:<cid>``; keys below it may be in the engine, none at or above it was handed out.

    def stamp_keys(self, cid: int, n: int) -> tuple[int, int]:
        """:meth:`stamp` that also takes ``n`` keys of collection ``cid`` in the same transaction:
        (sequence, the first of the n keys)."""
        with self._tx() as seq:
            self._w.execute("UPDATE collections SET last_sequence=? WHERE cid=?", (seq, cid))
            first = self._take_keys(cid, n, 0)
        return seq, first

    def reserve_keys(self, cid: int, n: int, floor: int = 0) -> int:
        """Takes ``n`` keys of collection ``cid``, none below ``floor``, in one durable transaction;
        returns the first."""
        with self._tx():
            return self._take_keys(cid, n, floor)

    def keys_used(self, cid: int) -> int:
        """The next key collection ``cid`` would hand out (0 before any)."""
        with self._lock:
            return self._keys_used(cid)

    def _keys_used(self, cid: int) -> int:
        r = self._w.execute("SELECT value FROM meta WHERE key=?", (f"keys:{cid}",)).fetchone()
        return int(r[0]) if r else 0

    def _take_keys(self, cid: int, n: int, floor: int) -> int:
        first = max(self._keys_used(cid), floor)
        self._w.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (f"keys:{cid}", first + n))
        return first

    def upsert(
        self,
        cid: int,
        space: str,
        ids: Sequence[str],
        x: np.ndarray,
        payloads: Sequence[str | None],
        first_label: int | None,
        *,
        projected: bool = False,
    ) -> int:
        """Writes n vectors of one space (x: shape (n, d) float32) and payloads.

        ``first_label`` is the label of ids[0] for home-space vectors (labels
        first_label .. first_label+n-1), or None for vectors of another space.
        ``projected`` marks a migration's forward projections (a client's vectors are 0).
        """
        n = len(ids)
        blobs = [memoryview(row).cast("B") for row in np.ascontiguousarray(x, dtype="<f4")]
        with self._tx() as seq:
            self._w.executemany(
                "INSERT INTO points (cid, pid, payload, sequence) VALUES (?,?,?,?)"
                " ON CONFLICT (cid, pid) DO UPDATE SET sequence=excluded.sequence,"
                " payload=COALESCE(excluded.payload, points.payload)",
                [(cid, pid, payloads[i], seq) for i, pid in enumerate(ids)],
            )
            labels: Sequence[int | None] = (
                range(first_label, first_label + n) if first_label is not None else [None] * n
            )
            self._w.executemany(
                "INSERT OR REPLACE INTO vectors (cid, pid, space, label, sequence, vec, projected)"
                " VALUES (?,?,?,?,?,?,?)",
                [(cid, ids[i], space, labels[i], seq, blobs[i], int(projected)) for i in range(n)],
            )
            self._w.execute(
                "UPDATE collections SET next_label=next_label+?, last_sequence=? WHERE cid=?",
                (n if first_label is not None else 0, seq, cid),
            )
        return seq

    def relabel(self, cid: int, old: np.ndarray, new: np.ndarray, *, next_label: int) -> int:
        """Moves home vectors from labels ``old`` to ``new`` (both (n,) int64, ascending, new <= old)."""
        with self._tx() as seq:
            self._w.executemany(
                "UPDATE vectors SET label=? WHERE cid=? AND label=?",
                [(int(b), cid, int(a)) for a, b in zip(old.tolist(), new.tolist(), strict=True) if a != b],
            )
            self._w.execute("UPDATE collections SET next_label=? WHERE cid=?", (next_label, cid))
        return seq

    def set_index_spec(self, cid: int, index_spec: str, operating_point: str, train_min_points: int) -> int:
        """Records the index an ``auto`` collection was rebuilt onto (``compaction.rebuild_onto``)."""
        with self._tx() as seq:
            self._w.execute(
                "UPDATE collections SET index_spec=?, operating_point=?, train_min_points=? WHERE cid=?",
                (index_spec, operating_point, train_min_points, cid),
            )
        return seq

    def delete(self, cid: int, ids: Sequence[str]) -> int:
        with self._tx() as seq:
            rows = [(cid, pid) for pid in ids]
            self._w.executemany("DELETE FROM vectors WHERE cid=? AND pid=?", rows)
            self._w.executemany("DELETE FROM points WHERE cid=? AND pid=?", rows)
            self._w.execute("UPDATE collections SET last_sequence=? WHERE cid=?", (seq, cid))
        return seq

    # -- reads ---------------------------------------------------------------------------------

    def spaces(self) -> list[SpaceRow]:
        rows = self._r.execute("SELECT name, dim, metric, description, created_at FROM spaces ORDER BY name")
        return [SpaceRow(*r) for r in rows]

    def collection(self, name: str) -> CollectionRow | None:
        r = self._r.execute(f"SELECT {_COLLECTION_COLUMNS} FROM collections WHERE name=?", (name,)).fetchone()
        return _collection_row(r) if r else None

    def collections(self) -> list[CollectionRow]:
        rows = self._r.execute(f"SELECT {_COLLECTION_COLUMNS} FROM collections ORDER BY name")
        return [_collection_row(r) for r in rows]

    def vector_counts(self, cid: int) -> dict[str, int]:
        rows = self._r.execute("SELECT space, count(*) FROM vectors WHERE cid=? GROUP BY space", (cid,))
        return {s: int(c) for s, c in rows}

    def point_count(self, cid: int) -> int:
        return int(self._r.execute("SELECT count(*) FROM points WHERE cid=?", (cid,)).fetchone()[0])

    def home_labels(self, cid: int, space: str) -> tuple[list[str], np.ndarray]:
        """(ids, labels) of every home-space vector; labels: int64 array of shape (n,)."""
        rows = self._r.execute(
            "SELECT pid, label FROM vectors WHERE cid=? AND space=? ORDER BY label", (cid, space)
        ).fetchall()
        return [r[0] for r in rows], np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))

    def home_vectors_from(self, cid: int, from_label: int, d: int) -> tuple[np.ndarray, np.ndarray]:
        """(labels, x) of home vectors with label >= from_label, in label order; x: (n, d)."""
        rows = self._r.execute(
            "SELECT label, vec FROM vectors WHERE cid=? AND label>=? ORDER BY label", (cid, from_label)
        ).fetchall()
        labels = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        return labels, vector_rows(rows, d)

    def home_vectors_at(self, cid: int, labels: np.ndarray, d: int) -> np.ndarray:
        """The home vectors of ``labels`` ((n,) int64, each a live label), in that order: (m, d) float32
        with m <= n when some were deleted or renumbered meanwhile (the index advisor's sample)."""
        found: dict[int, bytes] = {}
        values = [int(v) for v in labels.tolist()]
        for i in range(0, len(values), _CHUNK):
            chunk = values[i : i + _CHUNK]
            q = f"SELECT label, vec FROM vectors WHERE cid=? AND label IN ({','.join('?' * len(chunk))})"
            found.update((int(r[0]), r[1]) for r in self._r.execute(q, (cid, *chunk)))
        blob = b"".join(found[v] for v in values if v in found)
        return np.frombuffer(blob, dtype="<f4").reshape(-1, d).copy()

    def points(self, cid: int, ids: Sequence[str]) -> dict[str, tuple[str | None, int]]:
        """id -> (payload, sequence) for the ids that exist."""
        out: dict[str, tuple[str | None, int]] = {}
        for chunk in _chunks(ids):
            q = f"SELECT pid, payload, sequence FROM points WHERE cid=? AND pid IN ({','.join('?' * len(chunk))})"
            out.update({r[0]: (r[1], int(r[2])) for r in self._r.execute(q, (cid, *chunk))})
        return out

    def vectors(self, cid: int, ids: Sequence[str]) -> dict[str, dict[str, bytes]]:
        """id -> {space: packed float32 vector} for the ids that exist."""
        out: dict[str, dict[str, bytes]] = {}
        for chunk in _chunks(ids):
            q = f"SELECT pid, space, vec FROM vectors WHERE cid=? AND pid IN ({','.join('?' * len(chunk))})"
            for pid, space, vec in self._r.execute(q, (cid, *chunk)):
                out.setdefault(pid, {})[space] = bytes(vec)
        return out

    def point_rows(self, cid: int, ids: Sequence[str]) -> dict[str, tuple[str | None, int, dict[str, bytes]]]:
        """id -> (payload, sequence, {space: packed float32 vector}) for the ids that exist, each point read in
        one statement (a point written or deleted meanwhile is seen whole, before or after, never half)."""
        out: dict[str, tuple[str | None, int, dict[str, bytes]]] = {}
        for chunk in _chunks(ids):
            q = (
                "SELECT p.pid, p.payload, p.sequence, v.space, v.vec FROM points p LEFT JOIN vectors v"
                f" ON v.cid=p.cid AND v.pid=p.pid WHERE p.cid=? AND p.pid IN ({','.join('?' * len(chunk))})"
            )
            for pid, payload, seq, space, vec in self._r.execute(q, (cid, *chunk)):
                vecs = out.setdefault(pid, (payload, int(seq), {}))[2]
                if space is not None:
                    vecs[space] = bytes(vec)
        return out

    def points_page(self, cid: int, after: str, limit: int) -> list[tuple[str, str | None, int]]:
        """(id, payload, sequence) of up to ``limit`` points with ids after ``after``, in id order."""
        rows = self._r.execute(
            "SELECT pid, payload, sequence FROM points WHERE cid=? AND pid>? ORDER BY pid LIMIT ?", (cid, after, limit)
        )
        return [(r[0], r[1], int(r[2])) for r in rows]

    def points_since(self, cid: int, sequence: int) -> list[str]:
        """The ids of points whose last write is newer than ``sequence``."""
        return [r[0] for r in self._r.execute("SELECT pid FROM points WHERE cid=? AND sequence>?", (cid, sequence))]

    def point_ids(self, cid: int) -> list[str]:
        return [r[0] for r in self._r.execute("SELECT pid FROM points WHERE cid=?", (cid,))]

    def existing_vectors(self, cid: int, space: str, ids: Sequence[str]) -> set[str]:
        """The ids among ``ids`` that already have a vector in ``space``."""
        found: set[str] = set()
        for chunk in _chunks(ids):
            q = f"SELECT pid FROM vectors WHERE cid=? AND space=? AND pid IN ({','.join('?' * len(chunk))})"
            found.update(r[0] for r in self._r.execute(q, (cid, space, *chunk)))
        return found

    def vectors_per_space(self, cid: int, ids: Sequence[str]) -> dict[str, int]:
        """space -> how many of ``ids`` have a vector in it."""
        out: dict[str, int] = {}
        for chunk in _chunks(ids):
            q = (
                f"SELECT space, count(*) FROM vectors WHERE cid=? AND pid IN ({','.join('?' * len(chunk))})"
                " GROUP BY space"
            )
            for space, n in self._r.execute(q, (cid, *chunk)):
                out[space] = out.get(space, 0) + int(n)
        return out
