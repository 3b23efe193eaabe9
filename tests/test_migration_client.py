"""The migration client without a server: ``MigrationInfo`` / ``BackfillOrder`` from their protobuf
messages, the ``interlingua migrations`` parser (every subcommand parses, bad arguments exit 2), the
commands' output against a stand-in client, ``ingest --only-ids`` and ``wait_forward_upgrade``'s
polling. The calls against a live server are in the server's migration tests."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from interlingua.client import (
    BackfillOrder,
    Client,
    DeadlineExceeded,
    FailedPrecondition,
    ForwardProgress,
    ForwardUpgradeFailed,
    InvalidArgument,
    MigrationInfo,
    ScoreCalibration,
    _migration_cli,
)
from interlingua.client._cli_common import UsageError
from interlingua.client._types import MIGRATION_STRATEGIES
from interlingua.client.cli import _ingest, build_parser, main
from interlingua.v1 import migrations_pb2


def _info(**changes: Any) -> MigrationInfo:
    info = MigrationInfo(
        collection="g",
        old_space="old@1",
        new_space="new@2",
        home_space="old@1",
        phase="backfill",
        strategy="two_indexes",
        transform="new-to-old",
        reverse_transform="old-to-new",
        points=1000,
        backfilled=250,
        projected=0,
        coverage=0.25,
        calibration=ScoreCalibration(1.25, -0.125, "transform report (4096 pairs)"),
        forward=ForwardProgress("", "", 0, 0, ""),
        started_at=1_700_000_000.5,
        cutover_at=0.0,
        finished_at=0.0,
        forced=False,
    )
    return dataclasses.replace(info, **changes)


# -- types ----------------------------------------------------------------------------------------------


def test_migration_info_from_proto_reads_every_field() -> None:
    msg = migrations_pb2.MigrationInfo(
        collection="g",
        old_space="old@1",
        new_space="new@2",
        home_space="new@2",
        phase=migrations_pb2.MIGRATION_PHASE_CUTOVER,
        strategy=migrations_pb2.MIGRATION_STRATEGY_SHARED_INDEX,
        transform="t",
        reverse_transform="r",
        points=10,
        backfilled=4,
        projected=6,
        coverage=0.4,
        calibration=migrations_pb2.ScoreCalibration(scale=0.5, bias=0.25, source="identity: no report"),
        forward=migrations_pb2.ForwardProgress(state="done", transform="f", done=10, total=10, error=""),
        started_at=1.0,
        cutover_at=2.0,
        finished_at=0.0,
        forced=True,
    )
    info = MigrationInfo.from_proto(msg)
    assert info == MigrationInfo(
        "g", "old@1", "new@2", "new@2", "cutover", "shared_index", "t", "r", 10, 4, 6, 0.4,
        ScoreCalibration(0.5, 0.25, "identity: no report"), ForwardProgress("done", "f", 10, 10, ""),
        1.0, 2.0, 0.0, True,
    )  # fmt: skip
    assert info.to_proto() == msg
    proto_fields = set(migrations_pb2.MigrationInfo.DESCRIPTOR.fields_by_name)
    assert {f.name for f in dataclasses.fields(MigrationInfo)} == proto_fields


@pytest.mark.parametrize("phase", ["backfill", "cutover", "finished", "aborted"])
@pytest.mark.parametrize("strategy", ["two_indexes", "shared_index"])
def test_migration_info_round_trips(phase: str, strategy: str) -> None:
    info = _info(phase=phase, strategy=strategy, forward=ForwardProgress("failed", "f", 3, 9, "boom"))
    msg = info.to_proto()
    assert migrations_pb2.MigrationPhase.Name(msg.phase) == f"MIGRATION_PHASE_{phase.upper()}"
    assert MigrationInfo.from_proto(msg) == info
    wire = migrations_pb2.MigrationInfo.FromString(msg.SerializeToString())
    assert MigrationInfo.from_proto(wire) == info


def test_absent_calibration_is_none_and_unset_enums_say_unspecified() -> None:
    info = MigrationInfo.from_proto(migrations_pb2.MigrationInfo(collection="g"))
    assert info.calibration is None and info.phase == "unspecified" and info.strategy == "unspecified"
    assert info.forward == ForwardProgress("", "", 0, 0, "") and info.forward.fraction == 1.0
    assert ForwardProgress("running", "f", 1, 4, "").fraction == 0.25


def test_strategies_and_backfill_order() -> None:
    assert MIGRATION_STRATEGIES == {
        "two_indexes": migrations_pb2.MIGRATION_STRATEGY_TWO_INDEXES,
        "shared_index": migrations_pb2.MIGRATION_STRATEGY_SHARED_INDEX,
    }
    order = BackfillOrder.from_proto(migrations_pb2.SuggestBackfillOrderResponse(ids=["b", "a"], scores=[2.5, 1.0]))
    assert order.ids == ["b", "a"] and len(order) == 2
    assert order.scores.dtype == np.float32 and order.scores.tolist() == [2.5, 1.0]
    empty = BackfillOrder.from_proto(migrations_pb2.SuggestBackfillOrderResponse())
    assert empty.ids == [] and empty.scores.shape == (0,) and empty.scores.dtype == np.float32


# -- parser ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["start", "g", "--new-space", "new@2", "--transform", "t"],
            {"new_space": "new@2", "transform": "t", "reverse_transform": "", "strategy": None},
        ),
        (
            ["start", "g", "--new-space", "n", "--transform", "t", "--reverse-transform", "r", "--strategy",
             "shared_index"],
            {"reverse_transform": "r", "strategy": "shared_index"},
        ),
        (["get", "g", "--json"], {"json": True}),
        (["cutover", "g"], {"force": False}),
        (["cutover", "g", "--force"], {"force": True}),
        (["rollback", "g"], {}),
        (["finish", "g", "--target", "h:1"], {"target": "h:1"}),
        (["abort", "g"], {}),
        (["forward", "g", "--transform", "f"], {"transform": "f", "wait": False, "wait_timeout": None}),
        (["forward", "g", "--transform", "f", "--wait", "--wait-timeout", "60"], {"wait": True, "wait_timeout": 60.0}),
        (["suggest", "g", "-n", "1000"], {"n": 1000, "out": None}),
        (["suggest", "g", "-n", "5", "--out", "ids.txt"], {"n": 5, "out": "ids.txt"}),
    ],
)  # fmt: skip
def test_every_subcommand_parses(argv: list[str], expected: dict[str, Any]) -> None:
    args = build_parser().parse_args(["migrations", *argv])
    assert args.command == "migrations" and args.action == argv[0] and args.collection == "g"
    assert {k: getattr(args, k) for k in expected} == expected
    assert args.command in _migration_cli.COMMANDS


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nope", "g"],
        ["start", "g", "--transform", "t"],  # no --new-space
        ["start", "g", "--new-space", "n"],  # no --transform
        ["start", "g", "--new-space", "n", "--transform", "t", "--strategy", "three_indexes"],
        ["get"],
        ["cutover", "g", "--force=yes"],
        ["rollback", "g", "extra"],
        ["forward", "g"],  # no --transform
        ["forward", "g", "--transform", "f", "--wait-timeout", "soon"],
        ["suggest", "g"],  # no -n
        ["suggest", "g", "-n", "0"],
        ["suggest", "g", "-n", "-3"],
        ["suggest", "g", "-n", "ten"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrations", *argv]) == 2
    assert "usage:" in capsys.readouterr().err


def test_ingest_parses_only_ids() -> None:
    args = build_parser().parse_args(["ingest", "g", "--space", "new@2", "--vectors", "x.npy", "--only-ids", "i.txt"])
    assert args.only_ids == "i.txt" and args.ids is None


# -- commands against a stand-in client -----------------------------------------------------------------


class FakeClient:
    """Records each migration call and answers with a canned MigrationInfo / BackfillOrder."""

    def __init__(self, info: MigrationInfo) -> None:
        self.info = info
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.upserts: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            if name == "suggest_backfill_order":
                ids = [f"id-{i}" for i in range(3)]
                return BackfillOrder(ids, np.array([3.0, 2.0, 1.5], dtype=np.float32))
            return self.info

        return call

    def upsert(self, collection: str, ids: Any, xb: Any, **kwargs: Any) -> int:
        self.upserts.append({"collection": collection, "ids": list(ids), "xb": np.asarray(xb), **kwargs})
        return 7


def _run(fake: FakeClient, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    _migration_cli.run(fake, build_parser().parse_args(["migrations", *argv]))  # type: ignore[arg-type]
    return capsys.readouterr().out


def test_commands_call_the_client(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeClient(_info())
    _run(fake, capsys, "start", "g", "--new-space", "new@2", "--transform", "t", "--strategy", "shared_index")
    _run(fake, capsys, "get", "g")
    _run(fake, capsys, "cutover", "g", "--force")
    _run(fake, capsys, "rollback", "g")
    _run(fake, capsys, "finish", "g")
    _run(fake, capsys, "abort", "g")
    _run(fake, capsys, "forward", "g", "--transform", "f")
    _run(fake, capsys, "forward", "g", "--transform", "f", "--wait", "--wait-timeout", "5", "--no-progress")
    assert fake.calls == [
        ("start_migration", ("g", "new@2", "t"), {"reverse_transform": "", "strategy": "shared_index"}),
        ("get_migration", ("g",), {}),
        ("cutover", ("g",), {"force": True}),
        ("rollback_cutover", ("g",), {}),
        ("finish_migration", ("g",), {}),
        ("abort_migration", ("g",), {}),
        ("forward_upgrade", ("g", "f"), {}),
        ("forward_upgrade", ("g", "f"), {}),
        ("wait_forward_upgrade", ("g", 5.0), {"progress": False}),
    ]


def test_migration_output_table_and_strict_json(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeClient(_info(forward=ForwardProgress("running", "f", 100, 1000, "")))
    out = _run(fake, capsys, "get", "g")
    lines = out.splitlines()
    assert lines[0].split() == ["FIELD", "VALUE"]
    fields = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in lines[1:]}
    assert fields["phase"] == "backfill" and fields["home_space"] == "old@1"
    assert fields["coverage"] == "25.00% (250/1000 backfilled, 0 projected)"
    assert fields["calibration"] == "scale=1.25 bias=-0.125 (transform report (4096 pairs))"
    assert fields["forward"] == "running 100/1000 (10%) via f"
    assert fields["started_at"] == "2023-11-14 22:13:20 UTC" and fields["cutover_at"] == "-"

    [obj] = [json.loads(line) for line in _run(fake, capsys, "get", "g", "--json").splitlines()]
    assert obj["phase"] == "backfill" and obj["coverage"] == 0.25 and obj["backfilled"] == 250
    assert obj["calibration"] == {"scale": 1.25, "bias": -0.125, "source": "transform report (4096 pairs)"}
    assert obj["forward"] == {"state": "running", "transform": "f", "done": 100, "total": 1000, "error": ""}

    fake.info = _info(calibration=None, coverage=float("nan"))  # strict JSON even so
    [obj] = [json.loads(line) for line in _run(fake, capsys, "get", "g", "--json").splitlines()]
    assert obj["calibration"] is None and obj["coverage"] == "nan"


def test_suggest_prints_or_writes_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeClient(_info())
    assert _run(fake, capsys, "suggest", "g", "-n", "3") == "id-0\nid-1\nid-2\n"
    assert fake.calls[-1] == ("suggest_backfill_order", ("g", 3), {})
    rows = [json.loads(line) for line in _run(fake, capsys, "suggest", "g", "-n", "3", "--json").splitlines()]
    assert rows == [{"id": "id-0", "score": 3.0}, {"id": "id-1", "score": 2.0}, {"id": "id-2", "score": 1.5}]
    out = _run(fake, capsys, "suggest", "g", "-n", "3", "--out", str(tmp_path / "ids.txt"))
    assert out.startswith("wrote 3 ids of g to ") and (tmp_path / "ids.txt").read_text() == "id-0\nid-1\nid-2\n"
    out = _run(fake, capsys, "suggest", "g", "-n", "3", "--out", str(tmp_path / "j.txt"), "--json")
    assert json.loads(out) == {"collection": "g", "out": str(tmp_path / "j.txt"), "ids": 3}
    with pytest.raises(UsageError, match="cannot write ids"):
        _run(fake, capsys, "suggest", "g", "-n", "3", "--out", str(tmp_path / "missing" / "ids.txt"))


# -- ingest --only-ids ----------------------------------------------------------------------------------


def _ingest_args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    return build_parser().parse_args(
        ["ingest", "g", "--space", "new@2", "--vectors", str(tmp_path / "x.npy"), "--no-progress", *extra]
    )


def test_ingest_only_ids_selects_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "ids.txt").write_text("7\n2\n\n7\n")  # suggest's order, a blank line, a duplicate
    fake = FakeClient(_info())
    _ingest(fake, _ingest_args(tmp_path, "--only-ids", str(tmp_path / "ids.txt")))  # type: ignore[arg-type]
    [up] = fake.upserts
    assert up["ids"] == ["7", "2"] and up["space"] == "new@2" and up["payloads"] is None
    np.testing.assert_array_equal(up["xb"], x[[7, 2]])
    assert capsys.readouterr().out.startswith("upserted 2 points into g")

    (tmp_path / "names.txt").write_text("".join(f"doc-{i}\n" for i in range(10)))
    (tmp_path / "p.jsonl").write_text("".join(f'{{"i": {i}}}\n' for i in range(10)))
    (tmp_path / "want.txt").write_text("doc-3\ndoc-9\n")
    extra = ("--ids", str(tmp_path / "names.txt"), "--payloads", str(tmp_path / "p.jsonl"))
    _ingest(fake, _ingest_args(tmp_path, *extra, "--only-ids", str(tmp_path / "want.txt")))  # type: ignore[arg-type]
    up = fake.upserts[-1]
    assert up["ids"] == ["doc-3", "doc-9"] and up["payloads"] == ['{"i": 3}', '{"i": 9}']
    np.testing.assert_array_equal(up["xb"], x[[3, 9]])


def test_ingest_only_ids_refuses_unknown_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "x.npy", np.zeros((5, 4), dtype=np.float32))
    (tmp_path / "ids.txt").write_text("1\n99\n")
    (tmp_path / "empty.txt").write_text("\n")
    fake = FakeClient(_info())
    with pytest.raises(UsageError, match=r"1 of the 2 ids in .* are not in the vectors' ids: '99'"):
        _ingest(fake, _ingest_args(tmp_path, "--only-ids", str(tmp_path / "ids.txt")))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="lists no ids"):
        _ingest(fake, _ingest_args(tmp_path, "--only-ids", str(tmp_path / "empty.txt")))  # type: ignore[arg-type]
    argv = ["ingest", "g", "--space", "s", "--vectors", str(tmp_path / "x.npy"), "--only-ids", str(tmp_path / "no")]
    assert main(argv) == 2 and "cannot read ids" in capsys.readouterr().err
    assert fake.upserts == []


# -- Client methods that check before calling -----------------------------------------------------------


def _polling_client(states: list[ForwardProgress], monkeypatch: pytest.MonkeyPatch) -> Client:
    client = Client("127.0.0.1:1")  # never connects: get_migration is replaced
    answers = iter(states)
    monkeypatch.setattr(client, "get_migration", lambda collection: _info(forward=next(answers)))
    return client


def test_wait_forward_upgrade(monkeypatch: pytest.MonkeyPatch) -> None:
    running, done = ForwardProgress("running", "f", 5, 10, ""), ForwardProgress("done", "f", 10, 10, "")
    with _polling_client([running, running, done], monkeypatch) as c:
        assert c.wait_forward_upgrade("g", 5.0, poll=0.001).forward == done
    failed = ForwardProgress("failed", "f", 5, 10, "transform deleted")
    with _polling_client([running, failed], monkeypatch) as c, pytest.raises(ForwardUpgradeFailed) as exc:
        c.wait_forward_upgrade("g", None, poll=0.001)
    assert "failed: transform deleted" in exc.value.message and exc.value.info.forward == failed
    cancelled = ForwardProgress("cancelled", "f", 5, 10, "")
    with _polling_client([cancelled], monkeypatch) as c, pytest.raises(ForwardUpgradeFailed, match="cancelled"):
        c.wait_forward_upgrade("g", None)
    with _polling_client([running] * 1000, monkeypatch) as c, pytest.raises(DeadlineExceeded, match="5/10 points"):
        c.wait_forward_upgrade("g", 0.05, poll=0.01)
    with _polling_client([ForwardProgress("", "", 0, 0, "")], monkeypatch) as c:
        with pytest.raises(FailedPrecondition, match="no forward upgrade"):
            c.wait_forward_upgrade("g", 1.0)
        with pytest.raises(InvalidArgument, match="poll"):
            c.wait_forward_upgrade("g", 1.0, poll=0)


def test_client_side_checks() -> None:
    with Client("127.0.0.1:1") as c:
        with pytest.raises(InvalidArgument, match="strategy must be one of"):
            c.start_migration("g", "new@2", "t", strategy="both")
        with pytest.raises(InvalidArgument, match="n must be >= 1"):
            c.suggest_backfill_order("g", 0)
