"""Matryoshka prefix collections and funnel search, against a numpy brute-force reference."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import Stubs, brute_force, connect, make_data, start_server

from interlingua.server.funnel import check_funnel, rerank, shrink
from interlingua.v1 import collections_pb2 as cpb
from interlingua.v1 import common_pb2 as pb
from interlingua.v1 import points_pb2 as ppb

D = 32


def wait_merged(s: Stubs, name: str) -> cpb.CollectionInfo:
    for _ in range(600):
        info = s.info(name)
        if info.fresh_vectors == 0 and info.state == cpb.INDEX_STATE_READY:
            return info
        time.sleep(0.05)
    raise AssertionError(f"{name} not merged")


def funnel_search(
    s: Stubs,
    col: str,
    xq: np.ndarray,
    k: int,
    shortlist_k: int | None = None,
    stages: list[tuple[int, int]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    params = pb.SearchParams(funnel=[pb.FunnelStage(dims=a, keep=b) for a, b in stages or []])
    if shortlist_k is not None:
        params.shortlist_k = shortlist_k
    r = s.points.Search(
        ppb.SearchRequest(
            collection=col,
            query_space="s",
            k=k,
            params=params,
            queries=pb.Vectors(data=np.ascontiguousarray(xq, "<f4").tobytes(), dim=xq.shape[1]),
        )
    )
    return np.frombuffer(r.scores, "<f4").reshape(r.nq, r.k), np.array(list(r.ids), dtype=object).reshape(r.nq, r.k)


def test_shrink_truncates_then_normalizes() -> None:
    x = np.array([[3.0, 4.0, 12.0]], dtype=np.float32)
    np.testing.assert_allclose(shrink(x, 2, normalize=True), [[0.6, 0.8]], rtol=1e-6)
    np.testing.assert_allclose(shrink(x, 2, normalize=False), [[3.0, 4.0]])


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_rerank_with_every_candidate_equals_brute_force(metric: str) -> None:
    xb, xq = make_data(300, D, seed=1), make_data(10, D, seed=2)
    if metric == "cosine":
        xb /= np.linalg.norm(xb, axis=1, keepdims=True)
        xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    cand = np.tile(np.arange(300), (10, 1))
    Dr, Ir = rerank(xq, xb, cand, [(8, 300), (16, 300), (D, 5)], metric)  # keep everything until the end
    Dref, Iref = brute_force(xb, xq, 5, metric)
    np.testing.assert_allclose(Dr, Dref, rtol=1e-4, atol=1e-4)
    assert (Ir == Iref).mean() > 0.99


@pytest.mark.parametrize(("metric", "spec"), [("cosine", "Flat"), ("cosine", "HNSW32"), ("l2", "Flat")])
def test_funnel_with_large_shortlist_equals_full_search(tmp_path: Path, metric: str, spec: str) -> None:
    srv, port = start_server(tmp_path / "d")
    try:
        s = connect(port)
        s.register("s", D, pb.METRIC_COSINE if metric == "cosine" else pb.METRIC_L2)
        info = s.collections.CreateCollection(
            cpb.CreateCollectionRequest(name="mrl", home_space="s", index_spec=spec, prefix_dims=8)
        )
        assert info.prefix_dims == 8 and info.rerank_bytes_per_vector == 4 * D
        decay = np.geomspace(4.0, 0.1, D).astype(np.float32)  # Matryoshka-like: leading dims carry most
        xb, xq = make_data(1500, D, seed=3) * decay, make_data(40, D, seed=4) * decay
        ids = np.array([f"p{i}" for i in range(len(xb))], dtype=object)
        s.upsert("mrl", "s", list(ids[:1000]), xb[:1000])
        wait_merged(s, "mrl")
        s.upsert("mrl", "s", list(ids[1000:]), xb[1000:])  # some in the fresh segment
        s.points.DeletePoints(ppb.DeletePointsRequest(collection="mrl", ids=list(ids[:50])))
        live = np.ones(len(xb), bool)
        live[:50] = False
        Dref, Iref = brute_force(xb[live], xq, 10, metric)
        Dg, Ig = funnel_search(s, "mrl", xq, 10, shortlist_k=1500, stages=[(16, 1000)])
        np.testing.assert_allclose(Dg, Dref, rtol=1e-4, atol=1e-4)
        assert (Ig == ids[live][Iref]).mean() > 0.99
        # the default shortlist (max(10k, 100)) is approximate, and close when the prefix carries the structure
        _, Id = funnel_search(s, "mrl", xq, 10)
        assert np.mean([len(set(Id[i]) & set(ids[live][Iref[i]])) / 10 for i in range(len(xq))]) > 0.9
        # it survives a restart (the rerank cache is rebuilt from the store)
        s.channel.close()
        srv.stop(None)
        srv, port = start_server(tmp_path / "d")
        s = connect(port)
        Dg2, Ig2 = funnel_search(s, "mrl", xq, 10, shortlist_k=1500, stages=[(16, 1000)])
        assert (Ig2 == Ig).all()
        np.testing.assert_allclose(Dg2, Dg, rtol=1e-5, atol=1e-6)
        s.channel.close()
    finally:
        srv.stop(None)


def test_funnel_validation(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="shortlist_k is 5; it must be between k=10"):
        check_funnel(D, 8, 10, 5, [])
    with pytest.raises(Exception, match=r"funnel\[1\].dims is 12; stage dims must increase"):
        check_funnel(D, 8, 10, 100, [(16, 50), (12, 20)])
    with pytest.raises(Exception, match=r"funnel\[0\].keep is 200; it must be between k=10 and the previous 100"):
        check_funnel(D, 8, 10, 100, [(16, 200)])
    assert check_funnel(D, 8, 10, None, [(16, 50)]) == (100, [(16, 50), (D, 10)])
    srv, port = start_server(tmp_path / "d")
    try:
        s = connect(port)
        s.register("s", D)
        for prefix, match in ((D, "prefix_dims is 32"), (40, "prefix_dims is 40")):
            with pytest.raises(grpc.RpcError) as exc:
                s.collections.CreateCollection(
                    cpb.CreateCollectionRequest(name="x", home_space="s", prefix_dims=prefix)
                )
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and match in (exc.value.details() or "")
        s.create("plain", "s")
        s.upsert("plain", "s", ["a"], make_data(1, D))
        with pytest.raises(grpc.RpcError) as exc:
            funnel_search(s, "plain", make_data(1, D), 1, shortlist_k=10)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prefix_dims" in (exc.value.details() or "")
        s.collections.CreateCollection(cpb.CreateCollectionRequest(name="mrl", home_space="s", prefix_dims=8))
        s.upsert("mrl", "s", ["a"], make_data(1, D))
        with pytest.raises(grpc.RpcError) as exc:
            funnel_search(s, "mrl", make_data(1, D), 10, stages=[(4, 50)])
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "funnel[0].dims is 4" in (
            exc.value.details() or ""
        )
        s.channel.close()
    finally:
        srv.stop(None)


def test_basis_transform_rotates_the_index_and_keeps_full_scores(tmp_path: Path) -> None:
    from interlingua.v1 import transforms_pb2 as tpb
    from interlingua.v1 import transforms_pb2_grpc as tgrpc

    srv, port = start_server(tmp_path / "d")
    try:
        s = connect(port)
        s.register("s", D)
        s.register("other", D)
        t = tgrpc.TransformServiceStub(s.channel)
        rng = np.random.default_rng(7)
        Q, _ = np.linalg.qr(rng.standard_normal((D, D)))
        calib = make_data(400, D, seed=8)
        calib /= np.linalg.norm(calib, axis=1, keepdims=True)

        def vec(x: np.ndarray) -> pb.Vectors:
            return pb.Vectors(data=np.ascontiguousarray(x, "<f4").tobytes(), dim=D)

        def fit(name: str, target: str) -> None:
            t.FitTransform(
                iter(
                    [
                        tpb.FitTransformRequest(
                            header=tpb.FitHeader(
                                name=name,
                                kind=tpb.TRANSFORM_KIND_PROCRUSTES,
                                source_space="s",
                                target_space=target,
                                config_json='{"center": false, "scale": false}',
                            )
                        ),
                        tpb.FitTransformRequest(
                            pairs=tpb.PairBatch(side=tpb.PAIR_SIDE_DOC, source=vec(calib), target=vec(calib @ Q))
                        ),
                    ]
                )
            )
            for _ in range(400):
                if t.GetTransform(tpb.GetTransformRequest(name=name)).state == tpb.TRANSFORM_STATE_READY:
                    return
                time.sleep(0.05)
            raise AssertionError(name)

        fit("rot", "s")  # an orthogonal map of the home space onto itself
        fit("elsewhere", "other")
        info = s.collections.CreateCollection(
            cpb.CreateCollectionRequest(name="rotated", home_space="s", prefix_dims=8, basis_transform="rot")
        )
        assert info.basis_transform == "rot"
        s.create("plain", "s")
        xb, xq = make_data(800, D, seed=9), make_data(20, D, seed=10)
        ids = [f"p{i}" for i in range(len(xb))]
        for col in ("rotated", "plain"):
            s.upsert(col, "s", ids, xb)
        Dr, Ir = funnel_search(s, "rotated", xq, 5, shortlist_k=800)
        Dp, Ip, _ = s.search("plain", "s", xq, 5)
        np.testing.assert_allclose(Dr, Dp, rtol=1e-4, atol=1e-4)  # a rotation keeps every full-dim score
        assert (Ir == Ip).mean() > 0.98
        got = s.points.GetPoints(ppb.GetPointsRequest(collection="rotated", ids=["p3"], with_vectors=True))
        stored = np.frombuffer(got.points[0].vectors[0].vector.data, "<f4")
        np.testing.assert_allclose(stored, xb[3] / np.linalg.norm(xb[3]), rtol=1e-5)  # the store keeps them as given
        with pytest.raises(grpc.RpcError) as exc:
            s.collections.CreateCollection(
                cpb.CreateCollectionRequest(name="bad", home_space="s", basis_transform="elsewhere")
            )
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "onto itself" in (exc.value.details() or "")
        with pytest.raises(grpc.RpcError) as exc:
            s.collections.CreateCollection(cpb.CreateCollectionRequest(name="bad", home_space="s", basis_transform="x"))
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        s.channel.close()
        srv.stop(None)
        srv, port = start_server(tmp_path / "d")  # the basis is reloaded before the collection recovers
        s = connect(port)
        Dr2, Ir2 = funnel_search(s, "rotated", xq, 5, shortlist_k=800)
        assert (Ir2 == Ir).all()
        np.testing.assert_allclose(Dr2, Dr, rtol=1e-5, atol=1e-6)
        s.channel.close()
    finally:
        srv.stop(None)


def test_pca_basis_fitted_by_the_service_backs_a_prefix_collection(tmp_path: Path) -> None:
    from interlingua.v1 import transforms_pb2 as tpb
    from interlingua.v1 import transforms_pb2_grpc as tgrpc

    srv, port = start_server(tmp_path / "d")
    try:
        s = connect(port)
        s.register("s", D)
        t = tgrpc.TransformServiceStub(s.channel)
        rng = np.random.default_rng(11)
        mix = np.linalg.qr(rng.standard_normal((D, D)))[0] * np.geomspace(3, 0.1, D)  # structure spread over dims
        xb = (make_data(600, D, seed=12) @ mix).astype(np.float32)
        xq = xb[:100] + 0.05 * rng.standard_normal((100, D)).astype(np.float32)  # query i's relevant doc is i

        def vec(x: np.ndarray) -> pb.Vectors:
            return pb.Vectors(data=np.ascontiguousarray(x, "<f4").tobytes(), dim=D)

        t.FitTransform(
            iter(
                [
                    tpb.FitTransformRequest(
                        header=tpb.FitHeader(
                            name="pca", kind=tpb.TRANSFORM_KIND_PCA_BASIS, source_space="s", target_space="s"
                        )
                    ),
                    tpb.FitTransformRequest(
                        pairs=tpb.PairBatch(side=tpb.PAIR_SIDE_DOC, source=vec(xb), target=vec(xb))
                    ),
                    tpb.FitTransformRequest(
                        pairs=tpb.PairBatch(
                            side=tpb.PAIR_SIDE_DOC,
                            source=vec(xb),
                            target=vec(xb),
                            ids=[f"g{i}" for i in range(600)],
                            eval_only=True,
                        )
                    ),
                    tpb.FitTransformRequest(
                        eval=tpb.EvalQueries(
                            source=vec(xq),
                            target=vec(xq),
                            relevant_ids=[f"g{i}" for i in range(100)],
                            relevant_offsets=list(range(101)),
                        )
                    ),
                ]
            )
        )
        for _ in range(400):
            info = t.GetTransform(tpb.GetTransformRequest(name="pca"))
            if info.state != tpb.TRANSFORM_STATE_FITTING:
                break
            time.sleep(0.05)
        assert info.state == tpb.TRANSFORM_STATE_READY, info.error
        report = json.loads(info.report_json)
        assert report["label_free"] is False and set(report["recall_at_dims"]) == {"16", str(D)}
        col = s.collections.CreateCollection(
            cpb.CreateCollectionRequest(name="mrl", home_space="s", prefix_dims=8, basis_transform="pca")
        )
        assert dict(col.recall_at_dims) == pytest.approx({int(m): r for m, r in report["recall_at_dims"].items()})
        ids = np.array([f"g{i}" for i in range(600)], dtype=object)
        s.upsert("mrl", "s", list(ids), xb)
        Dg, Ig = funnel_search(s, "mrl", xq, 10, shortlist_k=600)
        Dref, Iref = brute_force(xb, xq, 10)
        np.testing.assert_allclose(Dg, Dref, rtol=1e-4, atol=1e-4)  # orthogonal basis: full-dim scores kept
        assert (Ig == ids[Iref]).mean() > 0.98
        s.create("plain", "s")
        with pytest.raises(grpc.RpcError) as exc:
            t.ActivateRoute(tpb.ActivateRouteRequest(collection="plain", transform="pca", force=True))
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "basis_transform" in (
            exc.value.details() or ""
        )
        s.channel.close()
    finally:
        srv.stop(None)
