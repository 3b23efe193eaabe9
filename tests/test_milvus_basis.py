"""Basis collections (``basis_transform``) on the milvus backend answer what the embedded backend answers.

A basis collection's Milvus collection holds each home vector as written (GetPoints) and, in its basis
field, mapped by the basis' doc side as the embedded index holds it; that field (or, with
``prefix_dims``, the prefix field holding its prefix) carries the index, queries are mapped by the
query side before the search, and a prefix search reranks the basis field's vectors
(``milvus_schema.py``). The basis here is an ``affine`` map of each home space onto itself, fitted with
a different offset per side, so a map applied on the wrong side or not at all changes the answer;
the move test uses a ``pca_basis``. Each test talks to a real server (port 0) with seeded data: the
same collection on both backends, a numpy reference over the mapped vectors, a restart on the same
data dir, a move from embedded, and the refusals (vector fields past the cap, DeleteTransform of a
basis in use, a basis not loaded). Skipped without the ``milvus`` extra (pymilvus, milvus-lite).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from conftest import make_data, start_server

from interlingua.client import Client, FailedPrecondition, InvalidArgument, NotFound
from interlingua.server import Server

HAVE_MILVUS = all(importlib.util.find_spec(m) is not None for m in ("pymilvus", "milvus_lite"))
pytestmark = pytest.mark.skipif(
    not HAVE_MILVUS, reason="the milvus backend needs pymilvus and milvus-lite: pip install 'interlingua[milvus]'"
)
D, M, N, K = 32, 8, 300, 10
METRICS = {"c@1": "cosine", "i@1": "ip", "l@1": "l2"}  #: home space -> metric (registered in this order)


def _normalized(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _fit_affine(c: Client, name: str, space: str, seed: int) -> None:
    """A home -> home affine basis: W near a random well-conditioned matrix, a distinct bias per side."""
    rng = np.random.default_rng(seed)
    W = np.eye(D) + 0.5 * rng.standard_normal((D, D)) / np.sqrt(D)
    x = make_data(400, D, seed=seed + 1)
    shift = {s: 0.3 * rng.standard_normal(D) for s in ("doc", "query")}
    c.fit_transform(
        name, "affine", source_space=space, target_space=space, config={"ridge": 1e-3, "task_epochs": 0},
        doc_pairs=(x[:200], x[:200] @ W + shift["doc"]), query_pairs=(x[200:], x[200:] @ W + shift["query"]),
    )  # fmt: skip


def _mapped(srv: Server, basis: str, x: np.ndarray, metric: str, side: str) -> np.ndarray:
    """x (n, d) as the collection indexes (doc) or searches (query) it, from the fitted weights."""
    fn = srv.engine.compat.get(basis).fn  # type: ignore[union-attr]
    W, b = fn.affine(side)
    x = _normalized(x) if metric == "cosine" else x
    y = x.astype(np.float64) @ W + b
    return _normalized(y) if metric == "cosine" else y


def _scores(xq: np.ndarray, xb: np.ndarray, metric: str) -> np.ndarray:
    """(nq, n) scores, higher first: inner products, or minus squared L2."""
    if metric == "l2":
        return -((xq[:, None, :] - xb[None, :, :]) ** 2).sum(-1)
    return xq @ xb.T


def _reference(xq: np.ndarray, xb: np.ndarray, metric: str, prefix: int = 0, shortlist: int = 0) -> np.ndarray:
    """Labels (nq, K) of brute force over the mapped vectors; with ``prefix``, a ``shortlist`` from the
    prefixes (re-normalized for cosine and ip) reranked with every dimension, as ``funnel.rerank``."""
    out = np.zeros((len(xq), K), np.int64)
    for i, q in enumerate(xq):
        rows = np.arange(len(xb))
        if prefix:
            p, pb = q[None, :prefix], xb[:, :prefix]
            if metric != "l2":
                p, pb = _normalized(p), _normalized(pb)
            rows = np.argsort(-_scores(p, pb, metric)[0], kind="stable")[:shortlist]
        s = _scores(q[None], xb[rows], metric)[0]
        out[i] = rows[np.argsort(-s, kind="stable")[:K]]
    return out


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean top-K overlap of two (nq, K) id arrays."""
    return float(np.mean([len(set(x) & set(y)) / K for x, y in zip(a.tolist(), b.tolist(), strict=True)]))


def _sign(metric: str) -> float:
    return -1.0 if metric == "l2" else 1.0


def test_milvus_basis_collection_equals_embedded_and_reference(tmp_path: Path) -> None:
    """For cosine, ip and l2, without and with ``prefix_dims``: the milvus basis collection's ids and scores
    equal the embedded one's and a numpy reference over the mapped vectors (scores: the mapped query side
    against the mapped doc side); GetPoints returns the vectors as written; a point with a vector in
    another space only is never a hit; an HNSW index sits on the basis field (the home field FLAT); the
    collection info names its basis. After a restart on the same data dir the same answers, and writes
    still map (an overwrite). Refusals: a write in a space past the vector-field cap (its message says
    what took the fields), a basis of another space (INVALID_ARGUMENT) or unknown (NOT_FOUND) with no
    engine collection left, DeleteTransform of a basis in use, a basis not loaded (FAILED_PRECONDITION)."""
    data = tmp_path / "data"
    srv, port = start_server(data, merge_idle_seconds=0.2)
    xb, xq = make_data(N, D, seed=31), make_data(12, D, seed=32)
    ids = np.array([f"p{i}" for i in range(N)], dtype=object)
    names = [(sp, m) for sp in METRICS for m in (0, M)]
    answers: dict[tuple[str, int], tuple[list[list[str]], np.ndarray]] = {}
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as c:
            for i, (sp, metric) in enumerate(METRICS.items()):
                c.register_space(sp, D, metric=metric)
                _fit_affine(c, f"b-{sp}", sp, seed=40 + 10 * i)
            c.fit_transform("b-other", "procrustes", source_space="i@1", target_space="c@1", doc_pairs=(xb, xb))
            for sp, m in names:
                for backend in ("embedded", "milvus"):
                    name = f"{backend}-{METRICS[sp]}-{m}"
                    c.create_collection(name, sp, "Flat", prefix_dims=m, basis_transform=f"b-{sp}", backend=backend)
                    c.upsert(name, list(ids[: N // 2]), xb[: N // 2], space=sp)
                    c.upsert(name, list(ids[N // 2 :]), xb[N // 2 :], space=sp)
                    c.upsert(name, ["other-only"], xb[:1], space="c@1" if sp != "c@1" else "i@1")  # its oldest other
            c.create_collection("hnsw", "c@1", "HNSW16", basis_transform="b-c@1", backend="milvus")
            c.upsert("hnsw", list(ids), xb, space="c@1")
            for sp, m in names:
                metric = METRICS[sp]
                xbm, xqm = (_mapped(srv, f"b-{sp}", x, metric, side) for x, side in ((xb, "doc"), (xq, "query")))
                e = c.search(f"embedded-{metric}-{m}", xq, K, space=sp)
                r = c.search(f"milvus-{METRICS[sp]}-{m}", xq, K, space=sp)
                ref = _reference(xqm, xbm, metric, m, max(10 * K, 100))
                assert r.ids.tolist() == e.ids.tolist() == ids[ref].tolist(), (sp, m)
                np.testing.assert_allclose(r.scores, e.scores, rtol=1e-5, atol=1e-5)
                want = _sign(metric) * np.take_along_axis(_scores(xqm, xbm, metric), ref, axis=1)
                np.testing.assert_allclose(r.scores, want, rtol=1e-4, atol=1e-4)
                if m:  # a shortlist of every point: the full-dimensional answer
                    full = c.search(f"milvus-{METRICS[sp]}-{m}", xq, K, space=sp, shortlist_k=N + 1)
                    assert full.ids.tolist() == ids[_reference(xqm, xbm, metric)].tolist()
                got = c.get(f"milvus-{METRICS[sp]}-{m}", ["p3", "p200"], with_vectors=True)
                written = _normalized(xb[[3, 200]]) if metric == "cosine" else xb[[3, 200]]
                np.testing.assert_allclose(np.stack([g.vectors[sp] for g in got]), written, rtol=1e-6, atol=1e-7)
                answers[(sp, m)] = (r.ids.tolist(), r.scores)
                info = c.get_collection(f"milvus-{METRICS[sp]}-{m}")
                assert (info.basis_transform, info.num_points) == (f"b-{sp}", N + 1)
            h = c.search("hnsw", xq, K, space="c@1", ef_search=128)
            xqm, xbm = (_mapped(srv, "b-c@1", x, "cosine", side) for x, side in ((xq, "query"), (xb, "doc")))
            assert _overlap(h.ids, ids[_reference(xqm, xbm, "cosine")]) > 0.9
            table = srv.engine.collections["hnsw"]
            kinds = {
                f: table._call("describe index", lambda cl, f=f: cl.describe_index(table.mname, f))["index_type"]
                for f in (table.home_field, table.basis_field)
            }
            assert kinds == {table.home_field: "FLAT", table.basis_field: "HNSW"}
            refusals = [
                (lambda: c.upsert("milvus-cosine-8", ["z"], xb[:1], space="l@1"), FailedPrecondition,
                 r"no vector field for space 'l@1'.* 4 vector fields at most, 2 of them for its basis and Matryoshka"
                 r" prefix fields, so the home space and the oldest other spaces registered then \(c@1, i@1\)"),
                (lambda: c.create_collection("x", "c@1", basis_transform="b-other", backend="milvus"), InvalidArgument,
                 "a collection's basis must map its home space 'c@1' onto itself"),
                (lambda: c.create_collection("x", "c@1", basis_transform="nope", backend="milvus"), NotFound,
                 "transform 'nope' does not exist"),
                (lambda: c.delete_transform("b-c@1"), FailedPrecondition,
                 r"in use by collection 'embedded-cosine-0' \(basis_transform\).*collection 'milvus-cosine-0'"),
            ]  # fmt: skip
            engine_before = len(srv.engine.milvus.call(table.uri, "list", lambda cl: cl.list_collections()))
            for call, exc, match in refusals:
                with pytest.raises(exc, match=match):
                    call()
            assert len(srv.engine.milvus.call(table.uri, "list", lambda cl: cl.list_collections())) == engine_before
            assert "x" not in {i.name for i in c.list_collections()}
            info_hnsw = c.get_collection("hnsw")
            table.basis = None  # as if its transform had not been loaded at start-up
            for call in (
                lambda: c.search("hnsw", xq, K, space="c@1"),
                lambda: c.upsert("hnsw", ["z"], xq[:1], space="c@1"),
            ):
                with pytest.raises(FailedPrecondition, match="basis transform 'b-c@1' is not loaded in this front-end"):
                    call()
            assert c.get_collection("hnsw").last_sequence == info_hnsw.last_sequence  # the refused write took none
        srv.stop(None)
        srv, port = start_server(data, merge_idle_seconds=0.2)
        with Client(f"127.0.0.1:{port}", timeout=60) as c:
            for (sp, m), (want_ids, want_scores) in answers.items():
                r = c.search(f"milvus-{METRICS[sp]}-{m}", xq, K, space=sp)
                assert r.ids.tolist() == want_ids, (sp, m)
                np.testing.assert_allclose(r.scores, want_scores, rtol=1e-6, atol=1e-6)
            for backend in ("embedded", "milvus"):  # an overwrite is mapped too: p0's vector is p1's now
                c.upsert(f"{backend}-l2-8", ["p0"], xb[1:2], space="l@1")
                got = c.search(f"{backend}-l2-8", xb[1:2], N, space="l@1", shortlist_k=N + 1)
                score = dict(zip(got.ids[0].tolist(), got.scores[0].tolist(), strict=True))
                assert score["p0"] == pytest.approx(score["p1"], rel=1e-5, abs=1e-5)
    finally:
        srv.stop(None)


def test_move_of_a_basis_collection_keeps_its_answers(tmp_path: Path) -> None:
    """An embedded ``pca_basis`` prefix collection moved to milvus answers as before (ids, scores within
    float tolerance), its GetPoints vectors the ones written; a move past the vector-field cap names the
    basis field among the fields that hold no space."""
    srv, port = start_server(tmp_path / "data", merge_idle_seconds=0.2)
    rng = np.random.default_rng(51)
    mix = np.linalg.qr(rng.standard_normal((D, D)))[0] * np.geomspace(3, 0.1, D)  # structure spread over dims
    xb = (make_data(N, D, seed=52) @ mix).astype(np.float32)
    xq = xb[:12] + 0.05 * rng.standard_normal((12, D)).astype(np.float32)
    ids = [f"p{i}" for i in range(N)]
    try:
        with Client(f"127.0.0.1:{port}", timeout=120) as c:
            for sp in ("s@1", "o1@1", "o2@1"):
                c.register_space(sp, D)
            c.fit_transform("pca", "pca_basis", source_space="s@1", target_space="s@1", doc_pairs=(xb, xb))
            c.create_collection("mrl", "s@1", "HNSW16", prefix_dims=M, basis_transform="pca")
            c.upsert("mrl", ids, xb, space="s@1")
            c.create_collection("wide", "s@1", prefix_dims=M, basis_transform="pca")
            for sp in ("s@1", "o1@1", "o2@1"):
                c.upsert("wide", ["a"], xb[:1], space=sp)
            before = c.search("mrl", xq, K, space="s@1", ef_search=256)
            with pytest.raises(
                FailedPrecondition,
                match=r"'wide' has vectors in 3 spaces \(s@1, o1@1, o2@1\); a milvus collection holds at most 4"
                r" vector fields \(2 spaces and a basis field and a Matryoshka prefix field\)",
            ):
                c.move_collection("wide")
            moved = c.move_collection("mrl")
            assert moved.points_copied == N
            info = c.get_collection("mrl")
            assert (info.backend, info.basis_transform, info.num_points) == ("milvus", "pca", N)
            after = c.search("mrl", xq, K, space="s@1", ef_search=256)
            assert _overlap(after.ids, before.ids) > 0.9
            same = after.ids == before.ids
            np.testing.assert_allclose(after.scores[same], before.scores[same], rtol=1e-4, atol=1e-5)
            got = c.get("mrl", ["p7"], with_vectors=True)[0].vectors["s@1"]
            np.testing.assert_allclose(got, xb[7] / np.linalg.norm(xb[7]), rtol=1e-6, atol=1e-7)
    finally:
        srv.stop(None)
