"""Durability: what survives a restart, a ``kill -9``, a damaged checkpoint, and what health says meanwhile.

Every acknowledged write is in the SQLite store (WAL, synchronous=FULL) before its
reply leaves; index checkpoints are only a cache of the store. These tests check
that from the outside, through a real server on port 0: a clean restart keeps
every point of Flat, HNSW and IVF collections; a server subprocess killed with
SIGKILL in the middle of a stream of upserts, or in the middle of a merge and
checkpoint, comes back with every acknowledged vector; a truncated, bit-flipped
or missing checkpoint is rebuilt from the store, never served; writes newer than
the checkpoint are replayed (``interlingua_recovery_replayed_total``); and the
health service says NOT_SERVING while the engine loads (API calls: UNAVAILABLE).
Search results are compared with the numpy brute-force reference: exact indexes
by ids and scores, HNSW by recall.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest
from conftest import Stubs, brute_force, child_server, connect, make_data, recall_at, start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc

from interlingua.server import ServerConfig, checkpoint, create_server
from interlingua.server.collection import Collection
from interlingua.server.engine import Lifecycle
from interlingua.v1 import collections_pb2 as cpb
from interlingua.v1 import common_pb2 as pb
from interlingua.v1 import points_pb2 as ppb
from interlingua.v1 import spaces_pb2 as spb

T = TypeVar("T")
METRICS = {"cosine": pb.METRIC_COSINE, "ip": pb.METRIC_IP, "l2": pb.METRIC_L2}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
POINT_SERVICE = "interlingua.v1.PointService"
REPLAYED = "interlingua_recovery_replayed_total"


# -- helpers -----------------------------------------------------------------------------------


def wait_until(fn: Callable[[], T | None], timeout: float, what: str) -> T:
    """Polls ``fn`` until it returns something truthy; fails naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.02)


def as_stored(x: np.ndarray, metric: str) -> np.ndarray:
    """The float32 vectors the server stores for one upsert batch x (n, d): cosine rows are
    L2-normalized as ``validate.normalize_rows`` does, other metrics keep the bytes as sent."""
    x = np.ascontiguousarray(x, dtype="<f4")
    if metric != "cosine":
        return x
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


class Model:
    """What one collection must hold: point id -> home vector as sent, and the ids deleted."""

    def __init__(self, stubs: Stubs, col: str, space: str, metric: str) -> None:
        self.stubs, self.col, self.space, self.metric = stubs, col, space, metric
        self.sent: dict[str, np.ndarray] = {}  # id -> vector as sent (the reference searches these)
        self.stored: dict[str, np.ndarray] = {}  # id -> vector the store must return
        self.deleted: set[str] = set()

    def upsert(self, ids: list[str], x: np.ndarray, batch: int = 1000) -> None:
        for i in range(0, len(ids), batch):
            xi = x[i : i + batch]
            self.stubs.upsert(self.col, self.space, ids[i : i + batch], xi)
            for pid, v, s in zip(ids[i : i + batch], xi, as_stored(xi, self.metric), strict=True):
                self.sent[pid], self.stored[pid] = v, s
                self.deleted.discard(pid)

    def delete(self, ids: list[str]) -> None:
        r = self.stubs.points.DeletePoints(ppb.DeletePointsRequest(collection=self.col, ids=ids))
        assert r.deleted == len(ids)
        for pid in ids:
            del self.sent[pid], self.stored[pid]
            self.deleted.add(pid)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """ids (n,) object array and xb (n, d) float32 of the live points."""
        return np.array(list(self.sent), dtype=object), np.stack(list(self.sent.values()))


def assert_exact_knn(D: np.ndarray, I: np.ndarray, Dref: np.ndarray, Iref: np.ndarray) -> None:
    """Exact-search results equal the reference: scores within rtol 1e-5, ids equal except where
    the reference has a tie at that rank. Dref, Iref (ids) have k+1 columns, D, I have k."""
    k = D.shape[1]
    np.testing.assert_allclose(D, Dref[:, :k], rtol=1e-5, atol=1e-5)
    for i, j in zip(*np.nonzero(Iref[:, :k] != I), strict=True):
        neighbours = [Dref[i, jj] for jj in (j - 1, j + 1) if jj >= 0]
        tol = 1e-5 * max(1.0, abs(float(Dref[i, j])))
        assert any(abs(Dref[i, j] - s) <= tol for s in neighbours), (
            f"query {i} rank {j}: got {I[i, j]!r} ({D[i, j]}), expected {Iref[i, j]!r} ({Dref[i, j]})"
        )


def check_search(model: Model, spec: str, xq: np.ndarray, k: int = 10) -> None:
    """Searches the collection and compares with brute force over the model's live points."""
    ids, xb = model.arrays()
    Dref, Iref = brute_force(xb, xq, k + 1, model.metric)
    D, I, _ = model.stubs.search(model.col, model.space, xq, k)
    assert not set(I.ravel()) & model.deleted, "a deleted id came back"
    if spec.startswith("HNSW"):
        recall = recall_at(I, ids[Iref])
        assert recall >= 0.95, (
            f"HNSW recall@{k} is {recall:.3f} at the default efSearch ({model.metric} space): the index rebuilt at"
            " start-up is degraded (Segments.restore leaves deleted labels as zero vectors that merge() adds)"
        )
    else:  # Flat, and IVF at nprobe = nlist (the default when nlist <= 16): exhaustive
        assert_exact_knn(D, I, Dref, ids[Iref])


def check_points(model: Model) -> None:
    """GetPoints of every live id returns exactly the stored vector; deleted ids are NOT_FOUND."""
    ids = list(model.stored)
    r = model.stubs.points.GetPoints(ppb.GetPointsRequest(collection=model.col, ids=ids, with_vectors=True))
    assert [p.id for p in r.points] == ids
    for p in r.points:
        (v,) = [sv for sv in p.vectors if sv.space == model.space]
        assert v.vector.data == model.stored[p.id].tobytes(), f"vector of {p.id!r} changed"
    for pid in sorted(model.deleted)[:50]:
        with pytest.raises(grpc.RpcError) as e:
            model.stubs.points.GetPoints(ppb.GetPointsRequest(collection=model.col, ids=[pid]))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def health(channel: grpc.Channel, service: str = "") -> int:
    return int(
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
    )


def ckpt_files(data_dir: Path, pattern: str = "index.ckpt") -> list[Path]:
    return sorted((data_dir / "collections").glob(f"*/{pattern}"))


# -- a clean restart ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["Flat", "HNSW32", "IVF16,Flat"])
def test_restart_keeps_every_point(tmp_path: Path, spec: str) -> None:
    d, nb, k = 32, 3000, 10
    data = tmp_path / "data"
    srv, port = start_server(data)
    stubs = connect(port)
    stubs.register("aux", 8, pb.METRIC_IP)
    models = {}
    for metric, seed in (("cosine", 10), ("l2", 20)):
        stubs.register(metric, d, METRICS[metric])
        stubs.create(f"c-{metric}", metric, spec)
        m = models[metric] = Model(stubs, f"c-{metric}", metric, metric)
        ids = [f"{metric}-{i}" for i in range(nb)]
        m.upsert(ids, make_data(nb, d, seed=seed), batch=500)
        m.delete(ids[100:400])  # deletes
        m.upsert(ids[1000:1300], make_data(300, d, seed=seed + 1))  # overwrites
        stubs.upsert(m.col, "aux", ids[2000:2100], make_data(100, 8, seed=seed + 2))  # a second space
        m.upsert([f"{metric}-new-{i}" for i in range(200)], make_data(200, d, seed=seed + 3))  # fresh at stop
    before = {metric: stubs.info(m.col) for metric, m in models.items()}
    stubs.channel.close()
    srv.stop(None)

    srv, port = start_server(data)
    try:
        stubs = connect(port)
        assert srv.metrics.registry.get_sample_value(REPLAYED) == 0  # a clean stop checkpointed everything
        xq = make_data(100, d, seed=99)
        for metric, m in models.items():
            m.stubs = stubs
            info = stubs.info(m.col)
            assert info.num_points == len(m.sent) == nb - 300 + 200
            assert dict(info.vectors_per_space) == {metric: len(m.sent), "aux": 100}
            assert info.last_sequence == before[metric].last_sequence
            assert info.state == cpb.INDEX_STATE_READY
            assert (info.indexed_vectors, info.fresh_vectors) == (len(m.sent), 0)
            assert 0 < info.checkpoint_sequence <= info.last_sequence
            check_points(m)
            check_search(m, spec, xq, k)
            # every live vector finds itself (deleted and overwritten ones never come back)
            ids, xb = m.arrays()
            _, I, _ = stubs.search(m.col, metric, xb[::7], 1)
            hit = I[:, 0] == ids[::7]
            assert hit.all() if spec != "HNSW32" else hit.mean() >= 0.98
        stubs.channel.close()
    finally:
        srv.stop(None)


# -- kill -9 -----------------------------------------------------------------------------------


def _serving(channel: grpc.Channel) -> bool:
    try:
        return health(channel) == SERVING
    except grpc.RpcError:
        return False


def sigkill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_mid_stream_keeps_every_acknowledged_upsert(tmp_path: Path) -> None:
    d, batch = 32, 64
    data = tmp_path / "data"
    acked: list[tuple[list[str], np.ndarray]] = []
    failures: list[BaseException] = []
    # frequent merges and checkpoints, so the kill may land in one of them too
    with child_server(tmp_path, data, merge_min_fresh=256, merge_idle_seconds=0.05) as (proc, stubs):
        stubs.register("raw", d, pb.METRIC_L2)  # l2: stored exactly as sent
        stubs.create("c", "raw", "Flat")

        def writer() -> None:
            rng = np.random.default_rng(7)
            for b in range(10**6):
                ids = [f"p{b}-{j}" for j in range(batch)]
                x = rng.standard_normal((batch, d)).astype(np.float32)
                try:
                    stubs.points.Upsert(
                        ppb.UpsertRequest(
                            collection="c", space="raw", ids=ids, vectors=pb.Vectors(data=x.tobytes(), dim=d)
                        ),
                        timeout=30,
                    )
                except BaseException as e:  # the kill: the in-flight batch is not acknowledged
                    failures.append(e)
                    return
                acked.append((ids, x))

        t = threading.Thread(target=writer)
        t.start()
        time.sleep(1.5)
        assert t.is_alive() and not failures, failures
        sigkill(proc)
        t.join(30)
    assert len(failures) == 1 and isinstance(failures[0], grpc.RpcError), failures
    assert failures[0].code() == grpc.StatusCode.UNAVAILABLE
    assert len(acked) >= 10, "too few upserts were acknowledged before the kill"
    ids = [pid for b, _ in acked for pid in b]
    xb = np.concatenate([x for _, x in acked])

    srv, port = start_server(data)
    try:
        stubs = connect(port)
        n = stubs.info("c").num_points
        assert n in (len(ids), len(ids) + batch), "acknowledged points lost, or a torn batch"  # + the in-flight one
        got = b"".join(
            p.vectors[0].vector.data
            for i in range(0, len(ids), 10000)
            for p in stubs.points.GetPoints(
                ppb.GetPointsRequest(collection="c", ids=ids[i : i + 10000], with_vectors=True)
            ).points
        )
        assert got == xb.tobytes(), "an acknowledged vector changed"
        sample = np.random.default_rng(8).choice(len(ids), 200, replace=False)
        D, I, _ = stubs.search("c", "raw", xb[sample], 1)
        assert (I[:, 0] == np.array(ids, dtype=object)[sample]).all()
        np.testing.assert_allclose(D[:, 0], 0, atol=1e-3)
        stubs.channel.close()
    finally:
        srv.stop(None)


@pytest.mark.slow
def test_sigkill_during_merge_and_checkpoint_recovers(tmp_path: Path) -> None:
    d, nb, k = 32, 20000, 10
    data = tmp_path / "data"
    xb = make_data(nb, d, seed=30)
    ids = np.array([f"d{i}" for i in range(nb)], dtype=object)
    with child_server(tmp_path, data) as (proc, stubs):
        stubs.register("s", d)
        for spec in ("HNSW32", "Flat"):
            stubs.create(spec.lower(), "s", spec)
        for i in range(0, nb, 2000):
            for col in ("hnsw32", "flat"):
                stubs.upsert(col, "s", list(ids[i : i + 2000]), xb[i : i + 2000])
        # the HNSW merges lag the writes by seconds: kill as a checkpoint is being written, or soon
        deadline = time.monotonic() + 1.0
        while not ckpt_files(data, "index.ckpt.tmp") and time.monotonic() < deadline:
            time.sleep(0.0005)
        sigkill(proc)

    srv, port = start_server(data)
    try:
        stubs = connect(port)
        xq = make_data(200, d, seed=31)
        Dref, Iref = brute_force(xb, xq, k + 1)
        for spec in ("HNSW32", "Flat"):
            col = spec.lower()
            info = stubs.info(col)
            assert info.num_points == nb and info.state == cpb.INDEX_STATE_READY
            assert info.indexed_vectors + info.fresh_vectors == nb
            r = stubs.points.GetPoints(ppb.GetPointsRequest(collection=col, ids=list(ids), with_vectors=True))
            assert b"".join(p.vectors[0].vector.data for p in r.points) == as_stored(xb, "cosine").tobytes()
            D, I, _ = stubs.search(col, "s", xq, k)
            if spec == "Flat":
                assert_exact_knn(D, I, Dref, ids[Iref])
            else:
                assert recall_at(I, ids[Iref]) >= 0.95
        # every point went back into an index, from the checkpoint or replayed from the store
        replayed = srv.metrics.registry.get_sample_value(REPLAYED)
        assert replayed is not None and 0 <= replayed <= 2 * nb
        stubs.channel.close()
    finally:
        srv.stop(None)


# -- damaged checkpoints -----------------------------------------------------------------------


def _truncate(path: Path) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])


def _flip(path: Path) -> None:
    """Flips an exponent bit of the last float of the last vector (the end of the FAISS codes)."""
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x40
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize(
    ("damage", "spec", "metric"),
    [
        ("truncate", "Flat", "cosine"),
        ("flip", "Flat", "cosine"),
        ("delete", "Flat", "cosine"),
        ("flip", "HNSW32", "cosine"),
        ("delete", "HNSW32", "l2"),  # a full rebuild of an l2 HNSW index with deleted labels
    ],
)
def test_damaged_checkpoint_is_rebuilt_from_the_store(tmp_path: Path, damage: str, spec: str, metric: str) -> None:
    d, nb = 32, 2000
    data = tmp_path / "data"
    srv, port = start_server(data)
    stubs = connect(port)
    stubs.register("s", d, METRICS[metric])
    stubs.create("c", "s", spec)
    m = Model(stubs, "c", "s", metric)
    m.upsert([f"p{i}" for i in range(nb)], make_data(nb, d, seed=40))
    m.delete([f"p{i}" for i in range(0, nb, 10)])
    stubs.channel.close()
    srv.stop(None)
    (path,) = ckpt_files(data)
    good = checkpoint.load(path.parent, spec=spec, d=d, metric=metric)
    assert good is not None and good.nsealed in (nb, len(m.sent))  # a merge leaves deleted fresh rows out
    {"truncate": _truncate, "flip": _flip, "delete": Path.unlink}[damage](path)
    assert checkpoint.load(path.parent, spec=spec, d=d, metric=metric) is None

    srv, port = start_server(data)
    try:
        m.stubs = stubs = connect(port)
        info = stubs.info("c")
        assert info.num_points == len(m.sent) and info.state == cpb.INDEX_STATE_READY
        assert (info.indexed_vectors, info.fresh_vectors) == (len(m.sent), 0)
        # every live vector was replayed from the store into a new index...
        assert srv.metrics.registry.get_sample_value(REPLAYED) == len(m.sent)
        xq = np.concatenate([make_data(100, d, seed=41), m.arrays()[1][-20:]])  # the flipped vector is the last
        check_search(m, spec, xq)
        check_points(m)
        # ...with labels compacted, so no placeholder for a deleted point entered the index...
        assert info.deleted_labels == 0
        # ...and a new, valid checkpoint replaced the damaged one
        assert info.checkpoint_sequence == info.last_sequence > 0
        ck = checkpoint.load(path.parent, spec=spec, d=d, metric=metric)
        assert ck is not None and ck.nsealed == len(m.sent) and ck.sequence == info.checkpoint_sequence
        stubs.channel.close()
    finally:
        srv.stop(None)


# -- replay of the writes newer than the checkpoint --------------------------------------------


@pytest.mark.parametrize("spec", ["Flat", "HNSW32"])
def test_restart_replays_writes_newer_than_the_checkpoint(tmp_path: Path, spec: str) -> None:
    d = 32
    data = tmp_path / "data"
    srv, port = start_server(data, merge_idle_seconds=0.05)
    stubs = connect(port)
    stubs.register("s", d, pb.METRIC_L2)
    stubs.create("c", "s", spec)
    m = Model(stubs, "c", "s", "l2")
    old = [f"old-{i}" for i in range(2000)]
    m.upsert(old, make_data(2000, d, seed=50))
    last = stubs.info("c").last_sequence
    info = wait_until(lambda: (i := stubs.info("c")).checkpoint_sequence == last and i, 30, "the first checkpoint")
    S = info.checkpoint_sequence
    stubs.channel.close()
    srv.stop(None)  # nothing fresh: the checkpoint stays at S

    # writes after S, on a server that never checkpoints (as if killed before its next checkpoint)
    srv, port = start_server(data, checkpoint_after_merge=False, merge_min_fresh=10**9, merge_idle_seconds=3600)
    m.stubs = stubs = connect(port)
    assert stubs.info("c").checkpoint_sequence == S
    new = [f"new-{i}" for i in range(600)]
    m.upsert(new, make_data(600, d, seed=51), batch=200)
    m.upsert(old[:100], make_data(100, d, seed=52))  # overwrites: new labels after the checkpoint
    m.delete(old[1000:1100])  # deletes of checkpointed labels
    m.delete(new[:50])  # deletes of labels newer than the checkpoint
    assert stubs.info("c").checkpoint_sequence == S
    stubs.channel.close()
    srv.stop(None)
    ck = checkpoint.load(ckpt_files(data)[0].parent, spec=spec, d=d, metric="l2")
    assert ck is not None and ck.sequence == S

    srv, port = start_server(data)
    try:
        m.stubs = stubs = connect(port)
        assert srv.metrics.registry.get_sample_value(REPLAYED) == 550 + 100  # live new + overwritten
        info = stubs.info("c")
        assert info.num_points == len(m.sent) == 2000 + 550 - 100
        assert info.checkpoint_sequence == info.last_sequence > S  # the replayed index was checkpointed
        check_points(m)
        check_search(m, spec, make_data(100, d, seed=53))
        stubs.channel.close()
    finally:
        srv.stop(None)


# -- health while loading ----------------------------------------------------------------------


def _populate(data: Path, col: str, nb: int, d: int, spec: str = "Flat") -> np.ndarray:
    srv, port = start_server(data)
    stubs = connect(port)
    stubs.register("s", d)
    stubs.create(col, "s", spec)
    xb = make_data(nb, d, seed=60)
    for i in range(0, nb, 10000):
        stubs.upsert(col, "s", [f"p{j}" for j in range(i, min(i + 10000, nb))], xb[i : i + 10000])
    stubs.channel.close()
    srv.stop(None)
    return xb


def test_health_is_not_serving_while_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    _populate(data, "c", 100, 8)
    # hold recovery until the test has looked
    gate, entered = threading.Event(), threading.Event()
    recover = Collection.recover

    def gated(self: Collection) -> int:
        entered.set()
        assert gate.wait(30)
        return recover(self)

    monkeypatch.setattr(Collection, "recover", gated)
    srv, port = create_server(ServerConfig(data_dir=data, port=0, metrics_port=None))
    stubs = connect(port)
    try:
        srv.start()
        assert entered.wait(30)
        for service in ("", POINT_SERVICE):
            assert health(stubs.channel, service) == NOT_SERVING
        for call in (
            lambda: stubs.info("c"),
            lambda: stubs.spaces.ListSpaces(spb.ListSpacesRequest()),
            lambda: stubs.upsert("c", "s", ["x"], np.ones((1, 8), np.float32)),
            lambda: stubs.search("c", "s", np.ones((1, 8), np.float32), 1),
        ):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading" in (e.value.details() or "")
        assert not srv.wait_ready(0.05)
        gate.set()
        assert srv.wait_ready(30)
        for service in ("", POINT_SERVICE):
            assert health(stubs.channel, service) == SERVING
        assert stubs.info("c").num_points == 100  # the rejected upsert wrote nothing
    finally:
        gate.set()
        stubs.channel.close()
        srv.stop(None)
    # stopped: the health service (read in-process, the port is closed) says NOT_SERVING
    for service in ("", POINT_SERVICE):
        assert srv.health.Check(health_pb2.HealthCheckRequest(service=service), None).status == NOT_SERVING


def test_health_while_rebuilding_a_large_collection(tmp_path: Path) -> None:
    d, nb = 64, 30000
    data = tmp_path / "data"
    _populate(data, "big", nb, d)
    for path in ckpt_files(data):
        path.unlink()  # the index must be rebuilt from the store while loading

    srv, port = create_server(ServerConfig(data_dir=data, port=0, metrics_port=None))
    stubs = connect(port)
    seen: list[tuple[int, grpc.StatusCode, bool]] = []  # (health, then GetCollection's code, engine serving)
    try:
        srv.start()
        while True:
            ready = srv.wait_ready(0)
            status = health(stubs.channel)
            serving_engine = srv.engine.state is Lifecycle.SERVING
            try:
                stubs.info("big")
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
            seen.append((status, code, serving_engine))
            if ready and status == SERVING:
                break
            assert len(seen) < 100000, "never became SERVING"
        assert srv.load_error is None
        statuses = [s for s, _, _ in seen]
        first_serving = statuses.index(SERVING)
        assert statuses[0] == NOT_SERVING, "loading 30k vectors took no time at all?"
        assert set(statuses[:first_serving]) == {NOT_SERVING} and set(statuses[first_serving:]) == {SERVING}
        for status, code, serving_engine in seen:
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)
            if status == SERVING:  # health says SERVING only once the engine serves, and then calls work
                assert serving_engine and code == grpc.StatusCode.OK
            if code == grpc.StatusCode.UNAVAILABLE:
                assert status == NOT_SERVING
        info = stubs.info("big")
        assert info.num_points == nb and (info.indexed_vectors, info.fresh_vectors) == (nb, 0)
        assert srv.metrics.registry.get_sample_value(REPLAYED) == nb
        assert info.checkpoint_sequence == info.last_sequence and len(ckpt_files(data)) == 1
    finally:
        stubs.channel.close()
        srv.stop(None)
    assert srv.health.Check(health_pb2.HealthCheckRequest(service=""), None).status == NOT_SERVING
