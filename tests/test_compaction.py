"""Compaction: dead labels of overwritten and deleted points are reclaimed while serving.

Overwriting the same ids again and again used to grow the sealed index without bound (dead
labels filtered at search time, never removed; a restart kept them). Here a server with a low
compaction threshold takes round after round of overwrites and deletes: its dead labels fall
back under the threshold, its results stay equal to brute force over the latest vectors (exact
indexes by ids and scores, HNSW by recall), writes made while a rebuild runs are neither lost
nor misnumbered, prefix collections rerank with the renumbered vectors, and a restart both
keeps the compacted state and compacts a checkpoint that was left full of dead labels.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Stubs, brute_force, connect, make_data, start_server

from interlingua.server import Server, checkpoint
from interlingua.server.segments import Segments
from interlingua.v1 import collections_pb2 as cpb
from interlingua.v1 import common_pb2 as pb

D = 16
N = 120
MIN_DEAD = 40
FAST = {"merge_idle_seconds": 0.02, "merge_min_fresh": 64, "compact_min_dead": MIN_DEAD}


class Model:
    """The latest vector (as sent) of every live id."""

    def __init__(self) -> None:
        self.x: dict[str, np.ndarray] = {}

    def upsert(self, stubs: Stubs, col: str, ids: list[str], x: np.ndarray) -> None:
        stubs.upsert(col, "s", ids, x)
        self.x.update(zip(ids, x, strict=True))

    def delete(self, stubs: Stubs, col: str, ids: list[str]) -> None:
        from interlingua.v1 import points_pb2 as ppb

        stubs.points.DeletePoints(ppb.DeletePointsRequest(collection=col, ids=ids))
        for pid in ids:
            del self.x[pid]

    def arrays(self) -> tuple[list[str], np.ndarray]:
        ids = sorted(self.x)
        return ids, np.stack([self.x[i] for i in ids])


def churn(stubs: Stubs, model: Model, col: str, rounds: int, seed: int) -> None:
    """``rounds`` overwrites of every id (new vectors), deleting and re-adding a few each round."""
    rng = np.random.default_rng(seed)
    for r in range(rounds):
        ids = [str(i) for i in range(N)]
        model.upsert(stubs, col, ids, make_data(N, D, seed=seed * 1000 + r))
        gone = [str(i) for i in rng.choice(N, 5, replace=False)]
        model.delete(stubs, col, gone)


def settled(info: cpb.CollectionInfo) -> bool:
    """Nothing fresh, and no compaction due: at most MIN_DEAD dead labels, or at most half the sealed ones."""
    return info.fresh_vectors == 0 and info.deleted_labels <= max(MIN_DEAD, info.indexed_vectors)


def wait_compacted(stubs: Stubs, col: str, timeout: float = 20) -> cpb.CollectionInfo:
    """Waits until a compaction ran and the collection is :func:`settled`."""
    deadline = time.monotonic() + timeout
    while True:
        info = stubs.info(col)
        if settled(info) and info.compactions:
            return info
        assert time.monotonic() < deadline, info
        time.sleep(0.05)


def check_exact(stubs: Stubs, model: Model, col: str) -> None:
    ids, xb = model.arrays()
    xq = make_data(20, D, seed=99)
    Dref, Iref = brute_force(xb, xq, 5)
    Dg, got, _ = stubs.search(col, "s", xq, 5)
    assert (got == np.array(ids, dtype=object)[Iref]).all()
    np.testing.assert_allclose(Dg, Dref, rtol=1e-5, atol=1e-5)


def dead_metric(server: Server, col: str) -> float | None:
    return server.engine.metrics.registry.get_sample_value("interlingua_dead_labels", {"collection": col})


def wait_dead_metric(server: Server, col: str, expected: int, timeout: float = 10) -> None:
    """The gauge is published by the maintenance loop, a moment after the swap: wait for it to catch up."""
    deadline = time.monotonic() + timeout
    while dead_metric(server, col) != expected:
        assert time.monotonic() < deadline, (dead_metric(server, col), expected)
        time.sleep(0.05)


def test_overwrites_are_compacted_and_results_stay_exact(tmp_path: Path) -> None:
    server, port = start_server(tmp_path / "data", **FAST)
    stubs = connect(port)
    model, hmodel = Model(), Model()
    try:
        stubs.register("s", D)
        stubs.create("flat", "s", "Flat")
        stubs.create("hnsw", "s", "HNSW16")
        for r in range(4):
            churn(stubs, model, "flat", 3, seed=r + 1)
            churn(stubs, hmodel, "hnsw", 3, seed=r + 1)
            time.sleep(0.1)  # let merges seal each batch, so dead labels land in the sealed index
        info = wait_compacted(stubs, "flat")
        assert info.indexed_vectors == len(model.x) and info.num_points == len(model.x)
        wait_dead_metric(server, "flat", info.deleted_labels)
        sealed = server.engine.collection("flat").segments.snapshot
        assert sealed.nsealed <= 2 * len(model.x) + MIN_DEAD  # 12 rounds x 120 labels were written
        check_exact(stubs, model, "flat")
        wait_compacted(stubs, "hnsw")
        ids, xb = hmodel.arrays()
        xq = make_data(20, D, seed=98)
        _, Iref = brute_force(xb, xq, 10)
        _, got, _ = stubs.search("hnsw", "s", xq, 10, ef_search=64)
        ref = np.array(ids, dtype=object)[Iref]
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, ref, strict=True)]) >= 0.95
    finally:
        stubs.channel.close()
        server.stop(None)
    server, port = start_server(tmp_path / "data", **FAST)  # the compacted checkpoint is consistent
    stubs = connect(port)
    try:
        info = stubs.info("flat")
        assert settled(info) and info.num_points == len(model.x)
        check_exact(stubs, model, "flat")
        stubs.upsert("flat", "s", ["0"], make_data(1, D, seed=7))  # labels continue after the renumbering
        model.x["0"] = make_data(1, D, seed=7)[0]
        check_exact(stubs, model, "flat")
    finally:
        stubs.channel.close()
        server.stop(None)


def test_writes_during_a_rebuild_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rebuild is slowed to 0.3 s while a writer overwrites and deletes: every write is
    searchable as soon as it is acknowledged, and nothing written meanwhile is lost."""
    real = Segments.compacted_index
    rebuilding = threading.Event()

    def slow(self: Segments, s: Any, xb: np.ndarray) -> Any:
        rebuilding.set()
        try:
            time.sleep(0.3)
            return real(self, s, xb)
        finally:
            rebuilding.clear()

    monkeypatch.setattr(Segments, "compacted_index", slow)
    server, port = start_server(tmp_path / "data", **FAST)
    stubs = connect(port)
    model = Model()
    try:
        stubs.register("s", D)
        stubs.create("c", "s", "Flat")
        churn(stubs, model, "c", 2, seed=1)
        rng = np.random.default_rng(5)
        deadline = time.monotonic() + 15
        writes_while_rebuilding = 0
        while time.monotonic() < deadline and (writes_while_rebuilding < 30 or not stubs.info("c").compactions):
            pid = str(rng.integers(N))
            x = make_data(1, D, seed=int(rng.integers(1 << 30)))
            if rebuilding.is_set():
                writes_while_rebuilding += 1
            model.upsert(stubs, "c", [pid], x)
            _, got, _ = stubs.search("c", "s", x, 1)  # read-your-writes, across the swap
            assert got[0, 0] == pid
            if rng.random() < 0.2 and len(model.x) > 10:
                model.delete(stubs, "c", [sorted(model.x)[int(rng.integers(len(model.x)))]])
        assert writes_while_rebuilding >= 30 and stubs.info("c").compactions >= 1
        monkeypatch.setattr(Segments, "compacted_index", real)
        wait_compacted(stubs, "c")
        check_exact(stubs, model, "c")
    finally:
        stubs.channel.close()
        server.stop(None)


def test_prefix_collection_reranks_with_renumbered_vectors(tmp_path: Path) -> None:
    server, port = start_server(tmp_path / "data", **FAST)
    stubs = connect(port)
    model = Model()
    try:
        stubs.register("s", D)
        stubs.collections.CreateCollection(
            cpb.CreateCollectionRequest(name="p", home_space="s", index_spec="Flat", prefix_dims=8)
        )
        for r in range(4):
            churn(stubs, model, "p", 3, seed=r + 10)
            time.sleep(0.1)
        model.delete(stubs, "p", [pid for pid in sorted(model.x) if int(pid) >= 100])
        wait_compacted(stubs, "p")
        ids, xb = model.arrays()  # the default shortlist (100) covers every live point: exact
        xq = make_data(10, D, seed=97)
        Dref, Iref = brute_force(xb, xq, 5)
        Dg, got, _ = stubs.search("p", "s", xq, 5)
        assert (got == np.array(ids, dtype=object)[Iref]).all()
        np.testing.assert_allclose(Dg, Dref, rtol=1e-5, atol=1e-5)
    finally:
        stubs.channel.close()
        server.stop(None)


@pytest.mark.slow
def test_restart_compacts_a_checkpoint_full_of_dead_labels(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server, port = start_server(data, **{**FAST, "compact_min_dead": 1 << 30})  # no compaction
    stubs = connect(port)
    model = Model()
    try:
        stubs.register("s", D, metric=pb.METRIC_L2)
        stubs.create("c", "s", "Flat")
        for r in range(3):
            churn(stubs, model, "c", 2, seed=r + 20)
            time.sleep(0.1)
        deadline = time.monotonic() + 10
        while stubs.info("c").fresh_vectors:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert stubs.info("c").deleted_labels > 4 * MIN_DEAD and stubs.info("c").compactions == 0
    finally:
        stubs.channel.close()
        server.stop(None)
    server, port = start_server(data, **FAST)
    stubs = connect(port)
    try:
        info = stubs.info("c")  # compacted before SERVING
        assert info.compactions == 1 and settled(info), info
        ids, xb = model.arrays()
        xq = make_data(20, D, seed=96)
        Dref, Iref = brute_force(xb, xq, 5, "l2")
        Dg, got, _ = stubs.search("c", "s", xq, 5)
        assert (got == np.array(ids, dtype=object)[Iref]).all()
        np.testing.assert_allclose(Dg, Dref, rtol=1e-4, atol=1e-4)
    finally:
        stubs.channel.close()
        server.stop(None)


def test_a_merge_leaves_dead_fresh_rows_out(tmp_path: Path) -> None:
    """Ten overwrites of the same ids before a merge: only the live rows enter the sealed index
    (they all did, and an HNSW merge spent its time linking rows already dead)."""
    server, port = start_server(tmp_path / "data", merge_idle_seconds=0.3, compact_min_dead=1 << 30)
    stubs = connect(port)
    model = Model()
    try:
        stubs.register("s", D)
        stubs.create("h", "s", "HNSW16")
        ids = [str(i) for i in range(100)]
        for r in range(10):
            model.upsert(stubs, "h", ids, make_data(100, D, seed=50 + r))
        deadline = time.monotonic() + 10
        while stubs.info("h").fresh_vectors:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        info = stubs.info("h")
        assert (info.indexed_vectors, info.deleted_labels, info.compactions) == (100, 0, 0)
        assert server.engine.collection("h").segments.snapshot.nsealed == 100
        _, got, _ = stubs.search("h", "s", model.arrays()[1], 1, ef_search=64)
        assert (got[:, 0] == np.array(model.arrays()[0], dtype=object)).mean() >= 0.99
    finally:
        stubs.channel.close()
        server.stop(None)
    server, port = start_server(tmp_path / "data")
    stubs = connect(port)
    try:  # the checkpoint and the renumbered store agree
        info = stubs.info("h")
        assert (info.indexed_vectors, info.deleted_labels, info.num_points) == (100, 0, 100)
        _, got, _ = stubs.search("h", "s", model.arrays()[1], 1, ef_search=64)
        assert (got[:, 0] == np.array(model.arrays()[0], dtype=object)).mean() >= 0.99
    finally:
        stubs.channel.close()
        server.stop(None)


def test_no_checkpoint_pairs_with_the_new_numbering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compaction deletes the checkpoint before it renumbers the store: when the new one is never
    written (a crash, here a failing save), the restart rebuilds from the store, exactly."""
    data = tmp_path / "data"
    server, port = start_server(data, **FAST)
    stubs = connect(port)
    model = Model()
    try:
        stubs.register("s", D)
        stubs.create("c", "s", "Flat")
        churn(stubs, model, "c", 1, seed=30)
        deadline = time.monotonic() + 10
        while not stubs.info("c").checkpoint_sequence:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (ckpt,) = (data / "collections").glob("*/index.ckpt")

        def no_save(*args: object, **kw: object) -> int:
            raise OSError("disk full")

        monkeypatch.setattr(checkpoint, "save", no_save)
        for r in range(3):
            churn(stubs, model, "c", 2, seed=31 + r)
            time.sleep(0.1)
        while ckpt.exists() or stubs.info("c").fresh_vectors:
            assert time.monotonic() < deadline, stubs.info("c")
            time.sleep(0.05)
        check_exact(stubs, model, "c")
    finally:
        stubs.channel.close()
        server.stop(None)
    monkeypatch.undo()
    assert not ckpt.exists()
    server, port = start_server(data, **FAST)
    stubs = connect(port)
    try:
        assert stubs.info("c").num_points == len(model.x)
        check_exact(stubs, model, "c")
    finally:
        stubs.channel.close()
        server.stop(None)
