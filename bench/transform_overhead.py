"""What a compatibility route costs: native home-space queries against routed new-space queries.

One collection (HNSW32, efSearch 64) over the debdesc dev MiniLM docs tiled to ``--n`` rows (100k by
default; seeded vectors when the folder is absent) is served in-process over gRPC. For every
transform kind a transform is fitted by the service (FitTransform) on the fit split, each from its
own copy of the e5-small space (``e5@<kind>``), and activated (forced: on debdesc every ECC margin is
negative, see docs/TRANSFORMS.md), so all routes are live at once. Then, interleaved in 0.5 s
slices so machine noise hits every side alike, the same client sends native queries (dev
``old_query``, identity route) and routed queries (dev ``new_query`` through each kind) at nq=1 and
nq=64, k=10. The table gives QPS, the routed/native ratio and the microseconds a route adds per
query (p50 per call difference / nq); the last line is one JSON object with
``routed_qps_ratio_min`` (the worst kind at nq=64) and per-kind figures.

    .venv/bin/python bench/transform_overhead.py [--data ../shared/data/debdesc] [--n 100000] [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import batches_of, interleaved, log, warm_up
from _data import load, normalize

from interlingua.client import Client
from interlingua.server import Server, ServerConfig, create_server
from interlingua.server.pipeline import map_queries

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / ".." / "shared" / "data" / "debdesc"
KINDS = {  # kind -> config: fixed hyper-parameters where a sweep would only cost fit time here
    "procrustes": {},
    "affine": {},
    "lambda_orthogonal": {"lam": 6.0},
    "basis": {},
    "residual_mlp": {},
}
K = 10
HOME = "minilm@1"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with fit/ and dev/ (%(default)s)")
    p.add_argument("--n", type=int, default=100_000, help="gallery rows (default %(default)s)")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds per side and nq (default %(default)s)")
    args = p.parse_args(argv)
    dev, fit = args.data / "dev", args.data / "fit"
    gallery = load(dev, args.n)
    real = gallery.real and (dev / "new_query.npy").is_file()
    if real:
        xq_old, xq_new = gallery.xq, normalize(np.load(dev / "new_query.npy"))
        pairs = {
            f"{side}_{m}": normalize(np.load(fit / f"{m}_{side}.npy"))
            for side in ("doc", "query")
            for m in ("new", "old")
        }
    else:  # seeded fallback: the "new" model is a rotation of the old one
        rng = np.random.default_rng(7)
        R = np.linalg.qr(rng.standard_normal((gallery.d, gallery.d)))[0].astype(np.float32)
        xq_old, xq_new = gallery.xq, normalize(gallery.xq @ R)
        docs = gallery.xb[:5000]
        pairs = {
            "doc_old": docs,
            "doc_new": normalize(docs @ R),
            "query_old": xq_old[:2000],
            "query_new": xq_new[:2000],
        }
    print(f"# transform_overhead: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {gallery.source}")
    with tempfile.TemporaryDirectory(prefix="interlingua-bench-") as tmp:
        server, port = create_server(ServerConfig(data_dir=Path(tmp), port=0, metrics_port=None))
        server.start()
        server.wait_ready(60)
        try:
            with Client(f"127.0.0.1:{port}", timeout=600) as c:
                result = run(c, server, gallery.xb, xq_old, xq_new, pairs, args.seconds)
        finally:
            server.stop(0)
    result.update(n=args.n, real_data=real, source=gallery.source)
    print(json.dumps(result))
    return result


def run(
    c: Client,
    server: Server,
    xb: np.ndarray,
    xq_old: np.ndarray,
    xq_new: np.ndarray,
    pairs: dict[str, np.ndarray],
    seconds: float,
) -> dict[str, Any]:
    d = xb.shape[1]
    c.register_space(HOME, d, "cosine")
    c.create_collection("g", HOME, "HNSW32")
    c.upsert("g", [str(i) for i in range(len(xb))], xb, space=HOME)
    while (info := c.get_collection("g")).fresh_vectors or info.state != "ready":
        time.sleep(0.2)
    log(f"gallery of {len(xb)} indexed")
    for kind, config in KINDS.items():
        space = f"e5@{kind}"
        c.register_space(space, d, "cosine")
        t0 = time.perf_counter()
        c.fit_transform(
            kind,
            kind,
            source_space=space,
            target_space=HOME,
            config=config,
            doc_pairs=(pairs["doc_new"], pairs["doc_old"]),
            query_pairs=(pairs["query_new"], pairs["query_old"]),
        )
        c.activate_route("g", kind, force=True)
        log(f"{kind}: fitted and routed in {time.perf_counter() - t0:.1f} s")
    # The same mapped vectors a route produces, computed here and sent natively: the index then does
    # exactly the routed search's work, so routed vs this isolates what the route itself costs.
    compat = server.engine.require_compat()
    premapped = {k: map_queries(compat.get(k).fn, xq_new, "cosine", d) for k in KINDS}
    rows, figures = [], {}
    for nq in (1, 64):
        # batch j: the same queries as old vectors, new vectors, and each kind's pre-mapped vectors
        batches = [
            (o, n, {k: premapped[k][j * nq : (j + 1) * nq] for k in KINDS})
            for j, (o, n) in enumerate(zip(batches_of(xq_old, nq)[:256], batches_of(xq_new, nq)[:256], strict=True))
        ]
        sides = {"native old": lambda b: c.search("g", b[0], K, space=HOME, ef_search=64)}
        for kind in KINDS:
            sides[kind] = lambda b, s=f"e5@{kind}": c.search("g", b[1], K, space=s, ef_search=64)
            sides[f"native {kind}"] = lambda b, k=kind: c.search("g", b[2][k], K, space=HOME, ef_search=64)
        for call in sides.values():
            warm_up(call, batches)
        w = interleaved(sides, batches, nq, seconds)
        old = w["native old"]
        figures[f"native_nq{nq}_qps"] = old.qps
        for kind in KINDS:
            routed, same = w[kind], w[f"native {kind}"]
            ratio, ratio_old = routed.qps / same.qps, routed.qps / old.qps
            added_us = (routed.pct_ms(50) - same.pct_ms(50)) * 1e3 / nq
            rows.append((kind, nq, old.qps, same.qps, routed.qps, ratio_old, ratio, added_us))
            figures[f"{kind}_nq{nq}_ratio"] = ratio
            figures[f"{kind}_nq{nq}_ratio_vs_old_queries"] = ratio_old
            figures[f"{kind}_nq{nq}_added_us_per_query"] = added_us
    print(
        "| kind | nq | native QPS (old queries) | native QPS (pre-mapped) | routed QPS | routed / native old "
        "| routed / native pre-mapped | added µs per query (p50) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind, nq, oqps, sqps, rqps, r_old, r_same, added in rows:
        print(f"| {kind} | {nq} | {oqps:.0f} | {sqps:.0f} | {rqps:.0f} | {r_old:.3f} | {r_same:.3f} | {added:.1f} |")
    linear = [k for k in KINDS if k != "residual_mlp"]
    figures["routed_qps_ratio_min"] = min(figures[f"{k}_nq64_ratio"] for k in linear)
    figures["routed_qps_ratio_min_all_kinds"] = min(figures[f"{k}_nq64_ratio"] for k in KINDS)
    figures["routed_qps_ratio_min_vs_old_queries"] = min(figures[f"{k}_nq64_ratio_vs_old_queries"] for k in linear)
    return figures


if __name__ == "__main__":
    main()
