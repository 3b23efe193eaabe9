"""The index advisor (``RecommendIndex``) and ``auto`` collections, over a real server on port 0.

The frontier's recall claims are checked on fresh queries the advisor never saw, against indexes
built here from the same specs and parameters; the chosen point reaches the target; errors carry
precise codes. An ``auto`` collection is rebuilt onto the advisor's choice while several threads
write (new ids, overwrites, deletes) and search: no request fails, nothing acknowledged is lost,
results agree with brute force, and a restart serves the chosen index from its checkpoint. The
specs the advisor recommends (fast-scan PQ, refine stages) go through merges, deletes (IDSelector
or host filtering), compaction and checkpoints. Seeded data throughout.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import Stubs, brute_force, connect, make_data, recall_at, start_server

from interlingua.client import Client
from interlingua.client.cli import main
from interlingua.server import advisor, advisor_auto
from interlingua.server.index_spec import IndexSpec, search_params
from interlingua.server.query_sample import QuerySample
from interlingua.v1 import collections_pb2 as cpb
from interlingua.v1 import common_pb2 as pb
from interlingua.v1 import points_pb2 as ppb

D = 32
INVALID = grpc.StatusCode.INVALID_ARGUMENT
FAILED = grpc.StatusCode.FAILED_PRECONDITION
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture(autouse=True)
def _quick_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(advisor, "TIME_MIN_SECONDS", 0.02)  # each point timed briefly: tests check recall
    monkeypatch.setattr(advisor_auto, "TUNE_TIME_SECONDS", 0.02)


def _fill(stubs: Stubs, name: str, x: np.ndarray, space: str = "s", prefix: str = "") -> list[str]:
    ids = [f"{prefix}{i}" for i in range(len(x))]
    for b in range(0, len(x), 2000):
        stubs.upsert(name, space, ids[b : b + 2000], x[b : b + 2000])
    return ids


def _recommend(stubs: Stubs, name: str, target: float, **kw: Any) -> cpb.RecommendIndexResponse:
    return stubs.collections.RecommendIndex(
        cpb.RecommendIndexRequest(collection=name, target_recall=target, **kw), timeout=300
    )


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details() or ""


def test_frontier_claims_hold_on_fresh_queries(stubs: Stubs) -> None:
    """Every frontier point's Recall@10, rebuilt here on the collection's vectors and searched with
    its parameters on 400 queries the advisor never saw, is within 0.05 of the claim; the frontier
    is ordered and undominated; the chosen point is the fastest that reaches the target."""
    x = make_data(6400, D, seed=11)
    xb, fresh = x[:6000], x[6000:]
    stubs.register("s", D)
    stubs.create("c", "s")
    _fill(stubs, "c", xb)
    r = _recommend(stubs, "c", 0.9, k=10, num_queries=300)
    assert (r.k, r.num_queries, r.sample_points, r.held_out_queries, r.batch_size) == (10, 300, 5700, True, 64)
    assert r.points_measured >= len(r.frontier) >= 2
    recalls = [p.recall for p in r.frontier]
    qps = [p.qps for p in r.frontier]
    assert recalls == sorted(recalls) and qps == sorted(qps, reverse=True)
    assert all(p.bytes_per_vector > 0 and p.qps > 0 and p.build_seconds >= 0 for p in r.frontier)
    reaching = [p for p in r.frontier if p.recall >= 0.9]
    assert r.chosen.recall >= 0.9 and r.chosen == max(reaching, key=lambda p: p.qps)
    specs = {p.index_spec for p in r.frontier}
    assert specs <= {"Flat", "HNSW32", "HNSW32_SQ8,RFlat", "IVF128,PQ16x4fs,RFlat", "IVF128,Flat"}, specs

    xn = xb / np.linalg.norm(xb, axis=1, keepdims=True)
    qn = fresh / np.linalg.norm(fresh, axis=1, keepdims=True)
    _, Iref = brute_force(xb, fresh, 10, "cosine")
    built: dict[str, Any] = {}
    for p in r.frontier:
        if p.index_spec not in built:
            spec = IndexSpec.parse(p.index_spec, D, "cosine")
            index = spec.new_index()
            if spec.needs_training:
                index.train(xn)
            index.add(xn)
            built[p.index_spec] = index
        index = built[p.index_spec]
        params = search_params(
            index, ef_search=p.ef_search or None, nprobe=p.nprobe or None, k_factor=p.k_factor or None
        )
        _, I = index.search(qn, 10, params=params)
        got = recall_at(I, Iref)
        assert abs(got - p.recall) <= 0.05, (p, got)


def test_given_queries_candidates_and_the_client(stubs: Stubs) -> None:
    """Queries given by the caller (cosine: normalized server-side), a candidate list and a
    sample size; through the Python client, with typed points."""
    x = make_data(3300, D, seed=12)
    stubs.register("s", D)
    stubs.create("c", "s")
    _fill(stubs, "c", x[:3000])
    with Client(stubs.target) as client:
        rec = client.recommend_index(
            "c", 0.8, k=5, queries=3 * x[3000:], sample_size=2500, candidates=["HNSW16", "IVF32,PQ8x4fs,RFlat"]
        )
    assert (rec.k, rec.num_queries, rec.sample_points, rec.held_out_queries) == (5, 300, 2500, False)
    assert {p.index_spec for p in rec.frontier} <= {"HNSW16", "IVF32,PQ8x4fs,RFlat"}
    assert rec.chosen.recall >= 0.8 and rec.chosen in rec.frontier
    ivf = [p for p in rec.frontier if p.index_spec.startswith("IVF")]
    assert all(p.nprobe >= 1 and p.k_factor >= 1 and p.ef_search == 0 for p in ivf)
    assert all(p.train_points == 32 for p in ivf)


def test_errors_have_precise_codes(stubs: Stubs) -> None:
    stubs.register("s", D)
    stubs.create("c", "s")
    _fill(stubs, "c", make_data(2000, D, seed=13))
    stubs.create("small", "s")
    _fill(stubs, "small", make_data(500, D, seed=14))
    for target in (0.0, -0.1, 1.5, math.nan):
        code, msg = _code(lambda t=target: _recommend(stubs, "c", t))
        assert code == INVALID and "target_recall is" in msg and "(0, 1]" in msg
    code, msg = _code(lambda: _recommend(stubs, "c", 0.9, k=5000))
    assert code == INVALID and "k is 5000; it must be between 1 and 1024" in msg
    code, msg = _code(lambda: _recommend(stubs, "nope", 0.9))
    assert code == NOT_FOUND and "collection 'nope' does not exist" in msg
    code, msg = _code(lambda: _recommend(stubs, "c", 0.9, candidates=["HNSW1"]))
    assert code == INVALID and "HNSW M is 1" in msg
    code, msg = _code(lambda: _recommend(stubs, "c", 0.9, candidates=["IVF4096,Flat"]))
    assert code == INVALID and "trains on at least 4096 points; the sample holds 1800" in msg
    bad = pb.Vectors(data=np.zeros((2, 8), "<f4").tobytes(), dim=8)
    code, msg = _code(lambda: _recommend(stubs, "c", 0.9, queries=bad))
    assert code == INVALID and "queries" in msg
    code, msg = _code(lambda: _recommend(stubs, "c", 0.9, num_queries=16385))
    assert code == INVALID and "num_queries is 16385; it must be at most max_nq=16384" in msg
    code, msg = _code(lambda: _recommend(stubs, "small", 0.9))
    assert code == FAILED and "has 500 points; the index advisor needs at least 1000" in msg
    code, msg = _code(lambda: _recommend(stubs, "c", 0.999, candidates=["IVF32,PQ4x4fs"]))
    assert code == FAILED and "no candidate reaches Recall@10 >= 0.999" in msg
    best = float(msg.split("the best reached ")[1].split()[0])
    assert 0 < best < 0.999 and "IVF32,PQ4x4fs nprobe=" in msg
    # index_spec "auto" and target_recall at creation
    for spec, target, needle in (
        ("auto", 0.0, "index_spec 'auto' needs a target_recall in (0, 1]"),
        ("auto", 1.5, "target_recall is 1.5"),
        ("HNSW32", 0.9, "target_recall applies to index_spec 'auto'"),
    ):
        req = cpb.CreateCollectionRequest(name="a", home_space="s", index_spec=spec, target_recall=target)
        code, msg = _code(lambda r=req: stubs.collections.CreateCollection(r))
        assert code == INVALID and needle in msg, msg
    info = stubs.collections.CreateCollection(
        cpb.CreateCollectionRequest(name="a", home_space="s", index_spec="auto", target_recall=0.95)
    )
    assert (info.index_spec, info.target_recall, info.HasField("operating_point")) == ("auto", 0.95, False)
    assert info.advisor_status.startswith("waiting") and info.state == cpb.INDEX_STATE_READY


@pytest.mark.parametrize("recreate", [False, True])
def test_a_collection_deleted_while_measured_answers_not_found(
    stubs: Stubs, monkeypatch: pytest.MonkeyPatch, recreate: bool
) -> None:
    """A collection deleted (or deleted and created again under its name) while the advisor measures
    it: RecommendIndex answers NOT_FOUND naming it, not a frontier of points that no longer exist;
    the server serves on."""
    stubs.register("s", D)
    stubs.create("c", "s")
    _fill(stubs, "c", make_data(1500, D, seed=21))
    real = advisor.recommend_collection

    def delete_meanwhile(*args: Any, **kw: Any) -> Any:
        rec = real(*args, **kw)
        stubs.collections.DeleteCollection(cpb.DeleteCollectionRequest(name="c"))
        if recreate:
            stubs.create("c", "s")
        return rec

    monkeypatch.setattr(advisor, "recommend_collection", delete_meanwhile)
    code, msg = _code(lambda: _recommend(stubs, "c", 0.9, candidates=["HNSW16"]))
    assert code == NOT_FOUND and msg == "collection 'c' was deleted while RecommendIndex measured it"
    monkeypatch.setattr(advisor, "recommend_collection", real)
    if recreate:
        assert stubs.info("c").num_points == 0
    else:
        assert _code(lambda: stubs.info("c"))[0] == NOT_FOUND
        stubs.create("c", "s")
    _fill(stubs, "c", make_data(1500, D, seed=22))
    assert _recommend(stubs, "c", 0.9, candidates=["HNSW16"]).chosen.index_spec == "HNSW16"


#: spec -> least Recall@10 its collection reaches here (a flat 4-bit PQ of 8 sub-vectors is coarse)
FORMS = {"HNSW16_SQ8,RFlat": 0.9, "IVF16,PQ8x4fs,RFlat": 0.7, "PQ8x4fs": 0.2, "PQ8x4,Refine(SQfp16)": 0.7}


@pytest.mark.parametrize("spec", list(FORMS))
def test_recommended_forms_serve_through_merges_deletes_compaction_and_restart(tmp_path: Path, spec: str) -> None:
    """A collection of each form: merged in steps, with deletes and overwrites filtered (IDSelector
    on the base index, or on the host for a flat fast-scan/PQ base), compacted, checkpointed and
    reloaded after a restart, always agreeing with brute force over the live points."""
    kw: dict[str, Any] = {"merge_idle_seconds": 0.05, "compact_min_dead": 10, "compact_dead_fraction": 0.05}
    server, port = start_server(tmp_path / "data", **kw)
    stubs = connect(port)
    x = make_data(3000, D, seed=15)
    live = {f"p{i}": x[i] for i in range(2400)}
    try:
        stubs.register("s", D, metric=pb.METRIC_L2)
        stubs.create("c", "s", spec, 1000)
        for b in range(0, 2400, 600):  # several merges: clone + add
            stubs.upsert("c", "s", [f"p{i}" for i in range(b, b + 600)], x[b : b + 600])
            time.sleep(0.2)
        gone = [f"p{i}" for i in range(0, 2400, 7)]
        stubs.points.DeletePoints(ppb.DeletePointsRequest(collection="c", ids=gone))
        for pid in gone:
            del live[pid]
        moved = [f"p{i}" for i in range(1, 600, 5)]  # overwrites: new vectors for old ids
        stubs.upsert("c", "s", moved, x[2400 : 2400 + len(moved)])
        live.update(zip(moved, x[2400 : 2400 + len(moved)], strict=True))
        deadline = time.monotonic() + 30
        while (info := stubs.info("c")).fresh_vectors or info.compactions == 0 or info.checkpoint_sequence == 0:
            assert time.monotonic() < deadline, info
            time.sleep(0.05)
        assert info.index_spec == spec and info.state == cpb.INDEX_STATE_READY

        def check(stubs: Stubs) -> None:
            ids = list(live)
            xb = np.stack([live[i] for i in ids])
            xq = xb[::25]
            _, Iref = brute_force(xb, xq, 10, "l2")
            kw = {"nprobe": 16} if spec.startswith("IVF") else {"ef_search": 128} if "HNSW" in spec else {}
            _, got, _ = stubs.search("c", "s", xq, 10, **kw)
            want = np.array(ids, dtype=object)[Iref]
            assert recall_at(got, want) >= FORMS[spec], spec
            assert not set(got.ravel()) & (set(gone) - set(live))  # some deleted ids came back by overwrite

        check(stubs)
    finally:
        stubs.channel.close()
        server.stop(None)
    server, port = start_server(tmp_path / "data", **kw)
    stubs = connect(port)
    try:
        info = stubs.info("c")
        assert info.index_spec == spec and info.num_points == len(live) and info.fresh_vectors == 0
        check(stubs)
    finally:
        stubs.channel.close()
        server.stop(None)


def test_auto_rebuild_under_concurrent_writes_and_searches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``auto`` collection passes AUTO_MIN_POINTS while three threads write (new ids, overwrites,
    deletes) and three search: it is rebuilt onto the advisor's choice beside the live index, then
    tuned on the whole index (a pass of seconds here: each setting timed for 1 s) with no failed
    request, searches and writes going on through the tuning; afterwards every acknowledged id is
    there with its last vector, deleted ones are gone, searches agree with brute force at about the
    target, and a restart serves the same choice with the same tuned defaults."""
    monkeypatch.setattr(advisor_auto, "AUTO_MIN_POINTS", 3000)
    monkeypatch.setattr(advisor_auto, "READVISE_GROWTH", 1e9)  # one advisor run (the growth test runs another)
    monkeypatch.setattr(advisor_auto, "TUNE_TIME_SECONDS", 1.0)
    data = tmp_path / "data"
    server, port = start_server(data, merge_idle_seconds=0.05)
    stubs = connect(port)
    pool = make_data(9000, D, seed=16)
    stubs.register("s", D)
    stubs.collections.CreateCollection(
        cpb.CreateCollectionRequest(name="a", home_space="s", index_spec="auto", target_recall=0.9)
    )
    live: dict[str, np.ndarray] = {}
    deleted: set[str] = set()
    lock = threading.Lock()
    errors: list[str] = []
    stop = threading.Event()
    ids0 = _fill(stubs, "a", pool[:2500], prefix="base-")
    live.update(zip(ids0, pool[:2500], strict=True))
    counts = {"writes": 0, "searches": 0}

    def writer(w: int) -> None:
        rng = np.random.default_rng(w)
        j, own = 0, []
        while not stop.is_set():
            try:
                op = rng.random()
                if op < 0.7 or not own:  # new ids
                    ids = [f"w{w}-{j + i}" for i in range(40)]
                    off = 2500 + (w * 2000 + j) % 5960
                    xs = pool[off : off + 40]
                    xs = xs + 0.01 * rng.standard_normal(xs.shape).astype(np.float32)
                    stubs.upsert("a", "s", ids, xs)
                    with lock:
                        live.update(zip(ids, xs, strict=True))
                    own += ids
                    j += 40
                elif op < 0.85:  # overwrite some of its own
                    ids = [own[i] for i in rng.choice(len(own), min(10, len(own)), replace=False)]
                    xs = rng.standard_normal((len(ids), D)).astype(np.float32)
                    stubs.upsert("a", "s", ids, xs)
                    with lock:
                        live.update(zip(ids, xs, strict=True))
                else:  # delete some of its own
                    ids = [own.pop(int(rng.integers(len(own)))) for _ in range(min(5, len(own)))]
                    stubs.points.DeletePoints(ppb.DeletePointsRequest(collection="a", ids=ids))
                    with lock:
                        for pid in ids:
                            live.pop(pid)
                            deleted.add(pid)
                counts["writes"] += 1
            except grpc.RpcError as e:
                errors.append(f"write: {e.code()}: {e.details()}")
            time.sleep(0.01)  # leave the (niced) maintenance thread some of the 2 cores

    def searcher(s: int) -> None:
        rng = np.random.default_rng(100 + s)
        while not stop.is_set():
            try:
                xq = pool[rng.integers(0, 2500, size=int(rng.choice([1, 8])))]
                _, I, _ = stubs.search("a", "s", xq, 10)
                assert I.shape == (len(xq), 10)
                counts["searches"] += 1
            except (grpc.RpcError, AssertionError) as e:
                errors.append(f"search: {e}")
            time.sleep(0.01)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    threads += [threading.Thread(target=searcher, args=(s,)) for s in range(3)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 240
        tuning: tuple[int, int] | None = None  # (searches, writes) when the tuning pass was first seen
        while "tuned on" not in (info := stubs.info("a")).advisor_status:
            assert time.monotonic() < deadline, info
            assert not errors, errors[:5]
            if tuning is None and info.advisor_status.endswith("; tuning"):
                assert info.HasField("operating_point")  # after the swap
                tuning = counts["searches"], counts["writes"]
            time.sleep(0.02)
        tuned = counts["searches"], counts["writes"]
        assert tuning is not None and tuned[0] > tuning[0] and tuned[1] > tuning[1], (tuning, tuned)
        time.sleep(1.0)  # keep going on the new index: writes merge into it (clone + add)
        stop.set()
        for t in threads:
            t.join(30)
        assert not errors, errors[:5]
        assert counts["searches"] > tuned[0] and counts["writes"] > tuned[1]
        op = info.operating_point
        assert info.index_spec == op.index_spec != "auto" and info.target_recall == pytest.approx(0.9)
        assert op.recall >= 0.9 and op.qps > 0 and info.advisor_status.startswith("chose ")
        monkeypatch.setattr(advisor_auto, "RETUNE_GROWTH", 1e9)  # no later tuning: the restart compares this one
        deadline = time.monotonic() + 60
        while (info := stubs.info("a")).fresh_vectors or info.advisor_status.endswith("tuning"):
            assert time.monotonic() < deadline  # the last writes merged into the chosen index
            time.sleep(0.05)
        _check_all_there(stubs, live, deleted)
    finally:
        stop.set()
        stubs.channel.close()
        server.stop(None)
    server, port = start_server(data, merge_idle_seconds=0.05)
    stubs = connect(port)
    try:
        again = stubs.info("a")
        assert again.index_spec == info.index_spec and again.operating_point == info.operating_point
        assert again.checkpoint_sequence > 0 and again.advisor_status.startswith("chosen at "), again.advisor_status
        assert "; tuned on " in again.advisor_status and again.operating_point.recall >= 0.9
        _check_all_there(stubs, live, deleted)
    finally:
        stubs.channel.close()
        server.stop(None)


def _reference(xb: np.ndarray, xq: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The ids of each query's 10 nearest in xb by numpy brute force (cosine), in chunks: (nq, 10)."""
    return np.concatenate([ids[brute_force(xb, xq[b : b + 100], 10, "cosine")[1]] for b in range(0, len(xq), 100)])


def _wait_info(stubs: Stubs, done: Any, timeout: float = 120.0) -> cpb.CollectionInfo:
    deadline = time.monotonic() + timeout
    while not done(info := stubs.info("a")):
        assert time.monotonic() < deadline, info
        time.sleep(0.05)
    return info


def _tuned_on(status: str) -> int:
    """N of "tuned on N points" in an advisor status (0: none)."""
    m = re.search(r"tuned on (\d+) points", status)
    return int(m.group(1)) if m else 0


def test_auto_tuning_on_the_whole_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The advisor measures IVF32,PQ16x4fs,RFlat on a sample of 2,000 of 20,000 points with a
    refine k_factor of at most 2 (its grid here), so every point it can choose under-reaches the
    target on the whole index (checked: nprobe 32 = all lists, k_factor 2). The tuning pass after
    the rebuild sets defaults with which a search that sets no parameters reaches Recall@10 0.95 on
    1,000 fresh queries (neither stored nor used for tuning) against numpy brute force. Growing 2x
    tunes again; the tuned defaults survive a restart; growing past READVISE_GROWTH (3x here) runs
    the advisor again, then tunes."""
    monkeypatch.setattr(advisor_auto, "AUTO_MIN_POINTS", 20_000)
    monkeypatch.setattr(advisor, "SAMPLE_MAX", 2000)
    monkeypatch.setattr(advisor_auto, "AUTO_CANDIDATES", ("IVF32,PQ16x4fs,RFlat",))
    monkeypatch.setattr(advisor, "K_FACTORS", (1, 2))
    monkeypatch.setattr(advisor_auto, "READVISE_GROWTH", 3.0)
    target, spec = 0.95, "IVF32,PQ16x4fs,RFlat"
    x = make_data(61_000, D, seed=21)
    fresh, ids = x[60_000:], np.array([f"p{i}" for i in range(60_000)], dtype=object)
    data = tmp_path / "data"
    server, port = start_server(data, merge_idle_seconds=0.05)
    stubs = connect(port)

    def grow(n0: int, n1: int) -> None:
        for b in range(n0, n1, 2000):
            stubs.upsert("a", "s", list(ids[b : b + 2000]), x[b : b + 2000])

    def recall(n: int, **params: int) -> float:
        _, got, _ = stubs.search("a", "s", fresh, 10, **params)
        return recall_at(got, _reference(x[:n], fresh, ids))

    def check_defaults(n: int, op: cpb.OperatingPoint) -> None:
        """A search setting nothing searches with the tuned point's parameters and reaches the target."""
        _, plain, _ = stubs.search("a", "s", fresh[:200], 10)
        _, explicit, _ = stubs.search("a", "s", fresh[:200], 10, nprobe=op.nprobe, k_factor=op.k_factor)
        assert (plain == explicit).all()
        assert recall(n) >= target

    try:
        stubs.register("s", D)
        stubs.collections.CreateCollection(
            cpb.CreateCollectionRequest(name="a", home_space="s", index_spec="auto", target_recall=target)
        )
        grow(0, 20_000)
        info = _wait_info(stubs, lambda i: "tuned on" in i.advisor_status)
        status, op = info.advisor_status, info.operating_point
        chose = re.search(rf"^chose {re.escape(spec)} nprobe=(\d+) k_factor=(\d+) \(Recall@10 ([\d.]+)", status)
        assert chose is not None and info.index_spec == op.index_spec == spec, status
        advised_nprobe, advised_kf, sample_recall = int(chose[1]), int(chose[2]), float(chose[3])
        assert advised_kf <= 2 and sample_recall >= target + advisor_auto.AUTO_MARGIN
        # the premise: the sample's point, and any the advisor could choose, under-reach on the whole index
        assert recall(20_000, nprobe=advised_nprobe, k_factor=advised_kf) < target
        assert recall(20_000, nprobe=32, k_factor=2) < target
        assert _tuned_on(status) == 20_000 and "no setting reached" not in status, status
        assert op.recall >= target + advisor_auto.AUTO_MARGIN and op.k_factor > 2, op
        check_defaults(20_000, op)

        grow(20_000, 40_000)  # 2x: tuned again, not advised again
        info = _wait_info(stubs, lambda i: _tuned_on(i.advisor_status) > 30_000)
        assert "grown" in info.advisor_status and "since advised" not in info.advisor_status, info.advisor_status
        op = info.operating_point
        assert op.index_spec == spec and op.recall >= target + advisor_auto.AUTO_MARGIN
        check_defaults(40_000, op)
    finally:
        stubs.channel.close()
        server.stop(None)
    server, port = start_server(data, merge_idle_seconds=0.05)
    stubs = connect(port)
    try:
        again = stubs.info("a")
        assert again.operating_point == op and again.index_spec == spec
        assert again.advisor_status.startswith(f"chosen at 20000 points; tuned on {_tuned_on(info.advisor_status)}")
        check_defaults(40_000, op)

        grow(40_000, 60_000)  # 3x the points advised on: the advisor again (the same spec: no rebuild), then tuned
        info = _wait_info(stubs, lambda i: "since advised" in i.advisor_status and "tuned on" in i.advisor_status)
        assert info.advisor_status.startswith(f"chose {spec} ") and _tuned_on(info.advisor_status) > 50_000
        check_defaults(60_000, info.operating_point)
    finally:
        stubs.channel.close()
        server.stop(None)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_query_sample_keeps_the_most_recent_queries() -> None:
    qs = QuerySample(4, capacity=5, every=2)
    x = np.arange(28, dtype=np.float32).reshape(7, 4)
    qs.add(x[:3])
    qs.add(x[3:])  # wraps around: the oldest two go
    assert len(qs) == 5 and qs.added == 7
    assert sorted(map(tuple, qs.take())) == sorted(map(tuple, x[2:]))
    qs.add(np.ones((2, 3), np.float32))  # another dimension: ignored
    assert qs.added == 7
    qs.offer(x[:1] + 100)  # one call in two is kept
    assert qs.added == 7
    qs.offer(x[:1] + 200)
    assert qs.added == 8 and (qs.take() == x[0] + 200).all(axis=1).any()
    with pytest.raises(ValueError, match="must be >= 1"):
        QuerySample(0)


def test_auto_tuning_on_recent_queries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stored vectors are easy queries: a stored vector's neighbours are its own cluster, while real
    queries often fall between clusters. An ``auto`` HNSW32 collection of 20,000 clustered vectors is
    tuned on stored vectors first, and its defaults then under-reach Recall@10 0.95 on queries drawn
    further from the cluster centres (checked: the premise). Once its searches (64-query batches and
    single queries: the pipeline's and the serial path's sampling) have left
    ``query_sample.MIN_QUERIES`` such queries in its sample, the maintenance tunes again on them,
    and a search that sets no parameter reaches 0.95 on 500 fresh such queries against numpy brute
    force. A restart keeps that point and does not tune on stored vectors again."""
    monkeypatch.setattr(advisor_auto, "AUTO_MIN_POINTS", 20_000)
    monkeypatch.setattr(advisor_auto, "AUTO_CANDIDATES", ("HNSW32",))
    monkeypatch.setattr(advisor, "EF_SEARCH", (16,))  # the advisor's choice: ef 16 (the tuning's grid is its own)
    monkeypatch.setattr(advisor_auto, "READVISE_GROWTH", 1e9)
    monkeypatch.setattr(advisor_auto, "RETUNE_GROWTH", 1e9)
    target, n = 0.95, 20_000
    rng = np.random.default_rng(31)
    centres = rng.standard_normal((200, D))
    xb = _unit(centres[rng.integers(0, 200, n)] + 0.25 * rng.standard_normal((n, D)))
    far = _unit(centres[rng.integers(0, 200, 1524)] + 0.9 * rng.standard_normal((1524, D)))
    traffic, fresh = far[:1024], far[1024:]
    ids = np.array([f"p{i}" for i in range(n)], dtype=object)
    want = _reference(xb, fresh, ids)
    data = tmp_path / "data"
    server, port = start_server(data, merge_idle_seconds=0.05)
    stubs = connect(port)
    try:
        stubs.register("s", D)
        stubs.collections.CreateCollection(
            cpb.CreateCollectionRequest(name="a", home_space="s", index_spec="auto", target_recall=target)
        )
        _fill(stubs, "a", xb, prefix="p")
        info = _wait_info(stubs, lambda i: "tuned on" in i.advisor_status)
        assert "held-out stored vectors" in info.advisor_status and info.operating_point.tuned_queries == 0
        first = info.operating_point
        assert first.ef_search <= 48 and first.recall >= target + advisor_auto.AUTO_MARGIN  # on stored vectors
        _, got, _ = stubs.search("a", "s", fresh, 10)
        assert recall_at(got, want) < target  # the premise: stored vectors under-estimate the queries' need
        sample = server.engine.collections["a"].query_sample
        assert sample is not None and len(sample) == 0
        for i in range(16 * 16):  # every 16th single query is sampled by the serial path
            stubs.search("a", "s", traffic[i : i + 1], 10)
        assert len(sample) == 16
        for _ in range(16 * 8):  # every 16th call, up to 64 of its rows
            stubs.search("a", "s", traffic[rng.choice(len(traffic), 64, replace=False)], 10)
        info = _wait_info(stubs, lambda i: "recent queries)" in i.advisor_status)
        op = info.operating_point
        assert op.tuned_queries == len(sample) >= 500 and op.ef_search > first.ef_search, (op, info.advisor_status)
        assert "< 0.95" not in info.advisor_status and op.recall >= target + advisor_auto.AUTO_MARGIN  # no re-advice
        _, got, _ = stubs.search("a", "s", fresh, 10)
        assert recall_at(got, want) >= target
    finally:
        stubs.channel.close()
        server.stop(None)
    server, port = start_server(data, merge_idle_seconds=0.05)
    stubs = connect(port)
    try:
        time.sleep(0.5)  # a few maintenance passes: nothing to tune (the sample is empty, the point kept)
        again = stubs.info("a")
        assert again.operating_point == op, again
        _, got, _ = stubs.search("a", "s", fresh, 10)
        assert recall_at(got, want) >= target
    finally:
        stubs.channel.close()
        server.stop(None)


def _check_all_there(stubs: Stubs, live: dict[str, np.ndarray], deleted: set[str]) -> None:
    info = stubs.info("a")
    assert info.num_points == len(live) and info.indexed_vectors + info.fresh_vectors == len(live)
    ids = sorted(live)
    for b in range(0, len(ids), 2000):  # every acknowledged id, with its last vector
        got = stubs.points.GetPoints(ppb.GetPointsRequest(collection="a", ids=ids[b : b + 2000], with_vectors=True))
        for p in got.points:
            v = np.frombuffer(p.vectors[0].vector.data, "<f4")
            want = live[p.id] / np.linalg.norm(live[p.id])
            np.testing.assert_allclose(v, want, rtol=1e-5, atol=1e-6)
    gone = sorted(deleted)[:500]
    if gone:
        req = ppb.GetPointsRequest(collection="a", ids=gone)
        assert _code(lambda: stubs.points.GetPoints(req))[0] == NOT_FOUND
    xb = np.stack([live[i] for i in ids])
    xq = xb[:: max(1, len(ids) // 300)]
    _, Iref = brute_force(xb, xq, 10, "cosine")
    _, got, _ = stubs.search("a", "s", xq, 10)
    assert recall_at(got, np.array(ids, dtype=object)[Iref]) >= 0.85
    assert not set(got.ravel()) & deleted


def test_cli_recommend_and_create_auto(
    stubs: Stubs, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INTERLINGUA_API_KEY", raising=False)
    stubs.register("s", D)
    stubs.create("c", "s")
    _fill(stubs, "c", make_data(2000, D, seed=17))
    code = main(["collections", "recommend", "c", "--recall", "0.9", "-k", "5", "--candidates", "HNSW16", "Flat",
                 "--target", stubs.target])  # fmt: skip
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["INDEX", "SPEC", "PARAMS"] and "RECALL@5" in lines[0]
    assert lines[-1].startswith("chosen for Recall@5 >= 0.9: ") and "held-out stored vectors" in lines[-1]
    assert sum(line.startswith("*") for line in lines) == 1
    code = main(["collections", "recommend", "c", "--recall", "0.9", "--json", "--target", stubs.target])
    rec = json.loads(capsys.readouterr().out)
    assert code == 0 and rec["chosen"]["recall"] >= 0.9 and rec["k"] == 10 and rec["frontier"]
    code = main(["collections", "recommend", "c", "--recall", "2", "--target", stubs.target])
    assert code == 1 and "INVALID_ARGUMENT" in capsys.readouterr().err
    code = main(["collections", "create", "a", "--home-space", "s", "--index", "auto", "--recall", "0.95", "--json",
                 "--target", stubs.target])  # fmt: skip
    info = json.loads(capsys.readouterr().out)
    assert code == 0 and (info["index_spec"], info["target_recall"], info["operating_point"]) == ("auto", 0.95, None)
