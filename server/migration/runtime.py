"""One collection's migration at run time: its record, its writes and its forward upgrade.

A :class:`Migration` joins the collection (``col``: the source of truth for points, payloads and
every vector a client wrote, old and new, as before) and its *companion*, an internal collection
(``~migration:<cid>``) whose home is the new space: it indexes the backfilled vectors and the
forward projections (``projected``). Every write goes through :meth:`Migration.upsert` and
:meth:`Migration.delete`, collection first, companion second, under the migration's lock; a crash
between the two is repaired at load (:meth:`Migration.reconcile`). :class:`MigrationRecord` is
the durable state (one JSON row, ``store_migrations.py``); the phase changes are in
``manager.py``, the searches in ``search.py``. Covered by ``tests/test_migration.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import FailedPrecondition, NotFound
from ..pipeline import check_mapped
from ..store import SpaceRow, Store
from .calibration import ScoreCalibration

if TYPE_CHECKING:
    from ..collection import Collection
    from ..metrics import Metrics
    from ..transforms import Transform

__all__ = ["BATCH", "COMPANION_PREFIX", "PHASES", "STRATEGIES", "Migration", "MigrationBase", "MigrationRecord"]

log = logging.getLogger(__name__)

COMPANION_PREFIX = "~migration:"  #: companion collection names: never a valid user collection name
#: every phase; the first two are durable (a record), finished and aborted remove the record
PHASES = ("backfill", "cutover", "finished", "aborted")
STRATEGIES = ("two_indexes", "shared_index")
BATCH = 1024  #: vectors per forward-upgrade step (one store transaction each)


@dataclass
class MigrationRecord:
    """A migration's durable state: what ``migrations.record`` holds (JSON)."""

    collection: str
    cid: int
    companion_cid: int
    old_space: str
    new_space: str
    transform: str  #: new -> old, for new-space queries on points not backfilled
    reverse_transform: str  #: old -> new, for old-space queries after the cutover ("" none)
    strategy: str
    phase: str
    started_at: float
    cutover_at: float = 0.0
    forced: bool = False
    calibration: dict[str, Any] = field(default_factory=dict)
    #: state ("" | running | done | failed | cancelled), transform, cursor (last id done), done, total, error
    forward: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MigrationRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class MigrationBase:
    """What a running migration is on either backend: its record, spaces, transforms, calibration, lock and
    forward-upgrade state. :class:`Migration` is the embedded one (a companion collection);
    ``backends/milvus_migration.py``'s ``MilvusMigration`` backfills into the new space's vector field of the
    same Milvus collection. ``fn``: new -> old (queries), ``reverse``: old -> new (queries, after the cutover),
    ``forward``: old -> new (gallery vectors), each a Transform or None."""

    engine_side = False  #: True when the Milvus engine holds the new-space vectors (no companion)

    def __init__(
        self,
        rec: MigrationRecord,
        spaces: tuple[SpaceRow, SpaceRow],
        fns: tuple[Transform, Transform | None, Transform | None],
        store: Store,
        metrics: Metrics,
    ) -> None:
        self.rec = rec
        self.old, self.new = spaces
        self.fn, self.reverse, self.forward = fns
        self.store = store
        self.metrics = metrics
        self.calibration = ScoreCalibration.from_dict(rec.calibration)
        self.lock = threading.RLock()  #: writes, forward steps and phase changes
        self.projected: set[str] = set()  #: ids whose new-space vector is a forward projection
        self.stop = threading.Event()  #: ends the forward-upgrade thread
        self.thread: threading.Thread | None = None
        #: the forward map's gallery-side correction (mapped mean, target mean, ratio) from its fit
        #: (``transforms.fit.doc_moments``), or None
        self.moments: tuple[np.ndarray, np.ndarray, float] | None = None

    # -- state -----------------------------------------------------------------------------------

    @property
    def phase(self) -> str:
        return self.rec.phase

    def points(self) -> int:
        raise NotImplementedError

    def backfilled(self) -> int:
        """Points with a new-space vector a client wrote."""
        raise NotImplementedError

    def old_vectors(self) -> int:
        """Points with an old-space vector."""
        raise NotImplementedError

    def complete(self) -> bool:
        """Every point has a new-space vector, real or projected (the new side alone can serve)."""
        raise NotImplementedError

    def coverage(self) -> float:
        n = self.points()
        return 1.0 if n == 0 else min(1.0, self.backfilled() / n)

    def save(self) -> None:
        self.store.put_migration(self.rec.cid, self.rec.to_dict())

    def reading(self) -> AbstractContextManager[object]:
        """Held by searches and reads by id of the collection (nothing to wait for on the embedded backend)."""
        return contextlib.nullcontext()

    def publish(self) -> None:
        """Exports coverage and forward progress (the phase gauge is set by the manager)."""
        m, name = self.metrics, self.rec.collection
        m.migration_coverage.labels(name, self.new.name).set(self.coverage())
        n = self.points()
        m.migration_coverage.labels(name, self.old.name).set(1.0 if n == 0 else min(1.0, self.old_vectors() / n))
        fw = self.rec.forward
        total = int(fw.get("total", 0))
        m.migration_forward_progress.labels(name).set(1.0 if not total else min(1.0, int(fw.get("done", 0)) / total))

    # -- writes (the caller validated and normalized x) ------------------------------------------

    def upsert(self, space: SpaceRow, ids: list[str], x: np.ndarray, payloads: Sequence[str | None]) -> int:
        raise NotImplementedError

    def not_backfillable(self, missing: Sequence[str]) -> NotFound:
        """The error of a backfill upsert naming ids the collection does not have (either backend)."""
        return NotFound(
            f"{len(missing)} id(s) not in collection {self.rec.collection!r} (backfill upserts "
            f"new-space vectors of existing points until the cutover): " + ", ".join(map(repr, missing[:5]))
        )

    def cut_over_refusal(self, missing: Sequence[str]) -> FailedPrecondition:
        """The error of an old-space upsert after the cutover naming ids without a new vector (either backend)."""
        return FailedPrecondition(
            f"collection {self.rec.collection!r} is cut over to {self.new.name!r}: new points are "
            f"upserted in {self.new.name!r} (old-space vectors only update points it has); "
            f"{len(missing)} id(s) without one: {', '.join(map(repr, missing[:5]))}"
        )

    def delete(self, ids: list[str], missing_ok: bool) -> tuple[int, int]:
        raise NotImplementedError

    def reconcile(self) -> tuple[int, int]:
        """Repairs what a crash between a write's steps left (returns (dropped, copied)); nothing by default."""
        return 0, 0

    def stop_forward(self, state: str = "") -> None:
        """Stops the forward thread and waits for it (never call it holding :attr:`lock`: the thread
        takes it); ``state`` (e.g. "cancelled") is recorded if it was running."""
        self.stop.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()
        self.thread = None
        if state and self.rec.forward.get("state") == "running":
            self.rec.forward["state"] = state


class Migration(MigrationBase):
    """A running migration of an embedded collection (module docstring)."""

    def __init__(
        self,
        rec: MigrationRecord,
        col: Collection,
        companion: Collection,
        spaces: tuple[SpaceRow, SpaceRow],
        fns: tuple[Transform, Transform | None, Transform | None],
        store: Store,
        metrics: Metrics,
        *,
        batch: int = BATCH,
        pause: float = 0.0,
    ) -> None:
        super().__init__(rec, spaces, fns, store, metrics)
        self.col, self.companion = col, companion
        self.projected = store.projected_ids(companion.row.cid, self.new.name)
        self.batch, self.pause = batch, pause  #: forward-upgrade step size and the pause between steps

    # -- state -----------------------------------------------------------------------------------

    def points(self) -> int:
        return len(self.col.pids)

    def backfilled(self) -> int:
        """Points with a new-space vector a client wrote."""
        return len(self.companion.pids) - len(self.projected)

    def old_vectors(self) -> int:
        return int(self.col.counts.get(self.old.name, 0))

    def is_real(self, pid: str) -> bool:
        return pid in self.companion.pids and pid not in self.projected

    def complete(self) -> bool:
        """Every point has a new-space vector, real or projected (the companion alone can serve)."""
        return len(self.companion.pids) >= len(self.col.pids)  # the companion's ids are the collection's

    # -- writes (the caller validated and normalized x) ------------------------------------------

    def upsert(self, space: SpaceRow, ids: list[str], x: np.ndarray, payloads: Sequence[str | None]) -> int:
        """Upserts vectors of the old or the new space; other spaces go to the collection as before."""
        with self.lock:
            if space.name == self.new.name:
                if self.phase == "backfill":
                    missing = [p for p in ids if p not in self.col.pids]
                    if missing:
                        raise self.not_backfillable(missing)
                self.companion.indexable(x)  # what the companion's index cannot hold: refused before any write
                seq = self.col.upsert(space, ids, x, payloads)  # the source of truth, as before the migration
                self.companion.upsert(space, ids, x, [None] * len(ids))
                self.projected.difference_update(ids)
            elif space.name == self.old.name:
                if self.phase == "cutover":
                    missing = [p for p in ids if p not in self.companion.pids]
                    if missing:
                        raise self.cut_over_refusal(missing)
                projecting = self.forward is not None and self.rec.forward.get("state") in ("running", "done")
                y = None
                if self.phase == "backfill" and projecting:  # the projections, checked before any write
                    y = self.project(x)
                    self.companion.indexable(y)
                seq = self.col.upsert(space, ids, x, payloads)
                if y is not None:
                    self._project(ids, x, y)  # keep the projections of points not backfilled current
            else:
                seq = self.col.upsert(space, ids, x, payloads)
        self.publish()
        return seq

    def delete(self, ids: list[str], missing_ok: bool) -> tuple[int, int]:
        with self.lock:
            out = self.col.delete(ids, missing_ok)
            self.companion.delete(ids, True)
            self.projected.difference_update(ids)
        self.publish()
        return out

    def _project(self, ids: list[str], x: np.ndarray, y: np.ndarray | None = None) -> int:
        """Writes F(x) (``y`` when given) as projections for the ids that have no real new-space vector
        (under the lock)."""
        assert self.forward is not None
        keep = [i for i, p in enumerate(ids) if p in self.col.pids and not self.is_real(p)]
        if not keep:
            return 0
        kept = [ids[i] for i in keep]
        fx = self.project(x[keep]) if y is None else y[keep]
        self.companion.upsert(self.new, kept, fx, [None] * len(kept), projected=True)
        self.projected.update(kept)
        return len(kept)

    def project(self, x: np.ndarray) -> np.ndarray:
        """F(x) (n, d_new) of old vectors x (n, d_old): the forward map's doc side, unit rows for a cosine
        space, moved onto the new docs' mean and spread when the map's fit measured them (``moments``)."""
        assert self.forward is not None
        cosine = self.new.metric == "cosine"

        def unit(y: np.ndarray) -> np.ndarray:
            return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12) if cosine else y

        with np.errstate(invalid="ignore", over="ignore"):  # (a map that overflows: check_mapped says so)
            y = unit(np.asarray(self.forward.apply(np.ascontiguousarray(x, dtype=np.float32), "doc"), np.float64))
            if self.moments is not None:
                mf, mn, ratio = self.moments
                y = unit((y - mf) * ratio + mn)
            y = np.ascontiguousarray(y, dtype=np.float32)
        check_mapped(y, f"the forward transform {self.rec.forward.get('transform', '')!r}", what="forward projections")
        return y

    # -- recovery --------------------------------------------------------------------------------

    def reconcile(self) -> tuple[int, int]:
        """Repairs the companion after a crash between a write's two steps: drops ids the collection no
        longer has, copies client-written new vectors it lacks. Returns (dropped, copied)."""
        cid, comp = self.col.row.cid, self.companion.row.cid
        gone = self.store.ids_missing_from(comp, cid)
        if gone:
            self.companion.delete(gone, True)
            self.projected.difference_update(gone)
        ids, x = self.store.vectors_to_sync(cid, comp, self.new.name, self.new.dim)
        for i in range(0, len(ids), BATCH):
            chunk = ids[i : i + BATCH]
            self.companion.upsert(self.new, chunk, np.ascontiguousarray(x[i : i + BATCH]), [None] * len(chunk))
            self.projected.difference_update(chunk)
        return len(gone), len(ids)

    # -- forward upgrade -------------------------------------------------------------------------

    def start_forward(self) -> None:
        self.stop.clear()
        self.thread = threading.Thread(target=self._forward_loop, name=f"forward-{self.rec.collection}", daemon=True)
        self.thread.start()

    def _forward_loop(self) -> None:
        fw = self.rec.forward
        try:
            while not self.stop.wait(self.pause):
                ids, x = self.store.vectors_after(
                    self.col.row.cid, self.old.name, fw["cursor"], self.batch, self.old.dim
                )
                if not ids:
                    break
                with self.lock:
                    if self.stop.is_set() or self.phase != "backfill":
                        return
                    self._project(ids, x)
                    fw["cursor"], fw["done"] = ids[-1], min(int(fw["done"]) + len(ids), int(fw["total"]))
                    self.save()
                self.publish()
            else:
                return
            with self.lock:
                fw["state"], fw["done"] = "done", fw["total"]
                self.save()
        except Exception as e:  # a failed projection never takes the service down; the state says why
            log.exception("forward upgrade of %s failed", self.rec.collection)
            with self.lock:
                fw["state"], fw["error"] = "failed", f"{type(e).__name__}: {e}"[:300]
                try:
                    self.save()
                except Exception:
                    log.exception("could not record the failed forward upgrade of %s", self.rec.collection)
        self.publish()
