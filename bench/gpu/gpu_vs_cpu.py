"""GPU against CPU on one 1M x 384 gallery: FAISS indexes, linear transforms, and the service end to end.

Data: :mod:`_data` (the debdesc dev MiniLM docs tiled to ``--n`` rows, queries ``old_query.npy``;
seeded vectors when the folder is absent), L2-normalized, inner product. Sections, each timed over
``--seconds`` of sequential calls after one untimed call (QPS = queries per second, k = 10):

1. FAISS Flat and IVF{nlist},Flat (nprobe 16 and 64), CPU index against its
   ``index_cpu_to_gpu`` copy, at nq = 1, 64 and 1024; build, training and transfer times; Recall@10
   against the exact CPU Flat result. GpuIndexCagra (cuVS) where this faiss has it.
2. A 384 x 384 linear map ``x @ W + b``: numpy on the CPU against torch on the GPU (numpy in,
   numpy out, transfers included) over the whole gallery and over nq = 64 batches; the service's
   own helper (``Device.apply_affine``) at nq = 64 too.
3. The service: ``create_server`` with ``device="cpu"``, a Flat collection of the gallery filled
   through the client and merged once (ingest, merge and checkpoint times reported), nq = 64 QPS; then
   the same data dir served with ``device="cuda"`` (load = checkpoint read + GPU copy) and measured
   the same way, its ids compared with the CPU service's.

``--device cpu`` (or a machine without a GPU) skips every GPU column; ``--quick`` is a 200k run with
nlist 1024. Progress goes to stderr, the table to stdout, and the last line is one JSON object.

    bench/gpu/run.sh                                    # on a lent GPU machine (installs, tests, runs)
    .venv/bin/python bench/gpu/gpu_vs_cpu.py [--n 1000000] [--data DIR] [--quick] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/: _common, _data
from _common import batches_of, log, machine_basics, recall_at
from _data import DEFAULT_DATA, load

K = 10
NQS = (1, 64, 1024)
SPACE = "minilm@1"


def faiss_gpus() -> int:
    return int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0


def torch_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def machine_info() -> dict[str, Any]:
    import torch

    return {
        **machine_basics(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "faiss_gpus": faiss_gpus(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }


def qps(call: Callable[[np.ndarray], object], batches: Sequence[np.ndarray], seconds: float) -> float:
    """Queries per second of sequential ``call(batch)`` over ``seconds`` (one untimed call first)."""
    call(batches[0])
    n = i = 0
    t0 = time.perf_counter()
    while True:
        b = batches[i % len(batches)]
        call(b)
        n, i = n + len(b), i + 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return n / elapsed


class Report:
    """Rows of the printed table and the figures of the final JSON line."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []
        self.figures: dict[str, Any] = {}

    def row(self, *cells: object) -> None:
        cells = cells + (None,) * (8 - len(cells))
        self.rows.append(tuple("-" if c is None else f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells))

    def print(self) -> None:
        head = ("section", "what", "nq", "CPU", "GPU", "GPU / CPU", "recall@10 CPU", "recall@10 GPU")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in self.rows:
            print("| " + " | ".join(r) + " |")


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


# -- 1. FAISS ------------------------------------------------------------------------------------------


def bench_index(
    rep: Report, name: str, cpu: Any, gpu: Any | None, xq: np.ndarray, gt: np.ndarray, seconds: float, params: Any
) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for nq in NQS:
        b = batches_of(xq, nq, most=64)
        c = qps(lambda x: cpu.search(x, K, params=params), b, seconds)
        g = qps(lambda x: gpu.search(x, K, params=params), b, seconds) if gpu is not None else None
        rc = rg = None
        if nq == NQS[-1]:
            rc = recall_at(cpu.search(xq, K, params=params)[1], gt)
            rg = recall_at(gpu.search(xq, K, params=params)[1], gt) if gpu is not None else None
            out.update(recall_cpu=rc, recall_gpu=rg)
        rep.row("faiss", name, nq, c, g, ratio(g, c), rc, rg)
        out[f"cpu_nq{nq}"], out[f"gpu_nq{nq}"] = c, g
        log(f"{name} nq={nq}: CPU {c:.0f} QPS, GPU " + (f"{g:.0f} QPS" if g is not None else "-"))
    return out


def bench_faiss(rep: Report, xb: np.ndarray, xq: np.ndarray, args: argparse.Namespace, gpu: bool) -> None:
    """Section 1: Flat, IVF and CAGRA, each against the exact CPU Flat top-K of xq."""
    d, f = xb.shape[1], rep.figures
    res = faiss.StandardGpuResources() if gpu else None
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(d)
    flat.add(xb)
    f["cpu_flat_build_s"] = time.perf_counter() - t0
    gt = flat.search(xq, K)[1]
    gflat = None
    if res is not None:
        t0 = time.perf_counter()
        gflat = faiss.index_cpu_to_gpu(res, 0, flat)
        f["gpu_flat_transfer_s"] = time.perf_counter() - t0
    r = bench_index(rep, "Flat", flat, gflat, xq, gt, args.seconds, None)
    f.update(cpu_flat_qps_nq64=r["cpu_nq64"], gpu_flat_qps_nq64=r["gpu_nq64"])
    f.update({f"{s}_flat_qps_nq{nq}": r[f"{s}_nq{nq}"] for s in ("cpu", "gpu") for nq in NQS})
    f["gpu_speedup_flat_nq64"] = ratio(r["gpu_nq64"], r["cpu_nq64"])
    f["gpu_flat_recall10"] = r["recall_gpu"]
    del gflat

    spec = f"IVF{args.nlist},Flat"
    ivf = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    xt = xb[np.random.default_rng(0).choice(len(xb), min(len(xb), 39 * args.nlist), replace=False)]
    t0 = time.perf_counter()
    if res is not None:  # k-means on the GPU, then the trained (empty) index back to the CPU
        g = faiss.index_cpu_to_gpu(res, 0, ivf)
        g.train(xt)
        ivf = faiss.index_gpu_to_cpu(g)
        del g
    else:
        ivf.train(xt)
    f["ivf_train_s"], f["ivf_train_on"] = time.perf_counter() - t0, "gpu" if res is not None else "cpu"
    t0 = time.perf_counter()
    ivf.add(xb)
    f["cpu_ivf_add_s"] = time.perf_counter() - t0
    givf = None
    if res is not None:
        t0 = time.perf_counter()
        givf = faiss.index_cpu_to_gpu(res, 0, ivf)
        f["gpu_ivf_transfer_s"] = time.perf_counter() - t0
    log(f"{spec}: trained in {f['ivf_train_s']:.1f} s on the {f['ivf_train_on']}, added in {f['cpu_ivf_add_s']:.1f} s")
    for nprobe in (16, 64):
        p = faiss.SearchParametersIVF(nprobe=nprobe)
        r = bench_index(rep, f"{spec} nprobe={nprobe}", ivf, givf, xq, gt, args.seconds, p)
        for s in ("cpu", "gpu"):
            f.update({f"{s}_ivf_nprobe{nprobe}_qps_nq{nq}": r[f"{s}_nq{nq}"] for nq in NQS})
            f[f"{s}_ivf_nprobe{nprobe}_recall10"] = r[f"recall_{s}"]
    f["cpu_ivf_qps_nq64"], f["gpu_ivf_qps_nq64"] = f["cpu_ivf_nprobe16_qps_nq64"], f["gpu_ivf_nprobe16_qps_nq64"]
    f["gpu_speedup_ivf_nq64"] = ratio(f["gpu_ivf_qps_nq64"], f["cpu_ivf_qps_nq64"])
    del givf, ivf, flat
    f["cagra"] = bench_cagra(rep, res, xb, xq, gt, args) if res is not None else "skipped (no GPU)"


def bench_cagra(rep: Report, res: Any, xb: np.ndarray, xq: np.ndarray, gt: np.ndarray, args: argparse.Namespace) -> Any:
    if not hasattr(faiss, "GpuIndexCagra"):
        rep.row("faiss", "GpuIndexCagra", "-", None, "not available", None, None, None)
        return "not available (faiss built without cuVS)"
    try:
        cfg = faiss.GpuIndexCagraConfig()
        cfg.graph_degree, cfg.intermediate_graph_degree = 32, 64
        index = faiss.GpuIndexCagra(res, xb.shape[1], faiss.METRIC_L2, cfg)  # normalized: L2 ranks as IP
        t0 = time.perf_counter()
        index.train(xb)
        build = time.perf_counter() - t0
        sp = faiss.SearchParametersCagra()
        sp.itopk_size = 64
        out: dict[str, Any] = {"build_s": build, "graph_degree": 32, "itopk_size": 64}
        for nq in NQS:
            g = qps(lambda x: index.search(x, K, params=sp), batches_of(xq, nq, most=64), args.seconds)
            rg = recall_at(index.search(xq, K, params=sp)[1], gt) if nq == NQS[-1] else None
            rep.row("faiss", "GpuIndexCagra (32, itopk 64)", nq, None, g, None, None, rg)
            out[f"qps_nq{nq}"] = g
            out["recall10"] = rg if rg is not None else out.get("recall10")
        log(f"CAGRA: built in {build:.1f} s, {out['qps_nq64']:.0f} QPS at nq=64")
        return out
    except Exception as err:  # a build without cuVS support for this config, out of memory...
        rep.row("faiss", "GpuIndexCagra", "-", None, f"error: {type(err).__name__}", None, None, None)
        return f"error: {str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}"


# -- 2. transforms ---------------------------------------------------------------------------------


def bench_transform(rep: Report, xb: np.ndarray, xq: np.ndarray, args: argparse.Namespace, gpu: bool) -> None:
    from interlingua.server.device import Device
    from interlingua.server.transforms import AffineTransform

    f, d = rep.figures, xb.shape[1]
    rng = np.random.default_rng(3)
    W = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)
    b = (0.01 * rng.standard_normal(d)).astype(np.float32)
    chunk = 131072

    def cpu_all() -> None:
        for i in range(0, len(xb), chunk):
            y = xb[i : i + chunk] @ W
            y += b

    t0 = time.perf_counter()
    cpu_all()
    f["transform_cpu_vps"] = len(xb) / (time.perf_counter() - t0)
    batches = batches_of(xq, 64, most=64)
    f["transform_cpu_vps_nq64"] = qps(lambda x: x @ W + b, batches, args.seconds)
    f["transform_gpu_vps"] = f["transform_gpu_vps_nq64"] = f["transform_gpu_device_vps_nq64"] = None
    f["transform_gpu_compute_only_vps"] = None
    if gpu:
        import torch

        dev = torch.device("cuda", 0)
        Wt, bt = torch.from_numpy(W).to(dev), torch.from_numpy(b).to(dev)

        def gpu_map(x: np.ndarray) -> np.ndarray:
            out: np.ndarray = torch.addmm(bt, torch.from_numpy(x).to(dev), Wt).cpu().numpy()
            return out

        def gpu_all() -> None:
            for i in range(0, len(xb), chunk):
                gpu_map(xb[i : i + chunk])

        gpu_all()  # warm-up: CUDA context, cuBLAS handles
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gpu_all()
        f["transform_gpu_vps"] = len(xb) / (time.perf_counter() - t0)
        resident = torch.from_numpy(xb[: min(len(xb), 262144)]).to(dev)
        torch.addmm(bt, resident, Wt)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            torch.addmm(bt, resident, Wt)
        torch.cuda.synchronize()
        f["transform_gpu_compute_only_vps"] = 10 * len(resident) / (time.perf_counter() - t0)
        del resident
        f["transform_gpu_vps_nq64"] = qps(gpu_map, batches, args.seconds)
        t = AffineTransform({"query": W}, {"query": b}, {})
        device = Device.parse("cuda")
        f["transform_gpu_device_vps_nq64"] = qps(lambda x: device.apply_affine(t, x), batches, args.seconds)
        y = device.apply_affine(t, xq[:64])
        f["transform_gpu_max_abs_err"] = float(np.abs(np.asarray(y) - (xq[:64] @ W + b)).max())
    c, g = f["transform_cpu_vps"], f["transform_gpu_vps"]
    rep.row("transform", f"{d}x{d} x@W+b, {len(xb)} rows (vectors/s)", len(xb), c, g, ratio(g, c))
    c, g = f["transform_cpu_vps_nq64"], f["transform_gpu_vps_nq64"]
    rep.row("transform", f"{d}x{d} x@W+b (vectors/s)", 64, c, g, ratio(g, c))
    rep.row("transform", "Device.apply_affine (vectors/s)", 64, None, f["transform_gpu_device_vps_nq64"])
    for key in ("transform_cpu_vps", "transform_gpu_vps", "transform_cpu_vps_nq64", "transform_gpu_vps_nq64"):
        log(f"{key}: " + (f"{f[key]:.3g}" if f[key] is not None else "-"))


# -- 3. the service ------------------------------------------------------------------------------------


def bench_service(rep: Report, xb: np.ndarray, xq: np.ndarray, args: argparse.Namespace, gpu: bool) -> None:
    from interlingua.client import Client
    from interlingua.server import ServerConfig, create_server

    f = rep.figures
    batches = batches_of(xq, 64, most=16)
    ids_by: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="interlingua-gpu-bench-", dir=args.tmp) as tmp:
        for device in ("cpu", "cuda") if gpu else ("cpu",):
            cfg = ServerConfig(
                data_dir=Path(tmp),
                port=0,
                metrics_port=None,
                device=device,
                merge_min_fresh=1 << 40,  # one merge after the ingest, not one per 10% of growth
                merge_idle_seconds=0.5,
            )
            t0 = time.perf_counter()
            server, port = create_server(cfg)
            server.start()
            if not server.wait_ready(1800):
                raise RuntimeError(f"server ({device}) failed to load: {server.load_error}")
            f[f"service_{device}_load_s"] = time.perf_counter() - t0
            try:
                with Client(f"127.0.0.1:{port}", timeout=1800) as c:
                    if device == "cpu":
                        c.register_space(SPACE, xb.shape[1], "cosine")
                        c.create_collection("flat", SPACE, "Flat")
                        t0 = time.perf_counter()
                        c.upsert("flat", [str(i) for i in range(len(xb))], xb, space=SPACE, batch_size=8192)
                        f["service_ingest_s"] = time.perf_counter() - t0
                        while (info := c.get_collection("flat")).fresh_vectors or info.state != "ready":
                            time.sleep(0.2)
                        f["service_merge_s"] = time.perf_counter() - t0 - f["service_ingest_s"]
                        while (info := c.get_collection("flat")).checkpoint_sequence < info.last_sequence:
                            time.sleep(0.2)
                        f["service_ready_s"] = time.perf_counter() - t0
                        log(
                            f"service: ingested in {f['service_ingest_s']:.1f} s, ready in {f['service_ready_s']:.1f} s"
                        )
                    on_gpu = server.engine.collections["flat"].segments.snapshot.search_on_gpu
                    f[f"service_{device}_search_on_gpu"] = on_gpu
                    f[f"service_{device}_qps_nq64"] = qps(
                        lambda x: c.search("flat", x, K, space=SPACE), batches, args.seconds
                    )
                    ids_by[device] = np.stack([c.search("flat", x, K, space=SPACE).ids for x in batches[:4]])
                    log(f"service {device}: {f[f'service_{device}_qps_nq64']:.0f} QPS at nq=64 (GPU search: {on_gpu})")
            finally:
                server.stop(0)
    f["service_gpu_qps_nq64"] = f.pop("service_cuda_qps_nq64", None)
    if "cuda" in ids_by:
        f["service_gpu_vs_cpu_id_agreement"] = float(np.mean(ids_by["cuda"] == ids_by["cpu"]))
    cpu, gpu_qps = f["service_cpu_qps_nq64"], f["service_gpu_qps_nq64"]
    rep.row("service", "Flat, create_server + Client", 64, cpu, gpu_qps, ratio(gpu_qps, cpu))


# -- main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="debdesc-like folder (default %(default)s)")
    p.add_argument("--n", type=int, help="gallery rows (default 1000000, --quick 200000)")
    p.add_argument("--nlist", type=int, help="IVF lists (default 4096, --quick 1024)")
    p.add_argument("--seconds", type=float, help="seconds per measurement (default 2, --quick 1)")
    p.add_argument("--quick", action="store_true", help="a short run: 200k rows, nlist 1024, 1 s per figure")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="cpu skips the GPU columns")
    p.add_argument("--no-service", action="store_true", help="skip the end-to-end service section")
    p.add_argument("--tmp", help="folder for the service's data dir (default: the system's temp dir)")
    p.add_argument("--out", type=Path, help="also write the JSON object here")
    args = p.parse_args(argv)
    args.n = args.n or (200_000 if args.quick else 1_000_000)
    args.nlist = args.nlist or (1024 if args.quick else 4096)
    args.seconds = args.seconds or (1.0 if args.quick else 2.0)
    info = machine_info()
    want_gpu = args.device != "cpu"
    faiss_gpu, torch_gpu = want_gpu and info["faiss_gpus"] > 0, want_gpu and torch_cuda()
    if args.device == "cuda" and not (faiss_gpu and torch_gpu):
        log(f"--device cuda: faiss reports {info['faiss_gpus']} GPUs, torch CUDA {torch_gpu}; those columns skipped")
    card = None
    if torch_gpu:
        import torch

        card = torch.cuda.get_device_name(0)
    start = time.perf_counter()
    data = load(args.data, args.n)
    xb = data.xb
    xq = np.ascontiguousarray(np.resize(data.xq, (max(NQS), xb.shape[1])))  # cycles when fewer queries
    log(f"data: {data.source}; {xb.shape} in {time.perf_counter() - start:.1f} s")
    print(f"# gpu_vs_cpu: {info['date']}; card {card or 'none'}; {info['cpu']} x{info['cores']}; {data.source}")
    rep = Report()
    bench_faiss(rep, xb, xq, args, faiss_gpu)
    bench_transform(rep, xb, xq, args, torch_gpu)
    if not args.no_service:
        bench_service(rep, xb, xq, args, faiss_gpu)
    rep.print()
    result = {
        **rep.figures,
        "card": card,
        "machine": info,
        "n": args.n,
        "d": int(xb.shape[1]),
        "nlist": args.nlist,
        "k": K,
        "quick": args.quick,
        "device": "cuda" if faiss_gpu or torch_gpu else "cpu",
        "real_data": data.real,
        "seconds_total": time.perf_counter() - start,
    }
    line = json.dumps(result, default=str)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)
    return result


if __name__ == "__main__":
    main()
