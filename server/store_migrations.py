"""The store's migration tables: one record per migrating collection, and the queries a migration runs.

A migration (``server/migration``) keeps its state as one JSON record per collection in the
``migrations`` table, written in one durable transaction per phase change. Its new-space index is an
internal companion collection (named ``~migration:<cid>``) whose vectors carry ``projected = 1`` when a
forward upgrade computed them and 0 when a client wrote them. The collection itself stays the
source of truth for points, payloads and every client-written vector, old and new
(:meth:`MigrationTables.vectors_to_sync` repairs the companion after a crash between the two writes).
:meth:`MigrationTables.finish_migration` makes the new space home in one transaction. Covered by
``tests/test_migration.py``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from .store_core import StoreCore, vector_rows

__all__ = ["MigrationTables"]


class MigrationTables(StoreCore):
    """The ``migrations`` table and the cross-collection queries of a migration."""

    def put_migration(self, cid: int, record: dict[str, Any]) -> int:
        with self._tx() as seq:
            self._w.execute("INSERT OR REPLACE INTO migrations (cid, record) VALUES (?,?)", (cid, json.dumps(record)))
        return seq

    def delete_migration(self, cid: int) -> int:
        with self._tx() as seq:
            self._w.execute("DELETE FROM migrations WHERE cid=?", (cid,))
        return seq

    def migrations(self) -> dict[int, dict[str, Any]]:
        return {int(c): json.loads(r) for c, r in self._r.execute("SELECT cid, record FROM migrations")}

    def projected_ids(self, cid: int, space: str) -> set[str]:
        """Ids whose ``space`` vector in collection ``cid`` is a forward projection."""
        q = "SELECT pid FROM vectors WHERE cid=? AND space=? AND projected=1"
        return {r[0] for r in self._r.execute(q, (cid, space))}

    def vectors_to_sync(self, cid: int, companion: int, space: str, d: int) -> tuple[list[str], np.ndarray]:
        """(ids, x (n, d)) of the client-written ``space`` vectors of ``cid`` that the companion lacks, holds
        older, or holds as projections: what a crash between the two writes of a backfill left behind."""
        rows = self._r.execute(
            "SELECT a.pid, a.vec FROM vectors a LEFT JOIN vectors b ON b.cid=? AND b.pid=a.pid AND b.space=a.space"
            " WHERE a.cid=? AND a.space=? AND (b.pid IS NULL OR b.sequence < a.sequence OR b.projected=1)"
            " ORDER BY a.pid",
            (companion, cid, space),
        ).fetchall()
        return [r[0] for r in rows], vector_rows(rows, d)

    def ids_missing_from(self, companion: int, cid: int) -> list[str]:
        """Ids of the companion's points that collection ``cid`` no longer has (a crash between deletes)."""
        q = (
            "SELECT pid FROM points b WHERE b.cid=?"
            " AND NOT EXISTS (SELECT 1 FROM points a WHERE a.cid=? AND a.pid=b.pid)"
        )
        return [r[0] for r in self._r.execute(q, (companion, cid))]

    def vectors_after(self, cid: int, space: str, after: str, limit: int, d: int) -> tuple[list[str], np.ndarray]:
        """The next ``limit`` (ids, x (n, d)) of ``space`` in collection ``cid`` with id > ``after``, by id."""
        rows = self._r.execute(
            "SELECT pid, vec FROM vectors WHERE cid=? AND space=? AND pid>? ORDER BY pid LIMIT ?",
            (cid, space, after, limit),
        ).fetchall()
        return [r[0] for r in rows], vector_rows(rows, d)

    def finish_migration(self, cid: int, companion: int, old_space: str, new_space: str, reverse_transform: str) -> int:
        """Makes ``new_space`` the home of collection ``cid`` in one transaction: its old vectors are
        dropped, the companion's new-space vectors (client-written and projected, with their labels)
        become its home vectors, the companion is deleted, the routes into the old home end (the
        reverse transform, if any, becomes the route from ``old_space``) and the record is removed."""
        now = time.time()
        with self._tx() as seq:
            w = self._w
            w.execute("DELETE FROM vectors WHERE cid=? AND space IN (?,?)", (cid, old_space, new_space))
            w.execute(
                "INSERT INTO vectors (cid, pid, space, label, sequence, vec, projected)"
                " SELECT ?, b.pid, b.space, b.label, b.sequence, b.vec, b.projected FROM vectors b"
                " WHERE b.cid=? AND b.space=? AND EXISTS (SELECT 1 FROM points a WHERE a.cid=? AND a.pid=b.pid)",
                (cid, companion, new_space, cid),
            )
            w.execute(
                "UPDATE collections SET home_space=?, last_sequence=?,"
                " next_label=(SELECT next_label FROM collections WHERE cid=?) WHERE cid=?",
                (new_space, seq, companion, cid),
            )
            w.execute("UPDATE routes SET deactivated_at=? WHERE cid=? AND deactivated_at=0", (now, cid))
            if reverse_transform:
                w.execute(
                    "INSERT INTO routes (cid, query_space, transform, activated_at, forced) VALUES (?,?,?,?,0)",
                    (cid, old_space, reverse_transform, now),
                )
            for table in ("vectors", "points", "routes", "collections", "migrations"):
                w.execute(f"DELETE FROM {table} WHERE cid=?", (companion,))
            w.execute("DELETE FROM migrations WHERE cid=?", (cid,))
        return seq

    def rehome_collection(self, cid: int, old_space: str, new_space: str, reverse_transform: str) -> int:
        """Makes ``new_space`` the home of collection ``cid`` whose points live in a Milvus engine (the
        milvus backend's FinishMigration, ``backends/milvus_migration.py``) in one transaction: the home
        changes, the routes into the old home end (the reverse transform, if any, becomes the route from
        ``old_space``) and the record is removed."""
        now = time.time()
        with self._tx() as seq:
            w = self._w
            w.execute("UPDATE collections SET home_space=?, last_sequence=? WHERE cid=?", (new_space, seq, cid))
            w.execute("UPDATE routes SET deactivated_at=? WHERE cid=? AND deactivated_at=0", (now, cid))
            if reverse_transform:
                w.execute(
                    "INSERT INTO routes (cid, query_space, transform, activated_at, forced) VALUES (?,?,?,?,0)",
                    (cid, old_space, reverse_transform, now),
                )
            w.execute("DELETE FROM migrations WHERE cid=?", (cid,))
        return seq
