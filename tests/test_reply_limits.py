"""Replies within the send limit, and prefix searches within a candidate budget.

A search reply is sized before it is built (``engine.check_reply``, ``engine.bounded_payloads``):
one over ``Limits.max_message_bytes`` answers RESOURCE_EXHAUSTED naming nq, k, the bytes and the
limit, reads no more payloads than it must, and the server serves on; a smaller search with
payloads answers the brute-force ids with the payloads written, by Search, SearchStream and the
embedded client alike. A prefix collection's shortlist is cut to the labels it holds and a batch
is reranked in row chunks (``funnel.CANDIDATE_BUDGET_BYTES``), with the same results as one pass;
a MemoryError in a handler answers RESOURCE_EXHAUSTED, not INTERNAL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import Stubs, brute_force, connect, make_data, start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc

from interlingua.client import Client, ResourceExhausted
from interlingua.server import Server, funnel
from interlingua.server import collection as collection_module
from interlingua.server.collection import Collection
from interlingua.server.config import Limits
from interlingua.server.engine import PAYLOAD_READ_CHUNK, bounded_payloads, reply_bytes
from interlingua.server.errors import ResourceExhausted as Refused
from interlingua.server.routes import Route
from interlingua.v1 import collections_pb2 as cpb
from interlingua.v1 import common_pb2 as pb
from interlingua.v1 import points_pb2 as ppb

D, N = 8, 40
LIMIT = 1 << 20  #: the send limit of these servers (and their receive limit: 40 x 8 KB upserts fit)
SMALL = Limits(max_message_bytes=LIMIT)
XB, XQ = make_data(N, D, seed=1), make_data(8, D, seed=2)
IDS = [f"p{i}" for i in range(N)]
#: ~8 KB JSON strings, with 2-byte UTF-8 characters: the reply is counted in bytes, not characters
PAYLOADS = [f'"{i}:' + "é" * 2000 + "x" * 4000 + '"' for i in range(N)]


@pytest.fixture
def small(tmp_path: Path) -> Iterator[tuple[Server, Stubs]]:
    """A server with a 1 MiB send limit holding ``N`` points with ~8 KB payloads in collection "c"."""
    srv, port = start_server(tmp_path / "d", limits=SMALL)
    s = connect(port)
    s.register("s", D, pb.METRIC_L2)
    s.create("c", "s")
    s.upsert("c", "s", IDS, XB, PAYLOADS)
    yield srv, s
    s.channel.close()
    srv.stop(None)


def request(xq: np.ndarray, k: int, with_payload: bool, col: str = "c", **params: Any) -> ppb.SearchRequest:
    return ppb.SearchRequest(
        collection=col,
        query_space="s",
        k=k,
        queries=pb.Vectors(data=np.ascontiguousarray(xq, "<f4").tobytes(), dim=xq.shape[1]),
        with_payload=with_payload,
        params=pb.SearchParams(**params),
    )


def serving(s: Stubs) -> bool:
    health = health_pb2_grpc.HealthStub(s.channel)
    return bool(health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING)


def needed(message: str) -> int:
    m = re.search(r"needs (?:at least )?(\d+) bytes", message)
    assert m, message
    return int(m.group(1))


def check_answer(r: ppb.SearchResponse, xq: np.ndarray, k: int) -> None:
    """``r`` holds the brute-force ids of ``xq`` ("" past the N points) and, with payloads, the payloads written."""
    _, Iref = brute_force(XB, xq, min(k, N), "l2")
    ids = np.array(list(r.ids), dtype=object).reshape(r.nq, r.k)
    assert (ids[:, :N] == np.array(IDS, dtype=object)[Iref]).all() and (ids[:, N:] == "").all()
    if r.payloads:
        assert list(r.payloads) == [PAYLOADS[i] for i in Iref.ravel()]


def test_payload_reply_over_the_send_limit_is_refused(small: tuple[Server, Stubs]) -> None:
    _, s = small
    with pytest.raises(grpc.RpcError) as e:
        s.points.Search(request(XQ[:4], N, True))  # 160 hits x ~10 KB: ~1.6 MB
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    msg = e.value.details()
    assert "nq=4 queries with k=40 with payloads" in msg
    assert f"send limit of {LIMIT} bytes (max_message_bytes)" in msg
    assert "fewer queries or a smaller k, or search with with_payload=false" in msg
    assert needed(msg) > LIMIT
    assert serving(s)
    check_answer(s.points.Search(request(XQ[:4], N, False)), XQ[:4], N)  # without payloads it fits
    r = s.points.Search(request(XQ[:2], 5, True))
    check_answer(r, XQ[:2], 5)
    assert len(r.payloads) == 10


def test_reply_bytes_bound_the_serialized_reply(small: tuple[Server, Stubs]) -> None:
    """The size counted is the serialized reply's, up to the 14 bytes of nq, k and exact."""
    _, s = small
    r = s.points.Search(request(XQ[:3], 7, True))
    ids = np.array(list(r.ids), dtype=object).reshape(3, 7)
    counted = reply_bytes(ids, Route("s", "s", "identity"))
    counted += sum(2 + (len(b) >= 128) + (len(b) >= 1 << 14) + len(b) for b in (p.encode() for p in r.payloads))
    assert r.ByteSize() <= counted <= r.ByteSize() + 14


def test_ids_and_scores_over_the_send_limit_are_refused(small: tuple[Server, Stubs]) -> None:
    _, s = small
    xq = make_data(200, D, seed=3)  # 200 x 1024 hits (ids padded with ""): ~1.3 MB without payloads
    with pytest.raises(grpc.RpcError) as e:
        s.points.Search(request(xq, 1024, False))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    msg = e.value.details()
    assert "nq=200 queries with k=1024 needs" in msg and "with_payload" not in msg
    assert needed(msg) > LIMIT
    check_answer(s.points.Search(request(xq[:50], 1024, False)), xq[:50], 1024)  # ~320 KB


def test_search_stream_refuses_the_reply_over_the_limit(small: tuple[Server, Stubs]) -> None:
    _, s = small
    replies = s.points.SearchStream(iter([request(XQ[:2], 5, True), request(XQ, N, True), request(XQ[:1], 5, True)]))
    first = next(replies)
    check_answer(first, XQ[:2], 5)
    with pytest.raises(grpc.RpcError) as e:
        next(replies)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "nq=8 queries with k=40 with payloads" in e.value.details()
    assert serving(s)


def test_embedded_client_refuses_alike(tmp_path: Path, small: tuple[Server, Stubs]) -> None:
    _, s = small
    with pytest.raises(grpc.RpcError) as e:
        s.points.Search(request(XQ[:4], N, True))
    with Client.embedded(tmp_path / "e", limits=SMALL) as c:
        c.register_space("s", D, "l2")
        c.create_collection("c", "s")
        c.upsert("c", IDS, XB, space="s", payloads=PAYLOADS)
        with pytest.raises(ResourceExhausted) as err:
            c.search("c", XQ[:4], N, space="s", with_payload=True)
        assert err.value.message == e.value.details()
        got = c.search("c", XQ[:2], 5, space="s", with_payload=True)
        _, Iref = brute_force(XB, XQ[:2], 5, "l2")
        assert (got.ids == np.array(IDS, dtype=object)[Iref]).all()
        assert got.payloads == [[json.loads(PAYLOADS[i]) for i in row] for row in Iref]


def test_payloads_are_read_only_until_the_limit_is_passed() -> None:
    ids = np.array([[f"q{i}" for i in range(1000)], [""] * 1000], dtype=object)
    reads: list[int] = []

    def read(chunk: np.ndarray) -> list[str]:
        reads.append(len(chunk))
        return ["x" * 1000 for _ in chunk]

    with pytest.raises(Refused, match=r"nq=2 queries with k=1000 with payloads needs at least \d+ bytes"):
        bounded_payloads(ids, read, 0, 100_000)
    assert reads == [PAYLOAD_READ_CHUNK]  # the first chunk passed the limit: nothing more was read
    reads.clear()
    got = bounded_payloads(ids, read, 0, 10_000_000)
    assert got == ["x" * 1000] * 1000 + [""] * 1000 and sum(reads) == 1000


# -- prefix collections: the funnel's working set -------------------------------------------------

DF, NF = 16, 300


@pytest.fixture
def prefix(tmp_path: Path) -> Iterator[tuple[Stubs, np.ndarray]]:
    srv, port = start_server(tmp_path / "d")
    s = connect(port)
    s.register("s", DF, pb.METRIC_L2)
    s.collections.CreateCollection(cpb.CreateCollectionRequest(name="m", home_space="s", prefix_dims=4))
    xb = make_data(NF, DF, seed=5)
    s.upsert("m", "s", [f"p{i}" for i in range(NF)], xb)
    yield s, xb
    s.channel.close()
    srv.stop(None)


def search_m(s: Stubs, xq: np.ndarray, k: int, **params: Any) -> tuple[np.ndarray, np.ndarray]:
    r = s.points.Search(request(xq, k, False, "m", **params))
    D = np.frombuffer(r.scores, "<f4").reshape(r.nq, r.k)
    return D, np.array(list(r.ids), dtype=object).reshape(r.nq, r.k)


def test_shortlist_past_the_collection_is_cut_and_chunked(
    prefix: tuple[Stubs, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    s, xb = prefix
    xq = make_data(64, DF, seed=6)
    whole = search_m(s, xq, 10, shortlist_k=16384)
    staged = search_m(s, xq, 10, shortlist_k=16384, funnel=[pb.FunnelStage(dims=8, keep=1000)])
    calls: list[tuple[int, int]] = []
    search = Collection.search

    def spy(self: Collection, xq: np.ndarray, *a: Any, **kw: Any) -> Any:
        calls.append((len(xq), a[3][0]))
        return search(self, xq, *a, **kw)

    monkeypatch.setattr(Collection, "search", spy)
    monkeypatch.setattr(funnel, "CANDIDATE_BUDGET_BYTES", 8 * NF * (4 * DF + funnel.CANDIDATE_OVERHEAD))
    D, ids = search_m(s, xq, 10, shortlist_k=16384)
    assert calls == [(8, NF)] * 8  # 8 queries a chunk, a shortlist of the 300 points
    np.testing.assert_array_equal(D, whole[0])
    assert (ids == whole[1]).all()
    Dref, Iref = brute_force(xb, xq, 10, "l2")  # every point a candidate: the full-dimensional search
    assert (ids == np.array([f"p{i}" for i in range(NF)], dtype=object)[Iref]).all()
    np.testing.assert_allclose(D, Dref, rtol=1e-4, atol=1e-4)
    D2, ids2 = search_m(s, xq, 10, shortlist_k=16384, funnel=[pb.FunnelStage(dims=8, keep=1000)])
    np.testing.assert_array_equal(D2, staged[0])
    assert (ids2 == staged[1]).all()


def test_rerank_in_chunks_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    xb, xq = make_data(200, DF, seed=7), make_data(50, DF, seed=8)
    cand = np.tile(np.arange(-1, 199), (50, 1))  # a -1 (no candidate) in every row
    stages = [(8, 100), (DF, 10)]
    one = funnel.rerank(xq, xb, cand, stages, "cosine")
    monkeypatch.setattr(funnel, "CANDIDATE_BUDGET_BYTES", 7 * 200 * (4 * DF + funnel.CANDIDATE_OVERHEAD))
    assert funnel.chunk_rows(200, DF) == 7
    chunked = funnel.rerank(xq, xb, cand, stages, "cosine")
    np.testing.assert_array_equal(chunked[0], one[0])
    np.testing.assert_array_equal(chunked[1], one[1])


def test_memory_error_is_resource_exhausted(prefix: tuple[Stubs, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    s, _ = prefix
    xq = make_data(4, DF, seed=9)
    before = search_m(s, xq, 10)

    def exhausted(*a: Any, **kw: Any) -> Any:
        return np.empty(1 << 60, np.uint8)  # numpy's _ArrayMemoryError, a MemoryError

    monkeypatch.setattr(collection_module, "rerank", exhausted)
    with pytest.raises(grpc.RpcError) as e:
        search_m(s, xq, 10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert e.value.details().startswith("Search ran out of memory on the server; retry with fewer queries")
    with pytest.raises(grpc.RpcError) as e:
        next(s.points.SearchStream(iter([request(xq, 10, False, "m")])))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert e.value.details().startswith("SearchStream request 0 ran out of memory")
    monkeypatch.undo()
    assert serving(s)
    after = search_m(s, xq, 10)
    np.testing.assert_array_equal(after[0], before[0])
