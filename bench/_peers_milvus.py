"""Interlingua over Milvus Lite, for bench/peers.py: the layer's cost over the engine (issue 14).

:class:`InterlinguaMilvus` follows :class:`_peers.System`: an ``interlingua serve --backend milvus
--milvus-uri <folder>/il_milvus.db`` subprocess (Milvus Lite inside the server's process, as
:class:`_peers.MilvusLite` runs it inside the bench's), one HNSW collection of M / efConstruction like
the other systems, filled through the client in ``batch``-sized upserts and searched through gRPC at
efSearch ``ef``. ``ingest_s``: until the last upsert is acknowledged; ``ready_s``: until the service
reports every vector indexed (the server flushes a collection once its writes are idle, as the
embedded backend merges, and reads Milvus Lite's index progress from its files) and a first search
answered. :func:`lite_indexed` is the same wait for :class:`_peers.MilvusLite` (Milvus Lite's own
``describe_index`` reports every row indexed at once, while it still searches a new segment by brute
force until its background thread has built the segment's index), so both are swept in the same index
state. Its QPS over :class:`_peers.MilvusLite`'s on the same data is ``milvus_layer_qps_ratio``
(target >= 0.9).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import labels_of, log
from _peers import NAME, SPACE, System, serve

from interlingua.server.backends.milvus_schema import field_name, milvus_name
from interlingua.server.backends.milvus_table import lite_index_rows

__all__ = ["InterlinguaMilvus", "lite_indexed"]


def lite_indexed(db: Path, collection: str, field: str, n: int, index_type: str = "HNSW") -> int:
    """Waits until every segment of ``collection`` in the Milvus Lite directory ``db`` has its index
    built (``field``, at least ``n`` rows); returns the number of segments."""
    while True:
        got = lite_index_rows(db, collection, field, index_type)
        if got is not None and got[1] == 0 and got[0] >= n:
            manifest = json.loads((db / "collections" / collection / "manifest.json").read_text())
            return sum(len(p["data_files"]) for p in manifest["partitions"].values())
        time.sleep(0.2)


class InterlinguaMilvus(System):
    name = "interlingua_milvus"

    def __init__(self, folder: Path, omp_threads: int) -> None:
        self.uri = folder / "il_milvus.db"
        # Milvus Lite is a Python engine sharing this machine's cores with the benchmark: a call that
        # waits behind its flush of a 128 MB memtable must not read as an unreachable engine
        config = folder / "il_milvus.toml"
        config.write_text("milvus_timeout_seconds = 600.0\n")
        extra = ("--config", str(config), "--backend", "milvus", "--milvus-uri", str(self.uri))
        self.proc, self.client = serve(folder / "interlingua_milvus", omp_threads, *extra)
        self.ef: int | None = None
        self.stream: Any = None

    def build(self, xb: np.ndarray, m: int, efc: int, batch: int) -> None:
        c = self.client
        c.register_space(SPACE, xb.shape[1], "cosine", description="bench: debdesc old_doc (MiniLM)")
        c.create_collection(NAME, SPACE, f"HNSW{m}", ef_construction=efc, backend="milvus")
        ids = [str(i) for i in range(len(xb))]
        t0 = time.perf_counter()
        c.upsert(NAME, ids, xb, space=SPACE, batch_size=batch)
        self.ingest_s = time.perf_counter() - t0
        while True:  # the engine's index holds every vector, nothing pending
            info = c.get_collection(NAME)
            if info.indexed_vectors >= len(xb) and info.fresh_vectors == 0:
                break
            time.sleep(0.2)
        segments = lite_indexed(self.uri, milvus_name(NAME), field_name(SPACE), len(xb))
        self.search(xb[:1], 10)
        self.ready_s = time.perf_counter() - t0
        log(f"{self.name}: {segments} segments, every one indexed")

    def set_ef(self, ef: int) -> None:
        self.ef = ef

    def search(self, xq: np.ndarray, k: int) -> np.ndarray:
        return labels_of(self.timed(xq, k).ids)

    def timed(self, xq: np.ndarray, k: int) -> Any:
        return self.client.search(NAME, xq, k, space=SPACE, ef_search=self.ef)

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(60)
