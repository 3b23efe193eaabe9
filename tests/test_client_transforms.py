"""The client's TransformService calls against a real server on port 0: fit, wait, route, shadow, errors.

The data: old vectors (d=16, cosine) and "new" ones that are a seeded rotation of them plus a
translation, so a Procrustes fit is almost exact and mapped new-space queries find the old ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from conftest import make_data

from interlingua.client import (
    AlreadyExists,
    Client,
    DeadlineExceeded,
    FailedPrecondition,
    FitFailed,
    InterlinguaError,
    InvalidArgument,
    NotFound,
    RouteInfo,
    TransformInfo,
)
from interlingua.client._calibration import fit_requests
from interlingua.client._exceptions import EXCEPTION_TABLE
from interlingua.server import Server
from interlingua.v1 import transforms_pb2 as tpb

D, N, NQ = 16, 500, 100


@dataclasses.dataclass
class Pairs:
    old: np.ndarray  # (N, D) gallery in the old (home) space, unit rows
    new: np.ndarray  # (N, D) the same items in the new space
    xq_old: np.ndarray  # (NQ, D) queries near gallery rows 0..NQ-1
    xq_new: np.ndarray
    extra_old: np.ndarray  # (50, D) eval-only gallery items
    extra_new: np.ndarray


def _unit(x: np.ndarray) -> np.ndarray:
    return np.asarray(x / np.linalg.norm(x, axis=1, keepdims=True))


@pytest.fixture(scope="module")
def pairs() -> Pairs:
    rng = np.random.default_rng(7)
    Q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    shift = 0.1 * rng.standard_normal(D)
    old = _unit(make_data(N + 50, D, seed=11).astype(np.float64))
    xq_old = _unit(old[:NQ] + 0.05 * rng.standard_normal((NQ, D)))
    new, xq_new = old @ Q + shift, xq_old @ Q + shift
    return Pairs(old[:N], new[:N], xq_old, xq_new, old[N:], new[N:])


@pytest.fixture
def client(server: tuple[Server, int]) -> Iterator[Client]:
    with Client(f"127.0.0.1:{server[1]}", timeout=60) as c:
        c.wait_ready(30)
        c.register_space("old@1", D)
        c.register_space("new@1", D)
        yield c


def _fit(client: Client, p: Pairs, name: str = "t1", **kw: object) -> TransformInfo:
    args: dict[str, object] = {
        "source_space": "new@1",
        "target_space": "old@1",
        "doc_pairs": (p.new, p.old),
        "doc_ids": [f"d{i}" for i in range(N)],
        "eval_queries": (p.xq_new, p.xq_old),
        "eval_relevant": [[f"d{i}"] for i in range(NQ)],
        "eval_gallery": ([f"e{i}" for i in range(50)], p.extra_new, p.extra_old),
        "batch_size": 128,
        "timeout": 60,
    }
    return client.fit_transform(name, "procrustes", **{**args, **kw})  # type: ignore[arg-type]


def _gallery(client: Client, p: Pairs) -> None:
    client.create_collection("g", "old@1")
    client.upsert("g", [f"d{i}" for i in range(N)], p.old, space="old@1")


def test_fit_waits_until_ready_with_report(client: Client, pairs: Pairs) -> None:
    info = _fit(client, pairs, progress=True)
    assert (info.name, info.kind, info.state, info.error) == ("t1", "procrustes", "ready", "")
    assert (info.source_space, info.target_space, info.d_in, info.d_out) == ("new@1", "old@1", D, D)
    assert (info.doc_pairs, info.query_pairs, info.progress, info.stage) == (N, 0, 1.0, "done")
    assert len(info.checksum) == 64 and info.created_at > 0 and info.config["kind"] == "procrustes"
    r = info.report
    assert (r["nq"], r["nb"], r["k"]) == (NQ, N + 50, 10)  # the gallery: fitted docs with ids + eval-only docs
    assert r["transformed_r10"] >= 0.99 and r["raw_r10"] < 0.5  # the map is needed, and it works
    assert r["ecc_margin"] >= 0 and r["retention"] >= 0.99 and r["label_free"] is False
    assert r["fit"]["residual"] < 0.05
    assert client.get_transform("t1") == info
    assert client.list_transforms() == [info]


def test_activate_search_rollback_and_shadow(client: Client, pairs: Pairs) -> None:
    _gallery(client, pairs)
    with pytest.raises(FailedPrecondition, match="no route"):
        client.search("g", pairs.xq_new, 1, space="new@1")
    _fit(client, pairs, "t1")
    route = client.activate_route("g", "t1")
    assert (route.collection, route.query_space, route.home_space, route.transform, route.shadow) == (
        "g", "new@1", "old@1", "t1", "",
    )  # fmt: skip
    res = client.search("g", pairs.xq_new, 1, space="new@1")
    assert list(res.ids[:, 0]) == [f"d{i}" for i in range(NQ)]  # mapped new queries find their old items
    assert (res.route.query_space, res.route.home_space, res.route.transform) == ("new@1", "old@1", "t1")

    fitting = _fit(client, pairs, "t2", wait=False)  # a second candidate, fitted in the background
    assert fitting.state in ("fitting", "ready") and fitting.name == "t2"
    assert client.wait_transform("t2", timeout=60).state == "ready"
    assert [t.name for t in client.list_transforms()] == ["t1", "t2"]

    shadowed = client.set_shadow("g", "new@1", "t2", sample_rate=0.5)
    assert (shadowed.transform, shadowed.shadow) == ("t1", "t2")
    assert list(client.search("g", pairs.xq_new[:5], 1, space="new@1").ids[:, 0]) == [f"d{i}" for i in range(5)]
    assert client.list_routes("g").active[0].shadow == "t2"
    assert client.set_shadow("g", "new@1", None).shadow == ""

    assert client.activate_route("g", "t2").transform == "t2"
    listing = client.list_routes("g")
    assert [r.transform for r in listing.active] == ["t2"]
    assert [r.transform for r in listing.history] == ["t2", "t1"]  # newest first
    assert listing.history[1].deactivated_at >= listing.history[1].activated_at > 0
    assert listing.history[0].deactivated_at == 0

    back = client.rollback_route("g", "new@1")
    assert isinstance(back, RouteInfo) and back.transform == "t1"  # the route active before t2
    assert client.rollback_route("g", "new@1").transform == "t2"  # and before that rollback: t2
    assert [r.transform for r in client.list_routes("g").history] == ["t2", "t1", "t2", "t1"]


def test_rollback_of_the_only_route_removes_it(client: Client, pairs: Pairs) -> None:
    _gallery(client, pairs)
    _fit(client, pairs)
    client.activate_route("g", "t1")
    removed = client.rollback_route("g", "new@1")
    assert (removed.query_space, removed.transform) == ("new@1", "")
    assert client.list_routes("g").active == []
    with pytest.raises(FailedPrecondition):
        client.search("g", pairs.xq_new, 1, space="new@1")
    with pytest.raises(FailedPrecondition, match="no active route"):
        client.rollback_route("g", "new@1")
    with pytest.raises(FailedPrecondition, match="no active route"):
        client.set_shadow("g", "new@1", "t1")


def test_fit_failed_in_the_background(client: Client, pairs: Pairs, monkeypatch: pytest.MonkeyPatch) -> None:
    from interlingua.server.transforms import procrustes

    def diverged(*args: object, **kw: object) -> None:
        raise ValueError("procrustes: the solve diverged (injected)")

    monkeypatch.setattr(procrustes, "fit_procrustes", diverged)  # (Kind.fitter looks it up at each fit)
    with pytest.raises(FitFailed) as info:
        _fit(client, pairs, "bad")  # passes the request checks, fails in the fit
    monkeypatch.undo()
    err = info.value
    assert isinstance(err, InterlinguaError) and not err.retriable and not err.is_input_error
    assert FitFailed not in EXCEPTION_TABLE.values() and err.code == grpc.StatusCode.UNKNOWN  # no status maps to it
    assert err.info.state == "failed" and "diverged" in err.info.error and "diverged" in err.message
    assert client.get_transform("bad").state == "failed"
    _gallery(client, pairs)
    with pytest.raises(FailedPrecondition, match="failed"):
        client.activate_route("g", "bad")
    # a failed fit was never stored, so its name may be fitted again
    assert _fit(client, pairs, "bad").state == "ready"
    with pytest.raises(AlreadyExists):  # a ready one is immutable
        _fit(client, pairs, "bad")


def test_unknown_config_key_is_rejected_at_once(client: Client, pairs: Pairs) -> None:
    with pytest.raises(InvalidArgument, match=r"config: .*no_such_knob"):
        _fit(client, pairs, "t9", config={"no_such_knob": 1})
    with pytest.raises(NotFound):
        client.get_transform("t9")


def test_wait_times_out_while_fitting(client: Client, pairs: Pairs, monkeypatch: pytest.MonkeyPatch) -> None:
    info = _fit(client, pairs)
    monkeypatch.setattr(client, "get_transform", lambda name: dataclasses.replace(info, state="fitting", progress=0.4))
    with pytest.raises(DeadlineExceeded, match=r"still fitting after 0\.05 s") as err:
        client.wait_transform("t1", poll=0.01, timeout=0.05)
    assert err.value.retriable


@pytest.mark.parametrize(
    ("change", "cls", "match"),
    [
        ({"doc_pairs": "nan"}, InvalidArgument, "NaN"),
        ({"doc_pairs": "dim8"}, InvalidArgument, "dim is 8 but the space has dimension 16"),
        ({"doc_pairs": "few"}, InvalidArgument, "at least d_new=16 pairs"),
        ({"eval_relevant": "unknown"}, InvalidArgument, "relevant ids not among the doc pairs"),
        ({"source_space": "nope@1"}, NotFound, "nope@1"),
        ({"name": "bad name!"}, InvalidArgument, "transform name"),
        ({"config": "holdout"}, InvalidArgument, "holdout"),
    ],
)
def test_server_rejects_bad_calibration(
    client: Client, pairs: Pairs, change: dict[str, str], cls: type[InterlinguaError], match: str
) -> None:
    kw: dict[str, object] = {}
    name = change.get("name", "t1")
    if change.get("doc_pairs") == "nan":
        new = pairs.new.copy()
        new[7, 3] = np.nan
        kw["doc_pairs"] = (new, pairs.old)
    elif change.get("doc_pairs") == "dim8":
        kw["doc_pairs"] = (pairs.new[:, :8], pairs.old)
    elif change.get("doc_pairs") == "few":
        kw.update(doc_pairs=(pairs.new[:10], pairs.old[:10]), doc_ids=[f"d{i}" for i in range(10)])
        kw.update(eval_queries=None, eval_relevant=None, eval_gallery=None)
    elif change.get("eval_relevant") == "unknown":
        kw["eval_relevant"] = [["nope"]] * NQ
    elif "source_space" in change:
        kw["source_space"] = change["source_space"]
    elif change.get("config") == "holdout":
        kw["holdout"] = 0.95
    with pytest.raises(cls, match=match) as info:
        _fit(client, pairs, name, **kw)
    assert info.value.code == cls.default_code and isinstance(info.value.__cause__, grpc.RpcError)
    assert client.list_transforms() == []  # nothing is registered


def test_duplicate_name_and_unknown_names(client: Client, pairs: Pairs) -> None:
    _fit(client, pairs)
    with pytest.raises(AlreadyExists, match="already exists"):
        _fit(client, pairs)
    with pytest.raises(NotFound):
        client.get_transform("nope")
    _gallery(client, pairs)
    with pytest.raises(NotFound):
        client.activate_route("g", "nope")
    with pytest.raises(NotFound):
        client.list_routes("nope")


def test_client_side_checks(client: Client, pairs: Pairs) -> None:
    with pytest.raises(InvalidArgument, match="500 source vectors but 499 target vectors"):
        _fit(client, pairs, doc_pairs=(pairs.new, pairs.old[:-1]))
    with pytest.raises(InvalidArgument, match="kind must be one of"):
        client.fit_transform("t", "magic", source_space="new@1", target_space="old@1", doc_pairs=(pairs.new, pairs.old))
    with pytest.raises(InvalidArgument, match="give both or neither"):
        _fit(client, pairs, eval_relevant=None)
    with pytest.raises(InvalidArgument, match="99 relevant-id lists"):
        _fit(client, pairs, eval_relevant=[["d0"]] * 99)
    with pytest.raises(InvalidArgument, match="need a gallery"):
        _fit(client, pairs, doc_ids=None, eval_gallery=None)
    with pytest.raises(InvalidArgument, match="doc_labels must be 500 integers"):
        _fit(client, pairs, doc_labels=np.zeros(3, np.int64))
    with pytest.raises(InvalidArgument, match="shape"):
        _fit(client, pairs, query_pairs=(pairs.new[0], pairs.old[0]))
    with pytest.raises(InvalidArgument, match="sample_rate"):
        client.set_shadow("g", "new@1", "t1", sample_rate=0.0)
    assert client.list_transforms() == []  # nothing was sent


def test_fit_requests_batches_and_offsets(pairs: Pairs) -> None:
    header = tpb.FitHeader(name="t", kind=tpb.TRANSFORM_KIND_AFFINE, source_space="new@1", target_space="old@1")
    msgs = list(
        fit_requests(
            header,
            doc_pairs=(pairs.new.astype(np.float16), pairs.old),
            query_pairs=(pairs.xq_new, pairs.xq_old),
            doc_labels=np.arange(N) % 7,
            query_labels=None,
            doc_ids=None,
            eval_queries=(pairs.xq_new[:5], pairs.xq_old[:5]),
            eval_relevant=[["e0", "e1"], [], "e2", ["e3"], ("e4", "e0")],  # a bare str is one id
            eval_gallery=([f"e{i}" for i in range(50)], pairs.extra_new, pairs.extra_old),
            batch_size=200,
            progress=False,
        )
    )
    assert [m.WhichOneof("part") for m in msgs] == ["header"] + ["pairs"] * 5 + ["eval"]
    docs, queries, gallery = msgs[1:4], msgs[4], msgs[5]
    assert [len(m.pairs.labels) for m in docs] == [200, 200, 100] and docs[2].pairs.labels[0] == 400 % 7
    assert all(m.pairs.side == tpb.PAIR_SIDE_DOC and not m.pairs.ids and not m.pairs.eval_only for m in docs)
    assert queries.pairs.side == tpb.PAIR_SIDE_QUERY and len(queries.pairs.source.data) == NQ * D * 4
    assert gallery.pairs.eval_only and list(gallery.pairs.ids) == [f"e{i}" for i in range(50)]
    x = np.frombuffer(docs[0].pairs.source.data, "<f4").reshape(-1, D)
    np.testing.assert_array_equal(x, pairs.new[:200].astype(np.float16).astype(np.float32))
    ev = msgs[-1].eval
    assert list(ev.relevant_ids) == ["e0", "e1", "e2", "e3", "e4", "e0"]
    assert list(ev.relevant_offsets) == [0, 2, 2, 3, 4, 6]  # nq + 1 entries


def test_chain_of_two_transforms(client: Client, pairs: Pairs) -> None:
    client.register_space("mid@1", D)
    _fit(client, pairs, "a", target_space="mid@1", eval_queries=None, eval_relevant=None, eval_gallery=None)
    _fit(client, pairs, "b", source_space="mid@1", doc_pairs=(pairs.old, pairs.old))
    info = client.fit_transform("ab", "chain", source_space="new@1", target_space="old@1", chain=["a", "b"])
    assert (info.kind, info.state, info.config["chain"]) == ("chain", "ready", ["a", "b"])
