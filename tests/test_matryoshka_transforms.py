"""Matryoshka transforms: truncation, the PCA basis and the learned adapter.

Truncate-then-normalize semantics and every validation message of ``matryoshka.py``; the composition
rule (transform first, then truncate; a rotation destroys nesting); ``pca_basis`` is orthogonal, keeps
full-dim inner products and L2 distances (seeded data and the 500-row debdesc fixture) and orders
prefixes by variance; ``MatryoshkaLoss`` validation and named terms; the adapter trains
deterministically, beats PCA's prefixes on seeded pairs whose matching signal hides in low-variance
directions, serves in numpy without torch, and every kind round-trips through ``load_transform``.
One torch thread; no data from ../shared.
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from interlingua.server.transforms import AffineTransform, Calibration, FitResult, load_transform, mrl_adapter
from interlingua.server.transforms.chain import ChainTransform, compose
from interlingua.server.transforms.fit import (
    HOME_KINDS,
    KINDS,
    PAIRED_KINDS,
    fit_transform,
    fitter,
    validate_calibration,
    validate_config,
)
from interlingua.server.transforms.matryoshka import (
    MatryoshkaTransform,
    check_m,
    matryoshka,
    renormalizes,
    shrink,
    then_truncate,
)
from interlingua.server.transforms.mrl_adapter import (
    MRLAdapterTransform,
    fit_mrl_adapter,
    nesting_dims,
    positive_pairs,
)
from interlingua.server.transforms.mrl_loss import (
    AdapterMap,
    MatryoshkaLoss,
    SimilarityDistillationLoss,
    cosine_sims,
    shrink_t,
)
from interlingua.server.transforms.pca_basis import fit_pca_basis, principal_axes, retained_variance
from interlingua.server.transforms.train import InfoNCELoss, torch_threads

FIXTURE = Path(__file__).parent / "fixtures" / "debdesc_fit_500.npz"
F32_TOL = 10 * 384 * float(np.finfo(np.float32).eps)  #: 10 · n · eps, per entry


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def unit(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def anisotropic(n: int, d: int = 24, seed: int = 0) -> np.ndarray:
    """(n, d) float32 rows with a common mean and very different variances along random axes."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return ((rng.normal(size=(n, d)) * np.geomspace(3, 0.05, d)) @ Q.T + rng.normal(size=d)).astype(np.float32)


def recall10(xq: np.ndarray, xb: np.ndarray, m: int) -> float:
    S = shrink(xq, m) @ shrink(xb, m).T
    own = np.diagonal(S)[:, None]
    return float(((own < S).sum(1) < 10).mean())


def load_back(t: MatryoshkaTransform | AffineTransform | MRLAdapterTransform) -> object:
    return load_transform(t.kind, t.d_in, t.d_out, t.config, t.arrays(), link=lambda name: t)


# ---- truncation ------------------------------------------------------------------------------------------------


def test_shrink_truncates_then_normalizes() -> None:
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    y = shrink(x, 3)
    assert y.shape == (5, 3) and y.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(y, x[:, :3] / np.linalg.norm(x[:, :3], axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(shrink(x, 3, normalize=False), x[:, :3])  # truncation alone: exact
    np.testing.assert_allclose(shrink(7.5 * x, 3), y, rtol=1e-6)  # scale-free: normalizing first changes nothing
    np.testing.assert_allclose(shrink(unit(x), 3), y, rtol=1e-6)
    assert not np.shares_memory(shrink(x, 8, normalize=False), x)


def test_shrink_keeps_a_zero_prefix_at_zero() -> None:
    x = np.array([[0.0, 0.0, 1.0], [3.0, 4.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(shrink(x, 2), [[0.0, 0.0], [0.6, 0.8]], rtol=1e-6)


@pytest.mark.parametrize(
    ("m", "d", "message"),
    [
        (0, 384, r"m must be in \(0, d\]: got m=0 for d=384"),
        (385, 384, r"m must be in \(0, d\]: got m=385 for d=384"),
        (-1, 384, r"m must be in \(0, d\]: got m=-1 for d=384"),
        (1.5, 384, r"m must be an integer: got m=1.5"),
        (True, 384, r"m must be an integer: got m=True"),
        ("64", 384, r"m must be an integer: got m='64'"),
        (1, 0, r"d must be an integer >= 1: got d=0"),
        (1, 3.0, r"d must be an integer >= 1: got d=3.0"),
    ],
)
def test_m_and_d_are_validated_with_exact_messages(m: object, d: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        check_m(m, d)
    if isinstance(d, int):
        with pytest.raises(ValueError, match=f"^{message}$"):
            MatryoshkaTransform(d, m)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=f"^{message}$"):
            matryoshka(d, m)  # type: ignore[arg-type]


def test_check_m_accepts_numpy_integers() -> None:
    assert check_m(np.int64(64), 384) == (64, 384)
    assert check_m(384, 384) == (384, 384)


def test_shrink_and_the_transform_check_their_input() -> None:
    with pytest.raises(ValueError, match=r"^x must be a 2-d array \(n, d\), got shape \(4,\)$"):
        shrink(np.ones(4), 2)
    with pytest.raises(ValueError, match=r"^m must be in \(0, d\]: got m=5 for d=4$"):
        shrink(np.ones((2, 4)), 5)
    with pytest.raises(ValueError, match=r"^x must have shape \(n, 8\), got \(2, 4\)$"):
        matryoshka(8, 2).apply(np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"^normalize must be a bool: got normalize='yes'$"):
        MatryoshkaTransform(8, 2, "yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^metric must be one of cosine, ip, l2, got 'dot'$"):
        renormalizes("dot")


def test_cosine_and_ip_renormalize_l2_does_not() -> None:
    assert (renormalizes("cosine"), renormalizes("ip"), renormalizes("l2")) == (True, True, False)
    x = np.random.default_rng(1).normal(size=(6, 8)).astype(np.float32)
    y = x[::-1].copy()
    d_full = ((x - y) ** 2).sum(1)
    d_prefix = ((shrink(x, 3, normalize=False) - shrink(y, 3, normalize=False)) ** 2).sum(1)
    assert (d_prefix <= d_full + 1e-6).all()  # without re-normalization an l2 prefix is a lower bound


def test_matryoshka_transform_is_linear_only_without_renormalization() -> None:
    x = np.random.default_rng(2).normal(size=(4, 8)).astype(np.float32)
    t = matryoshka(8, 3)
    assert (t.kind, t.d_in, t.d_out, t.config) == (
        "matryoshka",
        8,
        3,
        {"kind": "matryoshka", "d": 8, "m": 3, "normalize": True},
    )
    np.testing.assert_array_equal(t.apply(x, "doc"), shrink(x, 3))
    assert t.affine() is None
    lin = matryoshka(8, 3, normalize=False)
    form = lin.affine("doc")
    assert form is not None
    np.testing.assert_array_equal(form[0], np.eye(8, 3))
    np.testing.assert_array_equal(form[1], np.zeros(3))
    np.testing.assert_array_equal(x @ form[0] + form[1], lin.apply(x))


@pytest.mark.parametrize("normalize", [True, False])
def test_matryoshka_round_trips_through_load_transform(normalize: bool) -> None:
    t = matryoshka(16, 5, normalize)
    back = load_back(t)
    assert isinstance(back, MatryoshkaTransform)
    assert (back.d_in, back.d_out, back.m, back.normalize, back.config) == (16, 5, 5, normalize, t.config)
    x = np.random.default_rng(3).normal(size=(3, 16)).astype(np.float32)
    np.testing.assert_array_equal(back.apply(x), t.apply(x))
    with pytest.raises(ValueError, match=r"^arrays hold d=16, m=5 but the artefact maps 16 -> 6$"):
        MatryoshkaTransform.from_arrays(16, 6, t.config, t.arrays())


# ---- composition rule ------------------------------------------------------------------------------------------


def test_then_truncate_maps_first_and_truncates_after() -> None:
    x = anisotropic(50, d=12)
    pca = fit_pca_basis(x).transform
    t = then_truncate(pca, 4)
    assert isinstance(t, ChainTransform) and (t.d_in, t.d_out) == (12, 4)
    np.testing.assert_allclose(t.apply(x), shrink(pca.apply(x), 4), rtol=1e-6, atol=1e-7)
    folded = then_truncate(pca, 4, normalize=False)  # affine: one matrix, the first 4 columns of R
    assert isinstance(folded, AffineTransform) and folded.kind == "chain"
    np.testing.assert_allclose(folded.W["query"], pca.W["query"][:, :4], atol=1e-7)
    np.testing.assert_allclose(folded.apply(x), pca.apply(x)[:, :4], atol=1e-5)
    with pytest.raises(ValueError, match=r"^m must be in \(0, d\]: got m=13 for d=12$"):
        then_truncate(pca, 13)
    with pytest.raises(ValueError, match=r"link 1 \(affine\) has d_in 12 but link 0 \(matryoshka\) has d_out 4"):
        compose([matryoshka(12, 4), AffineTransform({"query": np.eye(12)}, {"query": np.zeros(12)}, {})])


def test_a_rotation_destroys_nesting() -> None:
    """An MRL-like space (the matching signal in the first 4 dims) keeps its prefix recall; the same vectors
    rotated do not: never truncate a rotated MRL vector as if it were still nested."""
    rng = np.random.default_rng(4)
    z = rng.normal(size=(300, 4))
    xq = np.hstack([z + 0.1 * rng.normal(size=z.shape), 0.3 * rng.normal(size=(300, 12))])
    xb = np.hstack([z + 0.1 * rng.normal(size=z.shape), 0.3 * rng.normal(size=(300, 12))])
    Q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert recall10(xq, xb, 4) > 0.9
    assert recall10(xq @ Q, xb @ Q, 4) < 0.5
    np.testing.assert_allclose(recall10(xq @ Q, xb @ Q, 16), recall10(xq, xb, 16))  # full dim: the same


# ---- pca_basis -------------------------------------------------------------------------------------------------


def test_pca_basis_is_an_orthogonal_rotation_without_translation() -> None:
    x = anisotropic(400)
    result = fit_pca_basis(x)
    t = result.transform
    assert isinstance(t, AffineTransform) and t.kind == "pca_basis" and (t.d_in, t.d_out) == (24, 24)
    R = t.W["query"]
    np.testing.assert_array_equal(R, t.W["doc"])
    assert np.abs(R.T.astype(np.float64) @ R - np.eye(24)).max() < F32_TOL
    assert np.abs(R.astype(np.float64) @ R.T - np.eye(24)).max() < F32_TOL
    np.testing.assert_array_equal(t.b["query"], 0) and np.testing.assert_array_equal(t.b["doc"], 0)
    assert result.info["ortho_error"] < 1e-5 and result.info["n"] == 400 and result.info["centered_axes"] is True


@pytest.mark.parametrize("center_axes", [True, False])
def test_pca_basis_keeps_full_dim_scores(center_axes: bool) -> None:
    x = anisotropic(300, seed=5)
    t = fit_pca_basis(x, center_axes=center_axes).transform
    xq, xb = x[:40], x[40:]
    yq, yb = t.apply(xq, "query"), t.apply(xb, "doc")
    scale = float(np.abs(xq @ xb.T).max())
    np.testing.assert_allclose(yq @ yb.T, xq @ xb.T, atol=1e-5 * scale)
    l2 = ((xq[:, None] - xb[None]) ** 2).sum(-1)
    np.testing.assert_allclose(((yq[:, None] - yb[None]) ** 2).sum(-1), l2, atol=1e-5 * float(l2.max()))
    np.testing.assert_array_equal(np.argsort(-(yq @ yb.T), 1)[:, :5], np.argsort(-(xq @ xb.T), 1)[:, :5])


def test_pca_basis_keeps_full_dim_scores_on_debdesc() -> None:
    z = np.load(FIXTURE)
    q, b = z["new_query"].astype(np.float32), z["new_doc"].astype(np.float32)
    t = fit_pca_basis(Calibration(b, b, q, q)).transform
    np.testing.assert_allclose(t.apply(q) @ t.apply(b).T, q @ b.T, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(t.apply(b), axis=1), np.linalg.norm(b, axis=1), atol=1e-5)


def test_pca_basis_orders_prefixes_by_variance() -> None:
    x = anisotropic(2000, seed=6).astype(np.float64)
    result = fit_pca_basis(x)
    y = result.transform.apply(x.astype(np.float32)).astype(np.float64)
    var = y.var(0)
    assert (np.diff(var) <= 1e-6 * var[0]).all()  # descending
    np.testing.assert_allclose(var, result.info["eigenvalues"], rtol=1e-4, atol=1e-8)
    Q, _ = np.linalg.qr(np.random.default_rng(7).normal(size=(24, 24)))
    for m in range(1, 24):  # no other prefix keeps as much variance: neither the raw nor a random rotation's
        assert var[:m].sum() >= x.var(0)[:m].sum() - 1e-9
        assert var[:m].sum() >= (x @ Q).var(0)[:m].sum() - 1e-9
    kept = result.info["retained_variance"]
    assert list(kept) == ["16", "24"] and kept["24"] == 1.0
    assert kept["16"] == pytest.approx(var[:16].sum() / var.sum(), rel=1e-4)


def test_pca_basis_uses_the_home_side_of_a_calibration() -> None:
    x = anisotropic(300, seed=8)
    junk = np.zeros((150, 5), dtype=np.float32)  # the new side is ignored, whatever its dim
    t = fit_pca_basis(Calibration(junk, x[:150], junk, x[150:])).transform
    np.testing.assert_array_equal(t.W["query"], fit_pca_basis(x).transform.W["query"])


def test_principal_axes_signs_are_fixed() -> None:
    x = anisotropic(200, seed=9)
    R1, _ = principal_axes(x)
    R2, _ = principal_axes(x[::-1].copy())
    np.testing.assert_allclose(R1, R2, atol=1e-9)
    assert (R1[np.abs(R1).argmax(0), np.arange(24)] > 0).all()
    assert retained_variance(np.array([3.0, 1.0, 0.0]), (1, 5)) == {"1": 0.75, "3": 1.0}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.ones(5), r"^vectors must be a 2-d numeric array \(n, d\), got shape \(5,\)$"),
        (np.ones((1, 4)), r"^need at least 2 vectors of dim >= 1, got shape \(1, 4\)$"),
        (np.array([[0.0, 1.0], [np.nan, 0.0]]), r"^vectors have non-finite values \(NaN or Inf\), first in row 1$"),
    ],
)
def test_pca_basis_input_errors(data: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fit_pca_basis(data)


def test_pca_basis_other_errors() -> None:
    with pytest.raises(ValueError, match=r"^center_axes must be a bool, got 1$"):
        fit_pca_basis(anisotropic(10), center_axes=1)  # type: ignore[arg-type]
    cal = Calibration(np.zeros((3, 2)), np.zeros((3, 4)), np.zeros((3, 2)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"^doc_home and query_home differ in dim"):
        fit_pca_basis(cal)


def test_pca_basis_round_trips_and_fits_by_name() -> None:
    x = anisotropic(200, seed=10)
    result, report = fit_transform("pca_basis", Calibration(x, x, x[:50], x[:50]), {"center_axes": False})
    t = result.transform
    assert isinstance(t, AffineTransform) and t.config == {"kind": "pca_basis", "center_axes": False}
    assert report["fit_pairs"] == 225 and fitter("pca_basis") is fit_pca_basis
    back = load_back(t)
    assert isinstance(back, AffineTransform) and back.kind == "pca_basis"
    np.testing.assert_array_equal(back.apply(x), t.apply(x))


# ---- Matryoshka loss -------------------------------------------------------------------------------------------


def test_matryoshka_loss_sums_named_terms_per_prefix() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen)
    inner = InfoNCELoss(0.1)
    loss = MatryoshkaLoss(inner, [2, 4, 6], [1.0, 0.5, 2.0], d=6)
    terms = loss(a, b)
    assert list(terms) == ["m2", "m4", "m6", "total"]
    for m in (2, 4, 6):
        assert float(terms[f"m{m}"]) == pytest.approx(float(inner(a[:, :m], b[:, :m])), rel=1e-6)
    expected = float(terms["m2"]) + 0.5 * float(terms["m4"]) + 2.0 * float(terms["m6"])
    assert float(terms["total"]) == pytest.approx(expected, rel=1e-6)
    assert loss.get_config_dict() == {
        "dims": [2, 4, 6],
        "weights": [1.0, 0.5, 2.0],
        "temperature": 0.1,
        "symmetric": False,
    }
    with pytest.raises(ValueError, match=r"^a \(8, 6\) and b \(8, 3\) must be \(batch, >= 6\)$"):
        loss(a, b[:, :3])


def test_shrink_t_matches_numpy_and_distillation_is_zero_at_the_teacher() -> None:
    x = np.random.default_rng(11).normal(size=(5, 7)).astype(np.float32)
    np.testing.assert_allclose(shrink_t(torch.from_numpy(x), 3).numpy(), shrink(x, 3), rtol=1e-5, atol=1e-6)
    a, b = torch.from_numpy(x), torch.from_numpy(x[::-1].copy())
    distill = SimilarityDistillationLoss()
    assert float(distill(a, b, cosine_sims(a, b))) == pytest.approx(0.0, abs=1e-12)
    assert float(distill(a, b, torch.zeros(5, 5))) > 0
    with pytest.raises(ValueError, match=r"^teacher must have shape \(5, 5\), got \(4, 4\)$"):
        distill(a, b, torch.zeros(4, 4))


@pytest.mark.parametrize(
    ("dims", "weights", "d", "message"),
    [
        ([], None, None, r"^dims must not be empty$"),
        ([0, 4], None, None, r"^dims must be integers >= 1, got \[0, 4\]$"),
        ([2.5, 4], None, None, r"^dims must be integers >= 1, got \[2.5, 4\]$"),
        ([4, 4], None, None, r"^dims must be strictly increasing, got \[4, 4\]$"),
        ([8, 4], None, None, r"^dims must be strictly increasing, got \[8, 4\]$"),
        ([4, 8], None, 6, r"^dims must be <= d=6, got \[4, 8\]$"),
        ([4, 8], [1.0], None, r"^weights must have one entry per dim \(2\), got 1$"),
        ([4, 8], [1.0, -1.0], None, r"^weights must be finite, >= 0 and not all 0, got \[1.0, -1.0\]$"),
        ([4, 8], [0.0, 0.0], None, r"^weights must be finite, >= 0 and not all 0, got \[0.0, 0.0\]$"),
        ([4, 8], [1.0, math.inf], None, r"^weights must be finite, >= 0 and not all 0, got \[1.0, inf\]$"),
    ],
)
def test_matryoshka_loss_validates_dims_and_weights(
    dims: list[int], weights: list[float] | None, d: int | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        MatryoshkaLoss(InfoNCELoss(), dims, weights, d)


def test_matryoshka_loss_needs_an_inner_loss_with_a_config() -> None:
    with pytest.raises(ValueError, match=r"^inner must have get_config_dict\(\), got Identity$"):
        MatryoshkaLoss(torch.nn.Identity(), [2])


def test_adapter_map_starts_at_its_init() -> None:
    W0 = np.linalg.qr(np.random.default_rng(12).normal(size=(6, 6)))[0].astype(np.float32)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    for hidden in (0, 5):
        np.testing.assert_allclose(
            AdapterMap(W0, hidden).forward(x).detach().numpy(), x.numpy() @ W0, rtol=1e-5, atol=1e-6
        )
    with pytest.raises(ValueError, match=r"^W0 must be a square 2-d array, got shape \(6, 5\)$"):
        AdapterMap(W0[:, :5])
    with pytest.raises(ValueError, match=r"^hidden must be an integer >= 0, got -1$"):
        AdapterMap(W0, -1)


# ---- the adapter -----------------------------------------------------------------------------------------------

D_PLANT = 32


def planted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(queries, docs) (n, 32): the matching signal (6 dims, shared by the pair) has low variance; 10 high-variance
    nuisance dims are drawn independently for each side; 16 dims are small noise; all in a fixed random basis.
    PCA puts the nuisance first, so its short prefixes cannot match; a learned map can."""
    Q, _ = np.linalg.qr(np.random.default_rng(1234).normal(size=(D_PLANT, D_PLANT)))
    rng = np.random.default_rng(seed)
    z = 0.4 * rng.normal(size=(n, 6))

    def side() -> np.ndarray:
        parts = [z + 0.05 * rng.normal(size=z.shape), rng.normal(size=(n, 10)), 0.05 * rng.normal(size=(n, 16))]
        return unit(np.hstack(parts) @ Q.T)

    return side(), side()


FAST = {"dims": (4, 8, 16, 32), "epochs": 20, "batch_size": 256, "lr": 1e-2, "threads": 1}


def test_adapter_beats_pca_prefixes_on_planted_structure() -> None:
    q, b = planted(2000, seed=0)
    tq, tb = planted(1000, seed=1)
    pca = fit_pca_basis(np.vstack([b, q])).transform
    result = fit_mrl_adapter((q, b), **FAST)  # type: ignore[arg-type]
    t = result.transform
    for m in (4, 8):
        r_pca, r_adapter = recall10(pca.apply(tq), pca.apply(tb), m), recall10(t.apply(tq), t.apply(tb), m)
        assert r_adapter > r_pca + 0.3, (m, r_pca, r_adapter)
    assert recall10(t.apply(tq), t.apply(tb), 8) > 0.9
    history = result.history
    assert len(history) == 20 and list(history[0]) == ["m4", "m8", "m16", "m32", "contrastive", "total"]
    assert history[-1]["total"] < history[0]["total"]
    assert result.info["dims"] == [4, 8, 16, 32] and result.info["init"] == "pca_basis"


def test_adapter_trains_deterministically() -> None:
    q, b = planted(300, seed=2)
    kw = {**FAST, "epochs": 3, "hidden": 8, "distill": 1.0}
    one, two = fit_mrl_adapter((q, b), **kw), fit_mrl_adapter((q, b), **kw)  # type: ignore[arg-type]
    for name, a in one.transform.arrays().items():
        np.testing.assert_array_equal(a, two.transform.arrays()[name])
    assert one.history == two.history and "distill" in one.history[0]
    three = fit_mrl_adapter((q, b), **{**kw, "seed": 1})  # type: ignore[arg-type]
    assert not np.array_equal(three.transform.arrays()["W1"], one.transform.arrays()["W1"])


@pytest.mark.parametrize("hidden", [0, 6])
def test_adapter_serves_in_numpy_and_round_trips(hidden: int) -> None:
    q, b = planted(200, seed=3)
    result = fit_mrl_adapter(Calibration(b, b, q, q), **{**FAST, "epochs": 2, "hidden": hidden})  # type: ignore[arg-type]
    t = result.transform
    assert isinstance(t, MRLAdapterTransform) and t.hidden == hidden and t.config["kind"] == "mrl_adapter"
    W = t.arrays()["W"]
    if hidden:
        assert t.affine() is None and set(t.arrays()) == {"W", "W1", "b1", "W2", "b2"}
        mlp = t.arrays()
        ref = q @ W + np.maximum(q @ mlp["W1"] + mlp["b1"], 0) @ mlp["W2"] + mlp["b2"]
    else:
        form = t.affine("doc")
        assert form is not None and set(t.arrays()) == {"W"}
        np.testing.assert_array_equal(form[1], 0)
        ref = q @ W
    np.testing.assert_allclose(t.apply(q, "query"), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(t.apply(q, "query"), t.apply(q, "doc"))  # one map for both sides
    back = load_back(t)
    assert isinstance(back, MRLAdapterTransform) and back.config == t.config
    np.testing.assert_array_equal(back.apply(q), t.apply(q))
    with pytest.raises(ValueError, match=r"^arrays map 32 -> 32, expected 32 -> 16$"):
        MRLAdapterTransform.from_arrays(32, 16, t.config, t.arrays())


def test_adapter_transform_checks_its_weights() -> None:
    with pytest.raises(ValueError, match=r"^W must be a square 2-d array, got shape \(4, 3\)$"):
        MRLAdapterTransform(np.ones((4, 3)), {})
    with pytest.raises(ValueError, match=r"^the MLP needs all of W1, b1, W2, b2, got W1$"):
        MRLAdapterTransform(np.eye(4), {}, {"W1": np.ones((4, 2))})
    bad = {"W1": np.ones((4, 2)), "b1": np.ones(2), "W2": np.ones((3, 4)), "b2": np.ones(4)}
    with pytest.raises(ValueError, match=r"^MLP shapes do not chain for d=4"):
        MRLAdapterTransform(np.eye(4), {}, bad)
    with pytest.raises(ValueError, match=r"^x must have shape \(n, 4\), got \(2, 3\)$"):
        MRLAdapterTransform(np.eye(4), {}).apply(np.ones((2, 3)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dims": (4, 40)}, r"^m must be in \(0, d\]: got m=40 for d=32$"),
        ({"dims": ()}, r"^dims must be a non-empty sequence of integers, got \(\)$"),
        ({"dims": (16, 8)}, r"^dims must be strictly increasing, got \[16, 8\]$"),
        ({"weights": (1.0,)}, r"^weights must have one entry per dim \(2\), got 1$"),
        ({"distill": -1.0}, r"^distill must be a finite number >= 0, got -1.0$"),
        ({"epochs": 0}, r"^epochs must be an integer >= 1, got 0$"),
        ({"batch_size": 1}, r"^batch_size must be an integer >= 2, got 1$"),
        ({"lr": 0.0}, r"^lr must be a finite number > 0, got 0.0$"),
        ({"temperature": 0.0}, r"^temperature must be a finite number > 0, got 0.0$"),
        ({"hidden": -2}, r"^hidden must be an integer >= 0, got -2$"),
    ],
)
def test_adapter_config_errors(kwargs: dict[str, object], message: str) -> None:
    q, b = planted(8, seed=4)
    with pytest.raises(ValueError, match=message):
        fit_mrl_adapter((q, b), **kwargs)  # type: ignore[arg-type]


def test_adapter_needs_row_aligned_positive_pairs() -> None:
    q, b = planted(8, seed=5)
    with pytest.raises(ValueError, match=r"^mrl_adapter needs row-aligned \(query_i, doc_i\) positive pairs of one"):
        positive_pairs((q, b[:5]))
    with pytest.raises(ValueError, match=r"^mrl_adapter needs at least 2 positive pairs, got 1$"):
        positive_pairs((q[:1], b[:1]))
    q[3, 2] = np.inf
    with pytest.raises(ValueError, match=r"^queries have non-finite values \(NaN or Inf\)$"):
        positive_pairs((q, b))
    assert nesting_dims(384) == (16, 32, 64, 128, 256, 384) and nesting_dims(20) == (16, 20)


def test_adapter_fits_by_name_with_a_held_out_slice_that_keeps_pairs_aligned(monkeypatch: pytest.MonkeyPatch) -> None:
    q, b = planted(100, seed=6)
    q[:, 0], b[:, 0] = np.arange(100), np.arange(100)  # row i carries its own id on both sides
    cal = Calibration(b, b, q, q)
    seen: list[Calibration] = []

    @functools.wraps(fit_mrl_adapter)  # keeps the fitter's name and docstring on the spy
    def spy(c: Calibration, **kw: Any) -> FitResult:
        seen.append(c)
        return fit_mrl_adapter(c, **kw)

    monkeypatch.setattr(mrl_adapter, "fit_mrl_adapter", spy)
    result, report = fit_transform("mrl_adapter", cal, {"dims": [8, 32], "epochs": 1, "threads": 1}, holdout=0.2)
    train = seen[0]
    np.testing.assert_array_equal(train.query_home[:, 0], train.doc_home[:, 0])
    assert report["fit_pairs"] == 160 and report["heldout_pairs"] == 40
    assert isinstance(result.transform, MRLAdapterTransform)
    monkeypatch.undo()
    assert fitter("mrl_adapter") is fit_mrl_adapter


def test_registry_knows_the_matryoshka_kinds() -> None:
    assert {"pca_basis", "mrl_adapter"} <= set(KINDS) and "matryoshka" not in KINDS
    assert HOME_KINDS == ("pca_basis", "mrl_adapter") and PAIRED_KINDS == ("mrl_adapter",)
    validate_config("mrl_adapter", {"dims": [16, 32], "distill": 1.0, "hidden": 64})
    validate_config("pca_basis", {"center_axes": False})
    with pytest.raises(ValueError, match=r"^unknown config key\(s\) for pca_basis: m; accepted: center_axes$"):
        validate_config("pca_basis", {"m": 64})
    x = np.zeros((4, 3))
    with pytest.raises(
        ValueError,
        match=r"^mrl_adapter trains on \(query_home\[i\], doc_home\[i\]\) positive pairs: got 3 queries and 4 docs$",
    ):
        validate_calibration(Calibration(x, x, x[:3], x[:3]), "mrl_adapter")


def test_serving_an_adapter_does_not_import_torch() -> None:
    code = (
        "import sys, numpy as np\n"
        "from interlingua.server.transforms import load_transform\n"
        "t = load_transform('mrl_adapter', 4, 4, {}, {'W': np.eye(4, dtype=np.float32)}, link=None)\n"
        "u = load_transform('matryoshka', 4, 2, {}, {}, link=None)\n"
        "from interlingua.server.transforms.pca_basis import fit_pca_basis\n"
        "fit_pca_basis(np.random.default_rng(0).normal(size=(10, 4)))\n"
        "u.apply(t.apply(np.ones((2, 4))))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
