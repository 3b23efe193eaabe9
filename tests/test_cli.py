"""The ``interlingua`` CLI in-process against a real server, and the layering of serve's config."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_data

from interlingua.client import Client
from interlingua.client._serve_config import ConfigError
from interlingua.client.cli import build_parser, build_server_config, main
from interlingua.server import Limits, Server, ServerConfig


@pytest.fixture
def target(server: tuple[Server, int], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("INTERLINGUA_API_KEY", raising=False)
    monkeypatch.setenv("INTERLINGUA_TARGET", f"127.0.0.1:{server[1]}")  # as a user would set it
    return f"127.0.0.1:{server[1]}"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_spaces_and_collections(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "spaces", "register", "m@1", "--dim", "8", "--metric", "ip", "--description", "v1")[0] == 0
    code, out, _ = run(capsys, "spaces", "list", "--target", target)
    assert code == 0 and out.splitlines()[0].split()[:3] == ["NAME", "DIM", "METRIC"]
    assert out.splitlines()[1].split()[:3] == ["m@1", "8", "ip"]
    code, out, _ = run(capsys, "spaces", "get", "m@1", "--json")
    assert json.loads(out) | {"created_at": 0} == {
        "name": "m@1", "dim": 8, "metric": "ip", "description": "v1", "created_at": 0,
    }  # fmt: skip

    code, out, _ = run(capsys, "collections", "create", "g", "--home-space", "m@1", "--json")
    assert code == 0 and json.loads(out)["state"] == "ready"
    code, out, _ = run(capsys, "collections", "get", "g")
    assert code == 0 and "home_space" in out and "Flat" in out
    code, out, _ = run(capsys, "collections", "list", "--json")
    assert [json.loads(line)["name"] for line in out.splitlines()] == ["g"]
    assert run(capsys, "collections", "delete", "g")[:2] == (0, "deleted collection g\n")


def test_ingest_search_stats(target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    xb = make_data(300, 16, seed=5).astype(np.float16)  # float16 files are cast per batch
    np.save(tmp_path / "xb.npy", xb)
    (tmp_path / "ids.txt").write_text("".join(f"doc-{i}\n" for i in range(300)))
    (tmp_path / "p.jsonl").write_text("".join(f'{{"i": {i}}}\n' if i % 2 else "\n" for i in range(300)))
    main(["spaces", "register", "m@1", "--dim", "16"])
    main(["collections", "create", "g", "--home-space", "m@1"])
    capsys.readouterr()
    code, out, _ = run(
        capsys, "ingest", "g", "--space", "m@1", "--vectors", str(tmp_path / "xb.npy"),
        "--ids", str(tmp_path / "ids.txt"), "--payloads", str(tmp_path / "p.jsonl"), "--batch-size", "128",
    )  # fmt: skip
    assert code == 0 and out.startswith("upserted 300 points into g")

    code, out, _ = run(
        capsys, "search", "g", "--space", "m@1", "--vectors", str(tmp_path / "xb.npy"),
        "--rows", "2:5", "-k", "4", "--with-payload", "--json",
    )  # fmt: skip
    hits = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [h["query"] for h in hits] == [2, 3, 4]
    assert [h["ids"][0] for h in hits] == ["doc-2", "doc-3", "doc-4"]  # each query finds itself first
    assert all(len(h["scores"]) == 4 and h["scores"] == sorted(h["scores"], reverse=True) for h in hits)
    assert [h["payloads"][0] for h in hits] == [None, {"i": 3}, None]
    assert hits[0]["route"] == {"query_space": "m@1", "home_space": "m@1", "transform": "identity"}

    code, out, _ = run(capsys, "search", "g", "--space", "m@1", "--vectors", str(tmp_path / "xb.npy"), "--rows", "7")
    assert code == 0 and out.startswith("query 7  (m@1 -> m@1 via identity") and "doc-7" in out

    code, out, _ = run(capsys, "stats", "--json")
    assert code == 0 and json.loads(out)["num_points"] == 300
    code, out, _ = run(capsys, "stats", "g")
    assert code == 0 and out.splitlines()[1].split()[:5] == ["g", "m@1", "Flat", "ready", "300"]
    assert run(capsys, "health")[:2] == (0, "SERVING\n")


def test_ingest_without_ids_uses_row_numbers(target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "xb.npy", make_data(50, 4, seed=6))
    main(["spaces", "register", "m@1", "--dim", "4"])
    main(["collections", "create", "g", "--home-space", "m@1"])
    code, _, _ = run(capsys, "ingest", "g", "--space", "m@1", "--vectors", str(tmp_path / "xb.npy"), "--stream")
    assert code == 0
    with Client(target) as c:
        assert [p.id for p in c.get("g", ["0", "49"])] == ["0", "49"]


def test_errors_and_exit_codes(target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "spaces", "get", "nope@1")
    assert (code, out) == (1, "") and err.startswith("error: NOT_FOUND: ")
    assert run(capsys, "spaces")[0] == 2  # missing action: argparse usage error
    assert run(capsys, "--help")[0] == 0
    np.save(tmp_path / "xb.npy", make_data(3, 4))
    (tmp_path / "ids.txt").write_text("a\nb\n")
    code, _, err = run(capsys, "ingest", "g", "--space", "s", "--vectors", str(tmp_path / "xb.npy"),
                       "--ids", str(tmp_path / "ids.txt"))  # fmt: skip
    assert code == 2 and "2 id lines for 3 vectors" in err
    code, _, err = run(capsys, "search", "g", "--space", "s", "--vectors", str(tmp_path / "missing.npy"))
    assert code == 2 and "cannot load queries" in err


def test_module_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "interlingua.client.cli", "stats", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "--json" in proc.stdout


# -- serve's configuration: defaults < TOML < environment < flags -------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("CONFIG", "DATA_DIR", "HOST", "PORT", "METRICS_PORT", "API_KEY", "WORKERS", "DEVICE"):
        monkeypatch.delenv(f"INTERLINGUA_{var}", raising=False)
    return monkeypatch


def config_of(*argv: str) -> ServerConfig:
    return build_server_config(build_parser().parse_args(["serve", *argv]))


def test_serve_config_layers(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert config_of() == ServerConfig()
    toml = tmp_path / "server.toml"
    toml.write_text(
        'data_dir = "/srv/il"\nport = 6000\nmetrics_port = 9200\nworkers = 3\nmerge_fraction = 1\n'
        'api_key = "from-toml"\n[limits]\nmax_k = 50\n'
    )
    cfg = config_of("--config", str(toml))
    assert (cfg.data_dir, cfg.port, cfg.metrics_port, cfg.workers) == (Path("/srv/il"), 6000, 9200, 3)
    assert cfg.api_key == "from-toml" and cfg.merge_fraction == 1.0
    assert cfg.limits == Limits(max_k=50) and cfg.host == "127.0.0.1"

    clean_env.setenv("INTERLINGUA_CONFIG", str(toml))  # the file named by the environment
    clean_env.setenv("INTERLINGUA_PORT", "7000")
    clean_env.setenv("INTERLINGUA_METRICS_PORT", "off")
    cfg = config_of()
    assert (cfg.port, cfg.metrics_port, cfg.workers, cfg.limits.max_k) == (7000, None, 3, 50)

    cfg = config_of("--port", "8000", "--metrics-port", "0", "--data-dir", "d", "--api-key", "flag")
    assert (cfg.port, cfg.metrics_port, cfg.data_dir, cfg.api_key) == (8000, 0, Path("d"), "flag")
    assert config_of("--no-metrics", "--metrics-port", "1").metrics_port is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 1\n", "unknown key(s) prot"),
        ("[limits]\nmax_kk = 1\n", "[limits]: unknown key(s) max_kk"),
        ('port = "50051"\n', "port must be int"),
        ("workers = true\n", "workers must be int"),
        ("port = \n", "invalid TOML"),
    ],
)
def test_serve_config_rejects(clean_env: pytest.MonkeyPatch, tmp_path: Path, text: str, message: str) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_of("--config", str(toml))


def test_serve_bad_config_exits_2(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.toml").write_text("colour = 'blue'\n")
    code, _, err = run(capsys, "serve", "--config", str(tmp_path / "bad.toml"))
    assert code == 2 and "unknown key(s) colour" in err
    clean_env.setenv("INTERLINGUA_PORT", "many")
    code, _, err = run(capsys, "serve")
    assert code == 2 and "INTERLINGUA_PORT: port: cannot parse 'many'" in err
    assert run(capsys, "serve", "--config", str(tmp_path / "missing.toml"))[0] == 2


# -- transforms, fit (online and --offline) and routes ------------------------------------------------


def _split(folder: Path, n: int = 300, d: int = 16, seed: int = 21) -> None:
    """A debdesc-like folder: {old,new}_{doc,query}.npy, float16, query i <-> doc i; new = rotated old + shift."""
    model = np.random.default_rng(0)  # one "new model" for every split
    Q, _ = np.linalg.qr(model.standard_normal((d, d)))
    shift = 0.1 * model.standard_normal(d)
    rng = np.random.default_rng(seed)
    old_doc = make_data(n, d, seed=seed).astype(np.float64)
    old_doc /= np.linalg.norm(old_doc, axis=1, keepdims=True)
    old_query = old_doc + 0.05 * rng.standard_normal((n, d))
    old_query /= np.linalg.norm(old_query, axis=1, keepdims=True)
    folder.mkdir(parents=True)
    for name, x in {"old_doc": old_doc, "old_query": old_query}.items():
        np.save(folder / f"{name}.npy", x.astype(np.float16))
        np.save(folder / f"{name.replace('old', 'new')}.npy", (x @ Q + shift).astype(np.float16))


def _fit_args(tmp_path: Path, name: str = "t1") -> list[str]:
    _split(tmp_path / "fit", seed=21)
    _split(tmp_path / "dev", n=200, seed=22)
    return [
        "fit", name, "--kind", "procrustes", "--source-space", "new@1", "--target-space", "old@1",
        "--doc-pairs", str(tmp_path / "fit" / "new_doc.npy"), str(tmp_path / "fit" / "old_doc.npy"),
        "--query-pairs", str(tmp_path / "fit" / "new_query.npy"), str(tmp_path / "fit" / "old_query.npy"),
        "--eval-dir", str(tmp_path / "dev"), "--no-progress",
    ]  # fmt: skip


def test_fit_online_transforms_and_routes(target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["spaces", "register", "old@1", "--dim", "16"])
    main(["spaces", "register", "new@1", "--dim", "16"])
    main(["collections", "create", "g", "--home-space", "old@1"])
    capsys.readouterr()
    code, out, err = run(capsys, *_fit_args(tmp_path), "--batch-size", "64")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "transform t1 (procrustes, new@1 -> old@1) is ready"
    assert lines[1].split()[:2] == ["METRIC", "HOME->HOME"] and "T(NEW)->HOME (AFTER)" in lines[1]
    r10 = next(line.split() for line in lines if line.startswith("R@10"))
    assert float(r10[-1]) >= 0.95 and float(r10[3]) < 0.5  # after the transform vs raw new->home
    assert any(line.startswith("ECC margin") for line in lines) and "fit.residual" in out

    code, out, _ = run(capsys, "transforms", "list")
    row = out.splitlines()[1].split()
    assert code == 0 and row[:6] == ["t1", "procrustes", "new@1", "->", "old@1", "ready"] and float(row[6]) >= 0.95
    code, out, _ = run(capsys, "transforms", "get", "t1", "--json")
    info = json.loads(out)
    assert (info["state"], info["report"]["nq"], info["report"]["nb"]) == ("ready", 200, 200)
    assert info["report"]["ecc_margin"] >= 0 and info["doc_pairs"] == info["query_pairs"] == 300
    code, out, _ = run(capsys, "transforms", "get", "t1")
    assert code == 0 and "checksum" in out and "T(NEW)->HOME (AFTER)" in out

    main(["ingest", "g", "--space", "old@1", "--vectors", str(tmp_path / "dev" / "old_doc.npy"), "--no-progress"])
    capsys.readouterr()
    code, out, _ = run(capsys, "routes", "activate", "g", "t1")
    assert code == 0 and out.splitlines()[1].split()[:4] == ["g", "new@1", "old@1", "t1"]
    code, out, _ = run(capsys, "search", "g", "--space", "new@1", "--vectors", str(tmp_path / "dev" / "new_doc.npy"),
                       "--rows", "3:6", "-k", "1", "--json")  # fmt: skip
    hits = [json.loads(line) for line in out.splitlines()]
    assert [h["ids"][0] for h in hits] == ["3", "4", "5"] and hits[0]["route"]["transform"] == "t1"
    code, out, _ = run(capsys, "routes", "shadow", "g", "new@1", "t1", "--rate", "0.5", "--json")
    assert code == 0 and json.loads(out)["shadow"] == "t1"
    code, out, _ = run(capsys, "routes", "list", "g")
    assert code == 0 and out.splitlines()[0] == "active routes:" and "history (newest first):" in out
    code, out, _ = run(capsys, "routes", "shadow", "g", "new@1", "--stop", "--json")
    assert code == 0 and json.loads(out)["shadow"] == ""
    code, out, _ = run(capsys, "routes", "list", "g", "--json")
    routes = [json.loads(line) for line in out.splitlines()]
    assert [(r["transform"], r["live"]) for r in routes] == [("t1", True), ("t1", False)]
    code, out, _ = run(capsys, "routes", "rollback", "g", "new@1")
    assert code == 0 and "(removed)" in out
    code, _, err = run(capsys, "routes", "rollback", "g", "new@1")
    assert code == 1 and err.startswith("error: FAILED_PRECONDITION: ")
    assert run(capsys, "routes", "shadow", "g", "new@1")[0] == 2  # neither TRANSFORM nor --stop

    code, out, _ = run(capsys, *_fit_args(tmp_path / "again", "t2"), "--no-wait", "--json")
    assert code == 0 and json.loads(out)["name"] == "t2" and json.loads(out)["state"] in ("fitting", "ready")
    with Client(target) as c:
        assert c.wait_transform("t2", timeout=60).state == "ready"  # (not left fitting as the server stops)


def test_fit_failure_and_usage_errors(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from interlingua.server.transforms import procrustes

    main(["spaces", "register", "old@1", "--dim", "16"])
    main(["spaces", "register", "new@1", "--dim", "16"])
    args = _fit_args(tmp_path)
    code, _, err = run(capsys, *args, "--config", '{"refine_steps": -1}')  # refused with the request
    assert code == 1 and "INVALID_ARGUMENT" in err and "refine_steps" in err and "fitting" not in err

    def diverged(*a: object, **kw: object) -> None:
        raise ValueError("procrustes: the solve diverged (injected)")

    with monkeypatch.context() as m:
        m.setattr(procrustes, "fit_procrustes", diverged)  # (Kind.fitter looks it up at each fit)
        code, _, err = run(capsys, *args)
    assert code == 1 and "fitting transform 't1' failed" in err and "diverged" in err
    code, _, err = run(capsys, *args[:-1], "--config", "[1]")
    assert code == 2 and "--config must be a JSON object" in err
    code, _, err = run(capsys, *args[:11], "--eval-dir", str(tmp_path))  # no .npy files there
    assert code == 2 and "cannot load old_doc of --eval-dir" in err
    code, _, err = run(capsys, *args[:8])
    assert code == 2 and "needs --doc-pairs, --query-pairs or both" in err
    code, _, err = run(capsys, *args[:10], str(tmp_path / "dev" / "old_doc.npy"))  # 300 new rows, 200 home rows
    assert code == 2 and "with the same n" in err
    code, _, err = run(capsys, *args[:11])  # t1 failed, so its name is free again: this fit succeeds
    assert code == 0, err
    code, _, err = run(capsys, *args[:11])
    assert code == 1 and "error: ALREADY_EXISTS: " in err  # t1 is ready now; err also has the upload bar


def test_fit_offline_writes_the_artefact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from interlingua.server.transforms import checksum, load_transform

    out_npz = tmp_path / "t1.npz"
    code, out, err = run(capsys, *_fit_args(tmp_path), "--offline", str(out_npz), "--target", "127.0.0.1:1")
    assert code == 0, err
    assert out.startswith(f"transform t1 (procrustes, d 16 -> 16) fitted offline: wrote {out_npz}")
    assert "T(NEW)->HOME (AFTER)" in out and "HELD-OUT PAIRS" in out
    meta = json.loads((tmp_path / "t1.json").read_text())
    assert (meta["kind"], meta["d_in"], meta["d_out"], meta["home_metric"]) == ("procrustes", 16, 16, "cosine")
    config = {"kind": "procrustes", "center": True, "scale": True, "refine_steps": 200, "task_epochs": 5}
    assert {k: v for k, v in meta["config"].items() if k != "task_refinement"} == config
    assert meta["report"]["relevance"] == "pseudo" and meta["config"]["task_refinement"]["epochs"] == 5
    assert meta["report"]["transformed_r10"] >= 0.95 and meta["report"]["label_free"] is False
    assert meta["report"]["ecc_margin"] >= 0 and meta["report"]["fit"]["residual"] < 0.05
    with np.load(out_npz) as z:
        arrays = {k: z[k] for k in z.files}
    assert checksum("procrustes", meta["config"], arrays) == meta["checksum"]
    t = load_transform("procrustes", 16, 16, meta["config"], arrays, lambda name: None)  # type: ignore[arg-type,return-value]
    dev = tmp_path / "dev"
    y = t.apply(np.load(dev / "new_doc.npy").astype(np.float32))
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    assert (np.argmax(y @ np.load(dev / "old_doc.npy").astype(np.float32).T, axis=1) == np.arange(200)).mean() > 0.95

    code, out, _ = run(capsys, *_fit_args(tmp_path / "json"), "--offline", str(tmp_path / "t2.npz"), "--json")
    assert code == 0 and json.loads(out)["checksum"] == json.loads((tmp_path / "t2.json").read_text())["checksum"]
    code, _, err = run(capsys, *_fit_args(tmp_path / "bad"), "--offline", str(tmp_path / "t3.npz"),
                       "--config", '{"refine_steps": -1}')  # fmt: skip
    assert code == 2 and "refine_steps" in err and not (tmp_path / "t3.npz").exists()
