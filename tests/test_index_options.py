"""Index build options: HNSW ``ef_construction`` reaches the FAISS graph, survives restart, and is
checked (INVALID_ARGUMENT, nothing created) where it does not apply; stores written before the
column existed open and migrate."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import faiss
import grpc
import numpy as np
import pytest
from conftest import Stubs, brute_force, connect, make_data, start_server

from interlingua.server import Server
from interlingua.v1 import collections_pb2 as cpb

D = 32


def create(stubs: Stubs, name: str, spec: str, efc: int) -> cpb.CollectionInfo:
    return stubs.collections.CreateCollection(
        cpb.CreateCollectionRequest(name=name, home_space="s", index_spec=spec, ef_construction=efc)
    )


def wait_sealed(stubs: Stubs, name: str, n: int) -> None:
    deadline = time.monotonic() + 60
    while stubs.info(name).indexed_vectors < n:
        assert time.monotonic() < deadline, stubs.info(name)
        time.sleep(0.05)


def sealed_hnsw(server: Server, name: str) -> object:
    sealed = server.engine.collection(name).segments.snapshot.sealed
    assert sealed is not None
    return sealed.hnsw


def test_ef_construction_builds_the_graph_with_it(tmp_path: Path) -> None:
    server, port = start_server(tmp_path / "data", merge_idle_seconds=0.05)
    stubs = connect(port)
    try:
        stubs.register("s", D)
        info = create(stubs, "g", "HNSW16", 200)
        assert info.ef_construction == 200
        assert create(stubs, "default", "HNSW16", 0).ef_construction == 0
        xb, xq = make_data(2000, D, seed=1), make_data(50, D, seed=2)
        stubs.upsert("g", "s", [str(i) for i in range(len(xb))], xb)
        wait_sealed(stubs, "g", len(xb))
        assert sealed_hnsw(server, "g").efConstruction == 200  # type: ignore[attr-defined]
        _, ids, _ = stubs.search("g", "s", xq, 10, ef_search=64)
        _, I = brute_force(xb, xq, 10)
        got = np.vectorize(int)(ids)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, I, strict=True)])
        assert recall >= 0.95
    finally:
        stubs.channel.close()
        server.stop(None)
    server, port = start_server(tmp_path / "data")  # restart: the option is part of the collection
    stubs = connect(port)
    try:
        assert stubs.info("g").ef_construction == 200
        assert stubs.info("default").ef_construction == 0
    finally:
        stubs.channel.close()
        server.stop(None)


@pytest.mark.parametrize(
    ("spec", "efc", "needle"),
    [
        ("Flat", 100, "ef_construction applies to HNSW indexes"),
        ("IVF16,Flat", 100, "ef_construction applies to HNSW indexes"),
        ("HNSW16", 5000, "ef_construction is 5000; it must be at most 4096"),
    ],
)
def test_ef_construction_rejected(stubs: Stubs, spec: str, efc: int, needle: str) -> None:
    stubs.register("s", D)
    with pytest.raises(grpc.RpcError) as e:
        create(stubs, "c", spec, efc)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (e.value.details() or "")
    assert not stubs.collections.ListCollections(cpb.ListCollectionsRequest()).collections


def test_store_from_before_ef_construction_migrates(tmp_path: Path) -> None:
    server, port = start_server(tmp_path / "data")
    stubs = connect(port)
    stubs.register("s", D)
    stubs.create("old", "s", "HNSW16")
    stubs.channel.close()
    server.stop(None)
    db = tmp_path / "data" / "interlingua.db"
    with sqlite3.connect(db) as con:  # as an earlier version wrote it: no ef_construction column
        con.execute("ALTER TABLE collections DROP COLUMN ef_construction")
    server, port = start_server(tmp_path / "data")
    stubs = connect(port)
    try:
        assert stubs.info("old").ef_construction == 0
        assert create(stubs, "new", "HNSW16", 64).ef_construction == 64
    finally:
        stubs.channel.close()
        server.stop(None)


def test_ef_construction_inside_a_pretransform(tmp_path: Path) -> None:
    """``PCA16,HNSW16``: the option reaches the HNSW graph inside the IndexPreTransform, and
    ef_search applies to it too."""
    server, port = start_server(tmp_path / "data", merge_idle_seconds=0.05)
    stubs = connect(port)
    try:
        stubs.register("s", D)
        assert create(stubs, "p", "PCA16,HNSW16", 64).ef_construction == 64
        xb = make_data(1200, D, seed=5)
        stubs.upsert("p", "s", [str(i) for i in range(len(xb))], xb)
        wait_sealed(stubs, "p", len(xb))
        sealed = server.engine.collection("p").segments.snapshot.sealed
        assert sealed is not None
        assert faiss.downcast_index(sealed.index).hnsw.efConstruction == 64
        _, ids, _ = stubs.search("p", "s", xb[:5], 3, ef_search=32)
        assert list(ids[:, 0]) == ["0", "1", "2", "3", "4"]
    finally:
        stubs.channel.close()
        server.stop(None)
