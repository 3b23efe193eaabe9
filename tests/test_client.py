"""The Python client against a real server on port 0: every method, errors, batching, kNN vs numpy."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import brute_force, make_data, start_server

import interlingua.client
from interlingua.client import (
    AlreadyExists,
    Client,
    FailedPrecondition,
    InterlinguaError,
    InvalidArgument,
    NotFound,
    SearchResult,
    Unauthenticated,
)
from interlingua.client._exceptions import EXCEPTION_TABLE, from_rpc_error
from interlingua.server import Server


@pytest.fixture
def client(server: tuple[Server, int]) -> Iterator[Client]:
    with Client(f"127.0.0.1:{server[1]}", timeout=60) as c:
        c.wait_ready(30)
        yield c


def _gallery(client: Client, metric: str = "cosine", n: int = 500, d: int = 32, seed: int = 0) -> np.ndarray:
    client.register_space("m@1", d, metric)
    client.create_collection("g", "m@1")
    xb = make_data(n, d, seed)
    client.upsert("g", [f"p{i}" for i in range(n)], xb, space="m@1")
    return xb


def _check_knn(D: np.ndarray, ids: np.ndarray, Dref: np.ndarray, Iref: np.ndarray) -> None:
    """Scores match; ids match as sets, leaving out the ties at the k-th score (as FAISS's
    ``check_ref_knn_with_draws``)."""
    np.testing.assert_allclose(D, Dref, rtol=1e-4, atol=1e-4)
    for i in range(D.shape[0]):
        sure = np.abs(Dref[i] - Dref[i, -1]) > 1e-4
        assert set(ids[i][sure]) == {f"p{j}" for j in Iref[i][sure]}


def test_public_names_are_pinned() -> None:
    assert sorted(interlingua.client.__all__) == [
        "AlreadyExists", "BackfillOrder", "Cancelled", "Client", "CollectionInfo", "CollectionMove", "DeadlineExceeded",
        "FailedPrecondition", "FitFailed", "ForwardProgress", "ForwardUpgradeFailed", "InterlinguaError", "Internal",
        "InvalidArgument", "MigrationInfo", "NotFound", "PermissionDenied", "PointRecord", "ResourceExhausted",
        "Route", "RouteInfo", "RoutesListing", "ScoreCalibration", "SearchResult", "SearchStream", "SnapshotInfo",
        "Space", "TLS", "TransformInfo", "Unauthenticated", "Unavailable", "Unknown",
    ]  # fmt: skip


def test_exception_table_flags() -> None:
    retriable = {cls.__name__ for cls in EXCEPTION_TABLE.values() if cls.retriable}
    inputs = {cls.__name__ for cls in EXCEPTION_TABLE.values() if cls.is_input_error}
    assert retriable == {"ResourceExhausted", "Unavailable", "DeadlineExceeded"}
    assert inputs == {"InvalidArgument", "NotFound", "AlreadyExists"}
    assert all(code is cls.default_code for code, cls in EXCEPTION_TABLE.items())


def test_spaces_round_trip(client: Client) -> None:
    s = client.register_space("minilm@1", 8, "l2", description="old model")
    assert (s.name, s.dim, s.metric, s.description) == ("minilm@1", 8, "l2", "old model")
    assert s.created_at > 0
    client.register_space("e5@2", 16)
    assert client.get_space("minilm@1") == s
    assert [x.name for x in client.list_spaces()] == ["e5@2", "minilm@1"]
    assert client.get_space("e5@2").metric == "cosine"


def test_collections_round_trip(client: Client) -> None:
    client.register_space("m@1", 4)
    info = client.create_collection("b", "m@1")
    assert (info.name, info.home_space, info.index_spec, info.state) == ("b", "m@1", "Flat", "ready")
    assert info.num_points == 0 and info.vectors_per_space == {}
    client.create_collection("a", "m@1", "IVF4,Flat", train_min_points=100)
    a = client.get_collection("a")
    assert (a.index_spec, a.state, a.train_min_points) == ("IVF4,Flat", "exact", 100)
    assert [c.name for c in client.list_collections()] == ["a", "b"]
    client.delete_collection("a")
    assert [c.name for c in client.list_collections()] == ["b"]
    with pytest.raises(NotFound):
        client.get_collection("a")


def test_upsert_get_delete(client: Client) -> None:
    client.register_space("m@1", 3, "cosine")
    client.register_space("m@2", 2, "l2")
    client.create_collection("c", "m@1")
    x = np.array([[3, 0, 4], [0, 2, 0], [1, 1, 1]], dtype=np.float64)  # any float dtype is packed as <f4
    seq = client.upsert("c", ["a", "b", "c"], x, space="m@1", payloads=[{"tag": 1}, None, '{"tag": 3}'])
    assert seq > 0
    seq2 = client.upsert("c", ["a"], np.array([[1.5, -2.0]]), space="m@2")
    assert seq2 > seq
    info = client.get_collection("c")
    assert info.num_points == 3 and info.vectors_per_space == {"m@1": 3, "m@2": 1}
    assert info.last_sequence == seq2

    pts = client.get("c", ["c", "a", "b"], with_vectors=True, with_payload=True)  # order of the request
    assert [p.id for p in pts] == ["c", "a", "b"]
    assert [p.payload for p in pts] == [{"tag": 3}, {"tag": 1}, None]
    np.testing.assert_allclose(pts[1].vectors["m@1"], [0.6, 0, 0.8], rtol=1e-6)  # cosine: normalized
    np.testing.assert_array_equal(pts[1].vectors["m@2"], [1.5, -2.0])
    assert pts[1].vectors["m@1"].dtype == np.float32 and pts[1].sequence == seq2
    only = client.get("c", ["a"], with_vectors=True, spaces=["m@2"])
    assert list(only[0].vectors) == ["m@2"] and only[0].payload is None
    assert client.get("c", ["b"])[0].vectors == {}

    assert client.delete("c", ["a", "b"]) == 2
    with pytest.raises(NotFound):
        client.delete("c", ["a"])
    assert client.delete("c", ["a", "c"], missing_ok=True) == 1
    assert client.get_collection("c").num_points == 0


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_search_matches_brute_force(client: Client, metric: str) -> None:
    xb = _gallery(client, metric)
    xq = make_data(20, 32, seed=1)
    res = client.search("g", xq, 10, space="m@1")
    Dref, Iref = brute_force(xb, xq, 10, metric)
    assert res.scores.shape == res.ids.shape == (20, 10)
    assert res.scores.dtype == np.float32 and res.ids.dtype == object
    _check_knn(res.scores, res.ids, Dref, Iref)
    assert (res.route.query_space, res.route.home_space, res.route.transform) == ("m@1", "m@1", "identity")
    assert res.payloads is None


def test_search_unpacks_pads_and_returns_payloads(client: Client) -> None:
    client.register_space("m@1", 4)
    client.create_collection("g", "m@1")
    xb = make_data(3, 4, seed=2)
    client.upsert("g", ["x", "y", "z"], xb, space="m@1", payloads=[{"n": 0}, None, {"n": 2}])
    D, ids = client.search("g", xb[0], 5, space="m@1")  # one query of shape (d,)
    assert D.shape == ids.shape == (1, 5)
    assert ids[0, 0] == "x" and list(ids[0, 3:]) == ["", ""]
    assert np.all(np.isneginf(D[0, 3:])) and np.all(np.isfinite(D[0, :3]))
    res = client.search("g", xb, 2, space="m@1", with_payload=True)
    assert isinstance(res, SearchResult) and res.payloads is not None
    assert [row[0] for row in res.payloads] == [{"n": 0}, None, {"n": 2}]


def test_upsert_splits_batches(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    client.register_space("m@1", 8)
    client.create_collection("g", "m@1")
    calls: list[int] = []
    upsert = client._points.Upsert

    def counting(request: object, **kw: object) -> object:
        calls.append(len(request.ids))  # type: ignore[attr-defined]
        return upsert(request, **kw)

    monkeypatch.setattr(client._points, "Upsert", counting)
    xb = make_data(10_000, 8, seed=3)
    seq = client.upsert("g", [str(i) for i in range(10_000)], xb, space="m@1", batch_size=3000, progress=True)
    assert calls == [3000, 3000, 3000, 1000]
    info = client.get_collection("g")
    assert info.num_points == 10_000 and info.last_sequence == seq


def test_upsert_stream(client: Client) -> None:
    client.register_space("m@1", 8)
    client.create_collection("g", "m@1")
    xb = make_data(10_000, 8, seed=4)
    ids = [f"s{i}" for i in range(10_000)]
    seq = client.upsert_stream("g", ids, xb.astype(np.float16), space="m@1", batch_size=3000)
    info = client.get_collection("g")
    assert info.num_points == 10_000 and info.last_sequence == seq
    with pytest.raises(NotFound):
        client.upsert_stream("nope", ids[:10], xb[:10], space="m@1")


def test_server_errors_are_typed(client: Client) -> None:
    client.register_space("m@1", 4)
    client.register_space("other@1", 4)
    client.create_collection("g", "m@1")
    cases: list[tuple[type[InterlinguaError], grpc.StatusCode, bool, bool]] = []
    for call, cls, code in [
        (lambda: client.register_space("bad", 0), InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.get_space("nope@1"), NotFound, grpc.StatusCode.NOT_FOUND),
        (lambda: client.register_space("m@1", 4), AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
        (
            lambda: client.search("g", np.ones((1, 4)), 1, space="other@1"),
            FailedPrecondition,
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
    ]:
        with pytest.raises(cls) as info:
            call()
        err = info.value
        assert err.code == code and err.message and str(err).startswith(code.name)
        assert isinstance(err.__cause__, grpc.RpcError)
        cases.append((type(err), err.code, err.retriable, err.is_input_error))
    assert [(c[2], c[3]) for c in cases] == [(False, True), (False, True), (False, True), (False, False)]


def test_unmapped_code_gives_the_base_class(server: tuple[Server, int]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server[1]}") as ch, pytest.raises(grpc.RpcError) as info:
        ch.unary_unary("/interlingua.v1.Nope/Nope")(b"", timeout=10)
    err = from_rpc_error(info.value)
    assert type(err) is InterlinguaError and err.code == grpc.StatusCode.UNIMPLEMENTED


def test_client_side_checks_raise_invalid_argument(client: Client) -> None:
    with pytest.raises(InvalidArgument, match="shape"):
        client.upsert("g", ["a"], np.ones(4), space="m@1")
    with pytest.raises(InvalidArgument, match="2 ids for 1 vectors"):
        client.upsert("g", ["a", "b"], np.ones((1, 4)), space="m@1")
    with pytest.raises(InvalidArgument, match="payloads"):
        client.upsert("g", ["a"], np.ones((1, 4)), space="m@1", payloads=[None, None])
    with pytest.raises(InvalidArgument, match="metric"):
        client.register_space("x@1", 4, "hamming")
    assert client.upsert("g", [], np.ones((0, 4)), space="m@1") == 0  # nothing to send


def test_api_key_is_required_and_sent(tmp_path: Path) -> None:
    srv, port = start_server(tmp_path / "data", api_key="s3cret")
    try:
        with Client(f"127.0.0.1:{port}") as anon, Client(f"127.0.0.1:{port}", api_key="wrong") as bad:
            assert anon.health() == "SERVING"  # health needs no key
            for c in (anon, bad):
                with pytest.raises(Unauthenticated) as info:
                    c.list_spaces()
                assert not info.value.retriable and not info.value.is_input_error
        with Client(f"127.0.0.1:{port}", api_key="s3cret") as good:
            assert good.register_space("m@1", 4).name == "m@1"
            assert [s.name for s in good.list_spaces()] == ["m@1"]
    finally:
        srv.stop(None)


def test_health_and_wait_ready(client: Client) -> None:
    assert client.health() == "SERVING"
    client.wait_ready(1)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"127.0.0.1:{port}") as down, pytest.raises(interlingua.client.DeadlineExceeded) as info:
        down.wait_ready(0.3)
    assert info.value.retriable and "UNREACHABLE" in info.value.message


def test_search_stream_equals_unary_search_and_ends_on_error(client: Client) -> None:
    xb = _gallery(client)
    xq = make_data(30, 32, seed=2)
    Dref, Iref = brute_force(xb, xq, 5)
    with client.search_stream() as stream:
        for i in range(len(xq)):  # one query per request, as a high-rate caller sends them
            res = stream.search("g", xq[i], 5, space="m@1")
            unary = client.search("g", xq[i], 5, space="m@1")
            assert (res.ids == unary.ids).all() and np.array_equal(res.scores, unary.scores)
            _check_knn(res.scores, res.ids, Dref[i : i + 1], Iref[i : i + 1])
        with pytest.raises(NotFound, match="collection 'nope'"):
            stream.search("nope", xq[0], 5, space="m@1")
        with pytest.raises(NotFound):  # the stream ended with that error
            stream.search("g", xq[0], 5, space="m@1")
    with client.search_stream() as stream, pytest.raises(InvalidArgument, match="k is 0"):
        stream.search("g", xq[0], 0, space="m@1")


def test_prefix_collection_and_funnel_through_the_client(client: Client) -> None:
    client.register_space("m@1", 32, "cosine")
    info = client.create_collection("mrl", "m@1", prefix_dims=8)
    assert (info.prefix_dims, info.index_bytes_per_vector, info.rerank_bytes_per_vector) == (8, 32, 128)
    xb = make_data(600, 32, seed=5)
    client.upsert("mrl", [f"p{i}" for i in range(600)], xb, space="m@1")
    xq = make_data(10, 32, seed=6)
    res = client.search("mrl", xq, 5, space="m@1", shortlist_k=600, funnel=[(16, 300)])
    Dref, Iref = brute_force(xb, xq, 5)
    _check_knn(res.scores, res.ids, Dref, Iref)
    with pytest.raises(InvalidArgument, match="funnel"):
        client.search("mrl", xq, 5, space="m@1", funnel=[(40, 10)])
