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

from interlingua.client import Client
from interlingua.server.pipeline import SearchParams
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


def wait_merged(client: Client, name: str, n: int, timeout: float = 600.0) -> None:
    end = time.monotonic() + timeout
    while client.get_collection(name).indexed_vectors < n:
        if time.monotonic() > end:
            raise TimeoutError(f"{name}: not merged after {timeout} s")
        time.sleep(0.1)


class _Ctx:
    def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


def measure(client: Client, name: str, xq: np.ndarray, rounds: int) -> dict[str, Any]:
    engine = client._embedded.engine
    col = engine.collections[name]
    index = col.segments.snapshot.sealed  # the engine's own index object, not a copy
    fparams = faiss.SearchParametersHNSW(efSearch=DEFAULT_EF_SEARCH) if hasattr(index, "hnsw") else None
    xn = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    servicer = PointServicer(engine)
    ctx = _Ctx()
    params = SearchParams(K)
    raw = [np.ascontiguousarray(x, "<f4").tobytes() for x in xq]
    reqs = [
        points_pb2.SearchRequest(
            collection=name, query_space=SPACE, k=K, queries=common_pb2.Vectors(data=b, dim=xq.shape[1])
        )
        for b in raw
    ]
    sides: dict[str, Callable[[int], object]] = {
        "faiss": lambda i: index.search(xn[i : i + 1], K, params=fparams),
        "engine": lambda i: engine.search(name, SPACE, raw[i], xq.shape[1], params),
        "servicer": lambda i: servicer.Search(reqs[i], ctx),
        "embedded": lambda i: client.search(name, xq[i], K, space=SPACE),
    }
    # the same answers on every side
    for i in range(20):
        _, I0 = index.search(xn[i : i + 1], K, params=fparams)
        r = client.search(name, xq[i], K, space=SPACE)
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
    args = ap.parse_args(argv)
    xb = make_data(args.n, args.d, 0)
    xq = make_data(args.queries, args.d, 1)
    report: dict[str, Any] = {"n": args.n, "d": args.d, "k": K, "queries": args.queries}
    with tempfile.TemporaryDirectory() as tmp, Client.embedded(Path(tmp) / "data", merge_idle_seconds=0.2) as client:
        client.register_space(SPACE, args.d, "cosine")
        for spec in args.specs.split(","):
            name = spec.lower()
            client.create_collection(name, SPACE, spec)
            client.upsert(name, [f"p{i}" for i in range(args.n)], xb, space=SPACE)
            wait_merged(client, name, args.n)
            report[spec] = measure(client, name, xq, args.rounds)
            print(spec, json.dumps(report[spec]), flush=True)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
