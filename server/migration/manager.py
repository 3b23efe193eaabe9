"""The migration lifecycle: start -> backfill -> cutover -> finish, or abort; forward upgrades and advice.

:class:`Migrations` owns every collection's :class:`~.runtime.Migration`: it checks each request
before it changes anything (NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION naming the figure),
makes each phase change durable in one store transaction before it swaps the in-memory phase
(one attribute: a search reads it once), and at start loads every record back: the companion
collections are recovered like any collection, repaired against the collection
(:meth:`~.runtime.Migration.reconcile`), a forward upgrade that was running resumes at its cursor,
and a companion left without a record (a crash inside StartMigration or AbortMigration) is
dropped. FinishMigration is one transaction (``store_migrations.finish_migration``) after which the
collection is reopened with the new space as home (the companion's checkpoint moves with it).
Covered by ``tests/test_migration.py`` and ``tests/test_migration_restart.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import checkpoint
from ..backends import milvus_migration
from ..backends.milvus import MilvusCollection
from ..backends.milvus_migration import MilvusMigration
from ..collection import Collection
from ..errors import FailedPrecondition, InvalidArgument, NotFound
from ..store import SpaceRow
from .calibration import IDENTITY, ScoreCalibration
from .order import backfill_order
from .runtime import COMPANION_PREFIX, PHASES, STRATEGIES, Migration, MigrationBase, MigrationRecord

if TYPE_CHECKING:
    from ..compat import TransformRecord
    from ..engine import Engine
    from ..transforms import Transform

__all__ = ["Migrations"]

log = logging.getLogger(__name__)
SUGGEST_MAX_CANDIDATES = 1_000_000  #: SuggestBackfillOrder ranks at most this many points (a seeded sample past it)
SUGGEST_READ_STEP = 65536  #: old vectors read per store query by SuggestBackfillOrder


class Migrations:
    """Every collection's migration (module docstring); ``engine`` gives the registries and the store."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.active: dict[str, MigrationBase] = {}  #: collection name -> its migration
        self.companions: dict[int, Collection] = {}  #: companion cid -> collection, loaded or created
        self.lock = threading.Lock()  #: starts, finishes and aborts

    # -- lookups ---------------------------------------------------------------------------------

    def get(self, collection: str) -> MigrationBase | None:
        return self.active.get(collection)

    def require(self, collection: str) -> MigrationBase:
        self.engine.collection(collection)  # NOT_FOUND for the collection first
        mig = self.active.get(collection)
        if mig is None:
            raise NotFound(f"collection {collection!r} has no migration")
        return mig

    def users(self, transform: str) -> list[str]:
        """The migrations that use ``transform`` (DeleteTransform refuses while any does)."""
        out = []
        for name, m in self.active.items():
            fw = m.rec.forward.get("transform", "") if m.forward is not None else ""
            if transform in (m.rec.transform, m.rec.reverse_transform, fw):
                out.append(f"the migration of collection {name!r}")
        return out

    def all_collections(self) -> list[Collection]:
        return list(self.companions.values())

    def _ready(self, name: str, source: SpaceRow, target: SpaceRow, role: str) -> tuple[Transform, TransformRecord]:
        rec = self.engine.require_compat().get(name)
        if rec.state != "ready" or rec.fn is None:
            raise FailedPrecondition(f"{role} {name!r} is {rec.state}{': ' + rec.error if rec.error else ''}")
        if (rec.source, rec.target) != (source.name, target.name) or rec.fn.d_out != target.dim:
            raise InvalidArgument(
                f"{role} {name!r} maps {rec.source!r} -> {rec.target!r}; it must map {source.name!r} -> {target.name!r}"
            )
        return rec.fn, rec

    def _new(
        self, rec: MigrationRecord, col: Collection, comp: Collection, new: SpaceRow, fns: tuple[Any, Any, Any]
    ) -> Migration:
        e, c = self.engine, self.engine.config
        assert e.store is not None
        return Migration(
            rec,
            col,
            comp,
            (col.home, new),
            fns,
            e.store,
            e.metrics,
            batch=c.forward_batch,
            pause=c.forward_pause_seconds,
        )

    @staticmethod
    def _moments(rec: TransformRecord, d: int) -> tuple[np.ndarray, np.ndarray, float] | None:
        """The forward map's gallery-side correction from its fit (``transforms.fit.doc_moments``), if any."""
        fit = rec.report.get("fit")
        m = fit.get("doc_moments") if isinstance(fit, dict) else None
        if not isinstance(m, dict):
            return None
        mf, mn = np.asarray(m["mapped_mean"], np.float64), np.asarray(m["target_mean"], np.float64)
        if mf.shape != (d,) or mn.shape != (d,) or not np.isfinite(float(m["ratio"])):
            return None
        return mf, mn, float(m["ratio"])

    def _set_phase(self, name: str, phase: str) -> None:
        for p in PHASES:
            self.engine.metrics.migration_phase.labels(name, p).set(1.0 if p == phase else 0.0)

    # -- start -----------------------------------------------------------------------------------

    def start(self, collection: str, new_space: str, transform: str, reverse: str, strategy: str) -> MigrationBase:
        e = self.engine
        any_col = e.collection(collection)
        new = e.get_space(new_space)
        if strategy not in STRATEGIES:
            raise InvalidArgument(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
        if new.name == any_col.home.name:
            raise InvalidArgument(f"new_space {new_space!r} is already the home space of collection {collection!r}")
        if isinstance(any_col, MilvusCollection):
            return self._start_milvus(any_col, new, transform, reverse, strategy)
        col, old = any_col, any_col.home
        with self.lock, e._ddl_lock:
            if col.failure is not None:
                raise FailedPrecondition(f"collection {collection!r} failed: {col.failure.reason}")
            fn, rfn, calibration = self._checked_start(col, new, transform, reverse, strategy)
            spec = dataclasses.replace(col.row.spec, name=f"{COMPANION_PREFIX}{col.row.cid}", home_space=new.name)
            spec = spec.checked(new, e.limits)  # (_checked_start has checked that it fits)
            store = e._ready()
            row = store.add_collection(spec)
            comp = Collection(row, new, store, e._folder(row.cid), e.metrics, device=e.device)
            comp.recover()
            rec = MigrationRecord(
                collection, col.row.cid, row.cid, old.name, new.name, transform, reverse, strategy, "backfill",
                time.time(), calibration=calibration.to_dict(),
            )  # fmt: skip
            store.put_migration(col.row.cid, rec.to_dict())
            mig = self._new(rec, col, comp, new, (fn, rfn, None))
            with mig.lock:
                mig.reconcile()  # new-space vectors stored before the migration are backfilled already
            self.companions[row.cid] = comp
            self.active[collection] = mig
        self._set_phase(collection, "backfill")
        mig.publish()
        return mig

    def _checked_start(
        self, col: Collection | MilvusCollection, new: SpaceRow, transform: str, reverse: str, strategy: str
    ) -> tuple[Transform, Transform | None, ScoreCalibration]:
        """The checks every backend's start shares (the caller holds the locks): the collection, the
        transforms, the spec in the new space; returns (fn, reverse fn, calibration)."""
        e, collection, old = self.engine, col.name, col.home
        if col.row.spec.prefix_dims or col.row.spec.basis_transform:  # (a milvus prefix field holds the index)
            raise FailedPrecondition(
                f"collection {collection!r} has a prefix_dims or basis_transform index; migrations support "
                "collections that index their home vectors as they are"
            )
        if collection in e.moving or e.collections.get(collection) is not col:
            raise FailedPrecondition(
                f"collection {collection!r} is being moved to another backend (or was just moved); retry after it"
            )
        if collection in self.active:
            m = self.active[collection]
            raise FailedPrecondition(
                f"collection {collection!r} is already migrating to {m.new.name!r} (phase {m.phase}, coverage "
                f"{100 * m.coverage():.1f}%); finish or abort it first"
            )
        fn, trec = self._ready(transform, new, old, "transform")
        rfn = self._ready(reverse, old, new, "reverse_transform")[0] if reverse else None
        try:
            dataclasses.replace(col.row.spec, home_space=new.name).checked(new, e.limits)
        except InvalidArgument as err:
            raise InvalidArgument(f"the collection's index spec does not fit space {new.name!r}: {err}") from None
        fit = trec.report.get("fit")
        cal = (fit if isinstance(fit, dict) else {}).get("score_calibration", trec.report.get("score_calibration"))
        calibration = (
            ScoreCalibration.from_dict({**cal, "source": f"transform {transform!r}: {cal.get('source', '')}"})
            if isinstance(cal, dict)
            else dataclasses.replace(IDENTITY, source=f"identity: transform {transform!r} has no score_calibration")
        )
        return fn, rfn, calibration

    def _start_milvus(
        self, col: MilvusCollection, new: SpaceRow, transform: str, reverse: str, strategy: str
    ) -> MigrationBase:
        """StartMigration on a ``milvus`` collection: the new space's vector field is the new side
        (``backends/milvus_migration.py``); refused before anything changes when it has none."""
        e, collection, old = self.engine, col.name, col.home
        with self.lock, e._ddl_lock:
            fn, rfn, calibration = self._checked_start(col, new, transform, reverse, strategy)
            milvus_migration.require_field(col, new)
            rec = MigrationRecord(
                collection, col.row.cid, 0, old.name, new.name, transform, reverse, strategy, "backfill",
                time.time(), calibration=calibration.to_dict(),
            )  # fmt: skip
            mig = MilvusMigration(rec, col, (old, new), (fn, rfn, None), e._ready(), e.metrics)
            mig.field_index()  # the engine answers (UNAVAILABLE otherwise) before the record is written
            mig.points()
            if e.shared is not None:  # the other front-ends follow it (``follow.py``); first one wins
                e.shared.commit_migration(collection, rec)
            e._ready().put_migration(col.row.cid, rec.to_dict())
            self.active[collection] = mig
        self._set_phase(collection, "backfill")
        mig.publish()
        return mig

    # -- phase changes ---------------------------------------------------------------------------

    def cutover(self, collection: str, force: bool) -> MigrationBase:
        mig = self.require(collection)
        shared = self.engine.shared if isinstance(mig, MilvusMigration) else None
        if isinstance(mig, MilvusMigration) and shared is not None:  # others write too: count in the engine
            with mig.col.lock:
                mig.col.forget_counts()
        with mig.lock:
            if mig.phase != "backfill":
                raise FailedPrecondition(f"collection {collection!r} is in phase {mig.phase}, not backfill")
            n, real = mig.points(), mig.backfilled()
            if real < n:
                figure = f"coverage is {100 * mig.coverage():.2f}% ({real} of {n} points backfilled"
                if not force:
                    raise FailedPrecondition(f"{figure}); cutover needs 100% or force")
                if mig.engine_side:
                    raise FailedPrecondition(
                        f"{figure}); collection {collection!r} is on the milvus backend, which has no forward "
                        "upgrade to project the other points: a forced cutover needs every point backfilled"
                    )
                if not mig.complete():
                    raise FailedPrecondition(
                        f"{figure}, {len(mig.projected)} projected); a forced cutover needs every other point "
                        "projected: run ForwardUpgrade first"
                    )
            if isinstance(mig, MilvusMigration):
                self._switch(mig)  # the new field gets the collection's index (no write runs: the lock)
            mig.stop.set()  # the forward thread sees it under the lock and ends; joined below
            forward = dict(mig.rec.forward)
            if forward.get("state") == "running":
                forward["state"] = "done" if mig.complete() else "cancelled"
            rec = dataclasses.replace(
                mig.rec, phase="cutover", cutover_at=time.time(), forced=real < n, forward=forward
            )
            if shared is not None:
                shared.commit_migration(collection, rec)
            mig.store.put_migration(rec.cid, rec.to_dict())  # durable first, then the one swap
            mig.rec = rec
        mig.stop_forward()
        self._set_phase(collection, "cutover")
        return mig

    def rollback(self, collection: str) -> MigrationBase:
        mig = self.require(collection)
        with mig.lock:
            if mig.phase != "cutover":
                raise FailedPrecondition(
                    f"collection {collection!r} is in phase {mig.phase}; only a cutover rolls back"
                )
            rec = dataclasses.replace(mig.rec, phase="backfill", cutover_at=0.0, forced=False)
            if isinstance(mig, MilvusMigration) and self.engine.shared is not None:
                self.engine.shared.commit_migration(collection, rec)
            mig.store.put_migration(rec.cid, rec.to_dict())
            mig.rec = rec
        self._set_phase(collection, "backfill")
        return mig

    def abort(self, collection: str) -> MigrationBase:
        mig = self.require(collection)
        e = self.engine
        with self.lock:
            mig.stop_forward("cancelled")
            with mig.lock:
                if isinstance(mig, MilvusMigration) and e.shared is not None:
                    e.shared.commit_migration(collection, None)
                e._ready().delete_migration(mig.rec.cid)  # durable first: a leftover companion is dropped at start
                mig.rec = dataclasses.replace(mig.rec, phase="aborted")
                del self.active[collection]
                if isinstance(mig, Migration):  # milvus: the backfilled vectors stay in the field, as stored
                    self.companions.pop(mig.companion.row.cid, None)
                    mig.companion.drop()
        self._set_phase(collection, "aborted")
        return mig

    def finish(self, collection: str) -> MigrationBase:
        mig = self.require(collection)
        if isinstance(mig, MilvusMigration):
            return self._finish_milvus(mig)
        assert isinstance(mig, Migration)
        e = self.engine
        col, comp = mig.col, mig.companion
        with self.lock, e._ddl_lock, mig.lock:
            if mig.phase != "cutover":
                raise FailedPrecondition(
                    f"collection {collection!r} is in phase {mig.phase}; FinishMigration needs a cutover first"
                )
            with comp.maint_lock, col.maint_lock, comp.lock, col.lock:
                store = e._ready()
                (col.folder / checkpoint.FILENAME).unlink(missing_ok=True)  # the old index's: never loaded again
                store.finish_migration(col.row.cid, comp.row.cid, mig.old.name, mig.new.name, mig.rec.reverse_transform)
                src = comp.folder / checkpoint.FILENAME
                if src.exists():
                    col.folder.mkdir(parents=True, exist_ok=True)
                    os.replace(src, col.folder / checkpoint.FILENAME)
                    checkpoint.fsync_dir(col.folder)
                col.retired = f"collection {collection!r} was reopened with home space {mig.new.name!r}; retry"
                comp.retired = col.retired
                comp.dropped = True
            shutil.rmtree(comp.folder, ignore_errors=True)
            row = store.collection(collection)
            assert row is not None
            fresh = Collection(row, mig.new, store, col.folder, e.metrics, device=e.device)
            fresh.recover(e.config.compact_dead_fraction, e.config.compact_min_dead)
            e.collections[collection] = fresh
            assert e.routes is not None
            e.routes.load({collection: fresh})
            del self.active[collection]
            self.companions.pop(comp.row.cid, None)
            mig.rec = dataclasses.replace(mig.rec, phase="finished")
        self._set_phase(collection, "finished")
        e.metrics.migration_coverage.remove(collection, mig.old.name)
        return mig

    def _finish_milvus(self, mig: MilvusMigration) -> MigrationBase:
        """FinishMigration of a ``milvus`` collection: the new space becomes home in one store transaction
        (the switch point), the collection is reopened with it, then the old vectors are dropped from the
        rows (a crash before that leaves them as vectors of another space: nothing is lost or wrong)."""
        e, col, collection = self.engine, mig.col, mig.rec.collection
        with self.lock, e._ddl_lock, mig.lock:
            if mig.phase != "cutover":
                raise FailedPrecondition(
                    f"collection {collection!r} is in phase {mig.phase}; FinishMigration needs a cutover first"
                )
            e._ready()
            npoints, counts = col.counted()
            with mig.gate.exclusive(), col.lock:
                if e.shared is not None:  # record, spec and route table in one transaction (``shared.py``)
                    e.shared.commit_finish(col, mig.new.name, mig.rec.reverse_transform)
                fresh = self.reopen_milvus(col, mig.new, mig.rec.reverse_transform)
                del self.active[collection]
                mig.rec = dataclasses.replace(mig.rec, phase="finished")
            with fresh.lock, fresh.writing():  # (shared: the other front-ends count the collection again after it)
                try:
                    n = mig.drop_old_vectors(fresh)
                except BaseException:
                    fresh.forget_counts()  # some rows may keep their old vector: counted again when needed
                    raise
                fresh.counts = {s: c for s, c in counts.items() if s != mig.old.name}
                fresh.npoints = npoints
            log.info("finished the migration of %s: dropped %d old vectors", collection, n)
        self._set_phase(collection, "finished")
        e.metrics.migration_coverage.remove(collection, mig.old.name)
        return mig

    def reopen_milvus(self, col: MilvusCollection, new: SpaceRow, reverse: str) -> MilvusCollection:
        """``col`` reopened with home space ``new``, by FinishMigration here or followed from another front-end
        of a shared registry (``follow.adopt_finish``): the row rehomed in one store transaction (the routes
        into the old home end; ``reverse``, if any, becomes the route from it), the new collection swapped
        in, its routes loaded. The caller holds :attr:`lock`, the engine's DDL lock and ``col.lock``."""
        e, store = self.engine, self.engine.store
        assert store is not None and e.routes is not None
        store.rehome_collection(col.row.cid, col.home.name, new.name, reverse)
        row = store.collection(col.name)
        assert row is not None
        fresh = MilvusCollection(row, new, e.spaces, store, e.milvus, e.metrics)
        fresh.same_schema(col)  # (not read yet: read from the engine when used)
        if e.shared is not None:
            e.shared.hook(fresh)
        col.retired = f"collection {col.name!r} was reopened with home space {new.name!r}; retry"
        e.collections[col.name] = fresh
        e.routes.load({col.name: fresh})
        return fresh

    def _switch(self, mig: MilvusMigration) -> None:
        """:meth:`MilvusMigration.switch_index`, announced to the other front-ends of a shared registry
        first (they hold their requests of the collection meanwhile, ``follow_switch``) and after."""
        shared = self.engine.shared
        if shared is None or mig.field_index() == mig.col.index:
            mig.switch_index()
            return
        name = mig.rec.collection
        shared.commit_migration(name, mig.rec, switching=True)
        try:
            mig.switch_index()
        finally:
            shared.commit_migration(name, mig.rec, switching=False)

    # -- forward upgrade and advice ----------------------------------------------------------------

    def forward_upgrade(self, collection: str, transform: str) -> MigrationBase:
        mig = self.require(collection)
        if not isinstance(mig, Migration):
            raise FailedPrecondition(
                f"collection {collection!r} is on the milvus backend, which does not support forward upgrades yet"
                " (a projected vector would need a marker beside the new field's vectors); backfill every point,"
                " then cut over"
            )
        fn, frec = self._ready(transform, mig.old, mig.new, "transform")
        with mig.lock:
            if mig.phase != "backfill":
                raise FailedPrecondition(
                    f"collection {collection!r} is in phase {mig.phase}; forward upgrades run in backfill"
                )
            if mig.rec.forward.get("state") == "running":
                raise FailedPrecondition(
                    f"a forward upgrade of {collection!r} with {mig.rec.forward['transform']!r} is running "
                    f"({mig.rec.forward['done']} of {mig.rec.forward['total']} points)"
                )
            total = mig.old_vectors()
            mig.rec.forward = dict(state="running", transform=transform, cursor="", done=0, total=total, error="")
            mig.forward, mig.moments = fn, self._moments(frec, mig.new.dim)
            mig.rec.forward["corrected"] = mig.moments is not None
            mig.save()
        mig.start_forward()
        return mig

    def _old_vectors(
        self, col: Collection | MilvusCollection, old: SpaceRow, mig: MigrationBase | None
    ) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
        """(ids, x, keep) SUGGEST_READ_STEP at a time: the collection's old-space vectors, keep False for the
        backfilled points (the milvus backend leaves them out in the engine's query)."""
        if isinstance(col, MilvusCollection):
            mm = mig if isinstance(mig, MilvusMigration) else None
            with mm.reading() if mm is not None else contextlib.nullcontext():
                for ids, x in milvus_migration.old_vectors(col, old, mm, SUGGEST_READ_STEP):
                    yield ids, x, np.ones(len(ids), dtype=bool)
            return
        store, cursor = self.engine._ready(), ""
        while True:
            step, x = store.vectors_after(col.row.cid, old.name, cursor, SUGGEST_READ_STEP, old.dim)
            if not step:
                return
            cursor = step[-1]
            real = mig.is_real if isinstance(mig, Migration) else None
            yield step, x, np.array([real is None or not real(p) for p in step], dtype=bool)

    def suggest(self, collection: str, n: int) -> tuple[list[str], np.ndarray]:
        col = self.engine.collection(collection)
        if not 1 <= n <= self.engine.limits.max_batch:
            raise InvalidArgument(f"n is {n}; it must be in [1, {self.engine.limits.max_batch}]")
        mig = self.active.get(collection)
        old = mig.old if mig is not None else col.home
        # read in steps, keeping at most SUGGEST_MAX_CANDIDATES (a seeded sample past that): a request never
        # holds a whole large gallery in memory at once
        rate = min(1.0, SUGGEST_MAX_CANDIDATES / max(col.num_points(), 1))
        rng = np.random.default_rng(0)
        ids: list[str] = []
        parts: list[np.ndarray] = []
        for step, x, keep in self._old_vectors(col, old, mig):
            if rate < 1.0:
                keep &= rng.random(len(step)) < rate
            rows = np.flatnonzero(keep)
            ids.extend(step[i] for i in rows.tolist())
            parts.append(x[rows])
        if not ids:
            return [], np.zeros(0, np.float32)
        xb = np.ascontiguousarray(np.vstack(parts), dtype=np.float32)
        order, scores = backfill_order(xb, n, metric=old.metric)
        return [ids[int(r)] for r in order], np.asarray(scores, np.float32)

    # -- start-up and shutdown ---------------------------------------------------------------------

    def load(self, companions: dict[int, Collection]) -> None:
        """Loads every stored migration (module docstring); ``companions`` by cid, recovered already."""
        e = self.engine
        store = e.store
        assert store is not None
        self.companions = dict(companions)
        by_cid = {c.row.cid: c for c in e.collections.values()}
        records = store.migrations()
        for cid, d in records.items():
            rec = MigrationRecord.from_dict(d)
            col, comp = by_cid.get(cid), self.companions.get(rec.companion_cid)
            try:
                if col is None or (comp is None and not isinstance(col, MilvusCollection)):
                    raise RuntimeError("its collection or companion index is missing")
                assert e.compat is not None
                fn = e.compat.get(rec.transform).fn
                rfn = e.compat.get(rec.reverse_transform).fn if rec.reverse_transform else None
                fw = rec.forward.get("transform", "")
                frec = e.compat.get(fw) if fw else None
                ffn = frec.fn if frec is not None else None
                if fn is None:
                    raise RuntimeError(f"transform {rec.transform!r} is not loaded")
                new = e.spaces[rec.new_space]
                mig: MigrationBase
                if isinstance(col, MilvusCollection):  # the engine is reached on first use, as the collection's
                    mig = MilvusMigration(rec, col, (col.home, new), (fn, rfn, None), store, e.metrics)
                else:
                    assert comp is not None
                    mig = self._new(rec, col, comp, new, (fn, rfn, ffn))
                if frec is not None:
                    mig.moments = self._moments(frec, mig.new.dim)
                with mig.lock:
                    dropped, copied = mig.reconcile()
                log.info(
                    "migration of %s resumed (%s; repaired: %d dropped, %d copied)", cid, rec.phase, dropped, copied
                )
                self.active[rec.collection] = mig
                self._set_phase(rec.collection, rec.phase)
                if isinstance(mig, Migration):
                    if rec.forward.get("state") == "running" and ffn is not None and rec.phase == "backfill":
                        mig.start_forward()
                    mig.publish()  # a milvus migration publishes at its first write (its counts need the engine)
            except Exception:
                log.exception("migration of collection %s cannot be resumed; it is left stored", rec.collection)
        known = {int(d["companion_cid"]) for d in records.values()}
        for cid, comp in list(self.companions.items()):
            if cid not in known:  # a crash inside StartMigration or AbortMigration
                log.warning("dropping %s: no migration record", comp.name)
                comp.drop()
                del self.companions[cid]

    def close(self) -> None:
        for mig in list(self.active.values()):
            mig.stop_forward()
