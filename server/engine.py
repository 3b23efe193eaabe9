"""The domain core: spaces, collections and points, with no gRPC in sight.

:class:`Engine` validates every request at its boundary (``validate.py``) and
dispatches to the :class:`~.collection.Collection`; its lifecycle (loading ->
serving -> draining -> stopped) that drives the health service, the store and the
maintenance thread are :class:`~.lifecycle.EngineLifecycle`'s. A query's path reads
one way, live or shadow (``pipeline.py``)::

    validate -> resolve the route -> transform -> basis -> FAISS search -> labels to ids -> reply

A reply must fit the gRPC send limit (``Limits.max_message_bytes``): its size is counted before it
is built, and payloads are read a chunk of distinct hits at a time until it is known to fit
(:func:`bounded_payloads`), else RESOURCE_EXHAUSTED; the embedded client's direct search gets the
same answer. A prefix collection's shortlist is cut to its live labels (:func:`clamp_shortlist`).

Covered by ``tests/test_service.py`` (every RPC over a real channel), ``tests/test_search.py``,
``tests/test_pipeline.py`` and ``tests/test_reply_limits.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from . import advisor, pipeline, serial
from . import validate as v
from .backends.base import AnyCollection
from .backends.milvus import MilvusCollection
from .backends.milvus_schema import MAX_VECTOR_FIELDS, check_uri, parse_index, require_pymilvus
from .backends.move import MoveReport, move_collection
from .collection import Collection, PointRecord
from .collection_spec import CollectionSpec
from .compat import TransformRecord
from .config import BACKENDS, ServerConfig
from .errors import (
    AlreadyExists,
    FailedPrecondition,
    InterlinguaError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from .funnel import clamp_funnel
from .lifecycle import EngineLifecycle, Lifecycle, lower_priority
from .metrics import FOLD_EVERY, Metrics
from .migration.runtime import MigrationBase
from .migration.search import search as migration_search
from .pipeline import Query, SearchParams, SearchResult
from .routes import IDENTITY, Route
from .store import CollectionRow, SpaceRow, Store

#: Lifecycle and SearchResult: re-exported from lifecycle.py and pipeline.py
__all__ = [
    "PAYLOAD_READ_CHUNK",
    "Engine",
    "Lifecycle",
    "SearchResult",
    "bounded_payloads",
    "check_reply",
    "clamp_shortlist",
    "reply_bytes",
]

#: distinct hits whose payloads one read fetches while a reply is sized: at most this many payloads
#: (``max_payload_bytes`` each) are read past the send limit before a search is refused
PAYLOAD_READ_CHUNK = 256


class Engine(EngineLifecycle):
    """The request-facing domain methods: spaces, collections, points and search."""

    def __init__(self, config: ServerConfig, metrics: Metrics) -> None:
        super().__init__(config, metrics)
        self._children: dict[tuple[Any, ...], Any] = {}  #: metric children by labels (:meth:`_child`)

    # -- spaces --------------------------------------------------------------------------------

    def register_space(self, name: str, dim: int, metric: str, description: str) -> SpaceRow:
        store = self._ready()
        v.check_space_name(name)
        v.check_dim(dim)
        if metric not in v.METRICS:
            raise InvalidArgument(f"metric {metric!r} is not one of {', '.join(v.METRICS)}")
        if len(description.encode("utf-8")) > 1024:
            raise InvalidArgument("description is longer than 1024 bytes")
        with self._registry_lock:
            if name in self.spaces:
                raise AlreadyExists(f"space {name!r} is already registered (spaces are immutable)")
            row = SpaceRow(name, dim, metric, description, time.time())
            if self.shared is not None:  # registered there first: AlreadyExists if another front-end differs
                self.shared.require_sync()
                self.shared.publish_space(row)
            store.add_space(row)
            self.spaces[name] = row
        return row

    def get_space(self, name: str) -> SpaceRow:
        self._ready()
        space = self.spaces.get(name)
        if space is None:
            raise NotFound(f"space {name!r} is not registered")
        return space

    def list_spaces(self) -> list[SpaceRow]:
        self._ready()
        return sorted(self.spaces.values(), key=lambda s: s.name)

    # -- collections ---------------------------------------------------------------------------

    def create_collection(self, spec: CollectionSpec) -> AnyCollection:
        """Creates the collection of ``spec`` (as the servicer built it from the request) once every
        field is checked: the name, the home space, the backend, the basis transform, then the spec's own checks."""
        store = self._ready()
        v.check_collection_name(spec.name)
        home = self.get_space(spec.home_space)
        spec = self._backend(spec)
        if spec.on_milvus:
            return self._create_milvus(spec, home, store)
        if spec.basis_transform:
            self._basis(spec.basis_transform, home)  # checked again under the lock: DeleteTransform takes it too
        spec = spec.checked(home, self.limits)
        with self._ddl_lock, self._registry_lock:
            if spec.name in self.collections:
                raise AlreadyExists(f"collection {spec.name!r} already exists")
            basis = self._basis(spec.basis_transform, home) if spec.basis_transform else None  # (fn, report)
            row = store.add_collection(spec)
            fn, report = basis if basis else (None, None)
            col = Collection(row, home, store, self._folder(row.cid), self.metrics, fn, report, device=self.device)
            col.recover()
            self.collections[spec.name] = col
        return col

    def _backend(self, spec: CollectionSpec) -> CollectionSpec:
        """``spec`` with its backend and uri resolved (the server's defaults for ""), checked."""
        backend = spec.backend or self.config.backend
        if backend not in BACKENDS:
            raise InvalidArgument(f"backend {spec.backend!r} is not one of {', '.join(BACKENDS)}")
        if backend == "embedded":
            if spec.backend_uri:
                raise InvalidArgument("backend_uri applies to the milvus backend; this collection is embedded")
            return dataclasses.replace(spec, backend=backend)
        if spec.auto:
            raise FailedPrecondition(
                "the milvus backend does not support index_spec 'auto' (the index advisor) yet; use backend 'embedded'"
            )
        if spec.train_min_points:
            raise InvalidArgument("train_min_points applies to the embedded backend; Milvus trains its own indexes")
        uri = spec.backend_uri or self.config.milvus_uri or str(Path(self.config.data_dir) / "milvus.db")
        return dataclasses.replace(spec, backend=backend, backend_uri=check_uri(uri, new=True))

    def _create_milvus(self, spec: CollectionSpec, home: SpaceRow, store: Store) -> MilvusCollection:
        """A ``milvus`` collection: the basis transform checked, the index spec mapped (INVALID_ARGUMENT),
        pymilvus present (FAILED_PRECONDITION), the engine's collection created with a vector field for the
        home space and the oldest other spaces (``MAX_VECTOR_FIELDS`` in all with a basis collection's basis
        field and a prefix collection's prefix field), then the row; the engine's collection is dropped
        again if the row cannot be written."""
        if spec.basis_transform:
            self._basis(spec.basis_transform, home)  # checked again under the lock: DeleteTransform takes it too
        parse_index(spec.index_spec.strip() or "Flat", spec.ef_construction)  # the supported specs, named
        spec = spec.checked(home, self.limits)
        require_pymilvus()
        with self._ddl_lock, self._registry_lock:
            if spec.name in self.collections:
                raise AlreadyExists(f"collection {spec.name!r} already exists")
            basis = self._basis(spec.basis_transform, home)[0] if spec.basis_transform else None
            others = sorted((s for s in self.spaces.values() if s.name != home.name), key=lambda s: s.created_at)
            spaces = [home, *others][:MAX_VECTOR_FIELDS]  # a vector field each (milvus_schema.py)
            row = CollectionRow(0, dataclasses.replace(spec, train_min_points=0), time.time(), 0, 0)
            try:
                probe = MilvusCollection(row, home, self.spaces, store, self.milvus, self.metrics, basis=basis)
                probe.create(spaces)
            except BaseException:
                self._unwatch_unused(spec.backend_uri)
                raise
            try:
                if self.shared is not None:
                    self.shared.require_sync()
                row = store.add_collection(row.spec)
            except BaseException:
                probe.drop_engine_side()
                raise
            if self.shared is not None:  # other front-ends attach it: AlreadyExists if one has the name
                try:
                    self.shared.publish_collection(row)
                except BaseException:
                    store.drop_collection(row.cid)
                    probe.drop_engine_side()
                    raise
            col = MilvusCollection(row, home, self.spaces, store, self.milvus, self.metrics, basis=basis)
            col.same_schema(probe)
            col.counts = {}
            if self.shared is not None:
                self.shared.hook(col)
            self.collections[spec.name] = col
        return col

    def _unwatch_unused(self, uri: str) -> None:
        """Stops the health checks of Milvus engine ``uri`` unless a collection uses it."""
        if not any(c.row.spec.backend_uri == uri for c in self.collections.values() if c.row.spec.on_milvus):
            self.milvus.unwatch(uri)

    def embedded_collection(self, name: str, feature: str) -> Collection:
        """Collection ``name`` on the embedded backend; FAILED_PRECONDITION naming ``feature`` on another."""
        col = self.collection(name)
        if not isinstance(col, Collection):
            raise FailedPrecondition(
                f"collection {name!r} is on the {col.backend} backend, which does not support {feature} yet"
            )
        return col

    def _basis(self, name: str, home: SpaceRow) -> tuple[Any, dict[str, Any]]:
        """(transform, report) of ``name`` if it is ready and maps the home space onto itself."""
        rec = self.require_compat().get(name)
        if rec.state != "ready" or rec.fn is None:
            raise FailedPrecondition(f"basis transform {name!r} is {rec.state}")
        if (rec.source, rec.target) != (home.name, home.name) or rec.fn.d_out != home.dim:
            raise InvalidArgument(
                f"basis transform {name!r} maps {rec.source!r} ({rec.d_in} dims) -> {rec.target!r} ({rec.d_out} dims);"
                f" a collection's basis must map its home space {home.name!r} onto itself"
            )
        return rec.fn, rec.report

    def delete_transform(self, name: str) -> TransformRecord:
        """Deletes transform ``name`` unless a collection or route uses it (``Compat.delete``), serialized
        with collection creation so that no new collection takes it as its basis meanwhile."""
        compat = self.require_compat()
        with self._ddl_lock:
            rec = compat.get(name)
            publish = self.shared if self.shared is not None and rec.state == "ready" else None
            # a published one is checked in full before the registry forgets it (compat.delete checks its
            # routes, chains and bases again, under its lock); otherwise compat.delete's check is the one
            users = self.transform_users(name) if publish else self.migrations.users(name) if self.migrations else []
            if users:
                raise FailedPrecondition(f"transform {name!r} is in use by {', '.join(users)}; stop those first")
            if publish is None:
                return compat.delete(name, list(self.collections.values()))
            try:
                publish.unpublish_transform(name)  # the other front-ends forget it
                return compat.delete(name, list(self.collections.values()))
            finally:
                publish.deleting.discard(name)

    def collection(self, name: str) -> AnyCollection:
        self._ready()
        col = self.collections.get(name)
        if col is None:
            raise NotFound(f"collection {name!r} does not exist")
        return col

    def list_collections(self) -> list[AnyCollection]:
        self._ready()
        return sorted(self.collections.values(), key=lambda c: c.name)

    def _migration(self, collection: str) -> MigrationBase | None:
        """The collection's running migration, if any (its writes and searches go through it)."""
        return self.migrations.get(collection) if self.migrations is not None else None

    def move_collection(self, name: str, backend: str, uri: str) -> MoveReport:
        """Moves embedded collection ``name`` to a Milvus engine while it serves (``backends/move.py``)."""
        if self.shared is not None and self.shared.exists(name):
            raise AlreadyExists(f"collection {name!r} already exists in the shared registry {self.shared.uri}")
        report = move_collection(self, name, backend, uri)
        col = self.collections.get(name)
        if self.shared is not None and isinstance(col, MilvusCollection):  # the other front-ends attach it
            self.shared.publish_collection(col.row)
            self.shared.hook(col)
        return report

    def _moved(self, name: str, col: AnyCollection, err: InterlinguaError) -> AnyCollection:
        """The collection that replaced ``col`` when a move retired it (a request that resolved it just
        before the switch is answered by the new one); ``err`` again otherwise."""
        now = self.collections.get(name)
        if col.retired and now is not None and now is not col and not now.retired:
            return now
        raise err

    def delete_collection(self, name: str) -> None:
        col = self.collection(name)
        if self.migrations is not None and self._migration(name) is not None:
            self.migrations.abort(name)  # its companion index goes with it
        with self._ddl_lock:
            if name in self.moving:
                raise FailedPrecondition(f"collection {name!r} is being moved; delete it after the move")
            on_milvus = col.row.spec.on_milvus
            with self._registry_lock:
                if self.collections.get(name) is not col:
                    raise NotFound(f"collection {name!r} does not exist")
                if not on_milvus:
                    del self.collections[name]
            if on_milvus and self.shared is not None:  # the other front-ends detach it
                self.shared.unpublish_collection(name)
            try:
                col.drop()  # milvus: the engine drops first, and may refuse (UNAVAILABLE): the collection stays
            except BaseException:
                if on_milvus and self.shared is not None:
                    self.shared.publish_collection(col.row)
                raise
            if on_milvus:
                with self._registry_lock:
                    del self.collections[name]
                self._unwatch_unused(col.row.spec.backend_uri)

    def recommend_index(
        self,
        collection: str,
        target_recall: float,
        k: int,
        data: bytes = b"",
        dim: int = 0,
        *,
        sample_size: int = 0,
        num_queries: int = 0,
        candidates: Sequence[str] = (),
    ) -> advisor.Recommendation:
        """The index advisor on a collection (``advisor.py``): checked here, run on a worker thread
        with the maintenance thread's OpenMP threads and priority, one run at a time."""
        col = self.embedded_collection(collection, "RecommendIndex")
        k, specs = advisor.check_request(col, self.limits, target_recall, k, candidates)
        if num_queries > self.limits.max_nq:  # held-out queries are read and searched like given ones
            raise InvalidArgument(f"num_queries is {num_queries}; it must be at most max_nq={self.limits.max_nq}")
        queries = None
        if data:
            queries = v.unpack_vectors(data, dim, col.home.dim, what="queries", limit=self.limits.max_nq)
            if col.home.metric == "cosine":
                queries = v.normalize_rows(queries, what="queries")
        c = self.config

        def setup() -> None:
            faiss.omp_set_num_threads(c.omp_threads)
            lower_priority(c.maintenance_nice)

        rec = advisor.run_in_worker(
            lambda: advisor.recommend_collection(
                col, target_recall, k, queries=queries, sample_size=sample_size, num_queries=num_queries,
                candidates=specs,
            ),
            setup,
        )  # fmt: skip
        if self.collections.get(collection) is not col or col.dropped:  # deleted (or replaced) meanwhile
            raise NotFound(f"collection {collection!r} was deleted while RecommendIndex measured it")
        return rec

    # -- points --------------------------------------------------------------------------------

    def upsert(self, collection: str, space: str, ids: list[str], data: bytes, dim: int, payloads: list[str]) -> int:
        col = self.collection(collection)
        sp = self.get_space(space)
        v.check_ids(ids, self.limits)
        x = v.unpack_vectors(data, dim, sp.dim, what="vectors", limit=self.limits.max_batch)
        if len(x) != len(ids):
            raise InvalidArgument(f"vectors: {len(x)} vectors for {len(ids)} ids")
        plds = v.check_payloads(payloads, len(ids), self.limits)
        if sp.metric == "cosine":
            x = v.normalize_rows(x, what="vectors")
        mig = self._migration(collection)
        if mig is not None:
            return mig.upsert(sp, ids, x, plds)
        try:
            return col.upsert(sp, ids, x, plds)
        except Unavailable as e:
            return self._moved(collection, col, e).upsert(sp, ids, x, plds)

    def delete_points(self, collection: str, ids: list[str], missing_ok: bool) -> tuple[int, int]:
        col = self.collection(collection)
        v.check_ids(ids, self.limits)
        mig = self._migration(collection)
        if mig is not None:
            return mig.delete(ids, missing_ok)
        try:
            return col.delete(ids, missing_ok)
        except Unavailable as e:
            return self._moved(collection, col, e).delete(ids, missing_ok)

    def get_points(
        self, collection: str, ids: list[str], with_vectors: bool, with_payload: bool, spaces: list[str]
    ) -> list[PointRecord]:
        col = self.collection(collection)
        v.check_ids(ids, self.limits)
        for s in spaces:
            self.get_space(s)
        mig = self._migration(collection)
        if mig is not None:  # a milvus migration's index switch holds reads by id (milvus_migration.py)
            with mig.reading():
                return col.get(ids, with_vectors, with_payload, set(spaces))
        try:
            return col.get(ids, with_vectors, with_payload, set(spaces))
        except (Unavailable, NotFound) as e:  # NotFound: its points were dropped after a move's switch
            return self._moved(collection, col, e).get(ids, with_vectors, with_payload, set(spaces))

    def search(
        self, collection: str, query_space: str, data: bytes, dim: int, params: SearchParams, with_payload: bool = False
    ) -> SearchResult:
        """The query path of ``pipeline.py`` (route -> home -> basis -> index -> ids), then payloads;
        a sampled batch is mirrored to the route's shadow candidate, off the reply path."""
        if not with_payload and params.shortlist_k is None and not params.funnel and len(data) == 4 * dim:
            p, x = params, np.frombuffer(data, dtype="<f4")
            one = serial.search_one(self, collection, query_space, x, p.k, p.ef_search, p.nprobe, p.k_factor)
            if one is not None:  # the plain single-query case, in one function (serial.py)
                return one
        return self.search_pipeline(collection, query_space, data, dim, params, with_payload)

    def search_pipeline(
        self, collection: str, query_space: str, data: bytes, dim: int, params: SearchParams, with_payload: bool = False
    ) -> SearchResult:
        """:meth:`search` without its serial attempt: for callers that tried ``serial.search_one``
        themselves and were declined (the gRPC servicer), so it is not tried twice."""
        t0 = time.perf_counter()
        # the lookups of collection(), _migration() and get_space(), inline (the serial path pays per call)
        col = self.collections.get(collection) if self.state is Lifecycle.SERVING else None
        if col is None:
            col = self.collection(collection)  # its error
        mig = self.migrations.active.get(collection) if self.migrations is not None else None
        space = self.spaces.get(query_space) or self.get_space(query_space)
        if mig is not None:  # which index answers which space in which phase: server/migration/search.py
            t1 = t0
            hits, route = migration_search(mig, space, data, dim, params, self.limits, self.device)
        else:
            q = clamp_shortlist(pipeline.prepare(col, space, data, dim, params, self.limits))
            t1 = time.perf_counter()
            route = q.route
            hits = pipeline.run(q, route.fn, self.device)
            if route.shadow is not None and self.shadows is not None:
                self.shadows.submit(q, hits.ids)
        if route.transform != IDENTITY:
            self._child(self.metrics.transform_seconds, route.transform).observe(hits.map_seconds)
        base = check_reply(hits.ids, route, self.limits.max_message_bytes, self.limits.max_id_bytes, with_payload)
        payloads: list[str] | None = None
        fetch: float | None = None
        if with_payload:
            t3 = time.perf_counter()
            payloads = self._payloads(col, collection, mig, hits.ids, base)
            fetch = time.perf_counter() - t3
        timers = col.stage_timers  # one append for the four stage timers (metrics.StageTimes)
        timers.append((t1 - t0, hits.transform_seconds, hits.index_seconds, fetch))
        if len(timers) >= FOLD_EVERY:
            timers.fold()
        self._child(self.metrics.search_queries, col.name, query_space, route.transform).inc(len(hits.D))
        return SearchResult(hits.D, hits.ids, payloads, route, exact=hits.snapshot.sealed is None)

    def _payloads(
        self, col: AnyCollection, name: str, mig: MigrationBase | None, ids: np.ndarray, base: int
    ) -> list[str]:
        """The payloads of hits ``ids`` for a reply of ``base`` bytes without them, within the send limit
        (:func:`bounded_payloads`), read under a migration's read lock; from the collection that
        replaced ``col`` when a move retired it meanwhile (its store rows may be gone)."""
        limit = self.limits.max_message_bytes
        with mig.reading() if mig is not None else contextlib.nullcontext():
            payloads = bounded_payloads(ids, col.payloads, base, limit)
        if col.retired:
            payloads = bounded_payloads(ids, self.collection(name).payloads, base, limit)
        return payloads

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: prometheus_client's lookup (checks, a lock) cost
        ~2 µs a search. For series nothing removes (search_queries, transform_seconds)."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child


# -- search helpers: the funnel's working set and the reply's size -----------------------------


def clamp_shortlist(q: Query) -> Query:
    """``q`` with an embedded prefix collection's shortlist cut to the live labels its index holds
    (:func:`~.funnel.clamp_funnel`: the same hits; labels a racing write adds after the count may
    fall past the cut)."""
    col = q.col
    if not q.funnel[1] or not isinstance(col, Collection):
        return q
    s = col.segments.snapshot
    funnel = clamp_funnel(q.funnel, q.params.k, s.nsealed - s.ndead_sealed + s.nfresh - s.ndead_fresh)
    return q if funnel is q.funnel else dataclasses.replace(q, funnel=funnel)


def _field_bytes(n: int) -> int:
    """Bytes of a length-delimited protobuf field (numbers 1-15) with an n-byte value: tag, length varint, value."""
    return 2 + n + (n >= 1 << 7) + (n >= 1 << 14) + (n >= 1 << 21) + (n >= 1 << 28)


def _utf8_bytes(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode())


def reply_bytes(ids: np.ndarray, route: Route) -> int:
    """Serialized bytes of the SearchResponse of hits ``ids`` (nq, k) without payloads: the ids, the
    scores (4 bytes a hit), the route, nq, k and exact."""
    n = ids.size
    id_part = sum(_field_bytes(_utf8_bytes(p)) for p in ids.ravel().tolist())
    names = (route.query_space, route.home_space, route.transform)
    route_part = _field_bytes(sum(_field_bytes(_utf8_bytes(s)) for s in names))
    return id_part + _field_bytes(4 * n) + route_part + 14  # nq and k: 6 bytes each at most, exact: 2


def _too_large(shape: tuple[int, ...], need: int, limit: int, with_payload: bool, partial: bool) -> ResourceExhausted:
    nq, k = shape
    what, hint = ("with payloads ", ", or search with with_payload=false") if with_payload else ("", "")
    return ResourceExhausted(
        f"the reply to nq={nq} queries with k={k} {what}needs {'at least ' if partial else ''}{need} bytes, over "
        f"the server's send limit of {limit} bytes (max_message_bytes); ask for fewer queries or a smaller k{hint}"
    )


def check_reply(ids: np.ndarray, route: Route, limit: int, id_bytes: int, with_payload: bool) -> int:
    """The bytes of the reply to hits ``ids`` (nq, k) without payloads (exact with ``with_payload``,
    else an upper bound while that fits, which spares a pass over the ids); RESOURCE_EXHAUSTED when
    it is over ``limit``, gRPC's send limit."""
    if not with_payload:  # ids at their longest, 4 bytes of score each, and 1 KiB for the route (three names of
        bound = ids.size * (_field_bytes(id_bytes) + 4) + 1024  # at most 128 ASCII characters), nq, k and exact
        if bound <= limit:
            return bound
    need = reply_bytes(ids, route)
    if need > limit:
        raise _too_large(ids.shape, need, limit, with_payload, partial=False)
    return need


def bounded_payloads(ids: np.ndarray, read: Callable[[np.ndarray], list[str]], base: int, limit: int) -> list[str]:
    """Payloads aligned with hits ``ids`` (nq, k), flattened, "" for none; ``read`` gives them for an
    array of ids. Distinct ids are read :data:`PAYLOAD_READ_CHUNK` at a time, each payload counted
    once per hit (the reply copies it per hit), on top of the ``base`` bytes of the reply without
    them: RESOURCE_EXHAUSTED as soon as the total passes ``limit``, and nothing more is read."""
    flat = ids.ravel().tolist()
    counts = Counter(flat)
    need = base + _field_bytes(0) * counts.pop("", 0)  # an empty payload for each missing hit
    distinct = list(counts)
    found: dict[str, str] = {}
    for i in range(0, len(distinct), PAYLOAD_READ_CHUNK):
        chunk = distinct[i : i + PAYLOAD_READ_CHUNK]
        for pid, payload in zip(chunk, read(np.array(chunk, dtype=object)), strict=True):
            found[pid] = payload
            need += counts[pid] * _field_bytes(_utf8_bytes(payload))
        if need > limit:
            raise _too_large(ids.shape, need, limit, True, partial=i + PAYLOAD_READ_CHUNK < len(distinct))
    return [found[p] if p else "" for p in flat]
