"""``--json`` output of every CLI command is strict JSON (no NaN or Infinity), including a transform whose
λ is infinite: `transforms get NAME --json` and `transforms list --json` used to crash on it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from test_cli import _fit_args, run, target  # noqa: F401  (target is a fixture)

from interlingua.client import Client


def strict_lines(out: str) -> list[Any]:
    """Every line parsed as strict JSON; NaN, Infinity and -Infinity are refused."""

    def refuse(name: str) -> Any:
        raise ValueError(f"non-standard JSON constant {name}")

    lines = [json.loads(line, parse_constant=refuse) for line in out.splitlines() if line.strip()]
    assert lines, "no JSON output"
    return lines


def test_every_command_prints_strict_json(target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    ok = lambda *argv: run(capsys, *argv, "--json")  # noqa: E731
    assert ok("spaces", "register", "old@1", "--dim", "16")[0] == 0
    assert ok("spaces", "register", "new@1", "--dim", "16")[0] == 0
    strict_lines(ok("spaces", "list")[1])
    strict_lines(ok("spaces", "get", "old@1")[1])
    strict_lines(ok("collections", "create", "g", "--home-space", "old@1")[1])
    strict_lines(ok("collections", "list")[1])
    strict_lines(ok("collections", "get", "g")[1])
    args = _fit_args(tmp_path)
    args[3] = "lambda_orthogonal"  # --kind
    config = json.dumps({"lam": "inf", "epochs": 1, "batch_size": 64, "hard_negatives": 0})
    code, out, err = run(capsys, *args, "--config", config, "--relevance", "diagonal", "--json")
    assert code == 0, err
    [fitted] = strict_lines(out)
    assert fitted["config"]["lam"] == "inf" and fitted["report"]["label_free"] is False
    with Client(target) as c:
        assert math.isinf(float(c.get_transform("t1").config["lam"]))
    [got] = strict_lines(ok("transforms", "get", "t1")[1])
    assert got["config"]["lam"] == "inf"
    strict_lines(ok("transforms", "list")[1])
    run(capsys, "ingest", "g", "--space", "old@1", "--vectors", str(tmp_path / "dev" / "old_doc.npy"), "--no-progress")
    strict_lines(ok("routes", "activate", "g", "t1", "--force")[1])
    strict_lines(ok("routes", "list", "g")[1])
    xq = str(tmp_path / "dev" / "new_query.npy")
    strict_lines(ok("search", "g", "--space", "new@1", "--vectors", xq, "--rows", "0:3")[1])
    strict_lines(ok("stats")[1])
    strict_lines(ok("routes", "rollback", "g", "new@1")[1])
    offline = tmp_path / "t2.npz"
    code, out, err = run(capsys, *_fit_args(tmp_path / "again", "t2"), "--offline", str(offline), "--json")
    assert code == 0, err
    strict_lines(out)
    strict_lines(offline.with_suffix(".json").read_text().replace("\n", " "))
