"""An HNSW graph grown by merges is rebuilt in one add once it has doubled and the collection is idle
(``segment_merge.wants_regraph``): searches and writes go on meanwhile, nothing is lost, the rebuilt graph
answers like a one-shot FAISS build, and it survives a restart."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import brute_force, connect, make_data, recall_at, start_server, wait_for

from interlingua.server import segment_merge


def test_merge_grown_graph_is_rebuilt_once_idle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segment_merge, "REGRAPH_MIN", 1500)
    srv, port = start_server(tmp_path / "data", merge_min_fresh=200, merge_fraction=0.1, merge_idle_seconds=0.3)
    stubs = connect(port)
    xb = make_data(3000, 24, seed=3)
    ids = [f"p{i}" for i in range(3000)]
    try:
        stubs.register("s", 24)
        stubs.create("c", "s", "HNSW8")
        col = srv.engine.collections["c"]
        for i in range(0, 2400, 200):  # grown merge by merge
            stubs.upsert("c", "s", ids[i : i + 200], xb[i : i + 200])
            wait_for(lambda i=i: col.segments.snapshot.nfresh == 0, timeout=30)
        errors: list[BaseException] = []
        stop = threading.Event()

        def reader() -> None:
            try:
                while not stop.is_set():
                    _, got, _ = stubs.search("c", "s", xb[:20], 1)
                    assert list(got[:, 0]) == ids[:20]
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=reader)
        t.start()
        seg = col.segments
        # idle: rebuilt in one add (at 2400, or earlier when a pause in the loop above let it in at >= 1500)
        wait_for(lambda: col.compactions >= 1 and seg.graph_built_n == seg.snapshot.nsealed >= 1500, timeout=60)
        stubs.upsert("c", "s", ids[2400:], xb[2400:])  # writes after the rebuild land as before
        time.sleep(0.2)
        stop.set()
        t.join()
        assert not errors, errors[:3]
        assert col.compactions >= 1
        _, I_ref = brute_force(xb, xb[:300], 10)
        _, got, _ = stubs.search("c", "s", xb[:300], 10, ef_search=64)
        labels = np.vectorize(lambda p: int(p[1:]))(got)
        assert recall_at(labels, I_ref) >= 0.97
        # the same as FAISS built at once on the same vectors (same M, efConstruction, insertion randomization)
        one = faiss.IndexHNSWFlat(24, 8, faiss.METRIC_INNER_PRODUCT)
        one.add(xb / np.linalg.norm(xb, axis=1, keepdims=True))
        _, I_one = one.search(xb[:300] / np.linalg.norm(xb[:300], axis=1, keepdims=True), 10)
        assert recall_at(labels, I_ref) >= recall_at(I_one, I_ref) - 0.02
    finally:
        stubs.channel.close()
        srv.stop(None)
    srv, port = start_server(tmp_path / "data")
    stubs = connect(port)
    try:
        _, got, _ = stubs.search("c", "s", xb[:50], 1)
        assert list(got[:, 0]) == ids[:50]
    finally:
        stubs.channel.close()
        srv.stop(None)
