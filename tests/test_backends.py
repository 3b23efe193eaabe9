"""The API suite on both storage backends: ``embedded`` (SQLite + FAISS) and ``milvus`` (Milvus Lite).

Each test talks to a real server over a real channel (port 0) whose default backend is the
parameter, with seeded data and numpy brute force as the reference: collections, points, payloads,
overwrites, deletes, exact and HNSW searches, a routed search through a fitted transform, errors,
read-your-writes and a restart on the same data dir. The ``milvus`` runs need the ``milvus`` extra
(pymilvus, milvus-lite) and are skipped with a reason without it. Milvus-only tests: the scores of
both backends on the same data, the features the backend refuses, a missing pymilvus (a subprocess
that cannot import it), and an engine killed and restarted under a serving front-end (health and
UNAVAILABLE).
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import brute_force, make_data, recall_at, start_server, wait_for

from interlingua.client import Client, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from interlingua.server import Server

HAVE_MILVUS = all(importlib.util.find_spec(m) is not None for m in ("pymilvus", "milvus_lite"))
NEEDS_MILVUS = pytest.mark.skipif(
    not HAVE_MILVUS, reason="the milvus backend needs pymilvus and milvus-lite: pip install 'interlingua[milvus]'"
)
D = 32


@pytest.fixture(params=["embedded", pytest.param("milvus", marks=NEEDS_MILVUS)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Env:
    """A server whose new collections default to ``backend``, on ``data``, and a client of it."""

    def __init__(self, data: Path, backend: str) -> None:
        self.data, self.backend = data, backend
        self.server: Server | None = None
        self.client: Client | None = None

    def start(self) -> Client:
        self.server, port = start_server(self.data, backend=self.backend, merge_idle_seconds=0.2)
        self.client = Client(f"127.0.0.1:{port}", timeout=60)
        return self.client

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            self.server.stop(None)
        self.client = self.server = None


@pytest.fixture
def env(tmp_path: Path, backend: str) -> Iterator[Env]:
    e = Env(tmp_path / "data", backend)
    c = e.start()
    c.register_space("old@1", D)
    c.register_space("new@1", D)
    c.register_space("l2@1", 16, metric="l2")
    yield e
    e.stop()


def _ids(n: int, prefix: str = "p") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def test_collection_lifecycle(env: Env, backend: str) -> None:
    c = env.client
    assert c is not None
    info = c.create_collection("docs", "old@1", "HNSW16", ef_construction=64)
    assert (info.name, info.home_space, info.index_spec, info.backend, info.num_points) == (
        "docs", "old@1", "HNSW16", backend, 0,
    )  # fmt: skip
    assert info.ef_construction == 64
    assert info.backend_uri == (str((env.data / "milvus.db").resolve()) if backend == "milvus" else "")
    c.create_collection("other", "l2@1")
    assert [i.name for i in c.list_collections()] == ["docs", "other"]
    assert c.get_collection("other").backend == backend
    empty = c.search("docs", make_data(2, D), 3, space="old@1")
    assert (empty.ids == "").all() and (empty.scores == -np.inf).all()
    c.delete_collection("docs")
    with pytest.raises(NotFound, match="'docs' does not exist"):
        c.get_collection("docs")
    assert [i.name for i in c.list_collections()] == ["other"]
    assert c.create_collection("docs", "old@1").num_points == 0  # the name is free again, and empty


def test_points_payloads_overwrite_delete(env: Env) -> None:
    c = env.client
    assert c is not None
    c.create_collection("g", "old@1")
    x, y = make_data(20, D, seed=1), make_data(5, D, seed=2)
    s1 = c.upsert("g", _ids(20), x, space="old@1", payloads=[f'{{"n": {i}}}' for i in range(20)])
    s2 = c.upsert("g", _ids(5), y, space="new@1")  # another space: keeps the home vectors and payloads
    assert s2 > s1
    got = c.get("g", ["p3", "p10"], with_vectors=True, with_payload=True)
    assert [p.id for p in got] == ["p3", "p10"]
    assert sorted(got[0].vectors) == ["new@1", "old@1"] and list(got[1].vectors) == ["old@1"]
    np.testing.assert_allclose(got[0].vectors["old@1"], x[3] / np.linalg.norm(x[3]), rtol=1e-6)
    np.testing.assert_allclose(got[0].vectors["new@1"], y[3] / np.linalg.norm(y[3]), rtol=1e-6)
    assert (got[0].payload, got[1].payload, got[0].sequence, got[1].sequence) == ({"n": 3}, {"n": 10}, s2, s1)
    only_new = c.get("g", ["p3"], with_vectors=True, spaces=["new@1"])[0]
    assert list(only_new.vectors) == ["new@1"] and only_new.payload is None
    info = c.get_collection("g")
    assert (info.num_points, info.vectors_per_space) == (20, {"old@1": 20, "new@1": 5})
    # overwrite: the new vector and payload replace the old ones, searches find the new vector
    z = make_data(1, D, seed=3)
    c.upsert("g", ["p7"], z, space="old@1", payloads=['{"v": 2}'])
    p7 = c.get("g", ["p7"], with_vectors=True, with_payload=True)[0]
    np.testing.assert_allclose(p7.vectors["old@1"], z[0] / np.linalg.norm(z[0]), rtol=1e-6)
    assert p7.payload == {"v": 2}
    res = c.search("g", z, 1, space="old@1", with_payload=True)
    assert res.ids[0, 0] == "p7" and res.payloads == [[{"v": 2}]]
    assert res.scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert c.get_collection("g").vectors_per_space == {"old@1": 20, "new@1": 5}  # an overwrite adds none
    # delete: a missing id refuses the whole call (nothing deleted) unless missing_ok
    with pytest.raises(NotFound, match=r"1 id\(s\) not found in collection 'g': 'nope'"):
        c.delete("g", ["p0", "nope"])
    assert c.get("g", ["p0"])[0].id == "p0"
    assert c.delete("g", ["p0", "p1", "nope"], missing_ok=True) == 2
    assert c.delete("g", ["nope"], missing_ok=True) == 0
    with pytest.raises(NotFound, match="'p0'"):
        c.get("g", ["p0", "p2"])
    info = c.get_collection("g")
    assert (info.num_points, info.vectors_per_space) == (18, {"old@1": 18, "new@1": 3})
    assert "p0" not in c.search("g", x[:1], 18, space="old@1").ids


@pytest.mark.parametrize("space", ["old@1", "l2@1"])
def test_flat_search_is_exact(env: Env, space: str) -> None:
    c = env.client
    assert c is not None
    metric, d = ("cosine", D) if space == "old@1" else ("l2", 16)
    c.create_collection("f", space, "Flat")
    xb, xq = make_data(400, d, seed=4), make_data(8, d, seed=5)
    c.upsert("f", _ids(400), xb, space=space)
    res = c.search("f", xq, 10, space=space)
    Dref, Iref = brute_force(xb, xq, 10, metric)
    assert res.ids.tolist() == np.array(_ids(400), dtype=object)[Iref].tolist()
    np.testing.assert_allclose(res.scores, Dref, rtol=1e-4, atol=1e-4)
    # more than there are: "" and the worst score pad each row, as FAISS pads -1
    c.upsert("f", ["a", "b"], xb[:2], space=space)
    c.delete("f", _ids(400))
    res = c.search("f", xq[:2], 4, space=space)
    assert res.ids.tolist() == [["a", "b", "", ""], ["a", "b", "", ""]] or set(res.ids[0, :2]) == {"a", "b"}
    assert (res.ids[:, 2:] == "").all()
    worst = -np.inf if metric == "cosine" else np.inf
    assert (res.scores[:, 2:] == worst).all()


def test_hnsw_and_ivf_recall(env: Env) -> None:
    c = env.client
    assert c is not None
    xb, xq = make_data(3000, D, seed=6), make_data(50, D, seed=7)
    _, Iref = brute_force(xb, xq, 10)
    ids = np.array(_ids(3000), dtype=object)
    c.create_collection("h", "old@1", "HNSW16")
    c.create_collection("i", "old@1", "IVF8,Flat")
    c.create_collection("q", "old@1", "IVF8,SQ8", 312 if env.backend == "embedded" else 0)  # embedded: 9984
    for name in ("h", "i", "q"):
        c.upsert(name, list(ids), xb, space="old@1")
    lab = {p: i for i, p in enumerate(ids)}

    def labels(r: np.ndarray) -> np.ndarray:
        return np.vectorize(lambda p: lab.get(p, -1))(r)

    def r(name: str, **params: int) -> float:
        return recall_at(labels(c.search(name, xq, 10, space="old@1", **params).ids), Iref)  # type: ignore[arg-type]

    # once the collection reports every vector indexed (the embedded backend's merge; the engine's
    # index built, not just a flush: Milvus Lite's own report says so at once, and searched the new
    # segment by brute force until its background build was done), the index serves: a search of one
    # list of 8 or a graph walk of 10 loses recall at once (the parameters reach the index)
    def indexed(name: str) -> bool:
        info = c.get_collection(name)
        return info.indexed_vectors == 3000 and info.fresh_vectors == 0

    wait_for(lambda: indexed("i"), 60)
    assert r("i", nprobe=1) < 0.9
    wait_for(lambda: indexed("q"), 60)
    assert r("q", nprobe=1) < 0.9
    wait_for(lambda: indexed("h"), 60)
    assert r("h", ef_search=10) < 1.0
    assert r("h", ef_search=128) >= 0.95
    assert r("i", nprobe=8) >= 0.99  # every list: exact
    assert r("q", nprobe=8) >= 0.9  # 8-bit scalar codes: close to exact
    with pytest.raises(InvalidArgument, match="nprobe is 9; it must be between 1 and nlist=8"):
        c.search("i", xq, 10, space="old@1", nprobe=9)
    with pytest.raises(InvalidArgument, match="ef_search applies to HNSW indexes"):
        c.search("i", xq, 10, space="old@1", ef_search=32)


def test_routed_search_through_a_fitted_transform(env: Env) -> None:
    """A new-model query reaches the old gallery through a transform the pipeline applies before the backend."""
    c = env.client
    assert c is not None
    rng = np.random.default_rng(8)
    Q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    old = make_data(300, D, seed=9).astype(np.float64)
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    new = old @ Q
    c.create_collection("g", "old@1", "Flat")
    c.upsert("g", _ids(300), old, space="old@1")
    with pytest.raises(FailedPrecondition, match="no route"):
        c.search("g", new[:5], 3, space="new@1")
    c.fit_transform("t", "procrustes", source_space="new@1", target_space="old@1", doc_pairs=(new, old), timeout=60)
    c.activate_route("g", "t", force=True)
    res = c.search("g", new[:20], 3, space="new@1")
    assert res.route.transform == "t"
    assert res.ids[:, 0].tolist() == _ids(20)  # each query finds its own old item
    Dref, Iref = brute_force(old, new[:20] @ Q.T, 3)
    assert res.ids.tolist() == np.array(_ids(300), dtype=object)[Iref].tolist()
    np.testing.assert_allclose(res.scores, Dref, atol=1e-4)


def test_read_your_writes(env: Env) -> None:
    c = env.client
    assert c is not None
    c.create_collection("w", "old@1", "HNSW16")
    x = make_data(30, D, seed=10)
    for i in range(30):  # each acknowledged write is in the very next search and get
        c.upsert("w", [f"w{i}"], x[i : i + 1], space="old@1")
        assert c.search("w", x[i : i + 1], 1, space="old@1").ids[0, 0] == f"w{i}"
        assert c.get("w", [f"w{i}"])[0].id == f"w{i}"
    c.delete("w", ["w29"])
    assert "w29" not in c.search("w", x[29:30], 5, space="old@1").ids


def test_restart_reattaches(env: Env, backend: str) -> None:
    c = env.client
    assert c is not None
    c.create_collection("r", "old@1", "HNSW16")
    xb = make_data(200, D, seed=11)
    c.upsert("r", _ids(200), xb, space="old@1", payloads=[f'{{"i": {i}}}' for i in range(200)])
    before = c.search("r", xb[:5], 5, space="old@1")
    env.stop()
    c = env.start()
    info = c.get_collection("r")
    assert (info.backend, info.num_points, info.vectors_per_space) == (backend, 200, {"old@1": 200})
    after = c.search("r", xb[:5], 5, space="old@1", with_payload=True)
    assert after.ids.tolist() == before.ids.tolist()
    assert after.payloads is not None and after.payloads[0][0] == {"i": 0}
    c.upsert("r", ["new"], xb[:1], space="old@1")  # and takes writes
    assert c.get_collection("r").num_points == 201


def test_errors_on_both_backends(env: Env, backend: str) -> None:
    c = env.client
    assert c is not None
    c.create_collection("e", "old@1")
    c.upsert("e", ["a"], make_data(1, D), space="old@1")
    with pytest.raises(InvalidArgument, match="ef_search applies to HNSW indexes"):
        c.search("e", make_data(1, D), 1, space="old@1", ef_search=16)
    with pytest.raises(InvalidArgument, match="backend 'cassandra' is not one of embedded, milvus"):
        c.create_collection("x", "old@1", backend="cassandra")
    with pytest.raises(InvalidArgument, match="backend_uri applies to the milvus backend"):
        c.create_collection("x", "old@1", backend="embedded", backend_uri="/tmp/x.db")
    with pytest.raises(InvalidArgument, match="neither a Milvus address"):
        c.create_collection("x", "old@1", backend="milvus", backend_uri="ftp://host/db")
    with pytest.raises(NotFound, match="'nope' does not exist"):
        c.search("nope", make_data(1, D), 1, space="old@1")
    with pytest.raises(InvalidArgument, match="vectors"):
        c.upsert("e", ["b"], make_data(1, 16), space="old@1")
    assert [i.name for i in c.list_collections()] == ["e"]


# -- milvus only ------------------------------------------------------------------------------


@NEEDS_MILVUS
def test_milvus_scores_equal_embedded(tmp_path: Path) -> None:
    """The same data in both backends of one server: the same ids and scores (IP, squared L2)."""
    srv, port = start_server(tmp_path / "data")
    try:
        with Client(f"127.0.0.1:{port}") as c:
            for name, metric, d in (("cos@1", "cosine", D), ("ip@1", "ip", D), ("l2@1", "l2", 16)):
                c.register_space(name, d, metric=metric)
                xb, xq = make_data(500, d, seed=12), make_data(10, d, seed=13)
                for backend in ("embedded", "milvus"):
                    c.create_collection(f"{backend}-{metric}", name, backend=backend)
                    c.upsert(f"{backend}-{metric}", _ids(500), xb, space=name)
                e = c.search(f"embedded-{metric}", xq, 10, space=name)
                m = c.search(f"milvus-{metric}", xq, 10, space=name)
                assert m.ids.tolist() == e.ids.tolist(), metric
                np.testing.assert_allclose(m.scores, e.scores, rtol=1e-5, atol=1e-5)
                assert m.exact  # Flat: the engine searched exhaustively
            assert c.get_collection("milvus-l2").backend == "milvus"
            assert c.get_collection("embedded-l2").backend == "embedded"
    finally:
        srv.stop(None)


def _funnel_reference(
    xb: np.ndarray, xq: np.ndarray, metric: str, m: int, shortlist_k: int, stages: list[tuple[int, int]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Numpy brute force of a funnel search: the best ``shortlist_k`` by the first m dims (re-normalized
    unless l2), each stage (dims, keep) rescoring the survivors, then all dims keeping k. (D, row indices)."""
    if metric == "cosine":
        xb = xb / np.linalg.norm(xb, axis=1, keepdims=True)
        xq = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    d = xb.shape[1]

    def scores(q: np.ndarray, rows: np.ndarray, dims: int) -> np.ndarray:
        a, b = xb[rows, :dims].astype(np.float64), q[:dims].astype(np.float64)
        if metric != "l2" and dims < d:
            a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b)
        return -(a @ b) if metric != "l2" else ((a - b) ** 2).sum(axis=1)  # ascending: best first

    Dout, Iout = np.zeros((len(xq), k)), np.zeros((len(xq), k), np.int64)
    for i, q in enumerate(xq):
        rows = np.arange(len(xb))
        for dims, keep in [(m, shortlist_k), *stages, (d, k)]:
            s = scores(q, rows, dims)
            order = np.argsort(s, kind="stable")[:keep]
            rows, best = rows[order], s[order]
        Dout[i], Iout[i] = (-best if metric != "l2" else best), rows
    return Dout, Iout


@NEEDS_MILVUS
@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_milvus_prefix_funnel_equals_embedded_and_brute_force(tmp_path: Path, metric: str) -> None:
    """A Matryoshka prefix collection on milvus (the prefix field indexed, full vectors reranked in the
    front-end) answers what the embedded prefix collection and a numpy funnel reference answer: the
    default shortlist and a funnel stage, Flat and HNSW; it survives a restart. Its errors: a shortlist
    below k, a stage not above the prefix (INVALID_ARGUMENT), a space past the 3 fields a prefix
    collection keeps for spaces (FAILED_PRECONDITION), nothing changed."""
    data = tmp_path / "data"
    srv, port = start_server(data)
    d, m, n = D, 8, 600
    xb, xq = make_data(n, d, seed=21), make_data(12, d, seed=22)
    ids = np.array(_ids(n), dtype=object)
    try:
        with Client(f"127.0.0.1:{port}") as c:
            c.register_space("s@1", d, metric=metric)
            for other in ("o1@1", "o2@1", "o3@1"):
                c.register_space(other, 8)
            for backend in ("embedded", "milvus"):
                for spec in ("Flat", "HNSW16"):
                    name = f"{backend}-{spec}"
                    c.create_collection(name, "s@1", spec, prefix_dims=m, backend=backend)
                    c.upsert(name, list(ids[: n // 2]), xb[: n // 2], space="s@1")
                    c.upsert(name, list(ids[n // 2 :]), xb[n // 2 :], space="s@1", payloads=['{"a": 1}'] * (n - n // 2))
            for shortlist_k, stages in ((None, []), (40, [(16, 20)])):
                Dref, Iref = _funnel_reference(xb, xq, metric, m, shortlist_k or 100, stages, 10)
                e = c.search("embedded-Flat", xq, 10, space="s@1", shortlist_k=shortlist_k, funnel=stages)
                r = c.search("milvus-Flat", xq, 10, space="s@1", shortlist_k=shortlist_k, funnel=stages)
                assert r.ids.tolist() == e.ids.tolist() == ids[Iref].tolist(), (shortlist_k, stages)
                np.testing.assert_allclose(r.scores, e.scores, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(r.scores, Dref, rtol=1e-4, atol=1e-4)
                hnsw = ("milvus-HNSW16", xq, 10)
                h = c.search(*hnsw, space="s@1", ef_search=200, shortlist_k=shortlist_k, funnel=stages)
                pairs = zip(h.ids.tolist(), ids[Iref].tolist(), strict=True)
                assert np.mean([len(set(a) & set(b)) / 10 for a, b in pairs]) > 0.9
            c.upsert("milvus-Flat", ["p0"], xb[1:2], space="s@1")  # an overwrite rewrites the prefix too
            got = c.search("milvus-Flat", xb[1:2], 2, space="s@1")
            assert sorted(got.ids[0].tolist()) == ["p0", "p1"]  # equal vectors: p0's prefix is p1's now
            assert got.scores[0, 0] == pytest.approx(got.scores[0, 1], abs=1e-5)
            for call, code, match in (
                (lambda: c.search("milvus-Flat", xq, 10, space="s@1", shortlist_k=5), InvalidArgument,
                 "shortlist_k is 5; it must be between k=10"),
                (lambda: c.search("milvus-Flat", xq, 10, space="s@1", funnel=[(4, 20)]), InvalidArgument,
                 r"funnel\[0\].dims is 4; stage dims must increase, above the prefix \(8\)"),
                (lambda: c.upsert("milvus-Flat", ["z"], make_data(1, 8), space="o3@1"), FailedPrecondition,
                 "no vector field for space 'o3@1'"),
            ):  # fmt: skip
                with pytest.raises(code, match=match):
                    call()
            for sp in ("o1@1", "o2@1"):  # the two oldest other spaces have a field each
                c.upsert("milvus-Flat", ["p5"], make_data(1, 8), space=sp)
            info = c.get_collection("milvus-Flat")
            assert (info.num_points, info.vectors_per_space) == (n, {"s@1": n, "o1@1": 1, "o2@1": 1})
            assert c.get("milvus-Flat", ["p400"], with_payload=True)[0].payload == {"a": 1}
            before = c.search("milvus-HNSW16", xq, 10, space="s@1")
        srv.stop(None)
        srv, port = start_server(data)
        with Client(f"127.0.0.1:{port}") as c:
            after = c.search("milvus-HNSW16", xq, 10, space="s@1")
            assert after.ids.tolist() == before.ids.tolist()
            np.testing.assert_allclose(after.scores, before.scores, rtol=1e-6)
    finally:
        srv.stop(None)


@NEEDS_MILVUS
def test_milvus_refuses_what_it_does_not_do(tmp_path: Path) -> None:
    """Each feature the milvus backend does not do yet: FAILED_PRECONDITION naming it, nothing changed."""
    srv, port = start_server(tmp_path / "data", backend="milvus")
    try:
        with Client(f"127.0.0.1:{port}") as c:
            c.register_space("old@1", D)
            c.register_space("new@1", D)
            c.create_collection("m", "old@1", "HNSW16")
            c.upsert("m", _ids(50), make_data(50, D), space="old@1")
            refused = {
                "index_spec 'auto'": lambda: c.create_collection("x", "old@1", "auto", target_recall=0.9),
                "snapshots": lambda: c.create_snapshot("s"),
                "RecommendIndex": lambda: c.recommend_index("m", 0.9),
            }
            for feature, call in refused.items():
                with pytest.raises(FailedPrecondition, match=f"milvus backend.*{feature}") as exc:
                    call()
                assert "does not support" in exc.value.message, feature
            with pytest.raises(InvalidArgument, match=r"not supported by the milvus backend; it supports Flat, HNSW"):
                c.create_collection("x", "old@1", "IVF16,PQ8")
            with pytest.raises(InvalidArgument, match="train_min_points applies to the embedded backend"):
                c.create_collection("x", "old@1", "IVF16,Flat", 100)
            c.register_space("later@1", D)  # after the collection: no vector field for it
            with pytest.raises(FailedPrecondition, match="no vector field for space 'later@1'"):
                c.upsert("m", ["a"], make_data(1, D), space="later@1")
            c.register_space("s4@1", 8)
            c.register_space("s5@1", 8)  # the 5th: over Milvus' 4 vector fields per collection
            c.create_collection("m2", "s5@1")
            for sp, d in (("s5@1", 8), ("old@1", D), ("new@1", D), ("later@1", D)):  # home, then the oldest
                c.upsert("m2", ["a"], make_data(1, d), space=sp)
            with pytest.raises(FailedPrecondition, match="no vector field for space 's4@1'"):
                c.upsert("m2", ["a"], make_data(1, 8), space="s4@1")
            assert c.get_collection("m2").vectors_per_space == {"s5@1": 1, "old@1": 1, "new@1": 1, "later@1": 1}
            c.delete_collection("m2")
            bad = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
            with pytest.raises(Unavailable, match=f"milvus engine at {bad} is unreachable"):
                c.create_collection("x", "old@1", backend_uri=bad)
            assert c.health() == "SERVING"  # an engine no collection uses is not the server's health
            big = '"' + "a" * 65534 + '"'  # a JSON string of 65,536 bytes: the server's limit, over Milvus' VARCHAR
            with pytest.raises(InvalidArgument, match=r"payloads\[0\] is over 65535 bytes, the milvus backend's limit"):
                c.upsert("m", ["p0"], make_data(1, D), space="old@1", payloads=[big])
            assert [i.name for i in c.list_collections()] == ["m"]
            assert c.list_snapshots() == []
            info = c.get_collection("m")
            assert (info.num_points, info.vectors_per_space) == (50, {"old@1": 50})
    finally:
        srv.stop(None)


@NEEDS_MILVUS
def test_milvus_refuses_unusable_uris_and_ids_over_its_limit(tmp_path: Path) -> None:
    """A Milvus Lite path that is no path (a NUL byte, ~ of a user with no home) or in a folder that does
    not exist: INVALID_ARGUMENT for a creation and a move, nothing made. A server allowing longer ids than
    the backend holds: INVALID_ARGUMENT naming the backend's limit, before the write takes a sequence."""
    from interlingua.server.config import Limits

    srv, port = start_server(tmp_path / "data", backend="milvus", limits=Limits(max_id_bytes=2048))
    try:
        with Client(f"127.0.0.1:{port}") as c:
            c.register_space("old@1", D)
            c.create_collection("e", "old@1", backend="embedded")
            c.upsert("e", _ids(5), make_data(5, D), space="old@1")
            bad = {
                "/tmp/x\x00y.db": "is not a usable path for a Milvus Lite file: embedded null byte",
                # (the client makes a move's path absolute first: its folder then does not exist)
                "~no_such_user_zz/a.db": "not a usable path for a Milvus Lite file|Milvus Lite file does not exist",
                str(tmp_path / "nowhere" / "m.db"): f"the folder '{tmp_path / 'nowhere'}' of the Milvus Lite file",
            }
            for uri, msg in bad.items():
                with pytest.raises(InvalidArgument, match=msg):
                    c.create_collection("x", "old@1", backend_uri=uri)
                with pytest.raises(InvalidArgument, match=msg):
                    c.move_collection("e", uri)
            assert [(i.name, i.backend) for i in c.list_collections()] == [("e", "embedded")]
            assert not (tmp_path / "nowhere").exists()
            c.create_collection("m", "old@1")
            c.upsert("m", ["a"], make_data(1, D), space="old@1")
            before = c.get_collection("m").last_sequence
            for pid in ("y" * 513, "\N{SNOWMAN}" * 171):  # 513 bytes, as characters and as UTF-8 (3 bytes each)
                with pytest.raises(InvalidArgument, match=r"ids\[1\] is 513 bytes of UTF-8; the milvus backend holds"
                                   r" ids of at most 512 bytes"):  # fmt: skip
                    c.upsert("m", ["b", pid], make_data(2, D), space="old@1")
            c.upsert("m", ["b", "y" * 512], make_data(2, D), space="old@1")  # at the limit
            info = c.get_collection("m")
            assert (info.num_points, info.last_sequence) == (3, before + 1)  # the refusals took no sequence
    finally:
        srv.stop(None)


@NEEDS_MILVUS
def test_milvus_reads_and_writes_in_budgeted_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Milvus caps a message at 256 MiB, which 4096 rows with the longest payloads pass: reads and writes are
    cut at ``MESSAGE_BUDGET`` (made small here), each payload taken at its longest for a read and at its
    size for a write; a read without payloads does not read them. Upserts with payloads, an overwrite of
    vectors only (which keeps the payloads), gets, searches with payloads and a move all answer whole."""
    from interlingua.server.backends import milvus_table

    calls: dict[str, list[int]] = {"query": [], "insert": [], "upsert": []}

    def counted(name: str, fn: object) -> object:
        def call(mname: str, rows: object, *a: object) -> object:
            if not mname.endswith("_keys"):  # (the key map's own reads and writes are not the budget's)
                calls[name].append(len(rows) if rows is not None else -1)
            return fn(mname, rows, *a)  # type: ignore[operator]

        return call

    for name, fn in (("query", milvus_table.query_rows), ("insert", milvus_table.insert_rows),
                     ("upsert", milvus_table.upsert_rows)):  # fmt: skip
        monkeypatch.setattr(milvus_table, f"{name}_rows", counted(name, fn))
    monkeypatch.setattr(milvus_table, "MESSAGE_BUDGET", 40_000)
    n = 60
    xb, x2 = make_data(n, D, seed=11), make_data(n, D, seed=12)
    payloads = [f'{{"i": {i}, "text": "{"ab" * 1500}"}}' for i in range(n)]  # ~3 KB each
    srv, port = start_server(tmp_path / "data", backend="milvus")
    try:
        with Client(f"127.0.0.1:{port}") as c:
            c.register_space("old@1", D)
            c.create_collection("m", "old@1")
            c.upsert("m", _ids(n), xb, space="old@1", payloads=payloads)
            assert len(calls["insert"]) >= 5 and max(calls["insert"]) <= 12, calls  # ~3.3 KB a row, 40 KB a batch
            calls["query"].clear()
            c.upsert("m", _ids(n), x2, space="old@1")  # vectors only: the payloads are read to be kept
            assert len(calls["query"]) == n, calls  # one row a query: a payload is taken at 64 KiB
            calls["query"].clear()
            c.get("m", _ids(n), with_vectors=True)  # no payloads: not read, 34 rows of 1 KiB + 4 * D a query
            assert len(calls["query"]) == 2, calls
            got = c.get("m", _ids(n), with_payload=True)
            assert [p.payload for p in got] == [{"i": i, "text": "ab" * 1500} for i in range(n)]
            res = c.search("m", x2[:3], 2, space="old@1", with_payload=True)
            assert res.ids[:, 0].tolist() == ["p0", "p1", "p2"]
            assert [p["i"] for p in res.payloads[0]] == [0, res.payloads[0][1]["i"]]
            c.create_collection("e", "old@1", backend="embedded")
            c.upsert("e", _ids(n), xb, space="old@1", payloads=payloads)
            calls["insert"].clear()
            m = c.move_collection("e", str(tmp_path / "moved.db"))
            assert (m.points_copied, m.num_points) == (n, n)
            assert len(calls["insert"]) >= 5, calls
            assert [p.payload for p in c.get("e", _ids(n), with_payload=True)] == [json.loads(p) for p in payloads]
    finally:
        srv.stop(None)


_NO_PYMILVUS = """
import sys
sys.modules["pymilvus"] = None  # import pymilvus -> ImportError, as without the extra
from interlingua.client.cli import main
sys.exit(main(sys.argv[1:]))
"""


@NEEDS_MILVUS
def test_missing_pymilvus_gives_the_install_hint(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", _NO_PYMILVUS, "serve", "--data-dir", str(tmp_path / "d"), "--backend", "milvus"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "pip install 'interlingua[milvus]'" in run.stderr
    code = """
import sys
sys.modules["pymilvus"] = None
sys.path.insert(0, sys.argv[2])
from conftest import start_server
from interlingua.client import Client, FailedPrecondition
srv, port = start_server(__import__("pathlib").Path(sys.argv[1]))
with Client(f"127.0.0.1:{port}") as c:
    c.register_space("s@1", 4)
    try:
        c.create_collection("m", "s@1", backend="milvus")
    except FailedPrecondition as e:
        print("REFUSED", e.message)
    print("LEFT", [i.name for i in c.list_collections()], c.create_collection("e", "s@1").backend)
srv.stop(None)
"""
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "d2"), str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "REFUSED the milvus backend needs pymilvus and milvus-lite: pip install 'interlingua[milvus]'" in run.stdout
    assert "LEFT [] embedded" in run.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _milvus_server(data: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """Milvus Lite's own gRPC server (``python -m milvus_lite server``) in a process of its own."""
    args = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data), "--host", "127.0.0.1"]
    with log.open("ab") as out:
        return subprocess.Popen([*args, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)


@NEEDS_MILVUS
@pytest.mark.slow
def test_engine_down_and_back(tmp_path: Path) -> None:
    """The engine killed under a serving front-end: health NOT_SERVING and UNAVAILABLE with a clear
    message; restarted on its data: SERVING again, the same answers."""
    port, log = _free_port(), tmp_path / "milvus.log"
    engine = _milvus_server(tmp_path / "milvus", port, log)
    uri = f"http://127.0.0.1:{port}"
    srv = None
    try:
        config = {"backend": "milvus", "milvus_uri": uri, "milvus_check_seconds": 0.2, "milvus_timeout_seconds": 3.0}
        srv, iport = start_server(tmp_path / "data", **config)  # type: ignore[arg-type]
        with Client(f"127.0.0.1:{iport}", timeout=30) as c:
            c.register_space("old@1", D)
            wait_for(lambda: c.health() == "SERVING", 60)
            deadline = time.monotonic() + 60
            while True:  # the engine process needs a moment to listen
                try:
                    c.create_collection("g", "old@1", "HNSW16")
                    break
                except Unavailable:
                    assert time.monotonic() < deadline, log.read_text()[-2000:]
                    time.sleep(0.2)
            xb = make_data(100, D, seed=14)
            c.upsert("g", _ids(100), xb, space="old@1")
            before = c.search("g", xb[:3], 5, space="old@1")
            wait_for(lambda: c.health() == "SERVING", 10)
            engine.kill()
            engine.wait(30)
            wait_for(lambda: c.health() == "NOT_SERVING", 10)
            for call in (
                lambda: c.search("g", xb[:3], 5, space="old@1"),
                lambda: c.upsert("g", ["x"], xb[:1], space="old@1"),
                lambda: c.get_collection("g"),
            ):
                with pytest.raises(Unavailable, match=f"milvus engine at {uri} is unreachable"):
                    call()
            with pytest.raises(Unavailable, match="unreachable"):
                c.delete_collection("g")  # refused by the engine: the collection stays
            with pytest.raises(Unavailable, match="unreachable"):
                c.list_collections()  # its counts are the engine's
            assert c.list_spaces()[0].name == "old@1"  # what Interlingua holds itself still answers
        # the front-end restarts while the engine is down: it serves its own state, NOT_SERVING
        srv.stop(None)
        srv, iport = start_server(tmp_path / "data", **config)  # type: ignore[arg-type]
        with Client(f"127.0.0.1:{iport}", timeout=30) as c:
            wait_for(lambda: c.health() == "NOT_SERVING", 10)
            with pytest.raises(Unavailable, match="unreachable"):
                c.search("g", xb[:3], 5, space="old@1")
            engine = _milvus_server(tmp_path / "milvus", port, log)
            wait_for(lambda: c.health() == "SERVING", 60)
            after = c.search("g", xb[:3], 5, space="old@1")
            assert after.ids.tolist() == before.ids.tolist()
            assert c.get_collection("g").num_points == 100
            c.delete_collection("g")
            assert c.list_collections() == []
    finally:
        if srv is not None:
            srv.stop(None)
        engine.kill()
        engine.wait(30)


def test_points_gauge_and_cli_create(env: Env, backend: str) -> None:
    from interlingua.client.cli import main

    c, srv = env.client, env.server
    assert c is not None and srv is not None
    args = ["collections", "create", "cli", "--home-space", "old@1", "--index", "HNSW8", "--backend", backend]
    assert main([*args, "--target", f"127.0.0.1:{srv.port}"]) == 0
    info = c.get_collection("cli")
    assert (info.backend, info.index_spec) == (backend, "HNSW8")
    c.upsert("cli", _ids(7), make_data(7, D), space="old@1")
    assert srv.metrics.registry.get_sample_value("interlingua_points", {"collection": "cli", "space": "old@1"}) == 7
    c.delete("cli", ["p0"])
    assert srv.metrics.registry.get_sample_value("interlingua_points", {"collection": "cli", "space": "old@1"}) == 6


@NEEDS_MILVUS
def test_two_front_ends_share_one_engine(tmp_path: Path) -> None:
    """Two front-ends (own data dirs) on one Milvus Lite file: each its own collections; a name the
    other holds in the engine is refused (FAILED_PRECONDITION), nothing created."""
    uri = str(tmp_path / "shared.db")
    a, pa = start_server(tmp_path / "a", backend="milvus", milvus_uri=uri)
    b, pb = start_server(tmp_path / "b", backend="milvus", milvus_uri=uri)
    try:
        with Client(f"127.0.0.1:{pa}") as ca, Client(f"127.0.0.1:{pb}") as cb:
            for cl in (ca, cb):
                cl.register_space("old@1", D)
            ca.create_collection("docs", "old@1")
            ca.upsert("docs", _ids(10), make_data(10, D), space="old@1")
            with pytest.raises(FailedPrecondition, match=r"milvus collection 'il_docs_[0-9a-f]+' already exists at"):
                cb.create_collection("docs", "old@1")
            assert cb.list_collections() == []
            cb.create_collection("other", "old@1")
            assert ca.get_collection("docs").num_points == 10 and cb.get_collection("other").num_points == 0
            with pytest.raises(InvalidArgument, match="k_factor applies to indexes with a refine stage"):
                ca.search("docs", make_data(1, D), 1, space="old@1", k_factor=2)
    finally:
        b.stop(None)
        a.stop(None)


@NEEDS_MILVUS
def test_bench_hook_interlingua_milvus(tmp_path: Path) -> None:
    """bench/_peers_milvus.py's system on a small gallery: it builds, searches at an ef and closes."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    try:
        from _peers_milvus import InterlinguaMilvus
    finally:
        sys.path.pop(0)
    xb = make_data(400, D, seed=15)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    system = InterlinguaMilvus(tmp_path, omp_threads=1)
    try:
        system.build(xb, 16, 40, 100)
        assert 0 < system.ingest_s <= system.ready_s
        system.set_ef(64)
        I = system.search(xb[:20], 10)
        _, Iref = brute_force(xb, xb[:20], 10)
        assert recall_at(I, Iref) >= 0.95
    finally:
        system.close()
    assert (tmp_path / "il_milvus.db").exists()


def test_milvus_names_and_index_mapping() -> None:
    """Pure mapping rules of server/backends/milvus_schema.py (no engine needed)."""
    import re

    from interlingua.server.backends.milvus_schema import check_uri, field_name, id_filter, milvus_name, parse_index
    from interlingua.server.errors import InvalidArgument as Invalid

    names = ["docs", "a.b-c", "a_b_c", "x" * 128, "9lives"]
    mapped = [milvus_name(n) for n in names]
    assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", m) for m in mapped)
    assert len(set(mapped)) == len(names)  # "a.b-c" and "a_b_c" sanitize alike, their hashes differ
    assert re.fullmatch(r"v_[0-9a-f]{16}", field_name("minilm-l6@1")) and field_name("a") != field_name("b")
    assert parse_index("Flat", 0).index_type == "FLAT"
    assert id_filter(['a"b', "c\\d", "n\nl", "e'f"]) == 'id in ["a\\"b", "c\\\\d", "n\\nl", "e\'f"]'
    h = parse_index("HNSW32", 100)
    assert (h.index_type, h.params) == ("HNSW", {"M": 32, "efConstruction": 100})
    assert parse_index("HNSW32", 0).params["efConstruction"] == 40  # FAISS's default, as the embedded backend
    assert h.search_params("cosine", 10, None, None) == {"metric_type": "IP", "params": {"ef": 64}}
    assert h.search_params("l2", 100, 16, None) == {"metric_type": "L2", "params": {"ef": 100}}  # ef >= k
    ivf = parse_index("IVF64,Flat", 0)
    assert (ivf.index_type, ivf.params, ivf.search_params("ip", 5, None, 200)["params"]) == (
        "IVF_FLAT", {"nlist": 64}, {"nprobe": 64},
    )  # fmt: skip
    assert parse_index("IVF64,SQ8", 0).index_type == "IVF_SQ8"
    for spec, msg in (
        ("PQ16", "not supported by the milvus backend"),
        ("HNSW1", "HNSW M is 1"),
        ("IVF0,Flat", "IVF nlist is 0"),
        ("OPQ16,IVF256,PQ16", "it supports Flat, HNSW<M>"),
        ("HNSW\u06632", "not supported by the milvus backend"),  # ASCII digits only, as the embedded grammar
        ("IVF\u0663,Flat", "not supported by the milvus backend"),
    ):
        with pytest.raises(Invalid, match=msg):
            parse_index(spec, 0)
    with pytest.raises(Invalid, match="ef_construction applies to HNSW"):
        parse_index("Flat", 40)
    assert check_uri("http://milvus:19530") == "http://milvus:19530"
    assert check_uri("rel/dir/m.db").endswith("/rel/dir/m.db") and check_uri("rel/dir/m.db").startswith("/")
    for bad in ("milvus:19530", "ftp://h/x", "/data/milvus", "http://h:1/x y"):
        with pytest.raises(Invalid, match="neither a Milvus address"):
            check_uri(bad)


@NEEDS_MILVUS
def test_embedded_client_on_milvus(tmp_path: Path) -> None:
    """Client.embedded (the engine in this process) serves milvus collections too, and re-attaches."""
    xb = make_data(100, D, seed=16)
    with Client.embedded(tmp_path / "data", backend="milvus", metrics_port=None) as c:
        c.register_space("old@1", D)
        assert c.create_collection("m", "old@1", "HNSW8").backend == "milvus"
        c.upsert("m", _ids(100), xb, space="old@1")
        before = c.search("m", xb[:4], 3, space="old@1").ids.tolist()
    assert (tmp_path / "data" / "milvus.db").exists()
    with Client.embedded(tmp_path / "data", metrics_port=None) as c:
        info = c.get_collection("m")
        assert (info.backend, info.num_points) == ("milvus", 100)
        assert c.search("m", xb[:4], 3, space="old@1").ids.tolist() == before


def test_ids_with_quotes_and_escapes(env: Env) -> None:
    """Ids are data, never part of an expression: quotes, backslashes, control characters, unicode."""
    c = env.client
    assert c is not None
    ids = [
        'a"b',
        "c\\d",
        "e'f",
        "ü😀",
        'x" or id != "',
        "x' or id != '",
        "a,b",
        " sp ace ",
        "new\nline",
        "t\tab",
        "\x01",
    ]
    c.create_collection("q", "old@1")
    x = make_data(len(ids), D, seed=17)
    c.upsert("q", ids, x, space="old@1", payloads=[f'{{"i": {i}}}' for i in range(len(ids))])
    assert [p.id for p in c.get("q", ids)] == ids
    assert [p.payload for p in c.get("q", ids[4:6], with_payload=True)] == [{"i": 4}, {"i": 5}]
    assert c.delete("q", ['x" or id != "', "x' or id != '"]) == 2  # exactly those two
    assert c.get_collection("q").num_points == len(ids) - 2
    res = c.search("q", x[:1], 3, space="old@1", with_payload=True)
    assert res.ids[0, 0] == 'a"b' and res.payloads is not None and res.payloads[0][0] == {"i": 0}


def test_concurrent_writes_and_searches(env: Env) -> None:
    """Writers on disjoint ids and readers at once: every acknowledged point is there, counted once."""
    import threading

    c = env.client
    assert c is not None
    c.create_collection("cc", "old@1", "HNSW16")
    x = make_data(400, D, seed=18)
    errors: list[BaseException] = []

    def write(t: int) -> None:
        try:
            for b in range(5):
                lo = t * 100 + b * 20
                c.upsert("cc", _ids(lo + 20)[lo:], x[lo : lo + 20], space="old@1")
                c.upsert("cc", _ids(lo + 20)[lo:], x[lo : lo + 20], space="new@1")  # a second space, merged
        except BaseException as e:
            errors.append(e)

    def read() -> None:
        try:
            for _ in range(20):
                c.search("cc", x[:5], 5, space="old@1")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)] + [
        threading.Thread(target=read) for _ in range(2)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    info = c.get_collection("cc")
    assert (info.num_points, info.vectors_per_space) == (400, {"old@1": 400, "new@1": 400})
    assert c.search("cc", x[399:400], 1, space="old@1").ids[0, 0] == "p399"


def _engine_client(uri: str) -> object:
    """A second pymilvus client on the server's Milvus Lite file (the same engine, in this process)."""
    from pymilvus import MilvusClient

    return MilvusClient(uri=uri)


@NEEDS_MILVUS
def test_counts_are_kept_by_the_front_end(tmp_path: Path) -> None:
    """num_points and vectors_per_space are the front-end's: exact after overwrites (in one space and
    another), deletes with missing ids and a write batch over one engine call; GetCollection asks the
    engine for no count (a row deleted behind the front-end's back is not seen), and a restarted
    front-end counts in the engine again (it is then)."""
    from interlingua.server.backends.milvus_schema import milvus_name

    e = Env(tmp_path / "data", "milvus")
    c = e.start()
    try:
        c.register_space("old@1", D)
        c.register_space("new@1", D)
        c.create_collection("k", "old@1", "HNSW16")
        x = make_data(5000, D, seed=21)
        c.upsert("k", _ids(5000), x, space="old@1", batch_size=5000)  # two engine calls (CHUNK 4096)
        c.upsert("k", _ids(3000)[1000:], x[1000:3000], space="new@1")
        c.upsert("k", _ids(1500), x[:1500][::-1].copy(), space="old@1")  # overwrites: no new vector
        c.upsert("k", [*_ids(1000)[900:], "q0", "q1"], x[:102], space="new@1")  # 102 new vectors, 2 new points
        want = (5002, {"old@1": 5000, "new@1": 2102})
        info = c.get_collection("k")
        assert (info.num_points, info.vectors_per_space) == want
        assert c.delete("k", ["p0", "p1500", "gone", "p2999", "q1", "gone2"], missing_ok=True) == 4
        assert c.delete("k", ["gone"], missing_ok=True) == 0
        with pytest.raises(NotFound):
            c.delete("k", ["p2", "gone"])  # refused whole: p2 stays
        want = (4998, {"old@1": 4997, "new@1": 2099})
        info = c.get_collection("k")
        assert (info.num_points, info.vectors_per_space) == want
        # the engine is not asked: two rows deleted behind the front-end's back stay counted
        assert e.server is not None
        uri, mname = str(e.data / "milvus.db"), milvus_name("k")
        mc = _engine_client(uri)
        mc.delete(mname, filter='id in ["p5", "p2000"]')  # type: ignore[attr-defined]
        info = c.get_collection("k")
        assert (info.num_points, info.vectors_per_space) == want
        e.stop()
        c = e.start()  # counted in the engine once, at the first need
        info = c.get_collection("k")
        assert (info.num_points, info.vectors_per_space) == (4996, {"old@1": 4995, "new@1": 2098})
        c.upsert("k", ["p5", "z"], x[:2], space="old@1")
        info = c.get_collection("k")
        assert (info.num_points, info.vectors_per_space) == (4998, {"old@1": 4997, "new@1": 2098})
    finally:
        e.stop()


@NEEDS_MILVUS
def test_counts_exact_under_concurrent_overwrites(tmp_path: Path) -> None:
    """Writers overwriting and deleting their own points in two spaces at once (a reader searching):
    the kept counts equal a numpy-side model of the final state, and so do the engine's own counts
    after a restart."""
    import threading

    e = Env(tmp_path / "data", "milvus")
    c = e.start()
    try:
        c.register_space("old@1", D)
        c.register_space("new@1", D)
        c.create_collection("cw", "old@1", "HNSW16")
        x = make_data(600, D, seed=22)
        state: list[dict[str, set[str]]] = [{} for _ in range(4)]  # per writer: id -> spaces
        errors: list[BaseException] = []
        stop = threading.Event()

        def write(t: int) -> None:
            rng = np.random.default_rng(100 + t)
            mine = _ids(150 * (t + 1))[150 * t :]
            have = state[t]
            try:
                for _ in range(12):
                    pick = sorted(rng.choice(mine, 40, replace=False).tolist())
                    space = "old@1" if rng.random() < 0.6 else "new@1"
                    c.upsert("cw", pick, x[rng.choice(600, 40)], space=space)
                    for p in pick:
                        have.setdefault(p, set()).add(space)
                    gone = sorted(rng.choice(mine, 8, replace=False).tolist())
                    c.delete("cw", gone, missing_ok=True)
                    for p in gone:
                        have.pop(p, None)
            except BaseException as err:
                errors.append(err)

        def read() -> None:
            try:
                while not stop.is_set():
                    c.search("cw", x[:4], 5, space="old@1")
            except BaseException as err:
                errors.append(err)

        writers = [threading.Thread(target=write, args=(t,)) for t in range(4)]
        reader = threading.Thread(target=read)
        for th in [*writers, reader]:
            th.start()
        for th in writers:
            th.join()
        stop.set()
        reader.join()
        assert not errors, errors
        points = {p: s for st in state for p, s in st.items()}
        per_space = {sp: n for sp in ("old@1", "new@1") if (n := sum(sp in s for s in points.values()))}
        info = c.get_collection("cw")
        assert (info.num_points, info.vectors_per_space) == (len(points), per_space)
        e.stop()
        c = e.start()
        info = c.get_collection("cw")
        assert (info.num_points, info.vectors_per_space) == (len(points), per_space)
    finally:
        e.stop()


@NEEDS_MILVUS
def test_no_flush_while_a_write_is_in_progress(tmp_path: Path) -> None:
    """The idle flush of a milvus collection waits for the write in progress (a bulk load's upserts
    each longer than the idle time were flushed one small segment each), then flushes once idle."""
    import threading

    from interlingua.server.backends.milvus import MilvusCollection

    e = Env(tmp_path / "data", "milvus")
    c = e.start()
    try:
        c.register_space("old@1", D)
        c.create_collection("f", "old@1", "HNSW16")
        assert e.server is not None
        col = e.server.engine.collections["f"]
        assert isinstance(col, MilvusCollection)
        with col.lock:  # maintenance holds off while a write holds the lock ...
            col.unflushed, col.last_write = 10, 0.0
            got: list[bool] = []
            th = threading.Thread(target=lambda: got.append(col.maintain(idle_seconds=0.01)))
            th.start()
            th.join()
            assert got == [False] and col.unflushed == 10
        wait_for(lambda: col.maintain(idle_seconds=0.01) or col.unflushed == 0, 10)  # ... then flushes, idle
    finally:
        e.stop()


@NEEDS_MILVUS
def test_milvus_lite_index_progress_is_the_engines_files(tmp_path: Path) -> None:
    """On Milvus Lite, indexed_vectors counts the segments whose index is built, not what the engine's
    describe_index says (every row, at once): a segment flushed while the collection is released gets
    no index until it is loaded again, and is reported fresh until then."""
    from interlingua.server.backends.milvus import MilvusCollection
    from interlingua.server.backends.milvus_schema import milvus_name

    server, port = start_server(tmp_path / "data", backend="milvus", merge_idle_seconds=3600.0)
    try:
        with Client(f"127.0.0.1:{port}") as c:
            c.register_space("old@1", D)
            c.create_collection("x", "old@1", "HNSW16")
            xb = make_data(500, D, seed=23)
            c.upsert("x", _ids(500), xb, space="old@1")
            col = server.engine.collections["x"]
            assert isinstance(col, MilvusCollection)
            mc = _engine_client(str(tmp_path / "data" / "milvus.db"))
            mname = milvus_name("x")
            mc.release_collection(mname)  # type: ignore[attr-defined]
            assert col.maintain(force=True)  # flushed: a segment, its index not built while released
            assert int(mc.describe_index(mname, col.home_field)["indexed_rows"]) == 500  # type: ignore[attr-defined]
            info = c.get_collection("x")
            assert (info.num_points, info.indexed_vectors, info.fresh_vectors) == (500, 0, 500)
            assert c.search("x", xb[:3], 1, space="old@1").ids[:, 0].tolist() == ["p0", "p1", "p2"]  # loads it
            info = c.get_collection("x")
            assert (info.indexed_vectors, info.fresh_vectors) == (500, 0)
    finally:
        server.stop(None)
