"""Searches concurrent with upserts, overwrites, deletes and background merges.

Searches read one immutable snapshot and never wait on writers or merges
(``segments.py``); every write is applied to the next snapshot before it is
acknowledged (``collection.py``). So, under load: no RPC fails, a search issued
after an upsert's ack finds the upserted vector (read-your-writes), an
overwritten vector's old label and a deleted id never come back once acked, and
no result row holds an id twice. Four search threads, two upsert threads and one
delete thread run for about three seconds against a Flat and an HNSW32
collection, with a merge (and checkpoint) forced every 128 writes; the final state is then
compared with the numpy brute-force reference.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import Stubs, brute_force, connect, make_data, start_server

from interlingua.v1 import points_pb2 as ppb

D_DIM = 32
K = 10
RUN_SECONDS = 3.0
SELF_SCORE = 1 - 1e-4  # cosine score of a vector with itself, in float32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class Shared:
    """State the threads share: acknowledged writes and the failures seen."""

    def __init__(self, seed_ids: list[str], seed_x: np.ndarray) -> None:
        self.lock = threading.Lock()
        self.live: dict[str, np.ndarray] = dict(zip(seed_ids, seed_x, strict=True))  # id -> last acked vector
        self.deleted: list[str] = []  # append-only, each id added after its delete was acked
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.rw_hits = self.rw_checks = self.searches = 0

    def fail(self, message: str) -> None:
        with self.lock:
            self.errors.append(message)

    def run(self, name: str, body: Callable[[], None]) -> threading.Thread:
        def loop() -> None:
            try:
                while not self.stop.is_set():
                    body()
            except BaseException:
                self.fail(f"{name}: {traceback.format_exc()}")
                self.stop.set()

        t = threading.Thread(target=loop, name=name)
        t.start()
        return t


def check_rows(shared: Shared, I: np.ndarray, D: np.ndarray, deleted_before: set[str], what: str) -> None:
    """Every row: no id twice, scores descending, no id deleted before the search was issued."""
    for i in range(len(I)):
        row = [p for p in I[i] if p]
        if len(set(row)) != len(row):
            shared.fail(f"{what}: an id appears twice in one row: {row}")
        if not (np.diff(D[i, : len(row)]) <= 1e-6).all():
            shared.fail(f"{what}: scores are not in descending order: {D[i]}")
        if back := set(row) & deleted_before:
            shared.fail(f"{what}: deleted ids came back: {sorted(back)}")


@pytest.mark.parametrize("spec", ["Flat", "HNSW32"])
def test_searches_concurrent_with_writes_see_no_errors(tmp_path: Path, spec: str) -> None:
    srv, port = start_server(tmp_path / "data", merge_min_fresh=128, merge_fraction=0.0, merge_idle_seconds=0.05)
    stubs = connect(port)  # one channel shared by every thread, as clients do
    try:
        stubs.register("s", D_DIM)
        stubs.create("c", "s", spec)
        seed_x = make_data(3000, D_DIM, seed=70)
        seed_ids = [f"seed-{i}" for i in range(len(seed_x))]
        for i in range(0, len(seed_ids), 1000):
            stubs.upsert("c", "s", seed_ids[i : i + 1000], seed_x[i : i + 1000])
        shared = Shared(seed_ids, seed_x)
        threads = [shared.run(f"search-{t}", searcher(stubs, shared, spec, seed=100 + t)) for t in range(4)]
        threads += [shared.run(f"upsert-{t}", upserter(stubs, shared, spec, t, seed=200 + t)) for t in range(2)]
        threads.append(shared.run("delete", deleter(stubs, shared, seed_ids, seed_x, seed=300)))
        time.sleep(RUN_SECONDS)
        shared.stop.set()
        for t in threads:
            t.join(60)
            assert not t.is_alive(), f"{t.name} hangs"
        assert not shared.errors, "\n".join(shared.errors[:10])
        assert shared.searches >= 50 and shared.rw_checks >= 20 and len(shared.deleted) >= 50, (
            shared.searches,
            shared.rw_checks,
            len(shared.deleted),
        )
        # read-your-writes: exact in Flat; HNSW finds a just-merged vector almost always
        assert shared.rw_hits == shared.rw_checks if spec == "Flat" else shared.rw_hits >= 0.95 * shared.rw_checks
        check_final_state(stubs, shared, spec)
    finally:
        stubs.channel.close()
        srv.stop(None)


def searcher(stubs: Stubs, shared: Shared, spec: str, seed: int) -> Callable[[], None]:
    rng = np.random.default_rng(seed)

    def body() -> None:
        with shared.lock:
            deleted_before = set(shared.deleted)  # acked before this search is issued
        xq = rng.standard_normal((8, D_DIM)).astype(np.float32)
        D, I, _ = stubs.search("c", "s", xq, K, **({"ef_search": int(rng.integers(16, 128))} if "HNSW" in spec else {}))
        if (I == "").any():
            shared.fail(f"search padded a result over a collection of thousands of points: {I}")
        check_rows(shared, I, D, deleted_before, "search")
        with shared.lock:
            shared.searches += 1

    return body


def upserter(stubs: Stubs, shared: Shared, spec: str, t: int, seed: int) -> Callable[[], None]:
    """Upserts new ids (and overwrites some of its own), then searches for what it wrote."""
    rng = np.random.default_rng(seed)
    mine: list[str] = []
    counter = iter(range(10**9))

    def body() -> None:
        overwrite = len(mine) >= 16 and rng.random() < 0.3
        ids = (
            [str(p) for p in rng.choice(mine, 8, replace=False)]
            if overwrite
            else [f"u{t}-{next(counter)}" for _ in range(16)]
        )
        with shared.lock:
            old = np.stack([shared.live[p] for p in ids]) if overwrite else None
        x = rng.standard_normal((len(ids), D_DIM)).astype(np.float32)
        stubs.upsert("c", "s", ids, x)
        with shared.lock:
            shared.live.update(zip(ids, x, strict=True))
        if not overwrite:
            mine.extend(ids)
        # read-your-writes: each vector just written is its own nearest neighbour
        D, I, _ = stubs.search("c", "s", x, 2)
        hits = (I[:, 0] == np.array(ids, dtype=object)) & (D[:, 0] >= SELF_SCORE)
        if spec == "Flat" and not hits.all():
            shared.fail(f"read-your-writes: {ids} -> {I[:, 0]} {D[:, 0]}")
        with shared.lock:
            shared.rw_checks += len(ids)
            shared.rw_hits += int(hits.sum())
        if old is not None:  # the overwritten vectors are gone: their ids never score ~1 on them
            D, I, _ = stubs.search("c", "s", old, 5)
            for i, pid in enumerate(ids):
                if (D[i][I[i] == pid] >= SELF_SCORE).any():
                    shared.fail(f"the old vector of {pid!r} is still found after its overwrite was acked")

    return body


def deleter(stubs: Stubs, shared: Shared, seed_ids: list[str], seed_x: np.ndarray, seed: int) -> Callable[[], None]:
    """Deletes seed points in small batches; after each ack, searches for them: they are gone."""
    order = iter(np.random.default_rng(seed).permutation(len(seed_ids))[:2000].reshape(-1, 4))

    def body() -> None:
        rows = next(order, None)
        if rows is None:
            time.sleep(0.01)
            return
        ids = [seed_ids[i] for i in rows]
        r = stubs.points.DeletePoints(ppb.DeletePointsRequest(collection="c", ids=ids))
        if r.deleted != len(ids):
            shared.fail(f"deleted {r.deleted} of {ids}")
        with shared.lock:
            for pid in ids:
                del shared.live[pid]
            shared.deleted.extend(ids)
        D, I, _ = stubs.search("c", "s", seed_x[rows], K)
        check_rows(shared, I, D, set(ids), "search after delete")
        time.sleep(0.002)

    return body


def check_final_state(stubs: Stubs, shared: Shared, spec: str) -> None:
    """Once quiet: the counts, every live vector, and search against brute force."""
    ids = list(shared.live)
    xb = np.stack(list(shared.live.values()))
    info = stubs.info("c")
    assert info.num_points == len(ids) and dict(info.vectors_per_space) == {"s": len(ids)}
    r = stubs.points.GetPoints(ppb.GetPointsRequest(collection="c", ids=ids, with_vectors=True))
    got = np.frombuffer(b"".join(p.vectors[0].vector.data for p in r.points), dtype="<f4").reshape(-1, D_DIM)
    np.testing.assert_allclose(got, unit(xb), rtol=1e-6, atol=1e-6)
    xq = make_data(100, D_DIM, seed=71)
    Dref, Iref = brute_force(xb, xq, K)
    D, I, _ = stubs.search("c", "s", xq, K)
    expected = np.array(ids, dtype=object)[Iref]
    if spec == "Flat":
        np.testing.assert_allclose(D, Dref, rtol=1e-5, atol=1e-5)
        assert (expected == I).mean() >= 0.99  # ids differ only at (rare) ties
    else:
        recall = np.mean([len(set(I[i]) & set(expected[i])) / K for i in range(len(xq))])
        assert recall >= 0.95, recall
    for pid in shared.deleted[:20]:
        with pytest.raises(grpc.RpcError) as e:
            stubs.points.GetPoints(ppb.GetPointsRequest(collection="c", ids=[pid]))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
