"""Search overhead of the service over in-process FAISS, on one 100k x 384 index (issue 2).

Both sides run at equal settings: the same vectors (:mod:`_data`: the debdesc dev docs in the MiniLM
space tiled to ``--n`` rows, queries ``old_query.npy``), ``faiss.index_factory(d, spec, IP)`` for
Flat and HNSW32, the same efSearch passed explicitly to both, and the server's OpenMP thread count
(``ServerConfig().omp_threads``) set in every thread that searches in-process. The service runs in
this process (``create_server`` on port 0, no metrics port, a temporary data dir); its collections are
filled through :class:`interlingua.client.Client` and measured once the background merge has moved
every vector into the sealed index and checkpointed it. QPS is queries per second over a fixed
wall-clock window of sequential calls from one thread (and, reported beside it, from 2 threads);
p50/p99 come from per-call ``time.perf_counter`` latencies. The sides alternate in 0.5 s slices
(A B C C B A ...) within each window, so drift of a shared machine hits all alike. A control side
("svc idx") searches the service's own sealed index in-process: another build of the same vectors
searches at another speed, and the HNSW graphs are compared by distance computations per query
(``faiss.cvar.hnsw_stats``), a cost no load can blur. A breakdown then times one call through each
layer (FAISS, ``Engine.search``, servicer, protobuf, gRPC, client) on a small probe collection whose
search takes microseconds, to show where the overhead goes. Progress goes to stderr, the report to
stdout; its last line is one JSON object. Results and their reading: ``docs/BENCHMARKS.md``.

    .venv/bin/python bench/search_overhead.py [--n 100000] [--seconds 3] [--data DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import grpc
import numpy as np
from _common import Call, batches_of, interleaved, labels_of, log, machine_info, recall_at, warm_up
from _data import DEFAULT_DATA, BenchData, load

from interlingua.client import Client
from interlingua.server import ServerConfig, create_server
from interlingua.server.pipeline import SearchParams
from interlingua.server.segments import DEFAULT_EF_SEARCH
from interlingua.server.servicers import PointServicer
from interlingua.v1 import common_pb2, points_pb2, points_pb2_grpc

SPECS = ("Flat", "HNSW32")
K = 10
NQS = (1, 64)
SPACE = "minilm-l6@1"
TARGET_RATIO = 0.8  #: service / in-process QPS at nq=64, sequential
TARGET_P50_MS = 0.5  #: single-query p50 overhead
PROBE, PROBE_N = "probe", 1000  #: small Flat collection of the layer-by-layer breakdown


# -- the two sides -------------------------------------------------------------------------------


def search_params(spec: str, ef_search: int) -> Any:
    return faiss.SearchParametersHNSW(efSearch=ef_search) if spec.startswith("HNSW") else None


def build_inprocess(data: BenchData, omp: int) -> tuple[dict[str, Any], dict[str, float]]:
    faiss.omp_set_num_threads(omp)
    indexes, seconds = {}, {}
    for spec in SPECS:
        t0 = time.perf_counter()
        index = faiss.index_factory(data.d, spec, faiss.METRIC_INNER_PRODUCT)
        index.add(data.xb)
        seconds[spec] = time.perf_counter() - t0
        indexes[spec] = index
        log(f"in-process {spec}: built in {seconds[spec]:.1f} s")
    return indexes, seconds


def wait_merged(client: Client, name: str, n: int, timeout: float = 3600.0) -> None:
    """Until every vector is in the sealed index (state ready, no fresh rows) and checkpointed."""
    deadline = time.monotonic() + timeout
    while True:
        info = client.get_collection(name)
        if (
            info.state == "ready"
            and info.fresh_vectors == 0
            and info.indexed_vectors == n
            and info.checkpoint_sequence >= info.last_sequence
        ):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} not merged after {timeout:g} s: {info}")
        time.sleep(0.2)


def fill_service(client: Client, data: BenchData, batch_size: int) -> dict[str, dict[str, float]]:
    client.register_space(SPACE, data.d, "cosine", description="bench: debdesc old_doc (MiniLM)")
    ids = [str(i) for i in range(len(data.xb))]
    times = {}
    for spec in SPECS:
        name = spec.lower()
        client.create_collection(name, SPACE, spec)
        t0 = time.perf_counter()
        client.upsert(name, ids, data.xb, space=SPACE, batch_size=batch_size)
        t1 = time.perf_counter()
        wait_merged(client, name, len(ids))
        t2 = time.perf_counter()
        times[spec] = {"ingest_s": t1 - t0, "ready_s": t2 - t0}
        log(f"service {spec}: upserted in {t1 - t0:.1f} s, merged + checkpointed after {t2 - t0:.1f} s")
    client.create_collection(PROBE, SPACE, "Flat")
    client.upsert(PROBE, ids[:PROBE_N], data.xb[:PROBE_N], space=SPACE)
    wait_merged(client, PROBE, min(PROBE_N, len(ids)))
    return times


# -- the run -------------------------------------------------------------------------------------


def measure(
    spec: str, index: Any, same: Any, client: Client, xq: np.ndarray, args: argparse.Namespace, omp: int
) -> list[dict[str, Any]]:
    """The rows of one index spec. ``index`` is the in-process index; ``same`` the service's own sealed
    index, searched in-process as a control (sequential runs only): a different build of the same
    vectors searches at a different speed (HNSW: another graph; Flat: a freshly ``add``-ed index ran
    10-30% slower than a cloned or deserialized copy of it here), which the service is not to blame for."""
    params = search_params(spec, args.ef_search)
    ef = args.ef_search if params is not None else None
    name = spec.lower()

    def faiss_call(x: np.ndarray) -> object:
        return index.search(x, K, params=params)

    def same_call(x: np.ndarray) -> object:
        return same.search(x, K, params=params)

    def service_call(x: np.ndarray) -> object:
        return client.search(name, x, K, space=SPACE, ef_search=ef)

    stream = client.search_stream()  # the same searches over one long-lived SearchStream call

    def stream_call(x: np.ndarray) -> object:
        return stream.search(name, x, K, space=SPACE, ef_search=ef)

    def omp_init() -> None:
        faiss.omp_set_num_threads(omp)

    rows = []
    for nq in NQS:
        batches = batches_of(xq, nq)
        sides = {"faiss": faiss_call, "same": same_call, "service": service_call, "stream": stream_call}
        for call in sides.values():
            warm_up(call, batches)
        w = interleaved(sides, batches, nq, args.seconds)
        f, c, s, st = w["faiss"], w["same"], w["service"], w["stream"]
        row: dict[str, Any] = {
            "index": spec,
            "nq": nq,
            "faiss_qps": f.qps,
            "service_qps": s.qps,
            "ratio": s.qps / f.qps,
            "faiss_p50_ms": f.pct_ms(50),
            "faiss_p99_ms": f.pct_ms(99),
            "service_p50_ms": s.pct_ms(50),
            "service_p99_ms": s.pct_ms(99),
            "same_qps": c.qps,
            "ratio_same": s.qps / c.qps,
            "same_p50_ms": c.pct_ms(50),
            "same_p99_ms": c.pct_ms(99),
            "stream_qps": st.qps,
            "ratio_stream": st.qps / f.qps,
            "stream_p50_ms": st.pct_ms(50),
            "stream_p99_ms": st.pct_ms(99),
        }
        if args.threads > 1:
            pair = {"faiss": faiss_call, "service": service_call}
            w = interleaved(pair, batches, nq, args.seconds, threads=args.threads, init=omp_init)
            f2, s2 = w["faiss"], w["service"]
            row.update(faiss_qps_mt=f2.qps, service_qps_mt=s2.qps, ratio_mt=s2.qps / f2.qps)
        log(
            f"{spec} nq={nq}: faiss {f.qps:.0f} QPS (service's index {c.qps:.0f}), service {s.qps:.0f} QPS, "
            f"ratio {row['ratio']:.3f} ({row['ratio_same']:.3f}); p50 {f.pct_ms(50):.3f} ({c.pct_ms(50):.3f}) / "
            f"{s.pct_ms(50):.3f} ms"
        )
        rows.append(row)
    stream.close()
    return rows


def recalls(
    indexes: dict[str, Any], client: Client, xq: np.ndarray, ef_search: int, gt: np.ndarray
) -> dict[str, float]:
    out: dict[str, float] = {}
    for spec, index in indexes.items():
        ef = ef_search if spec.startswith("HNSW") else None
        _, I = index.search(xq, K, params=search_params(spec, ef_search))
        Is = np.vstack(
            [labels_of(client.search(spec.lower(), b, K, space=SPACE, ef_search=ef).ids) for b in batches_of(xq, 64)]
        )
        out[f"faiss_{spec.lower()}"] = recall_at(I, gt)
        out[f"service_{spec.lower()}"] = recall_at(Is, gt[: len(Is)])
    return out


def hnsw_work(indexes: dict[str, Any], server: Any, xq: np.ndarray, ef_search: int) -> dict[str, float]:
    """Distance computations per query (``faiss.cvar.hnsw_stats.ndis``) of each HNSW graph: the
    in-process one (built by one ``add``) and the service's (built by successive merges), searched
    here with the same parameters. A search cost that no load on the machine can blur."""
    out: dict[str, float] = {}
    for spec, index in indexes.items():
        if not spec.startswith("HNSW"):
            continue
        sealed = server.engine.collections[spec.lower()].segments.snapshot.sealed
        for side, ix in (("faiss", index), ("service", sealed)):
            faiss.cvar.hnsw_stats.reset()
            ix.search(xq, K, params=search_params(spec, ef_search))
            out[f"{side}_{spec.lower()}"] = faiss.cvar.hnsw_stats.ndis / len(xq)
    return out


LAYERS = {
    "faiss": "FAISS search on the service's own sealed index (probe: Flat, 1000 rows)",
    "engine": "+ Engine.search: validate, normalize, params, labels -> ids, metrics",
    "servicer": "+ PointServicer.Search: request fields, response message",
    "protobuf": "+ request parse and response serialization",
    "grpc": "+ gRPC round trip (raw stub, prebuilt request)",
    "client": "+ Client.search: numpy packing and result unpacking",
}


def layer_calls(server: Any, client: Client, stub: Any, xs: list[np.ndarray]) -> dict[str, Call]:
    """One call per layer of :data:`LAYERS` on the probe collection, each taking the index of a
    query batch in ``xs``."""
    name, d, engine = PROBE, xs[0].shape[1], server.engine
    sealed = engine.collections[name].segments.snapshot.sealed
    servicer = PointServicer(engine)
    raw = [x.astype("<f4").tobytes() for x in xs]
    vectors = [common_pb2.Vectors(data=b, dim=d) for b in raw]
    reqs = [points_pb2.SearchRequest(collection=name, query_space=SPACE, queries=v, k=K) for v in vectors]
    wire = [r.SerializeToString() for r in reqs]
    params = SearchParams(K)
    return {
        "faiss": lambda i: sealed.search(xs[i], K),
        "engine": lambda i: engine.search(name, SPACE, raw[i], d, params),
        "servicer": lambda i: servicer.Search(reqs[i], None),
        "protobuf": lambda i: servicer.Search(points_pb2.SearchRequest.FromString(wire[i]), None).SerializeToString(),
        "grpc": lambda i: stub.Search(reqs[i]),
        "client": lambda i: client.search(name, xs[i], K, space=SPACE),
    }


def breakdown(
    server: Any, client: Client, port: int, xq: np.ndarray, args: argparse.Namespace
) -> dict[int, dict[str, float]]:
    """p50 (microseconds) of one search call through each layer of the service, innermost first (the
    layers of :data:`LAYERS`, interleaved), per nq, on the small probe collection: its FAISS search
    takes microseconds, so the differences between layers are not lost in the search's own jitter."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = points_pb2_grpc.PointServiceStub(channel)  # type: ignore[no-untyped-call]
    out: dict[int, dict[str, float]] = {}
    try:
        for nq in NQS:
            xs = batches_of(xq, nq)
            sides = layer_calls(server, client, stub, xs)
            index = list(range(len(xs)))
            for call in sides.values():
                warm_up(call, index)
            w = interleaved(sides, index, nq, args.seconds)
            out[nq] = {layer: w[layer].pct_ms(50) * 1e3 for layer in LAYERS}
            log(f"breakdown nq={nq}: " + ", ".join(f"{k} {v:.0f} us" for k, v in out[nq].items()))
    finally:
        channel.close()
    return out


# -- report --------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]], threads: int) -> str:
    """The main table; "svc idx" columns are FAISS in-process on the service's own sealed index."""
    mt = threads > 1
    head = ["index", "nq", "faiss QPS", "faiss QPS svc idx", "service QPS", "ratio", "ratio svc idx"]
    if mt:
        head += [f"faiss QPS {threads}thr", f"service QPS {threads}thr", f"ratio {threads}thr"]
    head += ["faiss p50/p99 ms", "svc idx p50/p99 ms", "service p50/p99 ms", "p50 overhead ms", "vs svc idx"]
    head += ["stream QPS", "stream ratio", "stream p50/p99 ms", "stream p50 overhead ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["index"], str(r["nq"]), f"{r['faiss_qps']:.0f}", f"{r['same_qps']:.0f}", f"{r['service_qps']:.0f}"]
        cells += [f"{r['ratio']:.3f}", f"{r['ratio_same']:.3f}"]
        if mt:
            cells += [f"{r['faiss_qps_mt']:.0f}", f"{r['service_qps_mt']:.0f}", f"{r['ratio_mt']:.3f}"]
        cells += [
            f"{r['faiss_p50_ms']:.3f} / {r['faiss_p99_ms']:.3f}",
            f"{r['same_p50_ms']:.3f} / {r['same_p99_ms']:.3f}",
            f"{r['service_p50_ms']:.3f} / {r['service_p99_ms']:.3f}",
            f"{r['service_p50_ms'] - r['faiss_p50_ms']:.3f}",
            f"{r['service_p50_ms'] - r['same_p50_ms']:.3f}",
            f"{r['stream_qps']:.0f}",
            f"{r['ratio_stream']:.3f}",
            f"{r['stream_p50_ms']:.3f} / {r['stream_p99_ms']:.3f}",
            f"{r['stream_p50_ms'] - r['faiss_p50_ms']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def breakdown_table(parts: dict[int, dict[str, float]]) -> str:
    nqs = sorted(parts)
    head = ["layer (p50 per call, cumulative)"] + [f"nq={nq} us" for nq in nqs] + [f"nq={nq} +us" for nq in nqs]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    prev = dict.fromkeys(nqs, 0.0)
    for layer, text in LAYERS.items():
        cells = [text] + [f"{parts[nq][layer]:.0f}" for nq in nqs]
        cells += [f"{parts[nq][layer] - prev[nq]:+.0f}" for nq in nqs]
        prev = {nq: parts[nq][layer] for nq in nqs}
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100000, help="database rows (default 100000)")
    p.add_argument("--seconds", type=float, default=3.0, help="wall-clock seconds per measurement (default 3)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a debdesc split folder (default %(default)s)")
    p.add_argument("--out", type=Path, help="also write the JSON result to this file")
    p.add_argument(
        "--ef-search", type=int, default=DEFAULT_EF_SEARCH, help="HNSW efSearch for both sides (default %(default)s)"
    )
    p.add_argument("--threads", type=int, default=2, help="client threads of the concurrent runs (<2: skip them)")
    p.add_argument("--recall-queries", type=int, default=2000, help="queries scored for Recall@10 (default 2000)")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per Upsert call (default 4096)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = machine_info()
    print(f"# search_overhead: {info['date']}")
    print(f"# machine: {info['cpu']}, {info['cores']} cores; python {info['python']}, faiss {info['faiss']}, ", end="")
    print(f"numpy {info['numpy']}, grpcio {info['grpcio']}; load average {info['loadavg_start']}")
    busy = info["loadavg_start"][0]
    if busy > 0.5 * (info["cores"] or 1):
        print(f"# WARNING: load average {busy} on {info['cores']} cores before the start: other processes share the")
        print("# CPUs, and FAISS's OpenMP batches (nq=64) slow down unevenly under contention; rerun when idle.")
    data = load(args.data, args.n)
    if not data.real:
        log(f"{args.data} not found: falling back to seeded synthetic vectors")
    n, d = data.xb.shape
    omp = ServerConfig().omp_threads
    print(f"# data: {data.source}")
    print(f"# n={n} d={d} k={K} ef_search={args.ef_search} omp_threads={omp} (server default) window={args.seconds}s")

    indexes, build_s = build_inprocess(data, omp)
    xr = data.xq[: args.recall_queries]
    _, gt = indexes["Flat"].search(xr, K)
    task = float(np.mean([(gt[i] == i).any() for i in range(min(len(xr), n))])) if data.real else None

    with tempfile.TemporaryDirectory(prefix="interlingua-bench-") as tmp:
        server, port = create_server(ServerConfig(data_dir=Path(tmp), port=0, metrics_port=None))
        server.start()
        if not server.wait_ready(120):
            raise SystemExit(f"server did not become ready: {server.load_error}")
        try:
            with Client(f"127.0.0.1:{port}", timeout=600) as client:
                fill = fill_service(client, data, args.batch_size)
                rows = []
                for spec in SPECS:
                    same = server.engine.collections[spec.lower()].segments.snapshot.sealed
                    rows += measure(spec, indexes[spec], same, client, data.xq, args, omp)
                rec = recalls(indexes, client, xr, args.ef_search, gt)
                work = hnsw_work(indexes, server, xr, args.ef_search)
                parts = breakdown(server, client, port, data.xq, args)
        finally:
            server.stop(0)

    by = {(r["index"], r["nq"]): r for r in rows}
    over = {s: by[s, 1]["service_p50_ms"] - by[s, 1]["faiss_p50_ms"] for s in SPECS}
    over_stream = {s: by[s, 1]["stream_p50_ms"] - by[s, 1]["faiss_p50_ms"] for s in SPECS}
    result: dict[str, Any] = {
        "qps_ratio_nq64_flat": by["Flat", 64]["ratio"],
        "qps_ratio_nq64_hnsw": by["HNSW32", 64]["ratio"],
        # Measured on HNSW32: its ~0.3 ms search resolves a 0.5 ms overhead; Flat's single-threaded
        # ~20 ms scan of 150 MB varies by more than that on a shared VM (its figure is kept beside).
        # The headline is the service's single-query path, SearchStream (one long-lived call); the
        # unary Search figure, which pays Python gRPC's per-call cost, is reported beside it.
        "p50_overhead_ms": over_stream["HNSW32"],
        "p50_overhead_ms_unary": over["HNSW32"],
        "p50_overhead_ms_flat": over["Flat"],
        "p50_overhead_ms_hnsw": over["HNSW32"],
        "p50_overhead_ms_stream_flat": over_stream["Flat"],
        "qps_ratio_nq64_flat_same_index": by["Flat", 64]["ratio_same"],
        "qps_ratio_nq64_hnsw_same_index": by["HNSW32", 64]["ratio_same"],
        "p50_overhead_ms_hnsw_same_index": by["HNSW32", 1]["service_p50_ms"] - by["HNSW32", 1]["same_p50_ms"],
    }
    result["targets_met"] = bool(
        min(result["qps_ratio_nq64_flat"], result["qps_ratio_nq64_hnsw"]) >= TARGET_RATIO
        and result["p50_overhead_ms"] <= TARGET_P50_MS
    )
    result.update(
        n=n,
        d=d,
        k=K,
        ef_search=args.ef_search,
        omp_threads=omp,
        seconds=args.seconds,
        threads=args.threads,
        data=data.source,
        real_data=data.real,
        machine=info,
        rows=rows,
        recall_at_10_vs_exact=rec,
        hnsw_distances_per_query=work,
        task_recall_at_10_exact=task,
        build_s={"faiss": build_s, "service": fill},
        loadavg_end=[round(x, 2) for x in os.getloadavg()],
        breakdown_p50_us={str(nq): v for nq, v in parts.items()},
    )

    print()
    print(table(rows, args.threads))
    print()
    print(f"Recall@{K} vs exact ({len(xr)} queries): " + ", ".join(f"{k} {v:.4f}" for k, v in rec.items()))
    print("HNSW distance computations per query (same params): " + ", ".join(f"{k} {v:.0f}" for k, v in work.items()))
    if task is not None:
        print(f"Task R@{K} (query i -> doc i, exact search): {task:.4f}")
    print("Build: " + ", ".join(f"faiss {s} {t:.1f} s" for s, t in build_s.items()), end="; ")
    print(
        ", ".join(f"service {s} ingest {t['ingest_s']:.1f} s, merged+checkpointed {t['ready_s']:.1f} s"
                  for s, t in fill.items())
    )  # fmt: skip
    print()
    print(breakdown_table(parts))
    verdict = "met" if result["targets_met"] else "NOT met"
    print(
        f"Targets ({verdict}): ratio nq=64 >= {TARGET_RATIO} (flat {result['qps_ratio_nq64_flat']:.3f}, hnsw "
        f"{result['qps_ratio_nq64_hnsw']:.3f}); p50 overhead <= {TARGET_P50_MS} ms "
        f"(hnsw {result['p50_overhead_ms']:.3f}, flat {result['p50_overhead_ms_flat']:.3f}); "
        f"load average at the end {result['loadavg_end']}"
    )
    print(
        f"Against the service's own index in-process: ratio nq=64 flat {result['qps_ratio_nq64_flat_same_index']:.3f}, "
        f"hnsw {result['qps_ratio_nq64_hnsw_same_index']:.3f}; p50 overhead hnsw "
        f"{result['p50_overhead_ms_hnsw_same_index']:.3f} ms"
    )
    line = json.dumps(result, separators=(",", ":"))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(line)
    return result


if __name__ == "__main__":
    main()
