"""The domain core: spaces, collections and points, with no gRPC in sight.

:class:`Engine` validates every request at its boundary (``validate.py``),
dispatches to the :class:`~.collection.Collection`, and owns the lifecycle
(loading -> serving -> draining -> stopped) that drives the health service.
A query's path reads one way, live or shadow (``pipeline.py``)::

    validate -> resolve the route -> transform -> basis -> FAISS search -> labels to ids -> reply
"""

from __future__ import annotations

import enum
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import faiss
import numpy as np

from . import pipeline
from . import validate as v
from .activation import GatePolicy
from .collection import Collection, PointRecord
from .compat import Compat, TransformRecord
from .config import ServerConfig
from .device import Device
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from .metrics import Metrics
from .pipeline import SearchParams
from .restore import lock_data_dir
from .routes import IDENTITY, Route, Routes
from .segments import IndexSpec
from .shadow import ShadowRunner
from .store import SpaceRow, Store

__all__ = ["Engine", "Lifecycle", "SearchResult"]

log = logging.getLogger(__name__)


class Lifecycle(enum.Enum):
    LOADING = "loading"  #: opening the store, loading checkpoints, replaying writes: NOT_SERVING
    SERVING = "serving"  #: ready for every RPC: SERVING
    DRAINING = "draining"  #: shutting down, finishing in-flight RPCs: NOT_SERVING
    STOPPED = "stopped"  #: closed


@dataclass(frozen=True)
class SearchResult:
    D: np.ndarray  #: scores, shape (nq, k) float32
    ids: np.ndarray  #: point ids, shape (nq, k) object ("" pads missing hits)
    payloads: list[str] | None  #: nq*k JSON payloads, row-major, with with_payload
    route: Route
    exact: bool


def limit_numpy_blas(threads: int) -> None:
    """Sets the thread count of numpy's own BLAS library (FAISS bundles its own, left alone)."""
    from threadpoolctl import ThreadpoolController

    for lib in ThreadpoolController().lib_controllers:
        if lib.user_api == "blas" and Path(lib.filepath).parent.name.startswith("numpy"):
            lib.set_num_threads(threads)


def lower_priority(nice: int) -> None:
    """Raises the calling thread's nice value by ``nice`` (Linux: per thread, inherited by threads
    it starts, such as its OpenMP team). Background merges then yield the cores to writes and
    searches instead of halving them: on 2 cores a 1M-vector ingest acknowledged 18k vectors/s
    while HNSW merges ran beside it at equal priority (bench/peers.py)."""
    if nice <= 0 or sys.platform != "linux":
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + nice, 19))
    except OSError as e:  # e.g. a seccomp profile without setpriority: run at normal priority
        log.warning("could not lower the maintenance thread's priority: %s", e)


class Engine:
    def __init__(self, config: ServerConfig, metrics: Metrics) -> None:
        self.config = config
        self.limits = config.limits
        self.metrics = metrics
        self.device = Device.parse(config.device)  #: shared by every collection: one GPU, one lock
        self.device.omp_threads = config.omp_threads  # the CPU search thread's OpenMP team
        self.device.check_available()  # a GPU asked for but absent fails the start, not the first search
        self.state = Lifecycle.LOADING
        self.on_state: list[Callable[[Lifecycle], None]] = []
        self.store: Store | None = None
        self.spaces: dict[str, SpaceRow] = {}
        self.collections: dict[str, Collection] = {}
        self._registry_lock = threading.Lock()
        #: serializes CreateCollection and DeleteCollection as a whole: a create of a name being
        #: dropped once hit the store's unique constraint (sqlite3.IntegrityError -> INTERNAL)
        self._ddl_lock = threading.Lock()
        self._stop = threading.Event()
        self._maintainer: threading.Thread | None = None
        self.compat: Compat | None = None  #: the transform registry
        self.routes: Routes | None = None  #: the owner of every collection's route table
        self.shadows: ShadowRunner | None = None  #: runs the shadow searches of routes that have one
        self._dir_lock: IO[bytes] | None = None  #: shared: `interlingua restore` refuses while it is held

    # -- lifecycle -----------------------------------------------------------------------------

    def _set_state(self, state: Lifecycle) -> None:
        self.state = state
        for fn in self.on_state:
            fn(state)

    def open(self) -> None:
        """Opens the store and recovers every collection, then serves. Idempotent per engine."""
        start = time.perf_counter()
        faiss.omp_set_num_threads(self.config.omp_threads)
        limit_numpy_blas(self.config.numpy_blas_threads)
        data = Path(self.config.data_dir)
        (data / "collections").mkdir(parents=True, exist_ok=True)
        self._dir_lock = lock_data_dir(data)
        self.store = Store(data / "interlingua.db")
        self.spaces = {s.name: s for s in self.store.spaces()}
        self.compat = Compat(self.store, self.metrics, omp_threads=self.config.omp_threads)
        self.routes = Routes(self.store, self.metrics, self.compat, policy=self.gate_policy())
        self.shadows = ShadowRunner(self.metrics, self.config.omp_threads)
        self.compat.load_transforms()  # before the collections: a basis transform shapes their indexes
        replayed = 0
        c = self.config
        for row in self.store.collections():
            home, folder = self.spaces[row.home_space], self._folder(row.cid)
            try:
                basis = self.compat.get(row.basis_transform).fn if row.basis_transform else None
                col = Collection(row, home, self.store, folder, self.metrics, basis, device=self.device)
                replayed += col.recover(c.compact_dead_fraction, c.compact_min_dead)
            except Exception as e:  # one collection never keeps the server from starting
                log.exception("collection %s cannot be opened; it is marked failed", row.name)
                col = Collection(row, home, self.store, folder, self.metrics, None, device=self.device)
                col.fail(f"cannot be opened: {type(e).__name__}: {e}"[:300], permanent=True)
                col.recover()
            self.collections[row.name] = col
        self.routes.load(self.collections)
        log.info(
            "recovered %d spaces, %d collections, %d replayed vectors in %.2fs",
            len(self.spaces),
            len(self.collections),
            replayed,
            time.perf_counter() - start,
        )
        self._maintainer = threading.Thread(target=self._maintain_loop, name="interlingua-maintain", daemon=True)
        self._maintainer.start()
        self._set_state(Lifecycle.SERVING)

    def close(self) -> None:
        if self.state is Lifecycle.STOPPED:
            return
        self._set_state(Lifecycle.DRAINING)
        faiss.omp_set_num_threads(self.config.omp_threads)  # the final merges run on this thread
        self._stop.set()
        if self._maintainer is not None:
            self._maintainer.join()
        if self.compat is not None:
            self.compat.close()
        if self.shadows is not None:
            self.shadows.close()
        for col in list(self.collections.values()):
            try:
                col.maintain(force=True, checkpoint_after=self.config.checkpoint_after_merge)
            except Exception:  # shutting down: the store is the source of truth anyway
                log.exception("final merge of %s failed", col.name)
        self.device.close()
        if self.store is not None:
            self.store.close()
        if self._dir_lock is not None:
            self._dir_lock.close()
        self._set_state(Lifecycle.STOPPED)

    def _maintain_loop(self) -> None:
        c = self.config
        lower_priority(c.maintenance_nice)  # before the first OpenMP region: its team inherits it
        faiss.omp_set_num_threads(c.omp_threads)  # per thread: merges and training honour the setting too
        while not self._stop.wait(0.1):
            for col in list(self.collections.values()):
                try:
                    col.maintain(
                        min_fresh=c.merge_min_fresh,
                        fraction=c.merge_fraction,
                        idle_seconds=c.merge_idle_seconds,
                        checkpoint_after=c.checkpoint_after_merge,
                        compact_fraction=c.compact_dead_fraction,
                        compact_min_dead=c.compact_min_dead,
                    )
                except Exception:
                    log.exception("maintenance of collection %s failed; will retry", col.name)

    def _folder(self, cid: int) -> Path:
        return Path(self.config.data_dir) / "collections" / str(cid)

    def _ready(self) -> Store:
        if self.state is not Lifecycle.SERVING or self.store is None:
            raise Unavailable(f"the service is {self.state.value}; retry when health reports SERVING")
        return self.store

    def gate_policy(self) -> GatePolicy:
        """The server's default activation gate, from its config."""
        c = self.config
        return GatePolicy(c.min_retention, c.max_negative_flip_rate, c.require_ecc)

    def require_compat(self) -> Compat:
        """The transform registry, once the service is serving."""
        self._ready()
        if self.compat is None:
            raise Unavailable("the compatibility layer is not loaded yet")
        return self.compat

    def require_routes(self) -> Routes:
        """The route tables (activate, roll back, shadow), once the service is serving."""
        self._ready()
        if self.routes is None:
            raise Unavailable("the compatibility layer is not loaded yet")
        return self.routes

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

    def create_collection(
        self,
        name: str,
        home_space: str,
        index_spec: str,
        train_min_points: int,
        prefix_dims: int = 0,
        basis_transform: str = "",
        ef_construction: int = 0,
    ) -> Collection:
        store = self._ready()
        v.check_collection_name(name)
        home = self.get_space(home_space)
        if basis_transform:
            self._basis(basis_transform, home)  # checked again under the lock: DeleteTransform takes it too
        if prefix_dims and not 0 < prefix_dims < home.dim:
            raise InvalidArgument(
                f"prefix_dims is {prefix_dims}; it must be between 1 and dim-1 = {home.dim - 1} (0 indexes all dims)"
            )
        lim = self.limits
        spec = IndexSpec.parse(
            index_spec,
            prefix_dims or home.dim,
            home.metric,
            ef_construction,
            max_nlist=lim.max_nlist,
            max_overhead_bytes=lim.max_index_overhead_bytes,
        )
        train_min = spec.check_train_min(train_min_points)
        with self._ddl_lock, self._registry_lock:
            if name in self.collections:
                raise AlreadyExists(f"collection {name!r} already exists")
            basis = self._basis(basis_transform, home) if basis_transform else None  # (fn, report)
            row = store.add_collection(
                name, home_space, spec.spec, train_min, prefix_dims, basis_transform, ef_construction
            )
            fn, report = basis if basis else (None, None)
            col = Collection(row, home, store, self._folder(row.cid), self.metrics, fn, report, device=self.device)
            col.recover()
            self.collections[name] = col
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
            return compat.delete(name, list(self.collections.values()))

    def collection(self, name: str) -> Collection:
        self._ready()
        col = self.collections.get(name)
        if col is None:
            raise NotFound(f"collection {name!r} does not exist")
        return col

    def list_collections(self) -> list[Collection]:
        self._ready()
        return sorted(self.collections.values(), key=lambda c: c.name)

    def delete_collection(self, name: str) -> None:
        col = self.collection(name)
        with self._ddl_lock:
            with self._registry_lock:
                if self.collections.get(name) is not col:
                    raise NotFound(f"collection {name!r} does not exist")
                del self.collections[name]
            col.drop()

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
        return col.upsert(sp, ids, x, plds)

    def delete_points(self, collection: str, ids: list[str], missing_ok: bool) -> tuple[int, int]:
        col = self.collection(collection)
        v.check_ids(ids, self.limits)
        return col.delete(ids, missing_ok)

    def get_points(
        self, collection: str, ids: list[str], with_vectors: bool, with_payload: bool, spaces: list[str]
    ) -> list[PointRecord]:
        col = self.collection(collection)
        v.check_ids(ids, self.limits)
        for s in spaces:
            self.get_space(s)
        return col.get(ids, with_vectors, with_payload, set(spaces))

    def search(
        self, collection: str, query_space: str, data: bytes, dim: int, params: SearchParams, with_payload: bool = False
    ) -> SearchResult:
        """The query path of ``pipeline.py`` (route -> home -> basis -> index -> ids), then payloads;
        a sampled batch is mirrored to the route's shadow candidate, off the reply path."""
        t0 = time.perf_counter()
        col = self.collection(collection)
        q = pipeline.prepare(col, self.get_space(query_space), data, dim, params, self.limits)
        t1 = time.perf_counter()
        route = q.route
        hits = pipeline.run(q, route.fn, self.device)
        if route.transform != IDENTITY:
            self.metrics.transform_seconds.labels(route.transform).observe(hits.map_seconds)
        if route.shadow is not None and self.shadows is not None:
            self.shadows.submit(q, hits.ids)
        t3 = time.perf_counter()
        payloads = col.payloads(hits.ids) if with_payload else None
        t4 = time.perf_counter()
        timers = col.stage_timers
        timers["validate"].observe(t1 - t0)
        timers["transform"].observe(hits.transform_seconds)
        timers["index"].observe(hits.index_seconds)
        if with_payload:
            timers["fetch"].observe(t4 - t3)
        self.metrics.search_queries.labels(col.name, q.space.name, route.transform).inc(len(q.xq))
        return SearchResult(hits.D, hits.ids, payloads, route, exact=hits.snapshot.sealed is None)
