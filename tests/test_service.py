"""Every RPC over a real server: spaces, collections, points, health, reflection, metrics, auth."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import Stubs, connect, make_data, start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from interlingua.server import Lifecycle, Server
from interlingua.v1 import collections_pb2 as cpb
from interlingua.v1 import common_pb2 as pb
from interlingua.v1 import points_pb2 as ppb
from interlingua.v1 import spaces_pb2 as spb

POINTS = "interlingua.v1.PointService"


def test_spaces_register_get_list(stubs: Stubs) -> None:
    s = stubs.register("minilm-l6@1", 384, pb.METRIC_COSINE)
    assert (s.name, s.dim, s.metric) == ("minilm-l6@1", 384, pb.METRIC_COSINE) and s.created_at > 0
    stubs.spaces.RegisterSpace(
        spb.RegisterSpaceRequest(space=pb.Space(name="e5-small@2", dim=384, metric=pb.METRIC_IP, description="e5"))
    )
    assert stubs.spaces.GetSpace(spb.GetSpaceRequest(name="e5-small@2")).description == "e5"
    names = [x.name for x in stubs.spaces.ListSpaces(spb.ListSpacesRequest()).spaces]
    assert names == ["e5-small@2", "minilm-l6@1"]


def test_collections_create_get_list_delete(stubs: Stubs) -> None:
    stubs.register("s", 16)
    info = stubs.create("b", "s", "HNSW32")
    assert (info.name, info.home_space, info.index_spec, info.state) == ("b", "s", "HNSW32", cpb.INDEX_STATE_READY)
    info = stubs.create("a", "s", "")
    assert info.index_spec == "Flat" and info.num_points == 0
    stubs.upsert("a", "s", ["x", "y"], make_data(2, 16))
    info = stubs.info("a")
    assert info.num_points == 2 and dict(info.vectors_per_space) == {"s": 2} and info.last_sequence > 0
    listed = stubs.collections.ListCollections(cpb.ListCollectionsRequest()).collections
    assert [c.name for c in listed] == ["a", "b"]
    stubs.collections.DeleteCollection(cpb.DeleteCollectionRequest(name="a"))
    assert [c.name for c in stubs.collections.ListCollections(cpb.ListCollectionsRequest()).collections] == ["b"]
    # the name can be reused, and the new collection starts empty
    assert stubs.create("a", "s").num_points == 0


def test_points_upsert_get_delete_and_other_spaces(stubs: Stubs) -> None:
    stubs.register("old@1", 8, pb.METRIC_IP)
    stubs.register("new@2", 12, pb.METRIC_IP)
    stubs.create("g", "old@1")
    xo, xn = make_data(3, 8, seed=1), make_data(2, 12, seed=2)
    stubs.upsert("g", "old@1", ["a", "b", "c"], xo, payloads=['{"n": 1}', "", '{"n": 3}'])
    stubs.upsert("g", "new@2", ["a", "z"], xn)  # a new-model vector for a, and a point only in new@2
    info = stubs.info("g")
    assert info.num_points == 4 and dict(info.vectors_per_space) == {"old@1": 3, "new@2": 2}
    got = stubs.points.GetPoints(
        ppb.GetPointsRequest(collection="g", ids=["a", "z", "b"], with_vectors=True, with_payload=True)
    ).points
    assert [p.id for p in got] == ["a", "z", "b"]
    assert [v.space for v in got[0].vectors] == ["new@2", "old@1"]
    np.testing.assert_array_equal(np.frombuffer(got[0].vectors[1].vector.data, "<f4"), xo[0])
    np.testing.assert_array_equal(np.frombuffer(got[0].vectors[0].vector.data, "<f4"), xn[0])
    assert got[0].payload == '{"n": 1}' and got[2].payload == "" and got[1].payload == ""
    only = stubs.points.GetPoints(ppb.GetPointsRequest(collection="g", ids=["a"], with_vectors=True, spaces=["new@2"]))
    assert [v.space for v in only.points[0].vectors] == ["new@2"]
    bare = stubs.points.GetPoints(ppb.GetPointsRequest(collection="g", ids=["a"])).points[0]
    assert not bare.vectors and bare.payload == "" and bare.sequence > 0
    # only home-space vectors are indexed: z is not a search result
    _, ids, _ = stubs.search("g", "old@1", xo, 4)
    assert "z" not in set(ids.ravel())
    # an upsert without payloads keeps the payload
    stubs.upsert("g", "old@1", ["a"], xo[1:2])
    a = stubs.points.GetPoints(ppb.GetPointsRequest(collection="g", ids=["a"], with_payload=True)).points[0]
    assert a.payload == '{"n": 1}'
    r = stubs.points.DeletePoints(ppb.DeletePointsRequest(collection="g", ids=["a", "z"]))
    assert r.deleted == 2 and r.sequence > 0
    info = stubs.info("g")
    assert info.num_points == 2 and dict(info.vectors_per_space) == {"old@1": 2, "new@2": 0}


def test_upsert_stream(stubs: Stubs) -> None:
    stubs.register("s", 8)
    stubs.create("g", "s")
    x = make_data(300, 8, seed=3)
    reqs = (
        ppb.UpsertRequest(
            collection="g",
            space="s",
            ids=[str(i) for i in range(j, j + 100)],
            vectors=pb.Vectors(data=x[j : j + 100].tobytes(), dim=8),
        )
        for j in range(0, 300, 100)
    )
    r = stubs.points.UpsertStream(reqs)
    assert r.upserted == 300 and r.sequence > 0 and stubs.info("g").num_points == 300


def test_health_reflection_and_metrics(tmp_path: Path) -> None:
    srv, port = start_server(tmp_path / "d", metrics_port=0)
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "interlingua.v1.PointService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {
            "interlingua.v1.SpaceService",
            "interlingua.v1.CollectionService",
            "interlingua.v1.PointService",
            "grpc.health.v1.Health",
        } <= names
        s = connect(port)
        s.register("s", 8)
        s.create("g", "s")
        s.upsert("g", "s", ["a", "b"], make_data(2, 8))
        s.search("g", "s", make_data(3, 8), 1)
        with pytest.raises(grpc.RpcError):
            s.search("g", "nope", make_data(3, 8), 1)
        text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics").read().decode()
        for line in (
            f'grpc_server_handled_total{{grpc_code="OK",grpc_method="Search",grpc_service="{POINTS}"}} 1.0',
            f'grpc_server_handled_total{{grpc_code="NOT_FOUND",grpc_method="Search",grpc_service="{POINTS}"}} 1.0',
            'interlingua_search_queries_total{collection="g",query_space="s",route="identity"} 3.0',
            'interlingua_points{collection="g",space="s"} 2.0',
            "interlingua_recovery_replayed_total 0.0",
        ):
            assert line in text, line
        for name in (
            "grpc_server_handling_seconds_bucket",
            'interlingua_search_seconds_count{collection="g",stage="index"}',
            'interlingua_index_ready{collection="g"}',
            "interlingua_index_checkpoint_seconds_count",
        ):
            assert name in text, name
        srv.stop(None)
        assert srv.engine.state is Lifecycle.STOPPED
    finally:
        srv.stop(None)


def test_api_key(tmp_path: Path) -> None:
    srv, port = start_server(tmp_path / "d", api_key="s3cret")
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        s = connect(port)
        with pytest.raises(grpc.RpcError) as exc:
            s.spaces.ListSpaces(spb.ListSpacesRequest())
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED and "missing" in (exc.value.details() or "")
        with pytest.raises(grpc.RpcError) as exc:
            s.spaces.ListSpaces(spb.ListSpacesRequest(), metadata=[("authorization", "Bearer wrong")])
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED and "wrong" in (exc.value.details() or "")
        with pytest.raises(grpc.RpcError) as exc:
            s.points.UpsertStream(iter([ppb.UpsertRequest()]))
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert s.spaces.ListSpaces(spb.ListSpacesRequest(), metadata=[("authorization", "Bearer s3cret")]) is not None
        # health stays open for load balancers
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status == 1
    finally:
        srv.stop(None)


def test_create_server_returns_bound_port(server: tuple[Server, int]) -> None:
    srv, port = server
    assert port > 0 and srv.port == port


def test_numpy_blas_threads_are_limited_and_faiss_blas_left_alone(tmp_path: Path) -> None:
    from threadpoolctl import threadpool_info

    srv, _ = start_server(tmp_path / "d", numpy_blas_threads=1)
    try:
        libs = {Path(i["filepath"]).parent.name: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
        assert [n for name, n in libs.items() if name.startswith("numpy")] == [1]
    finally:
        srv.stop(None)
