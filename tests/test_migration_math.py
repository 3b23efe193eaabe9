"""Migration maths on seeded synthetic data against numpy brute force: score calibration, merge, backfill order."""

from __future__ import annotations

import numpy as np
import pytest

from interlingua.server.migration import order as order_mod
from interlingua.server.migration.calibration import (
    IDENTITY,
    METHODS,
    ScoreCalibration,
    candidate_scores,
    fit_score_calibration,
    merge_topk,
)
from interlingua.server.migration.order import METHODS as ORDER_METHODS
from interlingua.server.migration.order import backfill_order, kmeans_centre_distance


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    out: np.ndarray = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


# -- ScoreCalibration ----------------------------------------------------------------------------


def test_apply_is_affine_plus_the_query_level() -> None:
    rng = np.random.default_rng(0)
    D = -np.sort(-rng.random((5, 12)), axis=1)
    c = ScoreCalibration(0.4, 0.8, 10, "test", level=-0.3, depth=10)
    ref = 0.4 * D + 0.8 - 0.3 * D[:, :10].mean(1, keepdims=True)
    out = c.apply(D)
    assert out.dtype == np.float32 and out.shape == D.shape
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    np.testing.assert_allclose(ScoreCalibration(2.0, 1.0, 0, "g").apply(D), 2 * D + 1, rtol=1e-6)
    padded = D.copy()
    padded[0, 3:] = -np.finfo(np.float32).max  # FAISS padding: left out of the level, stays finite
    out = c.apply(padded)
    assert np.isfinite(out).all()
    assert out[0, 0] == pytest.approx(0.4 * D[0, 0] + 0.8 - 0.3 * D[0, :3].mean(), rel=1e-6)


def test_calibration_round_trips_and_checks_its_fields() -> None:
    c = ScoreCalibration(0.4, 0.8, 10, "level over ...", level=-0.3, depth=7)
    assert ScoreCalibration.from_dict(c.to_dict()) == c
    assert ScoreCalibration.from_dict({"scale": 2, "bias": 1}) == ScoreCalibration(2.0, 1.0, 0, "")
    assert IDENTITY.apply(np.ones((1, 2))).tolist() == [[1.0, 1.0]]
    for scale, bias, depth in ((0.0, 0.0, 10), (float("nan"), 0.0, 10), (1.0, float("inf"), 10), (1.0, 0.0, 0)):
        with pytest.raises(ValueError):
            ScoreCalibration(scale, bias, 0, "", depth=depth)


def test_candidate_scores_match_brute_force() -> None:
    rng = np.random.default_rng(1)
    xq_new, xq_old, xb_new, xb_old = unit(rng, 20, 8), unit(rng, 20, 6), unit(rng, 50, 8), unit(rng, 50, 6)
    S_old, S_new, rows = candidate_scores(xq_new, xq_old, xb_new, xb_old, k=5)
    full_old, full_new = xq_old @ xb_old.T, xq_new @ xb_new.T
    for i in range(20):
        want = set(np.argsort(-full_new[i])[:5]) | set(np.argsort(-full_old[i])[:5])
        got = rows[i][rows[i] >= 0]
        assert set(got) == want and len(got) == len(want)
        np.testing.assert_allclose(S_old[i][rows[i] >= 0], full_old[i, got], atol=1e-6)
        np.testing.assert_allclose(S_new[i][rows[i] >= 0], full_new[i, got], atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_recovers_a_known_scale(method: str) -> None:
    """Old scores are exactly half the new ones (the old vectors are the new ones halved): scale 2, bias 0."""
    rng = np.random.default_rng(2)
    xq, xb = unit(rng, 200, 16), unit(rng, 400, 16)
    c = fit_score_calibration(xq, xq, xb, 0.5 * xb, metric_new="ip", metric_old="ip", method=method)
    assert c.scale == pytest.approx(2.0, rel=1e-4) and c.bias == pytest.approx(0.0, abs=1e-4)
    assert c.level == pytest.approx(0.0, abs=1e-4) and c.n > 0


@pytest.mark.parametrize("method", METHODS)
def test_opposite_metrics_flip_the_sign(method: str) -> None:
    """New l2 (squared distance of unit rows = 2 - 2·cosine) against old cosine: scale -2, bias 2."""
    rng = np.random.default_rng(3)
    xq, xb = unit(rng, 200, 16), unit(rng, 400, 16)
    c = fit_score_calibration(xq, xq, xb, xb, metric_new="l2", metric_old="cosine", method=method)
    assert c.scale == pytest.approx(-2.0, rel=1e-3) and c.bias == pytest.approx(2.0, abs=1e-3)


def test_the_level_method_removes_a_per_query_offset() -> None:
    """Each query's old scores carry its own offset (a constant shift of T(q) along a constant gallery axis):
    the level method takes it out, a global map cannot."""
    rng = np.random.default_rng(4)
    nq, nb, d = 300, 600, 16
    xq, xb = unit(rng, nq, d), unit(rng, nb, d)
    shift = rng.uniform(-0.5, 0.5, nq).astype(np.float32)
    xq_old = np.hstack([xq, shift[:, None]])  # old score = new score + shift_q (the old docs have a 1 appended)
    xb_old = np.hstack([xb, np.ones((nb, 1), np.float32)])
    c = fit_score_calibration(xq, xq_old, xb, xb_old, metric_new="ip", metric_old="ip", method="level")
    D_old = -np.sort(-(xq_old @ xb_old.T), axis=1)[:, :10]
    D_new = -np.sort(-(xq @ xb.T), axis=1)[:, :10]
    g = fit_score_calibration(xq, xq_old, xb, xb_old, metric_new="ip", metric_old="ip", method="moments")
    err_level, err_global = np.abs(c.apply(D_old) - D_new).mean(), np.abs(g.apply(D_old) - D_new).mean()
    assert c.level < -0.5 and err_level < 0.03 and err_global > 3 * err_level  # measured 0.022 and 0.074


def test_nothing_to_fit_on_gives_the_identity() -> None:
    z = np.zeros((0, 4), np.float32)
    assert fit_score_calibration(z, z, z, z).source.startswith("identity")
    x = np.ones((5, 4), np.float32)
    assert fit_score_calibration(x, x, x, x, metric_new="ip", metric_old="ip", method="lsq").scale == 1.0
    with pytest.raises(ValueError, match="method"):
        fit_score_calibration(x, x, x, x, method="nope")
    with pytest.raises(ValueError, match="unpaired"):
        fit_score_calibration(x, x[:3], x, x)


# -- merge_topk ----------------------------------------------------------------------------------


def reference_merge(
    D_old: np.ndarray, I_old: np.ndarray, D_new: np.ndarray, I_new: np.ndarray, k: int, higher: bool
) -> list[list[str]]:
    out = []
    for i in range(len(I_old)):
        best: dict[str, tuple[float, int]] = {}
        for j, (s, p) in enumerate(zip(D_new[i], I_new[i], strict=True)):
            if p != "":
                best[p] = (s, j)
        for j, (s, p) in enumerate(zip(D_old[i], I_old[i], strict=True)):
            if p != "" and p not in best:
                best[p] = (s, 1000 + j)
        ranked = sorted(best, key=lambda p: ((-best[p][0] if higher else best[p][0]), best[p][1]))[:k]
        out.append(ranked + [""] * (k - len(ranked)))
    return out


@pytest.mark.parametrize("higher", [True, False])
def test_merge_matches_a_python_reference(higher: bool) -> None:
    rng = np.random.default_rng(5)
    nq, k1, k2, k = 40, 6, 4, 7
    pool = np.array([f"p{j}" for j in range(15)], dtype=object)
    I_old, I_new = rng.choice(pool, (nq, k1)), rng.choice(pool, (nq, k2))
    for I in (I_old, I_new):  # unique within a list, some padding
        for row in I:
            row[:] = rng.choice(pool, len(row), replace=False)
        I[rng.random(I.shape) < 0.15] = ""
    D_old, D_new = np.round(rng.random((nq, k1)), 2), np.round(rng.random((nq, k2)), 2)  # rounded: ties happen
    D, I = merge_topk(D_old, I_old, D_new, I_new, k, higher_is_better=higher)
    assert D.shape == I.shape == (nq, k) and D.dtype == np.float32
    assert I.tolist() == reference_merge(D_old, I_old, D_new, I_new, k, higher)
    worst = -np.inf if higher else np.inf
    assert (D[I == ""] == worst).all()
    real = np.where(I == "", np.nan, D)
    steps = np.diff(real, axis=1)
    assert np.all(np.isnan(steps) | ((steps <= 0) if higher else (steps >= 0)))


def test_merge_keeps_the_new_entry_of_a_shared_id_and_checks_shapes() -> None:
    I_old, I_new = np.array([["a", "b"]], dtype=object), np.array([["b", ""]], dtype=object)
    D, I = merge_topk(np.array([[0.9, 0.8]]), I_old, np.array([[0.1, 0.0]]), I_new, 3)
    assert I.tolist() == [["a", "b", ""]] and D[0, :2].tolist() == pytest.approx([0.9, 0.1])
    with pytest.raises(ValueError, match="shapes"):
        merge_topk(np.zeros((1, 3)), I_old, np.zeros((1, 2)), I_new, 2)


# -- backfill_order ------------------------------------------------------------------------------


def clustered(rng: np.random.Generator, nb: int = 400, d: int = 16, nc: int = 8) -> np.ndarray:
    centres = unit(rng, nc, d)
    x = centres[rng.integers(0, nc, nb)] + 0.1 * rng.standard_normal((nb, d)).astype(np.float32)
    out: np.ndarray = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


@pytest.mark.parametrize("method", ORDER_METHODS)
def test_every_order_is_a_seeded_ranking(method: str) -> None:
    xb = clustered(np.random.default_rng(6))
    rows, scores = backfill_order(xb, 50, method=method, seed=3)
    again, _ = backfill_order(xb, 50, method=method, seed=3)
    assert rows.dtype == np.int64 and scores.dtype == np.float32 and len(rows) == 50 == len(set(rows.tolist()))
    assert rows.tolist() == again.tolist() and np.all(np.diff(scores) <= 0)
    everything, _ = backfill_order(xb, 10**6, method=method, seed=3)
    assert sorted(everything.tolist()) == list(range(len(xb))) and everything[:50].tolist() == rows.tolist()


def test_centre_distance_puts_the_outliers_first() -> None:
    rng = np.random.default_rng(7)
    xb = clustered(rng, nc=40)  # more clusters than centroids (sqrt(400)): none is spare for an outlier
    xb[:, 12:] = 0
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xb[[11, 222], :12] = 0  # orthogonal to every cluster
    xb[[11, 222], 12:] = unit(rng, 2, 4)
    rows, _ = backfill_order(xb, 2, method="centre_distance")
    assert set(rows.tolist()) == {11, 222}
    assert backfill_order(xb, 2, method="centre_nearest")[0][0] not in (11, 222)
    dist = kmeans_centre_distance(xb)
    assert dist.shape == (len(xb),) and dist.min() >= -1e-5 and dist[[11, 222]].min() > np.sort(dist)[-3]


def test_hubness_and_crowding_match_brute_force() -> None:
    xb = clustered(np.random.default_rng(8), nb=300)
    S = xb @ xb.T
    np.fill_diagonal(S, -np.inf)
    top = np.argsort(-S, axis=1)[:, : order_mod.HUB_K]
    counts = np.bincount(top.ravel(), minlength=len(xb))
    _, hub_scores = backfill_order(xb, len(xb), method="hubness")
    np.testing.assert_allclose(np.sort(hub_scores)[::-1], np.sort(counts)[::-1], atol=1e-3)
    rows, crowd = backfill_order(xb, len(xb), method="crowding")
    np.testing.assert_allclose(crowd, S.max(1)[rows], rtol=1e-5)


def test_large_galleries_take_the_sampled_ivf_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(order_mod, "EXACT_LIMIT", 100)
    monkeypatch.setattr(order_mod, "HUB_QUERIES", 150)
    xb = clustered(np.random.default_rng(9))
    for method in ("hubness", "crowding"):
        rows, scores = backfill_order(xb, len(xb), method=method)
        assert sorted(rows.tolist()) == list(range(len(xb)))
    assert np.isfinite(scores[:150]).all()  # crowding: the sampled points rank first


def test_order_refuses_bad_arguments() -> None:
    xb = clustered(np.random.default_rng(10))
    with pytest.raises(ValueError, match="method"):
        backfill_order(xb, 3, method="nope")
    with pytest.raises(ValueError, match="metric"):
        backfill_order(xb, 3, metric="hamming")
    with pytest.raises(ValueError, match="n must"):
        backfill_order(xb, -1)
    assert backfill_order(xb[:0], 3)[0].shape == (0,)
    assert backfill_order(xb, 5, metric="l2")[0].shape == (5,)
