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

Writers share one connection behind a lock; readers use one connection per
thread (WAL readers never block the writer). Covered by the durability tests in
``tests/test_durability.py``, the renumbering tests in ``tests/test_compaction.py``
and the schema migration test in ``tests/test_index_options.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import AlreadyExists

__all__ = ["CollectionRow", "RouteRow", "SpaceRow", "Store", "TransformRow"]


@contextlib.contextmanager
def _unique(kind: str, name: str) -> Iterator[None]:
    """A unique-name violation as AlreadyExists (the engine's locks should make it unreachable)."""
    try:
        yield
    except sqlite3.IntegrityError:
        raise AlreadyExists(f"{kind} {name!r} already exists") from None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('sequence', 0);
CREATE TABLE IF NOT EXISTS spaces (
    name TEXT PRIMARY KEY, dim INTEGER NOT NULL, metric TEXT NOT NULL,
    description TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS collections (
    cid INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE,
    home_space TEXT NOT NULL REFERENCES spaces(name), index_spec TEXT NOT NULL,
    train_min_points INTEGER NOT NULL, created_at REAL NOT NULL,
    next_label INTEGER NOT NULL DEFAULT 0, last_sequence INTEGER NOT NULL DEFAULT 0,
    prefix_dims INTEGER NOT NULL DEFAULT 0, basis_transform TEXT NOT NULL DEFAULT '',
    ef_construction INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS points (
    cid INTEGER NOT NULL, pid TEXT NOT NULL, payload TEXT, sequence INTEGER NOT NULL,
    PRIMARY KEY (cid, pid));
CREATE TABLE IF NOT EXISTS vectors (
    cid INTEGER NOT NULL, pid TEXT NOT NULL, space TEXT NOT NULL, label INTEGER,
    sequence INTEGER NOT NULL, vec BLOB NOT NULL, PRIMARY KEY (cid, pid, space));
CREATE INDEX IF NOT EXISTS vectors_by_label ON vectors (cid, label) WHERE label IS NOT NULL;
CREATE TABLE IF NOT EXISTS transforms (
    name TEXT PRIMARY KEY, kind TEXT NOT NULL, source_space TEXT NOT NULL, target_space TEXT NOT NULL,
    config TEXT NOT NULL, report TEXT NOT NULL, checksum TEXT NOT NULL, d_in INTEGER NOT NULL,
    d_out INTEGER NOT NULL, created_at REAL NOT NULL, doc_pairs INTEGER NOT NULL, query_pairs INTEGER NOT NULL,
    weights BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS routes (
    rid INTEGER PRIMARY KEY AUTOINCREMENT, cid INTEGER NOT NULL, query_space TEXT NOT NULL,
    transform TEXT NOT NULL, activated_at REAL NOT NULL, deactivated_at REAL NOT NULL DEFAULT 0,
    forced INTEGER NOT NULL DEFAULT 0, shadow TEXT NOT NULL DEFAULT '', shadow_rate REAL NOT NULL DEFAULT 0);
"""

#: collections columns added after the first release, with their declarations (see Store._migrate)
_ADDED_COLUMNS = (("ef_construction", "INTEGER NOT NULL DEFAULT 0"),)

_CHUNK = 900  # bound host parameters per statement


@dataclass(frozen=True)
class SpaceRow:
    name: str
    dim: int
    metric: str
    description: str
    created_at: float


@dataclass(frozen=True)
class TransformRow:
    name: str
    kind: str
    source_space: str
    target_space: str
    config: str  #: JSON
    report: str  #: JSON
    checksum: str
    d_in: int
    d_out: int
    created_at: float
    doc_pairs: int
    query_pairs: int
    weights: bytes  #: np.savez archive of the transform's arrays


@dataclass(frozen=True)
class RouteRow:
    rid: int
    query_space: str
    transform: str  #: "" for a removal
    activated_at: float
    deactivated_at: float  #: 0 while live
    forced: int
    shadow: str
    shadow_rate: float


@dataclass(frozen=True)
class CollectionRow:
    cid: int
    name: str
    home_space: str
    index_spec: str
    train_min_points: int
    created_at: float
    next_label: int
    last_sequence: int
    prefix_dims: int  #: 0: the index holds every dimension
    basis_transform: str  #: "" or a home -> home transform applied before indexing (pca_basis, mrl_adapter)
    ef_construction: int = 0  #: HNSW efConstruction (0: FAISS's default)


def _chunks(seq: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(seq), _CHUNK):
        yield seq[i : i + _CHUNK]


class Store:
    """SQLite store at ``path`` (created if missing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._local = threading.local()
        self._w = self._connect()
        self._w.executescript(_SCHEMA)
        self._migrate()
        self.sequence = int(self._w.execute("SELECT value FROM meta WHERE key='sequence'").fetchone()[0])

    def _migrate(self) -> None:
        """Adds the columns that later versions introduced to a store an earlier version created."""
        have = {r[1] for r in self._w.execute("PRAGMA table_info(collections)")}
        for column, decl in _ADDED_COLUMNS:
            if column not in have:
                self._w.execute(f"ALTER TABLE collections ADD COLUMN {column} {decl}")

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("PRAGMA foreign_keys=ON")
        return con

    @property
    def _r(self) -> sqlite3.Connection:
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            con = self._connect()
            self._local.con = con
        return con

    def close(self) -> None:
        with self._lock:
            self._w.close()

    # -- writes: each is one durable transaction and returns its sequence number ----------------

    @contextlib.contextmanager
    def _tx(self) -> Iterator[int]:
        """One write transaction: yields its sequence number; durable once the block exits."""
        with self._lock:
            self._w.execute("BEGIN IMMEDIATE")
            seq = self.sequence + 1
            try:
                yield seq
                self._w.execute("UPDATE meta SET value=? WHERE key='sequence'", (seq,))
            except BaseException:
                self._w.execute("ROLLBACK")
                raise
            self._w.execute("COMMIT")
            self.sequence = seq

    def add_space(self, row: SpaceRow) -> int:
        with _unique("space", row.name), self._tx() as seq:
            self._w.execute(
                "INSERT INTO spaces VALUES (?,?,?,?,?)",
                (row.name, row.dim, row.metric, row.description, row.created_at),
            )
        return seq

    def add_collection(
        self,
        name: str,
        home_space: str,
        index_spec: str,
        train_min_points: int,
        prefix_dims: int = 0,
        basis_transform: str = "",
        ef_construction: int = 0,
    ) -> CollectionRow:
        with _unique("collection", name), self._tx() as seq:
            self._w.execute(
                "INSERT INTO collections (name, home_space, index_spec, train_min_points, created_at,"
                " last_sequence, prefix_dims, basis_transform, ef_construction) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    name,
                    home_space,
                    index_spec,
                    train_min_points,
                    time.time(),
                    seq,
                    prefix_dims,
                    basis_transform,
                    ef_construction,
                ),
            )
        row = self.collection(name)
        if row is None:
            raise RuntimeError(f"collection {name!r} vanished after its commit")  # a bug, not input
        return row

    def drop_collection(self, cid: int) -> int:
        with self._tx() as seq:
            for table in ("vectors", "points", "routes", "collections"):
                self._w.execute(f"DELETE FROM {table} WHERE cid=?", (cid,))
        return seq

    def upsert(
        self,
        cid: int,
        space: str,
        ids: Sequence[str],
        x: np.ndarray,
        payloads: Sequence[str | None],
        first_label: int | None,
    ) -> int:
        """Writes n vectors of one space (x: shape (n, d) float32) and payloads.

        ``first_label`` is the label of ids[0] for home-space vectors (labels
        first_label .. first_label+n-1), or None for vectors of another space.
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
                "INSERT OR REPLACE INTO vectors (cid, pid, space, label, sequence, vec) VALUES (?,?,?,?,?,?)",
                [(cid, ids[i], space, labels[i], seq, blobs[i]) for i in range(n)],
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
        r = self._r.execute(
            "SELECT cid, name, home_space, index_spec, train_min_points, created_at, next_label,"
            " last_sequence, prefix_dims, basis_transform, ef_construction FROM collections WHERE name=?",
            (name,),
        ).fetchone()
        return CollectionRow(*r) if r else None

    def collections(self) -> list[CollectionRow]:
        rows = self._r.execute(
            "SELECT cid, name, home_space, index_spec, train_min_points, created_at, next_label,"
            " last_sequence, prefix_dims, basis_transform, ef_construction FROM collections ORDER BY name"
        )
        return [CollectionRow(*r) for r in rows]

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
        x = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), d)
        return labels, x

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

    # -- transforms and routes -----------------------------------------------------------------

    def add_transform(self, row: TransformRow) -> int:
        with self._tx() as seq:
            self._w.execute("INSERT INTO transforms VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", dataclasses.astuple(row))
        return seq

    def delete_transform(self, name: str) -> int:
        """Removes transform ``name`` (its route history stays); a no-op for a name never stored."""
        with self._tx() as seq:
            self._w.execute("DELETE FROM transforms WHERE name=?", (name,))
        return seq

    def transforms(self) -> list[TransformRow]:
        return [TransformRow(*r) for r in self._r.execute("SELECT * FROM transforms ORDER BY name")]

    def set_route(self, cid: int, query_space: str, transform: str, forced: bool, now: float) -> int:
        """Closes the live route of (cid, query_space), if any, and opens one to ``transform``
        ("" records a removal). Returns the sequence."""
        with self._tx() as seq:
            self._w.execute(
                "UPDATE routes SET deactivated_at=? WHERE cid=? AND query_space=? AND deactivated_at=0",
                (now, cid, query_space),
            )
            self._w.execute(
                "INSERT INTO routes (cid, query_space, transform, activated_at, forced) VALUES (?,?,?,?,?)",
                (cid, query_space, transform, now, int(forced)),
            )
        return seq

    def set_shadow(self, cid: int, query_space: str, shadow: str, rate: float) -> int:
        with self._tx() as seq:
            self._w.execute(
                "UPDATE routes SET shadow=?, shadow_rate=? WHERE cid=? AND query_space=? AND deactivated_at=0",
                (shadow, rate, cid, query_space),
            )
        return seq

    def routes(self, cid: int) -> list[RouteRow]:
        """Every route version of a collection, newest first."""
        rows = self._r.execute(
            "SELECT rid, query_space, transform, activated_at, deactivated_at, forced, shadow, shadow_rate"
            " FROM routes WHERE cid=? ORDER BY rid DESC",
            (cid,),
        )
        return [RouteRow(*r) for r in rows]
