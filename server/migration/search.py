"""Searches of a migrating collection: which index answers which query space in which phase.

============  ==========================================  ===============================================
query space   backfill                                    cutover
============  ==========================================  ===============================================
new           two_indexes: backfilled points natively in   the companion (new space) natively
              the companion, the rest through ``fn`` in
              the old index, old scores calibrated, merged;
              shared_index once every point has a new
              vector (real or projected): the companion
old           the old index natively                       ``reverse`` into the companion (the old index
                                                           natively when there is none)
other         the collection's own routes, as before       the same
============  ==========================================  ===============================================

A reply reads the phase once, so it is served wholly before or wholly after a cutover. The two
lists of ``two_indexes`` are over-fetched until each has ``k`` points of its own kind (backfilled
in the companion, not backfilled in the old index), then merged by :func:`~.calibration.merge_topk`.
A migrating ``milvus`` collection is searched by ``backends/milvus_migration_search.py`` with the same table (its
new-space vectors are a second vector field of the same Milvus collection). Covered by
``tests/test_migration.py`` and ``tests/test_migration_milvus.py`` against a numpy reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backends.milvus_migration_search import search as milvus_search
from ..pipeline import Hits, Query, SearchParams, prepare, run
from ..routes import IDENTITY, Route
from .calibration import merge_topk
from .runtime import Migration, MigrationBase

if TYPE_CHECKING:
    from ..config import Limits
    from ..device import Device
    from ..store import SpaceRow

__all__ = ["MAX_FETCH", "search"]

MAX_FETCH = 16384  #: most candidates one side of a two-index search asks its index for


def search(
    mig: MigrationBase, space: SpaceRow, data: bytes, dim: int, params: SearchParams, limits: Limits, device: Device
) -> tuple[Hits, Route]:
    """The hits of one search on a migrating collection (module docstring) and the route that served it."""
    if not isinstance(mig, Migration):  # the new space's vector field of the same Milvus collection
        return milvus_search(mig, space, data, dim, params, limits, device)
    col, comp, phase = mig.col, mig.companion, mig.phase
    if space.name == mig.new.name:
        native = Route(space.name, space.name, IDENTITY)
        if (
            phase == "cutover"
            or (mig.rec.strategy == "shared_index" and mig.complete())
            or (mig.points() and mig.backfilled() >= mig.points())
        ):
            return run(prepare(comp, space, data, dim, params, limits, native), None, device), native
        via = Route(space.name, mig.old.name, mig.rec.transform, mig.fn)
        q = prepare(col, space, data, dim, params, limits, via)
        return _two_indexes(mig, q, device), via
    if space.name == mig.old.name and phase == "cutover" and mig.reverse is not None:
        via = Route(space.name, mig.new.name, mig.rec.reverse_transform, mig.reverse)
        return run(prepare(comp, space, data, dim, params, limits, via), mig.reverse, device), via
    q = prepare(col, space, data, dim, params, limits)
    return run(q, q.route.fn, device), q.route


def _two_indexes(mig: Migration, q: Query, device: Device) -> Hits:
    """Backfilled points natively in the companion, the rest through the transform in the old index."""
    k, n = q.params.k, mig.points()
    n_real = mig.backfilled()
    cal = mig.calibration
    depth = min(cal.depth if cal.level else 0, n)  # the calibration reads each query's old top-depth scores
    if n_real == 0:  # nothing backfilled: the old index alone, on the new scale
        wide = dataclasses.replace(q, params=dataclasses.replace(q.params, k=max(k, depth)))
        hits = run(wide, mig.fn, device)
        return dataclasses.replace(hits, D=cal.apply(hits.D)[:, :k], ids=hits.ids[:, :k])
    mig.companion.check_search(q.params.ef_search, q.params.nprobe, q.params.k_factor)
    # not backfilled, through the transform in the old index
    old, I_old = _fetch(q, mig.fn, device, k, n, n - n_real, lambda p: not mig.is_real(p), depth)
    # backfilled, natively in the companion (projections are scored through the old index instead)
    qb = dataclasses.replace(q, col=mig.companion, route=Route(q.space.name, q.space.name, IDENTITY))
    new, I_new = _fetch(qb, None, device, k, len(mig.companion.pids), n_real, mig.is_real)
    D, I = merge_topk(cal.apply(old.D), I_old, new.D, I_new, k, higher_is_better=mig.new.metric != "l2")
    return Hits(
        D,
        I,
        old.snapshot,
        old.map_seconds,
        old.transform_seconds,
        old.index_seconds + new.index_seconds + new.transform_seconds,
    )


def _fetch(
    q: Query, fn: Any, device: Device, k: int, ntotal: int, nkind: int, keep: Callable[[str], bool], least: int = 0
) -> tuple[Hits, np.ndarray]:
    """Searches q's collection for k hits that ``keep`` accepts (``nkind`` of its ``ntotal`` points do),
    asking for more candidates (at least ``least``) until each row has k of them or the index has no
    more. Returns the last hits and their ids I with the others blanked ('' ids; the hits' D keeps
    every score, so the calibration reads the whole old list's top scores)."""
    want = min(k, nkind)
    fetch = min(ntotal, MAX_FETCH, max(k, least, int(np.ceil(2 * k * ntotal / max(nkind, 1))) + k))
    while True:
        hits = run(dataclasses.replace(q, params=dataclasses.replace(q.params, k=max(fetch, 1))), fn, device)
        flat = hits.ids.ravel()
        mask = np.fromiter((bool(p) and keep(p) for p in flat), dtype=bool, count=len(flat)).reshape(hits.ids.shape)
        if fetch >= min(ntotal, MAX_FETCH) or int(mask.sum(1).min()) >= want:
            break
        fetch = min(ntotal, MAX_FETCH, 4 * fetch)
    return hits, np.where(mask, hits.ids, "")
