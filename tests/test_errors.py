"""Every bad input gets its precise status code, a message naming the problem, and changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import Stubs, connect, make_data, start_server, wait_for

from interlingua.server import Limits
from interlingua.v1 import collections_pb2 as cpb
from interlingua.v1 import common_pb2 as pb
from interlingua.v1 import points_pb2 as ppb
from interlingua.v1 import spaces_pb2 as spb

D = 8
LIMITS = Limits(max_k=100, max_batch=100, max_nq=50, max_message_bytes=1 << 20)
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Stubs]:
    srv, port = start_server(tmp_path / "data", limits=LIMITS)
    s = connect(port)
    s.register("old@1", D)
    s.register("new@2", D)
    s.register("wide@1", 2 * D)
    s.create("gallery", "old@1")
    s.create("hnsw", "old@1", "HNSW32")
    xb = make_data(50, D, seed=0)
    s.upsert("gallery", "old@1", [f"p{i}" for i in range(50)], xb, payloads=['{"a": 1}'] * 50)
    s.upsert("hnsw", "old@1", [f"p{i}" for i in range(50)], xb)
    # the background merge moves fresh rows into the sealed index, and a search's last float bits with
    # them: let it happen before any fingerprint, so a rejected request is the only thing in between
    wait_for(lambda: all(s.info(n).fresh_vectors == 0 for n in ("gallery", "hnsw")), 30)
    yield s
    s.channel.close()
    srv.stop(None)


def fingerprint(s: Stubs) -> tuple[object, ...]:
    """Everything observable about the data: spaces, collections, a search and a read."""
    spaces = s.spaces.ListSpaces(spb.ListSpacesRequest())
    cols = s.collections.ListCollections(cpb.ListCollectionsRequest())
    snap = [(c.name, c.num_points, dict(c.vectors_per_space), c.deleted_labels) for c in cols.collections]
    D_, I, _ = s.search("gallery", "old@1", make_data(3, D, seed=1), 5)
    got = s.points.GetPoints(ppb.GetPointsRequest(collection="gallery", ids=["p0", "p1"], with_vectors=True))
    return ([x.name for x in spaces.spaces], snap, D_.tobytes(), I.tolist(), got.SerializeToString())


def expect(s: Stubs, code: grpc.StatusCode, fn: object, *args: object, match: str = "", **kw: object) -> str:
    """Calls fn(*args, **kw), expects ``code`` with ``match`` in its details, and no change."""
    before = fingerprint(s)
    with pytest.raises(grpc.RpcError) as exc:
        fn(*args, **kw)  # type: ignore[operator]
    err = exc.value
    assert err.code() == code, (err.code(), err.details())
    assert match.lower() in (err.details() or "").lower(), err.details()
    assert fingerprint(s) == before, "a rejected request changed the data"
    return str(err.details())


def vec(x: np.ndarray, dim: int | None = None) -> pb.Vectors:
    return pb.Vectors(data=np.ascontiguousarray(x, "<f4").tobytes(), dim=dim if dim is not None else x.shape[-1])


def upsert(s: Stubs, ids: list[str], x: pb.Vectors, col: str = "gallery", space: str = "old@1", **kw: object) -> None:
    s.points.Upsert(ppb.UpsertRequest(collection=col, space=space, ids=ids, vectors=x, **kw))  # type: ignore[arg-type]


def search(s: Stubs, q: pb.Vectors, k: int = 5, col: str = "gallery", space: str = "old@1", **kw: object) -> None:
    s.points.Search(ppb.SearchRequest(collection=col, query_space=space, queries=q, k=k, **kw))  # type: ignore[arg-type]


def test_space_errors(env: Stubs) -> None:
    reg = env.spaces.RegisterSpace
    expect(env, INVALID, reg, spb.RegisterSpaceRequest(space=pb.Space(name="bad name", dim=4, metric=1)), match="name")
    expect(env, INVALID, reg, spb.RegisterSpaceRequest(space=pb.Space(name="x", dim=0, metric=1)), match="dim")
    expect(env, INVALID, reg, spb.RegisterSpaceRequest(space=pb.Space(name="x", dim=4)), match="metric")
    expect(
        env,
        INVALID,
        reg,
        spb.RegisterSpaceRequest(space=pb.Space(name="x", dim=4, metric=1, description="d" * 2000)),
        match="description",
    )
    expect(
        env,
        grpc.StatusCode.ALREADY_EXISTS,
        reg,
        spb.RegisterSpaceRequest(space=pb.Space(name="old@1", dim=D, metric=1)),
    )
    expect(env, NOT_FOUND, env.spaces.GetSpace, spb.GetSpaceRequest(name="nope"), match="'nope'")


def test_collection_errors(env: Stubs) -> None:
    create = env.collections.CreateCollection
    req = cpb.CreateCollectionRequest
    expect(env, INVALID, create, req(name="a/b", home_space="old@1"), match="collection name")
    expect(env, NOT_FOUND, create, req(name="c2", home_space="nope"), match="space 'nope'")
    expect(env, INVALID, create, req(name="c2", home_space="old@1", index_spec="NotAnIndex"), match="index spec")
    expect(env, INVALID, create, req(name="c2", home_space="old@1", index_spec="IVF64,Flat", train_min_points=10))
    expect(env, grpc.StatusCode.ALREADY_EXISTS, create, req(name="gallery", home_space="old@1"))
    expect(env, NOT_FOUND, env.collections.GetCollection, cpb.GetCollectionRequest(name="nope"))
    expect(env, NOT_FOUND, env.collections.DeleteCollection, cpb.DeleteCollectionRequest(name="nope"))


def test_upsert_errors(env: Stubs) -> None:
    x = make_data(2, D, seed=3)
    expect(env, NOT_FOUND, upsert, env, ["a", "b"], vec(x), "nope", match="collection 'nope'")
    expect(env, NOT_FOUND, upsert, env, ["a", "b"], vec(x), "gallery", "nope", match="space 'nope'")
    expect(env, INVALID, upsert, env, ["a", "b"], vec(make_data(2, D + 1)), match="dimension")
    nan = x.copy()
    nan[1, 3] = np.nan
    expect(env, INVALID, upsert, env, ["a", "b"], vec(nan), match="vector 1 contains NaN")
    inf = x.copy()
    inf[0, 0] = np.inf
    expect(env, INVALID, upsert, env, ["a", "b"], vec(inf), match="NaN or Inf")
    expect(env, INVALID, upsert, env, [], vec(x), match="empty")
    expect(env, INVALID, upsert, env, ["a"], pb.Vectors(data=b"", dim=D), match="empty")
    expect(env, INVALID, upsert, env, ["a", "b"], pb.Vectors(data=vec(x).data[:-2], dim=D), match="multiple of 32")
    expect(env, INVALID, upsert, env, ["a"], vec(x), match="2 vectors for 1 ids")
    expect(env, INVALID, upsert, env, ["é" * 129, "b"], vec(x), match="258 bytes")
    expect(env, INVALID, upsert, env, ["", "b"], vec(x), match="empty")
    expect(env, INVALID, upsert, env, ["a", "a"], vec(x), match="more than once")
    expect(env, INVALID, upsert, env, ["a", "b"], vec(x), payloads=["{}"], match="one per id")
    expect(env, INVALID, upsert, env, ["a", "b"], vec(x), payloads=["{}", "{oops"], match="not valid JSON")
    big = '{"k": "' + "x" * (64 * 1024) + '"}'
    expect(env, INVALID, upsert, env, ["a", "b"], vec(x), payloads=["{}", big], match="65545 bytes")
    zero = x.copy()
    zero[1] = 0
    expect(env, INVALID, upsert, env, ["a", "b"], vec(zero), match="zero")
    many = make_data(101, D)
    expect(env, grpc.StatusCode.RESOURCE_EXHAUSTED, upsert, env, [str(i) for i in range(101)], vec(many), match="cap")
    huge = np.zeros((40000, D), np.float32)  # 1.28 MB > 1 MiB message cap
    expect(env, grpc.StatusCode.RESOURCE_EXHAUSTED, upsert, env, ["a"], vec(huge))


def test_upsert_stream_rejects_bad_message_after_committing_earlier_ones(env: Stubs) -> None:
    x = make_data(4, D, seed=4)
    good = [
        ppb.UpsertRequest(collection="gallery", space="old@1", ids=[f"s{i}"], vectors=vec(x[i : i + 1]))
        for i in range(2)
    ]
    bad = ppb.UpsertRequest(collection="gallery", space="old@1", ids=["s2"], vectors=vec(x[:1], dim=D + 1))
    with pytest.raises(grpc.RpcError) as exc:
        env.points.UpsertStream(iter([*good, bad, good[0]]))
    assert exc.value.code() == INVALID and "stream message 2" in (exc.value.details() or "")
    assert env.info("gallery").num_points == 52


def test_delete_and_get_errors(env: Stubs) -> None:
    delete = env.points.DeletePoints
    msg = expect(env, NOT_FOUND, delete, ppb.DeletePointsRequest(collection="gallery", ids=["p1", "zz"]), match="'zz'")
    assert "'p1'" not in msg
    expect(env, INVALID, delete, ppb.DeletePointsRequest(collection="gallery", ids=[]), match="empty")
    expect(env, NOT_FOUND, delete, ppb.DeletePointsRequest(collection="nope", ids=["p1"]))
    get = env.points.GetPoints
    expect(env, NOT_FOUND, get, ppb.GetPointsRequest(collection="gallery", ids=["p1", "zz"]), match="'zz'")
    expect(env, NOT_FOUND, get, ppb.GetPointsRequest(collection="gallery", ids=["p1"], spaces=["nope"]))
    expect(env, INVALID, get, ppb.GetPointsRequest(collection="gallery", ids=["p1", "p1"]), match="more than once")
    # missing_ok deletes what exists and skips the rest
    r = delete(ppb.DeletePointsRequest(collection="gallery", ids=["p1", "zz"], missing_ok=True))
    assert r.deleted == 1 and env.info("gallery").num_points == 49


def test_search_errors(env: Stubs) -> None:
    q = make_data(2, D, seed=5)
    expect(env, INVALID, search, env, vec(q), 0, match="k is 0")
    expect(env, INVALID, search, env, vec(q), 101, match="between 1 and 100")
    expect(env, INVALID, search, env, vec(make_data(2, D + 1)), match="dimension")
    bad = q.copy()
    bad[0, 0] = np.nan
    expect(env, INVALID, search, env, vec(bad), match="NaN")
    expect(env, INVALID, search, env, pb.Vectors(data=b"", dim=D), match="empty")
    expect(env, INVALID, search, env, pb.Vectors(data=vec(q).data[:-4], dim=D), match="multiple")
    expect(env, INVALID, search, env, vec(np.zeros((1, D))), match="zero")
    expect(env, grpc.StatusCode.RESOURCE_EXHAUSTED, search, env, vec(make_data(51, D)), match="cap of 50")
    msg = expect(env, grpc.StatusCode.FAILED_PRECONDITION, search, env, vec(q), 5, "gallery", "new@2")
    assert "'new@2'" in msg and "'old@1'" in msg
    expect(env, NOT_FOUND, search, env, vec(q), 5, "gallery", "nope", match="space 'nope'")
    expect(env, NOT_FOUND, search, env, vec(q), 5, "nope", match="collection 'nope'")
    expect(env, INVALID, search, env, vec(q), params=pb.SearchParams(ef_search=32), match="ef_search applies to HNSW")
    expect(
        env, INVALID, search, env, vec(q), 5, "hnsw", params=pb.SearchParams(nprobe=4), match="nprobe applies to IVF"
    )
    expect(env, INVALID, search, env, vec(q), 5, "hnsw", params=pb.SearchParams(ef_search=0), match="ef_search is 0")


def test_names_with_a_final_newline_are_refused(tmp_path: Path) -> None:
    """Names are matched whole: a regex ending in ``$`` also matches before a final newline, which let a
    space, collection, transform or snapshot named "x\\n" through; an API key's sha256 likewise."""
    from interlingua.client import Client, InvalidArgument
    from interlingua.server.config import ApiKey

    srv, port = start_server(tmp_path / "data")
    try:
        with Client(f"127.0.0.1:{port}") as c:
            with pytest.raises(InvalidArgument, match="space name"):
                c.register_space("s\n", D)
            c.register_space("s", D)
            with pytest.raises(InvalidArgument, match="collection name"):
                c.create_collection("c\n", "s")
            xb = make_data(40, D, seed=1)
            with pytest.raises(InvalidArgument, match="transform name"):
                c.fit_transform("t\n", "procrustes", source_space="s", target_space="s", doc_pairs=(xb, xb))
            with pytest.raises(InvalidArgument, match="snapshot name"):
                c.create_snapshot("snap\n")
            assert ([s.name for s in c.list_spaces()], c.list_collections(), c.list_snapshots()) == (["s"], [], [])
            assert c.list_transforms() == []
    finally:
        srv.stop(None)
    with pytest.raises(ValueError, match="sha256 must be 64 lowercase hex digits"):
        ApiKey("k", "0" * 64 + "\n")
