"""Index specs, training thresholds and vectors that once broke a collection or answered INTERNAL.

Each refusal is INVALID_ARGUMENT naming what is wrong, and changes nothing; accepted data is served
correctly (against numpy brute force):

* index specs are ASCII (``server/index_spec.py``): ``IVF\\u0663,Flat`` passed Python's ``\\d``, then
  failed every training; RecommendIndex answered INTERNAL on it;
* ``train_min_points`` is at most ``MAX_TRAIN_MIN_POINTS`` (2**63 and above failed the SQLite insert);
* a trained index of vectors with norms up to ``validate.MAX_NORM`` serves: its self-check
  (``segment_merge.check_finds_itself``) counted scores above 1e30 as "not found" and failed it;
* float16 codes (SQfp16 storage, ``Refine(SQfp16)``) refuse the vectors they cannot hold (they were
  encoded as inf: hits lost, NaN scores), over gRPC and embedded alike;
* HNSW answers k hits where k live points exist: efSearch is at least k (k * k_factor under a refine
  stage, k over the live fraction with dead labels), and a graph search still short of hits is
  completed from every code.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from conftest import brute_force, make_data, start_server

from interlingua.client import Client, InvalidArgument
from interlingua.server import advisor
from interlingua.server.errors import InvalidArgument as ServerInvalidArgument
from interlingua.server.index_spec import MAX_TRAIN_MIN_POINTS, IndexSpec

D = 8


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[tuple[Any, Client]]:
    server, port = start_server(tmp_path / "data", merge_idle_seconds=0.05)
    client = Client(f"127.0.0.1:{port}", timeout=30)
    yield server, client
    client.close()
    server.stop(None)


def _sealed(c: Client, name: str, n: int) -> None:
    deadline = time.monotonic() + 10
    while (info := c.get_collection(name)).indexed_vectors < n or info.fresh_vectors:
        assert info.state != "failed", info.failure_reason
        assert time.monotonic() < deadline, info
        time.sleep(0.02)


def _names(c: Client) -> list[str]:
    return [info.name for info in c.list_collections()]


def _ids(n: int) -> list[str]:
    return [f"p{i}" for i in range(n)]


def _labels(ids: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda p: int(p[1:]) if p else -1)(ids)


# -- A: index specs are ASCII --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("IVF\u0663,Flat", "holds '\u0663' (U+0663) at position 3; index specs are ASCII"),
        ("HNSW\uff13\uff12", "holds '\uff13' (U+FF13) at position 4"),
        ("IVF4,PQ\u0662", "holds '\u0662' (U+0662) at position 7"),
        ("Flat,Refine(SQ\u0668)", "holds '\u0668' (U+0668)"),
    ],
)
def test_non_ascii_digits_in_a_spec_are_refused(srv: tuple[Any, Client], spec: str, needle: str) -> None:
    _, c = srv
    c.register_space("s", D, "l2")
    with pytest.raises(InvalidArgument) as e:
        c.create_collection("c", "s", spec, 300)
    assert needle in e.value.message and "index spec" in e.value.message
    assert _names(c) == []


def test_recommend_index_refuses_a_non_ascii_candidate(srv: tuple[Any, Client]) -> None:
    _, c = srv
    c.register_space("s", D, "l2")
    c.create_collection("ok", "s")
    xb = make_data(1000, D, seed=1)
    c.upsert("ok", _ids(1000), xb, space="s")
    with pytest.raises(InvalidArgument) as e:
        c.recommend_index("ok", 0.9, candidates=["IVF\u0663,Flat"])
    assert "index spec 'IVF\u0663,Flat' holds '\u0663' (U+0663)" in e.value.message
    info = c.get_collection("ok")
    assert (info.state, info.index_spec, info.num_points) == ("ready", "Flat", 1000)
    _, ids = c.search("ok", xb[:5], 1, space="s")
    assert list(ids[:, 0]) == _ids(5)


def test_the_advisor_turns_a_spec_faiss_refuses_into_invalid_argument() -> None:
    """A spec the grammar accepted but FAISS's factory refuses (none is known now): INVALID_ARGUMENT
    quoting FAISS, not the RuntimeError that answered INTERNAL."""
    spec = dataclasses.replace(IndexSpec.parse("IVF4,Flat", D, "l2"), spec="IVF\u0663,Flat")
    with pytest.raises(ServerInvalidArgument) as e:
        advisor._build(spec, make_data(300, D))
    assert e.value.message.startswith("index spec 'IVF\u0663,Flat' is not valid for d=8: ")
    assert "could not parse index string" in e.value.message and ".cpp" not in e.value.message


def test_a_stored_non_ascii_spec_fails_its_collection_alone(tmp_path: Path) -> None:
    """A collection an earlier version accepted with such a spec: failed with the reason at start-up
    (never built), the others serve."""
    data = tmp_path / "data"
    server, port = start_server(data)
    with Client(f"127.0.0.1:{port}") as c:
        c.register_space("s", D, "l2")
        xb = make_data(50, D, seed=2)
        for name, spec in (("bad", "IVF4,Flat"), ("ok", "Flat")):
            c.create_collection(name, "s", spec, 300)
            c.upsert(name, _ids(50), xb, space="s")
    server.stop(None)
    with sqlite3.connect(data / "interlingua.db") as con:
        con.execute("UPDATE collections SET index_spec='IVF\u0663,Flat' WHERE name='bad'")
    server, port = start_server(data)
    try:
        with Client(f"127.0.0.1:{port}") as c:
            info = c.get_collection("bad")
            assert info.state == "failed" and "holds '\u0663' (U+0663)" in info.failure_reason
            assert info.num_points == 50
            _, ids = c.search("ok", xb[:5], 1, space="s")
            assert list(ids[:, 0]) == _ids(5)
    finally:
        server.stop(None)


# -- B: train_min_points fits the store -----------------------------------------------------------


@pytest.mark.parametrize("value", [MAX_TRAIN_MIN_POINTS + 1, 2**63 - 1, 2**63, 2**64 - 1])
def test_train_min_points_over_the_cap_is_refused(srv: tuple[Any, Client], value: int) -> None:
    _, c = srv
    c.register_space("s", D, "l2")
    with pytest.raises(InvalidArgument) as e:
        c.create_collection("c", "s", "IVF4,Flat", value)
    assert e.value.message == (
        f"train_min_points is {value}; it must be at most {MAX_TRAIN_MIN_POINTS} (0: the default, 256 for index"
        " spec 'IVF4,Flat')"
    )
    assert _names(c) == []
    assert c.create_collection("c", "s", "IVF4,Flat", MAX_TRAIN_MIN_POINTS).train_min_points == MAX_TRAIN_MIN_POINTS


# -- C: vectors of large norms train and serve -----------------------------------------------------


def _scaled(n: int, norm: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True) * norm * rng.uniform(0.5, 1.0, (n, 1))).astype(np.float32)


def test_an_index_of_large_norms_trains_and_serves(srv: tuple[Any, Client]) -> None:
    """ip IVF4,Flat of norms ~5e15 (self inner products ~1e31): ready and exact (every list probed);
    l2 SQ8, SQ4, PQ4x4 and IVF2_HNSW4,PQ2x4 of norms ~3e17: ready, k finite hits, each its own nearest."""
    _, c = srv
    c.register_space("si", D, "ip")
    c.register_space("sl", D, "l2")
    xi, xl = _scaled(300, 5e15, 3), _scaled(300, 3e17, 4)
    c.create_collection("ip", "si", "IVF4,Flat", 256)
    c.upsert("ip", _ids(300), xi, space="si")
    lossy = {"sq8": "SQ8", "sq4": "SQ4", "pq": "PQ4x4", "ivfpq": "IVF2_HNSW4,PQ2x4"}
    for name, spec in lossy.items():
        c.create_collection(name, "sl", spec, 256)
        c.upsert(name, _ids(300), xl, space="sl")
    for name in ("ip", *lossy):
        _sealed(c, name, 300)
        assert c.get_collection(name).state == "ready"
    xq = _scaled(20, 5e15, 5)
    scores, ids = c.search("ip", xq, 10, space="si")
    Dref, Iref = brute_force(xi, xq, 10, "ip")
    assert (_labels(ids) == Iref).all()
    np.testing.assert_allclose(scores, Dref, rtol=1e-5)
    for name in lossy:
        scores, ids = c.search(name, xl[:20], 5, space="sl")
        assert np.isfinite(scores).all() and (ids != "").all(), name
        assert list(ids[:, 0]) == _ids(20), name


# -- D: float16 codes hold what they are given ----------------------------------------------------


def _fp16_checks(c: Client, space: str, name: str, spec: str, limit: str, bad: float) -> None:
    """Refused with nothing changed, then data within the bound served (ids against brute force)."""
    metric = c.get_space(space).metric
    xb = make_data(100, D, seed=6) * np.float32(1e4)  # components up to ~1.3e4
    c.create_collection(name, space, spec, 100 if "IVF" in spec else 0)
    seq = c.upsert(name, _ids(100), xb, space=space)
    before = c.search(name, xb[:5], 5, space=space)
    x = xb[:4].copy()
    x[3, 5] = bad
    with pytest.raises(InvalidArgument) as e:
        c.upsert(name, ["p0", "p1", "new2", "new3"], x, space=space)
    assert e.value.message == (
        f"vectors: vector 3 has component {bad:.7g} at dimension 5; the limit is {limit} for index spec {spec!r}"
        " (its float16 codes" + (" of IVF residuals" if "IVF" in spec else "") + " hold at most 65504)"
    ), e.value.message
    info = c.get_collection(name)
    assert info.num_points == 100 and info.last_sequence == seq, info
    after = c.search(name, xb[:5], 5, space=space)
    assert (after.ids == before.ids).all() and (after.scores == before.scores).all()
    _sealed(c, name, 100)
    scores, ids = c.search(name, xb[:10], 5, space=space)
    _, Iref = brute_force(xb, xb[:10], 5, metric)
    assert np.isfinite(scores).all() and (ids != "").all()
    assert (_labels(ids)[:, 0] == Iref[:, 0]).all()


@pytest.mark.parametrize(
    ("metric", "spec", "limit", "bad"),
    [
        ("l2", "SQfp16", "65504", 1e5),
        ("l2", "HNSW8_SQfp16", "65504", -7e4),
        ("ip", "Flat,Refine(SQfp16)", "65504", 1e5),
        ("l2", "IVF2,SQfp16", "32752", 4e4),  # IVF residuals: up to twice a component
    ],
)
def test_fp16_codes_refuse_components_they_cannot_hold(
    srv: tuple[Any, Client], metric: str, spec: str, limit: str, bad: float
) -> None:
    _, c = srv
    c.register_space("s", D, metric)
    _fp16_checks(c, "s", "c", spec, limit, bad)


def test_fp16_codes_after_a_pre_transform_bound_the_norm(srv: tuple[Any, Client]) -> None:
    """``PCA4,SQfp16``: a PCA's output norm is at most twice its input's (the mean): norms <= 32752."""
    _, c = srv
    c.register_space("s", D, "l2")
    c.create_collection("c", "s", "PCA4,SQfp16", 256)
    x = np.full((2, D), 1e4, dtype=np.float32)  # norm 2.83e4, then 3.1e4 * sqrt(8) = 8.8e4
    x[1] *= np.float32(3.1)
    with pytest.raises(InvalidArgument) as e:
        c.upsert("c", ["a", "b"], x, space="s")
    assert e.value.message.startswith(f"vectors: vector 1 has L2 norm {np.linalg.norm(x[1].astype(float)):.7g};")
    assert "the limit is 32752 for index spec 'PCA4,SQfp16' (its float16 codes after the pre-transform" in (
        e.value.message
    )
    assert c.get_collection("c").num_points == 0
    c.upsert("c", ["a"], x[:1], space="s")  # within the bound
    assert c.get_collection("c").num_points == 1


def test_fp16_bounds_spare_other_codes_and_cosine(srv: tuple[Any, Client]) -> None:
    """Flat and SQ8 take any accepted vector; a cosine space stores unit vectors, so SQfp16 takes any."""
    _, c = srv
    c.register_space("l", D, "l2")
    c.register_space("cos", D, "cosine")
    x = make_data(50, D, seed=7) * np.float32(1e6)
    for name, space, spec in (("flat", "l", "Flat"), ("sq8", "l", "SQ8"), ("cos", "cos", "SQfp16")):
        c.create_collection(name, space, spec, 256 if spec == "SQ8" else 0)
        c.upsert(name, _ids(50), x, space=space)
        _, ids = c.search(name, x[:5], 1, space=space)
        assert list(ids[:, 0]) == _ids(5), name


def test_fp16_refusal_embedded(tmp_path: Path) -> None:
    """The in-process client takes the same checks: the same error, nothing written."""
    with Client.embedded(tmp_path / "e", merge_idle_seconds=0.05) as c:
        c.register_space("s", D, "l2")
        _fp16_checks(c, "s", "c", "SQfp16", "65504", 1e5)


# -- E: HNSW answers k hits where k live points exist ---------------------------------------------


def _live_hits(c: Client, name: str, xq: np.ndarray, k: int, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    scores, ids = c.search(name, xq, k, space="s", **kw)
    return scores, _labels(ids)


def test_hnsw_returns_k_hits_before_and_after_deletes(srv: tuple[Any, Client]) -> None:
    """HNSW8 of 2000 points: k=500 gave 482 hits at efSearch 64, and 245 after 1000 deletes."""
    server, c = srv
    c.register_space("s", 16, "l2")
    c.create_collection("h", "s", "HNSW8")
    xb = make_data(2000, 16, seed=8)
    c.upsert("h", _ids(2000), xb, space="s")
    _sealed(c, "h", 2000)
    xq = make_data(4, 16, seed=9)
    _, Iref = brute_force(xb, xq, 500, "l2")
    for q in (xq, xq[:1]):  # a batch and the single-query path
        _, I = _live_hits(c, "h", q, 500)
        assert (I >= 0).all() and all(len(set(row)) == 500 for row in I)
        assert np.mean([len(set(a) & set(b)) / 500 for a, b in zip(I, Iref, strict=False)]) > 0.9
    # an efSearch of at least k is kept as it is: FAISS's own answer at it
    sealed = server.engine.collection("h").segments.snapshot.sealed
    for k, ef in ((10, None), (300, 600)):
        _, I = _live_hits(c, "h", xq, k, ef_search=ef)
        _, Iown = sealed.search(xq, k, params=faiss.SearchParametersHNSW(efSearch=ef or 64))
        assert (Iown == I).all()
    c.delete("h", _ids(1000))
    live = np.arange(1000, 2000)
    for q in (xq, xq[:1]):
        _, I = _live_hits(c, "h", q, 500)
        assert (I >= 1000).all() and all(len(set(row)) == 500 for row in I)
    _, I = _live_hits(c, "h", xq, 1000)  # every live point: completed from every code where the graph misses one
    assert (np.sort(I, axis=1) == live).all()
    scores, I = _live_hits(c, "h", xq, 1024)
    assert (np.sort(I[:, :1000], axis=1) == live).all() and (I[:, 1000:] == -1).all()
    assert np.isposinf(scores[:, 1000:]).all()


def test_hnsw_under_a_refine_stage_returns_k_hits(srv: tuple[Any, Client]) -> None:
    """``HNSW8_SQ8,RFlat``: the base returns k * k_factor candidates, so its efSearch is at least that."""
    _, c = srv
    c.register_space("s", 16, "l2")
    c.create_collection("r", "s", "HNSW8_SQ8,RFlat", 256)
    xb = make_data(1500, 16, seed=10)
    c.upsert("r", _ids(1500), xb, space="s")
    _sealed(c, "r", 1500)
    xq = make_data(3, 16, seed=11)
    Dref, Iref = brute_force(xb, xq, 300, "l2")
    for kf in (None, 2, 8):
        scores, I = _live_hits(c, "r", xq, 300, k_factor=kf)
        assert (I >= 0).all(), kf
        assert np.mean([len(set(a) & set(b)) / 300 for a, b in zip(I, Iref, strict=False)]) > 0.9
        np.testing.assert_allclose(scores[:, 0], Dref[:, 0], rtol=1e-4, atol=1e-4)


def test_hnsw_asked_for_every_point_returns_every_point(srv: tuple[Any, Client]) -> None:
    """HNSW2 of 60 points: its graph reaches 59 of them from the entry point, at any efSearch; a
    search of k=60 (batch, then single queries, which the serial path hands back) returns all 60."""
    _, c = srv
    c.register_space("s", 16, "l2")
    c.create_collection("g", "s", "HNSW2")
    xb = make_data(60, 16, seed=12)
    c.upsert("g", _ids(60), xb, space="s")
    _sealed(c, "g", 60)
    xq = make_data(5, 16, seed=13)
    Dref, _ = brute_force(xb, xq, 60, "l2")
    for rows in (slice(0, 5), slice(0, 1), slice(0, 1), slice(1, 2)):
        scores, I = _live_hits(c, "g", xq[rows], 60)
        assert (np.sort(I, axis=1) == np.arange(60)).all()
        np.testing.assert_allclose(scores, Dref[rows], rtol=1e-4, atol=1e-4)
