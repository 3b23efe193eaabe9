"""The SQLite database under the store: schema, connections and the one write transaction.

:class:`StoreCore` opens ``interlingua.db`` in WAL mode with ``synchronous=FULL``, creates the
tables (``_SCHEMA``) and adds the columns later versions introduced (``_ADDED_COLUMNS``). Writers
share one connection behind a lock; readers use one connection per thread (``_r``: WAL readers
never block the writer). :meth:`StoreCore._tx` is the one write transaction: ``BEGIN
IMMEDIATE``, stamped with the next value of the global sequence number, durable once it
returns. The tables live on top of it: points in ``store.py``, transforms and routes in
``store_registry.py``. Covered by the durability tests in ``tests/test_durability.py`` and the
schema migration test in ``tests/test_index_options.py``.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["StoreCore", "vector_rows"]


def vector_rows(rows: Sequence[Sequence[Any]], d: int, col: int = 1) -> np.ndarray:
    """The packed float32 vectors in column ``col`` of query ``rows`` as one (len(rows), d) array."""
    return np.frombuffer(b"".join(r[col] for r in rows), dtype="<f4").reshape(len(rows), d)


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
    ef_construction INTEGER NOT NULL DEFAULT 0, target_recall REAL NOT NULL DEFAULT 0,
    operating_point TEXT NOT NULL DEFAULT '');
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
CREATE TABLE IF NOT EXISTS migrations (cid INTEGER PRIMARY KEY, record TEXT NOT NULL);
"""

#: (table, column, declaration) added after the first release (see StoreCore._migrate); ``vectors.projected``
#: marks a migration's forward projections (``server/migration``), 0 for vectors a client wrote;
#: ``collections.target_recall`` and ``operating_point`` hold an ``auto`` collection's target and choice;
#: ``collections.backend`` and ``backend_uri`` where its points and search live (``server/backends``)
_ADDED_COLUMNS = (
    ("collections", "ef_construction", "INTEGER NOT NULL DEFAULT 0"),
    ("vectors", "projected", "INTEGER NOT NULL DEFAULT 0"),
    ("collections", "target_recall", "REAL NOT NULL DEFAULT 0"),
    ("collections", "operating_point", "TEXT NOT NULL DEFAULT ''"),
    ("collections", "backend", "TEXT NOT NULL DEFAULT 'embedded'"),
    ("collections", "backend_uri", "TEXT NOT NULL DEFAULT ''"),
)


class StoreCore:
    """SQLite database at ``path`` (created if missing): connections, schema and transactions."""

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
        for table, column, decl in _ADDED_COLUMNS:
            have = {r[1] for r in self._w.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._w.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

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

    # -- the write transaction ----------------------------------------------------------------

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
