"""Retrieval reports: a hand-checked 4-item case, a brute-force reference on random data, every error message."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from interlingua.server.transforms.base import AffineTransform, Calibration
from interlingua.server.transforms.basis import BasisTransform, clip_spectral, complete_isometry
from interlingua.server.transforms.evaluate import (
    evaluate,
    hits,
    label_free_report,
    label_metrics,
    neighbourhood_agreement,
    ranking_metrics,
    split_calibration,
    us_per_query,
)

C30, S30 = np.cos(np.pi / 6), np.sin(np.pi / 6)
B = np.array([[1, 0], [C30, S30], [0, 1], [-1, 0]], dtype=np.float32)  # gallery at 0°, 30°, 90°, 180°


def identity(d: int) -> AffineTransform:
    return AffineTransform({"query": np.eye(d)}, {"query": np.zeros(d)}, {"kind": "affine"})


def hand_case() -> dict[str, np.ndarray]:
    """home: q0 -> b0 at rank 1, q1 -> b1 at rank 2, q2 -> b2 at rank 1, q3 -> b3 at rank 3 (k = 2: a miss).
    new: the queries are b1, b1, b2, b3; the new gallery has rows 1 and 2 swapped."""
    return {
        "xq_home": np.array([[1, 0.1], [1, 0], [0, 1], [-0.1, 1]], dtype=np.float32),
        "xb_home": B,
        "xq_new": B[[1, 1, 2, 3]],
        "xb_new": B[[0, 2, 1, 3]],
    }


def test_evaluate_on_a_hand_checked_case() -> None:
    r = evaluate(identity(2), k=2, **hand_case())
    # home->home: ranks 1, 2, 1, miss
    assert (r["home_r1"], r["home_r2"], r["home_mrr2"]) == pytest.approx((0.5, 0.75, 0.625))
    # new->new: top-2 ids [2,0], [2,0], [1,2], [3,1] -> ranks 2, miss, 2, 1
    assert (r["new_r1"], r["new_r2"], r["new_mrr2"]) == pytest.approx((0.25, 0.75, 0.5))
    # T(new)->home (identity): top-2 ids [1,0], [1,0], [2,1], [3,2] -> ranks 2, 1, 1, 1
    assert (r["transformed_r1"], r["transformed_r2"], r["transformed_mrr2"]) == pytest.approx((0.75, 1.0, 0.875))
    assert r["raw_r1"] == r["transformed_r1"] and r["raw_mrr2"] == r["transformed_mrr2"]
    assert r["ecc_margin"] == pytest.approx(0.25)  # 1.0 - 0.75
    assert r["retention"] == pytest.approx(1 / 0.75)
    assert r["neg_flip"] == pytest.approx(0.25)  # q0: right before, wrong after
    assert r["nbr_agreement"] == pytest.approx(5 / 8)  # overlaps 1, 1, 2, 1 of 2
    assert r["ortho_error"] == 0.0
    assert r["us_per_query"] > 0
    assert (r["k"], r["nq"], r["nb"]) == (2, 4, 4)
    json.dumps(r)


def test_ranking_metrics_and_hits_with_several_relevant_items() -> None:
    I = np.array([[0, 1, 2], [2, 0, 1]])
    H = hits(I, [np.array([0, 1]), np.array([1])])
    np.testing.assert_array_equal(H, [[True, True, False], [False, False, True]])
    m = ranking_metrics(H, np.array([2.0, 1.0]), 3)
    assert m == pytest.approx({"r1": (0.5 + 0) / 2, "r3": (1 + 1) / 2, "mrr3": (1 + 1 / 3) / 2})
    np.testing.assert_array_equal(hits(I, None), [[True, False, False], [False, False, True]])


def test_neighbourhood_agreement() -> None:
    assert neighbourhood_agreement(np.array([[1, 2], [3, 4]]), np.array([[2, 1], [3, 5]])) == pytest.approx(0.75)


def test_label_metrics_by_hand() -> None:
    xb = np.array([[3, 0], [2, 0], [1, 0], [0, 0]], dtype=np.float32)
    labels = np.array([1, 0, 1, 0])
    xq = np.array([[1, 0], [-1, 0], [1, 0]], dtype=np.float32)
    m = label_metrics(xq, xb, np.array([1, 1, 7]), labels, "ip")  # label 7 is not in the gallery: skipped
    # q0 ranks 0,1,2,3: relevant at 1, 3 -> AP (1 + 2/3)/2; q1 ranks 3,2,1,0: relevant at 2, 4 -> AP 1/2
    assert m == pytest.approx({"cmc1": 0.5, "cmc5": 1.0, "map": ((1 + 2 / 3) / 2 + 0.5) / 2})
    m = label_metrics(np.array([[3.1, 0]], dtype=np.float32), xb, np.array([1]), labels, "l2")
    assert m == pytest.approx({"cmc1": 1.0, "cmc5": 1.0, "map": (1 + 2 / 3) / 2})


def brute_force(xq: np.ndarray, xb: np.ndarray, k: int) -> np.ndarray:
    xq = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    xb = xb / np.linalg.norm(xb, axis=1, keepdims=True)
    return np.argsort(-(xq @ xb.T), axis=1, kind="stable")


def test_evaluate_matches_a_brute_force_reference() -> None:
    rng = np.random.default_rng(0)
    nq, nb, d, k = 30, 50, 6, 5
    xq_new, xb_new = rng.standard_normal((nq, d)), rng.standard_normal((nb, d))
    W = rng.standard_normal((d, d))
    xq_home, xb_home = xq_new @ W + 0.3 * rng.standard_normal((nq, d)), xb_new @ W
    relevant = [rng.choice(nb, size=rng.integers(1, 4), replace=False) for _ in range(nq)]
    q_lab, b_lab = rng.integers(0, 5, nq), rng.integers(0, 5, nb)
    t = AffineTransform({"query": W}, {"query": np.zeros(d)}, {"kind": "affine"})
    data = {"xq_new": xq_new, "xq_home": xq_home, "xb_new": xb_new, "xb_home": xb_home}
    r = evaluate(t, **data, relevant=relevant, query_labels=q_lab, gallery_labels=b_lab, k=k)
    modes = {"home": (xq_home, xb_home), "new": (xq_new, xb_new), "transformed": (xq_new @ W, xb_home)}
    for mode, (q, b) in modes.items():
        order = brute_force(q, b, nb)
        recall1 = np.mean([np.isin(o[:1], rel).sum() / len(rel) for o, rel in zip(order, relevant, strict=True)])
        recallk = np.mean([np.isin(o[:k], rel).sum() / len(rel) for o, rel in zip(order, relevant, strict=True)])
        first = [np.flatnonzero(np.isin(o[:k], rel)) for o, rel in zip(order, relevant, strict=True)]
        mrr = np.mean([1 / (f[0] + 1) if len(f) else 0.0 for f in first])
        assert r[f"{mode}_r1"] == pytest.approx(recall1)
        assert r[f"{mode}_r{k}"] == pytest.approx(recallk)
        assert r[f"{mode}_mrr{k}"] == pytest.approx(mrr)
        aps, top1 = [], []
        for o, lab in zip(order, q_lab, strict=True):
            rel = b_lab[o] == lab
            if rel.any():
                pos = np.flatnonzero(rel) + 1
                aps.append(np.mean(np.arange(1, len(pos) + 1) / pos))
                top1.append(rel[0])
        assert r[f"{mode}_map"] == pytest.approx(np.mean(aps))
        assert r[f"{mode}_cmc1"] == pytest.approx(np.mean(top1))
    json.dumps(r)


def test_evaluate_pads_the_gallery_for_a_basis_transform() -> None:
    rng = np.random.default_rng(1)
    d_new, d_home, n = 6, 4, 40
    A, _, _ = clip_spectral(rng.standard_normal((d_new, d_home)))
    T = complete_isometry(A)
    basis = BasisTransform({"query": T}, {"query": np.zeros(T.shape[1])}, {"kind": "basis", "d_home": d_home})
    prefix = AffineTransform({"query": A}, {"query": np.zeros(d_home)}, {"kind": "affine"})
    data = {"xq_new": rng.standard_normal((n, d_new)), "xb_new": rng.standard_normal((n, d_new))}
    data |= {"xq_home": rng.standard_normal((n, d_home)), "xb_home": rng.standard_normal((n, d_home))}
    rb, rp = evaluate(basis, **data), evaluate(prefix, **data)
    for key in ("transformed_r1", "transformed_r10", "transformed_mrr10", "nbr_agreement", "neg_flip"):
        assert rb[key] == pytest.approx(rp[key])  # [xb_home, 0] scores as the prefix x A does
    assert rb["raw_r1"] is None and rb["raw_r10"] is None  # d_new != d_home
    assert rb["ortho_error"] < 1e-5  # T Tᵀ = I


def test_evaluate_reuses_the_baselines_from_a_cache() -> None:
    cache: dict[str, Any] = {}
    first = evaluate(identity(2), k=2, cache=cache, **hand_case())
    assert set(cache) == {"home:cosine:2", "new:cosine:2", "raw:cosine:2"}
    again = evaluate(identity(2), k=2, cache=cache, **hand_case())
    assert {k: v for k, v in first.items() if k != "us_per_query"} == {
        k: v for k, v in again.items() if k != "us_per_query"
    }


def test_us_per_query_tiles_a_small_batch() -> None:
    assert us_per_query(identity(2), B, "cosine", n=64, repeats=2) > 0


def test_label_free_report_and_split() -> None:
    rng = np.random.default_rng(2)
    Q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    xd, xq = rng.standard_normal((60, 8)), rng.standard_normal((40, 8))
    cal = Calibration(xd, xd @ Q, xq, xq @ Q, np.arange(60), np.arange(40))
    rest, held = split_calibration(cal, 0.25, seed=5)
    assert (len(rest.doc_new), len(held.doc_new), len(rest.query_new), len(held.query_new)) == (45, 15, 30, 10)
    assert held.doc_labels is not None and rest.doc_labels is not None
    assert sorted([*held.doc_labels, *rest.doc_labels]) == list(range(60))
    np.testing.assert_array_equal(held.doc_new, xd[held.doc_labels])
    again, _ = split_calibration(cal, 0.25, seed=5)
    np.testing.assert_array_equal(again.doc_new, rest.doc_new)
    t = AffineTransform({"query": Q}, {"query": np.zeros(8)}, {"kind": "procrustes"})
    r = label_free_report(t, held, "cosine", k=5)
    assert r["label_free"] is True and (r["doc_n"], r["query_n"]) == (15, 10)
    assert r["doc_xid_r1"] == 1.0 and r["query_xid_r5"] == 1.0 and r["query_xid_mrr5"] == 1.0
    assert r["doc_nbr_agreement"] == pytest.approx(1.0)  # a rotation keeps every neighbourhood
    json.dumps(r)
    empty = label_free_report(t, Calibration(xd, xd, xq[:0], xq[:0]), "ip")
    assert empty["query_n"] == 0 and "query_xid_r1" not in empty
    with pytest.raises(ValueError, match=r"home_metric must be one of cosine, ip, l2, got 'cos'"):
        label_free_report(t, held, "cos")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"home_metric": "dot"}, r"home_metric must be one of cosine, ip, l2, got 'dot'"),
        ({"k": 0}, r"k must be an integer >= 1, got 0"),
        ({"xq_new": np.ones((4, 3))}, r"xq_new must be a 2-d array of shape \(n, 2\), got \(4, 3\)"),
        ({"xb_home": np.ones(4)}, r"xb_home must be a 2-d array of shape \(n, 2\), got \(4,\)"),
        ({"xq_home": np.ones((3, 2))}, r"row counts differ: xq_new 4 vs xq_home 3, xb_new 4 vs xb_home 4"),
        ({"xb_new": B[:3], "xb_home": B[:3]}, r"relevant=None means query i's relevant item is gallery row i, so nq"),
        ({"relevant": [np.array([0])]}, r"relevant has 1 entries for 4 queries"),
        ({"relevant": [[0], [1], [], [3]]}, r"relevant\[2\] must be a non-empty array of gallery rows in \[0, 4\)"),
        ({"relevant": [[0], [1], [2], [4]]}, r"relevant\[3\] must be a non-empty array of gallery rows in \[0, 4\)"),
        ({"query_labels": np.zeros(4)}, r"query_labels and gallery_labels must be given together"),
        ({"query_labels": np.zeros(3), "gallery_labels": np.zeros(4)}, r"labels must have 4 \(query\) and 4"),
    ],
)
def test_evaluate_errors(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate(identity(2), **{"k": 2, **hand_case(), **change})


def test_evaluate_rejects_a_transform_that_misses_the_home_dim() -> None:
    t = AffineTransform({"query": np.eye(2, 3)}, {"query": np.zeros(3)}, {"kind": "affine"})
    with pytest.raises(ValueError, match=r"the transform maps to d_out=3 but the home gallery has d=2"):
        evaluate(t, **hand_case())
