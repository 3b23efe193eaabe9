"""Moving a running embedded collection to a Milvus engine (``MoveCollection``, ``collections move``).

:func:`move_collection` checks first and changes nothing on a refusal (:func:`check_move`), then:

1. **Engine side**: the Milvus collection of the same name is created (``milvus_schema.py``: a vector
   field for the home space, every other space the collection has vectors in, then the oldest other
   spaces, ``MAX_VECTOR_FIELDS`` in all, one less beside a ``prefix_dims`` collection's prefix field
   and one less beside a ``basis_transform`` collection's basis field, whose vectors the copy computes
   from the home vectors), marked as this move's (:func:`marker`, a
   collection property): a leftover of an earlier move that crashed is recognized by it and dropped;
   any other collection of that name is refused.
2. **Copy**, holding no lock of the collection (searches and writes go on): every point (id, payload,
   sequence, each space's vector) read from the store in pages of at most ``COPY_BYTES`` and upserted.
   The collection's deletes are recorded from the copy's start (``Collection.deletes_seen``), and
   the start's store sequence is kept; the engine is flushed.
3. **Catch-up**: points whose store sequence is newer than the last pass's start are copied again and
   the recorded deletes are deleted in the engine; up to ``CATCH_UP_PASSES`` passes without the lock,
   then the last one under the collection's write lock (writes wait; searches go on), with the
   DDL lock and the maintenance lock held too.
4. **Verification** (still under the lock): the point count and each space's vector count equal on
   both sides, and ``VERIFY_QUERIES`` spot searches (seeded stored home vectors, through the basis
   for a basis collection, k = 10, HNSW at ef 256, IVF at nprobe = nlist) agree (:func:`spot_check`).
   A mismatch rolls back.
5. **Switch**: the collection's row takes backend ``milvus`` and the uri in one store transaction
   (durable: the switch), then the registry entry becomes the :class:`~.milvus.MilvusCollection`
   (routes carried over; they are per collection name) and the embedded object is retired: a write
   or read that had resolved it is answered by the new one (``Engine``). Then the embedded index
   files and the store's points and vectors of the collection are dropped, in chunks.

Any failure before the switch drops the engine's collection again (or leaves it, with its marker,
when the engine is unreachable: the next move drops it) and the collection stays embedded, unchanged.
A crash before the row's transaction commits leaves the collection embedded and intact; after it,
the collection is on milvus (the engine was flushed before the switch) and a restart drops the
embedded leftovers (``lifecycle.py``). Covered by ``tests/test_move.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..collection import Collection
from ..errors import FailedPrecondition, InterlinguaError, InvalidArgument
from ..store import CollectionRow, SpaceRow
from .milvus import MilvusCollection
from .milvus_schema import (
    MAX_ID_CHARS,
    MAX_PAYLOAD_BYTES,
    MAX_VECTOR_FIELDS,
    check_uri,
    field_name,
    parse_index,
    require_pymilvus,
)
from .milvus_table import CHUNK, KEY_FIELD, MOVE_PROPERTY, query_rows

if TYPE_CHECKING:
    from ..engine import Engine

__all__ = ["MoveReport", "SpotCheck", "check_move", "move_collection", "spot_check"]

log = logging.getLogger(__name__)

COPY_BYTES = 16 << 20  #: vector and payload bytes per page read from the store (a payload taken as 1 KiB; the
#: engine writes are cut again at milvus_table.MESSAGE_BUDGET by their actual bytes)
CATCH_UP_PASSES = 3  #: catch-up passes without the write lock before the last one under it
CATCH_UP_SMALL = 1000  #: a pass that re-copied fewer points is the last one without the lock
VERIFY_QUERIES = 32  #: spot searches
VERIFY_K = 10
VERIFY_EF = 256  #: HNSW ef of the spot searches (IVF: nprobe = nlist)
VERIFY_SEED = 0
FLUSH_TIMEOUT = 600.0  #: seconds a flush may take (the engine seals and indexes what was copied)


def marker(row: CollectionRow) -> str:
    """The engine-side collection's description during a move: names the collection row it copies."""
    return f"interlingua move of collection {row.spec.name!r} (cid {row.cid}, created {row.created_at!r})"


@dataclass(frozen=True)
class SpotCheck:
    """The spot searches of a move's verification (both sides, the same stored home vectors)."""

    queries: int
    self_embedded: int  #: top-1 is the queried point (or of equal score); 0 for ip spaces
    self_milvus: int
    agreement: float  #: fraction of queries with the same top-1 on both sides (or equal scores)
    overlap: float  #: mean |top-10 embedded & top-10 milvus| / |top-10 embedded|
    failures: list[str] = field(default_factory=list)  #: why it fails ([] when it passes)


@dataclass(frozen=True)
class MoveReport:
    collection: MilvusCollection
    points_copied: int
    vectors_copied: int
    writes_caught_up: int
    deletes_caught_up: int
    seconds: float
    write_pause_seconds: float
    spot: SpotCheck
    num_points: int
    vectors_per_space: dict[str, int]


def _tie(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * max(1.0, abs(a), abs(b))


def spot_check(
    metric: str,
    exact: bool,
    ids: Sequence[str],
    xq: np.ndarray,
    embedded: tuple[np.ndarray, np.ndarray],
    milvus: tuple[np.ndarray, np.ndarray],
) -> SpotCheck:
    """Compares the two sides' results (D, ids) of queries ``xq`` (the stored home vectors of ``ids``).

    A query agrees when both top-1 are the same point or score the same (a tie); it finds itself when
    the top-1 is the queried point or scores as the point itself would (cosine, l2; an ip space's
    point need not be its own nearest). An exact (Flat) index must agree and find itself on every
    query; an approximate one may miss up to an eighth more than the embedded side does."""
    (De, Ie), (Dm, Im) = embedded, milvus
    n = len(ids)
    selfs = [0, 0]
    agree = 0
    overlap = 0.0
    for i, pid in enumerate(ids):
        q = xq[i].astype(np.float64)
        own = 0.0 if metric == "l2" else float(q @ q)
        for side, (D, I) in enumerate(((De, Ie), (Dm, Im))):
            if metric != "ip" and (I[i, 0] == pid or _tie(float(D[i, 0]), own)):
                selfs[side] += 1
        agree += bool(Ie[i, 0] == Im[i, 0] or _tie(float(De[i, 0]), float(Dm[i, 0])))
        a = {p for p in Ie[i].tolist() if p}
        overlap += len(a & {p for p in Im[i].tolist() if p}) / max(1, len(a))
    failures = []
    allowed = 0 if exact else max(1, n // 8)
    if metric != "ip" and selfs[1] < (n if exact else selfs[0] - allowed):
        failures.append(f"the engine found the queried point itself for {selfs[1]} of {n} (embedded: {selfs[0]})")
    if n - agree > allowed:
        failures.append(f"the top-1 of {n - agree} of {n} spot searches differs between the two sides")
    return SpotCheck(n, selfs[0], selfs[1], agree / max(1, n), overlap / max(1, n), failures)


def check_move(engine: Engine, name: str, backend: str, uri: str) -> tuple[Collection, CollectionRow, list[SpaceRow]]:
    """Every refusal of a move, before anything changes: (the embedded collection, its row as it will be
    on milvus, the spaces that get a vector field, the home space first)."""
    store = engine._ready()
    col = engine.collection(name)
    if backend not in ("", "milvus"):
        raise InvalidArgument(f"backend {backend!r}: collections move to the 'milvus' backend only")
    spec = col.row.spec
    if not isinstance(col, Collection):
        raise FailedPrecondition(f"collection {name!r} is already on the {col.backend} backend at {spec.backend_uri}")
    if name in engine.moving:
        raise FailedPrecondition(f"collection {name!r} is already being moved")
    mig = engine._migration(name)
    if mig is not None:
        raise FailedPrecondition(
            f"collection {name!r} has a running migration to space {mig.new.name!r} (phase {mig.phase});"
            " finish or abort it before moving the collection"
        )
    if spec.auto or spec.target_recall:
        raise FailedPrecondition(
            f"collection {name!r} uses index_spec 'auto' (the index advisor), which the milvus backend does not"
            " support yet; it cannot be moved"
        )
    if col.failure is not None:
        raise FailedPrecondition(f"collection {name!r} failed ({col.failure.reason}); it cannot be moved")
    try:
        parse_index(spec.index_spec, spec.ef_construction)
    except InvalidArgument as e:
        raise FailedPrecondition(f"collection {name!r} cannot be moved: {e.message}") from None
    uri = check_uri(uri or engine.config.milvus_uri or str(Path(engine.config.data_dir) / "milvus.db"), new=True)
    counts = store.vector_counts(col.row.cid)
    by_age = sorted((s for s in engine.spaces.values() if s.name != col.home.name), key=lambda s: s.created_at)
    used = [col.home, *(s for s in by_age if counts.get(s.name))]
    fields = (("a basis field", spec.basis_transform), ("a Matryoshka prefix field", spec.prefix_dims))
    extra = [what for what, used_by in fields if used_by]  # vector fields that hold no space's vectors
    most = MAX_VECTOR_FIELDS - len(extra)
    if len(used) > most:
        raise FailedPrecondition(
            f"collection {name!r} has vectors in {len(used)} spaces ({', '.join(s.name for s in used)}); a milvus"
            f" collection holds at most {MAX_VECTOR_FIELDS} vector fields ({' and '.join([f'{most} spaces', *extra])})"
        )
    spaces = [*used, *(s for s in by_age if s not in used)][:most]
    require_pymilvus()
    try:  # UNAVAILABLE naming the engine when it cannot be reached
        engine.milvus.call(uri, "connect", lambda c: c.get_server_version(timeout=engine.milvus.timeout))
    except BaseException:
        engine._unwatch_unused(uri)
        raise
    on_milvus = dataclasses.replace(spec, backend="milvus", backend_uri=uri, train_min_points=0)
    return col, dataclasses.replace(col.row, spec=on_milvus), spaces


def move_collection(engine: Engine, name: str, backend: str, uri: str) -> MoveReport:
    """Moves embedded collection ``name`` to the Milvus engine at ``uri`` (see the module docstring)."""
    t0 = time.perf_counter()
    col, row, spaces = check_move(engine, name, backend, uri)
    with engine._ddl_lock:
        if name in engine.moving:
            raise FailedPrecondition(f"collection {name!r} is already being moved")
        if engine.collections.get(name) is not col:
            raise FailedPrecondition(f"collection {name!r} was changed meanwhile (deleted or reopened); retry")
        engine.moving.add(name)
    try:
        return _Move(engine, col, row, spaces).run(t0)
    finally:
        with engine._ddl_lock:
            engine.moving.discard(name)


class _Move:
    def __init__(self, engine: Engine, col: Collection, row: CollectionRow, spaces: list[SpaceRow]) -> None:
        self.e, self.col, self.row = engine, col, row
        self.store = engine._ready()
        self.cid = col.row.cid
        self.uri = row.spec.backend_uri
        self.spaces = spaces
        self.table = MilvusCollection(
            row, col.home, engine.spaces, self.store, engine.milvus, engine.metrics, basis=col.basis
        )
        self.fields = {s.name: field_name(s.name) for s in spaces}
        self.zeros = {field_name(s.name): np.zeros(s.dim, np.float32) for s in spaces}
        basis_dims = col.home.dim if row.spec.basis_transform else 0
        row_bytes = 4 * (sum(s.dim for s in spaces) + basis_dims + row.spec.prefix_dims) + 1024
        self.page = max(1, min(CHUNK, COPY_BYTES // row_bytes))
        self.sample: list[str] = []  #: reservoir of points with a home vector (spot searches)
        self._rng = random.Random(VERIFY_SEED)
        self._seen = 0
        self.copied = self.vectors = self.caught_up = self.deleted = 0
        self.switched = False
        self._log_done = 0

    # -- the engine side ---------------------------------------------------------------------------

    def _create(self) -> None:
        t, mname, mark = self.e.milvus.timeout, self.table.mname, marker(self.col.row)

        def leftover(c: Any) -> None:
            if not c.has_collection(mname, timeout=t):
                return
            desc = c.describe_collection(mname, timeout=t)
            if mark not in (desc.get("properties", {}).get(MOVE_PROPERTY), desc.get("description")):
                raise FailedPrecondition(
                    f"milvus collection {mname!r} already exists at {self.uri} and is not a leftover of a move of"
                    " this collection (another front-end or an earlier data dir holds it); drop it there or move"
                    " to another engine"
                )
            log.warning("dropping %s at %s, left over by an earlier move of %s", mname, self.uri, self.col.name)
            c.drop_collection(mname, timeout=t)  # (its key map: MilvusTable.create drops a leftover one)

        self.table._call("check for a leftover collection", leftover)
        self.table.create(self.spaces, marker=mark)

    def _upsert(self, rows: list[dict[str, Any]], have: dict[str, Any]) -> None:
        """Writes ``rows`` (:meth:`_rows`: their keys set; ``have``: those the engine has): new points' key
        map entries, then the rows."""
        self.table.write_rows(rows, have, self.page)

    def _flush(self) -> None:
        self.table._call(
            "flush", lambda c: c.flush(self.table.mname, timeout=max(FLUSH_TIMEOUT, self.e.milvus.timeout))
        )

    def _count(self, flt: str) -> int:
        """Rows matching ``flt`` ("" all): counting takes Milvus Lite seconds per 100k rows, so the flush's timeout."""
        q = functools.partial(query_rows, self.table.mname, None, ["count(*)"], FLUSH_TIMEOUT, flt)
        return int(self.table._call("count", q)[0]["count(*)"])

    def _rows(self, ids: Sequence[str], again: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Engine rows of points ``ids`` as the store has them, each read whole (one deleted since it was
        listed is left out: the catch-up deletes it); ``again``: points the copy may have copied already
        (the catch-up), whose keys are read. Returns the rows and the engine's rows of those it has
        (:meth:`_keys`)."""
        found = self.store.point_rows(self.cid, ids)
        rows = []
        for pid in ids:
            if pid not in found:
                continue
            payload, seq, v = found[pid]
            if len(pid.encode()) > MAX_ID_CHARS:
                raise FailedPrecondition(
                    f"point id {pid[:40]!r}... is over {MAX_ID_CHARS} bytes, the milvus backend's limit"
                )
            if payload is not None and len(payload.encode()) > MAX_PAYLOAD_BYTES:
                raise FailedPrecondition(
                    f"point {pid!r} has a payload of {len(payload.encode())} bytes; the milvus backend holds at most"
                    f" {MAX_PAYLOAD_BYTES}"
                )
            extra = sorted(set(v) - set(self.fields))
            if extra:
                raise FailedPrecondition(
                    f"point {pid!r} has a vector in space {extra[0]!r}, which has no vector field in the engine"
                    f" (written during the move; the fields are {', '.join(self.fields)})"
                )
            row: dict[str, Any] = {"id": pid, "payload": payload, "seq": int(seq)}
            have = []
            for space, f in self.fields.items():
                b = v.get(space)
                if b is None:
                    row[f] = self.zeros[f]
                else:
                    row[f] = np.frombuffer(b, dtype="<f4")
                    have.append(f)
            row["spaces"] = sorted(have)
            if not have and not self.table.has_spaces:
                raise FailedPrecondition(
                    f"point {pid!r} has no vector in the home space {self.col.home.name!r}; the milvus collection"
                    " has one vector field, which every point must have"
                )
            rows.append(row)
            self.vectors += len(v)
        self.table.derive_fields(rows)  # (zeros for a point without a home vector: not in ``spaces``)
        return rows, self._keys(rows, again)

    def _keys(self, rows: list[dict[str, Any]], again: bool) -> dict[str, Any]:
        """Each row's primary key: the one its point has in the engine (copied before, written again
        since), or the next of the table's keys (``milvus_table.py``, "Keys")."""
        if not self.table.keyed or not rows:
            return {}
        have = self.table._rows([r["id"] for r in rows], ["id", KEY_FIELD]) if again else {}
        new = sum(r["id"] not in have for r in rows)
        self.table.give_keys(rows, have, self.table.reserve_keys(new) if new else 0)
        return have

    # -- copy, catch-up ----------------------------------------------------------------------------

    def _copy(self) -> None:
        after, home = "", self.col.home.name
        while True:
            meta = self.store.points_page(self.cid, after, self.page)
            if not meta:
                return
            after = meta[-1][0]
            rows, have = self._rows([m[0] for m in meta])
            self._upsert(rows, have)
            self.copied += len(rows)
            for r in rows:  # a seeded reservoir of points with a home vector
                if self.fields[home] in r["spaces"]:
                    self._seen += 1
                    if len(self.sample) < VERIFY_QUERIES:
                        self.sample.append(r["id"])
                    elif (j := self._rng.randrange(self._seen)) < VERIFY_QUERIES:
                        self.sample[j] = r["id"]

    def _catch_up(self, since: int) -> tuple[int, int]:
        """Deletes the recorded deletes and copies again the points written after ``since``; returns
        (points copied again, the store sequence this pass saw)."""
        now = self.store.sequence
        seen = self.col.deletes_seen or []
        end = len(seen)
        gone = list(dict.fromkeys(seen[self._log_done : end]))
        for i in range(0, len(gone), CHUNK):
            self.table.delete_rows(gone[i : i + CHUNK])
        self._log_done = end
        self.deleted += len(gone)
        ids = self.store.points_since(self.cid, since)
        for i in range(0, len(ids), self.page):
            self._upsert(*self._rows(ids[i : i + self.page], again=True))
        self.caught_up += len(ids)
        return len(ids), now

    # -- verification, switch ----------------------------------------------------------------------

    def _verify(self) -> tuple[SpotCheck, int, dict[str, int]]:
        col, table, name = self.col, self.table, self.col.name
        want_points, want = self.store.point_count(self.cid), self.store.vector_counts(self.cid)
        got_points, got = self._count(""), {}
        for space, f in self.fields.items():  # as MilvusTable.vector_counts, with the flush's timeout
            if not table.has_spaces:  # one vector field: every point has its home vector (_rows)
                got = {space: got_points} if got_points else {}
            elif n := self._count(f'array_contains(spaces, "{f}")'):
                got[space] = n
        if (got_points, got) != (want_points, want):
            raise FailedPrecondition(
                f"the move of collection {name!r} failed its verification: the engine holds {got_points} points and"
                f" vectors {got}, the store {want_points} points and vectors {want}; it was rolled back and the"
                " collection stays embedded"
            )
        home = col.home.name
        vecs = self.store.vectors(self.cid, self.sample)
        ids = [p for p in self.sample if home in vecs.get(p, {})]
        if not ids:
            return SpotCheck(0, 0, 0, 1.0, 1.0), got_points, got
        xq = col.to_basis(np.stack([np.frombuffer(vecs[p][home], dtype="<f4") for p in ids]))  # as indexed
        index = table.index
        ef, nprobe = (VERIFY_EF if index.is_hnsw else None), (index.nlist or None)
        De, Ie, _ = col.search(xq, VERIFY_K, ef, nprobe)
        Dm, Im, _ = table.search(xq, VERIFY_K, ef, nprobe)
        spot = spot_check(col.home.metric, index.exact, ids, xq, (De, Ie), (Dm, Im))
        if spot.failures:
            raise FailedPrecondition(
                f"the move of collection {name!r} failed its spot searches: {'; '.join(spot.failures)} (top-1"
                f" agreement {spot.agreement:.3f}, top-10 overlap {spot.overlap:.3f}); it was rolled back and the"
                " collection stays embedded"
            )
        return spot, got_points, got

    def _switch(self, counts: dict[str, int]) -> None:
        """The row (one durable transaction), then the registry entry; the embedded object is retired."""
        e, col, table = self.e, self.col, self.table
        self.store.set_backend(self.cid, "milvus", self.uri)
        self.switched = True  # durable: from here on the collection is the engine's, come what may
        table.last_sequence = col.last_sequence
        table.counts, table.unflushed = dict(counts), 0
        routes_lock = e.routes._lock if e.routes is not None else contextlib.nullcontext()
        with routes_lock, e._registry_lock:  # route changes take the routes lock: none is lost
            table.routes = col.routes
            e.collections[col.name] = table
        col.retired = f"collection {col.name!r} was moved to the milvus backend at {self.uri}; retry"
        col.dropped = True  # the maintenance thread leaves it alone
        table.publish_gauges()

    def _purge(self) -> None:
        """The embedded index files and the store's points and vectors (after the switch is durable)."""
        col = self.col
        with col.maint_lock:
            shutil.rmtree(col.folder, ignore_errors=True)
        while self.store.purge_points(self.cid, 10 * CHUNK):
            pass
        with contextlib.suppress(KeyError):
            self.e.metrics.dead_labels.remove(col.name)
        with contextlib.suppress(KeyError):
            self.e.metrics.compactions.remove(col.name)

    def run(self, t0: float) -> MoveReport:
        col, e = self.col, self.e
        created = False
        try:
            self._create()
            created = True
            with col.lock:  # a delete is wholly before the copy's start or recorded
                col.deletes_seen = []
                since = self.store.sequence
            self._copy()
            points_copied, vectors_copied = self.copied, self.vectors
            self._flush()
            for _ in range(CATCH_UP_PASSES):
                n, since = self._catch_up(since)
                if n < CATCH_UP_SMALL:
                    break
            with e._ddl_lock, col.maint_lock, col.lock:
                t_pause = time.perf_counter()
                if e.collections.get(col.name) is not col or col.dropped or col.retired:
                    raise FailedPrecondition(f"collection {col.name!r} was changed during the move; retry")
                self._catch_up(since)
                self._flush()  # durable in the engine before the row switches
                spot, num_points, counts = self._verify()
                self._switch(counts)
                pause = time.perf_counter() - t_pause
        except BaseException:
            col.deletes_seen = None
            if self.switched:  # the row switched; what failed after it (in memory) is fixed by a restart
                log.exception("the move of %s switched its row but not all of its state; restart the server", col.name)
                raise
            if created:
                try:
                    self.table.drop_engine_side()
                except InterlinguaError as err:  # unreachable: the next move drops it (its marker)
                    log.warning(
                        "could not drop %s after a failed move of %s: %s", self.table.mname, col.name, err.message
                    )
            e._unwatch_unused(self.uri)
            raise
        col.deletes_seen = None
        try:
            self._purge()
        except Exception:  # the switch stands: a restart drops what is left (lifecycle.py)
            log.exception("dropping the embedded leftovers of %s failed; the next start drops them", col.name)
        log.info(
            "moved collection %s to milvus at %s: %d points copied, %d caught up, %d deletes, %.1fs (writes paused"
            " %.2fs)",
            col.name, self.uri, points_copied, self.caught_up, self.deleted, time.perf_counter() - t0, pause,
        )  # fmt: skip
        return MoveReport(
            collection=self.table,
            points_copied=points_copied,
            vectors_copied=vectors_copied,
            writes_caught_up=self.caught_up,
            deletes_caught_up=self.deleted,
            seconds=time.perf_counter() - t0,
            write_pause_seconds=pause,
            spot=spot,
            num_points=num_points,
            vectors_per_space=counts,
        )
