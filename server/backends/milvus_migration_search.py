"""Searches of a migrating ``milvus`` collection: the table of ``migration/search.py`` over two vector fields.

New-space queries in backfill search the new field among the points that have a new vector and the old
field through ``transform`` among the points with an old vector and no new one (Milvus filters on the
``spaces`` array: no over-fetch), the old scores calibrated with each query's level read from the top
``depth`` of its whole old list (one more search of the old field; the embedded backend reads the same
list), merged by ``merge_topk``; the new field alone once every point is backfilled and after the
cutover. Old-space queries search the old field (the collection's own path), and after the cutover go
through ``reverse_transform`` into the new field. Every search holds the migration's gate (it waits
while the cutover switches the new field's index, ``milvus_migration.py``). Covered by
``tests/test_migration.py`` (against a numpy reference) and ``tests/test_migration_milvus.py``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from ..migration.calibration import merge_topk
from ..pipeline import Hits, SearchParams, map_queries, prepare, run
from ..routes import IDENTITY, Route
from .milvus import MilvusCollection, MilvusView
from .milvus_migration import MilvusMigration
from .milvus_schema import MilvusIndex

if TYPE_CHECKING:
    from ..config import Limits
    from ..device import Device
    from ..migration.runtime import MigrationBase
    from ..store import SpaceRow

__all__ = ["search"]


def _field_search(
    col: MilvusCollection,
    field: str,
    space: SpaceRow,
    index: MilvusIndex,
    xq: np.ndarray,
    p: SearchParams,
    flt: str,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """D (nq, k), ids (nq, k) of ``xq`` (in ``space``) on vector ``field`` among the rows ``flt`` selects,
    padded as the embedded backend pads ('' ids, -inf; +inf for l2). Search parameters the field's index
    does not take (ef_search on a FLAT field) are not sent."""
    nq = len(xq)
    D = np.full((nq, k), -np.inf if space.metric != "l2" else np.inf, dtype=np.float32)
    ids = np.full((nq, k), "", dtype=object)
    sp = index.search_params(space.metric, k, p.ef_search, p.nprobe)
    data = list(np.ascontiguousarray(xq, dtype=np.float32))
    hits = col._call(
        "search",
        lambda c: c.search(
            col.mname, data=data, limit=k, anns_field=field, search_params=sp, filter=flt, output_fields=["id"],
            timeout=col.engines.timeout,
        ),
    )  # fmt: skip
    for i, row in enumerate(hits):
        for j, h in enumerate(row[:k]):
            D[i, j] = h["distance"]
            ids[i, j] = h["id"]
    return D, ids


def _has(field: str) -> str:
    return f'array_contains(spaces, "{field}")'


def search(
    mig: MigrationBase, space: SpaceRow, data: bytes, dim: int, params: SearchParams, limits: Limits, device: Device
) -> tuple[Hits, Route]:
    """The hits of one search on a migrating ``milvus`` collection (module docstring) and its route."""
    assert isinstance(mig, MilvusMigration)
    with mig.reading():
        return _search(mig, space, data, dim, params, limits, device)


def _search(
    mig: MilvusMigration,
    space: SpaceRow,
    data: bytes,
    dim: int,
    params: SearchParams,
    limits: Limits,
    device: Device,
) -> tuple[Hits, Route]:
    col, phase = mig.col, mig.phase
    if space.name == mig.new.name:
        if phase == "cutover" or mig.complete():
            route = Route(space.name, space.name, IDENTITY)
            return _one_field(mig, mig.new, mig.new_field, space, data, dim, params, limits, device, route), route
        via = Route(space.name, mig.old.name, mig.rec.transform, mig.fn)
        return _two_fields(mig, space, data, dim, params, limits, device, via), via
    if space.name == mig.old.name and phase == "cutover" and mig.reverse is not None:
        via = Route(space.name, mig.new.name, mig.rec.reverse_transform, mig.reverse)
        return _one_field(mig, mig.new, mig.new_field, space, data, dim, params, limits, device, via), via
    q = prepare(col, space, data, dim, params, limits)  # the old field: the collection's own path
    return run(q, q.route.fn, device), q.route


def _one_field(
    mig: MilvusMigration,
    target: SpaceRow,
    field: str,
    space: SpaceRow,
    data: bytes,
    dim: int,
    params: SearchParams,
    limits: Limits,
    device: Device,
    route: Route,
) -> Hits:
    """Queries of ``space`` through ``route`` into ``target``'s field, among the points with a vector there."""
    q = prepare(mig.col, space, data, dim, params, limits, route)  # the collection's checks and parameters
    t0 = time.perf_counter()
    xh = q.xq if route.fn is None else map_queries(route.fn, q.xq, target.metric, target.dim, device=device)
    t1 = time.perf_counter()
    index = mig.field_index() if field == mig.new_field else mig.col.index
    D, ids = _field_search(mig.col, field, target, index, xh, params, _has(field), params.k)
    return Hits(D, ids, _view(mig, index), t1 - t0, t1 - t0, time.perf_counter() - t1)


def _two_fields(
    mig: MilvusMigration,
    space: SpaceRow,
    data: bytes,
    dim: int,
    params: SearchParams,
    limits: Limits,
    device: Device,
    via: Route,
) -> Hits:
    """Backfilled points natively in the new field, the rest through the transform in the old field."""
    col, k, cal = mig.col, params.k, mig.calibration
    q = prepare(col, space, data, dim, params, limits, via)
    t0 = time.perf_counter()
    xh = map_queries(mig.fn, q.xq, mig.old.metric, mig.old.dim, device=device)
    t1 = time.perf_counter()
    old_f, new_f, depth = mig.old_field, mig.new_field, cal.depth if cal.level else 0
    if mig.backfilled() == 0:  # nothing backfilled: the old field alone, on the new scale
        D_old, I_old = _field_search(col, old_f, mig.old, col.index, xh, params, _has(old_f), max(k, depth))
        D, I = cal.apply(D_old)[:, :k], I_old[:, :k]
        return Hits(D, I, _view(mig, col.index), t1 - t0, t1 - t0, time.perf_counter() - t1)
    rest = f"{_has(old_f)} and not {_has(new_f)}"
    D_old, I_old = _field_search(col, old_f, mig.old, col.index, xh, params, rest, k)
    levels = None
    if depth:  # each query's level: the top-depth of its whole old list, backfilled points included
        D_top, _ = _field_search(col, old_f, mig.old, col.index, xh, params, _has(old_f), depth)
        levels = cal.query_level(D_top)
    index = mig.field_index()
    D_new, I_new = _field_search(col, new_f, mig.new, index, q.xq, params, _has(new_f), k)
    D, I = merge_topk(cal.apply(D_old, levels), I_old, D_new, I_new, k, higher_is_better=mig.new.metric != "l2")
    return Hits(D, I, _view(mig, col.index, index), t1 - t0, t1 - t0, time.perf_counter() - t1)


def _view(mig: MilvusMigration, *indexes: MilvusIndex) -> MilvusView:
    """What a search read: exact when every field it searched is FLAT, else the first approximate index type."""
    approx = [i.index_type for i in indexes if not i.exact]
    return MilvusView(approx[0] if approx else None, mig.col.last_sequence)
