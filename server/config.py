"""Server configuration: one small explicit class per concern, all with defaults.

The CLI (``interlingua serve``) fills :class:`ServerConfig` from, in rising
priority, built-in defaults, a TOML file, ``INTERLINGUA_*`` environment
variables and flags (see ``interlingua.client.cli``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .activation import GatePolicy
from .device import Device

__all__ = ["BACKENDS", "ROLES", "ApiKey", "Limits", "RateLimit", "ServerConfig", "TLSConfig"]

#: Roles of an API key, each including the ones before it: ``read`` searches and gets points,
#: collections, spaces, transforms and routes; ``write`` also upserts and deletes points; ``admin``
#: also registers spaces, creates and deletes collections, fits transforms and changes routes.
ROLES = ("read", "write", "admin")
#: storage and search backends of a collection (``server/backends``); the first is the default
BACKENDS = ("embedded", "milvus")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Limits:
    """Caps on requests. Over a cap -> RESOURCE_EXHAUSTED (k, JSON depth -> INVALID_ARGUMENT)."""

    max_k: int = 1024  #: largest k a search may ask for
    max_batch: int = 65536  #: most points in one upsert, delete or get
    max_nq: int = 16384  #: most query vectors in one search
    max_message_bytes: int = 256 * 1024 * 1024  #: gRPC send limit, and the ceiling of the receive limit
    max_vector_bytes: int = 64 * 1024 * 1024  #: packed float32 vectors in one request (e.g. 16384 x 1024-d)
    max_id_bytes: int = 256  #: longest point id, UTF-8 bytes
    max_payload_bytes: int = 64 * 1024  #: largest JSON payload, UTF-8 bytes
    max_json_depth: int = 32  #: deepest nesting of [ and { in a JSON payload or config
    max_streams: int = 32  #: streaming calls open at once (each holds a worker thread); more: RESOURCE_EXHAUSTED
    max_streams_per_client: int = 8  #: streams open at once per API key (or per peer address without one)
    max_concurrent_rpcs: int = 1024  #: calls running or queued for a worker; more: RESOURCE_EXHAUSTED
    max_nlist: int = 65536  #: most IVF lists a new collection's index spec may ask for (INVALID_ARGUMENT)
    #: cap on the estimated fixed memory of a new collection's index: quantizer centroids, IVF lists,
    #: codebooks, PCA/OPQ matrices (INVALID_ARGUMENT); IVF65536,Flat at d=1024 needs ~259 MiB
    max_index_overhead_bytes: int = 1 << 30
    #: caps of one FitTransform stream, checked as it arrives (RESOURCE_EXHAUSTED as soon as one is
    #: passed, nothing stored): calibration pairs fitted (doc + query), serialized bytes of the
    #: whole stream (a fit of 1.17 GB of pairs once took RSS to 4.85 GB: assembling copies them),
    #: evaluation queries, and gallery pairs (doc pairs with ids) they are scored against
    max_fit_pairs: int = 1_000_000
    max_fit_bytes: int = 1 << 30
    max_eval_queries: int = 100_000
    max_eval_gallery: int = 1_000_000
    #: a running fit past this many seconds stops at its next progress step and is FAILED
    max_fit_seconds: float = 1800.0

    @property
    def receive_bytes(self) -> int:
        """The gRPC receive limit: the vector cap, every id at its cap, and 32 MiB for payloads and the rest.

        A message over it is refused by gRPC before it is parsed (a 250 MB upsert under the old
        256 MiB limit cost +705 MB of parsing before the batch cap refused it).
        """
        need = self.max_vector_bytes + self.max_batch * (self.max_id_bytes + 16) + 32 * 1024 * 1024
        return min(self.max_message_bytes, need)


@dataclass(frozen=True)
class ApiKey:
    """One API key, stored hashed: ``sha256`` is the hex SHA-256 of the key's UTF-8 bytes
    (``printf %s KEY | sha256sum``); ``role`` is one of :data:`ROLES`."""

    name: str  #: shown in logs and rate-limit messages, never the key itself
    sha256: str
    role: str = "read"
    rate_per_second: float | None = None  #: this key's rate limit; None: the server's ``rate_limit``

    def __post_init__(self) -> None:
        if not _HEX64.fullmatch(self.sha256):
            raise ValueError(f"key {self.name!r}: sha256 must be 64 lowercase hex digits")
        if self.role not in ROLES:
            raise ValueError(f"key {self.name!r}: role must be one of {', '.join(ROLES)}, got {self.role!r}")


@dataclass(frozen=True)
class TLSConfig:
    """Server TLS: PEM certificate chain and private key; with ``client_ca`` every client must
    present a certificate signed by it (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True)
class RateLimit:
    """Per-key token bucket: ``per_second`` calls refill, up to ``burst`` at once (0: unlimited).

    A call over it answers RESOURCE_EXHAUSTED with ``retry-after`` (seconds) in trailing metadata.
    """

    per_second: float = 0.0
    burst: int = 0  #: bucket size; 0: max(1, per_second)


@dataclass(frozen=True)
class ServerConfig:
    """Everything :func:`interlingua.server.create_server` needs."""

    data_dir: Path = Path("./data")  #: SQLite store and index checkpoints live here
    host: str = "127.0.0.1"  #: gRPC bind address
    port: int = 50051  #: gRPC port; 0 picks a free one (tests)
    metrics_port: int | None = 9100  #: Prometheus /metrics port; None: no HTTP server, 0: any free port
    api_key: str | None = None  #: when set, every RPC but health/reflection needs it (an admin key)
    keys: tuple[ApiKey, ...] = ()  #: hashed API keys with roles; any key set turns authentication on
    tls: TLSConfig | None = None  #: None: plain-text gRPC
    rate_limit: RateLimit = field(default_factory=RateLimit)
    metrics_auth: bool = False  #: /metrics needs ``Authorization: Bearer <key>`` (any role)
    workers: int = field(default_factory=lambda: max(4, 2 * (os.cpu_count() or 1)))  #: gRPC thread pool
    omp_threads: int = field(default_factory=lambda: os.cpu_count() or 1)  #: FAISS OpenMP threads
    #: threads of numpy's own OpenBLAS (not FAISS's). It only runs the small matmuls of the request
    #: path (transforms, the fresh segment); a multi-threaded pool there spins against FAISS's OpenMP
    #: threads and cost routed queries ~35% QPS on 2 cores (bench/transform_overhead.py)
    numpy_blas_threads: int = 1
    limits: Limits = field(default_factory=Limits)
    merge_min_fresh: int = 1024  #: fresh rows that trigger a merge into the ANN index...
    merge_fraction: float = 0.1  #: ...or this fraction of the indexed rows, whichever is larger
    merge_idle_seconds: float = 1.0  #: merge any fresh rows after this long without writes
    checkpoint_after_merge: bool = True  #: write an index checkpoint after each merge
    #: rebuild a sealed index without its dead labels (deleted or overwritten points) once more than
    #: this fraction of its labels, and more than ``compact_min_dead`` of them, are dead
    compact_dead_fraction: float = 0.5
    compact_min_dead: int = 1024
    #: added to the nice value of the maintenance thread (merges, training, checkpoints) and its
    #: OpenMP team, so that background work yields to writes and searches; 0 keeps it equal (Linux)
    maintenance_nice: int = 10
    #: the default activation gate (``activation.GatePolicy``; an ActivateRoute request may override
    #: each): retention = transformed Recall@10 / home->home Recall@10 at least ``min_retention``,
    #: negative-flip rate at most ``max_negative_flip_rate``, and ECC only when ``require_ecc``
    min_retention: float = 0.85
    max_negative_flip_rate: float = 1.0
    require_ecc: bool = False
    #: where sealed indexes are searched and linear query maps run: "cpu", "cuda" or "cuda:N"
    #: (needs faiss-gpu; checked at server start, see ``device.py``)
    device: str = "cpu"
    #: old vectors a migration's forward upgrade projects per step (one store transaction each), and
    #: the pause between steps, so a forward upgrade of a big gallery yields to searches and writes
    forward_batch: int = 1024
    forward_pause_seconds: float = 0.0
    #: where a new collection's points and ANN search live when CreateCollection names no backend:
    #: "embedded" (SQLite + FAISS in this process) or "milvus" (a Milvus engine, ``server/backends``)
    backend: str = "embedded"
    #: the Milvus engine of ``milvus`` collections that name none: a cluster address
    #: (``http://host:19530``) or a Milvus Lite file; "" is ``<data_dir>/milvus.db`` (Milvus Lite)
    milvus_uri: str = ""
    #: longest wait for one Milvus call (pymilvus retries within it); past it the call is UNAVAILABLE
    milvus_timeout_seconds: float = 10.0
    #: how often the health monitor pings each Milvus engine in use (NOT_SERVING while one is down)
    milvus_check_seconds: float = 1.0
    #: a registry shared with other front-ends serving the same Milvus collections (``shared.py``):
    #: ``etcd://host:2379[,host:2379...]/<prefix>``; "" keeps everything in this front-end's store
    registry: str = ""
    #: longest wait for one etcd call, and for another front-end's write lock on a collection
    registry_timeout_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.milvus_timeout_seconds <= 0 or self.milvus_check_seconds <= 0:
            raise ValueError("milvus_timeout_seconds and milvus_check_seconds must be > 0")
        if self.registry:
            from .etcd import parse_registry_uri

            parse_registry_uri(self.registry)  # ValueError naming what is wrong
        if self.registry_timeout_seconds <= 0:
            raise ValueError("registry_timeout_seconds must be > 0")
        if self.forward_batch < 1 or self.forward_pause_seconds < 0:
            raise ValueError("forward_batch must be >= 1 and forward_pause_seconds >= 0")
        Device.parse(self.device)  # ValueError for a malformed device; its GPU is checked at start
        GatePolicy(self.min_retention, self.max_negative_flip_rate, self.require_ecc)  # ValueError when out of range
        if self.metrics_auth and not (self.keys or self.api_key):
            raise ValueError("metrics_auth needs API keys (api_key or keys) to check the bearer against")
