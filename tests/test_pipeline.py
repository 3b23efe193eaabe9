"""The one query pipeline (``server/pipeline.py``), over a real server.

Live and shadow searches run the same path (route -> home space -> the collection's basis -> index
-> ids): with the shadow set to the live transform itself, every shadowed query agrees on all k
ids, with or without a basis transform. A Matryoshka prefix collection restarts from its own
checkpoint without replaying a vector, and answers as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import Stubs, connect, make_data, start_server

from interlingua.server import Server
from interlingua.v1 import collections_pb2 as cpb
from interlingua.v1 import common_pb2 as pb
from interlingua.v1 import points_pb2 as ppb
from interlingua.v1 import transforms_pb2 as tpb
from interlingua.v1 import transforms_pb2_grpc as tgrpc

D_HOME, D_QUERY, N, NQ, K = 16, 24, 600, 20, 10
REPLAYED = "interlingua_recovery_replayed_total"


def vec(x: np.ndarray) -> pb.Vectors:
    return pb.Vectors(data=np.ascontiguousarray(x, "<f4").tobytes(), dim=x.shape[1])


def fit(t: tgrpc.TransformServiceStub, name: str, kind: int, source: str, target: str, xs: np.ndarray,
        xt: np.ndarray) -> None:  # fmt: skip
    header = tpb.FitHeader(name=name, kind=kind, source_space=source, target_space=target)
    pairs = tpb.PairBatch(side=tpb.PAIR_SIDE_DOC, source=vec(xs), target=vec(xt))
    t.FitTransform(iter([tpb.FitTransformRequest(header=header), tpb.FitTransformRequest(pairs=pairs)]))
    for _ in range(600):
        info = t.GetTransform(tpb.GetTransformRequest(name=name))
        if info.state != tpb.TRANSFORM_STATE_FITTING:
            break
        time.sleep(0.05)
    assert info.state == tpb.TRANSFORM_STATE_READY, info.error


def wait_merged(s: Stubs, name: str) -> None:
    for _ in range(600):
        info = s.info(name)
        if info.fresh_vectors == 0 and info.state == cpb.INDEX_STATE_READY:
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} not merged")


def agreement(srv: Server, collection: str, transform: str, n: int) -> float:
    """Mean top-k agreement of the shadow over its first ``n`` queries (waits for them)."""
    labels = {"collection": collection, "query_space": "new", "transform": transform}
    registry = srv.metrics.registry
    deadline = time.monotonic() + 20
    while registry.get_sample_value("interlingua_shadow_agreement_count", labels) != n:
        assert time.monotonic() < deadline, "the shadow searches did not run"
        time.sleep(0.02)
    total = registry.get_sample_value("interlingua_shadow_agreement_sum", labels)
    assert total is not None
    return float(total) / n


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Stubs, tgrpc.TransformServiceStub, Server]]:
    srv, port = start_server(tmp_path / "data")
    s = connect(port)
    try:
        yield s, tgrpc.TransformServiceStub(s.channel), srv
    finally:
        s.channel.close()
        srv.stop(None)


@pytest.mark.parametrize("basis", [True, False])
def test_shadow_of_the_live_transform_agrees_on_every_id(
    world: tuple[Stubs, tgrpc.TransformServiceStub, Server], basis: bool
) -> None:
    s, t, srv = world
    s.register("home", D_HOME)
    s.register("new", D_QUERY)
    rng = np.random.default_rng(5)
    xb = make_data(N, D_HOME, seed=6)
    lift = rng.standard_normal((D_HOME, D_QUERY)).astype(np.float32)  # new = old @ lift + noise
    xb_new = xb @ lift + 0.01 * rng.standard_normal((N, D_QUERY)).astype(np.float32)
    if basis:  # a PCA rotation of the home space: the index holds rotated vectors
        fit(t, "pca", tpb.TRANSFORM_KIND_PCA_BASIS, "home", "home", xb, xb)
    s.collections.CreateCollection(
        cpb.CreateCollectionRequest(
            name="c", home_space="home", index_spec="Flat", basis_transform="pca" if basis else ""
        )
    )
    s.upsert("c", "home", [f"p{i}" for i in range(N)], xb)
    fit(t, "live", tpb.TRANSFORM_KIND_AFFINE, "new", "home", xb_new, xb)
    t.ActivateRoute(tpb.ActivateRouteRequest(collection="c", transform="live", force=True))
    xq = xb_new[:NQ] + 0.05 * rng.standard_normal((NQ, D_QUERY)).astype(np.float32)
    before = s.search("c", "new", xq, K)[1]
    t.SetShadow(tpb.SetShadowRequest(collection="c", query_space="new", transform="live", sample_rate=1.0))
    _, ids, reply = s.search("c", "new", xq, K)
    assert reply.route.transform == "live" and (ids == before).all()  # the shadow never changes a reply
    assert (ids[:, 0] == np.array([f"p{i}" for i in range(NQ)])).mean() > 0.8  # the route does its job
    assert agreement(srv, "c", "live", NQ) == 1.0  # the same transform, the same path: the same ids


def test_prefix_collection_restarts_from_its_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = 32
    decay = np.geomspace(4.0, 0.1, d).astype(np.float32)  # Matryoshka-like: the leading dims carry most
    xb, xq = make_data(1500, d, seed=3) * decay, make_data(30, d, seed=4) * decay
    ids = [f"p{i}" for i in range(len(xb))]
    srv, port = start_server(tmp_path / "data")
    s = connect(port)
    try:
        s.register("s", d)
        info = s.collections.CreateCollection(
            cpb.CreateCollectionRequest(name="mrl", home_space="s", index_spec="HNSW16", prefix_dims=8)
        )
        assert info.prefix_dims == 8
        s.upsert("mrl", "s", ids[:1000], xb[:1000])
        wait_merged(s, "mrl")
        s.upsert("mrl", "s", ids[1000:], xb[1000:])  # fresh: the final merge at shutdown checkpoints them
        s.points.DeletePoints(ppb.DeletePointsRequest(collection="mrl", ids=ids[:20]))
        D1, I1, _ = s.search("mrl", "s", xq, K)
    finally:
        s.channel.close()
        srv.stop(None)
    (ckpt,) = (tmp_path / "data" / "collections").glob("*/index.ckpt")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="interlingua.server.checkpoint"):
        srv, port = start_server(tmp_path / "data")
    s = connect(port)
    try:
        assert "unusable" not in caplog.text, caplog.text
        assert srv.metrics.registry.get_sample_value(REPLAYED) == 0  # every vector came from the checkpoint
        info = s.info("mrl")
        assert info.checkpoint_sequence == info.last_sequence and info.fresh_vectors == 0
        D2, I2, _ = s.search("mrl", "s", xq, K)
        assert (I2 == I1).all()
        np.testing.assert_allclose(D2, D1, rtol=1e-5, atol=1e-6)
        assert ckpt.exists()
    finally:
        s.channel.close()
        srv.stop(None)


def test_vectors_a_basis_maps_out_of_bounds_are_refused_before_any_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A basis transform that takes a document past a vector's bounds (here a PCA basis made to scale by
    1e17, as a non-orthogonal basis can): INVALID_ARGUMENT naming the vector, nothing stored."""
    from interlingua.client import Client, InvalidArgument

    srv, port = start_server(tmp_path / "data")
    try:
        with Client(f"127.0.0.1:{port}") as c:
            c.register_space("home", D_HOME, metric="l2")
            xb = make_data(N, D_HOME, seed=8)
            c.fit_transform("pca", "pca_basis", source_space="home", target_space="home", doc_pairs=(xb, xb))
            c.create_collection("c", "home", basis_transform="pca")
            ids = [f"p{i}" for i in range(N)]
            c.upsert("c", ids[:100], xb[:100], space="home")
            basis = srv.engine.collections["c"].basis
            assert basis is not None
            plain = basis.apply
            monkeypatch.setattr(basis, "apply", lambda x, side="doc": plain(x, side) * np.float32(1e17))
            with pytest.raises(InvalidArgument, match=r"vectors: vector 0 is mapped by the collection's basis "
                               r"transform to L2 norm .*e\+18; the limit is 1e\+18"):  # fmt: skip
                c.upsert("c", ids[100:110], xb[100:110] * 20, space="home")
            assert c.get_collection("c").num_points == 100
            monkeypatch.undo()
            c.upsert("c", ids[100:110], xb[100:110], space="home")
            assert c.search("c", xb[105:106], 1, space="home").ids[0, 0] == "p105"
    finally:
        srv.stop(None)
