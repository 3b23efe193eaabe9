"""A milvus collection's migration as another front-end of a shared registry runs it (``shared.py``).

The front-end that receives StartMigration, CutoverMigration, RollbackMigration, AbortMigration or
FinishMigration (the *leader* of that request, ``manager.py``) writes the migration's record to the
registry with a compare-and-swap, then changes its own state. Every other front-end applies the record
from its watch with the functions here: :func:`adopt` builds or updates its
:class:`~..backends.milvus_migration.MilvusMigration` (the points, backfill included, are the engine's,
so searches and writes on any front-end see the same migration), follows an index switch (its
requests wait while the leader's cutover rebuilds the new field's index), :func:`forget` ends an
aborted one, and :func:`adopt_finish` reopens the collection with the new home as the leader's
FinishMigration did (the old vectors were dropped by the leader). Covered by
``tests/test_shared_registry.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import TYPE_CHECKING

from ..backends.milvus import MilvusCollection
from ..backends.milvus_migration import MilvusMigration
from ..errors import Unavailable
from .runtime import MigrationRecord

if TYPE_CHECKING:
    from .manager import Migrations

__all__ = ["adopt", "adopt_finish", "forget"]

log = logging.getLogger(__name__)


def adopt(migs: Migrations, name: str, rec: MigrationRecord, switching: bool) -> None:
    """Makes ``rec`` (another front-end's) this front-end's migration of collection ``name``."""
    e = migs.engine
    col = e.collections.get(name)
    if not isinstance(col, MilvusCollection) or e.store is None or e.compat is None:
        return
    rec = dataclasses.replace(rec, cid=col.row.cid, companion_cid=0)
    with migs.lock:
        mig = migs.active.get(name)
        if mig is None:
            fns = []
            for t in (rec.transform, rec.reverse_transform):
                tr = e.compat.transforms.get(t) if t else None
                if t and (tr is None or tr.fn is None):
                    raise Unavailable(f"transform {t!r} of the migration of {name!r} is not here yet")
                fns.append(tr.fn if tr is not None else None)
            fn, new = fns[0], e.spaces.get(rec.new_space)
            if fn is None or new is None:
                raise Unavailable(f"space {rec.new_space!r} of the migration of {name!r} is not here yet")
            mig = MilvusMigration(rec, col, (col.home, new), (fn, fns[1], None), e.store, e.metrics)
            migs.active[name] = mig
            log.info("following the migration of %s to %s (%s)", name, rec.new_space, rec.phase)
        elif not isinstance(mig, MilvusMigration):
            return
        e.store.put_migration(col.row.cid, rec.to_dict())
        mig.rec = rec  # one swap: a search reads the phase once
    migs._set_phase(name, rec.phase)
    mig.follow_switch(switching)


def forget(migs: Migrations, name: str) -> None:
    """The migration of ``name`` was aborted on another front-end."""
    e = migs.engine
    with migs.lock:
        mig = migs.active.get(name)
        if not isinstance(mig, MilvusMigration):
            return
        del migs.active[name]
        mig.follow_switch(False)
        if e.store is not None:
            e.store.delete_migration(mig.rec.cid)
        mig.rec = dataclasses.replace(mig.rec, phase="aborted")
    migs._set_phase(name, "aborted")
    log.info("the migration of %s was aborted on another front-end", name)


def adopt_finish(migs: Migrations, name: str, new_space: str) -> MilvusCollection | None:
    """Another front-end finished the migration of ``name``: the collection is reopened here with
    ``new_space`` as home (its routes into the old home end; the reverse transform, if any, becomes the
    route from the old space), as ``Migrations._finish_milvus`` does. Returns the reopened collection."""
    e = migs.engine
    with migs.lock, e._ddl_lock:
        col = e.collections.get(name)
        new = e.spaces.get(new_space)
        if not isinstance(col, MilvusCollection) or new is None or col.home.name == new_space or e.store is None:
            return None
        mig = migs.active.pop(name, None)
        reverse = mig.rec.reverse_transform if mig is not None else ""
        if isinstance(mig, MilvusMigration):
            mig.follow_switch(False)
        with col.lock:
            fresh = migs.reopen_milvus(col, new, reverse)
    migs._set_phase(name, "finished")
    if mig is not None:
        with contextlib.suppress(KeyError):  # (published at this front-end's first write of it, if any)
            e.metrics.migration_coverage.remove(name, mig.old.name)
    log.info("the migration of %s was finished on another front-end: home space %s", name, new_space)
    return fresh
