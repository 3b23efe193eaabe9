"""A milvus collection's primary keys are dense INT64s the front-end hands out (``milvus_table.py``,
"Keys"): an existing point keeps its key, a new one takes the next, no key is handed out twice (after a
restart, a store restored from an older copy, a move's catch-up), and a collection created before, whose
primary key is the point id, is still served. Answers are checked against numpy.
"""

from __future__ import annotations

import importlib.util
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import brute_force, make_data, milvus_keys, start_server

from interlingua.client import Client, NotFound
from interlingua.server.backends.milvus_table import key_map

HAVE_MILVUS = all(importlib.util.find_spec(m) is not None for m in ("pymilvus", "milvus_lite"))
pytestmark = pytest.mark.skipif(not HAVE_MILVUS, reason="needs the milvus extra: pip install 'interlingua[milvus]'")
D, N = 16, 300


def test_keys_are_dense_kept_on_overwrite_and_never_reused(tmp_path: Path) -> None:
    srv, port = start_server(tmp_path / "data", backend="milvus")
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as c:
            c.register_space("s", D)
            c.create_collection("g", "s", "Flat")
            xb = make_data(N, D, seed=1)
            ids = np.array([f"p{i}" for i in range(N)])
            c.upsert("g", list(ids[:200]), xb[:200], space="s", payloads=[f'{{"i": {i}}}' for i in range(200)])
            c.upsert("g", list(ids[100:]), xb[100:], space="s")  # 100 overwritten, 100 new
            keys = milvus_keys(srv, "g")
            assert sorted(keys.values()) == list(range(N))  # dense, in write order
            col = srv.engine.collections["g"]
            desc = col._call("d", lambda m: m.describe_collection(col.mname))
            assert "spaces" not in {f["name"] for f in desc["fields"]}  # one vector field: no ``spaces`` array
            assert col.has_spaces is False
            assert keys["p150"] == 150 and keys["p250"] == 250  # the overwrite kept its key
            c.delete("g", ["p0", "p1"])
            c.upsert("g", ["p0"], xb[:1], space="s")  # deleted, then written again: a new key
            keys = milvus_keys(srv, "g")
            assert keys["p0"] == N and "p1" not in keys
            assert c.get("g", ["p50"], with_payload=True)[0].payload == {"i": 50}  # kept by the merge
            col = srv.engine.collections["g"]
            kmap = col._call("q", lambda m: m.query(key_map(col.mname), filter='id != ""', output_fields=["key"],
                                                    limit=16384))  # fmt: skip
            assert {str(r["id"]): int(r["key"]) for r in kmap} == keys  # the key map: the same pairs, p1 gone
            # a crash between the key map and the rows: an entry whose row is missing is ignored, then replaced
            col._call("u", lambda m: m.upsert(key_map(col.mname), [{"id": "ghost", "key": 10**6, "z": [0.0, 0.0]}]))
            with pytest.raises(NotFound):
                c.get("g", ["ghost"])
            c.upsert("g", ["ghost"], xb[1:2], space="s")
            keys = milvus_keys(srv, "g")
            assert keys["ghost"] == N + 1
            c.delete("g", ["ghost"])
            xq = make_data(10, D, seed=2)
            live = np.array([i for i in range(N) if i != 1])
            _, ref = brute_force(xb[live], xq, 10)
            np.testing.assert_array_equal(c.search("g", xq, 10, space="s").ids, ids[live][ref])
        srv.stop(None)
        # a store restored from an older copy: its counter is behind the engine's keys
        db = sqlite3.connect(tmp_path / "data" / "interlingua.db")
        with db:
            assert db.execute("UPDATE meta SET value=5 WHERE key LIKE 'keys:%'").rowcount == 1
        db.close()
        srv, port = start_server(tmp_path / "data", backend="milvus")
        with Client(f"127.0.0.1:{port}", timeout=60) as c:
            extra = make_data(3, D, seed=3)
            c.upsert("g", ["q0", "q1", "q2"], extra, space="s")
            keys = milvus_keys(srv, "g")  # (no key handed out twice)
            assert sorted(keys[p] for p in ("q0", "q1", "q2")) == [N + 1, N + 2, N + 3]  # past the engine's largest
            assert len(keys) == N - 1 + 3
            xq = make_data(10, D, seed=4)
            allx, allids = np.vstack([xb[live], extra]), np.concatenate([ids[live], ["q0", "q1", "q2"]])
            _, ref = brute_force(allx, xq, 10)
            np.testing.assert_array_equal(c.search("g", xq, 10, space="s").ids, allids[ref])
    finally:
        srv.stop(None)


def test_a_collection_keyed_by_the_point_id_is_still_served(tmp_path: Path) -> None:
    """A collection created before dense keys (``id`` its VARCHAR primary key) serves every request."""
    from pymilvus import DataType, MilvusClient

    from interlingua.server.backends.milvus_schema import MAX_ID_CHARS, field_name

    srv, port = start_server(tmp_path / "data", backend="milvus")
    xb, ids = make_data(N, D, seed=5), np.array([f"p{i}" for i in range(N)])
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as c:
            c.register_space("s", D)
            c.create_collection("g", "s", "HNSW16")
        col = srv.engine.collections["g"]
        mname, uri = col.mname, col.uri
    finally:
        srv.stop(None)
    mc = MilvusClient(uri)  # the schema this version created before
    try:
        mc.drop_collection(mname)
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_CHARS)
        schema.add_field("payload", DataType.VARCHAR, max_length=65535, nullable=True)
        schema.add_field("seq", DataType.INT64)
        schema.add_field("spaces", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=1, max_length=32)
        schema.add_field(field_name("s"), DataType.FLOAT_VECTOR, dim=D)
        index = MilvusClient.prepare_index_params()
        index.add_index(field_name("s"), index_type="HNSW", metric_type="IP", params={"M": 16, "efConstruction": 40})
        mc.create_collection(mname, schema=schema, index_params=index, consistency_level="Strong")
    finally:
        mc.close()
    srv, port = start_server(tmp_path / "data", backend="milvus")
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as c:
            c.upsert("g", list(ids[:200]), xb[:200], space="s", payloads=["{}"] * 200)
            c.upsert("g", list(ids[100:]), xb[100:], space="s")
            c.delete("g", ["p7"])
            assert srv.engine.collections["g"].keyed is False
            assert c.get("g", ["p150"], with_payload=True)[0].payload == {}
            live = np.array([i for i in range(N) if i != 7])
            xq = make_data(10, D, seed=6)
            _, ref = brute_force(xb[live], xq, 10)
            got = c.search("g", xq, 10, space="s", ef_search=256)
            recall = np.mean([len(set(got.ids[i]) & set(ids[live][ref[i]])) / 10 for i in range(10)])
            assert recall >= 0.95
            assert c.get_collection("g").num_points == N - 1
    finally:
        srv.stop(None)
