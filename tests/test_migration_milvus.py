"""Model migrations of ``milvus`` collections (Milvus Lite, over a real server on port 0): what only this
backend has. The API suite of migrations runs on both backends in ``tests/test_migration.py`` (its
``BOTH`` tests: lifecycle and searches against a numpy reference, restarts, refusals, backfill advice);
here: a space without a vector field and a prefix collection refused up front with nothing changed, the
refusals of what the backend does not do (forward upgrades, forced cutovers), the cutover's index switch on an HNSW
collection with searches and reads by id running through it (none fails; each reply is the
before- or the after-cutover answer), a field a crash left without an index repaired at the next
start, and a finished migration dropping the old vectors from the rows. Skipped with a reason without
the ``milvus`` extra.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import brute_force, recall_at, start_server, wait_for
from test_backends import NEEDS_MILVUS, _engine_client
from test_migration import IDS, K, N, agree, search, setup, transform, unit, world

from interlingua.client import Client, FailedPrecondition, NotFound
from interlingua.server import Server

pytestmark = NEEDS_MILVUS


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Server, Client, dict[str, np.ndarray]]]:
    srv, port = start_server(tmp_path / "data", backend="milvus")
    client = Client(f"127.0.0.1:{port}", timeout=120)
    w = world()
    setup(client, w, spec="HNSW16")
    yield srv, client, w
    client.close()
    srv.stop(None)


def _field_index(srv: Server, space: str) -> dict[str, Any]:
    """The engine's index of ``space``'s vector field in collection c (a second client on the Lite file)."""
    from interlingua.server.backends.milvus_schema import field_name, milvus_name

    mc: Any = _engine_client(str(Path(srv.engine.config.data_dir) / "milvus.db"))
    info = mc.describe_index(milvus_name("c"), field_name(space))
    params = info.get("params") if isinstance(info.get("params"), dict) else info
    return {"index_type": info["index_type"], **{k: int(params[k]) for k in ("M", "efConstruction") if k in params}}


def test_a_space_without_a_field_is_refused_and_nothing_changes(env: Any) -> None:
    _srv, client, w = env
    client.register_space("later", 16)  # after the collection: Milvus Lite cannot add its field
    x = w["docs_old"][:200]
    client.fit_transform("t2", "procrustes", source_space="later", target_space="old", doc_pairs=(x, x))
    before = search(client, "old", w["q_old"])
    with pytest.raises(FailedPrecondition) as err:
        client.start_migration("c", "later", "t2")
    msg = err.value.message
    assert "no vector field for space 'later'" in msg and "AddCollectionField is unimplemented" in msg
    assert "register the new space before creating the collection" in msg
    with pytest.raises(NotFound, match="has no migration"):
        client.get_migration("c")
    info = client.get_collection("c")
    assert (info.home_space, info.num_points, info.vectors_per_space) == ("old", N, {"old": N})
    np.testing.assert_array_equal(search(client, "old", w["q_old"]), before)
    client.delete_transform("t2")  # no migration holds it
    info = client.start_migration("c", "new", "t")  # a space with a field migrates
    assert (info.phase, info.points) == ("backfill", N)


def test_a_prefix_collection_is_refused_and_nothing_changes(env: Any) -> None:
    """Its index is on the prefix field (the home field is FLAT), which the cutover's index switch does
    not move: refused up front, as on the embedded backend."""
    _srv, client, w = env
    client.create_collection("pc", "old", index_spec="HNSW16", prefix_dims=8)
    client.upsert("pc", IDS, w["docs_old"], space="old")
    before = client.search("pc", w["q_old"], K, space="old").ids
    with pytest.raises(FailedPrecondition, match="'pc' has a prefix_dims or basis_transform index"):
        client.start_migration("pc", "new", "t")
    with pytest.raises(NotFound, match="has no migration"):
        client.get_migration("pc")
    assert client.get_collection("pc").home_space == "old"
    np.testing.assert_array_equal(client.search("pc", w["q_old"], K, space="old").ids, before)


def test_refusals_of_what_the_backend_does_not_do(env: Any) -> None:
    _srv, client, w = env
    client.start_migration("c", "new", "t", reverse_transform="r")
    client.upsert("c", IDS[:100], w["docs_new"][:100], space="new")
    with pytest.raises(FailedPrecondition, match="milvus backend, which does not support forward upgrades"):
        client.forward_upgrade("c", "r")
    with pytest.raises(FailedPrecondition, match=r"coverage is 16.67%.*no forward upgrade.*every point backfilled"):
        client.cutover("c", force=True)
    info = client.get_migration("c")
    assert (info.phase, info.backfilled, info.forward.state) == ("backfill", 100, "")
    client.upsert("c", IDS[100:], w["docs_new"][100:], space="new")
    client.cutover("c")
    with pytest.raises(FailedPrecondition, match=r"cut over to 'new'.*1 id\(s\) without one: 'ghost'"):
        client.upsert("c", ["p0000", "ghost"], w["docs_old"][:2], space="old")
    with pytest.raises(NotFound):
        client.get("c", ["ghost"])
    client.upsert("c", ["ghost"], w["docs_new"][:1], space="new")  # after the cutover: new points in new
    assert client.get_migration("c").points == N + 1


def test_cutover_switches_the_field_index_while_searches_go_on(env: Any) -> None:
    """HNSW16 collection: the new field is FLAT until the cutover gives it HNSW16; 4 threads search (old and
    new space) and read by id through the cutover: no request fails, each old-space reply is exactly the
    before- or the after-cutover answer, and new-space searches reach brute-force recall on HNSW."""
    srv, client, w = env
    client.start_migration("c", "new", "t", reverse_transform="r")
    assert _field_index(srv, "new")["index_type"] == "FLAT"
    client.upsert("c", IDS, w["docs_new"], space="new")
    xq_old, xq_new = w["q_old"][:16], w["q_new"][:16]
    before = search(client, "old", xq_old)
    failures: list[BaseException] = []
    replies: list[np.ndarray] = []
    stop = threading.Event()

    def guarded(fn: Any) -> Any:
        def run() -> None:
            try:
                while not stop.is_set():
                    fn()
            except BaseException as e:
                failures.append(e)

        return run

    threads = [threading.Thread(target=guarded(lambda: replies.append(search(client, "old", xq_old))))]
    threads.append(threading.Thread(target=guarded(lambda: search(client, "new", xq_new))))
    threads.append(threading.Thread(target=guarded(lambda: client.get("c", IDS[:50], with_vectors=True))))
    threads.append(
        threading.Thread(target=guarded(lambda: client.search("c", xq_new, K, space="new", with_payload=True)))
    )
    for t in threads:
        t.start()
    wait_for(lambda: len(replies) > 5, timeout=60)
    info = client.cutover("c")
    n_cut = len(replies)
    wait_for(lambda: len(replies) > n_cut + 5, timeout=60)
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    assert info.phase == "cutover"
    mig = srv.engine.migrations.get("c")
    assert mig is not None and mig.switch_seconds > 0
    first = mig.switch_seconds
    assert _field_index(srv, "new") == {"index_type": "HNSW", "M": 16, "efConstruction": 40}
    after = search(client, "old", xq_old)
    assert not np.array_equal(before, after)
    assert all(np.array_equal(r, before) or np.array_equal(r, after) for r in replies)
    assert any(np.array_equal(r, after) for r in replies[n_cut:])
    _, Iref = brute_force(w["docs_new"], w["q_new"], K)
    res = client.search("c", w["q_new"], K, space="new", ef_search=64)
    assert recall_at(np.vectorize(IDS.index)(res.ids), Iref) >= 0.95
    rq = transform(srv, "r", xq_old)
    via_reverse = np.array(IDS, dtype=object)[np.argsort(-rq @ unit(w["docs_new"]).T, 1)[:, :K]]
    assert agree(after, via_reverse) >= 0.95
    info = client.rollback_cutover("c")  # the old field answers old queries again; the new keeps HNSW
    assert info.phase == "backfill"
    np.testing.assert_array_equal(search(client, "old", xq_old), before)
    client.cutover("c")  # the field has the index already: no second switch
    assert mig.switch_seconds == first


def test_restart_repairs_a_field_left_without_its_index(tmp_path: Path) -> None:
    """A crash inside the cutover's index switch (after drop_index, before create_index) leaves the new
    field without an index, and Milvus cannot load the collection then: the next front-end gives the
    field the collection's index at its first request and answers as before."""
    from interlingua.server.backends.milvus_schema import field_name, milvus_name

    data = tmp_path / "data"
    srv, port = start_server(data, backend="milvus")
    client = Client(f"127.0.0.1:{port}", timeout=120)
    w = world(2)
    setup(client, w, spec="HNSW16")
    client.start_migration("c", "new", "t")
    part = np.arange(0, N, 2)
    client.upsert("c", [IDS[i] for i in part], w["docs_new"][part], space="new")
    before = search(client, "new", w["q_new"])
    client.close()
    srv.stop(None)
    mc: Any = _engine_client(str(data / "milvus.db"))
    mc.release_collection(milvus_name("c"))
    mc.drop_index(milvus_name("c"), field_name("new"))

    srv, port = start_server(data, backend="milvus")
    client = Client(f"127.0.0.1:{port}", timeout=120)
    try:
        info = client.get_migration("c")
        assert (info.phase, info.backfilled) == ("backfill", len(part))
        after = search(client, "new", w["q_new"])
        assert agree(after, before) >= 0.98  # FLAT before, HNSW16 now
        assert _field_index(srv, "new")["index_type"] == "HNSW"
        rest = np.setdiff1d(np.arange(N), part)
        client.upsert("c", [IDS[i] for i in rest], w["docs_new"][rest], space="new")
        assert client.cutover("c").phase == "cutover"
    finally:
        client.close()
        srv.stop(None)


def test_finish_drops_the_old_vectors_and_rehomes(tmp_path: Path) -> None:
    srv, port = start_server(tmp_path / "data", backend="milvus")
    client = Client(f"127.0.0.1:{port}", timeout=120)
    w = world()
    setup(client, w, spec="HNSW16")
    client.start_migration("c", "new", "t", reverse_transform="r")
    client.upsert("c", IDS, w["docs_new"], space="new")
    client.cutover("c")
    after = search(client, "old", w["q_old"])
    info = client.finish_migration("c")
    assert info.phase == "finished"
    col = client.get_collection("c")
    assert (col.home_space, col.num_points, col.vectors_per_space) == ("new", N, {"new": N})
    pts = client.get("c", IDS[:5], with_vectors=True, with_payload=True)
    assert all(set(p.vectors) == {"new"} for p in pts) and pts[3].payload == {"i": 3}
    np.testing.assert_array_equal(search(client, "old", w["q_old"]), after)  # the reverse transform's route
    client.upsert("c", ["z"], w["docs_new"][:1], space="new")  # a plain collection in the new space
    assert client.search("c", w["docs_new"][:1], 2, space="new").ids[0].tolist() in (["z", "p0000"], ["p0000", "z"])
    after = search(client, "old", w["q_old"])
    client.close()
    srv.stop(None)
    srv2, port = start_server(tmp_path / "data", backend="milvus")
    try:
        with Client(f"127.0.0.1:{port}") as c2:
            col = c2.get_collection("c")
            assert (col.home_space, col.num_points, col.vectors_per_space) == ("new", N + 1, {"new": N + 1})
            np.testing.assert_array_equal(search(c2, "old", w["q_old"]), after)
    finally:
        srv2.stop(None)


def test_a_failed_index_switch_changes_nothing(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine refuses the new field's index at the cutover (here: create_index raises once): the
    cutover is FAILED_PRECONDITION quoting it, the field has its FLAT index again, the phase is backfill
    and searches answer as before; the next cutover switches."""
    from interlingua.server.backends.milvus_migration import MilvusMigration
    from interlingua.server.errors import FailedPrecondition as ServerFailedPrecondition

    srv, client, w = env
    client.start_migration("c", "new", "t", reverse_transform="r")
    client.upsert("c", IDS, w["docs_new"], space="new")
    before_new, before_old = search(client, "new", w["q_new"]), search(client, "old", w["q_old"])
    real_create = MilvusMigration._create
    calls: list[str] = []

    def refuse_hnsw(self: MilvusMigration, index: Any, c: Any) -> None:
        calls.append(index.index_type)
        if index.index_type == "HNSW" and calls.count("HNSW") == 1:
            raise ServerFailedPrecondition("milvus engine: create index failed: refused for the test")
        real_create(self, index, c)

    monkeypatch.setattr(MilvusMigration, "_create", refuse_hnsw)
    with pytest.raises(FailedPrecondition, match="refused for the test"):
        client.cutover("c")
    assert calls == ["HNSW", "FLAT"]  # the previous index put back
    assert _field_index(srv, "new")["index_type"] == "FLAT"
    info = client.get_migration("c")
    assert (info.phase, info.home_space, info.backfilled) == ("backfill", "old", N)
    np.testing.assert_array_equal(search(client, "new", w["q_new"]), before_new)
    np.testing.assert_array_equal(search(client, "old", w["q_old"]), before_old)
    assert client.cutover("c").phase == "cutover"
    assert _field_index(srv, "new")["index_type"] == "HNSW"
