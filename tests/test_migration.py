"""Model migrations over a real server: every phase change, searches in each phase against a numpy
reference, forward upgrades, restarts, rollback, errors that change nothing, and concurrent writes,
searches and a cutover (each reply wholly before or wholly after it). The tests marked ``BOTH`` run on
the embedded and the ``milvus`` backend (Milvus Lite; skipped with a reason without the extra); the
milvus backend's own cases are in ``tests/test_migration_milvus.py``."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import start_server, wait_for
from prometheus_client import generate_latest
from test_backends import NEEDS_MILVUS

from interlingua.client import Client
from interlingua.client import FailedPrecondition as ClientFailedPrecondition
from interlingua.client import InvalidArgument as ClientInvalidArgument
from interlingua.client import NotFound as ClientNotFound
from interlingua.client.cli import main
from interlingua.server import Server
from interlingua.v1 import migrations_pb2 as mpb
from interlingua.v1 import migrations_pb2_grpc as mgrpc

D_OLD, D_NEW, N, NQ, K = 16, 24, 600, 40, 10


def world(seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded old/new embeddings of the same items (new = [old, extra] rotated + noise), queries near docs."""
    rng = np.random.default_rng(seed)
    docs_old = rng.standard_normal((N, D_OLD)).astype(np.float32)
    q_old = docs_old[:NQ] + 0.4 * rng.standard_normal((NQ, D_OLD)).astype(np.float32)
    Q, _ = np.linalg.qr(rng.standard_normal((D_NEW, D_NEW)))

    def to_new(x: np.ndarray, s: int) -> np.ndarray:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        extra = 0.3 * np.random.default_rng(s).standard_normal((len(x), D_NEW - D_OLD))
        noise = 0.05 * np.random.default_rng(s + 1).standard_normal((len(x), D_NEW))
        return ((np.hstack([x, extra]) @ Q) + noise).astype(np.float32)

    return {"docs_old": docs_old, "docs_new": to_new(docs_old, 7), "q_old": q_old, "q_new": to_new(q_old, 9)}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


IDS = [f"p{i:04d}" for i in range(N)]


#: runs a test on both backends (the ``backend`` fixture is "embedded" otherwise)
BOTH = pytest.mark.parametrize("backend", ["embedded", pytest.param("milvus", marks=NEEDS_MILVUS)])


def setup(client: Client, w: dict[str, np.ndarray], *, spec: str = "Flat") -> None:
    client.register_space("old", D_OLD)
    client.register_space("new", D_NEW)  # before the collection: a milvus collection gets a field for it
    client.create_collection("c", "old", index_spec=spec)
    client.upsert("c", IDS, w["docs_old"], space="old", payloads=[f'{{"i": {i}}}' for i in range(N)])
    docs, queries = (w["docs_new"], w["docs_old"]), (w["q_new"], w["q_old"])
    # query and doc pairs: the new -> old fit also carries the two-index score calibration
    client.fit_transform("t", "procrustes", source_space="new", target_space="old", doc_pairs=docs, query_pairs=queries)
    client.fit_transform(
        "r", "procrustes", source_space="old", target_space="new", doc_pairs=docs[::-1], query_pairs=queries[::-1]
    )


@pytest.fixture
def backend() -> str:
    return "embedded"


@pytest.fixture
def env(tmp_path: Path, backend: str) -> Iterator[tuple[Server, Client, dict[str, np.ndarray]]]:
    srv, port = start_server(tmp_path / "data", backend=backend)
    client = Client(f"127.0.0.1:{port}")
    w = world()
    setup(client, w)
    yield srv, client, w
    client.close()
    srv.stop(None)


def transform(srv: Server, name: str, x: np.ndarray, side: str = "query") -> np.ndarray:
    compat = srv.engine.compat
    assert compat is not None
    fn = compat.get(name).fn
    assert fn is not None
    return unit(fn.apply(unit(x), side))


def projection(srv: Server, x_old: np.ndarray) -> np.ndarray:
    """What a forward upgrade with ``r`` stores for old vectors: its unit doc side moved onto the new docs'
    mean and spread measured by its fit (``doc_moments``), unit again."""
    compat = srv.engine.compat
    assert compat is not None
    m = compat.get("r").report["fit"]["doc_moments"]
    y = transform(srv, "r", x_old, side="doc")
    return unit((y - np.asarray(m["mapped_mean"])) * m["ratio"] + np.asarray(m["target_mean"]))


def reference(
    srv: Server, w: dict[str, np.ndarray], real: np.ndarray, projected: np.ndarray | None = None
) -> np.ndarray:
    """Top-K ids (NQ, K) of new queries on the half-backfilled gallery: backfilled docs (``real`` mask)
    natively, the rest through ``t`` with the migration's calibration (or, given ``projected`` rows,
    one search over [x_new | projection])."""
    q = unit(w["q_new"])
    if projected is not None:
        rows = np.where(real[:, None], unit(w["docs_new"]), projected)
        S = q @ rows.T
    else:
        mig = srv.engine.migrations.get("c")  # type: ignore[union-attr]
        assert mig is not None
        cal = mig.calibration
        S_raw = transform(srv, "t", w["q_new"]) @ unit(w["docs_old"]).T
        level = cal.query_level(-np.sort(-S_raw, axis=1))  # each query's old top-depth mean
        S_old = cal.scale * S_raw + cal.level * level[:, None] + cal.bias
        S = np.where(real[None, :], q @ unit(w["docs_new"]).T, S_old)
    I = np.argsort(-S, axis=1, kind="stable")[:, :K]
    return np.array(IDS, dtype=object)[I]


def agree(ids: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(ids.tolist(), ref.tolist(), strict=True)]))


def search(client: Client, space: str, xq: np.ndarray) -> np.ndarray:
    return np.asarray(client.search("c", xq, K, space=space).ids, dtype=object)


@BOTH
def test_lifecycle_backfill_cutover_rollback_finish(env: Any) -> None:
    srv, client, w = env
    info = client.start_migration("c", "new", "t", reverse_transform="r")
    assert (info.phase, info.home_space, info.points, info.backfilled, info.coverage) == ("backfill", "old", N, 0, 0)
    assert info.calibration is not None and info.calibration.source.startswith("transform 't'")
    real = np.zeros(N, bool)
    assert agree(search(client, "new", w["q_new"]), reference(srv, w, real)) >= 0.98
    native_old = search(client, "old", w["q_old"])

    half = np.random.default_rng(3).permutation(N)[: N // 2]
    client.upsert("c", [IDS[i] for i in half], w["docs_new"][half], space="new")
    real[half] = True
    info = client.get_migration("c")
    assert (info.backfilled, info.coverage) == (N // 2, 0.5)
    assert agree(search(client, "new", w["q_new"]), reference(srv, w, real)) >= 0.98
    np.testing.assert_array_equal(search(client, "old", w["q_old"]), native_old)  # old queries: old index natively

    rest = np.setdiff1d(np.arange(N), half)
    client.upsert("c", [IDS[i] for i in rest], w["docs_new"][rest], space="new")
    new_new = np.array(IDS, dtype=object)[np.argsort(-unit(w["q_new"]) @ unit(w["docs_new"]).T, 1)[:, :K]]
    assert agree(search(client, "new", w["q_new"]), new_new) >= 0.99  # β = 1: new -> new

    info = client.cutover("c")
    assert (info.phase, info.home_space, info.forced) == ("cutover", "new", False)
    assert agree(search(client, "new", w["q_new"]), new_new) >= 0.99
    rq = transform(srv, "r", w["q_old"])
    via_reverse = np.array(IDS, dtype=object)[np.argsort(-rq @ unit(w["docs_new"]).T, 1)[:, :K]]
    assert agree(search(client, "old", w["q_old"]), via_reverse) >= 0.99

    info = client.rollback_cutover("c")
    assert (info.phase, info.home_space) == ("backfill", "old")
    np.testing.assert_array_equal(search(client, "old", w["q_old"]), native_old)

    client.cutover("c")
    info = client.finish_migration("c")
    assert info.phase == "finished"
    col = client.get_collection("c")
    assert col.home_space == "new" and col.num_points == N
    assert agree(search(client, "new", w["q_new"]), new_new) >= 0.99
    assert agree(search(client, "old", w["q_old"]), via_reverse) >= 0.99  # the reverse transform is a route now
    pts = client.get("c", IDS[:3], with_vectors=True, with_payload=True)
    assert all(set(p.vectors) == {"new"} for p in pts) and pts[0].payload == {"i": 0}
    with pytest.raises(ClientNotFound):
        client.get_migration("c")
    hits = client.search("c", w["q_new"][:2], K, space="new", with_payload=True)
    assert all(p for p in hits.payloads)  # type: ignore[union-attr]


@BOTH
def test_restart_resumes_every_phase(tmp_path: Path, backend: str) -> None:
    data = tmp_path / "data"
    srv, port = start_server(data, backend=backend)
    client = Client(f"127.0.0.1:{port}")
    w = world(1)
    setup(client, w)
    client.start_migration("c", "new", "t", reverse_transform="r")
    part = np.arange(0, N, 3)
    client.upsert("c", [IDS[i] for i in part], w["docs_new"][part], space="new")
    before = search(client, "new", w["q_new"])
    client.close()
    srv.stop(None)

    srv, port = start_server(data, backend=backend)
    client = Client(f"127.0.0.1:{port}")
    info = client.get_migration("c")
    assert (info.phase, info.backfilled) == ("backfill", len(part))
    np.testing.assert_array_equal(search(client, "new", w["q_new"]), before)
    rest = np.setdiff1d(np.arange(N), part)
    client.upsert("c", [IDS[i] for i in rest], w["docs_new"][rest], space="new")
    client.cutover("c")
    after = search(client, "old", w["q_old"])
    client.close()
    srv.stop(None)

    srv, port = start_server(data, backend=backend)
    client = Client(f"127.0.0.1:{port}")
    assert client.get_migration("c").phase == "cutover"
    np.testing.assert_array_equal(search(client, "old", w["q_old"]), after)
    client.finish_migration("c")
    client.close()
    srv.stop(None)

    srv, port = start_server(data, backend=backend)
    client = Client(f"127.0.0.1:{port}")
    assert client.get_collection("c").home_space == "new"
    assert [c.name for c in client.list_collections()] == ["c"]  # no companion left behind
    np.testing.assert_array_equal(search(client, "old", w["q_old"]), after)
    client.close()
    srv.stop(None)


def test_forward_upgrade_shared_index_and_forced_cutover(env: Any) -> None:
    srv, client, w = env
    client.start_migration("c", "new", "t", strategy="shared_index")
    part = np.arange(0, N, 4)
    client.upsert("c", [IDS[i] for i in part], w["docs_new"][part], space="new")
    with pytest.raises(ClientFailedPrecondition, match="forced cutover needs every other point projected"):
        client.cutover("c", force=True)
    client.forward_upgrade("c", "r")
    info = client.wait_forward_upgrade("c", timeout=30)
    assert (info.forward.state, info.projected, info.backfilled) == ("done", N - len(part), len(part))
    real = np.zeros(N, bool)
    real[part] = True
    proj = projection(srv, w["docs_old"])
    assert agree(search(client, "new", w["q_new"]), reference(srv, w, real, proj)) >= 0.98
    # a real vector replaces its projection; a projection never replaces a real vector
    client.upsert("c", [IDS[1]], w["docs_new"][1:2], space="new")
    assert client.get_migration("c").projected == N - len(part) - 1
    info = client.cutover("c", force=True)
    assert (info.phase, info.forced) == ("cutover", True)
    real[1] = True
    assert agree(search(client, "new", w["q_new"]), reference(srv, w, real, proj)) >= 0.98
    client.finish_migration("c")
    assert client.get_collection("c").num_points == N


@BOTH
def test_refusals_change_nothing(env: Any) -> None:
    _srv, client, w = env
    with pytest.raises(ClientNotFound, match="has no migration"):
        client.get_migration("c")
    with pytest.raises(ClientNotFound):
        client.start_migration("nope", "new", "t")
    with pytest.raises(ClientNotFound):
        client.start_migration("c", "nope", "t")
    with pytest.raises(ClientNotFound):
        client.start_migration("c", "new", "nope")
    with pytest.raises(ClientInvalidArgument, match="must map 'new' -> 'old'"):
        client.start_migration("c", "new", "r")
    with pytest.raises(ClientInvalidArgument, match="already the home space"):
        client.start_migration("c", "old", "t")
    with pytest.raises(ClientInvalidArgument, match="must map 'old' -> 'new'"):
        client.start_migration("c", "new", "t", reverse_transform="t")
    assert [c.name for c in client.list_collections()] == ["c"]
    with pytest.raises(ClientNotFound):
        client.get_migration("c")

    client.start_migration("c", "new", "t")
    with pytest.raises(ClientFailedPrecondition, match=r"already migrating to 'new'.*coverage 0\.0%"):
        client.start_migration("c", "new", "t")
    with pytest.raises(ClientNotFound, match="not in collection"):
        client.upsert("c", ["p0000", "ghost"], w["docs_new"][:2], space="new")
    assert client.get_migration("c").backfilled == 0  # nothing of the refused batch was stored
    assert set(client.get("c", ["p0000"], with_vectors=True)[0].vectors) == {"old"}
    client.upsert("c", IDS[:6], w["docs_new"][:6], space="new")
    with pytest.raises(ClientFailedPrecondition, match=r"coverage is 1.00% \(6 of 600 points backfilled\)"):
        client.cutover("c")
    with pytest.raises(ClientFailedPrecondition, match="needs a cutover first"):
        client.finish_migration("c")
    with pytest.raises(ClientFailedPrecondition, match="only a cutover rolls back"):
        client.rollback_cutover("c")
    with pytest.raises(ClientFailedPrecondition, match="in use by the migration"):
        client.delete_transform("t")
    stub = mgrpc.MigrationServiceStub(client._channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.SuggestBackfillOrder(mpb.SuggestBackfillOrderRequest(collection="c", n=0))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "n is 0" in str(err.value.details())
    info = client.get_migration("c")
    assert (info.phase, info.backfilled) == ("backfill", 6)

    info = client.abort_migration("c")
    assert info.phase == "aborted"
    assert [c.name for c in client.list_collections()] == ["c"]
    assert client.get_collection("c").home_space == "old"
    with pytest.raises(ClientFailedPrecondition):  # no route from new after the abort
        search(client, "new", w["q_new"])


@BOTH
def test_suggest_backfill_order(env: Any) -> None:
    _srv, client, w = env
    order = client.suggest_backfill_order("c", 50)
    assert len(order.ids) == 50 and len(set(order.ids)) == 50 and set(order.ids) <= set(IDS)
    assert np.all(np.diff(order.scores) <= 1e-6)  # best first
    client.start_migration("c", "new", "t")
    first = [IDS.index(p) for p in order.ids[:20]]
    client.upsert("c", order.ids[:20], w["docs_new"][first], space="new")
    again = client.suggest_backfill_order("c", N)
    assert len(again.ids) == N - 20 and not set(again.ids) & set(order.ids[:20])  # backfilled ids are left out


def test_concurrent_backfill_search_cutover(env: Any) -> None:
    """8 threads: 2 re-upsert backfilled vectors, 5 search, 1 cuts over (forced, with projections) midway.
    Every request succeeds and every reply is exactly the before- or the after-cutover answer."""
    _srv, client, w = env
    client.start_migration("c", "new", "t")
    part = np.arange(0, N, 2)
    client.upsert("c", [IDS[i] for i in part], w["docs_new"][part], space="new")
    client.forward_upgrade("c", "r")
    client.wait_forward_upgrade("c", timeout=30)
    xq = w["q_new"][:16]
    before = search(client, "new", xq)
    failures: list[BaseException] = []
    replies: list[np.ndarray] = []
    stop = threading.Event()

    def guarded(fn: Any) -> Any:
        def run() -> None:
            try:
                fn()
            except BaseException as e:
                failures.append(e)

        return run

    def writer(j: int) -> None:
        rows = part[j::2]
        while not stop.is_set():
            client.upsert("c", [IDS[i] for i in rows[:40]], w["docs_new"][rows[:40]], space="new")

    def reader() -> None:
        while not stop.is_set():
            replies.append(search(client, "new", xq))

    threads = [threading.Thread(target=guarded(lambda j=j: writer(j))) for j in range(2)]
    threads += [threading.Thread(target=guarded(reader)) for _ in range(5)]
    for t in threads:
        t.start()
    wait_for(lambda: len(replies) > 20, timeout=30)
    cut = threading.Thread(target=guarded(lambda: client.cutover("c", force=True)))
    cut.start()
    cut.join()
    n_cut = len(replies)
    wait_for(lambda: len(replies) > n_cut + 20, timeout=30)
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    after = search(client, "new", xq)
    assert not np.array_equal(before, after)
    for r in replies:
        assert np.array_equal(r, before) or np.array_equal(r, after)
    assert any(np.array_equal(r, after) for r in replies)


def test_cli_walkthrough_and_metrics(env: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's migration walkthrough with the CLI, on a live server; then the metrics it exports."""
    srv, client, w = env
    target = ["--target", client.target]

    def cli(*argv: str) -> tuple[int, str]:
        code = main([*argv, *target])
        return code, capsys.readouterr().out

    np.save(tmp_path / "new_doc.npy", w["docs_new"])
    (tmp_path / "all_ids.txt").write_text("".join(f"{p}\n" for p in IDS))
    code, out = cli("migrations", "start", "c", "--new-space", "new", "--transform", "t", "--reverse-transform", "r")
    assert code == 0 and "backfill" in out
    code, out = cli("migrations", "suggest", "c", "-n", "150", "--out", str(tmp_path / "ids.txt"))
    assert code == 0 and len((tmp_path / "ids.txt").read_text().split()) == 150
    code, _ = cli(
        "ingest", "c", "--space", "new", "--vectors", str(tmp_path / "new_doc.npy"),
        "--ids", str(tmp_path / "all_ids.txt"), "--only-ids", str(tmp_path / "ids.txt"),
    )  # fmt: skip
    assert code == 0
    code, out = cli("migrations", "get", "c", "--json")
    info = json.loads(out)
    assert code == 0 and info["backfilled"] == 150 and info["phase"] == "backfill"
    assert cli("migrations", "cutover", "c")[0] == 1  # refused below 100% coverage
    code, out = cli("migrations", "forward", "c", "--transform", "r", "--wait", "--no-progress")
    assert code == 0
    assert cli("migrations", "cutover", "c", "--force")[0] == 0
    assert cli("migrations", "rollback", "c")[0] == 0
    text = generate_latest(srv.metrics.registry).decode()
    assert 'interlingua_migration_coverage{collection="c",space="new"} 0.25' in text
    assert 'interlingua_migration_phase{collection="c",phase="backfill"} 1.0' in text
    assert 'interlingua_migration_forward_progress{collection="c"} 1.0' in text
    assert cli("migrations", "cutover", "c", "--force")[0] == 0
    assert cli("migrations", "finish", "c")[0] == 0
    assert client.get_collection("c").home_space == "new"
    text = generate_latest(srv.metrics.registry).decode()
    assert 'interlingua_migration_phase{collection="c",phase="finished"} 1.0' in text


@BOTH
def test_suggest_backfill_order_bounds_its_candidates(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past SUGGEST_MAX_CANDIDATES points the order ranks a seeded sample, read in steps (bounded memory)."""
    from interlingua.server.migration import manager

    _srv, client, _w = env
    monkeypatch.setattr(manager, "SUGGEST_MAX_CANDIDATES", 150)
    monkeypatch.setattr(manager, "SUGGEST_READ_STEP", 64)
    order = client.suggest_backfill_order("c", N)
    assert 100 <= len(order.ids) <= 200 and len(set(order.ids)) == len(order.ids)  # about 150 of 600
    assert set(order.ids) <= set(IDS) and np.all(np.diff(order.scores) <= 1e-6)
    assert client.suggest_backfill_order("c", N).ids == order.ids  # seeded: the same sample each time


def test_backfill_vectors_the_companion_cannot_hold_are_refused_before_any_write(tmp_path: Path) -> None:
    """A collection on float16 codes (SQfp16) in l2 spaces: a backfill vector with a component over
    65504 is refused (INVALID_ARGUMENT naming it) before the collection stores it; nothing changed,
    and a vector within the range is backfilled."""
    srv, port = start_server(tmp_path / "data")
    client = Client(f"127.0.0.1:{port}")
    try:
        w = world()
        client.register_space("old", D_OLD, metric="l2")
        client.register_space("new", D_NEW, metric="l2")
        client.create_collection("c", "old", index_spec="SQfp16")
        client.upsert("c", IDS, w["docs_old"], space="old")
        docs, queries = (w["docs_new"], w["docs_old"]), (w["q_new"], w["q_old"])
        client.fit_transform("t", "procrustes", source_space="new", target_space="old", doc_pairs=docs,
                             query_pairs=queries)  # fmt: skip
        client.start_migration("c", "new", "t")
        big = w["docs_new"][:2].copy()
        big[1, 3] = 1e5
        with pytest.raises(ClientInvalidArgument, match="vector 1 has component 100000 at dimension 3; the limit is"):
            client.upsert("c", IDS[:2], big, space="new")
        assert all("new" not in p.vectors for p in client.get("c", IDS[:2], with_vectors=True))
        assert client.get_collection("c").vectors_per_space == {"old": N}
        client.upsert("c", IDS[:2], w["docs_new"][:2], space="new")
        got = client.get("c", IDS[:2], with_vectors=True)
        np.testing.assert_allclose(np.stack([p.vectors["new"] for p in got]), w["docs_new"][:2], rtol=1e-6)
    finally:
        client.close()
        srv.stop(None)


def test_forward_projections_out_of_bounds_are_refused_before_any_write(
    env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An old-space write during a forward upgrade projects the point's vector; a projection the
    forward transform takes out of a vector's bounds (here made to overflow) is INVALID_ARGUMENT naming
    the transform, and the old-space vector is not written either (here the map overflows to inf)."""
    srv, client, w = env
    client.start_migration("c", "new", "t", strategy="shared_index")
    client.forward_upgrade("c", "r")
    assert client.wait_forward_upgrade("c", timeout=30).forward.state == "done"
    mig = srv.engine.migrations.get("c")  # type: ignore[union-attr]
    assert mig is not None and mig.forward is not None
    plain = mig.forward.apply
    monkeypatch.setattr(mig.forward, "apply", lambda x, side="doc": plain(x, side) * np.float32(np.inf))
    x = w["docs_old"][7:8] + 1.0
    with pytest.raises(ClientInvalidArgument, match="forward projections: vector 0 is mapped by the forward transform"):
        client.upsert("c", [IDS[7]], x, space="old")
    kept = client.get("c", [IDS[7]], with_vectors=True)[0].vectors["old"]
    np.testing.assert_allclose(kept, unit(w["docs_old"][7:8])[0], rtol=1e-5)
    monkeypatch.undo()
    client.upsert("c", [IDS[7]], x, space="old")
    np.testing.assert_allclose(client.get("c", [IDS[7]], with_vectors=True)[0].vectors["old"], unit(x)[0], rtol=1e-5)
