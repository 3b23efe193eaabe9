"""The store's tables of transforms and routes (the transform registry's and ``routes.py``'s).

A transform row holds a fitted transform's kind, spaces, config, evaluation report, checksum and
weights; a route row is one version of a collection's route from a query space to its home space
(open while ``deactivated_at`` is 0), with its shadow settings. Every write is one durable
transaction of :class:`~.store_core.StoreCore`; :class:`~.store.Store` composes these tables
with the points. Covered by ``tests/test_routes.py`` and ``tests/test_snapshots.py`` (the
transforms and live routes a snapshot describes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .store_core import StoreCore

__all__ = ["RegistryTables", "RouteRow", "TransformRow"]


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


class RegistryTables(StoreCore):
    """Transforms and routes: the rows the transform registry and the route tables persist."""

    def add_transform(self, row: TransformRow) -> int:
        with self._tx() as seq:
            self._w.execute("INSERT INTO transforms VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", dataclasses.astuple(row))
        return seq

    def delete_transform(self, name: str) -> int:
        """Removes transform ``name`` (its route history stays); a no-op for a name never stored."""
        with self._tx() as seq:
            self._w.execute("DELETE FROM transforms WHERE name=?", (name,))
        return seq

    def transform(self, name: str) -> TransformRow | None:
        r = self._r.execute("SELECT * FROM transforms WHERE name=?", (name,)).fetchone()
        return TransformRow(*r) if r else None

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
