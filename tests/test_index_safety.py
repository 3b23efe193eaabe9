"""No index spec or training failure can crash the server or block its restart.

Specs are checked by our grammar (``server/index_spec.py``) before FAISS sees them: the ones
that crashed FAISS (HNSW M of 0 or 1, also inside ``IVFn_HNSWm`` and ``HNSWm_PQ``), untrainable
PQ/IVF parameters, NSG and oversized IVFs answer INVALID_ARGUMENT and create nothing; every
form the grammar accepts (fast-scan PQ and refine stages, which the index advisor recommends,
included) is built, trained at its minimum, merged, searched past its size and with dead labels
in a subprocess (a FAISS abort there fails the test instead of killing pytest). A collection whose index cannot
be built is marked failed: its searches answer FAILED_PRECONDITION with the reason, the rest
serves, the build is retried with a back-off; a restart with a collection an earlier version
accepted (``HNSW1``, ``train_min_points`` below what PQ needs) reaches SERVING.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import Stubs, brute_force, child_server, connect, make_data, start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc

from interlingua.server.collection import Collection
from interlingua.server.errors import InvalidArgument
from interlingua.server.index_spec import IndexSpec
from interlingua.server.segments import Segments
from interlingua.v1 import collections_pb2 as cpb
from interlingua.v1 import common_pb2 as pb

D = 16
INVALID = grpc.StatusCode.INVALID_ARGUMENT
FAILED = grpc.StatusCode.FAILED_PRECONDITION

# -- the grammar -------------------------------------------------------------------------------

PRE = ["", "PCA4,", "PCAWR4,", "OPQ2_4,", "RR8,"]
MAIN = [
    "Flat",
    "HNSW2",
    "HNSW256",
    "HNSW2_PQ2",
    "HNSW2_SQ8",
    "HNSW2,PQ4x4",
    "IVF1,Flat",
    "IVF2_HNSW2,Flat",
    "IVF4,PQ2x4",
    "IVF2,PQ4x8",
    "IVF2,SQ4",
    "IVF2,SQfp16",
    "PQ1x8",
    "PQ4x4",
    "SQ6",
    "HNSW2,Flat",
    "HNSW2_SQfp16",
    "IVF4_HNSW2,PQ2x4",
    "IVF3,SQ8",
    "SQ4",
    "SQfp16",
    # fast-scan PQ and refine stages (what the index advisor recommends)
    "PQ2x4fs",
    "PQ1x4fs",
    "IVF4,PQ2x4fs",
    "IVF2,PQ1x4fs,RFlat",
    "IVF4_HNSW2,PQ4x4fs,Refine(SQ8)",
    "HNSW2_SQ8,RFlat",
    "HNSW2,Refine(SQfp16)",
    "IVF1,Flat,Refine(Flat)",
    "PQ4x4,RFlat",
    "PQ2x4fs,Refine(SQ8)",
    "SQ8,RFlat",
    "Flat,RFlat",
]

_BUILD_ALL = """
import sys, faiss, numpy as np
from interlingua.server.index_spec import IndexSpec
from interlingua.server.segments import Segments
d = 8
for metric, same in (("l2", False), ("ip", False), ("l2", True)):
    for spec in sys.argv[1:]:
        print(spec, metric, "same" if same else "random", flush=True)  # names the spec if FAISS aborts on it
        s = IndexSpec.parse(spec, d, metric)
        rng = np.random.default_rng(0)
        n = max(s.min_train_points, 1)
        xb = rng.standard_normal((n + 20, d)).astype("float32")
        if same:  # degenerate data: one vector repeated
            xb[:] = xb[0]
        seg = Segments(s, n)  # the server's own path: merge, merge again, kill, search
        seg.append(0, [str(i) for i in range(n)], xb[:n], [], 1)
        try:
            seg.merge()
        except RuntimeError:
            assert same, spec  # contained: the collection is marked failed
            continue
        seg.append(n, [str(i) for i in range(n, n + 20)], xb[n:], [0, 1], 2)
        seg.merge()
        _, I, _ = seg.search(xb[2:5], 2)
        assert (I[:, 0] >= 2).all(), (spec, I)  # labels 0 and 1 are dead
        _, I, _ = seg.search(xb[2:4], n + 40)  # more than the index holds (a refine stage asks k_factor times more)
        assert I.shape == (2, n + 40) and not np.isin(I, [0, 1]).any(), (spec, I)
        if same:
            continue
        index = s.new_index()
        if s.needs_training:
            index.train(xb[:n])  # exactly the minimum the service allows
        index.add(xb[:10])
        merged = faiss.clone_index(index)  # a merge: clone, add the fresh rows
        merged.add(xb[10:])
        merged.reset()  # a compaction of a trained index: emptied, then refilled
        merged.add(xb)
        back = faiss.deserialize_index(faiss.serialize_index(merged))  # a checkpoint
        D, I = back.search(xb[:3], 5)
        assert I.shape == (3, 5) and (I[:, 0] >= 0).all(), (spec, I)
print("done", flush=True)
"""


@pytest.mark.slow
def test_every_spec_of_the_grammar_builds_without_crashing() -> None:
    """Each main form after each pre-transform, at boundary parameters, on l2 and ip: parsed,
    trained on exactly ``min_train_points`` vectors, added to twice, cloned (merge), emptied and
    refilled (compaction), serialized (checkpoint) and searched, in a subprocess. On degenerate
    data (one vector repeated) the server's merge builds an index that finds it, or raises."""
    specs = [pre + main for pre in PRE for main in MAIN]
    out = subprocess.run(
        [sys.executable, "-c", _BUILD_ALL, *specs], capture_output=True, text=True, timeout=300, check=False
    )
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert out.returncode == 0 and last == "done", f"crashed or failed at {last!r}:\n{out.stderr[-2000:]}"


@pytest.mark.parametrize(
    ("spec", "d", "needle"),
    [
        ("HNSW1", 16, "HNSW M is 1 in HNSW1; it must be between 2 and 256"),
        ("HNSW0", 16, "HNSW M is 0"),
        ("HNSW1,Flat", 16, "HNSW M is 1"),
        ("IVF4_HNSW1,Flat", 16, "HNSW M is 1 in the coarse quantizer of IVF4_HNSW1"),
        ("HNSW1_PQ4", 16, "HNSW M is 1"),
        ("PCA8,HNSW1", 16, "HNSW M is 1"),
        ("HNSW512", 16, "HNSW M is 512"),
        ("NSG2", 16, "NSG indexes are not supported"),
        ("NSG32,Flat", 16, "NSG indexes are not supported"),
        ("IVF4,PQ48", 16, "PQ m=48 must divide the dimension it encodes, 16"),
        ("PQ3", 16, "PQ m=3 must divide"),
        ("PCA8,PQ3", 16, "PQ m=3 must divide the dimension it encodes, 8"),
        ("PQ4x9", 16, "PQ nbits is 9; it must be between 4 and 8"),
        ("IVF4,PQ4x2", 16, "PQ nbits is 2"),
        ("OPQ3,PQ4", 16, "OPQ m=3 must divide its output dimension 16"),
        ("PCA32,Flat", 16, "output dimension 32 must be between 1 and its input dimension 16"),
        ("IVF0,Flat", 16, "IVF needs at least 1 list"),
        ("IVF5000000,Flat", 16, "5000000 IVF lists exceed the cap of 65536"),
        ("IVF65536,Flat", 8192, "MiB for d=8192"),
        ("IVF16", 16, "IVF16 needs a storage after it"),
        ("IVF16,Flat,Flat", 16, "unexpected 'Flat'"),
        ("HNSW32_PQ4,Flat", 16, "already names its storage"),
        ("LSH", 16, "component 'LSH' is not supported"),
        ("L2norm,Flat", 16, "component 'L2norm' is not supported"),
        ("IMI2x4,Flat", 16, "not supported"),
        ("IVF4,PQ4x8fs", 16, "fast-scan PQ needs 4-bit codes (PQ4x4fs)"),
        ("HNSW32_PQ4x4fs", 16, "fast-scan PQ is for IVF lists and flat indexes"),
        ("HNSW32,PQ4x4fs", 16, "fast-scan PQ is for IVF lists and flat indexes"),
        ("IVF4,PQ3x4fs", 16, "PQ m=3 must divide the dimension it encodes, 16"),
        ("PQ5x4fs,RFlat", 16, "PQ m=5 must divide"),
        ("IVF4,Flat,Refine(PQ4)", 16, "refines with 'PQ4'"),
        ("IVF4,Flat,RFlat,RFlat", 16, "may only come last"),
        ("IVF4,RFlat,Flat", 16, "may only come last"),
        ("RFlat,IVF4,Flat", 16, "a refine stage comes last"),
        ("Refine(Flat)", 16, "a refine stage comes last"),
        ("IDMap,Flat", 16, "IDMap wrappers are managed by the service"),
        ("Flat," * 9 + "Flat", 16, "components; the limit is 8"),
    ],
)
def test_unsafe_specs_are_refused(spec: str, d: int, needle: str) -> None:
    with pytest.raises(InvalidArgument, match="index spec") as e:
        IndexSpec.parse(spec, d, "l2", max_nlist=65536, max_overhead_bytes=1 << 30)
    assert needle in e.value.message


def test_fast_scan_and_refine_forms() -> None:
    """What the parsed spec says about the forms the advisor recommends: the refine stage, HNSW
    seen through it, code sizes with the refine copy, flat fast-scan taking no search parameters."""
    s = IndexSpec.parse("HNSW32_SQ8,RFlat", D, "l2")
    assert (s.refine, s.is_hnsw, s.graph_m, s.nlist, s.takes_params) == ("Flat", True, 32, 0, True)
    assert s.bytes_per_vector == D + 4 * D  # SQ8 codes and the refine stage's float32 copy
    assert s.memory_per_vector == 5 * D + 8 * 32 + 12
    s = IndexSpec.parse("IVF64,PQ8x4fs,Refine(SQfp16)", D, "ip")
    assert (s.refine, s.is_hnsw, s.nlist, s.fast_scan, s.takes_params) == ("SQfp16", False, 64, True, True)
    assert s.bytes_per_vector == 4 + 2 * D + 1  # 8 4-bit codes, fp16 copy, a 1-byte list number
    assert s.min_train_points == 64 and s.needs_training
    s = IndexSpec.parse("PQ8x4fs", D, "l2")
    assert (s.fast_scan, s.takes_params, s.min_train_points) == (True, False, 16)
    assert not IndexSpec.parse("PQ8x4fs,RFlat", D, "l2").takes_params  # its base refuses parameters
    assert IndexSpec.parse("PCA8,IVF4,PQ4x4fs,RFlat", D, "l2").bytes_per_vector == 2 + 4 * D + 1


def test_training_minimum_per_quantizer() -> None:
    cases = {
        "IVF64,Flat": 64,
        "IVF4,PQ8": 256,
        "IVF4,PQ8x4": 16,
        "OPQ4,IVF4,PQ4": 256,
        "PCA8,HNSW16": 8,
        "SQ8": 1,
        "IVF4,PQ8x4fs,RFlat": 16,
        "IVF32,PQ8x4fs,Refine(SQ8)": 32,
    }
    for spec, need in cases.items():
        s = IndexSpec.parse(spec, D, "l2")
        assert s.min_train_points == need, spec
        assert s.check_train_min(need) == need
        if need > 1:  # 0 asks for the default
            with pytest.raises(InvalidArgument, match=f"needs at least {need} training points"):
                s.check_train_min(need - 1)
        assert s.check_train_min(0) == s.default_train_min >= need
    assert IndexSpec.parse("HNSW32", D, "l2").check_train_min(5) == 0  # needs no training


# -- through the server ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "train_min", "needle"),
    [
        ("HNSW1", 0, "index spec 'HNSW1': HNSW M is 1"),
        ("HNSW0", 0, "HNSW M is 0"),
        ("IVF4_HNSW1,Flat", 0, "coarse quantizer"),
        ("HNSW1_PQ4", 0, "HNSW M is 1"),
        ("NSG2", 0, "NSG"),
        ("IVF5000000,Flat", 0, "exceed the cap of 65536"),
        ("IVF4,PQ4", 4, "train_min_points is 4; index spec 'IVF4,PQ4' needs at least 256 training points"),
        ("IVF64,Flat", 10, "needs at least 64 training points"),
    ],
)
def test_create_with_a_bad_spec_is_invalid_and_creates_nothing(
    stubs: Stubs, spec: str, train_min: int, needle: str
) -> None:
    stubs.register("s", D)
    with pytest.raises(grpc.RpcError) as e:
        stubs.create("c", "s", spec, train_min)
    assert e.value.code() == INVALID
    assert needle in (e.value.details() or "")
    assert not stubs.collections.ListCollections(cpb.ListCollectionsRequest()).collections


def health(stubs: Stubs) -> int:
    req = health_pb2.HealthCheckRequest(service="")
    return int(health_pb2_grpc.HealthStub(stubs.channel).Check(req, timeout=5).status)


def test_a_failed_build_fails_searches_only_and_backs_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training that raises (as FAISS does) marks the collection failed with the reason instead of
    retrying every 0.1 s; searches answer FAILED_PRECONDITION quoting it, writes and the other
    collections go on, health stays SERVING; new writes bring a retry, which recovers."""
    calls: list[str] = []
    real_trained = Segments._trained

    def failing(self: Segments, s: object, rows: np.ndarray) -> object:
        calls.append(self.name)
        if self.name == "bad":
            raise RuntimeError("Error in train at Clustering.cpp:1: Error: 'n >= k' failed: too few points")
        return real_trained(self, s, rows)  # type: ignore[arg-type]

    monkeypatch.setattr(Segments, "_trained", failing)
    server, port = start_server(tmp_path / "data", merge_idle_seconds=0.05)
    stubs = connect(port)
    try:
        stubs.register("s", D, metric=pb.METRIC_L2)
        stubs.create("bad", "s", "IVF4,Flat", 20)
        stubs.create("good", "s", "IVF4,Flat", 20)
        xb = make_data(40, D, seed=1)
        ids = [str(i) for i in range(40)]
        stubs.upsert("bad", "s", ids, xb)
        stubs.upsert("good", "s", ids, xb)
        deadline = time.monotonic() + 10
        while stubs.info("bad").state != cpb.INDEX_STATE_FAILED:
            assert time.monotonic() < deadline, stubs.info("bad")
            time.sleep(0.01)
        time.sleep(0.7)
        assert calls.count("bad") == 1  # backing off (1 s first), not retried every 0.1 s
        while stubs.info("good").state != cpb.INDEX_STATE_READY:
            assert time.monotonic() < deadline, stubs.info("good")
            time.sleep(0.02)
        info = stubs.info("bad")
        assert "building index 'IVF4,Flat' failed: 'n >= k' failed: too few points" in info.failure_reason
        assert info.failed_at > 0
        with pytest.raises(grpc.RpcError) as e:
            stubs.search("bad", "s", xb[:2], 3)
        assert e.value.code() == FAILED
        assert "collection 'bad' failed: building index 'IVF4,Flat' failed" in (e.value.details() or "")
        _, Ig, _ = stubs.search("good", "s", xb[:5], 3, nprobe=4)
        _, Iref = brute_force(xb, xb[:5], 3, "l2")
        assert (np.vectorize(int)(Ig) == Iref).all()
        assert health(stubs) == health_pb2.HealthCheckResponse.SERVING
        monkeypatch.setattr(Segments, "_trained", real_trained)
        stubs.upsert("bad", "s", ["new"], make_data(1, D, seed=2))  # new data: retried after 1 s
        deadline = time.monotonic() + 10
        while stubs.info("bad").state != cpb.INDEX_STATE_READY:
            assert time.monotonic() < deadline, stubs.info("bad")
            time.sleep(0.05)
        assert stubs.info("bad").failure_reason == ""
        _, Ib, _ = stubs.search("bad", "s", xb[:5], 3, nprobe=4)
        assert (np.vectorize(int)(Ib) == Iref).all()
    finally:
        stubs.channel.close()
        server.stop(None)


def test_a_collection_that_cannot_be_opened_does_not_stop_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any error while one collection recovers marks that one failed; the server reaches SERVING."""
    server, port = start_server(tmp_path / "data")
    stubs = connect(port)
    xb = make_data(30, D, seed=4)
    stubs.register("s", D)
    for name in ("a", "b"):
        stubs.create(name, "s", "Flat")
        stubs.upsert(name, "s", [str(i) for i in range(30)], xb)
    stubs.channel.close()
    server.stop(None)
    real = Collection.recover

    def broken(self: Collection, *args: Any) -> int:
        if self.name == "a" and self.failure is None:
            raise OSError("disk says no")
        return real(self, *args)

    monkeypatch.setattr(Collection, "recover", broken)
    server, port = start_server(tmp_path / "data")
    stubs = connect(port)
    try:
        assert health(stubs) == health_pb2.HealthCheckResponse.SERVING
        info = stubs.info("a")
        assert info.state == cpb.INDEX_STATE_FAILED
        assert info.failure_reason == "cannot be opened: OSError: disk says no"
        assert (info.num_points, info.vectors_per_space["s"]) == (30, 30)
        with pytest.raises(grpc.RpcError) as e:
            stubs.search("a", "s", xb[:1], 1)
        assert e.value.code() == FAILED and "disk says no" in (e.value.details() or "")
        _, I, _ = stubs.search("b", "s", xb[:5], 1)
        assert list(I[:, 0]) == ["0", "1", "2", "3", "4"]
    finally:
        stubs.channel.close()
        server.stop(None)


# -- restarts, in a subprocess -----------------------------------------------------------------


@pytest.mark.slow
def test_restart_with_collections_an_earlier_version_accepted(tmp_path: Path) -> None:
    """A store holding ``HNSW1`` (segfaulted every restart) and ``IVF4,PQ4`` with
    train_min_points=4 and 10 points (training failed: the server exited 1) reaches SERVING:
    the first is failed (searches and writes FAILED_PRECONDITION, delete works), the second trains
    at 256 points instead, and the others serve."""
    data = tmp_path / "data"
    server, port = start_server(data, merge_idle_seconds=0.05)
    stubs = connect(port)
    xb = make_data(50, D, seed=3)
    ids = [str(i) for i in range(50)]
    stubs.register("s", D, metric=pb.METRIC_L2)
    for name, spec, tmin in (("good", "Flat", 0), ("hnsw", "HNSW32", 0), ("pq", "IVF4,PQ4", 256)):
        stubs.create(name, "s", spec, tmin)
        stubs.upsert(name, "s", ids[: 10 if name == "pq" else 50], xb[: 10 if name == "pq" else 50])
    stubs.channel.close()
    server.stop(None)
    with sqlite3.connect(data / "interlingua.db") as con:  # as an earlier version let them in
        con.execute("UPDATE collections SET index_spec='HNSW1' WHERE name='hnsw'")
        con.execute("UPDATE collections SET train_min_points=4 WHERE name='pq'")
    with child_server(tmp_path, data, merge_idle_seconds=0.05) as (proc, stubs):
        time.sleep(0.5)  # the maintenance thread runs: nothing may crash
        assert proc.poll() is None
        info = stubs.info("hnsw")
        assert info.state == cpb.INDEX_STATE_FAILED and info.index_spec == "HNSW1"
        assert "index spec 'HNSW1': HNSW M is 1" in info.failure_reason
        assert info.num_points == 50 and info.vectors_per_space["s"] == 50
        for call in (lambda: stubs.search("hnsw", "s", xb[:1], 3), lambda: stubs.upsert("hnsw", "s", ["x"], xb[:1])):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == FAILED and "HNSW M is 1" in (e.value.details() or "")
        pq = stubs.info("pq")
        assert (pq.state, pq.train_min_points) == (cpb.INDEX_STATE_EXACT, 256)
        _, I, _ = stubs.search("pq", "s", xb[:10], 1)
        assert list(I[:, 0]) == ids[:10]
        _, I, _ = stubs.search("good", "s", xb[:10], 1)
        assert list(I[:, 0]) == ids[:10]
        stubs.collections.DeleteCollection(cpb.DeleteCollectionRequest(name="hnsw"))
        assert proc.poll() is None


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_describing_a_large_ivf_builds_no_index(tmp_path: Path) -> None:
    """``IVF5000000,Flat`` (allowed here by raised caps) cost +780 MB at creation and on every
    GetCollection, which instantiated the index to read its code size; now neither builds one."""
    limits = {"max_nlist": 10_000_000, "max_index_overhead_bytes": 1 << 40}
    with child_server(tmp_path, tmp_path / "data", limits=limits) as (proc, stubs):
        stubs.register("s", D)
        before = _peak_rss_mb(proc.pid)
        info = stubs.create("big", "s", "IVF5000000,Flat", 5_000_000)
        assert info.index_bytes_per_vector == 4 * D + 3  # codes and a 3-byte list number
        for _ in range(5):
            stubs.info("big")
            stubs.collections.ListCollections(cpb.ListCollectionsRequest())
        assert _peak_rss_mb(proc.pid) - before < 100
