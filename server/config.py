"""Server configuration: one small explicit class per concern, all with defaults.

The CLI (``interlingua serve``) fills :class:`ServerConfig` from, in rising
priority, built-in defaults, a TOML file, ``INTERLINGUA_*`` environment
variables and flags (see ``interlingua.client.cli``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .device import Device

__all__ = ["Limits", "ServerConfig"]


@dataclass(frozen=True)
class Limits:
    """Caps on request sizes. Over a cap -> RESOURCE_EXHAUSTED (k -> INVALID_ARGUMENT)."""

    max_k: int = 1024  #: largest k a search may ask for
    max_batch: int = 65536  #: most points in one upsert, delete or get
    max_nq: int = 16384  #: most query vectors in one search
    max_message_bytes: int = 256 * 1024 * 1024  #: gRPC send/receive message limit
    max_id_bytes: int = 256  #: longest point id, UTF-8 bytes
    max_payload_bytes: int = 64 * 1024  #: largest JSON payload, UTF-8 bytes


@dataclass(frozen=True)
class ServerConfig:
    """Everything :func:`interlingua.server.create_server` needs."""

    data_dir: Path = Path("./data")  #: SQLite store and index checkpoints live here
    host: str = "127.0.0.1"  #: gRPC bind address
    port: int = 50051  #: gRPC port; 0 picks a free one (tests)
    metrics_port: int | None = 9100  #: Prometheus /metrics port; None: no HTTP server, 0: any free port
    api_key: str | None = None  #: when set, every RPC but health/reflection needs it
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
    #: added to the nice value of the maintenance thread (merges, training, checkpoints) and its
    #: OpenMP team, so that background work yields to writes and searches; 0 keeps it equal (Linux)
    maintenance_nice: int = 10
    min_retention: float = 0.5  #: activation gate: retention M(T(new), home) / M(new, new) at least this
    #: where sealed indexes are searched and linear query maps run: "cpu", "cuda" or "cuda:N"
    #: (needs faiss-gpu; checked at server start, see ``device.py``)
    device: str = "cpu"

    def __post_init__(self) -> None:
        Device.parse(self.device)  # ValueError for a malformed device; its GPU is checked at start
