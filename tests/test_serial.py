"""The serial hot path (server/serial.py): a single query on a plain collection answered in one
function gives what the full pipeline gives (ids, scores, padding, metrics), over real gRPC, for
the three metrics and HNSW / Flat / IVF indexes; every case it does not cover falls through to the
pipeline (which answers or raises its error); new defaults (an advisor's tuning) reach it."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import pytest
from conftest import Stubs, brute_force, make_data

from interlingua.server import serial
from interlingua.server.pipeline import SearchParams
from interlingua.v1 import common_pb2 as pb

D = 24
N = 1500
METRICS = {"cosine": pb.METRIC_COSINE, "ip": pb.METRIC_IP, "l2": pb.METRIC_L2}


def _sealed(stubs: Stubs, name: str, n: int) -> None:
    deadline = time.monotonic() + 60
    while (info := stubs.info(name)).indexed_vectors < n or info.fresh_vectors:
        assert time.monotonic() < deadline, info
        time.sleep(0.05)


def _one(engine: Any, col: str, space: str, x: np.ndarray, k: int, **kw: Any) -> Any:
    """serial.search_one on one query, straight (None: not the plain case)."""
    q = np.ascontiguousarray(x, "<f4")
    return serial.search_one(engine, col, space, q, k, kw.get("ef_search"), kw.get("nprobe"), kw.get("k_factor"))


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
@pytest.mark.parametrize("spec", ["HNSW16", "Flat", "IVF8,Flat"])
def test_serial_path_answers_as_the_pipeline(server: tuple[Any, int], stubs: Stubs, metric: str, spec: str) -> None:
    engine = server[0].engine
    xb, xq = make_data(N, D, seed=1), make_data(40, D, seed=2)
    stubs.register("s", D, METRICS[metric])
    stubs.create("c", "s", spec, train_min=200 if spec.startswith("IVF") else 0)
    stubs.upsert("c", "s", [f"p{i}" for i in range(N)], xb)
    _sealed(stubs, "c", N)
    kw = {"ef_search": 64} if spec.startswith("HNSW") else {"nprobe": 8} if spec.startswith("IVF") else {}
    Dref, Iref = brute_force(xb, xq, 10, metric)
    for i in range(len(xq)):
        q = xq[i : i + 1]
        _, ids1, _ = stubs.search("c", "s", q, 10, **kw)  # the first builds the parameters; then serial
        D2, ids2, _ = stubs.search("c", "s", q, 10, **kw)
        assert _one(engine, "c", "s", q, 10, **kw) is not None, "the plain case took the pipeline"
        Db, idsb, _ = stubs.search("c", "s", np.vstack([q, q]), 10, **kw)  # a batch: the pipeline
        assert list(ids2[0]) == list(ids1[0]) == list(idsb[0]) == list(idsb[1])
        np.testing.assert_allclose(D2[0], Db[0], rtol=2e-6, atol=2e-6)
        if spec != "HNSW16":  # exact on Flat and on IVF with every list probed
            assert [f"p{j}" for j in Iref[i]] == list(ids2[0])
            np.testing.assert_allclose(D2[0], Dref[i], rtol=1e-4, atol=1e-4)


def test_serial_path_pads_and_counts(server: tuple[Any, int], stubs: Stubs) -> None:
    """k over the points: the padding of the pipeline ("" and -inf); the metrics as the pipeline's."""
    srv = server[0]
    xb = make_data(7, D, seed=3)
    stubs.register("s", D)
    stubs.create("c", "s", "HNSW16")
    stubs.upsert("c", "s", [f"p{i}" for i in range(7)], xb)
    _sealed(stubs, "c", 7)
    q = make_data(1, D, seed=4)
    stubs.search("c", "s", q, 10)
    res = _one(srv.engine, "c", "s", q, 10)
    assert res is not None
    assert list(res.ids[0][7:]) == ["", "", ""] and np.all(res.D[0][7:] == -np.inf)
    assert sorted(res.ids[0][:7]) == sorted(f"p{i}" for i in range(7))
    from prometheus_client import generate_latest

    text = generate_latest(srv.engine.metrics.registry).decode()
    assert 'interlingua_search_queries_total{collection="c",query_space="s",route="identity"} 2.0' in text
    assert 'interlingua_search_seconds_count{collection="c",stage="index"} 2.0' in text
    assert 'interlingua_search_seconds_count{collection="c",stage="fetch"} 0.0' in text


def test_what_the_serial_path_leaves_to_the_pipeline(server: tuple[Any, int], stubs: Stubs) -> None:
    """Each case outside the plain one returns None (then the pipeline answers or raises)."""
    engine = server[0].engine
    xb, q = make_data(600, D, seed=5), make_data(1, D, seed=6)
    stubs.register("s", D)
    stubs.register("t", D)
    stubs.create("c", "s", "HNSW16")
    stubs.upsert("c", "s", [f"p{i}" for i in range(600)], xb)
    _sealed(stubs, "c", 600)
    stubs.search("c", "s", q, 10)
    assert _one(engine, "c", "s", q, 10) is not None
    bad = q.copy()
    bad[0, 0] = np.nan
    for args, kw in [
        (("nope", "s", q, 10), {}),  # no such collection
        (("c", "t", q, 10), {}),  # another space: a route (here none: NO_ROUTE from the pipeline)
        (("c", "s", q, 0), {}),  # k out of range
        (("c", "s", q, 10), {"nprobe": 4}),  # a parameter the index refuses
        (("c", "s", q, 10), {"ef_search": 17}),  # parameters not built yet by the pipeline
        (("c", "s", bad, 10), {}),  # NaN
        (("c", "s", np.zeros_like(q), 10), {}),  # zero norm (cosine)
        (("c", "s", make_data(1, D + 1, seed=7), 10), {}),  # the wrong dimension
    ]:
        assert _one(engine, *args, **kw) is None, (args, kw)
    stubs.upsert("c", "s", ["p0"], q)  # an overwrite: a dead label and a fresh row
    assert _one(engine, "c", "s", q, 10) is None
    D1, ids1, _ = stubs.search("c", "s", q, 10)
    assert ids1[0][0] == "p0" and D1[0][0] == pytest.approx(1.0, abs=1e-5)
    # new defaults on the same index (an advisor's tuning): the parameters built for the old are not reused
    stubs.create("e", "s", "HNSW16")
    stubs.upsert("e", "s", [f"p{i}" for i in range(600)], xb)
    _sealed(stubs, "e", 600)
    stubs.search("e", "s", q, 10)
    assert _one(engine, "e", "s", q, 10) is not None
    seg = engine.collection("e").segments
    s = seg.snapshot
    new = dataclasses.replace(s.defaults, ef_search=(s.defaults.ef_search or 64) + 1)
    seg.snapshot = dataclasses.replace(s, defaults=new)
    assert _one(engine, "e", "s", q, 10) is None
    res = engine.search("e", "s", np.ascontiguousarray(q, "<f4").tobytes(), D, SearchParams(10))
    assert res.ids[0][0] == _one(engine, "e", "s", q, 10).ids[0][0]
    assert seg._serial_params[3][(None, None, None)].efSearch == new.ef_search
