"""A search request sent as bytes (``_wire.search_head`` + ``search_request_bytes``) is the message.

``Client.search`` of an array over gRPC serializes the request's fields but its queries once per
distinct request shape and appends the queries' ``Vectors`` field per call. These tests parse those
bytes against ``search_request``'s message for shapes and parameters of every kind, check that a
value a field refuses raises as the message's constructor does, and search a real server through
both forms, compared with a brute-force numpy reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import brute_force, connect, make_data, start_server

from interlingua.client import Client, InvalidArgument, SearchResult
from interlingua.client._client import search_request
from interlingua.client._wire import search_head, search_request_bytes
from interlingua.v1 import points_pb2 as ppb

D, N = 16, 300

SHAPES = [(1, 384), (3, 5), (0, 8), (2, 0), (1, 40000), (64, 16)]
SETTINGS: list[dict[str, Any]] = [
    {},
    {"ef_search": 64},
    {"nprobe": 3, "k_factor": 4},
    {"ef_search": 1, "nprobe": 2**32 - 1, "shortlist_k": 100, "k_factor": 1},
    {"ef_search": 0},  # an explicit 0 is sent (the field has presence) and refused by the server
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize(
    ("collection", "space", "k", "with_payload"), [("c", "s", 10, False), ("ç" * 200, "sp@1", 7, True)]
)
def test_bytes_parse_as_the_message(
    shape: tuple[int, int], settings: dict[str, Any], collection: str, space: str, k: int, with_payload: bool
) -> None:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    p = {"ef_search": None, "nprobe": None, "shortlist_k": None, "k_factor": None, **settings}
    head = search_head(collection, space, k, with_payload, p["ef_search"], p["nprobe"], p["shortlist_k"], p["k_factor"])
    sent = ppb.SearchRequest.FromString(search_request_bytes(head, x))
    ref = search_request(
        collection, x, k, space, p["ef_search"], p["nprobe"], with_payload, p["shortlist_k"], (), p["k_factor"]
    )
    assert sent == ref
    assert sent.HasField("queries") and sent.queries.data == x.tobytes() and sent.queries.dim == shape[1]
    for field in ("ef_search", "nprobe", "shortlist_k", "k_factor"):
        assert sent.params.HasField(field) == (p[field] is not None)
    # the same head again (cached) with other queries
    y = x + 1
    assert ppb.SearchRequest.FromString(search_request_bytes(head, y)).queries.data == y.tobytes()


BAD: list[tuple[str, Any]] = [
    ("k", -1),
    ("k", "5"),
    ("k", 2**32),
    ("k", 1.5),
    ("collection", 5),
    ("space", b"s"),  # taken: bytes for a string field
    ("collection", b"\xff"),  # refused: not UTF-8
    ("ef_search", -3),
    ("ef_search", 2**40),
    ("nprobe", "7"),
    ("k_factor", [1]),  # unhashable: the cache lookup must not be what fails
]


@pytest.mark.parametrize(("name", "value"), BAD)
def test_refused_values_raise_as_the_constructor(name: str, value: Any) -> None:
    """A value the message refuses raises the same error type; one it takes (bytes for a string field)
    gives the same message."""
    a: dict[str, Any] = {"collection": "c", "space": "s", "k": 10, "ef_search": None, "nprobe": None, "k_factor": None}
    a[name] = value
    x = np.zeros((1, 4), np.float32)

    def by_message() -> ppb.SearchRequest:
        return search_request(a["collection"], x, a["k"], a["space"], a["ef_search"], a["nprobe"], False, None, (),
                              a["k_factor"])  # fmt: skip

    def by_bytes() -> ppb.SearchRequest:
        head = search_head(a["collection"], a["space"], a["k"], False, a["ef_search"], a["nprobe"], None, a["k_factor"])
        return ppb.SearchRequest.FromString(search_request_bytes(head, x))

    try:
        ref = by_message()
    except (TypeError, ValueError) as e:
        with pytest.raises(type(e)):
            by_bytes()
        if name != "space":
            return
        raise AssertionError(f"{name}={value!r} refused") from e
    assert name == "space" and by_bytes() == ref


def test_the_cache_tells_types_apart() -> None:
    """``True == 1`` and ``hash(True) == hash(1)``: a head cached for k=1 is not k=True's (refused or not,
    as the constructor decides)."""
    head1 = search_head("c", "s", 1, False, None, None, None, None)
    try:
        ref = ppb.SearchRequest(collection="c", query_space="s", k=True).SerializeToString()  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        with pytest.raises(type(e)):
            search_head("c", "s", True, False, None, None, None, None)
    else:
        assert search_head("c", "s", True, False, None, None, None, None) == ref
    assert search_head("c", "s", 1, False, None, None, None, None) is head1


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Client, Any, np.ndarray]]:
    srv, port = start_server(tmp_path / "data")
    client = Client(f"127.0.0.1:{port}", timeout=30)
    stubs = connect(port)
    xb = make_data(N, D, seed=3)
    client.register_space("s", D, "cosine")
    client.create_collection("c", "s", "Flat")
    client.upsert("c", [f"p{i}" for i in range(N)], xb, space="s", payloads=[{"i": i} for i in range(N)])
    try:
        yield client, stubs, xb
    finally:
        stubs.channel.close()
        client.close()
        srv.stop(None)


def test_searches_through_the_bytes_match_brute_force_and_the_message(served: tuple[Client, Any, np.ndarray]) -> None:
    client, stubs, xb = served
    xq = make_data(20, D, seed=4)
    Dref, Iref = brute_force(xb, xq, 10)
    for i in range(len(xq)):  # single queries (the serial path on the server): (d,), (1, d), float64, a list
        for q in (xq[i], xq[i : i + 1], xq[i].astype(np.float64), xq[i].tolist()):
            r = client.search("c", q, 10, space="s")
            assert r.ids[0].tolist() == [f"p{j}" for j in Iref[i]]
            np.testing.assert_allclose(r.scores[0], Dref[i], rtol=1e-5, atol=1e-5)
    batch = client.search("c", xq, 10, space="s")  # a batch
    assert batch.ids.tolist() == [[f"p{j}" for j in row] for row in Iref]
    strided = np.asfortranarray(xq)  # not C-contiguous: converted first
    assert client.search("c", strided, 10, space="s").ids.tolist() == batch.ids.tolist()
    msg = stubs.points.Search(search_request("c", xq, 10, "s", None, None, False))
    assert list(msg.ids) == batch.ids.ravel().tolist() and msg.scores == batch.scores.tobytes()
    with_payload = client.search("c", xq[:2], 3, space="s", with_payload=True)
    assert with_payload.payloads == [[{"i": int(j)} for j in row] for row in Iref[:2, :3]]


def test_refusals_through_the_bytes_are_the_message_s(served: tuple[Client, Any, np.ndarray]) -> None:
    client, stubs, _ = served
    cases = [
        ({"queries": np.zeros((1, D + 1), np.float32), "k": 10}, "dimension"),
        ({"queries": np.ones((1, D), np.float32), "k": 0}, "k is 0"),
        ({"queries": np.ones((1, D), np.float32), "k": 10, "ef_search": 32}, "ef_search applies to HNSW"),
    ]
    for kw, words in cases:
        with pytest.raises(InvalidArgument, match=words) as by_bytes:
            client.search("c", space="s", **kw)
        x = kw["queries"]
        req = search_request("c", x, kw["k"], "s", kw.get("ef_search"), None, False)
        with pytest.raises(Exception) as by_message:
            stubs.points.Search(req)
        assert by_message.value.details() == by_bytes.value.message  # type: ignore[attr-defined]


def test_replies_read_into_their_own_arrays() -> None:
    """``SearchResult.from_proto``: float32 scores in a writable array of their own, ids (nq, k), the route;
    an empty reply; a reply whose sizes disagree is refused rather than read short."""
    scores = np.arange(6, dtype=np.float32) / 7
    msg = ppb.SearchResponse(nq=2, k=3, ids=[f"p{i}" for i in range(6)], scores=scores.tobytes(), exact=True)
    msg.route.query_space, msg.route.home_space, msg.route.transform = "new@2", "old@1", "t"
    r = SearchResult.from_proto(msg, False)
    assert r.scores.dtype == np.float32 and r.scores.shape == (2, 3) and r.scores.flags.writeable
    np.testing.assert_array_equal(r.scores.ravel(), scores)
    r.scores[0, 0] = 9  # its own copy: the message is unchanged
    assert msg.scores == scores.tobytes()
    assert r.ids.dtype == object and r.ids.tolist() == [["p0", "p1", "p2"], ["p3", "p4", "p5"]]
    assert (r.route.query_space, r.route.home_space, r.route.transform, r.exact, r.payloads) == (
        "new@2",
        "old@1",
        "t",
        True,
        None,
    )
    empty = SearchResult.from_proto(ppb.SearchResponse(nq=0, k=10), False)
    assert empty.scores.shape == (0, 10) and empty.ids.shape == (0, 10)
    for bad in (
        ppb.SearchResponse(nq=2, k=3, ids=["a"] * 6, scores=scores[:5].tobytes()),
        ppb.SearchResponse(nq=2, k=3, ids=["a"] * 5, scores=scores.tobytes()),
        ppb.SearchResponse(nq=1, k=3, ids=["a"] * 3, scores=scores.tobytes()),
    ):
        with pytest.raises(ValueError, match="SearchResponse of nq="):
            SearchResult.from_proto(bad, False)


def test_the_stream_sends_the_same_bytes(served: tuple[Client, Any, np.ndarray]) -> None:
    """``SearchStream.search`` over gRPC sends the request's bytes as ``Client.search`` does: the same
    answers for arrays, lists and single queries, with payloads; a refusal ends the stream with the
    unary call's message, raised again on the next search."""
    client, _, xb = served
    xq = make_data(12, D, seed=5)
    _, Iref = brute_force(xb, xq, 10)
    with client.search_stream() as stream:
        for i in range(len(xq)):
            for q in (xq[i], xq[i : i + 1], xq[i].tolist()):
                r = stream.search("c", q, 10, space="s")
                assert r.ids[0].tolist() == [f"p{j}" for j in Iref[i]]
        batch = stream.search("c", xq, 10, space="s")
        unary = client.search("c", xq, 10, space="s")
        assert batch.ids.tolist() == unary.ids.tolist() and batch.scores.tobytes() == unary.scores.tobytes()
        p = stream.search("c", xq[:2], 3, space="s", with_payload=True)
        assert p.payloads == [[{"i": int(j)} for j in row] for row in Iref[:2, :3]]
        with pytest.raises(InvalidArgument) as unary_refusal:
            client.search("c", xq[:1], 10, space="s", ef_search=32)
        with pytest.raises(InvalidArgument) as refusal:
            stream.search("c", xq[:1], 10, space="s", ef_search=32)
        assert refusal.value.message.endswith(unary_refusal.value.message)
        with pytest.raises(InvalidArgument):
            stream.search("c", xq[:1], 10, space="s")
