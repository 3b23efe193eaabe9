"""One frozen config dataclass per fitted kind (``ProcrustesConfig`` ... ``MRLAdapterConfig``, each beside its
fitter): validated in ``__post_init__`` with the fitters' messages, ``get_config_dict()`` what the artefact
keeps, and ``fit_<kind>(cal, config, **overrides)`` the same fit as the keyword form."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest

from interlingua.server.transforms import kinds
from interlingua.server.transforms.affine import AffineConfig
from interlingua.server.transforms.base import Calibration
from interlingua.server.transforms.basis import BasisConfig
from interlingua.server.transforms.lambda_orthogonal import LambdaOrthogonalConfig
from interlingua.server.transforms.mrl_adapter import MRLAdapterConfig
from interlingua.server.transforms.pca_basis import PCABasisConfig
from interlingua.server.transforms.procrustes import ProcrustesConfig, fit_procrustes
from interlingua.server.transforms.residual_mlp import ResidualMLPConfig
from interlingua.server.transforms.train_config import TrainConfig

CLASSES = {
    "procrustes": ProcrustesConfig,
    "affine": AffineConfig,
    "lambda_orthogonal": LambdaOrthogonalConfig,
    "basis": BasisConfig,
    "residual_mlp": ResidualMLPConfig,
    "pca_basis": PCABasisConfig,
    "mrl_adapter": MRLAdapterConfig,
}


def cal(n: int = 40, seed: int = 3) -> Calibration:
    rng = np.random.default_rng(seed)
    xd, xq = rng.normal(size=(n, 6)).astype(np.float32), rng.normal(size=(n, 6)).astype(np.float32)
    A = rng.normal(size=(6, 6)).astype(np.float32)
    return Calibration(xd, xd @ A, xq, xq @ A)


@pytest.mark.parametrize("name", list(CLASSES))
def test_each_kind_has_one_frozen_config_that_is_its_schema(name: str) -> None:
    cls = CLASSES[name]
    assert kinds.get_kind(name).settings is cls and dataclasses.is_dataclass(cls)
    config = cls()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1  # type: ignore[misc]
    assert set(kinds.get_kind(name).params) == {f.name for f in dataclasses.fields(cls)}
    assert isinstance(config.get_config_dict(), dict)


def test_the_torch_configs_extend_train_config() -> None:
    assert issubclass(LambdaOrthogonalConfig, TrainConfig) and issubclass(ResidualMLPConfig, TrainConfig)
    cfg = LambdaOrthogonalConfig(epochs=7, lam=0.0)
    assert cfg.train_config() == TrainConfig(epochs=7) and cfg.sweep_config().epochs == 3
    assert LambdaOrthogonalConfig(sweep_epochs=2).sweep_config() == TrainConfig(epochs=2)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ProcrustesConfig(refine_steps=-1), r"^refine_steps must be an integer >= 0, got -1$"),
        (lambda: ProcrustesConfig(refine_steps=10_001), r"^refine_steps must be at most 10000, got 10001$"),
        (lambda: ProcrustesConfig(task_epochs=1001), r"^task_epochs must be an integer in \[0, 1000\], got 1001$"),
        (lambda: AffineConfig(ridge=-0.5), r"^ridge must be a finite number >= 0, got -0.5$"),
        (lambda: AffineConfig(ridges=()), r"^ridges must be a non-empty sequence, got \(\)$"),
        (lambda: AffineConfig(holdout=1.0), r"^holdout must be in \(0, 1\), got 1.0$"),
        (lambda: BasisConfig(ridge=math.nan), r"^ridge must be a finite number >= 0, got nan$"),
        (lambda: PCABasisConfig(center_axes=1), r"^center_axes must be a bool, got 1$"),  # type: ignore[arg-type]
        (lambda: LambdaOrthogonalConfig(lams=()), r"^lams must not be empty$"),
        (lambda: LambdaOrthogonalConfig(sweep_epochs=0), r"^epochs must be an integer in \[1, 1000\], got 0$"),
        (lambda: LambdaOrthogonalConfig(holdout=0.0), r"^holdout must be in \(0, 1\), got 0.0$"),
        (lambda: LambdaOrthogonalConfig(epochs=0), r"^epochs must be an integer in \[1, 1000\], got 0$"),
        (lambda: ResidualMLPConfig(hidden=0), r"^hidden must be an integer in \[1, 16384\], got 0$"),
        (lambda: ResidualMLPConfig(lam=-1.0), r"^lam must be >= 0 or math.inf \(\"inf\" in JSON\), got -1.0$"),
        (lambda: MRLAdapterConfig(epochs=1001), r"^epochs must be at most 1000, got 1001$"),
        (lambda: MRLAdapterConfig(batch_size=1), r"^batch_size must be an integer >= 2, got 1$"),
        (lambda: MRLAdapterConfig(distill=-1.0), r"^distill must be a finite number >= 0, got -1.0$"),
    ],
)
def test_configs_validate_on_construction(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_a_config_and_its_keywords_fit_the_same_and_overrides_amend_a_config() -> None:
    c = cal()
    by_keywords = fit_procrustes(c, refine_steps=0, task_epochs=0)
    by_config = fit_procrustes(c, ProcrustesConfig(refine_steps=0, task_epochs=0))
    amended = fit_procrustes(c, ProcrustesConfig(refine_steps=0), task_epochs=0)
    for other in (by_config, amended):
        assert other.transform.config == by_keywords.transform.config
        np.testing.assert_array_equal(other.transform.arrays()["W_query"], by_keywords.transform.arrays()["W_query"])
    assert by_keywords.transform.config == {
        "kind": "procrustes",
        **ProcrustesConfig(refine_steps=0, task_epochs=0).get_config_dict(),
    }
    with pytest.raises(ValueError, match=r"^refine_steps must be an integer >= 0, got -1$"):
        fit_procrustes(c, ProcrustesConfig(), refine_steps=-1)
    with pytest.raises(TypeError, match=r"^config must be a ProcrustesConfig, got AffineConfig$"):
        fit_procrustes(c, AffineConfig())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="lamda"):
        fit_procrustes(c, lamda=1.0)
