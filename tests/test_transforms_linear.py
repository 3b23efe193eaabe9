"""The linear transform kinds (procrustes, affine, basis), their composition (chain) and fit_transform.

Seeded synthetic pairs with a known map, checked to float tolerance; one test on 500 real debdesc
rows (``fixtures/debdesc_fit_500.npz``: rows 0..499 of the fit split, float16, vectors only).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from interlingua.server.transforms.affine import fit_affine, mse, ridge_path
from interlingua.server.transforms.base import AffineTransform, Calibration, Transform
from interlingua.server.transforms.basis import (
    BasisTransform,
    clip_spectral,
    complete_isometry,
    fit_basis,
    pad_home,
)
from interlingua.server.transforms.chain import ChainTransform, compose
from interlingua.server.transforms.evaluate import evaluate
from interlingua.server.transforms.fit import (
    KINDS,
    fit_transform,
    fitter,
    validate_calibration,
    validate_config,
)
from interlingua.server.transforms.procrustes import (
    centred_pairs,
    fit_procrustes,
    orthogonality_error,
    procrustes_rotation,
    refine_stiefel,
    side_means,
    stiefel_loss,
)

FIXTURE = Path(__file__).parent / "fixtures" / "debdesc_fit_500.npz"
EPS32 = float(np.finfo(np.float32).eps)


def rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    Q, R = np.linalg.qr(rng.standard_normal((d, d)))
    return Q * np.sign(np.diag(R))


def frame(d: int, p: int, rng: np.random.Generator) -> np.ndarray:
    """(d, p) with orthonormal columns (d >= p)."""
    return rotation(d, rng)[:, :p]


def paired(
    W: np.ndarray, b_doc: np.ndarray, b_query: np.ndarray, n: int, rng: np.random.Generator, noise: float = 0.0
) -> Calibration:
    """n doc and n query pairs y = x W + b[side] (+ noise); the sides' x have different means."""
    d_new, d_home = W.shape
    xd = rng.standard_normal((n, d_new)) + 1.0
    xq = rng.standard_normal((n, d_new)) - 0.5
    yd = xd @ W + b_doc + noise * rng.standard_normal((n, d_home))
    yq = xq @ W + b_query + noise * rng.standard_normal((n, d_home))
    return Calibration(xd, yd, xq, yq)


def fixture_split() -> tuple[Calibration, dict[str, np.ndarray]]:
    """Fit on rows 0..399 (800 pairs), evaluate on rows 400..499 (100 queries vs 100 docs)."""
    z = np.load(FIXTURE)
    a = {k: z[k].astype(np.float32) for k in z.files}
    cal = Calibration(a["new_doc"][:400], a["old_doc"][:400], a["new_query"][:400], a["old_query"][:400])
    ev = {
        "xq_new": a["new_query"][400:],
        "xq_home": a["old_query"][400:],
        "xb_new": a["new_doc"][400:],
        "xb_home": a["old_doc"][400:],
    }
    return cal, ev


# -- procrustes ----------------------------------------------------------------------------------


def test_procrustes_recovers_rotation_and_per_side_translation() -> None:
    rng = np.random.default_rng(0)
    Q = rotation(16, rng)
    b_doc, b_query = rng.standard_normal(16), rng.standard_normal(16)
    cal = paired(Q, b_doc, b_query, 200, rng)
    r = fit_procrustes(cal)
    t = r.transform
    assert t.kind == "procrustes" and t.config["kind"] == "procrustes"
    np.testing.assert_allclose(t.W["query"], Q, atol=1e-5)
    np.testing.assert_allclose(t.b["doc"], b_doc, atol=1e-5)
    np.testing.assert_allclose(t.b["query"], b_query, atol=1e-5)
    assert r.info["residual"] < 1e-10
    assert r.info["scale"] == pytest.approx(1.0)
    assert r.info["ortho_error"] < 10 * 16 * np.finfo(np.float64).eps
    assert r.info["centered"] is True and r.info["refined"] == 0


def test_procrustes_scale() -> None:
    rng = np.random.default_rng(1)
    Q = rotation(8, rng)
    cal = paired(2.5 * Q, np.ones(8), np.ones(8), 100, rng)
    assert fit_procrustes(cal).info["scale"] == pytest.approx(2.5)
    r = fit_procrustes(cal, scale=False)
    assert r.info["scale"] == 1.0
    assert orthogonality_error(r.transform.W["query"]) < 10 * 8 * EPS32


def test_procrustes_side_without_pairs_uses_other_sides_means() -> None:
    rng = np.random.default_rng(2)
    full = paired(rotation(6, rng), np.full(6, 3.0), np.zeros(6), 50, rng)
    cal = Calibration(full.doc_new, full.doc_home, full.query_new[:0], full.query_home[:0])
    means = side_means(cal)
    np.testing.assert_array_equal(means["query"][0], means["doc"][0])
    t = fit_procrustes(cal).transform
    np.testing.assert_array_equal(t.b["query"], t.b["doc"])


def test_procrustes_uncentred_has_no_bias() -> None:
    rng = np.random.default_rng(3)
    cal = paired(rotation(6, rng), np.ones(6), np.ones(6), 50, rng)
    r = fit_procrustes(cal, center=False)
    assert r.info["centered"] is False
    assert not r.transform.b["doc"].any() and not r.transform.b["query"].any()


def test_procrustes_d_new_below_d_home_is_an_isometric_embedding() -> None:
    rng = np.random.default_rng(4)
    P = frame(12, 8, rng).T  # (8, 12), orthonormal rows
    cal = paired(P, rng.standard_normal(12), rng.standard_normal(12), 100, rng)
    r = fit_procrustes(cal, scale=False)
    W = r.transform.W["query"].astype(np.float64)
    np.testing.assert_allclose(W, P, atol=1e-5)
    np.testing.assert_allclose(W @ W.T, np.eye(8), atol=10 * 8 * EPS32)  # RRᵀ = I: norms are kept
    x = rng.standard_normal((5, 8))
    np.testing.assert_allclose(np.linalg.norm(x @ W, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)
    assert r.info["residual"] < 1e-10 and r.info["refined"] == 0


def test_procrustes_d_new_above_d_home_refines_on_the_stiefel_manifold() -> None:
    rng = np.random.default_rng(5)
    d_new, d_home, n = 10, 4, 400
    X = rng.standard_normal((n, d_new)) * np.linspace(0.2, 3.0, d_new)  # anisotropic: U Vᵀ is not optimal
    Y = X @ frame(d_new, d_home, rng) + 0.05 * rng.standard_normal((n, d_home))
    cal = Calibration(X, Y, X[:0], Y[:0])
    r = fit_procrustes(cal)
    assert r.info["refined"] > 0
    assert r.info["loss"] <= r.info["loss_uvt"]
    assert r.info["loss"] < 0.5 * r.info["loss_uvt"]
    losses = [h["loss"] for h in r.history]
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(losses))
    assert r.info["ortho_error"] < 1e-10  # RᵀR = I kept by the QR retraction
    no_refine = fit_procrustes(cal, refine_steps=0)
    assert no_refine.info["refined"] == 0 and no_refine.info["loss"] == no_refine.info["loss_uvt"]


def test_refine_stiefel_never_increases_the_loss() -> None:
    rng = np.random.default_rng(6)
    X = rng.standard_normal((300, 7)) * np.arange(1, 8)
    Y = rng.standard_normal((300, 3))
    cal = Calibration(X, Y, X[:0], Y[:0])
    Xc, Yc = centred_pairs(cal, side_means(cal))
    C, M, yy = Xc.T @ Xc, Xc.T @ Yc, float((Yc**2).sum())
    R0, _ = procrustes_rotation(M)
    R, s, history = refine_stiefel(R0, C, M, yy, scale=False, steps=50)
    assert s == 1.0
    assert stiefel_loss(R, 1.0, C, M, yy) <= stiefel_loss(R0, 1.0, C, M, yy)
    np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-10)
    assert len(history) >= 2


def test_procrustes_validates_refine_steps() -> None:
    rng = np.random.default_rng(7)
    cal = paired(rotation(4, rng), np.zeros(4), np.zeros(4), 10, rng)
    with pytest.raises(ValueError, match=r"refine_steps must be an integer >= 0, got -1"):
        fit_procrustes(cal, refine_steps=-1)


def test_centred_procrustes_beats_uncentred_on_debdesc() -> None:
    """The README's claim: the new model's vectors share a mean of norm ~0.9 (home ~0.35), so an
    uncentred rotation cannot align the spaces; per-side centring can."""
    cal, ev = fixture_split()
    assert np.linalg.norm(cal.doc_new.mean(0)) > 0.85 and np.linalg.norm(cal.doc_home.mean(0)) < 0.45
    centred, uncentred = fit_procrustes(cal), fit_procrustes(cal, center=False)
    assert centred.info["residual"] < 0.6 < uncentred.info["residual"]
    rc, ru = evaluate(centred.transform, **ev), evaluate(uncentred.transform, **ev)
    assert rc["transformed_r1"] > 0.5 > 0.15 > ru["transformed_r1"]
    assert rc["transformed_r10"] > ru["transformed_r10"] + 0.3
    assert rc["raw_r10"] < 0.2  # the raw spaces are unrelated
    # the basis transform's documented choice: fit on raw pairs, not centred-with-the-bias-dropped
    assert evaluate(fit_basis(cal).transform, **ev)["transformed_r1"] > 0.6
    assert evaluate(fit_basis(cal, center=True).transform, **ev)["transformed_r1"] < 0.4


# -- affine --------------------------------------------------------------------------------------


def test_affine_recovers_a_general_map() -> None:
    rng = np.random.default_rng(10)
    W = rng.standard_normal((6, 9))
    b_doc, b_query = rng.standard_normal(9), rng.standard_normal(9)
    r = fit_affine(paired(W, b_doc, b_query, 100, rng), ridge=0.0)
    t = r.transform
    assert t.kind == "affine" and r.info["ridge"] == 0.0 and r.info["heldout_mse"] == {}
    np.testing.assert_allclose(t.W["doc"], W, atol=1e-4)
    np.testing.assert_allclose(t.b["doc"], b_doc, atol=1e-4)
    np.testing.assert_allclose(t.b["query"], b_query, atol=1e-4)
    assert r.info["residual"] < 1e-10
    assert r.info["ortho_error"] == pytest.approx(orthogonality_error(W), rel=1e-5)


def test_ridge_path_matches_the_normal_equations() -> None:
    rng = np.random.default_rng(11)
    X = rng.standard_normal((40, 5))
    X[:, 4] = X[:, 3]  # rank-deficient: λ = 0 is the minimum-norm solution
    Y = rng.standard_normal((40, 3))
    C, M = X.T @ X, X.T @ Y
    W0, W1 = ridge_path(C, M, [0.0, 1.0])
    np.testing.assert_allclose(W0, np.linalg.lstsq(X, Y, rcond=None)[0], atol=1e-10)
    np.testing.assert_allclose(W1, np.linalg.solve(C + np.eye(5), M), atol=1e-10)


def test_affine_picks_the_ridge_by_heldout_mse() -> None:
    rng = np.random.default_rng(12)
    W = rng.standard_normal((20, 20))
    clean = fit_affine(paired(W, np.zeros(20), np.zeros(20), 200, rng, noise=0.01))
    assert clean.info["ridge"] <= 0.1  # signal: little shrinkage
    assert min(clean.info["heldout_mse"].values()) == clean.info["heldout_mse"][str(clean.info["ridge"])]
    noise = paired(np.zeros((20, 20)), np.zeros(20), np.zeros(20), 30, rng, noise=1.0)  # y independent of x
    r = fit_affine(noise, ridges=(1e-3, 1.0, 1e3))
    assert r.info["ridge"] == 1e3
    assert list(r.info["heldout_mse"]) == ["0.001", "1.0", "1000.0"]
    assert mse(noise, r.transform.W["query"].astype(np.float64), {s: r.transform.b[s] for s in ("doc", "query")}) > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ridge": -1.0}, r"ridge must be a finite number >= 0, got -1.0"),
        ({"ridge": float("nan")}, r"ridge must be a finite number >= 0, got nan"),
        ({"ridges": ()}, r"ridges must be a non-empty sequence, got \(\)"),
        ({"ridges": (1.0, -2.0)}, r"every ridge in ridges must be a finite number >= 0, got -2.0"),
        ({"holdout": 1.0}, r"holdout must be in \(0, 1\), got 1.0"),
        ({"holdout": 0.01}, r"holdout 0.01 of 20 pairs leaves no pairs to fit or to choose the ridge on"),
    ],
)
def test_affine_errors(kwargs: dict[str, Any], message: str) -> None:
    rng = np.random.default_rng(13)
    cal = paired(np.eye(3), np.zeros(3), np.zeros(3), 10, rng)
    with pytest.raises(ValueError, match=message):
        fit_affine(cal, **kwargs)


# -- basis ---------------------------------------------------------------------------------------


def test_basis_is_an_isometry_whose_prefix_fits_the_home_space() -> None:
    rng = np.random.default_rng(20)
    d_new, d_home = 12, 8
    W = rng.standard_normal((d_new, d_home))
    cal = paired(W / np.linalg.norm(W, 2) * 3.0, np.zeros(d_home), np.zeros(d_home), 300, rng, noise=0.1)
    r = fit_basis(cal)
    t = r.transform
    assert isinstance(t, BasisTransform) and t.kind == "basis"
    T = t.W["query"].astype(np.float64)
    assert t.d_home == d_home and t.d_out == d_home + t.delta and 0 < t.delta <= d_new
    np.testing.assert_allclose(T @ T.T, np.eye(d_new), atol=10 * d_new * EPS32)
    x = rng.standard_normal((6, d_new)).astype(np.float32)
    np.testing.assert_allclose(t.apply(x) @ t.apply(x).T, x @ x.T, atol=1e-4)  # ⟨xT, x'T⟩ = ⟨x, x'⟩
    assert not t.b["query"].any() and not t.b["doc"].any()
    assert r.info["isometry_error"] < 10 * d_new * EPS32 and r.info["delta"] == t.delta
    assert r.info["clipped"] > 0 and r.info["sv_max"] > 1
    assert r.info["residual"] >= r.info["residual_ls"]  # least squares is the unconstrained optimum


def test_basis_prefix_equals_least_squares_for_a_contraction() -> None:
    rng = np.random.default_rng(21)
    W = rng.standard_normal((6, 10))
    W *= 0.8 / np.linalg.norm(W, 2)
    cal = Calibration(*(lambda x: (x, x @ W, x[:0], (x @ W)[:0]))(rng.standard_normal((100, 6))))
    r = fit_basis(cal, ridge=0.0)
    assert r.info["clipped"] == 0 and r.info["delta"] == 6
    np.testing.assert_allclose(r.transform.W["query"][:, :10], W, atol=1e-5)
    assert r.info["residual"] == pytest.approx(r.info["residual_ls"], abs=1e-10)


def test_complete_isometry_drops_the_directions_at_singular_value_one() -> None:
    rng = np.random.default_rng(22)
    U, V = rotation(5, rng), rotation(7, rng)[:5]
    A = (U * np.array([1.0, 1.0, 0.6, 0.3, 0.0])) @ V
    T = complete_isometry(A)
    assert T.shape == (5, 7 + 3)  # Δ = rank(I − AAᵀ) = 5 − 2
    np.testing.assert_allclose(T @ T.T, np.eye(5), atol=1e-12)
    np.testing.assert_array_equal(T[:, :7], A)
    with pytest.raises(ValueError, match=r"A has spectral norm 2 > 1; clip its singular values first"):
        complete_isometry(2 * np.eye(3))
    with pytest.raises(ValueError, match=r"A must be a 2-d array, got shape \(3,\)"):
        complete_isometry(np.ones(3))


def test_clip_spectral() -> None:
    A, clipped, top = clip_spectral(np.diag([3.0, 1.0, 0.5]))
    np.testing.assert_allclose(A, np.diag([1.0, 1.0, 0.5]))
    assert clipped == 2 and top == 3.0


def test_pad_home_and_basis_transform_checks() -> None:
    t = BasisTransform({"query": np.eye(3, 5)}, {"query": np.zeros(5)}, {"kind": "basis", "d_home": 2})
    assert t.delta == 3
    padded = t.pad_home(np.ones((4, 2)))
    assert padded.shape == (4, 5) and padded.dtype == np.float32
    np.testing.assert_array_equal(padded[:, 2:], 0)
    with pytest.raises(ValueError, match=r"x_home must have shape \(n, 2\), got \(4, 3\)"):
        t.pad_home(np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"x_home must have shape \(n, d_home\) with d_home <= 5, got \(1, 6\)"):
        pad_home(np.ones((1, 6)), 5)
    with pytest.raises(ValueError, match=r"config\['d_home'\] must be an integer in \[1, 5\], got 9"):
        BasisTransform({"query": np.eye(3, 5)}, {"query": np.zeros(5)}, {"d_home": 9})
    back = BasisTransform.from_arrays(3, 5, t.config, t.arrays())
    assert isinstance(back, BasisTransform) and back.kind == "basis" and back.d_home == 2
    bare = BasisTransform.from_arrays(3, 5, {}, t.arrays())  # a stored config without d_home: the arrays have it
    assert bare.kind == "basis" and bare.d_home == 2 and t.arrays()["d_home"].tolist() == [2]


def test_basis_validates_ridge() -> None:
    rng = np.random.default_rng(23)
    cal = paired(np.eye(3), np.zeros(3), np.zeros(3), 10, rng)
    with pytest.raises(ValueError, match=r"ridge must be a finite number >= 0, got -0.5"):
        fit_basis(cal, ridge=-0.5)


# -- chain ---------------------------------------------------------------------------------------


class Tanh(Transform):
    """A non-linear test link: tanh(x) (d -> d)."""

    kind = "tanh"

    def __init__(self, d: int) -> None:
        super().__init__(d, d, {"kind": "tanh", "id": "tanh-test"})

    def apply(self, x: np.ndarray, side: str = "query") -> np.ndarray:
        return np.tanh(x).astype(np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        return {}

    @classmethod
    def from_arrays(cls, d_in: int, d_out: int, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Tanh:
        return cls(d_in)


def affine_link(d_in: int, d_out: int, rng: np.random.Generator) -> AffineTransform:
    W = {s: rng.standard_normal((d_in, d_out)) for s in ("query", "doc")}
    b = {s: rng.standard_normal(d_out) for s in ("query", "doc")}
    return AffineTransform(W, b, {"kind": "affine"})


def test_chain_of_affine_links_is_one_affine_map() -> None:
    rng = np.random.default_rng(30)
    links = [affine_link(4, 6, rng), affine_link(6, 3, rng), affine_link(3, 5, rng)]
    t = compose(links)
    assert isinstance(t, AffineTransform) and t.kind == "chain" and (t.d_in, t.d_out) == (4, 5)
    x = rng.standard_normal((7, 4)).astype(np.float32)
    for side in ("query", "doc"):
        y = x
        for link in links:
            y = link.apply(y, side)
        np.testing.assert_allclose(t.apply(x, side), y, rtol=1e-4, atol=1e-4)
    assert [rec["kind"] for rec in t.config["links"]] == ["affine"] * 3
    assert all(len(rec["checksum"]) == 64 for rec in t.config["links"])


def test_chain_with_a_nonlinear_link_applies_links_in_order() -> None:
    rng = np.random.default_rng(31)
    links: list[Transform] = [affine_link(4, 4, rng), Tanh(4), affine_link(4, 2, rng)]
    t = compose(links)
    assert isinstance(t, ChainTransform) and t.affine() is None and (t.d_in, t.d_out) == (4, 2)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    expected = links[2].apply(np.tanh(links[0].apply(x, "doc")).astype(np.float32), "doc")
    np.testing.assert_allclose(t.apply(x, "doc"), expected, rtol=1e-5, atol=1e-6)
    record = t.config["links"][1]
    assert record == {"kind": "tanh", "d_in": 4, "d_out": 4, "checksum": record["checksum"], "id": "tanh-test"}
    assert t.arrays() == {}
    with pytest.raises(ValueError, match=r"a non-affine chain has no weights of its own"):
        ChainTransform.from_arrays(4, 2, t.config, {})


def test_chain_ending_in_a_basis_keeps_its_home_prefix() -> None:
    rng = np.random.default_rng(32)
    basis = BasisTransform({"query": np.eye(3, 5)}, {"query": np.zeros(5)}, {"kind": "basis", "d_home": 2})
    t = compose([affine_link(4, 3, rng), basis])
    assert isinstance(t, BasisTransform) and t.kind == "chain" and t.d_home == 2 and t.config["d_home"] == 2


def test_chain_errors() -> None:
    rng = np.random.default_rng(33)
    with pytest.raises(ValueError, match=r"compose needs at least one link"):
        compose([])
    with pytest.raises(ValueError, match=r"link 2 \(tanh\) has d_in 3 but link 1 \(affine\) has d_out 5"):
        compose([affine_link(2, 4, rng), affine_link(4, 5, rng), Tanh(3)])


# -- fit_transform -------------------------------------------------------------------------------


def small_cal(n: int = 40, d: int = 4, seed: int = 40) -> Calibration:
    rng = np.random.default_rng(seed)
    return paired(rotation(d, rng), rng.standard_normal(d), rng.standard_normal(d), n, rng, noise=0.01)


@pytest.mark.parametrize("kind", ["procrustes", "affine", "basis"])
def test_fit_transform_fits_on_the_rest_and_reports_on_the_heldout_slice(kind: str) -> None:
    calls: list[tuple[str, float]] = []
    config = {"pseudo_relevance": False}  # the split of pairs without relevance (with it: test_task_loss.py)
    result, report = fit_transform(kind, small_cal(), config, holdout=0.25, progress=lambda s, f: calls.append((s, f)))
    assert result.transform.d_in == 4 and report["relevance"] == "none"
    assert report["label_free"] is True and report["fit_pairs"] == 60 and report["heldout_pairs"] == 20
    assert report["doc_n"] == 10 and report["query_n"] == 10
    assert report["doc_xid_r1"] == 1.0 and report["query_xid_r10"] == 1.0
    fractions = [f for _, f in calls]
    assert fractions == sorted(fractions) and calls[0] == ("split", 0.0) and calls[-1] == ("done", 1.0)
    assert all(
        isinstance(v, float | int | bool) for k, v in report.items() if "retention" not in k and k != "relevance"
    )
    assert report["estimated_retention"] is None and report["retention_estimate"].startswith("none: no evaluation")


def test_fit_transform_passes_config_and_is_seeded() -> None:
    cal = small_cal()
    a, _ = fit_transform("affine", cal, {"ridge": 0.5}, holdout=0.0)
    assert a.info["ridge"] == 0.5
    b1, r1 = fit_transform("affine", cal, {}, seed=3)
    b2, r2 = fit_transform("affine", cal, {}, seed=3)
    np.testing.assert_array_equal(b1.transform.W["query"], b2.transform.W["query"])
    assert {k: v for k, v in r1.items() if k != "fit_seconds"} == {k: v for k, v in r2.items() if k != "fit_seconds"}
    _, r0 = fit_transform("procrustes", cal, {"kind": "procrustes"}, holdout=0.0)
    assert r0["heldout_pairs"] == 0 and "doc_xid_r1" not in r0


def test_fit_transform_bridges_the_torch_kinds_progress_records() -> None:
    calls: list[tuple[str, float]] = []
    config = {"lam": 0.0, "epochs": 2, "batch_size": 16, "threads": 1, "pseudo_relevance": False}
    result, report = fit_transform("lambda_orthogonal", small_cal(), config, progress=lambda s, f: calls.append((s, f)))
    assert result.transform.kind == "lambda_orthogonal" and report["heldout_pairs"] == 8
    assert ("lambda_orthogonal epoch 2", 0.9) in calls
    fractions = [f for _, f in calls]
    assert fractions == sorted(fractions) and calls[-1] == ("done", 1.0)


def test_fitter_imports_the_torch_kinds_lazily() -> None:
    assert fitter("procrustes") is fit_procrustes
    assert KINDS == ("procrustes", "affine", "lambda_orthogonal", "basis", "residual_mlp", "pca_basis", "mrl_adapter")


SIDE_ARRAYS = ("doc_new", "doc_home", "query_new", "query_home")


def bad(**fields: Any) -> Calibration:
    cal = small_cal()
    base = {
        "doc_new": cal.doc_new,
        "doc_home": cal.doc_home,
        "query_new": cal.query_new,
        "query_home": cal.query_home,
        "doc_labels": None,
        "query_labels": None,
    }
    return Calibration(**{**base, **fields})


@pytest.mark.parametrize(
    ("cal", "kind", "message"),
    [
        (small_cal(), "chain", r"kind must be one of procrustes, .*, mrl_adapter, got"),
        (bad(doc_new=np.ones(4)), "affine", r"doc_new must be a 2-d numeric array, got \(4,\)"),
        (bad(query_home=np.ones((3, 4))), "affine", r"query_new has 40 rows but query_home has 3"),
        (bad(**{name: np.ones((0, 4)) for name in SIDE_ARRAYS}), "affine", r"no calibration pairs"),
        (bad(query_new=np.ones((40, 5))), "affine", r"doc_new has d=4 but query_new has d=5: one model, one dim"),
        (bad(doc_home=np.ones((40, 3))), "affine", r"doc_home has d=3 but query_home has d=4"),
        (bad(doc_home=np.full((40, 4), np.inf)), "procrustes", r"doc_home has non-finite values \(NaN or Inf\), first"),
        (bad(query_labels=np.zeros(3, np.int64)), "affine", r"query_labels has 3 entries for 40 query pairs"),
        (small_cal(n=2, d=8), "basis", r"basis needs at least d_new=8 pairs for a full-rank fit, got 4"),
    ],
)
def test_validate_calibration_errors(cal: Calibration, kind: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_calibration(cal, kind)


def test_validate_calibration_accepts_few_pairs_for_iterative_kinds() -> None:
    validate_calibration(small_cal(n=2, d=8), "lambda_orthogonal")  # no full-rank requirement


def test_fit_transform_errors() -> None:
    cal = small_cal()
    with pytest.raises(
        ValueError,
        match=r"unknown config key\(s\) for affine: lamda; accepted: holdout, pseudo_relevance, ridge, ridges, seed, "
        r"task_epochs, threads",
    ):
        validate_config("affine", {"lamda": 1.0})
    with pytest.raises(ValueError, match=r"unknown config key\(s\) for procrustes: ridge"):
        fit_transform("procrustes", cal, {"ridge": 1.0})
    with pytest.raises(ValueError, match=r"holdout must be in \[0, 1\), got 1"):
        fit_transform("affine", cal, {}, holdout=1)
    with pytest.raises(ValueError, match=r"home_metric must be one of cosine, ip, l2, got 'dot'"):
        fit_transform("affine", cal, {}, home_metric="dot")
    few = small_cal(n=5, d=8)
    with pytest.raises(
        ValueError, match=r"procrustes needs at least d_new=8 pairs for a full-rank fit; holdout 0.5 leaves 6 of 10"
    ):
        fit_transform("procrustes", few, {"pseudo_relevance": False}, holdout=0.5)
