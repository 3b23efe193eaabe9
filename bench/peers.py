"""Interlingua against its peers on one machine: in-process FAISS, a Chroma server, Milvus Lite (issue 5).

All four hold the same gallery (:mod:`_data`: the debdesc dev docs in the MiniLM space, tiled with
seeded noise to ``--n`` rows; seeded vectors without the folder) in an HNSW graph of the same ``M``
and ``efConstruction`` under inner product (:mod:`_peers`). For each: build time (ingest until the
last write is acknowledged, and until the graph holds every vector), then an efSearch sweep giving
Recall@10 (against exact search) and batch QPS at nq=64. Each system's operating point is the
smallest swept efSearch reaching Recall@10 >= ``--target-recall``. ``interlingua_advised`` is the
service at its own index advisor's choice (issue 13): ``RecommendIndex`` on the ``interlingua``
collection with ``--nq-tune`` real queries kept apart from the evaluation ones, a second collection
on the chosen spec, its nprobe / efSearch and k_factor swept up from the advised point (its
operating point: the fastest setting reaching the target). There, the systems are measured
side by side in alternating slices (A B C D D C B A ...; :func:`search_overhead.interleaved`) so
that the drift of a shared machine hits all alike: batch QPS at nq=64 and serial single-query
latency (p50, p99). Ingest throughput is acknowledged, durable vectors per second through each
client (Interlingua: SQLite WAL, synchronous=FULL; each acknowledged batch is searchable, checked on
the last one). Servers run in their own processes (Interlingua, Chroma); Milvus Lite is embedded by
design, and built and measured after the others have stopped (``--solo``), side by side only with
``interlingua_milvus`` (the service with ``--backend milvus`` over its own Milvus Lite file, issue 14:
``milvus_layer_qps_ratio`` is its QPS over Milvus Lite's at the same recall): its embedded
server's background work slowed every system measured beside it. Progress goes to stderr, the
report to stdout; its last line is one JSON object. A PNG of QPS against Recall@10 goes to
``--plot``. Results and their reading: ``docs/BENCHMARKS.md``.

    .venv/bin/python bench/peers.py --data ../shared/data/debdesc/dev [--n 1000000] [--plot FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from _common import Window, batches_of, interleaved, log, machine_info, recall_at, warm_up
from _data import DEFAULT_DATA, load
from _peers import Chroma, Faiss, Interlingua, InterlinguaAdvised, InterlinguaEmbedded, MilvusLite, System
from _peers_milvus import InterlinguaMilvus

K = 10
EF_SWEEP = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
TARGETS = {
    "qps_vs_chroma": 3.0,
    "qps_vs_faiss": 0.8,
    "p50_overhead_ms": 0.5,
    "p50_vs_chroma": 1 / 3,
    "ingest_vps": 2e4,
    # issue 13
    "qps_vs_faiss_hnsw": 1.5,
    "embedded_p50_overhead_ms": 0.05,
    "grpc_p50_over_echo_ms": 0.1,
    # issue 14
    "milvus_layer_qps_ratio": 0.9,
}


def exact_top_k(xb: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    return index.search(xq, k)[1]  # type: ignore[no-any-return]


def sweep(
    sys_: System, xq: np.ndarray, gt: np.ndarray, batches: list[np.ndarray], seconds: float, target: float
) -> list[dict[str, Any]]:
    """Recall@10 over xq and nq=64 QPS for each of the system's settings, until recall stops
    mattering (>= 0.995) or two points have reached ``target``; on a grid (the advised collection:
    nprobe or efSearch for each k_factor) each row until it reaches ``target``."""
    rows: list[dict[str, Any]] = []
    group = getattr(sys_, "group", None)  # a grid: each value of this setting swept up to the target
    done: set[int] = set()
    for point in sys_.points(EF_SWEEP):
        if group is not None and point.get(group) in done:
            continue
        sys_.set_point(point)
        I = np.vstack([sys_.search(xq[i : i + 64], K) for i in range(0, len(xq), 64)])
        w = interleaved({sys_.name: lambda x: sys_.search(x, K)}, batches, 64, seconds)[sys_.name]
        label = " ".join(f"{k}={v}" for k, v in point.items()) or "-"
        rows.append(
            {
                "system": sys_.name,
                "ef_search": point.get("ef_search", 0),
                "params": label,
                "point": point,
                "recall_at_10": recall_at(I, gt),
                "qps_nq64": w.qps,
            }
        )
        log(f"{sys_.name} {label}: R@10 {rows[-1]['recall_at_10']:.4f}, {w.qps:.0f} QPS at nq=64")
        if group is not None:
            if rows[-1]["recall_at_10"] >= target:
                done.add(point.get(group, 0))
            continue
        if rows[-1]["recall_at_10"] >= 0.995 or sum(r["recall_at_10"] >= target for r in rows) >= 2:
            break
    return rows


def operating_point(rows: list[dict[str, Any]], target: float, fastest: bool = False) -> dict[str, Any]:
    """The smallest efSearch reaching ``target`` recall (``fastest``: the fastest setting reaching
    it, for a ladder whose QPS is not monotone), or the best recall reached, flagged."""
    hits = [r for r in rows if r["recall_at_10"] >= target]
    if hits:
        return dict(max(hits, key=lambda r: r["qps_nq64"]) if fastest else hits[0], reached=True)
    return dict(max(rows, key=lambda r: r["recall_at_10"]), reached=False)


def frontier(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The settings no other one beats on both Recall@10 and QPS, by recall (an efSearch sweep is
    one already, but for timing noise)."""
    out = [
        r
        for r in rows
        if not any(o["recall_at_10"] >= r["recall_at_10"] and o["qps_nq64"] > r["qps_nq64"] for o in rows)
    ]
    return sorted(out, key=lambda r: r["recall_at_10"])


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing (pip install -e '.[bench]'): no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["system"] for r in rows):
        pts = sorted((r for r in rows if r["system"] == name), key=lambda r: r["recall_at_10"])
        front = frontier(pts) if any("k_factor" in p["point"] for p in pts) else pts
        (line,) = ax.plot([p["recall_at_10"] for p in front], [p["qps_nq64"] for p in front], "o-", label=name)
        if len(front) < len(pts):  # a grid (the advised collection): every setting, the frontier joined
            ax.plot(
                [p["recall_at_10"] for p in pts], [p["qps_nq64"] for p in pts], ".", color=line.get_color(), alpha=0.35
            )
    ax.set_xlabel("Recall@10 (vs exact search)")
    ax.set_ylabel("QPS (nq=64 batches, one client thread)")
    ax.set_yscale("log")
    ax.axvline(0.95, color="grey", lw=0.8, ls="--")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"plot: {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="debdesc split folder (default: %(default)s)")
    ap.add_argument("--n", type=int, default=1_000_000, help="gallery rows (default: %(default)s)")
    ap.add_argument("--nq-eval", type=int, default=1000, help="queries for recall (default: %(default)s)")
    ap.add_argument("--m", type=int, default=32, help="HNSW M (default: %(default)s)")
    ap.add_argument("--ef-construction", type=int, default=100, help="HNSW efConstruction (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=4096, help="ingest batch size (default: %(default)s)")
    ap.add_argument("--sweep-seconds", type=float, default=1.0, help="QPS window per sweep point")
    ap.add_argument("--seconds", type=float, default=8.0, help="window per system, side by side")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument(
        "--systems", default="faiss,interlingua,interlingua_advised,interlingua_embedded,chroma,milvus_lite"
    )
    ap.add_argument(
        "--nq-tune",
        type=int,
        default=1000,
        help="real queries (after the --nq-eval ones) the index advisor measures on (default: %(default)s)",
    )
    ap.add_argument(
        "--solo",
        default="milvus_lite,interlingua_milvus",
        help="systems built after the others have stopped and measured side by side among themselves "
        "(default: %(default)s: Milvus Lite's embedded server works in the background and slowed every "
        "system measured beside it; interlingua_milvus is the service over Milvus Lite, issue 14)",
    )
    ap.add_argument("--plot", type=Path, help="PNG of QPS vs Recall@10")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--workdir", type=Path, help="where the systems' data folders go (default: the temp dir)")
    ap.add_argument(
        "--keep-workdir", action="store_true", help="keep the systems' data folders (removed by default, even on error)"
    )
    args = ap.parse_args()
    omp = os.cpu_count() or 1
    info = machine_info()
    data = load(args.data, args.n)
    xb, xq_all = data.xb, data.xq
    xq = xq_all[: args.nq_eval]
    log(f"data: {data.source}")
    t0 = time.perf_counter()
    gt = exact_top_k(xb, xq, K)
    log(f"exact top-{K} of {len(xq)} queries in {time.perf_counter() - t0:.1f} s")
    b64 = batches_of(xq_all, 64)[:64]
    b1 = batches_of(xq_all, 1)[:2000]

    folder = Path(tempfile.mkdtemp(prefix="peers-", dir=args.workdir))  # several GB at 1M: removed at the end
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `timeout` or kill: the finally blocks still run

    def interlingua() -> Interlingua:
        s = systems.get("interlingua")
        if not isinstance(s, Interlingua):
            raise SystemExit("interlingua_advised runs on the interlingua system's server: list interlingua before it")
        return s

    makers = {
        "faiss": lambda: Faiss(omp),
        "interlingua": lambda: Interlingua(folder, omp),
        "interlingua_advised": lambda: InterlinguaAdvised(
            interlingua(), xq_all[args.nq_eval : args.nq_eval + args.nq_tune], args.target_recall
        ),
        "interlingua_embedded": lambda: InterlinguaEmbedded(folder, omp),
        "chroma": lambda: Chroma(folder),
        "milvus_lite": lambda: MilvusLite(folder),
        "interlingua_milvus": lambda: InterlinguaMilvus(folder, omp),
    }
    names = [s for s in args.systems.split(",") if s]
    solo = [n for n in names if n in args.solo.split(",")]
    together = [n for n in names if n not in solo]
    systems: dict[str, System] = {}
    sweeps: list[dict[str, Any]] = []
    build: dict[str, dict[str, float]] = {}
    searchable: dict[str, bool | None] = {}
    ops: dict[str, dict[str, Any]] = {}
    batch_w: dict[str, Window] = {}
    serial_w: dict[str, Window] = {}
    advised: dict[str, Any] = {}
    failed: dict[str, str] = {}

    def build_and_sweep(name: str) -> System:
        s = systems[name] = makers[name]()
        log(f"{name}: building {len(xb)} x {data.d} (M={args.m}, efConstruction={args.ef_construction})")
        s.build(xb, args.m, args.ef_construction, args.batch)
        build[name] = {"ingest_s": s.ingest_s, "ready_s": s.ready_s, "ingest_vps": len(xb) / s.ingest_s}
        searchable[name] = getattr(s, "searchable_after_ack", None)
        log(f"{name}: acknowledged in {s.ingest_s:.1f} s, graph complete after {s.ready_s:.1f} s")
        os.sync()  # the page cache's write-back of what it wrote would otherwise run into the sweep
        rows = sweep(s, xq, gt, b64, args.sweep_seconds, args.target_recall)
        sweeps.extend(rows)
        ops[name] = operating_point(rows, args.target_recall, fastest=isinstance(s, InterlinguaAdvised))
        if isinstance(s, InterlinguaAdvised):
            c = s.chosen
            advised.update(
                spec=s.spec,
                advisor_point=" ".join(f"{k}={v}" for k, v in (("ef_search", c.ef_search), ("nprobe", c.nprobe),
                                                                  ("k_factor", c.k_factor)) if v),
                advisor_recall_on_sample=c.recall,
                advisor_qps_on_sample=c.qps,
                advisor_bytes_per_vector=c.bytes_per_vector,
                advisor_sample_points=s.recommendation.sample_points,
                advisor_points_measured=s.recommendation.points_measured,
                advise_s=s.advise_s,
            )  # fmt: skip
        return s

    def side_by_side(names: list[str], label: str) -> None:
        calls: dict[str, Any] = {}
        for n in names:
            s = systems[n]
            s.set_point(ops[n]["point"])
            calls[n] = lambda x, s=s: s.timed(x, K)  # the client call alone (System.timed)
            if isinstance(s, Interlingua):
                calls[n + "_stream"] = lambda x, s=s: s.stream_search(x, K)
                calls["grpc_echo"] = s.echo
            if isinstance(s, InterlinguaEmbedded):
                calls[n + "_faiss_same_index"] = lambda x, s=s: s.faiss_same_index(x, K)
        for c in calls.values():
            warm_up(c, b64)
        log(f"{label}: nq=64 batches")
        batch_w.update(interleaved(calls, b64, 64, args.seconds))
        log(f"{label}: serial single queries")
        serial_w.update(interleaved(calls, b1, 1, args.seconds))

    try:
        for name in together:
            build_and_sweep(name)
        side_by_side(together, "side by side")
        for name in together:  # before the solo systems: none of them may run in the background then
            systems.pop(name).close()
        built = []
        for name in solo:  # a late system that fails is left out: the figures of the others still count
            try:
                build_and_sweep(name)
                built.append(name)
            except Exception as e:
                log(f"{name}: FAILED, left out: {e!r}")
                failed[name] = repr(e)[:500]
                if name in systems:
                    systems.pop(name).close()
        if built:
            side_by_side(built, " and ".join(built))
        for name in built:
            systems.pop(name).close()
    finally:
        for s in systems.values():
            s.close()
        if not args.keep_workdir:
            shutil.rmtree(folder, ignore_errors=True)
    advised["failed_systems"] = failed
    report(args, info, data.d, data.source, data.real, build, sweeps, ops, batch_w, serial_w, searchable, advised)
    return 0


def report(
    args: argparse.Namespace,
    info: dict[str, Any],
    d: int,
    source: str,
    real: bool,
    build: dict[str, dict[str, float]],
    sweeps: list[dict[str, Any]],
    ops: dict[str, dict[str, Any]],
    batch_w: dict[str, Window],
    serial_w: dict[str, Window],
    searchable: dict[str, bool | None],
    advised: dict[str, Any],
) -> None:
    print(f"# peers: n={args.n}, d={d}, k={K}, HNSW M={args.m} efConstruction={args.ef_construction}")
    print(f"# {info['date']}, {info['cpu']}, {info['cores']} cores; data: {source}\n")
    print("| system | ingest s | ingest vec/s | graph complete s |")
    print("|---|---|---|---|")
    for n, b in build.items():
        print(f"| {n} | {b['ingest_s']:.1f} | {b['ingest_vps']:.0f} | {b['ready_s']:.1f} |")
    if "spec" in advised:
        print(
            f"\nIndex advisor (RecommendIndex on interlingua's collection, {advised['advisor_sample_points']} points,"
            f" {args.nq_tune} real queries apart from the evaluation ones, {advised['advise_s']:.0f} s):"
            f" {advised['spec']} {advised['advisor_point']}, Recall@10 {advised['advisor_recall_on_sample']:.4f}"
            f" and {advised['advisor_qps_on_sample']:.0f} QPS on the sample,"
            f" {advised['advisor_bytes_per_vector']} bytes per vector"
        )
    print("\n| system | setting | Recall@10 | QPS nq=64 |")
    print("|---|---|---|---|")
    for r in sweeps:
        print(f"| {r['system']} | {r['params']} | {r['recall_at_10']:.4f} | {r['qps_nq64']:.0f} |")
    print(
        f"\nSide by side at each system's smallest efSearch (interlingua_advised: its fastest setting) with"
        f" Recall@10 >= {args.target_recall}:\n"
    )
    if any(n in args.solo.split(",") for n in batch_w):
        print(f"({args.solo}: measured side by side among themselves, after the others had stopped)\n")
    print("| system | setting | Recall@10 | QPS nq=64 | serial QPS | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for n, w in batch_w.items():
        if n == "grpc_echo":
            print(f"| {n} (Health/Check) | | | | {serial_w[n].qps:.0f} | {serial_w[n].pct_ms(50):.3f} | "
                  f"{serial_w[n].pct_ms(99):.3f} |")  # fmt: skip
            continue
        op = ops[n.removesuffix("_stream").removesuffix("_faiss_same_index")]  # the same setting
        s = serial_w[n]
        flag = "" if op["reached"] else " (not reached)"
        print(
            f"| {n} | {op['params']} | {op['recall_at_10']:.4f}{flag} | {w.qps:.0f} | {s.qps:.0f} | "
            f"{s.pct_ms(50):.3f} | {s.pct_ms(99):.3f} |"
        )
    fig: dict[str, Any] = {}
    il, fa, ch, mv, em = "interlingua", "faiss", "chroma", "milvus_lite", "interlingua_embedded"
    ad = "interlingua_advised"
    if ad in batch_w and ops[ad]["reached"]:  # Interlingua at its advisor's operating point (issue 13)
        qa = batch_w[ad].qps
        if ch in batch_w:
            fig["qps_vs_chroma"] = qa / batch_w[ch].qps
        if fa in batch_w:
            fig["qps_vs_faiss_hnsw"] = qa / batch_w[fa].qps
        fig["advised_qps_nq64"] = qa
        fig["advised_setting"] = f"{advised['spec']} {ops[ad]['params']}"
        fig.update({k: v for k, v in advised.items() if k not in ("spec", "failed_systems")})
    if il in batch_w:
        q = batch_w[il].qps
        if ch in batch_w:
            fig["qps_vs_chroma_hnsw"] = q / batch_w[ch].qps
            fig.setdefault("qps_vs_chroma", fig["qps_vs_chroma_hnsw"])
            fig["p50_vs_chroma"] = serial_w[il].pct_ms(50) / serial_w[ch].pct_ms(50)
        if mv in batch_w:
            fig["qps_vs_milvus_lite"] = q / batch_w[mv].qps
            fig["p50_vs_milvus_lite"] = serial_w[il].pct_ms(50) / serial_w[mv].pct_ms(50)
        if fa in batch_w:
            fig["qps_vs_faiss"] = q / batch_w[fa].qps  # the same HNSW graph search, service vs in process
            fig.setdefault("qps_vs_faiss_hnsw", fig["qps_vs_faiss"])
            fig["p50_overhead_ms"] = serial_w[il].pct_ms(50) - serial_w[fa].pct_ms(50)
            fig["p50_overhead_ms_stream"] = serial_w[il + "_stream"].pct_ms(50) - serial_w[fa].pct_ms(50)
        fig["ingest_vps"] = build[il]["ingest_vps"]
        if "grpc_echo" in serial_w:
            fig["grpc_echo_p50_ms"] = serial_w["grpc_echo"].pct_ms(50)
            fig["service_p50_minus_echo_ms"] = serial_w[il].pct_ms(50) - fig["grpc_echo_p50_ms"]
            if em in serial_w:  # what a search's round trip costs beyond an empty one's (same engine, same graph)
                fig["grpc_p50_over_echo_ms"] = fig["service_p50_minus_echo_ms"] - serial_w[em].pct_ms(50)
    if em in serial_w and em + "_faiss_same_index" in serial_w:
        fig["embedded_p50_overhead_ms"] = serial_w[em].pct_ms(50) - serial_w[em + "_faiss_same_index"].pct_ms(50)
        fig["qps_embedded_vs_faiss_same_index"] = batch_w[em].qps / batch_w[em + "_faiss_same_index"].qps
    if il in ops and fa in ops:  # the graph grown by merges against FAISS's one-shot build, same M and efC
        fig["merge_graph_ef_for_095"] = ops[il]["ef_search"]
        fig["oneshot_graph_ef_for_095"] = ops[fa]["ef_search"]
        fig["searchable_after_ack"] = searchable.get(il)
    if ch in build:
        fig["ingest_vps_chroma"] = build[ch]["ingest_vps"]
    im = "interlingua_milvus"
    if im in batch_w and mv in batch_w:  # the layer over the same engine (issue 14)
        fig["milvus_layer_qps_ratio"] = batch_w[im].qps / batch_w[mv].qps
        fig["milvus_layer_p50_overhead_ms"] = serial_w[im].pct_ms(50) - serial_w[mv].pct_ms(50)
        fig["ingest_vps_milvus_layer"] = build[im]["ingest_vps"]
        fig["ingest_vps_milvus_lite"] = build[mv]["ingest_vps"]
    met = {
        "qps_vs_chroma": fig.get("qps_vs_chroma", 0) >= TARGETS["qps_vs_chroma"],
        "qps_vs_faiss": fig.get("qps_vs_faiss", 0) >= TARGETS["qps_vs_faiss"],
        "p50_overhead_ms": fig.get("p50_overhead_ms", 9e9) <= TARGETS["p50_overhead_ms"],
        "p50_vs_chroma": fig.get("p50_vs_chroma", 9e9) <= TARGETS["p50_vs_chroma"],
        "ingest_vps": fig.get("ingest_vps", 0) >= TARGETS["ingest_vps"],
        "qps_vs_faiss_hnsw": fig.get("qps_vs_faiss_hnsw", 0) >= TARGETS["qps_vs_faiss_hnsw"],
        "embedded_p50_overhead_ms": fig.get("embedded_p50_overhead_ms", 9e9) <= TARGETS["embedded_p50_overhead_ms"],
        "grpc_p50_over_echo_ms": fig.get("grpc_p50_over_echo_ms", 9e9) <= TARGETS["grpc_p50_over_echo_ms"],
        "merge_graph_ef_for_095": fig.get("merge_graph_ef_for_095", -1) <= fig.get("oneshot_graph_ef_for_095", -2),
        # issue 14
        "milvus_layer_qps_ratio": fig.get("milvus_layer_qps_ratio", 0) >= TARGETS["milvus_layer_qps_ratio"],
    }
    print("\nTargets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in met.items()))
    if args.plot:
        plot(sweeps, args.plot, f"HNSW M={args.m} efC={args.ef_construction}, {args.n:,} x {d}, {info['date']}")
    out = dict(
        fig,
        targets_met=all(met.values()),
        failed_systems=advised.get("failed_systems", {}),
        targets=met,
        n=args.n,
        d=d,
        k=K,
        m=args.m,
        ef_construction=args.ef_construction,
        operating_points={
            n: {"ef_search": o["ef_search"], "params": o["params"], "recall_at_10": o["recall_at_10"]}
            for n, o in ops.items()
        },
        side_by_side={
            n: {
                "qps_nq64": w.qps,
                "serial_qps": serial_w[n].qps,
                "p50_ms": serial_w[n].pct_ms(50),
                "p99_ms": serial_w[n].pct_ms(99),
            }
            for n, w in batch_w.items()
        },
        build=build,
        sweep=sweeps,
        data=source,
        real_data=real,
        machine=dict(info, loadavg_end=[round(x, 2) for x in os.getloadavg()]),
    )
    line = json.dumps(out)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    sys.exit(main())
