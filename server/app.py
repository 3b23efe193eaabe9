"""Server assembly: ``create_server(config) -> (server, port)``, ``serve(config)``.

The standard ``grpc.health.v1`` service reports NOT_SERVING while the engine
loads and recovers (which runs in the background after :meth:`Server.start`)
and while it drains, and while a Milvus engine that ``milvus`` collections use is
unreachable (``server/backends``), SERVING otherwise; every other RPC answers UNAVAILABLE
until then. Server reflection is on, so ``grpcurl list`` works.

Interceptors, outermost first: the gate (``gate.py``: API key, role, rate limit,
open-stream slots), metrics (``metrics.py``: known methods only), decoding
(``rpcwrap.py``: a request that does not parse is INVALID_ARGUMENT). gRPC refuses
a message over ``Limits.receive_bytes`` before parsing it, and runs at most
``Limits.max_concurrent_rpcs`` calls. With ``config.tls`` the port serves TLS
(client certificates required when ``tls.client_ca`` is set).
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from types import FrameType
from typing import Any

import faiss
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter

from interlingua.v1 import collections_pb2, migrations_pb2, points_pb2, snapshots_pb2, spaces_pb2, transforms_pb2
from interlingua.v1 import collections_pb2_grpc as cgrpc
from interlingua.v1 import migrations_pb2_grpc as mgrpc
from interlingua.v1 import points_pb2_grpc as pgrpc
from interlingua.v1 import snapshots_pb2_grpc as sngrpc
from interlingua.v1 import spaces_pb2_grpc as sgrpc
from interlingua.v1 import transforms_pb2_grpc as tgrpc

from .auth import Keyring
from .config import ServerConfig, TLSConfig
from .engine import Engine, Lifecycle
from .errors import InvalidArgument
from .gate import GateInterceptor
from .metrics import Metrics, MetricsInterceptor
from .migration_servicer import MigrationServicer
from .rpcwrap import DecodeInterceptor
from .servicers import CollectionServicer, PointServicer, SpaceServicer
from .snapshot_servicer import SnapshotServicer
from .throttle import RateLimiter, StreamSlots
from .transform_servicer import TransformServicer

__all__ = ["Server", "create_server", "serve", "server_credentials"]

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    spaces_pb2.DESCRIPTOR.services_by_name["SpaceService"].full_name,
    collections_pb2.DESCRIPTOR.services_by_name["CollectionService"].full_name,
    points_pb2.DESCRIPTOR.services_by_name["PointService"].full_name,
    transforms_pb2.DESCRIPTOR.services_by_name["TransformService"].full_name,
    snapshots_pb2.DESCRIPTOR.services_by_name["SnapshotService"].full_name,
    migrations_pb2.DESCRIPTOR.services_by_name["MigrationService"].full_name,
)


class Server:
    """The gRPC server, its engine, health service and metrics endpoint."""

    def __init__(self, config: ServerConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.metrics = Metrics(registry)
        self.engine = Engine(config, self.metrics)
        self.keyring = Keyring.of(config)
        limits = config.limits
        #: open API streams, and open health/reflection streams (no key needed: a pool of their own)
        self.slots = StreamSlots(limits.max_streams, limits.max_streams_per_client)
        self.open_slots = StreamSlots(limits.max_streams, limits.max_streams_per_client)
        denied = Counter(
            "interlingua_rpc_denied",
            "Calls refused by the gate before any handler: no or unknown key, role too low, rate limit, stream caps.",
            ["grpc_code"],
            registry=self.metrics.registry,
        )
        # The gate first: nothing reaches metrics or a handler before authentication; decoding last,
        # so a request that does not parse answers INVALID_ARGUMENT from inside the handler.
        interceptors: list[grpc.ServerInterceptor[Any, Any]] = [
            GateInterceptor(
                self.keyring,
                RateLimiter(config.rate_limit),
                self.slots,
                self.open_slots,
                on_deny=lambda code: denied.labels(code).inc(),
            ),
            MetricsInterceptor(self.metrics),
            DecodeInterceptor(),
        ]
        # A stream holds a worker and each pool of streams is capped at max_streams: the other
        # `workers` threads stay free for unary calls.
        pool = config.workers + 2 * limits.max_streams
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=pool,
                thread_name_prefix="interlingua-rpc",
                # omp_set_num_threads is per calling thread. Workers search single queries only
                # (batches go to the one search thread, see server/search_thread.py): one thread each
                initializer=faiss.omp_set_num_threads,
                initargs=(1,),
            ),
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", limits.receive_bytes),
                ("grpc.max_send_message_length", limits.max_message_bytes),
            ],
            maximum_concurrent_rpcs=max(limits.max_concurrent_rpcs, pool),
        )
        sgrpc.add_SpaceServiceServicer_to_server(SpaceServicer(self.engine), self.grpc)
        cgrpc.add_CollectionServiceServicer_to_server(CollectionServicer(self.engine), self.grpc)
        pgrpc.add_PointServiceServicer_to_server(PointServicer(self.engine), self.grpc)
        tgrpc.add_TransformServiceServicer_to_server(TransformServicer(self.engine), self.grpc)
        sngrpc.add_SnapshotServiceServicer_to_server(SnapshotServicer(self.engine), self.grpc)
        mgrpc.add_MigrationServiceServicer_to_server(MigrationServicer(self.engine), self.grpc)
        # Blocking Watch: each holds a worker, bounded by the open-stream slots. The non-blocking one
        # deadlocks: set() holds the servicer's lock while it waits for a send that grpc's serving
        # thread cannot make, being stuck on that lock in a closing watcher's callback (seen at stop()).
        self.health = health.HealthServicer(experimental_non_blocking=False)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.grpc,
        )
        self.engine.on_state.append(self._on_state)
        self._on_state(Lifecycle.LOADING)
        address = f"{config.host}:{config.port}"
        if config.tls is None:
            self.port = self.grpc.add_insecure_port(address)
        else:
            self.port = self.grpc.add_secure_port(address, server_credentials(config.tls))
        if self.port == 0:
            raise OSError(f"could not bind gRPC to {config.host}:{config.port}")
        self.metrics_port: int | None = None
        self._http: Any = None
        self._ready = threading.Event()
        self.load_error: BaseException | None = None

    def _metrics_key(self, key: str) -> bool:
        return self.keyring.lookup(key) is not None

    def _on_state(self, state: Lifecycle) -> None:
        status = (  # NOT_SERVING too while a Milvus engine is unreachable or the shared registry is out of sync
            health_pb2.HealthCheckResponse.SERVING
            if state is Lifecycle.SERVING and self.engine.healthy()
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, status)

    def start(self) -> None:
        """Starts serving (health NOT_SERVING) and loads the engine in the background.

        Takes the data dir's lock first: FailedPrecondition (naming the folder and the holder's pid)
        when another server or an embedded client has it open, before anything is served."""
        self.engine.lock_data_dir()
        if self.config.metrics_port is not None:
            check = self._metrics_key if self.config.metrics_auth else None
            self._http, self.metrics_port = self.metrics.serve_http(self.config.metrics_port, self.config.host, check)
        self.grpc.start()
        threading.Thread(target=self._load, name="interlingua-load", daemon=True).start()

    def _load(self) -> None:
        try:
            self.engine.open()
        except BaseException as e:
            log.exception("loading failed; the service stays NOT_SERVING")
            self.load_error = e
        finally:
            self._ready.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Blocks until loading finished; True when the engine is serving."""
        self._ready.wait(timeout)
        return self.engine.state is Lifecycle.SERVING

    def stop(self, grace: float | None = None) -> None:
        """Drains (health NOT_SERVING), stops gRPC, then merges, checkpoints and closes the store."""
        self._on_state(Lifecycle.DRAINING)
        self.grpc.stop(grace).wait()
        self._ready.wait()
        self.engine.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(self.grpc.wait_for_termination(timeout))


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; with ``client_ca`` clients must present a certificate it signed."""
    try:
        pair = (tls.key.read_bytes(), tls.cert.read_bytes())
        client_ca = tls.client_ca.read_bytes() if tls.client_ca is not None else None
    except OSError as e:  # a configuration error: `interlingua serve` prints it and exits 2
        raise InvalidArgument(f"tls: cannot read {e.filename}: {e.strerror}") from None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def create_server(config: ServerConfig, registry: CollectorRegistry | None = None) -> tuple[Server, int]:
    """Builds the server bound to ``config.host:config.port`` (0: any free port); returns (server, port)."""
    server = Server(config, registry)
    return server, server.port


def serve(config: ServerConfig) -> None:
    """Runs the service until SIGTERM or SIGINT, then shuts down gracefully."""
    server, port = create_server(config)
    server.start()
    log.info(
        "interlingua serving gRPC on %s:%d, metrics on :%s, data in %s",
        config.host,
        port,
        server.metrics_port,
        config.data_dir,
    )
    done = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: draining", signum)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not done.wait(0.5):
        if server.load_error is not None:
            server.stop(0)
            raise SystemExit(f"interlingua: loading failed: {server.load_error}")
    server.stop(grace=5.0)
    log.info("stopped")
