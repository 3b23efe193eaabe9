"""Model migrations of a ``milvus`` collection: the new space's vector field of the same Milvus collection.

A ``milvus`` collection has a FLOAT_VECTOR field per space registered when it was created
(``milvus_schema.py``), and each point's ``spaces`` array says which fields hold a vector of it. A
migration to another of those spaces needs no companion collection: a backfill upsert writes the new
space's vector into its field (``MilvusCollection.upsert``, one engine upsert of the whole row, so
there is no second step to repair after a crash), and the field's points are the *backfilled* ones.
:class:`MilvusMigration` is the run-time state (the record and its phase are the embedded backend's,
``migration/manager.py``); ``milvus_migration_search.py`` answers the table of ``migration/search.py``:

- new-space queries in backfill: the backfilled points natively in the new field (filter: the point has
  a new vector), the others through ``transform`` in the old field (filter: an old vector and no new
  one), the old scores calibrated with each query's level read from the whole old list's top
  ``depth`` (what the embedded backend reads), merged by ``merge_topk``; the new field alone once every
  point is backfilled; after the cutover, the new field alone;
- old-space queries: the old field (the collection's own path) in backfill, ``reverse_transform`` into
  the new field after the cutover.

A space without a field cannot be migrated to: Milvus Lite 3.2.2 answers ``AddCollectionField`` with
UNIMPLEMENTED, so StartMigration refuses it (FAILED_PRECONDITION) before it changes anything. Non-home
fields are created with a FLAT index; the cutover gives the new field the collection's index
(:meth:`MilvusMigration.switch_index`). Milvus Lite 3.2.2 refuses ``drop_index`` on a loaded collection
and ``create_index`` on a field that has one, and a released collection refuses searches and queries,
so the switch runs release -> drop_index -> create_index -> load while the migration's gate holds every
search, GetPoints and payload fetch of the collection (they wait, none fails) and its lock holds the
writes. Forward upgrades are not built here (a projection would need a marker beside the field's
vector): ForwardUpgrade is refused, and a cutover needs every point backfilled. FinishMigration makes
the new space home in one store transaction, then drops the old vectors from the rows (the field itself
stays: Milvus Lite cannot drop one). Covered by ``tests/test_migration_milvus.py``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import FailedPrecondition, InterlinguaError
from ..migration.runtime import MigrationBase, MigrationRecord
from .milvus import MilvusCollection
from .milvus_schema import METRIC, MilvusIndex, field_name, parse_index, require_pymilvus
from .milvus_table import CHUNK, ReadWriteGate, as_vector, upsert_rows

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..store import SpaceRow, Store
    from ..transforms import Transform

__all__ = ["MilvusMigration", "old_vectors", "require_field"]

log = logging.getLogger(__name__)
MAX_QUERY_BATCH = 16384  #: Milvus' largest query-iterator batch
SWITCH_TRIES = 3  #: release + drop_index attempts (a concurrent load by another client can undo a release)
FOLLOW_SECONDS = 600.0  #: longest another front-end's index switch holds this one's requests (``follow_switch``)


def require_field(col: MilvusCollection, space: SpaceRow) -> str:
    """The vector field of ``space`` in ``col``; FAILED_PRECONDITION saying why there is none and how to avoid it."""
    fields = col._fields()
    f = fields.get(space.name)
    if f is None:
        raise FailedPrecondition(
            f"collection {col.name!r} (backend milvus) has no vector field for space {space.name!r}, and Milvus Lite"
            " 3.2.2 cannot add a field to a collection (AddCollectionField is unimplemented); a migration backfills"
            " into the new space's field: register the new space before creating the collection (it gets a field"
            f" if it is among the home space and the 3 oldest others). Its fields: {', '.join(sorted(fields))}"
        )
    return f


class MilvusMigration(MigrationBase):
    """A running migration of a ``milvus`` collection (module docstring)."""

    engine_side = True

    def __init__(
        self,
        rec: MigrationRecord,
        col: MilvusCollection,
        spaces: tuple[SpaceRow, SpaceRow],
        fns: tuple[Transform, Transform | None, Transform | None],
        store: Store,
        metrics: Metrics,
    ) -> None:
        super().__init__(rec, spaces, fns, store, metrics)
        self.col = col
        self.old_field, self.new_field = field_name(self.old.name), field_name(self.new.name)
        self.gate = ReadWriteGate()
        self._index: MilvusIndex | None = None  #: the new field's index, read from the engine on first use
        self.switch_seconds = 0.0  #: how long the last index switch held the gate
        #: another front-end of a shared registry is switching the index (``follow_switch``): its end
        self._followed: threading.Event | None = None

    # -- state -----------------------------------------------------------------------------------

    def points(self) -> int:
        return self.col.num_points()

    def backfilled(self) -> int:
        return int(self.col.vector_counts().get(self.new.name, 0))

    def old_vectors(self) -> int:
        return int(self.col.vector_counts().get(self.old.name, 0))

    def complete(self) -> bool:
        return self.backfilled() >= self.points()

    def reading(self) -> contextlib.AbstractContextManager[object]:
        self.field_index()  # a field a crash left without an index gets one before the engine is read
        return self.gate.read()

    # -- writes ----------------------------------------------------------------------------------

    def upsert(self, space: SpaceRow, ids: list[str], x: np.ndarray, payloads: Sequence[str | None]) -> int:
        """The embedded migration's checks, then one upsert into the space's field (the caller checked x)."""
        self.field_index()
        with self.lock:
            if space.name == self.new.name and self.phase == "backfill":
                have = self.col._rows(ids, ["id"])
                missing = [p for p in ids if p not in have]  # (no flush meanwhile: the table's flush_gate)
                if missing:
                    raise self.not_backfillable(missing)
            elif space.name == self.old.name and self.phase == "cutover":
                rows = self.col._rows(ids, ["id", "spaces"])
                missing = [p for p in ids if p not in rows or self.new_field not in rows[p]["spaces"]]
                if missing:
                    raise self.cut_over_refusal(missing)
            seq = self.col.upsert(space, ids, x, payloads)
        self.publish()
        return seq

    def delete(self, ids: list[str], missing_ok: bool) -> tuple[int, int]:
        self.field_index()
        with self.lock:
            out = self.col.delete(ids, missing_ok)
        self.publish()
        return out

    # -- the new field's index -------------------------------------------------------------------

    def field_index(self) -> MilvusIndex:
        """The new field's index as the engine has it (read once; a field left without one by a crash
        inside :meth:`switch_index` gets the collection's index first)."""
        idx = self._index
        if idx is None:
            with self.lock:
                if self._index is None:
                    self._index = self._describe() or self._repair()
                idx = self._index
        return idx

    def _engine(self, what: str, fn: Any) -> Any:
        """An engine call on the collection without the reload ``MilvusTable._call`` does."""
        col = self.col
        return col.engines.call(col.uri, what, fn)

    def _describe(self) -> MilvusIndex | None:
        col, t = self.col, self.col.engines.timeout
        try:
            info = self._engine("describe index", lambda c: c.describe_index(col.mname, self.new_field, timeout=t))
        except FailedPrecondition:  # no index (UNAVAILABLE and the like are the request's error)
            return None
        if not info:
            return None
        kind = str(info.get("index_type", ""))
        params = info.get("params") if isinstance(info.get("params"), dict) else info
        target = col.index
        if kind == target.index_type and all(int(params.get(k, -1)) == v for k, v in target.params.items()):
            return target
        if kind == "FLAT":
            return parse_index("Flat", 0)
        return MilvusIndex(kind, kind, {}, int(params.get("nlist", 0)))

    def _create(self, index: MilvusIndex, c: Any) -> None:
        p = require_pymilvus().MilvusClient.prepare_index_params()
        p.add_index(
            self.new_field, index_type=index.index_type, metric_type=METRIC[self.new.metric],
            params=index.build_params(),
        )  # fmt: skip
        c.create_index(self.col.mname, p, timeout=self.col.engines.timeout)

    def _repair(self) -> MilvusIndex:
        log.warning("%s: field %s has no index; building the collection's", self.col.mname, self.new_field)
        target, t = self.col.index, self.col.engines.timeout
        self._engine("create index", functools.partial(self._create, target))
        self._engine("load", lambda c: c.load_collection(self.col.mname, timeout=t))
        return target

    def switch_index(self) -> float:
        """Gives the new field the collection's index unless it has it (call under :attr:`lock`: no write runs).
        Searches and reads by id wait at the gate meanwhile. Returns the seconds the gate was held (0.0: no
        switch). On an engine error the field gets its previous index back (or the collection's) and the
        error is raised: nothing changed for the requests."""
        target, before = self.col.index, self.field_index()
        if before == target:
            return 0.0
        col, t = self.col, self.col.engines.timeout
        t0 = time.perf_counter()
        with self.gate.exclusive():
            self._engine("flush", lambda c: c.flush(col.mname, timeout=t))
            try:
                for attempt in range(SWITCH_TRIES):
                    self._engine("release", lambda c: c.release_collection(col.mname, timeout=t))
                    try:
                        self._engine("drop index", lambda c: c.drop_index(col.mname, self.new_field, timeout=t))
                        break
                    except FailedPrecondition:
                        if attempt == SWITCH_TRIES - 1:
                            raise
                self._engine("create index", functools.partial(self._create, target))
            except BaseException:
                self._index = None
                with contextlib.suppress(InterlinguaError):
                    if self._describe() is None:
                        self._engine("create index", functools.partial(self._create, before))
                    self._engine("load", lambda c: c.load_collection(col.mname, timeout=t))
                raise
            self._engine("load", lambda c: c.load_collection(col.mname, timeout=t))
            self._index = target
        self.switch_seconds = time.perf_counter() - t0
        return self.switch_seconds

    def follow_switch(self, switching: bool) -> None:
        """Another front-end of a shared registry (``shared.py``) runs :meth:`switch_index` on the engine:
        while ``switching``, a thread holds this front-end's lock and gate as the switch holds the other's
        (writes, searches and reads by id of the collection wait, none meets a released collection), at most
        ``FOLLOW_SECONDS``; then the field's index is read from the engine again."""
        if switching and self._followed is None:
            done = self._followed = threading.Event()

            def hold() -> None:
                with self.lock, self.gate.exclusive():
                    if not done.wait(FOLLOW_SECONDS):
                        log.warning("%s: the index switch of another front-end did not end in time", self.col.mname)
                    self._index = None

            threading.Thread(target=hold, name=f"follow-switch-{self.rec.collection}", daemon=True).start()
        elif not switching and self._followed is not None:
            self._followed.set()
            self._followed = None

    # -- finish ----------------------------------------------------------------------------------

    def drop_old_vectors(self, col: MilvusCollection) -> int:
        """Removes the old space's vector from every row of ``col`` (zeros, left out of ``spaces``), as the
        embedded backend's FinishMigration drops them; under the collection's write lock. Returns the rows."""
        t, old = col.engines.timeout, self.old_field
        ids = [str(r["id"]) for r in _iterate(col, f'array_contains(spaces, "{old}")', ["id"])]
        zero = np.zeros(self.old.dim, np.float32)
        for i in range(0, len(ids), CHUNK):
            rows = list(col._rows(ids[i : i + CHUNK], ["*"]).values())
            for r in rows:
                r["spaces"] = [f for f in r["spaces"] if f != old]
                r[old] = zero
                for k, v in r.items():
                    if isinstance(v, list) and k.startswith("v_"):
                        r[k] = as_vector(v)
            if rows:
                col._call("upsert", functools.partial(upsert_rows, col.mname, rows, t))
        return len(ids)


def _iterate(col: MilvusCollection, flt: str, fields: list[str], batch: int = CHUNK) -> Iterator[dict[str, Any]]:
    """The rows of ``col`` matching ``flt``, ``batch`` at a time (pymilvus' query iterator)."""
    t = col.engines.timeout
    it = col._call(
        "query", lambda c: c.query_iterator(col.mname, batch_size=batch, filter=flt, output_fields=fields, timeout=t)
    )
    try:
        while True:
            rows = col._call("query", lambda c: it.next())
            if not rows:
                return
            yield from rows
    finally:
        it.close()


def old_vectors(
    col: MilvusCollection, old: SpaceRow, mig: MilvusMigration | None, step: int
) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, x (n, d_old)) ``step`` at a time: the old-space vectors of the points not backfilled yet (of every
    point with one when ``mig`` is None), for SuggestBackfillOrder."""
    f = field_name(old.name)
    flt = f'array_contains(spaces, "{f}")'
    if mig is not None:
        flt += f' and not array_contains(spaces, "{mig.new_field}")'
    ids: list[str] = []
    xs: list[np.ndarray] = []
    for r in _iterate(col, flt, ["id", f], min(step, MAX_QUERY_BATCH)):
        ids.append(str(r["id"]))
        xs.append(as_vector(r[f]))
        if len(ids) == step:
            yield ids, np.vstack(xs)
            ids, xs = [], []
    if ids:
        yield ids, np.vstack(xs)
