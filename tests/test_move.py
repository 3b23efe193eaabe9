"""``MoveCollection`` / ``collections move``: a running embedded collection copied to Milvus Lite, verified, switched.

Real servers over real channels (port 0), seeded data, numpy brute force as the reference, Milvus Lite
files in ``tmp_path`` (skipped with a reason without the ``milvus`` extra): a Flat and an HNSW collection
with two spaces, payloads and a route through a fitted transform answer the same before and after the
move, and after a restart; writers and readers in threads during a move see no failed request and
every acknowledged write is there after it; each refusal changes nothing; a leftover of a crashed move
is dropped by the next one, and the embedded leftovers of a move whose clean-up did not run by the next
start; the CLI maps ``milvus://`` uris.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import brute_force, connect, make_data, recall_at, start_server, wait_for

from interlingua.client import Client, CollectionMove, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from interlingua.client._types import milvus_uri
from interlingua.client.cli import main
from interlingua.server import Server
from interlingua.server.backends import move
from interlingua.v1 import collections_pb2 as cpb

HAVE_MILVUS = all(importlib.util.find_spec(m) is not None for m in ("pymilvus", "milvus_lite"))
pytestmark = pytest.mark.skipif(
    not HAVE_MILVUS, reason="moving to milvus needs pymilvus and milvus-lite: pip install 'interlingua[milvus]'"
)
D = 32


def _ids(n: int, prefix: str = "p") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _milvus_names(srv: Server, uri: str) -> list[str]:
    """The collections the engine at ``uri`` holds, as the server's own client lists them."""
    return list(srv.engine.milvus.call(uri, "list", lambda c: c.list_collections()))


def _rotation(seed: int) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((D, D)))[0]


def test_move_two_spaces_routes_and_restart(tmp_path: Path) -> None:
    """Flat (exact, vs numpy) and HNSW (recall) collections with two spaces and payloads, one routed
    through a transform: the same answers before, after the move and after a restart."""
    data, uri = tmp_path / "data", str((tmp_path / "engine.db").resolve())
    srv, port = start_server(data, merge_idle_seconds=0.2)
    c = Client(f"127.0.0.1:{port}", timeout=120)
    try:
        c.register_space("old@1", D)
        c.register_space("new@1", D)
        Q = _rotation(1)
        xb = _unit(make_data(500, D, seed=2).astype(np.float64))
        xq = make_data(20, D, seed=3)
        ids = np.array(_ids(500), dtype=object)
        payloads = [f'{{"i": {i}}}' if i % 5 else "" for i in range(500)]  # every fifth point has none
        for name, spec in (("f", "Flat"), ("h", "HNSW16")):
            c.create_collection(name, "old@1", spec)
            c.upsert(name, list(ids), xb, space="old@1", payloads=payloads)
            c.upsert(name, list(ids[:200]), xb[:200] @ Q, space="new@1")  # a second space, 200 points
        c.fit_transform(
            "t", "procrustes", source_space="new@1", target_space="old@1", doc_pairs=(xb @ Q, xb), timeout=60
        )
        c.activate_route("f", "t", force=True)
        Dref, Iref = brute_force(xb, xq, 10)

        def check_flat() -> None:
            res = c.search("f", xq, 10, space="old@1")
            assert res.ids.tolist() == ids[Iref].tolist()
            np.testing.assert_allclose(res.scores, Dref, rtol=1e-4, atol=1e-4)
            routed = c.search("f", xb[:20] @ Q, 3, space="new@1", with_payload=True)
            assert routed.route.transform == "t" and routed.ids[:, 0].tolist() == _ids(20)
            assert routed.payloads is not None and routed.payloads[1][0] == {"i": 1} and routed.payloads[0][0] is None

        def check_hnsw() -> float:
            got = c.search("h", xq, 10, space="old@1", ef_search=128).ids
            lab = {p: i for i, p in enumerate(ids)}
            return recall_at(np.vectorize(lambda p: lab.get(p, -1))(got), Iref)

        check_flat()
        assert check_hnsw() >= 0.9
        before = c.get("f", ["p1", "p5", "p300"], with_vectors=True, with_payload=True)
        cid = srv.engine.collections["f"].row.cid

        m = c.move_collection("f", uri)
        assert (m.collection.name, m.collection.backend, m.collection.backend_uri) == ("f", "milvus", uri)
        assert (m.points_copied, m.vectors_copied, m.writes_caught_up, m.deletes_caught_up) == (500, 700, 0, 0)
        assert (m.num_points, m.vectors_per_space) == (500, {"old@1": 500, "new@1": 200})
        assert (m.spot_queries, m.spot_top1_self_embedded, m.spot_top1_self_milvus) == (32, 32, 32)
        assert m.spot_top1_agreement == 1.0 and m.spot_top10_overlap == 1.0 and m.seconds > 0
        info = c.get_collection("f")
        assert (info.backend, info.num_points, info.vectors_per_space) == ("milvus", 500, {"old@1": 500, "new@1": 200})
        check_flat()
        after = c.get("f", ["p1", "p5", "p300"], with_vectors=True, with_payload=True)
        assert [(p.id, p.payload, p.sequence, sorted(p.vectors)) for p in after] == [
            (p.id, p.payload, p.sequence, sorted(p.vectors)) for p in before
        ]
        for a, b in zip(after, before, strict=True):
            for sp in b.vectors:
                np.testing.assert_array_equal(a.vectors[sp], b.vectors[sp])
        assert srv.engine.store.point_count(cid) == 0 and not (data / "collections" / str(cid)).exists()

        mh = c.move_collection("h", uri)
        assert (mh.num_points, mh.spot_top1_self_milvus) == (500, 32)
        assert check_hnsw() >= 0.9
        assert sorted(i.backend for i in c.list_collections()) == ["milvus", "milvus"]
        with pytest.raises(FailedPrecondition, match="'f' is already on the milvus backend"):
            c.move_collection("f", uri)
        c.close()
        srv.stop(None)
        # a crash after the switch, before the clean-up: leftovers the next start drops
        with sqlite3.connect(data / "interlingua.db") as db:
            db.execute("INSERT INTO points (cid, pid, payload, sequence) VALUES (?, 'ghost', NULL, 1)", (cid,))
            db.execute(
                "INSERT INTO vectors (cid, pid, space, label, sequence, vec) VALUES (?, 'ghost', 'old@1', 0, 1, ?)",
                (cid, np.zeros(D, "<f4").tobytes()),
            )
        (data / "collections" / str(cid)).mkdir(parents=True)
        srv, port = start_server(data, merge_idle_seconds=0.2)
        c = Client(f"127.0.0.1:{port}", timeout=120)
        assert srv.engine.store.point_count(cid) == 0 and not (data / "collections" / str(cid)).exists()
        assert c.get_collection("f").backend == "milvus"
        check_flat()  # the routes too: they live in the front-end's store, per collection
        assert check_hnsw() >= 0.9
        c.upsert("f", ["new"], xb[:1], space="old@1")  # and it takes writes
        assert c.get_collection("f").num_points == 501
    finally:
        c.close()
        srv.stop(None)


def test_move_a_prefix_collection(tmp_path: Path) -> None:
    """A Matryoshka prefix collection (Flat, two spaces) moves with its prefix field: the same funnel
    answers before and after the move (default shortlist and a stage), and after a restart."""
    data, uri = tmp_path / "data", str((tmp_path / "engine.db").resolve())
    srv, port = start_server(data, merge_idle_seconds=0.2)
    c = Client(f"127.0.0.1:{port}", timeout=120)
    try:
        c.register_space("old@1", D)
        c.register_space("new@1", D)
        xb, xq = make_data(400, D, seed=31), make_data(15, D, seed=32)
        ids = _ids(400)
        c.create_collection("mrl", "old@1", prefix_dims=8)
        c.upsert("mrl", ids, xb, space="old@1")
        c.upsert("mrl", ids[:50], xb[:50], space="new@1")
        asks: list[tuple[int | None, list[tuple[int, int]]]] = [(None, []), (30, [(16, 15)])]
        before = [c.search("mrl", xq, 10, space="old@1", shortlist_k=sk, funnel=st) for sk, st in asks]
        m = c.move_collection("mrl", uri)
        assert (m.num_points, m.vectors_per_space) == (400, {"old@1": 400, "new@1": 50})
        assert (m.spot_top1_self_milvus, m.spot_top1_agreement) == (32, 1.0)

        def same() -> None:
            for (sk, st), b in zip(asks, before, strict=True):
                a = c.search("mrl", xq, 10, space="old@1", shortlist_k=sk, funnel=st)
                assert a.ids.tolist() == b.ids.tolist()
                np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)

        same()
        c.close()
        srv.stop(None)
        srv, port = start_server(data, merge_idle_seconds=0.2)
        c = Client(f"127.0.0.1:{port}", timeout=120)
        assert c.get_collection("mrl").backend == "milvus"
        same()
    finally:
        c.close()
        srv.stop(None)


def test_writes_and_searches_during_a_move(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers (upserts, overwrites, deletes) and readers in threads while the collection moves: no failed
    request, and every acknowledged write is there after the move (deleted ids absent)."""
    monkeypatch.setattr(move, "COPY_BYTES", 32 * 1024)  # small pages: the copy takes a while and writes land in it
    srv, port = start_server(tmp_path / "data", merge_idle_seconds=0.2)
    c = Client(f"127.0.0.1:{port}", timeout=120)
    try:
        c.register_space("old@1", D)
        c.create_collection("c", "old@1", "HNSW16")
        n0 = 3000
        xb = make_data(n0, D, seed=4)
        for i in range(0, n0, 1000):
            c.upsert("c", _ids(n0)[i : i + 1000], xb[i : i + 1000], space="old@1")
        expected: dict[str, np.ndarray | None] = {p: xb[i] for i, p in enumerate(_ids(n0))}
        errors: list[BaseException] = []
        done = threading.Event()
        writes = [0, 0, 0]

        def writer(t: int) -> None:
            rng = np.random.default_rng(10 + t)
            mine: dict[str, np.ndarray | None] = {}
            stripe = _ids(n0)[t * 600 : (t + 1) * 600]  # the originals this writer may change
            i = 0
            try:
                while not done.is_set():
                    if i % 3 == 0:
                        new = [f"w{t}_{i}_{j}" for j in range(10)]
                        x = rng.standard_normal((10, D)).astype(np.float32)
                        c.upsert("c", new, x, space="old@1", payloads=[f'{{"w": {i}}}'] * 10)
                        mine.update(zip(new, x, strict=True))
                    elif i % 3 == 1:
                        old = [stripe[(i * 7 + j) % 600] for j in range(5)]
                        x = rng.standard_normal((5, D)).astype(np.float32)
                        c.upsert("c", old, x, space="old@1")
                        mine.update(zip(old, x, strict=True))
                    else:
                        gone = [stripe[(i * 13) % 600], f"w{t}_{i - 2}_0"]
                        c.delete("c", gone, missing_ok=True)
                        mine.update(dict.fromkeys(gone))
                    writes[t] += 1
                    i += 1
            except BaseException as e:
                errors.append(e)
            expected.update(mine)  # disjoint ids per writer; each writer's last acknowledged write wins

        def reader() -> None:
            try:
                while not done.is_set():
                    res = c.search("c", xb[2500:2504], 5, space="old@1", with_payload=True, ef_search=256)
                    assert res.ids[0, 0] == "p2500"
                    assert [p.id for p in c.get("c", ["p2600", "p2999"], with_vectors=True)] == ["p2600", "p2999"]
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(3)] + [threading.Thread(target=reader)]
        for th in threads:
            th.start()
        time.sleep(0.3)
        try:
            moved: list[object] = []
            mover = threading.Thread(target=lambda: moved.append(c.move_collection("c", str(tmp_path / "engine.db"))))
            mover.start()
            wait_for(lambda: "c" in srv.engine.moving, 10)
            with pytest.raises(FailedPrecondition, match="'c' is being moved; delete it after the move"):
                c.delete_collection("c")  # nor can a migration start meanwhile
            mover.join()
            m = moved[0]
            assert isinstance(m, CollectionMove)
            time.sleep(0.5)  # writes go on on the new side
        finally:
            done.set()
            for th in threads:
                th.join()
        assert not errors, errors
        assert min(writes) > 5
        assert m.writes_caught_up + m.deletes_caught_up > 0, m  # writes landed during the copy
        live = {p: v for p, v in expected.items() if v is not None}
        info = c.get_collection("c")
        # the counts the front-end keeps: the move's verified ones, then every write's
        assert (info.backend, info.num_points, info.vectors_per_space) == ("milvus", len(live), {"old@1": len(live)})
        pids = sorted(live)
        for i in range(0, len(pids), 1000):
            got = c.get("c", pids[i : i + 1000], with_vectors=True)
            for p in got:
                np.testing.assert_allclose(p.vectors["old@1"], _unit(live[p.id]), rtol=1e-5, atol=1e-6)
        deleted = [p for p, v in expected.items() if v is None]
        assert deleted
        for p in deleted[:20]:
            with pytest.raises(NotFound):
                c.get("c", [p])
        assert c.delete("c", deleted, missing_ok=True) == 0
    finally:
        c.close()
        srv.stop(None)


def test_a_point_deleted_between_listing_and_reading_is_left_to_the_catch_up(tmp_path: Path) -> None:
    """The copy lists a page of points, then reads them: a point deleted in between (here deterministically,
    by a delete sent from inside the listing) is not copied as a point without vectors (which a collection
    with one vector field refuses), the move completes and the point stays deleted."""
    srv, port = start_server(tmp_path / "data")
    c = Client(f"127.0.0.1:{port}", timeout=120)
    other = Client(f"127.0.0.1:{port}", timeout=120)
    try:
        c.register_space("old@1", D)
        c.create_collection("g", "old@1")
        x = make_data(40, D, seed=8)
        c.upsert("g", _ids(40), x, space="old@1")
        store = srv.engine.store
        assert store is not None
        listed = store.points_page
        hit: list[int] = []

        def list_then_delete(cid: int, after: str, limit: int) -> list[tuple[str, str | None, int]]:
            meta = listed(cid, after, limit)
            if meta and not hit:
                hit.append(other.delete("g", ["p7"]))
            return meta

        store.points_page = list_then_delete  # type: ignore[method-assign]
        m = c.move_collection("g", str(tmp_path / "engine.db"))
        assert hit == [1]
        assert (m.points_copied, m.num_points) == (39, 39)
        assert m.deletes_caught_up == 1
        with pytest.raises(NotFound):
            c.get("g", ["p7"])
        xq = _unit(x[[6, 8]])
        assert c.search("g", xq, 1, space="old@1").ids[:, 0].tolist() == ["p6", "p8"]
    finally:
        other.close()
        c.close()
        srv.stop(None)


def test_refusals_change_nothing(tmp_path: Path) -> None:
    """Each refusal: the precise status and message, the collection still embedded with its points, no
    collection left in the engine, and the server's health unchanged."""
    uri = str((tmp_path / "engine.db").resolve())
    srv, port = start_server(tmp_path / "data", milvus_timeout_seconds=5.0)  # the unreachable engine: 5 s
    c = Client(f"127.0.0.1:{port}", timeout=120)
    try:
        for name in ("old@1", "new@1", "s3@1", "s4@1", "s5@1"):
            c.register_space(name, D)
        x = make_data(300, D, seed=5)
        Q = _rotation(6)
        c.fit_transform("t", "procrustes", source_space="new@1", target_space="old@1", doc_pairs=(x @ Q, x))
        c.create_collection("ok", "old@1", "HNSW16")
        c.upsert("ok", _ids(300), x, space="old@1")
        c.create_collection("mig", "old@1")
        c.upsert("mig", _ids(10), x[:10], space="old@1")
        c.start_migration("mig", "new@1", "t")
        c.create_collection("prefix", "old@1", prefix_dims=8)
        for sp in ("old@1", "new@1", "s3@1", "s4@1"):  # 4 spaces: one over what a prefix collection's fields hold
            c.upsert("prefix", ["a"], x[:1], space=sp)
        c.create_collection("auto", "old@1", "auto", target_recall=0.9)
        c.create_collection("pq", "old@1", "IVF4,PQ8", 256)
        c.create_collection("wide", "old@1")
        for sp in ("old@1", "new@1", "s3@1", "s4@1", "s5@1"):
            c.upsert("wide", ["a"], x[:1], space=sp)
        c.create_collection("on", "old@1", backend="milvus", backend_uri=uri)
        c.create_collection("big", "old@1")  # a payload the server takes (65,536 bytes) but Milvus' VARCHAR not
        c.upsert("big", _ids(20), x[:20], space="old@1", payloads=['"' + "a" * 65534 + '"'] + ["{}"] * 19)
        state = {i.name: (i.backend, i.num_points, i.vectors_per_space) for i in c.list_collections()}
        engine_before = _milvus_names(srv, uri)
        bad = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
        refusals = [
            ("nope", uri, NotFound, "collection 'nope' does not exist"),
            ("on", uri, FailedPrecondition, "'on' is already on the milvus backend at " + uri),
            ("mig", uri, FailedPrecondition, "'mig' has a running migration to space 'new@1'.*finish or abort it"),
            (
                "prefix",
                uri,
                FailedPrecondition,
                r"'prefix' has vectors in 4 spaces \(old@1, new@1, s3@1, s4@1\); a"
                r" milvus collection holds at most 4 vector fields \(3 spaces and a Matryoshka prefix field\)",
            ),
            ("auto", uri, FailedPrecondition, r"'auto' uses index_spec 'auto' \(the index advisor\)"),
            ("pq", uri, FailedPrecondition, r"'pq' cannot be moved: index spec 'IVF4,PQ8' is not supported by the"),
            ("wide", uri, FailedPrecondition, r"'wide' has vectors in 5 spaces \(old@1, new@1, s3@1, s4@1, s5@1\);"),
            ("ok", bad, Unavailable, f"milvus engine at {bad} is unreachable"),
            # found by the copy: the engine's collection is dropped again
            ("big", uri, FailedPrecondition, "point 'p0' has a payload of 65536 bytes; the milvus backend holds at"),
        ]
        for name, to, exc, msg in refusals:
            with pytest.raises(exc, match=msg):
                c.move_collection(name, to)
        stubs = connect(port)
        for backend, to, msg in (
            ("embedded", uri, "backend 'embedded': collections move to the 'milvus' backend only"),
            ("milvus", "ftp://host/x", "neither a Milvus address"),
        ):
            with pytest.raises(grpc.RpcError) as err:
                stubs.collections.MoveCollection(cpb.MoveCollectionRequest(name="ok", backend=backend, backend_uri=to))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and msg in str(err.value.details())
        stubs.channel.close()
        with pytest.raises(InvalidArgument, match="neither milvus://HOST:PORT"):
            c.move_collection("ok", "/no/such/dir")  # the client's own check: not a .db file
        # another front-end holds a collection of that name in the engine: refused, not dropped (an engine of
        # its own: Milvus Lite stops a file's server when either front-end closes it)
        shared = str(tmp_path / "shared.db")
        other, oport = start_server(tmp_path / "other", backend="milvus", milvus_uri=shared)
        try:
            with Client(f"127.0.0.1:{oport}") as oc:
                oc.register_space("old@1", D)
                oc.create_collection("ok", "old@1")
                oc.upsert("ok", ["theirs"], x[:1], space="old@1")
                with pytest.raises(FailedPrecondition, match=r"already exists at .* not a leftover of a move"):
                    c.move_collection("ok", shared)
                assert oc.get_collection("ok").num_points == 1
                oc.delete_collection("ok")
        finally:
            other.stop(None)
        assert {i.name: (i.backend, i.num_points, i.vectors_per_space) for i in c.list_collections()} == state
        assert _milvus_names(srv, uri) == engine_before
        assert c.health() == "SERVING"
        res = c.search("ok", x[:3], 1, space="old@1")
        assert res.ids[:, 0].tolist() == ["p0", "p1", "p2"]
        assert c.get_migration("mig").phase == "backfill"
    finally:
        c.close()
        srv.stop(None)


def test_a_crashed_moves_leftover_is_dropped(tmp_path: Path) -> None:
    """A Milvus collection a crashed move left behind (its marker) is dropped and made again by the next move."""
    from interlingua.server.backends.milvus import MilvusCollection
    from interlingua.server.backends.milvus_schema import field_name
    from interlingua.server.backends.milvus_table import upsert_rows

    uri = str(tmp_path / "engine.db")
    srv, port = start_server(tmp_path / "data")
    c = Client(f"127.0.0.1:{port}", timeout=120)
    try:
        c.register_space("old@1", D)
        c.create_collection("g", "old@1")
        x = make_data(50, D, seed=7)
        c.upsert("g", _ids(50), x, space="old@1")
        eng = srv.engine
        col = eng.collections["g"]
        row = dataclasses.replace(col.row, spec=dataclasses.replace(col.row.spec, backend="milvus", backend_uri=uri))
        left = MilvusCollection(row, col.home, eng.spaces, eng.store, eng.milvus, eng.metrics)
        left.create([col.home], marker=move.marker(col.row))
        f = field_name("old@1")
        junk = {"pk": 0, "id": "junk", "payload": None, "seq": 0, f: _unit(x[0])}  # (one vector field: no spaces)
        left._call("upsert", functools.partial(upsert_rows, left.mname, [junk], 10.0))
        m = c.move_collection("g", uri)
        assert (m.points_copied, m.num_points) == (50, 50)
        with pytest.raises(NotFound):
            c.get("g", ["junk"])
        assert c.search("g", x[:2], 1, space="old@1").ids[:, 0].tolist() == ["p0", "p1"]
    finally:
        c.close()
        srv.stop(None)


def test_cli_move_and_milvus_uris(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert milvus_uri("milvus://milvus:19530") == "http://milvus:19530"
    assert milvus_uri("milvus://10.0.0.7") == "http://10.0.0.7:19530"
    assert milvus_uri("milvus://h:1234/") == "http://h:1234"
    assert milvus_uri("http://h:1") == "http://h:1" and milvus_uri("https://h") == "https://h"
    assert milvus_uri("") == ""
    assert milvus_uri("rel/m.db") == os.path.abspath("rel/m.db") and milvus_uri("/a/m.db") == "/a/m.db"
    for bad in ("milvus://", "milvus://h:x", "/data/milvus", "ftp://h/x.db"):
        with pytest.raises(ValueError, match="is n"):
            milvus_uri(bad)
    srv, port = start_server(tmp_path / "data", milvus_timeout_seconds=5.0)
    target = f"127.0.0.1:{port}"
    try:
        with Client(target) as c:
            c.register_space("old@1", D)
            c.create_collection("g", "old@1")
            c.upsert("g", _ids(40), make_data(40, D, seed=8), space="old@1", payloads=['{"a": 1}'] * 40)
        closed = _free_port()
        assert main(["collections", "move", "g", "--to", f"milvus://127.0.0.1:{closed}", "--target", target]) == 1
        assert (
            f"error: UNAVAILABLE: milvus engine at http://127.0.0.1:{closed} is unreachable" in capsys.readouterr().err
        )
        assert main(["collections", "move", "g", "--to", "/data/milvus", "--target", target]) == 2
        assert "neither milvus://HOST:PORT" in capsys.readouterr().err
        db = (tmp_path / "engine.db").resolve()
        assert main(["collections", "move", "g", "--to", str(db), "--target", target]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"moved collection g to milvus at {db}: 40 points (40 vectors) copied") and "top-1" in out
        with Client(target) as c:
            c.create_collection("h", "old@1")
            c.upsert("h", _ids(20), make_data(20, D, seed=9), space="old@1")
        assert main(["collections", "move", "h", "--to", str(db), "--target", target, "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["collection"]["backend"] == "milvus" and got["num_points"] == 20 and got["spot_queries"] == 20
    finally:
        srv.stop(None)


_NO_PYMILVUS = """
import sys
sys.modules["pymilvus"] = None  # import pymilvus -> ImportError, as without the extra
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from conftest import make_data, start_server
from interlingua.client import Client, FailedPrecondition
srv, port = start_server(Path(sys.argv[1]))
with Client(f"127.0.0.1:{port}") as c:
    c.register_space("s@1", 4)
    c.create_collection("e", "s@1")
    c.upsert("e", ["a"], make_data(1, 4), space="s@1")
    try:
        c.move_collection("e", str(Path(sys.argv[1]) / "m.db"))
    except FailedPrecondition as e:
        print("REFUSED", e.message)
    info = c.get_collection("e")
    print("LEFT", info.backend, info.num_points, c.health())
srv.stop(None)
"""


def test_move_without_pymilvus_gives_the_install_hint(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", _NO_PYMILVUS, str(tmp_path / "d"), str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "REFUSED the milvus backend needs pymilvus and milvus-lite: pip install 'interlingua[milvus]'" in run.stdout
    assert "LEFT embedded 1 SERVING" in run.stdout
