"""Milvus Lite's search cost by primary-key schema, on its engine API in one process (issue 14).

``milvus_layer_qps_ratio`` (bench/peers.py) compares Interlingua over Milvus Lite with Milvus Lite
alone; most of the gap is Milvus Lite's own per-search Python pass over every row's primary key
(``milvus_lite/search/executor_indexed.py``: a dict of pk -> newest sequence, then a mask built
row by row). This script times that engine alone (``milvus_lite.db.MilvusLite``, no gRPC, no
Interlingua) on the same ``--n`` x 64 normalized vectors, HNSW M16 efConstruction 40, IP, one
flushed segment, searched at ef 64, k 10, nq 64, in collections that differ only in their keys:

- ``service_varchar_pk``: the service's schema (VARCHAR ``id`` primary key, payload, seq, spaces);
- ``hash_int64_pk``: the same fields plus an INT64 primary key, a 63-bit blake2b hash of the id;
- ``seq_int64_pk``: the same, the primary key numbering rows in insertion order (0, 1, 2, ...);
- ``peer_int64``: bench/peers.py's ``milvus_lite`` (INT64 primary key in insertion order, the vector);
- ``peer_shuffled``: the peer's schema, the same keys 0..n-1 written in a shuffled order.

The sides alternate (rotated each round), a ``gc.collect()`` before each timed search. Then 100 point
reads by id, as a write's read-merge does (``id in [...]``, ``pk in [...]``). Prints a table and, as its
last line, one JSON object (``search_p50_ms``, ``read_p50_ms`` by collection).

    nice -n 19 .venv/bin/python bench/milvus_lite_keys.py [--n 100000] [--reps 20]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def h63(pid: str) -> int:
    """A 63-bit hash of a point id (a non-negative INT64)."""
    return int.from_bytes(hashlib.blake2b(pid.encode(), digest_size=8).digest(), "big") >> 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    from milvus_lite.db import MilvusLite
    from milvus_lite.schema.types import CollectionSchema, DataType, FieldSchema

    n, d, nq = args.n, 64, 64
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((n, d)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    noise = 0.05 * rng.standard_normal((nq, d)).astype(np.float32)
    xq = (xb[rng.choice(n, nq, replace=False)] + noise).tolist()
    ids = [f"doc-{i:08d}" for i in range(n)]
    order = rng.permutation(n).tolist()

    def meta() -> list[Any]:
        return [
            FieldSchema("payload", DataType.VARCHAR, max_length=65535, nullable=True),
            FieldSchema("seq", DataType.INT64),
            FieldSchema("spaces", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=4, max_length=32),
            FieldSchema("v", DataType.FLOAT_VECTOR, dim=d),
        ]

    def row(j: int) -> dict[str, Any]:
        return {"id": ids[j], "payload": None, "seq": 1, "spaces": ["v"], "v": xb[j].tolist()}

    pk = FieldSchema("pk", DataType.INT64, is_primary=True)
    id_field = FieldSchema("id", DataType.VARCHAR, max_length=512)
    vec = FieldSchema("v", DataType.FLOAT_VECTOR, dim=d)

    def bare(j: int) -> dict[str, Any]:
        return {"pk": j, "v": xb[j].tolist()}

    sides: dict[str, tuple[list[Any], Callable[[int], dict[str, Any]], list[int]]] = {
        "service_varchar_pk": (
            [FieldSchema("id", DataType.VARCHAR, is_primary=True, max_length=512), *meta()], row, list(range(n))
        ),
        "hash_int64_pk": ([pk, id_field, *meta()], lambda j: {"pk": h63(ids[j]), **row(j)}, list(range(n))),
        "seq_int64_pk": ([pk, id_field, *meta()], lambda j: {"pk": j, **row(j)}, list(range(n))),
        "peer_int64": ([pk, vec], bare, list(range(n))),
        "peer_shuffled": ([pk, vec], bare, order),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        db = MilvusLite(tmp)
        cols: dict[str, Any] = {}
        for name, (fields, make, rows) in sides.items():
            c = db.create_collection(name, CollectionSchema(fields))
            c.create_index("v", {"index_type": "HNSW", "metric_type": "IP", "params": {"M": 16, "efConstruction": 40}})
            c.load()
            for i in range(0, n, 4096):
                c.insert([make(j) for j in rows[i : i + 4096]])
            c.flush()
            cols[name] = c
        for c in cols.values():  # loading again builds every segment's index
            c.release()
            c.load()
        out = {name: [] if name.startswith("peer") else ["id"] for name in cols}
        times: dict[str, list[float]] = {name: [] for name in cols}
        names = list(cols)
        for rep in range(args.reps + 1):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                gc.collect()
                t0 = time.perf_counter()
                cols[name].search(xq, top_k=10, output_fields=out[name], anns_field="v", search_params={"ef": 64})
                if rep:  # the first round warms up
                    times[name].append(time.perf_counter() - t0)
        search_p50 = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        pick = rng.choice(n, 100, replace=False).tolist()
        by_id = "id in [" + ", ".join(f'"{ids[j]}"' for j in pick) + "]"
        reads = {
            "service_varchar_pk": by_id,
            "hash_int64_pk": "pk in [" + ", ".join(str(h63(ids[j])) for j in pick) + "]",
            "seq_int64_pk": by_id,
        }
        read_p50: dict[str, float] = {}
        for name, expr in reads.items():
            lat = []
            for _ in range(5):
                t0 = time.perf_counter()
                got = cols[name].query(expr=expr, output_fields=["id"])
                lat.append(time.perf_counter() - t0)
            assert len(got) == 100, (name, len(got))
            read_p50[name] = 1e3 * statistics.median(lat)
        db.close()
    print(f"# milvus_lite_keys: n={n} x {d}, HNSW M16 efC 40, ef 64, k 10, nq={nq}, {args.reps} reps\n")
    print("| collection | search p50 ms | vs peer_int64 | 100 reads by id p50 ms |")
    print("|---|---|---|---|")
    for name, v in search_p50.items():
        r = f"{read_p50[name]:.1f}" if name in read_p50 else ""
        print(f"| {name} | {v:.1f} | {search_p50['peer_int64'] / v:.3f} | {r} |")
    figures = {"search_p50_ms": search_p50, "read_p50_ms": read_p50}
    print(json.dumps({"n": n, "d": d, "nq": nq, "reps": args.reps, **figures}))


if __name__ == "__main__":
    main()
