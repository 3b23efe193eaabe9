"""The funnel section of ``bench/matryoshka.py``: Matryoshka funnel search against full-dimensional Flat.

On an n-row gallery (debdesc dev docs tiled with seeded noise by ``_data.load``; 1M rows by default)
rotated onto its principal axes by a ``pca_basis`` transform fitted on the fit split (orthogonal, so
full-dimensional scores are unchanged), it compares exact full-dimensional search (``IndexFlatIP``, d
dims) with funnel search as a prefix collection runs it: ``IndexFlatIP`` over the first m dims
(re-normalized) for a shortlist, then :func:`interlingua.server.funnel.rerank` through the stages with
the full vectors. Every method searches the same nq=64 batches, interleaved batch by batch so machine
noise hits all alike; QPS = queries / time spent in that method; Recall@10 is the task's (query i's
relevant doc is gallery row i). The fastest funnel within 1 point of full-dimensional Recall@10 is
the headline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from _data import load, normalize

from interlingua.server.funnel import rerank, shrink

#: (prefix dims, shortlist_k, intermediate stages): the funnel configurations swept
CONFIGS: tuple[tuple[int, int, tuple[tuple[int, int], ...]], ...] = (
    (32, 800, ((64, 300), (128, 60))),
    (64, 1000, ((128, 200),)),
    (64, 2000, ((128, 300),)),
    (96, 1000, ((192, 150),)),
    (96, 1500, ((192, 200),)),
    (96, 2000, ((192, 200),)),
    (128, 1000, ()),
)
K = 10
NQ = 64


def funnel_section(
    data: Path, fit: Path, n: int, n_queries: int, seed: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """Runs the comparison; returns its figures (``table`` is the markdown table)."""
    from interlingua.server.transforms.pca_basis import fit_pca_basis

    bench = load(data, n, seed=seed)
    if not bench.real:
        log(f"funnel: {bench.source}")
    calib = np.vstack([normalize(np.load(fit / "old_doc.npy")), normalize(np.load(fit / "old_query.npy"))])
    R = fit_pca_basis(calib).transform.affine("doc")[0]
    xb = np.ascontiguousarray(bench.xb @ R, dtype=np.float32)
    xq = np.ascontiguousarray(bench.xq[: n_queries - n_queries % NQ] @ R, dtype=np.float32)
    d = xb.shape[1]
    t0 = time.perf_counter()
    full = faiss.IndexFlatIP(d)
    full.add(xb)
    prefix = {}
    for m in sorted({c[0] for c in CONFIGS}):
        prefix[m] = faiss.IndexFlatIP(m)
        prefix[m].add(shrink(xb, m, normalize=True))
    log(f"funnel: built the indexes over {n} x {d} in {time.perf_counter() - t0:.1f} s")

    def full_search(q: np.ndarray) -> np.ndarray:
        return np.asarray(full.search(q, K)[1])

    def funnel(cfg: tuple[int, int, tuple[tuple[int, int], ...]]) -> Callable[[np.ndarray], np.ndarray]:
        m, sk, stages = cfg

        def run(q: np.ndarray) -> np.ndarray:
            _, I0 = prefix[m].search(shrink(q, m, normalize=True), sk)
            return rerank(q, xb, I0, [*stages, (d, K)], "cosine")[1]

        return run

    methods: dict[str, Callable[[np.ndarray], np.ndarray]] = {"full": full_search}
    for cfg in CONFIGS:
        methods[name(cfg)] = funnel(cfg)
    spent = dict.fromkeys(methods, 0.0)
    hits = {key: np.zeros(len(xq), bool) for key in methods}
    for b in range(0, len(xq), NQ):
        q = xq[b : b + NQ]
        for key, fn in methods.items():
            t = time.perf_counter()
            I = fn(q)
            spent[key] += time.perf_counter() - t
            hits[key][b : b + NQ] = (np.arange(b, b + NQ)[:, None] == I).any(axis=1)
        if b == 0 or (b // NQ) % 8 == 7:
            log(f"funnel: {b + NQ}/{len(xq)} queries")
    qps = {key: len(xq) / spent[key] for key in methods}
    r10 = {key: float(hits[key].mean()) for key in methods}
    rows = ["| method | index dims | shortlist | stages | R@10 | QPS | QPS vs full |", "|---|---|---|---|---|---|---|"]
    rows.append(f"| full-dim Flat | {d} | - | - | {r10['full']:.4f} | {qps['full']:.1f} | 1.00 |")
    for cfg in CONFIGS:
        key = name(cfg)
        stages = " -> ".join(f"{a}:{b}" for a, b in cfg[2]) + f" -> {d}:{K}"
        ratio = qps[key] / qps["full"]
        rows.append(f"| funnel | {cfg[0]} | {cfg[1]} | {stages} | {r10[key]:.4f} | {qps[key]:.1f} | {ratio:.2f} |")
    ok = [key for key in methods if key != "full" and r10["full"] - r10[key] <= 0.01]
    best = max(ok, key=lambda key: qps[key]) if ok else max((k for k in methods if k != "full"), key=lambda k: r10[k])
    return {
        "table": "\n".join(rows),
        "funnel_best": best,
        "funnel_qps_ratio": qps[best] / qps["full"],
        "funnel_r10_drop": r10["full"] - r10[best],
        "full_r10": r10["full"],
        "full_qps": qps["full"],
        "funnel_n": n,
        "funnel_queries": len(xq),
        "funnel_source": bench.source,
    }


def name(cfg: tuple[int, int, tuple[tuple[int, int], ...]]) -> str:
    return f"m{cfg[0]}-sk{cfg[1]}-" + "-".join(f"{a}:{b}" for a, b in cfg[2])
