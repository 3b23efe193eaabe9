"""Transforms and routes over a real server: fit off the request threads, gate, hot-swap, rollback,
shadow, chain, persistence across restarts."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import Stubs, connect, make_data, start_server

from interlingua.server import Server
from interlingua.v1 import common_pb2 as pb
from interlingua.v1 import transforms_pb2 as tpb
from interlingua.v1 import transforms_pb2_grpc as tgrpc

D_OLD, D_NEW, N = 16, 24, 1200


def world(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded old/new embeddings of the same items: new = [old, extra] rotated, shifted, noisy.

    Returns docs_old (N, D_OLD), docs_new (N, D_NEW), queries_old, queries_new (N//4, *): queries are
    perturbed docs, so query i's relevant doc is doc i."""
    rng = np.random.default_rng(seed)
    docs_old = make_data(N, D_OLD, seed=seed)
    q_old = docs_old[: N // 4] + 0.35 * rng.standard_normal((N // 4, D_OLD)).astype(np.float32)
    Q, _ = np.linalg.qr(rng.standard_normal((D_NEW, D_NEW)))
    shift = 0.8 * rng.standard_normal(D_NEW)

    def to_new(x: np.ndarray) -> np.ndarray:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        extra = 0.05 * np.random.default_rng(1).standard_normal((len(x), D_NEW - D_OLD))
        return (np.hstack([x, extra]) @ Q + shift).astype(np.float32)

    return docs_old, to_new(docs_old), q_old, to_new(q_old)


def vec(x: np.ndarray) -> pb.Vectors:
    return pb.Vectors(data=np.ascontiguousarray(x, "<f4").tobytes(), dim=x.shape[1])


def fit_stream(
    name: str,
    kind: int,
    new: np.ndarray,
    old: np.ndarray,
    *,
    eval_q: tuple[np.ndarray, np.ndarray] | None = None,
    gallery: tuple[np.ndarray, np.ndarray] | None = None,
    config: dict[str, object] | None = None,
    chain: list[str] | None = None,
) -> Iterator[tpb.FitTransformRequest]:
    yield tpb.FitTransformRequest(
        header=tpb.FitHeader(
            name=name,
            kind=kind,
            source_space="new@2",
            target_space="old@1",
            config_json=json.dumps(config or {}),
            chain=chain or [],
        )
    )
    for i in range(0, len(new), 500):
        yield tpb.FitTransformRequest(
            pairs=tpb.PairBatch(
                side=tpb.PAIR_SIDE_DOC,
                source=vec(new[i : i + 500]),
                target=vec(old[i : i + 500]),
            )
        )
    if eval_q is not None and gallery is not None:
        yield tpb.FitTransformRequest(
            pairs=tpb.PairBatch(
                side=tpb.PAIR_SIDE_DOC,
                source=vec(gallery[0]),
                target=vec(gallery[1]),
                ids=[f"g{i}" for i in range(len(gallery[0]))],
                eval_only=True,
            )
        )
        nq = len(eval_q[0])
        yield tpb.FitTransformRequest(
            eval=tpb.EvalQueries(
                source=vec(eval_q[0]),
                target=vec(eval_q[1]),
                relevant_ids=[f"g{i}" for i in range(nq)],
                relevant_offsets=list(range(nq + 1)),
            )
        )


def wait_fitted(t: tgrpc.TransformServiceStub, name: str, timeout: float = 120) -> tpb.TransformInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = t.GetTransform(tpb.GetTransformRequest(name=name))
        if info.state != tpb.TRANSFORM_STATE_FITTING:
            return info
        assert time.monotonic() < deadline, f"{name} still fitting: {info.stage} {info.progress}"
        time.sleep(0.05)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Stubs, tgrpc.TransformServiceStub, Server, Path]]:
    srv, port = start_server(tmp_path / "data", metrics_port=None)
    s = connect(port)
    s.register("old@1", D_OLD)
    s.register("new@2", D_NEW)
    s.create("gallery", "old@1", "HNSW32")
    docs_old, *_ = world()
    s.upsert("gallery", "old@1", [f"g{i}" for i in range(N)], docs_old[:N])
    yield s, tgrpc.TransformServiceStub(s.channel), srv, tmp_path / "data"
    s.channel.close()
    srv.stop(None)


def fit_procrustes(t: tgrpc.TransformServiceStub, name: str = "p1", shuffle: bool = False) -> tpb.TransformInfo:
    docs_old, docs_new, q_old, q_new = world()
    fit_new, fit_old = docs_new[: N // 2], docs_old[: N // 2]
    if shuffle:  # pairs that do not correspond: a transform that makes search worse
        fit_old = fit_old[np.random.default_rng(5).permutation(len(fit_old))]
    first = t.FitTransform(
        fit_stream(
            name,
            tpb.TRANSFORM_KIND_PROCRUSTES,
            fit_new,
            fit_old,
            eval_q=(q_new, q_old),
            gallery=(docs_new, docs_old),
        )
    )
    assert first.state in (tpb.TRANSFORM_STATE_FITTING, tpb.TRANSFORM_STATE_READY)
    info = wait_fitted(t, name)
    assert info.state == tpb.TRANSFORM_STATE_READY, info.error
    return info


def test_fit_activate_search_rollback(env: tuple[Stubs, tgrpc.TransformServiceStub, Server, Path]) -> None:
    s, t, _, _ = env
    _, docs_new, _, q_new = world()
    with pytest.raises(grpc.RpcError) as exc:  # not routed yet
        s.search("gallery", "new@2", q_new[:5], 5)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = fit_procrustes(t)
    assert (info.d_in, info.d_out, info.kind) == (D_NEW, D_OLD, tpb.TRANSFORM_KIND_PROCRUSTES) and info.checksum
    report = json.loads(info.report_json)
    assert report["ecc_margin"] > -0.05 and report["retention"] > 0.5
    route = t.ActivateRoute(tpb.ActivateRouteRequest(collection="gallery", transform="p1"))
    assert (route.query_space, route.home_space, route.transform) == ("new@2", "old@1", "p1")
    # new-model queries now find the same documents as old-model queries do
    _, I_new, reply = s.search("gallery", "new@2", docs_new[:50], 1)
    assert reply.route.transform == "p1" and reply.route.query_space == "new@2"
    assert (I_new[:, 0] == np.array([f"g{i}" for i in range(50)])).mean() > 0.95
    listed = t.ListRoutes(tpb.ListRoutesRequest(collection="gallery"))
    assert [r.transform for r in listed.active] == ["p1"] and len(listed.history) == 1
    rolled = t.RollbackRoute(tpb.RollbackRouteRequest(collection="gallery", query_space="new@2"))
    assert rolled.transform == ""
    with pytest.raises(grpc.RpcError) as exc:
        s.search("gallery", "new@2", q_new[:5], 5)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as exc:
        t.RollbackRoute(tpb.RollbackRouteRequest(collection="gallery", query_space="new@2"))
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_gate_refuses_a_transform_that_makes_search_worse(
    env: tuple[Stubs, tgrpc.TransformServiceStub, Server, Path],
) -> None:
    _, t, _, _ = env
    fit_procrustes(t, "bad", shuffle=True)
    with pytest.raises(grpc.RpcError) as exc:
        t.ActivateRoute(tpb.ActivateRouteRequest(collection="gallery", transform="bad"))
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = exc.value.details() or ""
    assert "retention 0.0" in details and "< min_retention 0.8500" in details and "force" in details
    forced = t.ActivateRoute(tpb.ActivateRouteRequest(collection="gallery", transform="bad", force=True))
    assert forced.transform == "bad" and forced.forced and forced.activated_at > 0 and forced.deactivated_at == 0
    history = t.ListRoutes(tpb.ListRoutesRequest(collection="gallery")).history
    assert history[0].forced


def test_hot_swap_and_rollback_never_fail_a_search(env: tuple[Stubs, tgrpc.TransformServiceStub, Server, Path]) -> None:
    s, t, _, _ = env
    fit_procrustes(t, "p1")
    fit_procrustes(t, "p2")
    t.ActivateRoute(tpb.ActivateRouteRequest(collection="gallery", transform="p1"))
    _, docs_new, _, _ = world()
    errors: list[BaseException] = []
    seen: set[str] = set()
    stop = threading.Event()

    def searcher() -> None:
        while not stop.is_set():
            try:
                _, _, reply = s.search("gallery", "new@2", docs_new[:8], 3)
                seen.add(reply.route.transform)
            except BaseException as e:
                errors.append(e)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for th in threads:
        th.start()
    for _ in range(15):
        t.ActivateRoute(tpb.ActivateRouteRequest(collection="gallery", transform="p2"))
        t.RollbackRoute(tpb.RollbackRouteRequest(collection="gallery", query_space="new@2"))
    stop.set()
    for th in threads:
        th.join()
    assert not errors and seen <= {"p1", "p2"} and "p1" in seen


def test_shadow_reports_agreement_without_changing_replies(
    env: tuple[Stubs, tgrpc.TransformServiceStub, Server, Path],
) -> None:
    s, t, srv, _ = env
    fit_procrustes(t, "live")
    fit_procrustes(t, "candidate")
    t.ActivateRoute(tpb.ActivateRouteRequest(collection="gallery", transform="live"))
    _, docs_new, _, _ = world()
    before = s.search("gallery", "new@2", docs_new[:20], 5)[1]
    r = t.SetShadow(tpb.SetShadowRequest(collection="gallery", query_space="new@2", transform="candidate"))
    assert r.shadow == "candidate" and r.transform == "live"
    after = s.search("gallery", "new@2", docs_new[:20], 5)[1]
    assert (before == after).all()
    labels = {"collection": "gallery", "query_space": "new@2", "transform": "candidate"}
    deadline = time.monotonic() + 10
    while srv.metrics.registry.get_sample_value("interlingua_shadow_agreement_count", labels) != 20:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    total = srv.metrics.registry.get_sample_value("interlingua_shadow_agreement_sum", labels)
    assert total is not None and total / 20 > 0.9  # same fit, same data: the candidate agrees
    t.SetShadow(tpb.SetShadowRequest(collection="gallery", query_space="new@2", transform=""))
    assert t.ListRoutes(tpb.ListRoutesRequest(collection="gallery")).active[0].shadow == ""


def test_routes_and_transforms_survive_restart(tmp_path: Path) -> None:
    srv, port = start_server(tmp_path / "data")
    s = connect(port)
    s.register("old@1", D_OLD)
    s.register("new@2", D_NEW)
    s.create("gallery", "old@1")
    docs_old, docs_new, _, _ = world()
    s.upsert("gallery", "old@1", [f"g{i}" for i in range(N)], docs_old)
    t = tgrpc.TransformServiceStub(s.channel)
    info = fit_procrustes(t)
    others = {}  # every stored kind must reload: basis and residual_mlp have their own classes
    for name, kind, config in (
        ("b1", tpb.TRANSFORM_KIND_BASIS, {}),
        ("m1", tpb.TRANSFORM_KIND_RESIDUAL_MLP, {"epochs": 2, "hidden": 32}),
    ):
        t.FitTransform(fit_stream(name, kind, docs_new[:600], docs_old[:600], config=config))
        others[name] = wait_fitted(t, name)
        assert others[name].state == tpb.TRANSFORM_STATE_READY, others[name].error
    t.ActivateRoute(tpb.ActivateRouteRequest(collection="gallery", transform="m1", force=True))
    Dm, Im, _ = s.search("gallery", "new@2", docs_new[:10], 5)
    t.ActivateRoute(tpb.ActivateRouteRequest(collection="gallery", transform="p1"))
    D1, I1, _ = s.search("gallery", "new@2", docs_new[:10], 5)
    s.channel.close()
    srv.stop(None)
    srv, port = start_server(tmp_path / "data")
    try:
        s = connect(port)
        t = tgrpc.TransformServiceStub(s.channel)
        again = t.GetTransform(tpb.GetTransformRequest(name="p1"))
        assert again.checksum == info.checksum and again.report_json == info.report_json
        D2, I2, reply = s.search("gallery", "new@2", docs_new[:10], 5)
        assert reply.route.transform == "p1" and (I1 == I2).all()
        np.testing.assert_allclose(D1, D2, rtol=1e-6)
        for name, before in others.items():
            assert t.GetTransform(tpb.GetTransformRequest(name=name)).checksum == before.checksum
        # rolling back restores the residual MLP route, rebuilt from the stored weights
        assert t.RollbackRoute(tpb.RollbackRouteRequest(collection="gallery", query_space="new@2")).transform == "m1"
        D3, I3, _ = s.search("gallery", "new@2", docs_new[:10], 5)
        assert (Im == I3).all()
        np.testing.assert_allclose(D3, Dm, rtol=1e-5)
        s.channel.close()
    finally:
        srv.stop(None)


def test_chain_composes_links(env: tuple[Stubs, tgrpc.TransformServiceStub, Server, Path]) -> None:
    s, t, _, _ = env
    s.register("mid@1", D_NEW)
    docs_old, docs_new, _, _ = world()
    rng = np.random.default_rng(9)
    Q, _ = np.linalg.qr(rng.standard_normal((D_NEW, D_NEW)))
    mid = (docs_new @ Q).astype(np.float32)  # v3 -> v2 is a rotation; v2 -> v1 is learned

    def pairs(name: str, src: str, dst: str, a: np.ndarray, b: np.ndarray, chain: list[str] | None = None) -> None:
        msgs = list(
            fit_stream(name, tpb.TRANSFORM_KIND_CHAIN if chain else tpb.TRANSFORM_KIND_PROCRUSTES, a, b, chain=chain)
        )
        msgs[0].header.source_space, msgs[0].header.target_space = src, dst
        t.FitTransform(iter(msgs[:1] if chain else msgs))
        assert wait_fitted(t, name).state == tpb.TRANSFORM_STATE_READY

    pairs("mid-to-new", "mid@1", "new@2", mid, docs_new)
    pairs("new-to-old", "new@2", "old@1", docs_new, docs_old)
    pairs("mid-to-old", "mid@1", "old@1", mid, docs_old, chain=["mid-to-new", "new-to-old"])
    t.ActivateRoute(tpb.ActivateRouteRequest(collection="gallery", transform="mid-to-old", force=True))
    _, I, _ = s.search("gallery", "mid@1", mid[:50], 1)
    assert (I[:, 0] == np.array([f"g{i}" for i in range(50)])).mean() > 0.95


def test_fit_input_errors(env: tuple[Stubs, tgrpc.TransformServiceStub, Server, Path]) -> None:
    _, t, _, _ = env
    docs_old, docs_new, _, _ = world()

    def expect(code: grpc.StatusCode, msgs: list[tpb.FitTransformRequest], match: str) -> None:
        with pytest.raises(grpc.RpcError) as exc:
            t.FitTransform(iter(msgs))
        assert exc.value.code() == code and match in (exc.value.details() or ""), exc.value.details()
        assert not t.ListTransforms(tpb.ListTransformsRequest()).transforms

    good = list(fit_stream("x", tpb.TRANSFORM_KIND_PROCRUSTES, docs_new[:100], docs_old[:100]))
    expect(grpc.StatusCode.INVALID_ARGUMENT, good[1:], "header")
    header = good[0]
    bad_pairs = tpb.FitTransformRequest(
        pairs=tpb.PairBatch(side=tpb.PAIR_SIDE_DOC, source=vec(docs_new[:10]), target=vec(docs_old[:9]))
    )
    expect(grpc.StatusCode.INVALID_ARGUMENT, [header, bad_pairs], "10 source vectors but 9 target")
    wrong_dim = tpb.FitTransformRequest(
        pairs=tpb.PairBatch(side=tpb.PAIR_SIDE_DOC, source=vec(docs_old[:10]), target=vec(docs_old[:10]))
    )
    expect(grpc.StatusCode.INVALID_ARGUMENT, [header, wrong_dim], "dimension")
    nan = docs_new[:10].copy()
    nan[3, 1] = np.nan
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        [
            header,
            tpb.FitTransformRequest(
                pairs=tpb.PairBatch(side=tpb.PAIR_SIDE_DOC, source=vec(nan), target=vec(docs_old[:10]))
            ),
        ],
        "NaN",
    )
    few = list(fit_stream("x", tpb.TRANSFORM_KIND_PROCRUSTES, docs_new[:10], docs_old[:10]))
    expect(grpc.StatusCode.INVALID_ARGUMENT, few, "calibration data")
    unknown = tpb.FitTransformRequest(header=tpb.FitHeader(name="x", kind=1, source_space="nope", target_space="old@1"))
    expect(grpc.StatusCode.NOT_FOUND, [unknown], "nope")
    bad_json = tpb.FitTransformRequest(
        header=tpb.FitHeader(name="x", kind=1, source_space="new@2", target_space="old@1", config_json="{oops")
    )
    expect(grpc.StatusCode.INVALID_ARGUMENT, [bad_json], "config_json")
    fit_procrustes(t, "dup")
    with pytest.raises(grpc.RpcError) as exc:
        t.FitTransform(fit_stream("dup", tpb.TRANSFORM_KIND_PROCRUSTES, docs_new[:600], docs_old[:600]))
    assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as exc:
        t.ActivateRoute(tpb.ActivateRouteRequest(collection="gallery", transform="nope"))
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


def test_labelled_evaluation_reports_cmc_and_map(env: tuple[Stubs, tgrpc.TransformServiceStub, Server, Path]) -> None:
    _, t, _, _ = env
    docs_old, docs_new, q_old, q_new = world()
    nq = len(q_new)
    msgs = list(
        fit_stream(
            "lab",
            tpb.TRANSFORM_KIND_PROCRUSTES,
            docs_new[:600],
            docs_old[:600],
            eval_q=(q_new, q_old),
            gallery=(docs_new, docs_old),
        )
    )
    msgs[-2].pairs.labels.extend(i % 40 for i in range(N))  # the eval gallery's class labels
    msgs[-1].eval.labels.extend(i % 40 for i in range(nq))
    t.FitTransform(iter(msgs))
    info = wait_fitted(t, "lab")
    assert info.state == tpb.TRANSFORM_STATE_READY, info.error
    report = json.loads(info.report_json)
    for key in ("home_cmc1", "home_cmc5", "home_map", "transformed_cmc1", "transformed_cmc5", "transformed_map"):
        assert 0 <= report[key] <= 1, key
    assert report["transformed_cmc5"] >= report["transformed_cmc1"]
    msgs[-1].eval.ClearField("labels")  # labels on one side only
    msgs[0].header.name = "lab2"
    with pytest.raises(grpc.RpcError) as exc:
        t.FitTransform(iter(msgs))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "labels" in (exc.value.details() or "")
