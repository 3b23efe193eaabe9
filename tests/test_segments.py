"""``Segments`` (``server/segments.py``) on its own, against brute force.

Sealed and fresh segments, dead labels in both, before and after a merge: an exact index must
return the true k nearest live labels, compared tie-aware as FAISS's
``contrib/evaluation.check_ref_knn_with_draws`` does (the data holds exact duplicates, so
several labels share a distance and any of them may fill the last places); an HNSW index is
scored by recall. Labels past the live count come back as -1 with the worst score.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_data, recall_at

from interlingua.server.index_spec import IndexSpec
from interlingua.server.segments import Segments

D, K = 24, 10


def reference(xb: np.ndarray, alive: np.ndarray, xq: np.ndarray, metric: str) -> np.ndarray:
    """Scores of every query against every label (nq, nlabels) in float64, dead labels the worst."""
    xb64, xq64 = xb.astype(np.float64), xq.astype(np.float64)
    if metric == "l2":
        S = (xq64**2).sum(1)[:, None] - 2 * xq64 @ xb64.T + (xb64**2).sum(1)[None, :]
        S[:, ~alive] = np.inf
    else:
        S = xq64 @ xb64.T
        S[:, ~alive] = -np.inf
    return S


def check_knn_with_draws(S: np.ndarray, Dnew: np.ndarray, Inew: np.ndarray, largest: bool) -> None:
    """Tie-aware: the k scores equal the k best reference scores, and each returned label has the
    score it was returned with, so any labels tied at a distance may stand for one another."""
    k = Dnew.shape[1]
    if S.shape[1] < k:  # fewer labels than k: the missing places hold the worst score
        S = np.hstack([S, np.full((len(S), k - S.shape[1]), -np.inf if largest else np.inf)])
    Dref = -np.sort(-S, axis=1)[:, :k] if largest else np.sort(S, axis=1)[:, :k]
    np.testing.assert_allclose(Dnew, Dref, rtol=1e-4, atol=1e-4)
    for i in range(len(S)):
        found = Inew[i][Inew[i] >= 0]
        assert len(set(found.tolist())) == len(found), f"query {i}: a label returned twice"
        assert (Inew[i] < 0).sum() == np.isinf(Dref[i]).sum(), f"query {i}: -1 only where no live label is left"
        np.testing.assert_allclose(S[i, found], Dnew[i, : len(found)], rtol=1e-4, atol=1e-4)


def recall(S: np.ndarray, Inew: np.ndarray, largest: bool) -> float:
    return recall_at(Inew, np.argsort(-S if largest else S, axis=1, kind="stable"))


def world(metric: str) -> tuple[np.ndarray, np.ndarray]:
    """900 labels and 40 queries, with exact ties: labels 300..349 repeat 0..49 (both sealed),
    800..899 repeat 200..299 (fresh against sealed), and queries 0..9 sit next to labels 0..9."""
    xb, xq = make_data(900, D, seed=21), make_data(40, D, seed=22)
    xb[300:350], xb[800:] = xb[:50], xb[200:300]
    xq[:10] = xb[:10] + 0.01 * xq[:10]
    xq[10:20] = xb[200:210] + 0.01 * xq[10:20]
    if metric == "ip":
        xb /= np.linalg.norm(xb, axis=1, keepdims=True)  # as the service stores cosine vectors
        xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    return xb, xq


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("spec", ["Flat", "HNSW16"])
def test_segments_against_brute_force(spec: str, metric: str) -> None:
    xb, xq = world(metric)
    seg = Segments(IndexSpec.parse(spec, D, metric), 0)
    largest = metric != "l2"
    alive = np.zeros(len(xb), bool)

    def check(what: str) -> None:
        Dn, In, _ = seg.search(xq, K, ef_search=256 if spec != "Flat" else None)
        S = reference(xb, alive, xq, metric)
        if spec == "Flat":
            check_knn_with_draws(S, Dn, In, largest)
        else:
            assert recall(S, In, largest) > 0.95, what

    seg.append(0, [f"p{i}" for i in range(600)], xb[:600], [], seq=1)
    alive[:600] = True
    seg.kill(list(range(0, 600, 7)), seq=2)
    alive[0:600:7] = False
    check("fresh only")
    assert seg.merge() is not None and seg.snapshot.nsealed == 600
    check("sealed")
    # overwrites: p0..p99 get new labels 600..699 (their old ones die), then new points and ties
    seg.append(600, [f"p{i}" for i in range(100)], xb[600:700], [lab for lab in range(100) if alive[lab]], seq=3)
    alive[:100], alive[600:700] = False, True
    seg.append(700, [f"q{i}" for i in range(200)], xb[700:900], [], seq=4)
    alive[700:900] = True
    seg.kill([650, 720, 850], seq=5)
    alive[[650, 720, 850]] = False
    check("sealed + fresh, dead labels in both")
    assert seg.merge() is not None
    check("merged again")
    ids = seg.snapshot.ids
    assert ids[600] == "p0" and ids[700] == "q0"  # label -> id follows the overwrite


def test_fewer_live_labels_than_k_pad_with_minus_one() -> None:
    xb, xq = world("l2")
    seg = Segments(IndexSpec.parse("Flat", D, "l2"), 0)
    seg.append(0, [f"p{i}" for i in range(6)], xb[:6], [], seq=1)
    seg.kill([1], seq=2)
    seg.merge()
    Dn, In, _ = seg.search(xq[:3], 8)
    assert (In[:, 5:] == -1).all() and np.isinf(Dn[:, 5:]).all()
    alive = np.zeros(6, bool)
    alive[[0, 2, 3, 4, 5]] = True
    check_knn_with_draws(reference(xb[:6], alive, xq[:3], "l2"), Dn, In, largest=False)
