"""Part 3: >= 1,000 fuzz cases over every RPC of every service; none may answer INTERNAL or UNKNOWN.

The server subprocess holds real spaces, collections (Flat, HNSW, IVF), points, a
fitted transform with a live route and a snapshot, so that fuzzed requests get past
the name lookups. Hypothesis (derandomized: the same cases every run) draws, for a
method of :func:`_rpcs.discover` (every service in ``interlingua.v1``, health and
reflection): a well-typed request with odd values, the same mangled (invalid UTF-8
in a string field, truncated, garbage appended), raw random bytes, or a stream of
those (client streams get 0-6 messages; ``FitTransform`` also gets plausible fit
streams with odd configs and NaN pairs, and the point RPCs plausible requests: real
names and dims, odd k, search parameters, funnels, NaN/3e38 queries, ids, payloads).
Each goes through a generic channel call as bytes. Then the issue's own cases run explicitly: deep JSON payloads and
configs, undecodable bytes and invalid UTF-8 on every RPC, NaN payloads, 3e38 l2
vectors, a 20 KB name, a fit asking for 10,000,000 epochs (refused, or over within
60 s), a 200 MB message (RESOURCE_EXHAUSTED before parsing: RSS +150 MB at most),
create/delete races of one name. ``fuzz_internal_or_unknown``
counts replies INTERNAL or UNKNOWN, and deaths of the server (it is restarted to go
on); calls that hang past their deadline are counted apart (``fuzz_deadline_exceeded``).
At the end the server must be SERVING, and nothing may exist outside its data dir.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from interlingua.v1 import collections_pb2 as cpb
from interlingua.v1 import common_pb2 as pb
from interlingua.v1 import points_pb2 as ppb
from interlingua.v1 import transforms_pb2 as tpb

from . import _strategies as fz
from ._harness import ServerProcess, Stubs, env_float, make_data, record, vectors
from ._rpcs import Rpc, call, discover

pytestmark = [pytest.mark.slow, pytest.mark.reliability, pytest.mark.timeout(1800)]

BAD = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
WATCH = "/grpc.health.v1.Health/Watch"


COLLECTIONS = {"gallery": ("old@1", "Flat", 0), "hnsw": ("old@1", "HNSW16", 0), "ivf": ("l2@1", "IVF4,Flat", 64)}


def replenish(s: Stubs) -> None:
    """(Re)creates the collections fuzzed DeleteCollection calls removed, each with 200 points."""
    x = make_data(200, 8)
    for col, (space, spec, train_min) in COLLECTIONS.items():
        try:
            s.info(col)
            continue
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
        s.create(col, space, spec, train_min)
        s.upsert(col, space, [f"p{i}" for i in range(200)], x)


def populate(s: Stubs) -> None:
    s.register("old@1", 8)
    s.register("new@2", 12)
    s.register("l2@1", 8, "l2")
    replenish(s)
    x = make_data(200, 8)
    rng = np.random.default_rng(0)
    new = np.hstack([x, 0.1 * rng.standard_normal((200, 4))]).astype(np.float32)
    header = tpb.FitHeader(name="t1", kind=tpb.TRANSFORM_KIND_PROCRUSTES, source_space="new@2", target_space="old@1")
    pairs = tpb.PairBatch(side=tpb.PAIR_SIDE_DOC, source=vectors(new), target=vectors(x))
    s.transforms.FitTransform(iter([tpb.FitTransformRequest(header=header), tpb.FitTransformRequest(pairs=pairs)]))
    deadline = time.monotonic() + 60
    while s.transforms.GetTransform(tpb.GetTransformRequest(name="t1")).state != tpb.TRANSFORM_STATE_READY:
        assert time.monotonic() < deadline, "transform t1 did not fit"
        time.sleep(0.1)
    s.transforms.ActivateRoute(tpb.ActivateRouteRequest(collection="gallery", transform="t1", force=True))
    try:
        from interlingua.v1 import snapshots_pb2 as snpb
        from interlingua.v1 import snapshots_pb2_grpc as sngrpc

        sngrpc.SnapshotServiceStub(s.channel).CreateSnapshot(snpb.CreateSnapshotRequest(name="snap1"), timeout=60)
    except ImportError:  # before snapshots existed
        pass


@st.composite
def fit_stream(draw: Any) -> list[bytes]:
    """A plausible FitTransform stream: a header with odd kind/config, then pair batches of NaN-or-not pairs."""
    header = tpb.FitHeader(
        name=draw(st.sampled_from(["fz-a", "fz-b", "t1", "", "n" * 20_000])),
        kind=draw(st.integers(-1, 12)),
        source_space=draw(st.sampled_from(["new@2", "old@1", "nope"])),
        target_space=draw(st.sampled_from(["old@1", "new@2", "l2@1"])),
        config_json=draw(fz.json_texts()),
        holdout=draw(st.sampled_from([0.0, 0.1, 0.99, 1.0, -1.0, float("nan")])),
    )
    out = [tpb.FitTransformRequest(header=header).SerializeToString()]
    for _ in range(draw(st.integers(0, 4))):
        n = draw(st.integers(0, 40))
        src = fz.packed_floats(n * 12, draw)
        tgt = fz.packed_floats(n * 8, draw)
        batch = tpb.PairBatch(
            side=draw(st.integers(0, 3)),
            source=pb.Vectors(data=src, dim=draw(st.sampled_from([12, 8, 0]))),
            target=pb.Vectors(data=tgt, dim=8),
            eval_only=draw(st.booleans()),
        )
        out.append(tpb.FitTransformRequest(pairs=batch).SerializeToString())
    return out


#: (collection, space, dim) the fuzz server holds: plausible requests name one of them
TARGETS = [("gallery", "old@1", 8), ("hnsw", "old@1", 8), ("ivf", "l2@1", 8), ("gallery", "new@2", 12)]
EDGE_PARAMS = [0, 1, 2, 16, 64, 1024, 4096, 2**31 - 1, 2**32 - 1]


@st.composite
def plausible(draw: Any, name: str) -> bytes:
    """A request to a point RPC that passes the name and shape checks (so that it reaches the index,
    the route, the store), with odd values drawn for its free fields: k, search parameters, NaN or
    3e38 queries, odd ids and payloads."""
    col, space, d = draw(st.sampled_from(TARGETS))
    nq = draw(st.integers(1, 4))
    x = pb.Vectors(data=fz.packed_floats(nq * d, draw), dim=d)
    ids = draw(st.lists(st.one_of(st.builds(lambda i: f"p{i}", st.integers(0, 250)), fz.ids()), min_size=1, max_size=6))
    if name in ("Search", "SearchStream"):
        params = pb.SearchParams()
        for field in ("ef_search", "nprobe", "shortlist_k"):
            if draw(st.booleans()):
                setattr(params, field, draw(st.sampled_from(EDGE_PARAMS)))
        for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
            params.funnel.add(dims=draw(st.sampled_from([0, 4, 8, 12, 1024])), keep=draw(st.sampled_from(EDGE_PARAMS)))
        k = draw(st.one_of(st.integers(1, 20), st.sampled_from(EDGE_PARAMS)))
        req = ppb.SearchRequest(
            collection=col, query_space=space, k=k, queries=x, params=params, with_payload=draw(st.booleans())
        )
        return bytes(req.SerializeToString())
    if name in ("Upsert", "UpsertStream"):
        ids = list(dict.fromkeys(ids))
        x = pb.Vectors(data=fz.packed_floats(len(ids) * d, draw), dim=d)
        payloads = draw(st.sampled_from([[], [fz.ODD_JSON[7]] * len(ids)]))
        if draw(st.booleans()):
            payloads = draw(st.lists(fz.json_texts(), min_size=len(ids), max_size=len(ids)))
        return bytes(
            ppb.UpsertRequest(collection=col, space=space, ids=ids, vectors=x, payloads=payloads).SerializeToString()
        )
    if name == "GetPoints":
        spaces = draw(st.lists(st.sampled_from(["old@1", "new@2", "l2@1", "nope"]), max_size=3))
        req_g = ppb.GetPointsRequest(
            collection=col, ids=ids, with_vectors=draw(st.booleans()), with_payload=draw(st.booleans()), spaces=spaces
        )
        return bytes(req_g.SerializeToString())
    return bytes(ppb.DeletePointsRequest(collection=col, ids=ids, missing_ok=draw(st.booleans())).SerializeToString())


PLAUSIBLE = ("Search", "SearchStream", "Upsert", "UpsertStream", "GetPoints", "DeletePoints")


class Tally:
    """Outcomes of every case; ``bad`` keeps a reproduction of each INTERNAL/UNKNOWN/dead/hung case."""

    def __init__(self, srv: ServerProcess) -> None:
        self.srv = srv
        self.channel = srv.stubs(key=None).channel
        self.cases = 0
        self.codes: Counter[str] = Counter()
        self.per_rpc: Counter[tuple[str, bool]] = Counter()  #: (method, answered OK) -> cases
        self.bad: list[str] = []
        self.deadlines: list[str] = []
        self.wrong: list[str] = []  #: issue cases answered with another code than the one they must get
        self.dead = 0
        self.lock = threading.Lock()  #: the create/delete race calls run() from several threads

    def run(self, rpc: Rpc, requests: list[bytes], what: str, channel: grpc.Channel | None = None) -> grpc.StatusCode:
        timeout = 0.5 if rpc.path == WATCH else 20.0
        out = call(channel or self.channel, rpc, requests, timeout=timeout)
        repro = f"{rpc.path} [{what}] {[r[:80].hex() for r in requests[:3]]} -> {out.code.name}: {out.details[:200]}"
        with self.lock:
            self.cases += 1
            self.codes[out.code.name] += 1
            self.per_rpc[rpc.name, out.code == grpc.StatusCode.OK] += 1
            if out.code in BAD:
                self.bad.append(repro)
            elif out.code == grpc.StatusCode.DEADLINE_EXCEEDED and rpc.path != WATCH:
                self.deadlines.append(repro)
        if not self.srv.alive():
            self.dead += 1
            self.bad.append(f"SERVER DIED after {repro}\n{self.srv.log_tail(15)}")
            self.srv.start_serving()
            self.channel = self.srv.stubs(key=None).channel
        if self.cases % 100 == 0:
            replenish(Stubs(self.channel))
        return out.code


def test_fuzz_every_rpc(server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    n_examples = int(env_float("RELIABILITY_FUZZ_EXAMPLES", 2000))
    srv = server("fuzz")
    srv.start_serving()
    populate(srv.stubs())
    rpcs = discover()
    tally = Tally(srv)

    @st.composite
    def case(draw: Any) -> tuple[Rpc, list[bytes], str]:
        rpc = draw(st.sampled_from(rpcs))
        mode = draw(st.sampled_from(["typed", "typed", "typed", "raw", "stream"]))
        if rpc.name == "FitTransform" and draw(st.booleans()):
            return rpc, draw(fit_stream()), "fit-stream"
        if rpc.name in PLAUSIBLE and draw(st.booleans()):
            n = draw(st.integers(1, 4)) if rpc.client_streaming else 1
            return rpc, [draw(plausible(rpc.name)) for _ in range(n)], "plausible"
        one = fz.raw_bytes() if mode == "raw" else fz.request_bytes(rpc.input)
        if rpc.client_streaming and mode == "stream":
            reqs = draw(st.lists(st.one_of(fz.request_bytes(rpc.input), fz.raw_bytes()), max_size=6))
            return rpc, reqs, "stream"
        return rpc, [draw(one)], mode

    @settings(
        max_examples=n_examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case())
    def fuzz(c: tuple[Rpc, list[bytes], str]) -> None:
        tally.run(*c)

    t0 = time.monotonic()
    issue_cases(srv, rpcs, tally)
    fuzz()
    print(f"fuzz: {tally.cases} cases in {time.monotonic() - t0:.0f}s; codes {dict(tally.codes)}")

    for rpc in rpcs:
        ok, total = tally.per_rpc[rpc.name, True], tally.per_rpc[rpc.name, True] + tally.per_rpc[rpc.name, False]
        print(f"  {rpc.path}: {total} cases, {ok} OK")
    serving = srv.wait_serving(30) is not None
    stray = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("fuzz"))
    record(
        fuzz_cases=tally.cases,
        fuzz_internal_or_unknown=len(tally.bad),
        fuzz_server_deaths=tally.dead,
        fuzz_deadline_exceeded=len(tally.deadlines),
        fuzz_wrong_code=len(tally.wrong),
        fuzz_rpcs=len(rpcs),
        fuzz_serving_at_end=serving,
    )
    assert serving, "the server is not SERVING after the fuzz"
    assert not stray, f"files written outside the data dir: {stray}"
    assert not tally.bad, f"{len(tally.bad)} INTERNAL/UNKNOWN/dead cases:\n" + "\n".join(tally.bad[:15])
    assert not tally.deadlines, f"{len(tally.deadlines)} calls hung:\n" + "\n".join(tally.deadlines[:10])
    assert not tally.wrong, f"{len(tally.wrong)} issue cases got the wrong code:\n" + "\n".join(tally.wrong)
    assert tally.cases >= 1000


def issue_cases(srv: ServerProcess, rpcs: list[Rpc], tally: Tally) -> None:
    """The inputs issue 10 names, each with the code it must get."""
    by_name = {r.name: r for r in rpcs}
    wrong: list[str] = []

    def expect(rpc: Rpc, requests: list[bytes], codes: tuple[grpc.StatusCode, ...], what: str) -> None:
        got = tally.run(rpc, requests, what)
        if got not in codes:
            wrong.append(f"{rpc.path} [{what}]: {got.name}, expected {[c.name for c in codes]}")

    invalid = (grpc.StatusCode.INVALID_ARGUMENT,)
    deep = "[" * 5000 + "]" * 5000
    x = make_data(1, 8)
    upsert = ppb.UpsertRequest(collection="gallery", space="old@1", ids=["deep"], vectors=vectors(x), payloads=[deep])
    expect(by_name["Upsert"], [upsert.SerializeToString()], invalid, "deep JSON payload")
    upsert.payloads[:] = ['{"x": NaN}']
    expect(by_name["Upsert"], [upsert.SerializeToString()], invalid, "NaN payload")
    huge = ppb.UpsertRequest(collection="ivf", space="l2@1", ids=["big"], vectors=vectors(np.full((1, 8), 3e38, "f4")))
    expect(by_name["Upsert"], [huge.SerializeToString()], invalid, "3e38 l2 vector")
    header = tpb.FitHeader(name="deep", kind=tpb.TRANSFORM_KIND_PROCRUSTES, source_space="new@2", target_space="old@1")
    header.config_json = deep
    expect(
        by_name["FitTransform"], [tpb.FitTransformRequest(header=header).SerializeToString()], invalid, "deep config"
    )
    long_name = cpb.CreateCollectionRequest(name="n" * 20_000, home_space="old@1", index_spec="Flat")
    expect(by_name["CreateCollection"], [long_name.SerializeToString()], invalid, "20 KB name")
    for rpc in rpcs:
        if rpc.service.startswith("interlingua."):
            garbage = [b"\x0a\xff\xff\xff\xff\x0f"]  # field 1, length-delimited, length past the end
            expect(rpc, garbage, invalid + (grpc.StatusCode.OK,) * rpc.client_streaming, "undecodable bytes")
            strings = [f.number for f in rpc.input.fields if f.type == FieldDescriptor.TYPE_STRING]
            if strings:
                field = fz.varint(strings[0] << 3 | 2) + b"\x02\xff\xfe"
                expect(rpc, [field], invalid, "invalid UTF-8 in a string field")

    # a fit asking for 10,000,000 epochs is refused, or ends: it may not run for hours
    header = tpb.FitHeader(
        name="epochs", kind=tpb.TRANSFORM_KIND_RESIDUAL_MLP, source_space="new@2", target_space="old@1"
    )
    header.config_json = '{"epochs": 10000000}'
    pairs = tpb.PairBatch(
        side=tpb.PAIR_SIDE_DOC, source=vectors(make_data(200, 12, seed=5)), target=vectors(make_data(200, 8, seed=5))
    )
    fit_reqs = [tpb.FitTransformRequest(header=header), tpb.FitTransformRequest(pairs=pairs)]
    code = tally.run(by_name["FitTransform"], [r.SerializeToString() for r in fit_reqs], "epochs 1e7")
    if code == grpc.StatusCode.OK:
        t_end = time.monotonic() + 60
        get = Stubs(tally.channel).transforms.GetTransform
        while get(tpb.GetTransformRequest(name="epochs")).state == tpb.TRANSFORM_STATE_FITTING:
            if time.monotonic() > t_end:
                wrong.append("FitTransform with epochs 10,000,000 accepted and still fitting after 60 s")
                break
            time.sleep(0.5)
    elif code not in (*invalid, grpc.StatusCode.RESOURCE_EXHAUSTED):
        wrong.append(f"FitTransform with epochs 10,000,000: {code.name}")

    # a message over the receive cap is refused before it is parsed (RSS does not grow by its size)
    big = ppb.UpsertRequest(collection="gallery", space="old@1", ids=["big"])
    big.vectors.dim, big.vectors.data = 8, bytes(200 << 20)
    wide = grpc.insecure_channel(srv.target, options=[("grpc.max_send_message_length", 512 << 20)])
    rss0 = srv.rss_mb()
    code = tally.run(by_name["Upsert"], [big.SerializeToString()], "200 MB message", channel=wide)
    grew = srv.rss_mb() - rss0
    wide.close()
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED or grew > 150:
        wrong.append(f"200 MB Upsert: {code.name}, RSS +{grew:.0f} MB")

    # create/delete of one name racing: ALREADY_EXISTS / NOT_FOUND / OK, never INTERNAL
    create, delete = by_name["CreateCollection"], by_name["DeleteCollection"]
    for i in range(12):
        name = f"race-{i}"
        reqs = [
            (create, cpb.CreateCollectionRequest(name=name, home_space="old@1", index_spec="Flat")),
            (delete, cpb.DeleteCollectionRequest(name=name)),
        ] * 3
        threads = [
            threading.Thread(target=tally.run, args=(rpc, [msg.SerializeToString()], "create/delete race"))
            for rpc, msg in reqs
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    tally.wrong.extend(wrong)
    print(json.dumps({"issue_cases_wrong_code": wrong}))
