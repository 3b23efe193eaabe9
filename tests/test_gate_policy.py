"""The activation gate policy: each threshold refuses with its figure against the threshold, force
overrides, a request overrides the server's default per field, out-of-range values are INVALID_ARGUMENT
and change nothing, and the defaults are those the README documents."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest
from conftest import Stubs, start_server
from test_routes import env, fit_procrustes  # noqa: F401  (env is a fixture)

from interlingua.server import Server, ServerConfig
from interlingua.server.activation import GatePolicy, gate
from interlingua.v1 import transforms_pb2 as tpb
from interlingua.v1 import transforms_pb2_grpc as tgrpc

Env = tuple[Stubs, tgrpc.TransformServiceStub, Server, Path]
GOOD = {"retention": 0.95, "neg_flip": 0.05, "ecc_margin": -0.04, "estimated_retention": 0.97}


def test_defaults_are_the_documented_ones() -> None:
    assert GatePolicy() == GatePolicy(min_retention=0.85, max_negative_flip_rate=1.0, require_ecc=False)
    c = ServerConfig(data_dir=Path("unused"))
    assert (c.min_retention, c.max_negative_flip_rate, c.require_ecc) == (0.85, 1.0, False)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    for text in ("`min_retention`", "0.85", "`max_negative_flip_rate`", "`require_ecc`"):
        assert text in readme


@pytest.mark.parametrize(
    ("report", "policy", "expected"),
    [
        (GOOD, GatePolicy(), None),
        ({**GOOD, "retention": 0.8}, GatePolicy(), "retention 0.8000 (evaluation set) < min_retention 0.8500"),
        (GOOD, GatePolicy(max_negative_flip_rate=0.01), "negative-flip rate 0.0500 > max_negative_flip_rate 0.0100"),
        (GOOD, GatePolicy(require_ecc=True), "ECC margin -0.0400 < 0 (require_ecc"),
        (
            {"estimated_retention": 0.8, "label_free": True},
            GatePolicy(),
            "retention 0.8000 (estimated on the held-out calibration slice) < min_retention 0.8500",
        ),
        ({"label_free": True}, GatePolicy(), "no retention figure to check against min_retention 0.8500"),
        ({"estimated_retention": 0.9}, GatePolicy(max_negative_flip_rate=0.5), "no negative-flip rate to check"),
        ({"retention": math.nan, "estimated_retention": 0.8}, GatePolicy(), "retention 0.8000 (estimated"),
    ],
)
def test_gate_quotes_each_figure_against_its_threshold(
    report: dict[str, float], policy: GatePolicy, expected: str | None
) -> None:
    reason = gate(report, policy)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason


def test_gate_lists_every_failure() -> None:
    reason = gate({"retention": 0.5, "neg_flip": 0.4, "ecc_margin": -0.3}, GatePolicy(0.9, 0.1, True))
    assert reason is not None and reason.count(";") == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_retention": -0.1}, r"min_retention must be a finite number >= 0, got -0.1"),
        ({"min_retention": math.inf}, r"min_retention must be a finite number >= 0, got inf"),
        ({"max_negative_flip_rate": 1.5}, r"max_negative_flip_rate must be a number in \[0, 1\], got 1.5"),
        ({"require_ecc": 1}, r"require_ecc must be a boolean, got 1"),
    ],
)
def test_policy_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GatePolicy(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        ServerConfig(data_dir=Path("unused"), **kwargs)  # type: ignore[arg-type]


def activate(t: tgrpc.TransformServiceStub, name: str, force: bool = False, **gate: object) -> tpb.RouteInfo:
    req = tpb.ActivateRouteRequest(collection="gallery", transform=name, force=force)
    if gate:
        req.gate.CopyFrom(tpb.GatePolicy(**gate))  # type: ignore[arg-type]
    route: tpb.RouteInfo = t.ActivateRoute(req)
    return route


def refused(t: tgrpc.TransformServiceStub, name: str, **gate: object) -> str:
    with pytest.raises(grpc.RpcError) as exc:
        activate(t, name, **gate)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not t.ListRoutes(tpb.ListRoutesRequest(collection="gallery")).active  # nothing changed
    return exc.value.details() or ""


def test_each_threshold_refuses_over_grpc_and_force_overrides(env: Env) -> None:  # noqa: F811
    _, t, _, _ = env
    fit_procrustes(t, "bad", shuffle=True)
    details = refused(t, "bad")
    assert "retention" in details and "< min_retention 0.8500" in details and "set force to override" in details
    assert "ECC margin" not in details  # ECC is off by default
    details = refused(t, "bad", min_retention=0.0, require_ecc=True)
    assert "ECC margin -" in details and "min_retention" not in details
    details = refused(t, "bad", min_retention=0.0, max_negative_flip_rate=0.0)
    assert "negative-flip rate" in details and "> max_negative_flip_rate 0.0000" in details
    forced = activate(t, "bad", force=True)
    assert forced.transform == "bad" and forced.forced


def test_request_policy_overrides_the_default_per_field(env: Env) -> None:  # noqa: F811
    _, t, _, _ = env
    fit_procrustes(t, "bad", shuffle=True)
    route = activate(t, "bad", min_retention=0.0)  # the other fields keep the server's defaults
    assert route.transform == "bad" and not route.forced


@pytest.mark.parametrize(
    ("gate", "text"),
    [
        ({"min_retention": -1.0}, "gate: min_retention must be a finite number >= 0, got -1.0"),
        ({"max_negative_flip_rate": 2.0}, "gate: max_negative_flip_rate must be a number in [0, 1], got 2.0"),
        ({"min_retention": math.nan}, "gate: min_retention must be a finite number >= 0, got nan"),
    ],
)
def test_bad_gate_values_are_invalid_argument_and_change_nothing(env: Env, gate: dict[str, float], text: str) -> None:  # noqa: F811
    _, t, _, _ = env
    fit_procrustes(t, "p1")
    with pytest.raises(grpc.RpcError) as exc:
        activate(t, "p1", force=True, **gate)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and exc.value.details() == text
    assert not t.ListRoutes(tpb.ListRoutesRequest(collection="gallery")).active


def test_server_default_policy_from_config(tmp_path: Path) -> None:
    srv, _ = start_server(tmp_path / "data", min_retention=0.5, require_ecc=True)
    try:
        policy = srv.engine.require_routes().policy
        assert policy == GatePolicy(min_retention=0.5, max_negative_flip_rate=1.0, require_ecc=True)
    finally:
        srv.stop(None)


def test_serve_layers_the_gate_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from interlingua.client._serve_config import ConfigError
    from interlingua.client.cli import build_parser, build_server_config

    for var in ("INTERLINGUA_CONFIG", "INTERLINGUA_MIN_RETENTION", "INTERLINGUA_REQUIRE_ECC"):
        monkeypatch.delenv(var, raising=False)
    toml = tmp_path / "s.toml"
    toml.write_text("min_retention = 0.7\nmax_negative_flip_rate = 0.3\n")
    parse = lambda *argv: build_server_config(build_parser().parse_args(["serve", "--config", str(toml), *argv]))  # noqa: E731
    c = parse()
    assert (c.min_retention, c.max_negative_flip_rate, c.require_ecc) == (0.7, 0.3, False)
    monkeypatch.setenv("INTERLINGUA_REQUIRE_ECC", "true")
    monkeypatch.setenv("INTERLINGUA_MIN_RETENTION", "0.8")
    c = parse("--min-retention", "0.9")  # flags over environment over TOML
    assert (c.min_retention, c.max_negative_flip_rate, c.require_ecc) == (0.9, 0.3, True)
    assert parse("--no-require-ecc").require_ecc is False
    with pytest.raises(ConfigError, match=r"max_negative_flip_rate must be a number in \[0, 1\], got 2.0"):
        parse("--max-negative-flip-rate", "2")
