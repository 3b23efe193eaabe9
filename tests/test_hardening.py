"""No request can stall the server, grow its memory or leave as INTERNAL (issue 10, items 3-6).

Each test talks to a real server over real gRPC and would have failed before its fix:
streams starved unary calls, unknown methods created metric series, undecodable
requests answered INTERNAL, deep JSON raised RecursionError, create/delete races hit
sqlite's unique constraint, NaN payloads and 3e38 vectors were accepted, long names
overflowed the error metadata, and oversized messages were parsed before refusal.
Fuzzing: seeded byte mutations of valid requests and hypothesis (raw bytes on every
RPC, structured upserts) never get INTERNAL or UNKNOWN.
"""

from __future__ import annotations

import queue
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import Stubs, connect, make_data, start_server, wait_for
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interlingua.server import Limits, Server
from interlingua.server.auth import METHODS
from interlingua.server.errors import MAX_MESSAGE_CHARS
from interlingua.server.validate import json_depth, parse_json_object
from interlingua.v1 import collections_pb2 as cpb
from interlingua.v1 import common_pb2 as pb
from interlingua.v1 import points_pb2 as ppb
from interlingua.v1 import points_pb2_grpc as pgrpc
from interlingua.v1 import spaces_pb2 as spb

D = 8
KEY = "s3cret"
AUTH = (("authorization", f"Bearer {KEY}"),)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
LIMITS = Limits(max_batch=100, max_nq=50, max_streams=6, max_streams_per_client=4)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Server, Stubs]]:
    srv, port = start_server(tmp_path / "data", limits=LIMITS, workers=4, metrics_port=0)
    s = connect(port)
    s.register("old@1", D)
    s.register("l2@1", D, pb.METRIC_L2)
    s.create("gallery", "old@1")
    s.create("euclid", "l2@1")
    s.upsert("gallery", "old@1", [f"p{i}" for i in range(20)], make_data(20, D), payloads=['{"a": 1}'] * 20)
    yield srv, s
    s.channel.close()
    srv.stop(None)


def fingerprint(s: Stubs, metadata: Any = ()) -> tuple[object, ...]:
    spaces = s.spaces.ListSpaces(spb.ListSpacesRequest(), metadata=metadata)
    cols = s.collections.ListCollections(cpb.ListCollectionsRequest(), metadata=metadata)
    got = s.points.GetPoints(
        ppb.GetPointsRequest(collection="gallery", ids=["p0", "p1"], with_vectors=True, with_payload=True),
        metadata=metadata,
    )
    return (
        [x.name for x in spaces.spaces],
        [(c.name, c.num_points, c.last_sequence) for c in cols.collections],
        got.SerializeToString(),
    )


def expect(s: Stubs, code: grpc.StatusCode, fn: Any, *args: Any, match: str = "", **kw: Any) -> str:
    before = fingerprint(s)
    with pytest.raises(grpc.RpcError) as exc:
        fn(*args, **kw)
    err = exc.value
    assert err.code() == code, (err.code(), err.details())
    assert match.lower() in (err.details() or "").lower(), err.details()
    assert fingerprint(s) == before, "a rejected request changed the data"
    return str(err.details())


# -- 3: streams cannot exhaust the worker pool -----------------------------------------------------


def test_open_streams_leave_unary_calls_a_worker(tmp_path: Path) -> None:
    """4 Watch streams (no key) + 4 idle SearchStreams once made GetCollection time out (4 workers)."""
    srv, port = start_server(tmp_path / "d", api_key=KEY, workers=4)
    s = connect(port)
    health = health_pb2_grpc.HealthStub(s.channel)
    ends: list[queue.Queue[object]] = []
    calls: list[Any] = []
    try:
        s.spaces.RegisterSpace(
            spb.RegisterSpaceRequest(space=pb.Space(name="old@1", dim=D, metric=pb.METRIC_COSINE)), metadata=AUTH
        )
        s.collections.CreateCollection(cpb.CreateCollectionRequest(name="c", home_space="old@1"), metadata=AUTH)
        for _ in range(4):
            watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            calls.append(watch)
        for _ in range(4):
            q: queue.Queue[object] = queue.Queue()
            ends.append(q)
            calls.append(s.points.SearchStream(iter(q.get, None), metadata=AUTH, timeout=60))
        wait_for(lambda: (srv.open_slots.open, srv.slots.open) == (4, 4))
        start = time.monotonic()
        info = s.collections.GetCollection(cpb.GetCollectionRequest(name="c"), metadata=AUTH, timeout=1.0)
        assert info.name == "c" and time.monotonic() - start < 1.0
    finally:
        for q in ends:
            q.put(None)
        for c in calls:
            c.cancel()
        s.channel.close()
        srv.stop(None)


def test_streams_over_the_caps_are_refused_and_slots_come_back(env: tuple[Server, Stubs]) -> None:
    srv, s = env
    health = health_pb2_grpc.HealthStub(s.channel)
    watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(LIMITS.max_streams_per_client)]
    for w in watches:
        next(w)
    with pytest.raises(grpc.RpcError) as exc:
        next(health.Watch(health_pb2.HealthCheckRequest(), timeout=60))
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "per client" in (exc.value.details() or "")
    assert s.info("gallery").num_points == 20  # unary calls still answer
    # health streams (open without a key) have their own slots: API streams still open
    xq = make_data(1, D, seed=2)
    req = ppb.SearchRequest(
        collection="gallery", query_space="old@1", k=2, queries=pb.Vectors(data=xq.tobytes(), dim=D)
    )
    assert [r.k for r in s.points.SearchStream(iter([req]), timeout=10)] == [2]
    for w in watches:
        w.cancel()
    wait_for(lambda: srv.open_slots.open == 0 and srv.slots.open == 0)
    w = health.Watch(health_pb2.HealthCheckRequest())
    assert next(w).status == health_pb2.HealthCheckResponse.SERVING
    w.cancel()


def test_health_changes_while_watchers_close_do_not_deadlock(env: tuple[Server, Stubs]) -> None:
    """grpc_health's non-blocking Watch deadlocked set() against a closing watcher (1 stop() in ~10)."""
    srv, s = env
    health = health_pb2_grpc.HealthStub(s.channel)
    for _ in range(30):
        watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(3)]
        for w in watches:
            next(w)
        for w in watches:
            w.cancel()
        flip = threading.Thread(target=lambda: [srv._on_state(srv.engine.state) for _ in range(3)], daemon=True)
        flip.start()
        flip.join(10)
        assert not flip.is_alive(), "health.set() deadlocked"
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def test_total_stream_cap() -> None:
    from interlingua.server.throttle import StreamSlots

    slots = StreamSlots(total=3, per_caller=2)
    slots.acquire("a")
    slots.acquire("a")
    slots.acquire("b")
    with pytest.raises(Exception, match="server's cap"):
        slots.acquire("c")
    slots.release("a")
    slots.acquire("c")
    assert slots.open == 3


# -- 4: unknown methods create no metric series ---------------------------------------------------


def _metrics_text(srv: Server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=5) as r:
        return str(r.read().decode())


@pytest.mark.parametrize("api_key", [None, KEY])
def test_unknown_methods_create_no_series(tmp_path: Path, api_key: str | None) -> None:
    srv, port = start_server(tmp_path / "d", api_key=api_key, metrics_port=0)
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        before = _metrics_text(srv)
        codes = set()
        for i in range(300):
            call = ch.unary_unary(f"/made.Up{i}/Method{i}")
            with pytest.raises(grpc.RpcError) as exc:
                call(b"", timeout=5)
            codes.add(exc.value.code())
        after = _metrics_text(srv)
        assert codes == {grpc.StatusCode.UNAUTHENTICATED if api_key else grpc.StatusCode.UNIMPLEMENTED}
        assert "made.Up" not in after and len(after) < len(before) + 2000
        if api_key:  # counted by status code only
            assert 'interlingua_rpc_denied_total{grpc_code="UNAUTHENTICATED"} 300.0' in after
    finally:
        ch.close()
        srv.stop(None)


# -- 5: every bad input is a precise status ------------------------------------------------------

_GARBAGE = b"\xff\xff\xff\xff\x0f"  # field 0x1fffffff with wire type 7: no message parses it
_BAD_UTF8 = b"\x0a\x02\xff\xfe"  # field 1 (a string on most requests) holding invalid UTF-8


def _raw_call(ch: grpc.Channel, method: str, raw: bytes) -> None:
    kind = METHODS.get(method)
    req_stream = kind is not None and kind.request_streaming
    resp_stream = kind is not None and kind.response_streaming
    if req_stream and resp_stream:
        list(ch.stream_stream(method)(iter([raw]), timeout=5, metadata=AUTH))
    elif req_stream:
        ch.stream_unary(method)(iter([raw]), timeout=5, metadata=AUTH)
    elif resp_stream:
        list(ch.unary_stream(method)(raw, timeout=5, metadata=AUTH))
    else:
        ch.unary_unary(method)(raw, timeout=5, metadata=AUTH)


_ALL = [*sorted(METHODS), "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"]


def _field1_is_string(method: str) -> bool:
    """Whether field 1 of the method's request is a string (so _BAD_UTF8 cannot parse)."""
    if method.startswith("/grpc.health"):
        return True  # HealthCheckRequest.service
    service, name = method.strip("/").split("/")
    pool = descriptor_pool.Default()
    field = pool.FindServiceByName(service).FindMethodByName(name).input_type.fields_by_number.get(1)
    return field is not None and field.type == FieldDescriptor.TYPE_STRING


@pytest.mark.parametrize("raw", [_GARBAGE, _BAD_UTF8], ids=["garbage", "bad-utf8"])
def test_undecodable_requests_are_invalid_argument_on_every_rpc(env: tuple[Server, Stubs], raw: bytes) -> None:
    _, s = env
    before = fingerprint(s)
    for method in _ALL:
        if raw is _BAD_UTF8 and not _field1_is_string(method):
            continue  # field 1 is unknown or not text there: a valid message
        with pytest.raises(grpc.RpcError) as exc:
            _raw_call(s.channel, method, raw)
        assert exc.value.code() == INVALID, (method, exc.value.code(), exc.value.details())
        assert "not a valid" in (exc.value.details() or ""), (method, exc.value.details())
    assert fingerprint(s) == before


def test_fuzzed_requests_never_answer_internal(env: tuple[Server, Stubs]) -> None:
    """Seeded byte-level mutations of valid requests over every RPC: no INTERNAL or UNKNOWN."""
    _, s = env
    rng = np.random.default_rng(0)
    x = make_data(2, D, seed=3)
    seeds = [
        ppb.UpsertRequest(
            collection="gallery",
            space="old@1",
            ids=["z0", "z1"],
            vectors=pb.Vectors(data=x.tobytes(), dim=D),
            payloads=['{"k": [1, 2]}', "{}"],
        ).SerializeToString(),
        ppb.SearchRequest(
            collection="gallery", query_space="old@1", k=3, queries=pb.Vectors(data=x.tobytes(), dim=D)
        ).SerializeToString(),
        cpb.CreateCollectionRequest(name="fz", home_space="old@1", index_spec="Flat").SerializeToString(),
        spb.GetSpaceRequest(name="old@1").SerializeToString(),
    ]
    methods = [m for m in _ALL if not m.endswith("/Watch")]  # a valid Watch stays open: not a unary answer
    bad = []
    for case in range(1000):
        raw = bytearray(seeds[case % len(seeds)])
        for _ in range(int(rng.integers(1, 4))):
            raw[int(rng.integers(len(raw)))] = int(rng.integers(256))
        method = methods[int(rng.integers(len(methods)))]
        try:
            _raw_call(s.channel, method, bytes(raw))
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                bad.append((method, bytes(raw), e.details()))
    assert not bad, bad[:3]


_BAD_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
_UNARY = [m for m in _ALL if not m.endswith("/Watch")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(_UNARY), raw=st.binary(max_size=96))
def test_hypothesis_raw_bytes_never_answer_internal(env: tuple[Server, Stubs], method: str, raw: bytes) -> None:
    _, s = env
    try:
        _raw_call(s.channel, method, raw)
    except grpc.RpcError as e:
        assert e.code() not in _BAD_CODES, (method, raw, e.details())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ids=st.lists(st.text(max_size=8), min_size=1, max_size=3),
    payload=st.text(max_size=40) | st.integers(0, 60).map(lambda n: "[" * n + "1" + "]" * n),  # nesting depth
    space=st.sampled_from(["old@1", "l2@1", "", "x" * 300]),
    values=st.floats(width=32) | st.just(3e38),
    dim=st.integers(0, 2 * D),
)
def test_hypothesis_upserts_never_answer_internal(
    env: tuple[Server, Stubs], ids: list[str], payload: str, space: str, values: float, dim: int
) -> None:
    _, s = env
    data = np.full((len(ids), max(dim, 1)), values, dtype="<f4").tobytes()
    req = ppb.UpsertRequest(
        collection="euclid" if space == "l2@1" else "gallery",
        space=space,
        ids=ids,
        vectors=pb.Vectors(data=data, dim=dim),
        payloads=[payload] * len(ids),
    )
    try:
        s.points.Upsert(req, timeout=10)
    except grpc.RpcError as e:
        assert e.code() not in _BAD_CODES, (req, e.details())


def test_deep_json_payload_is_invalid_argument(env: tuple[Server, Stubs]) -> None:
    _, s = env
    deep = "[" * 5000 + "]" * 5000  # RecursionError -> INTERNAL before
    msg = expect(s, INVALID, s.upsert, "gallery", "old@1", ["q"], make_data(1, D), payloads=[deep], match="nests")
    assert "5000 levels" in msg
    assert json_depth('{"a": "[[[[\\"[["}') == 1 and json_depth(deep) == 5000


@pytest.mark.parametrize("payload", ['{"x": NaN}', '{"x": -Infinity}', '{"x": 1e999}'])
def test_non_finite_json_numbers_are_rejected(env: tuple[Server, Stubs], payload: str) -> None:
    _, s = env
    expect(s, INVALID, s.upsert, "gallery", "old@1", ["q"], make_data(1, D), payloads=[payload], match="payloads[0]")


def test_parse_json_object_helper() -> None:
    from interlingua.server.errors import InvalidArgument

    assert parse_json_object('{"epochs": 3}', "header.config_json") == {"epochs": 3}
    with pytest.raises(InvalidArgument, match=r"header\.config_json nests 40 levels"):
        parse_json_object('{"a":' * 40 + "1" + "}" * 40, "header.config_json")
    with pytest.raises(InvalidArgument, match="must be a JSON object"):
        parse_json_object("[1]", "header.config_json")
    with pytest.raises(InvalidArgument, match="is 19 bytes; the limit is 10"):
        parse_json_object('{"a": "0123456789"}', "c", max_bytes=10)


@pytest.mark.parametrize("space,collection", [("l2@1", "euclid"), ("old@1", "gallery")])
def test_huge_vectors_are_rejected(env: tuple[Server, Stubs], space: str, collection: str) -> None:
    """l2 vectors of 3e38 were accepted, then scored NaN; cosine ones overflow their norm."""
    _, s = env
    x = np.full((1, D), 3e38, dtype=np.float32)
    expect(s, INVALID, s.upsert, collection, space, ["big"], x, match="norm")
    expect(s, INVALID, s.search, collection, space, x, 3, match="norm")
    ok = np.full((1, D), 1e17, dtype=np.float32)  # norm 2.8e17: under the cap
    assert s.upsert("euclid", "l2@1", ["ok"], ok) > 0


def test_create_and_delete_of_one_name_are_serialized(env: tuple[Server, Stubs]) -> None:
    """CreateCollection racing DeleteCollection gave sqlite3.IntegrityError -> INTERNAL (11 of 12 rounds)."""
    _, s = env
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.NOT_FOUND}
    seen: list[grpc.StatusCode] = []

    def run(fn: Any) -> None:
        try:
            fn()
            seen.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            seen.append(e.code())

    for _ in range(12):
        s.create("race", "old@1")
        threads = [
            threading.Thread(
                target=run, args=(lambda: s.collections.DeleteCollection(cpb.DeleteCollectionRequest(name="race")),)
            ),
            threading.Thread(target=run, args=(lambda: s.create("race", "old@1"),)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        names = [c.name for c in s.collections.ListCollections(cpb.ListCollectionsRequest()).collections]
        if "race" in names:
            s.collections.DeleteCollection(cpb.DeleteCollectionRequest(name="race"))
    assert set(seen) <= allowed, seen


# -- 6: caps on single requests -------------------------------------------------------------------


def test_long_names_are_capped_and_never_echoed_whole(env: tuple[Server, Stubs]) -> None:
    """A 20 KB name came back as RESOURCE_EXHAUSTED: echoed whole, it overflowed the error metadata."""
    _, s = env
    name = "n" * 20000
    for code, call in [
        (INVALID, lambda: s.register(name, D)),
        (INVALID, lambda: s.create(name, "old@1")),
        (grpc.StatusCode.NOT_FOUND, lambda: s.info(name)),
        (grpc.StatusCode.NOT_FOUND, lambda: s.search(name, "old@1", make_data(1, D), 1)),
        (grpc.StatusCode.NOT_FOUND, lambda: s.upsert("gallery", name, ["a"], make_data(1, D))),
    ]:
        msg = expect(s, code, call)
        assert len(msg) <= MAX_MESSAGE_CHARS and "n" * 2000 not in msg, msg[:200]


def test_limits_receive_bytes_follow_the_batch_caps() -> None:
    lim = Limits(max_batch=100, max_vector_bytes=1 << 16, max_id_bytes=256)
    assert lim.receive_bytes == (1 << 16) + 100 * 272 + (32 << 20)
    assert Limits().receive_bytes < Limits().max_message_bytes // 2
    assert Limits(max_message_bytes=1 << 20).receive_bytes == 1 << 20


def test_oversized_message_is_refused_before_parsing(env: tuple[Server, Stubs]) -> None:
    """A message over the receive cap (but under the old 256 MiB one) is refused by gRPC itself."""
    srv, s = env
    cap = srv.config.limits.receive_bytes
    big = np.zeros((cap // (4 * D) + 1024, D), dtype=np.float32)
    ch = grpc.insecure_channel(f"127.0.0.1:{srv.port}", options=[("grpc.max_send_message_length", 256 << 20)])
    try:
        req = ppb.UpsertRequest(
            collection="gallery", space="old@1", ids=["x"], vectors=pb.Vectors(data=big.tobytes(), dim=D)
        )
        expect(s, grpc.StatusCode.RESOURCE_EXHAUSTED, pgrpc.PointServiceStub(ch).Upsert, req, match="larger than max")
    finally:
        ch.close()
