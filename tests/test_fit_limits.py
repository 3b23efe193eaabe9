"""Caps on fits, CancelFit and DeleteTransform, over real gRPC against servers on port 0.

The data: old vectors (d=16, cosine) and "new" ones, a seeded rotation of them plus a shift, so a
Procrustes fit is near exact. A "long" fit is ``lambda_orthogonal`` at 1000 epochs on 100 pairs
(one epoch, the step at which a fit can stop, takes ~0.1 s; the whole fit about a minute).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_data, start_server

from interlingua.client import Client, FailedPrecondition, FitFailed, InvalidArgument, NotFound, ResourceExhausted
from interlingua.client.cli import main
from interlingua.server import Limits, Server
from interlingua.server.auth import required_role
from interlingua.server.fit_limits import MAX_EPOCHS, STEP_KNOBS, check_steps

D, N = 16, 400
#: a fit of ~a minute on 100 pairs (epochs of ~0.1 s, the steps at which it can stop): only ever cancelled or timed out
LONG = {"lam": 6.0, "epochs": 1000, "batch_size": 8, "hard_negatives": 0}


@pytest.fixture(scope="module")
def pairs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    old = make_data(N, D, seed=4).astype(np.float64)
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    return old @ Q + 0.1, old


def _client(port: int) -> Client:
    c = Client(f"127.0.0.1:{port}", timeout=30)
    c.wait_ready(30)
    c.register_space("old@1", D)
    c.register_space("new@1", D)
    return c


@pytest.fixture
def client(server: tuple[Server, int]) -> Iterator[Client]:
    with _client(server[1]) as c:
        yield c


def fit(c: Client, p: tuple[np.ndarray, np.ndarray], name: str, kind: str = "procrustes", **kw: Any) -> Any:
    kw.setdefault("timeout", 60)
    return c.fit_transform(name, kind, source_space="new@1", target_space="old@1", doc_pairs=p, **kw)


def few(p: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return p[0][:100], p[1][:100]


def wait_stage(c: Client, name: str, word: str, timeout: float = 30) -> None:
    """Waits until ``name``'s fit stage contains ``word`` (e.g. "epoch": it is training)."""
    deadline = time.monotonic() + timeout
    while word not in c.get_transform(name).stage:
        assert time.monotonic() < deadline, c.get_transform(name)
        time.sleep(0.02)


def fits_total(srv: Server, kind: str, outcome: str) -> float:
    value = srv.metrics.registry.get_sample_value("interlingua_fits_total", {"kind": kind, "outcome": outcome})
    return value or 0.0


# -- caps on the stream --------------------------------------------------------------------------


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[Client]:
    caps = Limits(max_fit_pairs=300, max_fit_bytes=100_000, max_eval_queries=40, max_eval_gallery=200)
    srv, port = start_server(tmp_path / "data", limits=caps)
    with _client(port) as c:
        yield c
    srv.stop(None)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("pairs", r"message 4: 400 calibration pairs are over max_fit_pairs=300"),
        ("bytes", r"message 3: the FitTransform stream reached \d+ bytes, over max_fit_bytes=100000"),
        ("eval_queries", r"message 2: 50 evaluation queries are over max_eval_queries=40"),
        ("gallery", r"message 3: 250 gallery pairs \(with ids\) are over max_eval_gallery=200"),
    ],
    ids=["pairs", "bytes", "eval_queries", "gallery"],
)
def test_over_cap_streams_are_refused_as_they_pass_the_cap(
    capped: Client, pairs: tuple[np.ndarray, np.ndarray], case: str, match: str
) -> None:
    new, old = pairs
    ids = [f"d{i}" for i in range(N)]
    kw: dict[str, Any] = {
        "pairs": {"doc_pairs": (new, old)},  # 4 messages of 100 pairs
        "bytes": {"doc_pairs": (new[:150], old[:150]), "doc_ids": [f"{i:0>600}" for i in range(150)], "batch_size": 50},
        "eval_queries": {
            "doc_pairs": (new[:100], old[:100]),
            "doc_ids": ids[:100],
            "eval_queries": (new[:50], old[:50]),
            "eval_relevant": [[f"d{i}"] for i in range(50)],
        },
        "gallery": {"doc_pairs": (new[:250], old[:250]), "doc_ids": ids[:250]},
    }[case]
    kw.setdefault("batch_size", 100)
    with pytest.raises(ResourceExhausted, match=match):
        capped.fit_transform("t", "procrustes", source_space="new@1", target_space="old@1", **kw)
    with pytest.raises(NotFound):  # a refused fit changes nothing
        capped.get_transform("t")
    assert capped.list_transforms() == []
    assert fit(capped, (new[:200], old[:200]), "t", batch_size=100).state == "ready"  # under the caps: fine


# -- step counts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "config", "match"),
    [
        (
            "lambda_orthogonal",
            {"epochs": 10_000_000},
            r"^INVALID_ARGUMENT: config: epochs must be at most 1000, got 10000000$",
        ),
        ("lambda_orthogonal", {"sweep_epochs": 5000}, r"config: sweep_epochs must be at most 1000, got 5000"),
        ("residual_mlp", {"epochs": 1001}, r"config: epochs must be at most 1000, got 1001"),
        ("mrl_adapter", {"epochs": 10_000_000}, r"config: epochs must be at most 1000, got 10000000"),
        ("procrustes", {"refine_steps": 10**9}, r"config: refine_steps must be at most 10000, got 1000000000"),
        ("procrustes", {"task_epochs": 1001}, r"config: task_epochs must be at most 1000, got 1001"),
        ("affine", {"task_epochs": 5000}, r"config: task_epochs must be at most 1000, got 5000"),
    ],
    ids=["lambda-epochs", "sweep-epochs", "mlp-epochs", "mrl-epochs", "refine-steps", "task-epochs", "affine-task"],
)
def test_step_counts_out_of_range_are_invalid_argument(
    client: Client, pairs: tuple[np.ndarray, np.ndarray], kind: str, config: dict[str, Any], match: str
) -> None:
    p = pairs if kind != "mrl_adapter" else (pairs[1], pairs[1])
    kw = {"query_pairs": p} if kind == "mrl_adapter" else {}
    with pytest.raises(InvalidArgument, match=match):
        fit(client, p, "t", kind, config=config, **kw)
    assert client.list_transforms() == []


def test_every_fit_function_caps_its_steps_too() -> None:
    from interlingua.server.transforms import train
    from interlingua.server.transforms.mrl_adapter import fit_mrl_adapter
    from interlingua.server.transforms.procrustes import MAX_REFINE_STEPS, fit_procrustes

    assert MAX_EPOCHS == train.MAX_EPOCHS and STEP_KNOBS["refine_steps"] == (0, MAX_REFINE_STEPS)
    x = make_data(40, 8, seed=1).astype(np.float64)
    with pytest.raises(ValueError, match=r"^epochs must be at most 1000, got 1001$"):
        fit_mrl_adapter((x, x), epochs=1001)
    with pytest.raises(ValueError, match=r"epochs must be an integer in \[1, 1000\]"):
        train.TrainConfig(epochs=MAX_EPOCHS + 1)
    from interlingua.server.transforms import Calibration

    empty = np.zeros((0, 8))
    with pytest.raises(ValueError, match=r"^refine_steps must be at most 10000, got 10001$"):
        fit_procrustes(Calibration(x, x, empty, empty), refine_steps=MAX_REFINE_STEPS + 1)
    check_steps({"epochs": 1000, "sweep_epochs": None, "task_epochs": 0, "refine_steps": 10_000})  # at the caps
    check_steps({"epochs": "10", "task_epochs": -1, "refine_steps": True})  # malformed: the fit function's to refuse


# -- CancelFit -----------------------------------------------------------------------------------


def test_cancel_a_running_fit_then_the_queued_one_runs(
    server: tuple[Server, int], client: Client, pairs: tuple[np.ndarray, np.ndarray]
) -> None:
    fit(client, few(pairs), "long", "lambda_orthogonal", config=LONG, wait=False)
    fit(client, pairs, "next", wait=False)  # queued behind it: one fit worker
    wait_stage(client, "long", "epoch")
    assert client.get_transform("next").stage == "queued"
    t0 = time.monotonic()
    info = client.cancel_fit("long")
    assert (info.state, info.error) == ("failed", "cancelled")
    assert client.wait_transform("next", timeout=30).state == "ready"  # the worker was freed at the next epoch
    assert time.monotonic() - t0 < 10
    assert client.get_transform("long").error == "cancelled"
    assert fits_total(server[0], "lambda_orthogonal", "cancelled") == 1
    assert fits_total(server[0], "procrustes", "ready") == 1
    with pytest.raises(FailedPrecondition, match=r"transform 'next' is ready, not fitting"):
        client.cancel_fit("next")
    with pytest.raises(FailedPrecondition, match=r"transform 'long' is failed, not fitting"):
        client.cancel_fit("long")
    assert fit(client, pairs, "long").state == "ready"  # a cancelled fit's name is free again


def test_cancel_a_queued_fit_it_never_runs(client: Client, pairs: tuple[np.ndarray, np.ndarray]) -> None:
    fit(client, few(pairs), "long", "lambda_orthogonal", config=LONG, wait=False)
    fit(client, pairs, "queued", wait=False)
    info = client.cancel_fit("queued")
    assert (info.state, info.error, info.stage) == ("failed", "cancelled", "queued")
    client.cancel_fit("long")
    assert fit(client, pairs, "after").state == "ready"
    assert client.get_transform("queued").stage == "queued"  # it never started
    with pytest.raises(FitFailed, match="cancelled"):
        client.wait_transform("queued", timeout=5)


def test_max_fit_seconds_stops_a_fit(tmp_path: Path, pairs: tuple[np.ndarray, np.ndarray]) -> None:
    srv, port = start_server(tmp_path / "data", limits=Limits(max_fit_seconds=1.0))
    try:
        with _client(port) as c:
            t0 = time.monotonic()
            with pytest.raises(FitFailed, match=r"fit exceeded max_fit_seconds=1 \(stopped after \d+\.\d s\)"):
                fit(c, few(pairs), "long", "lambda_orthogonal", config=LONG)
            assert time.monotonic() - t0 < 15
            assert fits_total(srv, "lambda_orthogonal", "timeout") == 1
            assert fit(c, pairs, "quick").state == "ready"  # the budget is per fit, from its start
    finally:
        srv.stop(None)


# -- DeleteTransform -----------------------------------------------------------------------------


def test_delete_refused_while_used_naming_the_users(client: Client, pairs: tuple[np.ndarray, np.ndarray]) -> None:
    old = pairs[1]
    for name in ("t1", "t2"):
        fit(client, pairs, name)
    client.create_collection("g", "old@1")
    client.activate_route("g", "t1", force=True)
    client.set_shadow("g", "new@1", "t2")
    client.fit_transform("c", "chain", source_space="new@1", target_space="old@1", chain=["t2"], timeout=60)
    with pytest.raises(FailedPrecondition, match=r"transform 't1' is in use by the live route 'new@1' -> collection"):
        client.delete_transform("t1")
    with pytest.raises(FailedPrecondition, match=r"the shadow of route 'new@1' -> collection 'g', chain 'c'"):
        client.delete_transform("t2")
    client.fit_transform("pca", "pca_basis", source_space="old@1", target_space="old@1", doc_pairs=(old, old))
    client.create_collection("b", "old@1", basis_transform="pca")
    with pytest.raises(FailedPrecondition, match=r"in use by collection 'b' \(basis_transform\)"):
        client.delete_transform("pca")
    assert {t.name for t in client.list_transforms()} == {"t1", "t2", "c", "pca"}  # refused: nothing changed


def test_delete_unused_is_gone_after_a_restart_and_rollback_skips_it(
    tmp_path: Path, pairs: tuple[np.ndarray, np.ndarray]
) -> None:
    srv, port = start_server(tmp_path / "data")
    with _client(port) as c:
        for name in ("t1", "t2", "t3"):
            fit(c, pairs, name)
        c.create_collection("g", "old@1")
        c.activate_route("g", "t1", force=True)
        c.activate_route("g", "t2", force=True)  # t1 is history now, not live
        assert c.delete_transform("t1").state == "ready"
        assert c.delete_transform("t3").name == "t3"
        with pytest.raises(NotFound, match=r"transform 't3' does not exist"):
            c.get_transform("t3")
        fit(c, few(pairs), "gone", "lambda_orthogonal", config=LONG, wait=False)
        wait_stage(c, "gone", "epoch")
        assert c.delete_transform("gone").state == "failed"  # a fitting one is cancelled, then deleted
        assert c.rollback_route("g", "new@1").transform == ""  # the route before t2 was t1: deleted, skipped
    srv.stop(None)
    srv, port = start_server(tmp_path / "data")
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            assert [t.name for t in c.list_transforms()] == ["t2"]
    finally:
        srv.stop(None)


def test_unknown_names_are_not_found(client: Client) -> None:
    with pytest.raises(NotFound, match=r"transform 'nope' does not exist"):
        client.cancel_fit("nope")
    with pytest.raises(NotFound, match=r"transform 'nope' does not exist"):
        client.delete_transform("nope")


def test_cancel_and_delete_are_admin_methods() -> None:
    for method in ("CancelFit", "DeleteTransform"):
        assert required_role(f"/interlingua.v1.TransformService/{method}") == "admin"


def test_cli_cancel_and_delete(
    client: Client,
    server: tuple[Server, int],
    pairs: tuple[np.ndarray, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("INTERLINGUA_API_KEY", raising=False)
    monkeypatch.setenv("INTERLINGUA_TARGET", f"127.0.0.1:{server[1]}")
    fit(client, few(pairs), "long", "lambda_orthogonal", config=LONG, wait=False)
    assert main(["transforms", "cancel", "long", "--json"]) == 0
    assert '"error": "cancelled"' in capsys.readouterr().out
    assert main(["transforms", "delete", "long"]) == 0
    assert capsys.readouterr().out == "deleted transform long (it was failed)\n"
    assert main(["transforms", "delete", "long"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_no_fit_is_queued_once_the_fit_worker_is_closed(tmp_path: Path) -> None:
    from interlingua.server.errors import Unavailable
    from interlingua.server.fit_jobs import FitJobs, TransformRecord
    from interlingua.server.metrics import Metrics
    from interlingua.server.store import Store

    store = Store(tmp_path / "s.db")
    jobs = FitJobs(store, Metrics(), lambda rec: None)
    jobs.close()
    rec = TransformRecord("t", "procrustes", "new@1", "old@1", {}, 0.0)
    with pytest.raises(Unavailable, match="shutting down"):
        jobs.submit(rec, None, None, None, 0.0, [], 1.0)  # type: ignore[arg-type]
    assert not jobs.cancel(rec)  # never queued: nothing to cancel
    store.close()
