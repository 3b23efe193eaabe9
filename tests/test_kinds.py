"""The kind registry (``server/transforms/kinds.py``) against everything derived from it or beside it.

The proto enum, the servicer's mapping, the fit module's kind sets, the request check in compat.py and
the client's kind names (read from the proto enum, since the client does not import the server) must
name the same kinds; each kind's config schema is its fitter's keyword-only parameters.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import subprocess
import sys

import numpy as np
import pytest

from interlingua.client import _types
from interlingua.client.cli import build_parser
from interlingua.server import fit_limits
from interlingua.server.transform_servicer import KIND_TO_PB, PB_TO_KIND
from interlingua.server.transforms import SIDES, AffineTransform, Transform, fit, load_transform
from interlingua.server.transforms import kinds as k
from interlingua.v1 import transforms_pb2 as tpb

EXPECTED = ("procrustes", "affine", "lambda_orthogonal", "basis", "residual_mlp", "pca_basis", "mrl_adapter")


def test_registry_lists_the_fitted_kinds_in_order_and_chain_apart() -> None:
    assert k.KINDS == EXPECTED == tuple(k.REGISTRY)
    assert (*k.KINDS, "chain") == k.WIRE_KINDS
    assert all(name == spec.name for name, spec in k.REGISTRY.items())
    assert k.CHAIN.name == "chain" and "chain" not in k.REGISTRY and "matryoshka" not in k.REGISTRY


def test_every_proto_enum_value_but_unspecified_maps_to_exactly_one_kind_and_back() -> None:
    specs = k.WIRE
    assert specs == (*k.REGISTRY.values(), k.CHAIN)
    values = [v for v in tpb.TransformKind.values() if v != tpb.TRANSFORM_KIND_UNSPECIFIED]
    for v in values:
        owners = [s.name for s in specs if s.proto == tpb.TransformKind.Name(v)]
        assert len(owners) == 1, (tpb.TransformKind.Name(v), owners)
        assert KIND_TO_PB[PB_TO_KIND[v]] == v
    assert sorted(KIND_TO_PB.values()) == sorted(values) and len(PB_TO_KIND) == len(KIND_TO_PB) == len(specs)
    assert all(PB_TO_KIND[KIND_TO_PB[s.name]] == s.name for s in specs)
    assert tpb.TRANSFORM_KIND_UNSPECIFIED not in PB_TO_KIND


def test_the_client_names_the_server_kinds_plus_chain_without_importing_the_server() -> None:
    assert set(_types.KINDS) == {*k.KINDS, "chain"}
    assert all(_types.KINDS[name] == KIND_TO_PB[name] for name in _types.KINDS)
    fit_parser = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["fit"]
    kind = next(a for a in fit_parser._actions if a.dest == "kind")
    assert set(kind.choices or ()) == {*k.KINDS, "chain"}
    code = (
        "import sys, interlingua.client, interlingua.client.cli; "
        "print([m for m in sys.modules if m.startswith('interlingua.server')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_fit_sets_are_the_registry_flags() -> None:
    assert (fit.KINDS, fit.FULL_RANK_KINDS, fit.PAIRED_KINDS, fit.HOME_KINDS) == (
        k.KINDS,
        k.FULL_RANK_KINDS,
        k.PAIRED_KINDS,
        k.HOME_KINDS,
    )
    assert k.FULL_RANK_KINDS == ("procrustes", "affine", "basis")
    assert k.PAIRED_KINDS == ("mrl_adapter",) and k.HOME_KINDS == ("pca_basis", "mrl_adapter")
    assert k.TRAINED_KINDS == ("lambda_orthogonal", "residual_mlp", "mrl_adapter")


@pytest.mark.parametrize("name", EXPECTED)
def test_each_kind_fits_with_fit_name_and_its_schema_is_its_config_dataclass(name: str) -> None:
    spec = k.get_kind(name)
    fn = fit.fitter(name)
    assert fn.__name__ == f"fit_{name}" and fn.__module__.endswith(f".transforms.{spec.module}")
    assert spec.settings is not None and spec.settings.__module__ == fn.__module__
    assert list(spec.params) == [f.name for f in dataclasses.fields(spec.settings)] and "progress" not in spec.params
    params = inspect.signature(fn).parameters
    assert (
        list(params)[1:] == ["config", "progress", "overrides"]
        and params["progress"].kind is params["progress"].KEYWORD_ONLY
    )
    assert "progress" not in spec.config and "kind" not in spec.config
    assert ("pseudo_relevance" in spec.config) is (not spec.home)
    assert all(isinstance(c.type, str) and c.type for c in spec.config.values())


@pytest.mark.parametrize("name", EXPECTED)
def test_each_kind_rebuilds_through_its_own_class(name: str) -> None:
    spec = k.get_kind(name)
    if spec.transform:
        cls = getattr(importlib.import_module(f"interlingua.server.transforms.{spec.module}"), spec.transform)
        assert issubclass(cls, Transform) and cls.kind == name
        return
    W, b = np.eye(4, 3), np.zeros(3)
    arrays = {f"{p}_{s}": a for s in SIDES for p, a in (("W", W), ("b", b))}
    t = load_transform(name, 4, 3, {}, arrays, lambda _: None)  # type: ignore[arg-type,return-value]
    assert type(t) is AffineTransform and t.kind == name and (t.d_in, t.d_out) == (4, 3)


def test_schemas_read_as_written() -> None:
    procrustes = k.get_kind("procrustes").config
    assert set(procrustes) == {"center", "scale", "refine_steps", "task_epochs", "threads", "pseudo_relevance"}
    assert (procrustes["refine_steps"].type, procrustes["refine_steps"].default) == ("int", 200)
    assert procrustes["pseudo_relevance"] == k.ConfigKey("pseudo_relevance", "bool", True)
    assert set(k.get_kind("pca_basis").config) == {"center_axes"}
    assert k.get_kind("affine").config["ridge"] == k.ConfigKey("ridge", "float | None", None)


def test_every_step_cap_is_a_config_key_of_some_kind() -> None:
    accepted = {key for spec in k.REGISTRY.values() for key in spec.config}
    assert set(fit_limits.STEP_KNOBS) <= accepted


def test_unknown_kinds_are_refused_with_the_registered_names() -> None:
    msg = (
        r"^kind must be one of procrustes, affine, lambda_orthogonal, basis, residual_mlp, pca_basis, mrl_adapter, "
        r"got 'chain'$"
    )
    with pytest.raises(ValueError, match=msg):
        k.get_kind("chain")
    with pytest.raises(ValueError, match=msg):
        fit.fitter("chain")


def test_the_registry_imports_no_torch() -> None:
    code = "import sys, interlingua.server.transforms.kinds; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
