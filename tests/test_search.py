"""Search correctness against a numpy brute-force reference, for every index kind and metric."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import Stubs, brute_force, make_data

from interlingua.v1 import collections_pb2 as cpb
from interlingua.v1 import common_pb2 as pb
from interlingua.v1 import points_pb2 as ppb

METRICS = {"cosine": pb.METRIC_COSINE, "ip": pb.METRIC_IP, "l2": pb.METRIC_L2}


def wait_merged(stubs: Stubs, name: str, timeout: float = 60.0) -> cpb.CollectionInfo:
    """Waits until the background merge moved every fresh vector into the ANN index."""
    deadline = time.monotonic() + timeout
    while True:
        info = stubs.info(name)
        if info.state == cpb.INDEX_STATE_READY and info.fresh_vectors == 0:
            return info
        assert time.monotonic() < deadline, f"collection {name} not merged: {info}"
        time.sleep(0.05)


def ingest(stubs: Stubs, col: str, space: str, xb: np.ndarray, batch: int = 1000) -> list[str]:
    ids = [f"doc-{i}" for i in range(len(xb))]
    for i in range(0, len(xb), batch):
        stubs.upsert(col, space, ids[i : i + batch], xb[i : i + batch])
    return ids


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_flat_equals_brute_force(stubs: Stubs, metric: str) -> None:
    d, nb, nq, k = 32, 3000, 50, 10
    xb, xq = make_data(nb, d, seed=1), make_data(nq, d, seed=2)
    stubs.register(f"s-{metric}", d, METRICS[metric])
    stubs.create("c", f"s-{metric}") if metric == "cosine" else stubs.create(f"c-{metric}", f"s-{metric}")
    col = "c" if metric == "cosine" else f"c-{metric}"
    ids = ingest(stubs, col, f"s-{metric}", xb)
    Dref, Iref = brute_force(xb, xq, k, metric)
    # first while (part of) the data is still in the exact fresh segment, then after the merge
    for _ in range(2):
        D, I, reply = stubs.search(col, f"s-{metric}", xq, k)
        assert reply.route.transform == "identity" and reply.route.home_space == f"s-{metric}"
        np.testing.assert_allclose(D, Dref, rtol=1e-4, atol=1e-4)
        expected = np.array(ids, dtype=object)[Iref]
        # ids equal except where the reference has exact ties
        mismatch = expected != I
        assert not mismatch.any() or np.allclose(D[mismatch], Dref[mismatch], atol=1e-5)
        wait_merged(stubs, col)


def test_hnsw_recall_at_10(stubs: Stubs) -> None:
    d, nb, nq, k = 64, 20000, 200, 10
    xb, xq = make_data(nb, d, seed=3), make_data(nq, d, seed=4)
    stubs.register("h", d)
    stubs.create("hnsw", "h", "HNSW32")
    ids = np.array(ingest(stubs, "hnsw", "h", xb, batch=5000), dtype=object)
    wait_merged(stubs, "hnsw")
    _, Iref = brute_force(xb, xq, k)
    _, I, reply = stubs.search("hnsw", "h", xq, k)
    assert not reply.exact
    recall = np.mean([len(set(I[i]) & set(ids[Iref[i]])) / k for i in range(nq)])
    assert recall >= 0.95, recall
    # a larger efSearch per request does not hurt
    _, I2, _ = stubs.search("hnsw", "h", xq, k, ef_search=256)
    recall2 = np.mean([len(set(I2[i]) & set(ids[Iref[i]])) / k for i in range(nq)])
    assert recall2 >= recall - 0.01


def test_ivf_searches_exactly_until_trained(stubs: Stubs) -> None:
    d, k = 16, 5
    stubs.register("v", d)
    info = stubs.create("ivf", "v", "IVF8,Flat", train_min=800)
    assert info.state == cpb.INDEX_STATE_EXACT and info.train_min_points == 800
    xb, xq = make_data(1000, d, seed=5), make_data(20, d, seed=6)
    ids = np.array(ingest(stubs, "ivf", "v", xb[:500], batch=500), dtype=object)
    time.sleep(0.3)
    assert stubs.info("ivf").state == cpb.INDEX_STATE_EXACT  # too few points: never trains
    D, I, reply = stubs.search("ivf", "v", xq, k)
    assert reply.exact
    Dref, Iref = brute_force(xb[:500], xq, k)
    np.testing.assert_allclose(D, Dref, rtol=1e-4, atol=1e-5)
    ids = np.array(ingest(stubs, "ivf", "v", xb), dtype=object)
    info = wait_merged(stubs, "ivf")
    assert info.indexed_vectors == 1000
    _, I, reply = stubs.search("ivf", "v", xq, k, nprobe=8)  # nprobe = nlist: exhaustive
    assert not reply.exact
    _, Iref = brute_force(xb, xq, k)
    assert (ids[Iref] == I).mean() > 0.99


def test_fewer_points_than_k_pads(stubs: Stubs) -> None:
    stubs.register("p", 4, pb.METRIC_L2)
    stubs.create("small", "p")
    xb = make_data(3, 4, seed=7)
    stubs.upsert("small", "p", ["a", "b", "c"], xb)
    D, I, _ = stubs.search("small", "p", xb[:1], 5)
    assert I[0, 0] == "a" and D[0, 0] == 0 and set(I[0, :3]) == {"a", "b", "c"}
    assert list(I[0, 3:]) == ["", ""] and np.isinf(D[0, 3:]).all() and (D[0, 3:] > 0).all()
    stubs.create("empty", "p")
    D, I, _ = stubs.search("empty", "p", xb, 2)
    assert (I == "").all() and np.isposinf(D).all()


def test_deletes_and_overwrites_apply_at_once(stubs: Stubs) -> None:
    d = 16
    stubs.register("s", d)
    for spec in ("Flat", "HNSW32"):
        col = spec.lower()
        stubs.create(col, "s", spec)
        xb = make_data(500, d, seed=8)
        ids = ingest(stubs, col, "s", xb, batch=250)
        wait_merged(stubs, col)
        stubs.points.DeletePoints(ppb.DeletePointsRequest(collection=col, ids=ids[:10]))
        _, I, _ = stubs.search(col, "s", xb[:10], 3)
        assert not set(I.ravel()) & set(ids[:10])
        # overwrite doc-10 with doc-11's vector: a search for it now finds both ids
        stubs.upsert(col, "s", ["doc-10"], xb[11:12])
        _, I, _ = stubs.search(col, "s", xb[11:12], 2)
        assert set(I[0]) == {"doc-10", "doc-11"}
        _, I, _ = stubs.search(col, "s", xb[10:11], 1)
        assert I[0, 0] != "doc-10"  # its old vector is gone
        info = stubs.info(col)
        assert info.num_points == 490 and info.deleted_labels == 11


def test_with_payload(stubs: Stubs) -> None:
    stubs.register("s", 8)
    stubs.create("c", "s")
    xb = make_data(20, 8, seed=9)
    ids = [f"p{i}" for i in range(20)]
    stubs.upsert("c", "s", ids, xb, payloads=[f'{{"i": {i}}}' if i % 2 == 0 else "" for i in range(20)])
    _, I, reply = stubs.search("c", "s", xb[:4], 3, with_payload=True)
    payloads = np.array(list(reply.payloads), dtype=object).reshape(4, 3)
    for q in range(4):
        for j in range(3):
            i = int(I[q, j][1:])
            assert payloads[q, j] == (f'{{"i": {i}}}' if i % 2 == 0 else "")
