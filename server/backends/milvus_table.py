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
    "MOVE_PROPERTY",
    "MilvusTable",
    "ReadWriteGate",
    "as_vector",
    "delete_ids",
    "is_lite",
    "lite_index_rows",
    "query_rows",
    "upsert_rows",
]

R = TypeVar("R")
CHUNK = 4096  #: ids per query and rows per upsert or delete call
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
        epoch = self.engines.epoch(self.uri)
        with contextlib.suppress(NotLoaded):
            self.engines.call(self.uri, "load", lambda c: c.load_collection(self.mname, timeout=self.engines.timeout))
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
        schema.add_field("id", dt.VARCHAR, is_primary=True, max_length=MAX_ID_CHARS)
        schema.add_field("payload", dt.VARCHAR, max_length=MAX_PAYLOAD_BYTES, nullable=True)
        schema.add_field("seq", dt.INT64)
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

        def create(c: Any) -> None:
            if c.has_collection(self.mname, timeout=t):
                raise FailedPrecondition(
                    f"milvus collection {self.mname!r} already exists at {self.uri} (another front-end or an earlier"
                    " data dir holds it); drop it there or choose another name"
                )
            c.create_collection(
                self.mname, schema=schema, index_params=index, consistency_level="Strong", timeout=t, **extra
            )

        self._call("create collection", create)
        self.fields = {sp.name: field_name(sp.name) for sp in spaces}
        self._loaded_epoch = self.engines.epoch(self.uri)

    def _fields(self) -> dict[str, str]:
        """space -> vector field, from the engine's schema (once; spaces are immutable)."""
        if self.fields is None:
            spaces = self.spaces
            desc = self._call("describe", lambda c: c.describe_collection(self.mname, timeout=self.engines.timeout))
            have = {f["name"] for f in desc["fields"]}
            fields = {s: field_name(s) for s in spaces if field_name(s) in have}
            fields[self.home.name] = self.home_field
            self.fields = fields
        return self.fields

    def _rows(self, ids: Sequence[str], out: list[str]) -> dict[str, dict[str, Any]]:
        """The engine's rows of ``ids`` that exist, with fields ``out``."""
        rows: dict[str, dict[str, Any]] = {}
        with self.flush_gate.read():  # not while a flush runs (ReadWriteGate)
            for i in range(0, len(ids), CHUNK):
                chunk = list(ids[i : i + CHUNK])
                query = functools.partial(query_rows, self.mname, chunk, out, self.engines.timeout, "")
                got = self._call("query", query)
                rows.update((r["id"], r) for r in got)
        return rows

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
        """Drops the Milvus collection only (a creation whose row could not be written)."""
        self._call("drop collection", lambda c: c.drop_collection(self.mname, timeout=self.engines.timeout))


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


def upsert_rows(name: str, rows: list[dict[str, Any]], timeout: float, client: Any) -> Any:
    return client.upsert(name, rows, timeout=timeout)


def delete_ids(name: str, ids: list[str], timeout: float, client: Any) -> Any:
    return client.delete(name, filter=id_filter(ids), timeout=timeout)
