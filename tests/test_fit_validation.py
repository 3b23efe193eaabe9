"""A FitTransform the fit would refuse is refused on the request, and a routed query is checked once mapped.

Against a real server over a real channel: every config value (the kind's config dataclass, built on the
request), a home -> home kind between two spaces, too few pairs once the held-out slices are set aside, an
evaluation query without relevant ids, a chain whose links do not meet or that carries pairs or a config: each
is INVALID_ARGUMENT naming what was wrong, and nothing is registered. A query that its route's transform maps
past ``validate.MAX_NORM`` is INVALID_ARGUMENT naming the query, the transform and the mapped norm, as the same
vector sent in the home space is; the route is unchanged and serves ordinary queries as numpy predicts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import brute_force, start_server

from interlingua.client import Client, InvalidArgument, NotFound

D = 16  #: new@1, old@1 (cosine); A, B (8-d, l2) for the routes; n4, o4 (4-d) for the held-out slices
MAX_SEED = 2**63 - 1


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    srv, port = start_server(Path(tmp_path_factory.mktemp("fit_validation")) / "data")
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as c:
            c.wait_ready(30)
            for name, d, metric in (("new@1", D, "cosine"), ("old@1", D, "cosine"), ("A", 8, "l2"), ("B", 8, "l2")):
                c.register_space(name, d, metric)
            for name in ("n4", "o4", "C"):
                c.register_space(name, 4 if name != "C" else 16, "l2")
            yield c
    finally:
        srv.stop(None)


@pytest.fixture(scope="module")
def pairs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    old = rng.standard_normal((300, D)).astype(np.float32)
    return old @ rng.standard_normal((D, D)).astype(np.float32), old


def names(c: Client) -> set[str]:
    return {t.name for t in c.list_transforms()}


def refused(c: Client, name: str, match: str, kind: str, src: str, tgt: str, **kw: Any) -> None:
    """FitTransform ``name`` is INVALID_ARGUMENT matching ``match`` and registers nothing."""
    before = names(c)
    with pytest.raises(InvalidArgument, match=match):
        c.fit_transform(name, kind, source_space=src, target_space=tgt, wait=False, **kw)
    assert names(c) == before and name not in before


# -- config values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "config", "match"),
    [
        (
            "procrustes",
            {"refine_steps": -1},
            r"^INVALID_ARGUMENT: config: refine_steps must be an integer >= 0, got -1",
        ),
        ("procrustes", {"center": "yes"}, r"config: center must be a bool, got 'yes'$"),
        ("procrustes", {"threads": 0}, r"config: threads must be an integer >= 1, got 0$"),
        ("procrustes", {"threads": 10**6}, r"config: threads must be at most 1024, got 1000000$"),
        ("procrustes", {"kind": "affine"}, r"config: kind is 'affine' in the config but the transform is a procrustes"),
        ("affine", {"ridges": []}, r"config: ridges must be a non-empty sequence, got \[\]$"),
        ("affine", {"holdout": 5}, r"config: holdout must be in \(0, 1\), got 5$"),
        ("affine", {"ridge": 0.1, "holdout": 5}, r"config: holdout must be in \(0, 1\), got 5$"),
        ("affine", {"seed": -1}, rf"config: seed must be an integer in \[0, {MAX_SEED}\], got -1$"),
        ("basis", {"center": 1}, r"config: center must be a bool, got 1$"),
        ("residual_mlp", {"lr": "x"}, r"config: lr must be a number in \(0, 1\], got 'x'$"),
        (
            "residual_mlp",
            {"batch_size": 1e9},
            r"config: batch_size must be an integer in \[2, 65536\], got 1000000000.0",
        ),
        ("residual_mlp", {"hidden": 1e8}, r"config: hidden must be an integer in \[1, 16384\], got 100000000.0$"),
        ("lambda_orthogonal", {"epochs": 0}, r"config: epochs must be an integer in \[1, 1000\], got 0$"),
        ("lambda_orthogonal", {"lams": 3}, r"config: lams must be a sequence of numbers, got 3$"),
        ("lambda_orthogonal", {"lam": 1.0, "holdout": 5}, r"config: holdout must be in \(0, 1\), got 5$"),
    ],
)
def test_config_values_are_refused_on_the_request(
    client: Client, pairs: tuple[np.ndarray, np.ndarray], kind: str, config: dict[str, Any], match: str
) -> None:
    new, old = pairs
    refused(client, "bad", match, kind, "new@1", "old@1", doc_pairs=(new, old), config=config)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"hidden": 10**8}, r"config: hidden must be at most 16384, got 100000000$"),
        ({"batch_size": 1e9}, r"config: batch_size must be an integer >= 2, got 1000000000.0$"),
        ({"epochs": 0}, r"config: epochs must be an integer >= 1, got 0$"),
        ({"lr": "x"}, r"config: lr must be a finite number > 0, got 'x'$"),
        ({"temperature": None}, r"config: temperature must be a finite number > 0, got None$"),
        ({"symmetric": "no"}, r"config: symmetric must be a bool, got 'no'$"),
        ({"dims": [4, 40]}, r"config: m must be in \(0, d\]: got m=40 for d=16$"),
        ({"dims": [8, 4]}, r"config: dims must be strictly increasing, got \[8, 4\]$"),
        ({"weights": [1.0, 1.0]}, r"config: weights must have one entry per dim \(1\), got 2$"),
    ],
)
def test_mrl_adapter_config_values_are_refused(
    client: Client, pairs: tuple[np.ndarray, np.ndarray], config: dict[str, Any], match: str
) -> None:
    old = pairs[1]
    refused(client, "bad", match, "mrl_adapter", "old@1", "old@1", doc_pairs=(old, old), query_pairs=(old, old),
            config=config)  # fmt: skip


def test_valid_configs_stay_valid(client: Client, pairs: tuple[np.ndarray, np.ndarray]) -> None:
    new, old = pairs
    for i, (kind, config) in enumerate(
        [
            ("procrustes", {"refine_steps": 0, "task_epochs": 0, "center": False, "threads": 1, "kind": "procrustes"}),
            ("affine", {"ridges": [0.1, 1.0], "holdout": 0.5, "seed": 3}),
            ("affine", {"ridge": 0.1}),
        ]
    ):
        assert client.fit_transform(f"ok{i}", kind, source_space="new@1", target_space="old@1",
                                    doc_pairs=(new, old), config=config, timeout=30).state == "ready"  # fmt: skip
    for name in (f"ok{i}" for i in range(3)):
        client.delete_transform(name)


# -- spaces, sizes and evaluation queries ----------------------------------------------------------


def test_home_kinds_map_one_space_onto_itself(client: Client, pairs: tuple[np.ndarray, np.ndarray]) -> None:
    new, old = pairs
    for kind in ("pca_basis", "mrl_adapter"):
        match = (
            rf"^INVALID_ARGUMENT: {kind} maps a collection's home space to itself \(a basis_transform\): "
            r"source_space and target_space must be the same space, got 'new@1' -> 'old@1'$"
        )
        refused(client, "bad", match, kind, "new@1", "old@1", doc_pairs=(new, old), query_pairs=(new, old))


def test_too_few_pairs_are_refused_with_the_number_needed(client: Client, pairs: tuple[np.ndarray, np.ndarray]) -> None:
    new, old = pairs
    refused(client, "bad", r"calibration data: pca_basis needs at least 2 vectors left to fit its axes; holdout 0.1 "
            r"sets 0 of the 1 given aside, leaving 1: give more pairs$", "pca_basis", "old@1", "old@1",
            doc_pairs=(old[:1], old[:1]))  # fmt: skip
    refused(client, "bad", r"calibration data: mrl_adapter needs at least 2 positive pairs left to fit; holdout 0.5 "
            r"sets 1 of the 2 given aside, leaving 1: give more pairs or a smaller holdout$", "mrl_adapter",
            "old@1", "old@1", doc_pairs=(old[:2], old[:2]), query_pairs=(old[:2], old[:2]), holdout=0.5)  # fmt: skip
    refused(client, "bad", r"calibration data: procrustes needs at least d_new=16 pairs left to fit \(a full-rank "
            r"fit\); holdout 0.1 sets 2 of the 16 given aside, leaving 14: give more pairs or a smaller holdout$",
            "procrustes", "new@1", "old@1", doc_pairs=(new[:16], old[:16]))  # fmt: skip
    x4 = np.random.default_rng(5).standard_normal((100, 4)).astype(np.float32)
    refused(client, "bad", r"calibration data: affine chooses its ridge on a held-out slice \(config holdout 0.1\) "
            r"of the fitted pairs, and 5 fitted pairs leave it or the rest empty: give more pairs, another config "
            r"holdout or a ridge$", "affine", "n4", "o4", doc_pairs=(x4[:6], 2 * x4[:6]))  # fmt: skip
    refused(client, "bad", r"calibration data: lambda_orthogonal sweeps lam on a held-out slice \(config holdout "
            r"0.1\) of the fitted pairs that needs more than 10 pairs on a side; 90 doc and 0 query pairs give 9 and "
            r"0: give more pairs, another config holdout or a lam$", "lambda_orthogonal", "n4", "o4",
            doc_pairs=(x4, 2 * x4))  # fmt: skip
    info = client.fit_transform("ridge", "affine", source_space="n4", target_space="o4",
                                doc_pairs=(x4[:6], 2 * x4[:6]), config={"ridge": 0.1}, timeout=30)  # fmt: skip
    assert info.state == "ready"  # the same pairs with a ridge: no slice to choose it on
    client.delete_transform("ridge")


def test_eval_queries_need_relevant_ids(client: Client, pairs: tuple[np.ndarray, np.ndarray]) -> None:
    new, old = pairs
    refused(client, "bad", r"message \d+: evaluation query 1 has no relevant ids; each evaluation query needs at "
            r"least one \(relevant_ids, cut by relevant_offsets\)$", "procrustes", "new@1", "old@1",
            doc_pairs=(new, old), doc_ids=[f"d{i}" for i in range(len(new))], eval_queries=(new[:3], old[:3]),
            eval_relevant=[["d0"], [], ["d2"]])  # fmt: skip


# -- chains ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def links(client: Client) -> dict[str, np.ndarray]:
    """a2b (A -> B), b2a (B -> A), a2c (A -> C, 8 -> 16 dims), fitted once."""
    xa = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
    x = {"A": xa, "B": 3 * xa[:, ::-1].copy(), "C": np.hstack([xa, xa])}
    for name, src, tgt in (("a2b", "A", "B"), ("b2a", "B", "A"), ("a2c", "A", "C")):
        client.fit_transform(name, "affine", source_space=src, target_space=tgt, doc_pairs=(x[src], x[tgt]),
                             config={"ridge": 0.0}, timeout=30)  # fmt: skip
    return x


def test_chain_links_must_meet(client: Client, links: dict[str, np.ndarray]) -> None:
    refused(client, "bad", r"^INVALID_ARGUMENT: chain link 1 \('a2b'\) maps 'A' -> 'B', but link 0 \('a2b'\) maps "
            r"into 'B': each link must read the space the link before it writes$", "chain", "A", "B",
            chain=["a2b", "a2b"])  # fmt: skip
    refused(client, "bad", r"chain link 1 \('b2a'\) maps 'B' -> 'A', but link 0 \('a2c'\) maps into 'C'", "chain",
            "A", "A", chain=["a2c", "b2a"])  # fmt: skip
    with pytest.raises(NotFound):
        client.activate_route("none", "bad")  # nothing to route
    info = client.fit_transform("a2a", "chain", source_space="A", target_space="A", chain=["a2b", "b2a"])
    assert info.state == "ready" and info.d_in == info.d_out == 8
    client.delete_transform("a2a")


def test_chain_takes_no_pairs_config_or_holdout(client: Client, links: dict[str, np.ndarray]) -> None:
    xa, xb = links["A"], links["B"]
    match = r"a chain transform composes fitted transforms; it takes no pairs/config \(got {}\)"
    kw: dict[str, Any] = {"chain": ["a2b", "b2a"]}
    refused(client, "bad", match.format(r"100 doc pairs, 0 query pairs, config \{\}, holdout 0"), "chain", "A",
            "A", doc_pairs=(xa, xa), **kw)  # fmt: skip
    refused(client, "bad", match.format(r"0 doc pairs, 0 query pairs, config \{'ridge': 0.1\}, holdout 0"), "chain",
            "A", "A", config={"ridge": 0.1}, **kw)  # fmt: skip
    refused(client, "bad", match.format(r"0 doc pairs, 0 query pairs, config \{\}, holdout 0.2"), "chain", "A", "A",
            holdout=0.2, **kw)  # fmt: skip
    refused(client, "bad", r"^INVALID_ARGUMENT: chain names the links of a chain transform; a affine transform "
            r"takes none$", "affine", "A", "B", doc_pairs=(xa, xb), **kw)  # fmt: skip


# -- a query its route maps out of bounds ----------------------------------------------------------


def test_a_query_mapped_past_max_norm_is_invalid_argument(client: Client) -> None:
    rng = np.random.default_rng(1)
    xa = rng.standard_normal((400, 8)).astype(np.float32)
    xb = xa * 1000  # procrustes fits x -> 1000 x: R = I, scale 1000
    client.fit_transform("times1000", "procrustes", source_space="A", target_space="B", doc_pairs=(xa, xb),
                         timeout=30)  # fmt: skip
    client.create_collection("cb", "B")
    client.upsert("cb", [f"p{i}" for i in range(len(xb))], xb, space="B")
    route = client.activate_route("cb", "times1000", force=True)
    q = np.vstack([xa[:1] + 0.01, np.full((1, 8), 4e15, np.float32)])  # norms ~3 and 1.1e16: both fine in A
    with pytest.raises(InvalidArgument, match=r"^INVALID_ARGUMENT: queries: vector 1 is mapped by transform "
                       r"'times1000' to L2 norm 1.13e\+19; the limit is 1e\+18 "):  # fmt: skip
        client.search("cb", q, 5, space="A")
    with pytest.raises(InvalidArgument, match=r"queries: vector 1 has L2 norm 1.13e\+19; the limit is 1e\+18"):
        client.search("cb", q * 1000, 5, space="B")  # the same vectors sent in the home space
    assert [r.transform for r in client.list_routes("cb").active] == [route.transform]
    xq = xa[:20] + 0.01 * rng.standard_normal((20, 8)).astype(np.float32)
    D, I = client.search("cb", xq, 5, space="A")
    Dref, Iref = brute_force(xb, xq * 1000, 5, "l2")
    np.testing.assert_array_equal(I, np.array([[f"p{j}" for j in row] for row in Iref], dtype=object))
    np.testing.assert_allclose(D, Dref, rtol=1e-3, atol=1e-3 * float(Dref.max()))
