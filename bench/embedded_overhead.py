"""Per-call cost of one single-query search in embedded mode over in-process FAISS (issue 13).

One collection per spec (Flat, HNSW32; cosine, ``--d`` 384) is filled with ``--n`` seeded vectors
through ``Client.embedded`` on a temporary data dir and measured once the background merge has
moved every vector into the sealed index. The reference is FAISS alone on *the same index*: the
collection's own sealed index object (efSearch 64, the service's default, given per call),
searched with the query already L2-normalized. At each step every side searches a different
query (in alternating order; each side sees every query over the rounds), timed with
``time.perf_counter_ns``:

* ``faiss``: ``index.search(xq, k)``;
* ``engine``: ``Engine.search`` (route, checks, normalization, the index, labels to ids, metrics);
* ``servicer``: ``PointServicer.Search`` on a prebuilt request (the engine plus request parsing and
  the reply);
* ``embedded``: ``client.search(...)`` of a ``Client.embedded`` (everything a user pays: the
  request, the servicer, the typed result).

Reported: p50 of each, and each p50 minus ``faiss``'s (the overhead; the issue's target is
``embedded`` <= 0.05 ms). One thread, FAISS at one OpenMP thread on both sides. The last
line of stdout is one JSON object.

    .venv/bin/python bench/embedded_overhead.py [--n 10000] [--d 384] [--queries 3000] [--rounds 3]
        [--data ../shared/data/debdesc/dev] [--ef-search 64] [--keep DATA_DIR] [--specs Flat,HNSW32]

With ``--data`` the gallery is the split's docs tiled to ``--n`` (``_data.load``) and the queries are
its real queries; ``--keep`` builds the collections in DATA_DIR and reuses them on the next run (a 1M
HNSW build takes ~10 minutes here).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from _data import load

from interlingua.client import Client
from interlingua.server.pipeline import SearchParams
from interlingua.server.segment_merge import REGRAPH_MIN
from interlingua.server.segments import DEFAULT_EF_SEARCH
from interlingua.server.servicers import PointServicer
from interlingua.v1 import common_pb2, points_pb2

K = 10
SPACE = "s"


def make_data(n: int, d: int, seed: int, intrinsic: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((intrinsic, d))
    x = np.tanh(rng.standard_normal((n, intrinsic)) @ basis) + 0.1 * rng.standard_normal((n, d))
    return x.astype(np.float32)


def wait_merged(client: Client, name: str, n: int, timeout: float = 3600.0, *, built_now: bool = True) -> None:
    """Until every vector is in the sealed index, and (``built_now``) a merge-grown HNSW graph has had
    its one-add rebuild (segment_merge.REGRAPH_MIN), as bench/_peers.build_collection waits."""
    end = time.monotonic() + timeout
    while True:
        info = client.get_collection(name)
        regraph = built_now and info.index_spec.startswith("HNSW") and n >= REGRAPH_MIN and info.compactions < 1
        if info.indexed_vectors >= n and not info.fresh_vectors and not regraph:
            return
        if time.monotonic() > end:
            raise TimeoutError(f"{name}: not merged after {timeout} s")
        time.sleep(0.1)


class _Ctx:
    def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


def measure(client: Client, name: str, xq: np.ndarray, rounds: int, ef: int = DEFAULT_EF_SEARCH) -> dict[str, Any]:
    engine = client._embedded.engine
    col = engine.collections[name]
    index = col.segments.snapshot.sealed  # the engine's own index object, not a copy
    hnsw = hasattr(index, "hnsw")
    fparams = faiss.SearchParametersHNSW(efSearch=ef) if hnsw else None
    efs = ef if hnsw else None
    xn = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    servicer = PointServicer(engine)
    ctx = _Ctx()
    params = SearchParams(K, ef_search=efs)
    raw = [np.ascontiguousarray(x, "<f4").tobytes() for x in xq]
    reqs = [
        points_pb2.SearchRequest(
            collection=name,
            query_space=SPACE,
            k=K,
            queries=common_pb2.Vectors(data=b, dim=xq.shape[1]),
            params=common_pb2.SearchParams(ef_search=efs),
        )
        for b in raw
    ]
    sides: dict[str, Callable[[int], object]] = {
        "faiss": lambda i: index.search(xn[i : i + 1], K, params=fparams),
        "engine": lambda i: engine.search(name, SPACE, raw[i], xq.shape[1], params),
        "servicer": lambda i: servicer.Search(reqs[i], ctx),
        "embedded": lambda i: client.search(name, xq[i : i + 1], K, space=SPACE, ef_search=efs),
    }
    # the same answers on every side
    for i in range(20):
        _, I0 = index.search(xn[i : i + 1], K, params=fparams)
        r = client.search(name, xq[i], K, space=SPACE, ef_search=efs)
        assert np.array_equal(col.segments.snapshot.ids[I0[0]], r.ids[0]), "embedded and FAISS disagree"
    times: dict[str, list[int]] = {s: [] for s in sides}
    names = list(sides)
    faiss.omp_set_num_threads(1)
    nq = len(xq)
    for r in range(rounds):
        for i in range(nq):
            order = names if i % 2 else names[::-1]
            for j, s in enumerate(order):
                # a different query per side at each step: a side that searched the same query just
                # before would find its graph path in the caches (every side sees every query)
                qi = (i + (j + r) * 397) % nq
                t0 = time.perf_counter_ns()
                sides[s](qi)
                times[s].append(time.perf_counter_ns() - t0)
    t = {s: np.array(v[nq:] if rounds > 1 else v, dtype=np.float64) / 1e6 for s, v in times.items()}
    out: dict[str, Any] = {f"{s}_p50_ms": round(float(np.median(v)), 4) for s, v in t.items()}
    for s in names[1:]:
        out[f"{s}_p50_overhead_ms"] = round(out[f"{s}_p50_ms"] - out["faiss_p50_ms"], 4)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--queries", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--specs", default="Flat,HNSW32")
    ap.add_argument("--data", type=Path, default=None, help="a debdesc split folder (default: seeded vectors)")
    ap.add_argument("--ef-search", type=int, default=DEFAULT_EF_SEARCH, help="HNSW efSearch on every side")
    ap.add_argument("--keep", type=Path, default=None, help="data dir to build in and reuse (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.data is not None:
        data = load(args.data, args.n)
        xb, xq, source = data.xb, data.xq[: args.queries], data.source
    else:
        xb, xq, source = make_data(args.n, args.d, 0), make_data(args.queries, args.d, 1), "seeded"
    report: dict[str, Any] = {"n": args.n, "d": xb.shape[1], "k": K, "queries": len(xq), "ef_search": args.ef_search}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "data"
        with Client.embedded(folder, merge_idle_seconds=0.2) as client:
            if SPACE not in {s.name for s in client.list_spaces()}:
                client.register_space(SPACE, xb.shape[1], "cosine")
            have = {c.name for c in client.list_collections()}
            for spec in args.specs.split(","):
                name = spec.lower()
                if name not in have:
                    client.create_collection(name, SPACE, spec)
                    client.upsert(name, [f"p{i}" for i in range(len(xb))], xb, space=SPACE)
                wait_merged(client, name, len(xb), built_now=name not in have)
                report[spec] = measure(client, name, xq, args.rounds, args.ef_search)
    print(f"# embedded_overhead: n={args.n}, d={xb.shape[1]}, k={K}, {len(xq)} queries, data: {source}\n")
    print("| spec | FAISS p50 ms | engine p50 ms | servicer p50 ms | embedded p50 ms | embedded over FAISS ms |")
    print("|---|---|---|---|---|---|")
    for spec in args.specs.split(","):
        r = report[spec]
        print(
            f"| {spec} | {r['faiss_p50_ms']:.4f} | {r['engine_p50_ms']:.4f} | {r['servicer_p50_ms']:.4f} |"
            f" {r['embedded_p50_ms']:.4f} | {r['embedded_p50_overhead_ms']:.4f} |"
        )
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
