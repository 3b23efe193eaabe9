"""Training relevance over real gRPC: the client streams each calibration query's relevant doc ids, the
server turns them into calibration rows, the trained kinds learn the task, and the report estimates
retention from the held-out slice without evaluation queries. Every malformed relevance is
INVALID_ARGUMENT and stores nothing."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from test_task_loss import disagreeing_task

from interlingua.client import Client, InvalidArgument, NotFound
from interlingua.server import Server
from interlingua.v1 import common_pb2 as pb
from interlingua.v1 import transforms_pb2 as tpb

N = 400


@pytest.fixture
def client(server: tuple[Server, int]) -> Iterator[Client]:
    with Client(f"127.0.0.1:{server[1]}", timeout=60) as c:
        c.wait_ready(30)
        c.register_space("old@1", 16)
        c.register_space("new@1", 16)
        yield c


def fit(c: Client, name: str, **kw: object) -> object:
    cal = disagreeing_task(N, 0, agree=True)
    args: dict[str, object] = {
        "source_space": "new@1",
        "target_space": "old@1",
        "doc_pairs": (cal.doc_new, cal.doc_home),
        "query_pairs": (cal.query_new, cal.query_home),
        "doc_ids": [f"d{i}" for i in range(N)],
        "query_relevant": [[f"d{i}"] for i in range(N)],
        "config": {"lam": "inf", "epochs": 3, "batch_size": 64, "hard_negatives": 2},
        "timeout": 120,
    }
    args.update(kw)
    return c.fit_transform(name, "lambda_orthogonal", **args)  # type: ignore[arg-type]


def test_relevance_reaches_the_fit_and_the_report(client: Client) -> None:
    info = fit(client, "t1")
    report = info.report  # type: ignore[attr-defined]
    assert report["label_free"] is True and report["fit"]["relevance"] == N - report["heldout_pairs"] // 2
    assert report["fit"]["sweep"] == [] and report["fit"]["offsets"]["input"] in ("fitted", "doc_mean", "centre")
    assert report["estimated_retention"] > 0 and report["heldout_task_r10"] > 0
    assert "held-out calibration slice" in report["retention_estimate"]
    assert report["relevance"] == "given"
    pseudo = fit(client, "t2", doc_ids=None, query_relevant=None).report  # type: ignore[attr-defined]
    assert pseudo["relevance"] == "pseudo" and pseudo["fit"]["relevance"] > 0
    assert pseudo["estimated_retention"] is None and "pseudo relevance" in pseudo["retention_estimate"]
    config = {"lam": "inf", "epochs": 3, "batch_size": 64, "pseudo_relevance": False}
    blind = fit(client, "t3", doc_ids=None, query_relevant=None, config=config).report  # type: ignore[attr-defined]
    assert blind["relevance"] == "none" and blind["fit"]["relevance"] == 0 and blind["estimated_retention"] is None
    assert client.get_transform("t1").config["lam"] == "inf"


@pytest.mark.parametrize(
    ("kw", "text"),
    [
        (
            {"query_relevant": [["nope"]] + [["d1"]] * (N - 1)},
            "query pair 0: relevant ids not among the fitted doc pairs",
        ),
        ({"doc_ids": ["d0"] * N}, "doc pair ids must be unique"),
        ({"query_relevant": [["d0"]] * 3}, r"got 3 relevant-id lists \(query_relevant\) for 400 query pairs"),
        ({"doc_ids": None}, "query_relevant names doc pairs by id: give doc_ids too"),
    ],
)
def test_bad_relevance_is_invalid_argument_and_stores_nothing(client: Client, kw: dict[str, object], text: str) -> None:
    with pytest.raises(InvalidArgument, match=text):
        fit(client, "bad", **kw)
    with pytest.raises(NotFound):
        client.get_transform("bad")


def _stream(relevant_on: str, split: bool = False) -> Iterator[tpb.FitTransformRequest]:
    cal = disagreeing_task(40, 0, agree=True)
    vec = lambda x: pb.Vectors(data=np.ascontiguousarray(x, "<f4").tobytes(), dim=16)  # noqa: E731
    yield tpb.FitTransformRequest(
        header=tpb.FitHeader(name="raw", kind=tpb.TRANSFORM_KIND_PROCRUSTES, source_space="new@1", target_space="old@1")
    )
    rel = {"relevant_ids": [f"d{i}" for i in range(40)], "relevant_offsets": list(range(41))}
    yield tpb.FitTransformRequest(
        pairs=tpb.PairBatch(
            side=tpb.PAIR_SIDE_DOC, source=vec(cal.doc_new), target=vec(cal.doc_home),
            ids=[f"d{i}" for i in range(40)], **(rel if relevant_on == "doc" else {}),
        )
    )  # fmt: skip
    halves = [(0, 20), (20, 40)] if split else [(0, 40)]
    for j, (a, b) in enumerate(halves):
        part = {"relevant_ids": [f"d{i}" for i in range(a, b)], "relevant_offsets": list(range(b - a + 1))}
        given = relevant_on == "query" and not (split and j == 1)
        yield tpb.FitTransformRequest(
            pairs=tpb.PairBatch(
                side=tpb.PAIR_SIDE_QUERY, source=vec(cal.query_new[a:b]), target=vec(cal.query_home[a:b]),
                **(part if given else {}),
            )
        )  # fmt: skip


@pytest.mark.parametrize(
    ("relevant_on", "split", "text"),
    [
        ("doc", False, "relevant_ids are training relevance of query pairs, not doc pairs"),
        ("query", True, "training relevance was given for 1 of 2 query batches; give it for all or none"),
    ],
)
def test_malformed_relevance_streams(client: Client, relevant_on: str, split: bool, text: str) -> None:
    import grpc

    from interlingua.v1 import transforms_pb2_grpc as tgrpc

    stub = tgrpc.TransformServiceStub(client._channel)  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as exc:
        stub.FitTransform(_stream(relevant_on, split))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in (exc.value.details() or "")
    stub.FitTransform(_stream("query"))  # well formed: accepted
