"""The engine's lifecycle: open, serve, drain, stop, and the maintenance thread between.

:class:`EngineLifecycle` opens the store, loads the transform registry and the route tables,
recovers every collection (one that cannot be opened is marked failed; the server still starts)
and starts the one maintenance thread, which merges, checkpoints and compacts at a lower
priority. Its state (:class:`Lifecycle`: loading -> serving -> draining -> stopped) drives the
health service, and every request waits for SERVING (:meth:`~EngineLifecycle._ready`). The
request-facing methods are :class:`~.engine.Engine`'s. Covered by ``tests/test_durability.py``
(restart, health while loading), ``tests/test_index_safety.py`` (collections that cannot be
opened) and ``tests/test_search_thread.py`` (the maintenance thread's priority).
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import faiss

from .activation import GatePolicy
from .backends.base import AnyCollection
from .backends.milvus import MilvusCollection
from .backends.milvus_engines import MilvusEngines
from .backends.milvus_schema import check_uri, require_pymilvus
from .collection import Collection
from .compat import Compat
from .config import ServerConfig
from .device import Device
from .errors import Unavailable
from .metrics import Metrics
from .migration.manager import Migrations
from .migration.runtime import COMPANION_PREFIX
from .restore import lock_data_dir
from .routes import Routes
from .shadow import ShadowRunner
from .shared import SharedRegistry
from .store import SpaceRow, Store
from .transforms import Transform

__all__ = ["EngineLifecycle", "Lifecycle", "limit_numpy_blas", "lower_priority"]

log = logging.getLogger(__name__)


class Lifecycle(enum.Enum):
    LOADING = "loading"  #: opening the store, loading checkpoints, replaying writes: NOT_SERVING
    SERVING = "serving"  #: ready for every RPC: SERVING
    DRAINING = "draining"  #: shutting down, finishing in-flight RPCs: NOT_SERVING
    STOPPED = "stopped"  #: closed


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


class EngineLifecycle:
    """The engine's state and lifecycle; :class:`~.engine.Engine` adds the requests."""

    def __init__(self, config: ServerConfig, metrics: Metrics) -> None:
        self.config = config
        self.limits = config.limits
        self.metrics = metrics
        self.device = Device.parse(config.device)  #: shared by every collection: one GPU, one lock
        self.device.omp_threads = config.omp_threads  # the CPU search thread's OpenMP team
        self.device.check_available()  # a GPU asked for but absent fails the start, not the first search
        if config.backend == "milvus":  # `serve --backend milvus` without the extra exits with the install hint
            require_pymilvus()
        if config.milvus_uri:
            check_uri(config.milvus_uri)
        self.state = Lifecycle.LOADING
        self.on_state: list[Callable[[Lifecycle], None]] = []
        self.store: Store | None = None
        self.spaces: dict[str, SpaceRow] = {}
        self.collections: dict[str, AnyCollection] = {}
        #: the Milvus engines of ``milvus`` collections (``server/backends``): clients, errors, health
        self.milvus = MilvusEngines(config.milvus_timeout_seconds, config.milvus_check_seconds, self._health_changed)
        self._registry_lock = threading.Lock()
        #: collections a MoveCollection is copying (``backends/move.py``): not deleted, not migrated meanwhile
        self.moving: set[str] = set()
        #: serializes CreateCollection and DeleteCollection as a whole: a create of a name being
        #: dropped once hit the store's unique constraint (sqlite3.IntegrityError -> INTERNAL)
        self._ddl_lock = threading.Lock()
        self._stop = threading.Event()
        self._maintainer: threading.Thread | None = None
        self.compat: Compat | None = None  #: the transform registry
        self.routes: Routes | None = None  #: the owner of every collection's route table
        self.shadows: ShadowRunner | None = None  #: runs the shadow searches of routes that have one
        self.migrations: Migrations | None = None  #: every collection's model migration (server/migration)
        #: the registry shared with other front-ends (``shared.py``; ``registry`` in the config), or None
        self.shared: SharedRegistry | None = None
        #: exclusive, pid inside: a second server, embedded client or restore on the folder is refused
        self._dir_lock: IO[bytes] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def _set_state(self, state: Lifecycle) -> None:
        self.state = state
        for fn in self.on_state:
            fn(state)

    def _health_changed(self) -> None:
        """A Milvus engine went down or came back: the health service re-reads :meth:`healthy`."""
        for fn in self.on_state:
            fn(self.state)

    def healthy(self) -> bool:
        """SERVING, every Milvus engine in use reachable and the shared registry (if any) in sync: what the
        health service reports as SERVING."""
        in_sync = self.shared is None or self.shared.in_sync
        return self.state is Lifecycle.SERVING and self.milvus.reachable() and in_sync

    def open(self) -> None:
        """Opens the store and recovers every collection, then serves. Idempotent per engine."""
        start = time.perf_counter()
        faiss.omp_set_num_threads(self.config.omp_threads)
        limit_numpy_blas(self.config.numpy_blas_threads)
        data = Path(self.config.data_dir)
        self.lock_data_dir()
        self.store = Store(data / "interlingua.db")
        self.spaces = {s.name: s for s in self.store.spaces()}
        self.compat = Compat(self.store, self.metrics, omp_threads=self.config.omp_threads)
        self.routes = Routes(self.store, self.metrics, self.compat, policy=self.gate_policy())
        self.shadows = ShadowRunner(self.metrics, self.config.omp_threads)
        self.compat.load_transforms()  # before the collections: a basis transform shapes their indexes
        replayed = 0
        c = self.config
        companions: dict[int, Collection] = {}  # a migration's new-space indexes (server/migration)
        for row in self.store.collections():
            spec = row.spec
            home, folder = self.spaces[spec.home_space], self._folder(row.cid)
            if spec.on_milvus:  # attaches to its Milvus collection; the engine is reached on first use
                self._drop_moved_leftovers(row.cid, folder)
                basis = self.loaded_basis(spec.basis_transform)
                self.collections[spec.name] = MilvusCollection(
                    row, home, self.spaces, self.store, self.milvus, self.metrics, basis=basis
                )
                continue
            try:
                basis = self.compat.get(spec.basis_transform).fn if spec.basis_transform else None
                col = Collection(row, home, self.store, folder, self.metrics, basis, device=self.device)
                replayed += col.recover(c.compact_dead_fraction, c.compact_min_dead)
            except Exception as e:  # one collection never keeps the server from starting
                log.exception("collection %s cannot be opened; it is marked failed", spec.name)
                col = Collection(row, home, self.store, folder, self.metrics, None, device=self.device)
                col.fail(f"cannot be opened: {type(e).__name__}: {e}"[:300], permanent=True)
                col.recover()
            if spec.name.startswith(COMPANION_PREFIX):
                companions[row.cid] = col
            else:
                self.collections[spec.name] = col
        self.routes.load(self.collections)
        self.migrations = Migrations(self)  # type: ignore[arg-type]  # an Engine: the request methods are its
        self.migrations.load(companions)
        log.info(
            "recovered %d spaces, %d collections, %d replayed vectors in %.2fs",
            len(self.spaces),
            len(self.collections),
            replayed,
            time.perf_counter() - start,
        )
        if c.registry:  # NOT_SERVING until the first read of the registry; etcd down never stops a start
            self.shared = SharedRegistry(self, c.registry, c.registry_timeout_seconds)  # type: ignore[arg-type]
            self.routes.shared = self.shared
            self.shared.start()
        self._maintainer = threading.Thread(target=self._maintain_loop, name="interlingua-maintain", daemon=True)
        self._maintainer.start()
        self._set_state(Lifecycle.SERVING)

    def _drop_moved_leftovers(self, cid: int, folder: Path) -> None:
        """A collection moved to milvus whose embedded points or index files were not all dropped before a
        crash (``backends/move.py``: the switch was durable, the clean-up not): drops them now."""
        assert self.store is not None
        if self.store.point_count(cid):
            n = 0
            while m := self.store.purge_points(cid, 40960):
                n += m
            log.info("dropped %d embedded points left over by the move of collection %d to milvus", n, cid)
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)

    def lock_data_dir(self) -> None:
        """Takes the data dir's exclusive lock (creating the folder) unless held: FailedPrecondition,
        naming the folder and the holder's pid, while another process (or engine) has it open."""
        if self._dir_lock is None:
            data = Path(self.config.data_dir)
            (data / "collections").mkdir(parents=True, exist_ok=True)
            self._dir_lock = lock_data_dir(data, purpose="open")

    def close(self) -> None:
        if self.state is Lifecycle.STOPPED:
            return
        self._set_state(Lifecycle.DRAINING)
        faiss.omp_set_num_threads(self.config.omp_threads)  # the final merges run on this thread
        self._stop.set()
        if self._maintainer is not None:
            self._maintainer.join()
        if self.shared is not None:
            self.shared.close()
        if self.compat is not None:
            self.compat.close()
        if self.shadows is not None:
            self.shadows.close()
        if self.migrations is not None:
            self.migrations.close()
        for col in self._maintained():
            try:
                col.maintain(force=True, checkpoint_after=self.config.checkpoint_after_merge)
            except Exception:  # shutting down: the store is the source of truth anyway
                log.exception("final merge of %s failed", col.name)
        self.device.close()
        self.milvus.close()
        if self.store is not None:
            self.store.close()
        if self._dir_lock is not None:
            self._dir_lock.close()
            self._dir_lock = None
        self._set_state(Lifecycle.STOPPED)

    def _maintain_loop(self) -> None:
        c = self.config
        lower_priority(c.maintenance_nice)  # before the first OpenMP region: its team inherits it
        faiss.omp_set_num_threads(c.omp_threads)  # per thread: merges and training honour the setting too
        while not self._stop.wait(0.1):
            for col in self._maintained():
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

    def _maintained(self) -> list[AnyCollection]:
        """Every collection the maintenance thread merges: the users' and the migrations' companions."""
        extra = self.migrations.all_collections() if self.migrations is not None else []
        return [*self.collections.values(), *extra]

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

    def transform_users(self, name: str) -> list[str]:
        """What uses transform ``name`` here: routes, shadows, chains, bases (``Compat.users``) and migrations."""
        assert self.compat is not None
        users = self.compat.users(name, list(self.collections.values()))
        return users + (self.migrations.users(name) if self.migrations is not None else [])

    def loaded_basis(self, name: str) -> Transform | None:
        """The function of basis transform ``name`` for a milvus collection opened here (at start-up, or
        attached from a shared registry); None for "", and for a transform not loaded here (logged: the
        collection's writes and searches then fail with FAILED_PRECONDITION, ``MilvusCollection.to_basis``,
        where an embedded one would be marked failed). Creations check theirs first (``Engine._basis``)."""
        if not name:
            return None
        rec = self.compat.transforms.get(name) if self.compat is not None else None
        if rec is None or rec.fn is None:
            log.error("basis transform %s is not loaded; the milvus collections that use it refuse requests", name)
            return None
        return rec.fn

    def require_routes(self) -> Routes:
        """The route tables (activate, roll back, shadow), once the service is serving."""
        self._ready()
        if self.routes is None:
            raise Unavailable("the compatibility layer is not loaded yet")
        return self.routes
