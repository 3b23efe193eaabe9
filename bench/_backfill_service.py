"""The service's own migration, measured beside bench/backfill.py's offline curves.

An in-process server (real gRPC, port 0, a temporary data dir) fits T (new -> old) and R (old -> new) on the
same fit pairs and relevance as the offline bench, holds the dev gallery in two Flat collections, migrates one
with strategy ``two_indexes`` (b) and the other with ``shared_index`` (a, after a ForwardUpgrade with R),
backfills both in the order SuggestBackfillOrder gives, and searches the dev new-model queries over gRPC at each
``betas`` fraction, then once more after a cutover with old-model queries (through R). Its figures must agree
with the offline curves (the same transforms, calibration and forward correction): this is what users get.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _common import log

from interlingua.client import Client
from interlingua.server import ServerConfig, create_server

K = 10
BATCH = 2048


def _r10_mrr(ids: np.ndarray, n_queries: int) -> tuple[float, float]:
    """Query i's relevant doc is doc i (ids are row numbers)."""
    want = np.arange(n_queries).astype(str).astype(object)[:, None]
    hit = ids == want
    rank = np.where(hit.any(1), hit.argmax(1) + 1, 0)
    return float(hit.any(1).mean()), float(np.where(rank > 0, 1.0 / np.maximum(rank, 1), 0.0).mean())


def _search(client: Client, collection: str, xq: np.ndarray, space: str) -> np.ndarray:
    out = [client.search(collection, xq[i : i + BATCH], K, space=space).ids for i in range(0, len(xq), BATCH)]
    return np.vstack([np.asarray(o, dtype=object) for o in out])


def measure(
    fit: dict[str, np.ndarray], dev: dict[str, np.ndarray], kind: str, holdout: float, betas: Sequence[float]
) -> dict[str, Any]:
    """Returns ``service_r10_{a,b}`` and ``service_mrr10_{a,b}`` per β, ``service_old_after_cutover_r10`` and
    ``service_fit_s``."""
    n, nf = len(dev["old_doc"]), len(fit["old_doc"])
    ids = [str(i) for i in range(n)]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="backfill-bench-") as tmp:
        server, port = create_server(ServerConfig(data_dir=Path(tmp), port=0, metrics_port=None))
        server.start()
        assert server.wait_ready(120), server.load_error
        client = Client(f"127.0.0.1:{port}", timeout=None)
        try:
            client.register_space("old", fit["old_doc"].shape[1])
            client.register_space("new", fit["new_doc"].shape[1])
            t0 = time.perf_counter()
            fit_ids = [f"f{i}" for i in range(nf)]
            rel = [[f"f{i}"] for i in range(len(fit["new_query"]))]
            for name, src, tgt in (("T", "new", "old"), ("R", "old", "new")):
                log(f"service: fitting {name} ({kind}, {src} -> {tgt})")
                client.fit_transform(
                    name, kind, source_space=src, target_space=tgt,
                    doc_pairs=(fit[f"{src}_doc"], fit[f"{tgt}_doc"]),
                    query_pairs=(fit[f"{src}_query"], fit[f"{tgt}_query"]),
                    doc_ids=fit_ids, query_relevant=rel, holdout=holdout, timeout=3600,
                )  # fmt: skip
            out["service_fit_s"] = time.perf_counter() - t0
            for col, strategy in (("b", "two_indexes"), ("a", "shared_index")):
                client.create_collection(col, "old")
                client.upsert(col, ids, dev["old_doc"], space="old")
                client.start_migration(col, "new", "T", reverse_transform="R", strategy=strategy)
            client.forward_upgrade("a", "R")
            client.wait_forward_upgrade("a", timeout=600)
            order = client.suggest_backfill_order("b", n).ids
            rows = np.array([int(i) for i in order])
            done = 0
            for beta in betas:
                upto = round(beta * n)
                if upto > done:
                    part = rows[done:upto]
                    for col in "ab":
                        client.upsert(col, [ids[i] for i in part], dev["new_doc"][part], space="new")
                    done = upto
                for col in "ab":
                    r10, mrr = _r10_mrr(_search(client, col, dev["new_query"], "new"), n)
                    out.setdefault(f"service_r10_{col}", []).append(r10)
                    out.setdefault(f"service_mrr10_{col}", []).append(mrr)
                log(f"service: β {beta:.2f}: (b) {out['service_r10_b'][-1]:.4f}, (a) {out['service_r10_a'][-1]:.4f}")
            client.cutover("b")
            out["service_old_after_cutover_r10"] = _r10_mrr(_search(client, "b", dev["old_query"], "old"), n)[0]
            info = client.get_migration("b")
            out["service_calibration"] = info.calibration.source if info.calibration is not None else ""
        finally:
            client.close()
            server.stop(None)
    return out
