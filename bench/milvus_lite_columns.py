"""Milvus Lite's search cost by the columns a collection has, on its engine API in one process (issue 14).

After the dense keys (``bench/milvus_lite_keys.py``), what is left of ``milvus_layer_qps_ratio``'s gap
(bench/peers.py) at nq=64 is Milvus Lite materializing every column of every winner: its search builds
each of the nq x k winners' rows whole (``Segment.row_to_dict``: one pyarrow ``as_py`` per column,
whatever ``output_fields`` asks for), so each column a collection has beyond the key and the vector costs
per winner. This script times that engine alone (``milvus_lite.db.MilvusLite``, no gRPC, no Interlingua)
on ``--n`` x 384 normalized random vectors, HNSW M16 efConstruction 40, IP, inserted in 4096-row
batches and flushed, searched at ef 48, k 10, nq 64 and nq 1, in collections that differ only in
their columns, all with dense INT64 keys:

- ``peer``: the key and the vector (bench/peers.py's ``milvus_lite``);
- ``service``: the service's columns (``pk``, ``id``, ``payload``, ``seq``, ``spaces``, the vector);
- ``no_spaces``: the service's without ``spaces``;
- ``id_only``: the key, the point id and the vector.

The sides alternate (rotated each round), a ``gc.collect()`` before each timed search. Prints a table and,
as its last line, one JSON object (``search_p50_ms`` by nq and collection, ``service_vs_peer_nq64``).

    nice -n -5 .venv/bin/python bench/milvus_lite_columns.py [--n 50000] [--reps 12]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--reps", type=int, default=12)
    args = ap.parse_args()
    from milvus_lite.db import MilvusLite
    from milvus_lite.schema.types import CollectionSchema, DataType, FieldSchema

    n, d, nq = args.n, 384, 64
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((n, d)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = (xb[rng.choice(n, nq, replace=False)] + 0.05 * rng.standard_normal((nq, d)).astype(np.float32)).tolist()
    ids = [f"doc-{i:08d}" for i in range(n)]

    def field(name: str) -> Any:
        return {
            "pk": FieldSchema("pk", DataType.INT64, is_primary=True),
            "id": FieldSchema("id", DataType.VARCHAR, max_length=512),
            "payload": FieldSchema("payload", DataType.VARCHAR, max_length=65535, nullable=True),
            "seq": FieldSchema("seq", DataType.INT64),
            "spaces": FieldSchema("spaces", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=4,
                                  max_length=32),
            "v": FieldSchema("v", DataType.FLOAT_VECTOR, dim=d),
        }[name]  # fmt: skip

    def row(names: list[str]) -> Callable[[int], dict[str, Any]]:
        values: dict[str, Callable[[int], Any]] = {
            "pk": lambda j: j,
            "id": lambda j: ids[j],
            "payload": lambda j: None,
            "seq": lambda j: 1,
            "spaces": lambda j: ["v"],
            "v": lambda j: xb[j].tolist(),
        }
        return lambda j: {name: values[name](j) for name in names}

    sides = {
        "peer": ["pk", "v"],
        "service": ["pk", "id", "payload", "seq", "spaces", "v"],
        "no_spaces": ["pk", "id", "payload", "seq", "v"],
        "id_only": ["pk", "id", "v"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        db = MilvusLite(tmp)
        cols: dict[str, Any] = {}
        for name, names in sides.items():
            c = db.create_collection(name, CollectionSchema([field(f) for f in names]))
            c.create_index("v", {"index_type": "HNSW", "metric_type": "IP", "params": {"M": 16, "efConstruction": 40}})
            c.load()
            make = row(names)
            for i in range(0, n, 4096):
                c.insert([make(j) for j in range(i, min(n, i + 4096))])
            c.flush()
            cols[name] = c
        for c in cols.values():  # loading again builds every segment's index
            c.release()
            c.load()
        out = {name: ["id"] if "id" in names else [] for name, names in sides.items()}
        times: dict[int, dict[str, list[float]]] = {q: {name: [] for name in cols} for q in (nq, 1)}
        names = list(cols)
        for rep in range(args.reps + 1):
            for q in (nq, 1):
                for name in names[rep % len(names) :] + names[: rep % len(names)]:
                    gc.collect()
                    t0 = time.perf_counter()
                    cols[name].search(xq[:q], top_k=10, output_fields=out[name], anns_field="v",
                                      search_params={"ef": 48})  # fmt: skip
                    if rep:  # the first round warms up
                        times[q][name].append(time.perf_counter() - t0)
        db.close()
    p50 = {str(q): {name: 1e3 * statistics.median(t) for name, t in by.items()} for q, by in times.items()}
    print(f"# milvus_lite_columns: n={n} x {d}, HNSW M16 efC 40, ef 48, k 10, {args.reps} reps\n")
    print("| collection | columns | search p50 ms nq=64 | vs peer | search p50 ms nq=1 | vs peer |")
    print("|---|---|---|---|---|---|")
    for name, names in sides.items():
        a, b = p50[str(nq)][name], p50["1"][name]
        print(f"| {name} | {', '.join(names)} | {a:.1f} | {p50[str(nq)]['peer'] / a:.3f} | {b:.1f} |"
              f" {p50['1']['peer'] / b:.3f} |")  # fmt: skip
    ratio = p50[str(nq)]["peer"] / p50[str(nq)]["service"]
    print(json.dumps({"n": n, "d": d, "reps": args.reps, "search_p50_ms": p50, "service_vs_peer_nq64": ratio}))


if __name__ == "__main__":
    main()
