"""One Interlingua collection's Milvus collection: its creation, schema, reads by id, counts and loading.

:class:`MilvusTable` holds what a ``milvus`` collection keeps beside the engine (its row, fields,
counts, the write lock) and every engine call goes through :meth:`MilvusTable._call`: the engine's
errors mapped (``milvus_engines.py``: UNAVAILABLE while it is unreachable) and the collection loaded
again after the engine restarted and forgot it. The request surface (writes, get, search) is
:class:`~.milvus.MilvusCollection`, as :class:`~..collection.Collection` stands on
:class:`~..collection_index.CollectionIndex`.

**Counts** (points, vectors per space) are the front-end's: counted in the engine once, under the
write lock, when first needed after the collection is opened (:meth:`MilvusTable.counted`), then kept
exact by every write, which reads the rows it touches anyway (an upsert knows which ids and which
vectors are new, a delete which rows and vectors go). ``GetCollection`` therefore issues no count
query: on Milvus Lite a filtered count materializes every matching row (over 10 s at 200k rows) and
over-counted after concurrent overwrites. Counts assigned whole (a new collection's empty ones, a
move's verified ones) are kept as given; a write whose engine call failed (it may have been applied
in part) makes them counted again. Covered by ``tests/test_backends.py``.

**Keys.** A collection's primary key is ``pk``, an INT64 the front-end hands out densely (0, 1, 2, ...);
the point id is the VARCHAR field ``id`` beside it (``milvus_schema.py``). Milvus Lite passes over every
row's primary key in Python on each search and query (a dict of each key's newest row), and that pass
costs a third less over dense integers than over strings or hashed integers
(``bench/milvus_lite_keys.py``: 100k x 64, nq 64, p50 77.9 ms against 103.2 with the point id as the
key, 71.1 for a bare collection). Reads by point id go through a second Milvus collection, the key map
(:func:`key_map`: the point id its VARCHAR primary key, the key beside it), because an engine finds rows
by primary key directly and a filter on another field scans every row (Milvus Lite: in Python, and a
200k-point load through the service ran at a quarter of its speed before the map). The key map is
written before the collection (a new point's key) and deleted from after it, so a crash between the two
leaves only a key map entry whose row is missing, which reads ignore and the next write of that id
replaces. A write reads the rows it touches anyway, so an existing point keeps
its key and a new one takes the next: from a counter in the store, taken in the write's sequence
transaction (durable before the engine write, so a key is never handed out twice), or, on a front-end
of a shared registry, from a block of keys reserved in etcd (``shared.py``). The first write after a
start also checks that the engine holds no key at or above the counter (a store restored from an older
copy) and moves the counter past it. Collections created before this (``id`` the VARCHAR primary key,
:attr:`MilvusTable.keyed` False) are served as they are.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..collection_index import SEARCH_STAGES
from ..errors import FailedPrecondition, Unavailable
from ..metrics import Metrics, StageTimes
from ..routes import Route
from ..store import CollectionRow, SpaceRow, Store
from ..transforms import Transform
from .milvus_engines import MilvusEngines, NotLoaded
from .milvus_schema import (
    MAX_ID_CHARS,
    MAX_PAYLOAD_BYTES,
    MAX_VECTOR_FIELDS,
    METRIC,
    MilvusIndex,
    basis_field,
    field_name,
    id_filter,
    milvus_name,
    parse_index,
    prefix_field,
    require_pymilvus,
)

__all__ = [
    "CHUNK",
    "KEY_FIELD",
    "MOVE_PROPERTY",
    "MilvusTable",
    "ReadWriteGate",
    "as_vector",
    "delete_ids",
    "drop_if",
    "flush",
    "insert_rows",
    "is_lite",
    "key_filter",
    "key_map",
    "lite_index_rows",
    "query_rows",
    "upsert_rows",
]

R = TypeVar("R")
CHUNK = 4096  #: ids per query and rows per upsert or delete call
#: bytes of rows a query may read or a write may send: Milvus caps a message at 256 MiB, and 4096 rows with
#: the longest payloads (64 KiB each) are over it
MESSAGE_BUDGET = 64 << 20
KEY_FIELD = "pk"  #: the dense INT64 primary key of a collection (see "Keys")
_MAP_VECTOR = [0.0, 0.0]  #: the key map's one vector (Milvus wants a vector field in every collection)
COUNT_TIMEOUT = 600.0  #: seconds for the one count of a collection (Milvus Lite: seconds per 100k rows)
MOVE_PROPERTY = "interlingua_move"  #: collection property marking a collection a move made (``move.py``)


class ReadWriteGate:
    """Many readers at once, or one exclusive holder; readers wait while it holds the gate. The table's
    reads by id take it against its flushes (Milvus Lite 3.2.2 once answered a query of 3,616 ids during a
    flush with 525 rows: an upsert's read-merge-write would then have taken existing points for new ones),
    a migration's searches and reads against its index switch (``milvus_migration.py``)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._exclusive = False

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class MilvusTable:
    """A ``milvus`` collection's state and its engine calls; see :class:`~.milvus.MilvusCollection`."""

    def __init__(
        self,
        row: CollectionRow,
        home: SpaceRow,
        spaces: Mapping[str, SpaceRow],
        store: Store,
        engines: MilvusEngines,
        metrics: Metrics,
        *,
        basis: Transform | None = None,
    ) -> None:
        self.row = row
        self.spaces = spaces  #: the engine's registry of spaces (read only here)
        self.name = row.spec.name
        self.home = home
        self.store = store
        self.engines = engines
        self.metrics = metrics
        self.uri = row.spec.backend_uri
        self.mname = milvus_name(self.name)
        self.index: MilvusIndex = parse_index(row.spec.index_spec, row.spec.ef_construction)
        self.home_field = field_name(home.name)
        self.prefix_dims = row.spec.prefix_dims  #: Matryoshka prefix the index holds (0: every dimension)
        self.prefix_field = prefix_field(home.name) if self.prefix_dims else ""
        #: home -> home transform (``basis_transform``) whose doc side maps every vector of the basis field;
        #: None without one, or when it is not loaded here (then writes and searches fail: ``to_basis``)
        self.basis = basis
        self.basis_field = basis_field(home.name) if row.spec.basis_transform else ""
        self.full_field = self.basis_field or self.home_field  #: the full vectors a search scores (and reranks)
        self.index_field = self.prefix_field or self.full_field  #: the vector field with the collection's index
        self.extra_fields = bool(self.prefix_field) + bool(self.basis_field)  #: vector fields that are no space's
        self.fields: dict[str, str] | None = None  #: space -> vector field, read from the engine once
        #: the primary key is :data:`KEY_FIELD` (dense keys); False: the point id (a collection created before)
        self.keyed = True
        #: rows have the ``spaces`` array; False for a collection with one vector field for spaces, where every
        #: point has its home vector: rows read get ``spaces`` = [home field], rows written lose it (Milvus Lite
        #: builds every column of each winning row, and that array was most of what the service's rows cost
        #: over a bare collection's at nq=64: ``bench/milvus_lite_columns.py``)
        self.has_spaces = True
        #: a shared registry's keys (``shared.py``): n -> the first of n keys reserved for this front-end;
        #: None: the store's counter
        self.take_keys: Callable[[int], int] | None = None
        self._keys_checked = False
        self.routes: Mapping[str, Route] = {}  #: replaced whole on every change (one reference swap)
        self.lock = threading.Lock()  #: serializes this front-end's writes (read-merge-write)
        #: taken inside :attr:`lock` by every write batch: a shared registry's write lock across front-ends
        #: (``shared.py``); nothing on a front-end of its own
        self.writing: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
        self.flush_gate = ReadWriteGate()  #: reads by id against flushes
        self.dropped = False
        self.retired = ""
        self.failure = None  #: the engine builds the index: never failed in this front-end
        self._counts: dict[str, int] = {}  #: space -> vectors (see :attr:`counts`)
        self._counts_known = False  #: ``_counts`` exact: counted once, or assigned whole
        self.npoints: int | None = None  #: points, exact once counted (None: not yet)
        #: a write is adding points without a home vector (searches filter them out until the counts tell)
        self.may_lack_home = False
        self._next_count = 0.0  #: monotonic time before which the maintenance does not count again
        self.last_sequence = row.last_sequence
        self.checkpoint_sequence = 0
        self.stage_timers = StageTimes(metrics.search_seconds, self.name, SEARCH_STAGES)
        self._loaded_epoch = -1
        self.unflushed = 0  #: home vectors written since the last flush (CollectionInfo.fresh_vectors)
        self.last_write = time.monotonic()
        engines.watch(self.uri)

    # -- the engine ----------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[Any], R]) -> R:
        """fn(client) on this collection, loaded first after the engine came back (or forgot it)."""
        for attempt in range(2):
            epoch = self.engines.epoch(self.uri)
            if epoch != self._loaded_epoch and attempt == 0 and self.fields is not None:
                self._load()
            try:
                return self.engines.call(self.uri, what, fn)
            except NotLoaded:
                self._load()
        raise Unavailable(f"milvus collection {self.mname!r} at {self.uri} does not stay loaded; retry")

    def _load(self) -> None:
        """Loads the collection, and its key map."""
        epoch = self.engines.epoch(self.uri)
        self._fields()
        names = [self.mname, key_map(self.mname)] if self.keyed else [self.mname]
        for name in names:
            with contextlib.suppress(NotLoaded):
                self.engines.call(self.uri, "load", functools.partial(load, name, self.engines.timeout))
        self._loaded_epoch = epoch

    def create(self, spaces: Sequence[SpaceRow], marker: str = "") -> None:
        """Creates the Milvus collection: one vector field per space in ``spaces`` (the home space first),
        a basis collection's basis field and a prefix collection's prefix field (one space less each:
        ``MAX_VECTOR_FIELDS`` in all).
        ``marker``: a move's mark (``move.py``), kept as the collection property ``MOVE_PROPERTY`` (Milvus Lite
        keeps no schema description) and as the schema's description."""
        pymilvus = require_pymilvus()
        spaces = spaces[: MAX_VECTOR_FIELDS - self.extra_fields]
        dt = pymilvus.DataType
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False, description=marker)
        extra = {"properties": {MOVE_PROPERTY: marker}} if marker else {}
        schema.add_field(KEY_FIELD, dt.INT64, is_primary=True)
        schema.add_field("id", dt.VARCHAR, max_length=MAX_ID_CHARS)
        schema.add_field("payload", dt.VARCHAR, max_length=MAX_PAYLOAD_BYTES, nullable=True)
        schema.add_field("seq", dt.INT64)
        if len(spaces) > 1:  # (one vector field: every point has its home vector, see :attr:`has_spaces`)
            schema.add_field("spaces", dt.ARRAY, element_type=dt.VARCHAR, max_capacity=len(spaces), max_length=32)
        index = pymilvus.MilvusClient.prepare_index_params()
        for sp in spaces:
            f = field_name(sp.name)
            schema.add_field(f, dt.FLOAT_VECTOR, dim=sp.dim)
            if f == self.index_field:  # build parameters twice: see build_params
                index.add_index(
                    f, index_type=self.index.index_type, metric_type=METRIC[sp.metric], params=self.index.build_params()
                )
            else:
                index.add_index(f, index_type="FLAT", metric_type=METRIC[sp.metric])
        for f, dim in ((self.basis_field, self.home.dim), (self.prefix_field, self.prefix_dims)):
            if not f:
                continue
            schema.add_field(f, dt.FLOAT_VECTOR, dim=dim)
            if f == self.index_field:
                index.add_index(
                    f,
                    index_type=self.index.index_type,
                    metric_type=METRIC[self.home.metric],
                    params=self.index.build_params(),
                )
            else:
                index.add_index(f, index_type="FLAT", metric_type=METRIC[self.home.metric])
        t = self.engines.timeout

        kmap, kschema = key_map(self.mname), pymilvus.MilvusClient.create_schema(auto_id=False, description=marker)
        kschema.add_field("id", dt.VARCHAR, is_primary=True, max_length=MAX_ID_CHARS)
        kschema.add_field("key", dt.INT64)
        kschema.add_field("z", dt.FLOAT_VECTOR, dim=len(_MAP_VECTOR))
        kindex = pymilvus.MilvusClient.prepare_index_params()
        kindex.add_index("z", index_type="FLAT", metric_type="L2")

        def create(c: Any) -> None:
            if c.has_collection(self.mname, timeout=t):
                raise FailedPrecondition(
                    f"milvus collection {self.mname!r} already exists at {self.uri} (another front-end or an earlier"
                    " data dir holds it); drop it there or choose another name"
                )
            if c.has_collection(kmap, timeout=t):  # left by a creation that failed half-way
                c.drop_collection(kmap, timeout=t)
            c.create_collection(kmap, schema=kschema, index_params=kindex, consistency_level="Strong", timeout=t)
            c.create_collection(
                self.mname, schema=schema, index_params=index, consistency_level="Strong", timeout=t, **extra
            )

        self._call("create collection", create)
        self.fields = {sp.name: field_name(sp.name) for sp in spaces}
        self.keyed, self.has_spaces = True, len(spaces) > 1
        self._loaded_epoch = self.engines.epoch(self.uri)

    def _fields(self) -> dict[str, str]:
        """space -> vector field, from the engine's schema (once; spaces are immutable)."""
        if self.fields is None:
            spaces = self.spaces
            desc = self._call("describe", lambda c: c.describe_collection(self.mname, timeout=self.engines.timeout))
            have = {f["name"] for f in desc["fields"]}
            fields = {s: field_name(s) for s in spaces if field_name(s) in have}
            fields[self.home.name] = self.home_field
            self.keyed, self.has_spaces = KEY_FIELD in have, "spaces" in have
            self.fields = fields
        return self.fields

    def same_schema(self, other: MilvusTable) -> None:
        """Takes what ``other`` (the same Milvus collection) read or made of its schema: its fields, whether
        it is keyed, whether rows have ``spaces``; nothing when ``other`` has not read it yet."""
        if other.fields is not None:
            self.fields, self.keyed, self.has_spaces = dict(other.fields), other.keyed, other.has_spaces

    def stamp(self, new: int) -> tuple[int, int]:
        """A write's sequence number (one durable store transaction) and the first of ``new`` keys for the
        points it adds (0 when it adds none, or the collection has no dense keys); the caller holds the
        write lock and has read the rows it touches. See "Keys"."""
        self._fields()  # (reads :attr:`keyed`)
        if not self.keyed or not new:
            return self.store.stamp(self.row.cid), 0
        if self.take_keys is not None:
            return self.store.stamp(self.row.cid), self.take_keys(new)
        self.check_keys()
        return self.store.stamp_keys(self.row.cid, new)

    def reserve_keys(self, n: int) -> int:
        """The first of ``n`` keys for rows written outside :meth:`stamp` (a move's copy)."""
        self._fields()
        if self.take_keys is not None:
            return self.take_keys(n)
        self.check_keys()
        return self.store.reserve_keys(self.row.cid, n)

    def check_keys(self) -> None:
        """Once per start: moves the store's key counter past any key the engine holds at or above it."""
        if self._keys_checked:
            return
        used = top = self.store.keys_used(self.row.cid)
        while True:  # (at most CHUNK rows a query: again from past the largest)
            query = functools.partial(past_keys, self.mname, top)
            got = self._call("query", query)
            if not got:
                break
            top = max(int(r[KEY_FIELD]) for r in got) + 1
        if top > used:
            self.store.reserve_keys(self.row.cid, 0, top)
        self._keys_checked = True

    def key_out(self, out: list[str]) -> list[str]:
        """``out`` with the primary key, for a read whose rows are written back."""
        return [*out, KEY_FIELD] if self.keyed else out

    def _rows(self, ids: Sequence[str], out: list[str]) -> dict[str, dict[str, Any]]:
        """The engine's rows of ``ids`` that exist, with fields ``out`` (and the primary key): through the
        key map by primary key, or by the point id where it is the primary key."""
        rows: dict[str, dict[str, Any]] = {}
        t = self.engines.timeout
        self._fields()  # (reads :attr:`keyed` and :attr:`has_spaces`)
        if not self.has_spaces:
            out = [f for f in out if f != "spaces"]
        per = self._rows_per_query(out)
        with self.flush_gate.read():  # not while a flush runs (ReadWriteGate)
            for i in range(0, len(ids), CHUNK):
                chunk = list(ids[i : i + CHUNK])
                if not self.keyed:
                    for j in range(0, len(chunk), per):
                        q = functools.partial(query_rows, self.mname, chunk[j : j + per], out, t, "")
                        rows.update((r["id"], r) for r in self._call("query", q))
                    continue
                found = list(self._keys_of(chunk).items())
                want = out if "*" in out or "id" in out else [*out, "id"]
                for j in range(0, len(found), per):
                    keys = dict(found[j : j + per])
                    q = functools.partial(query_rows, self.mname, None, want, t, key_filter(keys))
                    rows.update((r["id"], r) for r in self._call("query", q) if keys.get(r["id"]) == r[KEY_FIELD])
        if not self.has_spaces:
            for r in rows.values():
                r["spaces"] = [self.home_field]
        return rows

    def _rows_per_query(self, out: list[str]) -> int:
        """Rows one query of fields ``out`` may read within :data:`MESSAGE_BUDGET` (each payload taken at
        its longest)."""
        dims = {f: self.spaces[s].dim for s, f in (self.fields or {}).items() if s in self.spaces}
        dims.update({self.home_field: self.home.dim, self.basis_field: self.home.dim})
        dims[self.prefix_field] = self.prefix_dims
        every = "*" in out
        row = 1024 + (MAX_PAYLOAD_BYTES if every or "payload" in out else 0)
        row += 4 * sum(d for f, d in dims.items() if f and (every or f in out))
        return max(1, min(CHUNK, MESSAGE_BUDGET // row))

    def _keys_of(self, ids: list[str]) -> dict[str, int]:
        """id -> key in the key map, for those of ``ids`` (at most CHUNK) it has."""
        query = functools.partial(query_rows, key_map(self.mname), ids, ["key"], self.engines.timeout, "")
        got = self._call("query", query)
        return {str(r["id"]): int(r["key"]) for r in got}

    def write_rows(self, rows: list[dict[str, Any]], old: Mapping[str, Any], page: int = CHUNK) -> None:
        """Writes whole engine ``rows``; ``old``: the points among them the engine has. A new point's key map
        entry goes first, and its row is inserted (its key is new to the engine: an upsert would look each
        one up first); the others are upserted. ``page``: rows per engine call."""
        t = self.engines.timeout
        self._fields()
        if not self.has_spaces:
            rows = [{f: v for f, v in r.items() if f != "spaces"} for r in rows]
        if not self.keyed:
            fresh, again = [], rows
        else:
            fresh = [r for r in rows if r["id"] not in old]
            again = [r for r in rows if r["id"] in old]
            self.map_keys(fresh)
        for call, fn, part in (("insert", insert_rows, fresh), ("upsert", upsert_rows, again)):
            for batch in _batches(part, page):
                self._call(call, functools.partial(fn, self.mname, batch, t))

    def give_keys(self, rows: list[dict[str, Any]], old: Mapping[str, Any], first: int) -> None:
        """Each of engine ``rows`` gets its primary key: a point among ``old`` (the engine's rows, read with
        their key) keeps its own, a new one takes the next from ``first``, in order."""
        if not self.keyed:
            return
        for r in rows:
            prev = old.get(r["id"])
            if prev is not None:
                r[KEY_FIELD] = prev[KEY_FIELD]
            else:
                r[KEY_FIELD], first = first, first + 1

    def map_keys(self, rows: Sequence[dict[str, Any]]) -> None:
        """Writes the key map's entries of engine ``rows`` (new points), before the rows themselves."""
        t = self.engines.timeout
        entries = [{"id": r["id"], "key": r[KEY_FIELD], "z": _MAP_VECTOR} for r in rows]
        for i in range(0, len(entries), CHUNK):
            self._call("upsert", functools.partial(upsert_rows, key_map(self.mname), entries[i : i + CHUNK], t))

    def delete_rows(self, ids: list[str], keys: Mapping[str, int] | None = None) -> None:
        """Deletes the points ``ids`` (at most CHUNK) from the engine: the rows, then their key map entries.
        ``keys``: id -> key of those the caller read already (None: read from the key map)."""
        t = self.engines.timeout
        if not self.keyed:
            self._call("delete", functools.partial(delete_ids, self.mname, ids, t))
            return
        keys = self._keys_of(ids) if keys is None else {pid: keys[pid] for pid in ids if pid in keys}
        if keys:
            flt = key_filter(keys)
            self._call("delete", lambda c: c.delete(self.mname, filter=flt, timeout=t))
            self._call("delete", functools.partial(delete_ids, key_map(self.mname), list(keys), t))

    @property
    def counts(self) -> dict[str, int]:
        """space -> vectors stored: kept by the writes, exact once :meth:`counted` (the points gauge's)."""
        return self._counts

    @counts.setter
    def counts(self, value: dict[str, int]) -> None:
        """Counts assigned whole (a new collection's ``{}``, a move's verified counts) are kept as exact."""
        self._counts, self._counts_known = value, True

    def counted(self) -> tuple[int, dict[str, int]]:
        """(points, space -> vectors), exact: counted in the engine the first time (under the write lock),
        kept by the writes since."""
        if self.npoints is None or not self._counts_known:
            with self.lock:
                self._ensure_counted()
        npoints = self.npoints
        assert npoints is not None
        return npoints, dict(self._counts)

    def _ensure_counted(self) -> None:
        """Counts points and each space's vectors in the engine unless known; the caller holds the write
        lock, so no write of this front-end runs meanwhile. One vector field: every point has a home
        vector (writes in other spaces are refused), so one ``count(*)`` answers both."""
        if self.npoints is None:
            self.npoints = self._count("")
        if not self._counts_known:
            fields = self._fields()
            if len(fields) == 1:
                counts = {self.home.name: self.npoints} if self.npoints else {}
            else:
                counts = {s: n for s, f in fields.items() if (n := self._count(f'array_contains(spaces, "{f}")'))}
            self._counts, self._counts_known = counts, True
            self.publish_gauges()
        self.may_lack_home = False  # no write runs (the caller's lock): the counts are exact

    def forget_counts(self) -> None:
        """Counts again when next needed: a write failed part-way (the engine may hold some of it), or
        another front-end of a shared registry wrote (``shared.py``). The caller holds :attr:`lock`."""
        self.npoints, self._counts_known = None, False

    def num_points(self) -> int:
        return self.counted()[0]

    def vector_counts(self) -> dict[str, int]:
        """space -> vectors stored (kept by the front-end; see :meth:`counted`)."""
        return self.counted()[1]

    def _count(self, flt: str) -> int:
        t = max(self.engines.timeout, COUNT_TIMEOUT)
        got = self._call("count", functools.partial(query_rows, self.mname, None, ["count(*)"], t, flt))
        return int(got[0]["count(*)"])

    def index_progress(self) -> tuple[int, int]:
        """(rows indexed, rows waiting for the index) of the home field's index: a flushed segment is
        searched by brute force until the engine has built its index, so only the indexed rows search at
        the index's speed and recall. A Milvus engine reports them (``describe_index``); Milvus Lite 3.2
        reports every row indexed at once (``indexed_rows`` is its row count) and builds each new
        segment's index in a background thread, so on a Milvus Lite file they are read from its files
        (:func:`lite_index_rows`)."""
        if is_lite(self.uri):
            got = lite_index_rows(Path(self.uri), self.mname, self.index_field, self.index.index_type)
            if got is not None:
                return got
        info = self._call(
            "describe index", lambda c: c.describe_index(self.mname, self.index_field, timeout=self.engines.timeout)
        )
        return int(info.get("indexed_rows") or 0), int(info.get("pending_index_rows") or 0)

    def publish_gauges(self) -> None:
        for space, n in self.counts.items():
            self.metrics.points.labels(self.name, space).set(n)
        self.metrics.index_ready.labels(self.name).set(1)
        self.metrics.collection_failed.labels(self.name).set(0)

    def drop_engine_side(self) -> None:
        """Drops the Milvus collection and its key map only (a creation whose row could not be written)."""
        t = self.engines.timeout
        self._call("drop collection", functools.partial(drop_if, self.mname, t))
        self._call("drop collection", functools.partial(drop_if, key_map(self.mname), t))


def load(name: str, timeout: float, client: Any) -> None:
    client.load_collection(name, timeout=timeout)


def flush(name: str, timeout: float, client: Any) -> None:
    client.flush(name, timeout=timeout)


def drop_if(name: str, timeout: float, client: Any) -> None:
    """Drops Milvus collection ``name`` if it exists."""
    if client.has_collection(name, timeout=timeout):
        client.drop_collection(name, timeout=timeout)


def key_filter(keys: Mapping[str, int]) -> str:
    """The expression selecting the rows of ``keys`` (id -> key) by primary key."""
    return f"{KEY_FIELD} in [{', '.join(map(str, keys.values()))}]"


def key_map(mname: str) -> str:
    """The key map of Milvus collection ``mname``: point id -> primary key (module docstring, "Keys").
    (``milvus_name`` ends in hex digits, so no collection's name is another's key map.)"""
    return mname + "_keys"


def is_lite(uri: str) -> bool:
    """A Milvus Lite file (``*.db``), not a Milvus address."""
    return uri.endswith(".db") and "://" not in uri


def lite_index_rows(db: Path, mname: str, field: str, index_type: str) -> tuple[int, int] | None:
    """(rows in segments whose index is built, rows in segments without one) of the vector ``field`` of
    collection ``mname`` in the Milvus Lite 3.2 directory ``db``: its manifest lists the segments (data
    files), and the engine writes a segment's index to ``indexes/<segment>.<field>.<type>.idx`` once it
    is built, before it searches with it (``Segment.build_or_load_index``). Rows are physical rows
    (overwritten versions until compaction drops them). None when the files are not laid out so (another
    Milvus Lite version) or changed while read (a compaction)."""
    col = db / "collections" / mname
    try:
        parquet: Any = importlib.import_module("pyarrow.parquet")
        partitions = json.loads((col / "manifest.json").read_text())["partitions"]
        indexed = pending = 0
        for part, info in partitions.items():
            base = col / "partitions" / part
            for rel in info["data_files"]:
                rows = int(parquet.ParquetFile(base / rel).metadata.num_rows)
                if (base / "indexes" / f"{Path(rel).stem}.{field}.{index_type.lower()}.idx").exists():
                    indexed += rows
                else:
                    pending += rows
    except (OSError, ValueError, KeyError, TypeError, ImportError):
        return None
    return indexed, pending


def as_vector(v: Any) -> np.ndarray:
    """A vector the engine returned (a list of floats) as float32."""
    return np.asarray(v, dtype=np.float32)


def query_rows(name: str, ids: list[str] | None, out: list[str], timeout: float, flt: str, client: Any) -> Any:
    """The rows of ``ids`` (None: those matching ``flt``), with fields ``out``."""
    return client.query(name, filter=flt if ids is None else id_filter(ids), output_fields=out, timeout=timeout)


def past_keys(name: str, key: int, client: Any) -> Any:
    """At most :data:`CHUNK` rows whose primary key is ``key`` or above, with their key."""
    return client.query(name, filter=f"{KEY_FIELD} >= {key}", output_fields=[KEY_FIELD], limit=CHUNK,
                        timeout=COUNT_TIMEOUT)  # fmt: skip


def _batches(rows: list[dict[str, Any]], page: int) -> Iterator[list[dict[str, Any]]]:
    """``rows`` in batches of at most ``page`` rows and :data:`MESSAGE_BUDGET` bytes (a row's vectors,
    payload and id; one row over it alone)."""
    start, size = 0, 0
    for i, r in enumerate(rows):
        n = 256
        for v in r.values():
            if isinstance(v, np.ndarray):
                n += v.nbytes
            elif isinstance(v, str):
                n += len(v) if v.isascii() else 4 * len(v)  # (UTF-8: at most 4 bytes a character)
            elif isinstance(v, list):
                n += 8 * len(v)
        if i > start and (i - start == page or size + n > MESSAGE_BUDGET):
            yield rows[start:i]
            start, size = i, 0
        size += n
    if start < len(rows):
        yield rows[start:]


def insert_rows(name: str, rows: list[dict[str, Any]], timeout: float, client: Any) -> Any:
    return client.insert(name, rows, timeout=timeout)


def upsert_rows(name: str, rows: list[dict[str, Any]], timeout: float, client: Any) -> Any:
    return client.upsert(name, rows, timeout=timeout)


def delete_ids(name: str, ids: list[str], timeout: float, client: Any) -> Any:
    return client.delete(name, filter=id_filter(ids), timeout=timeout)
