"""The retrieval-task training: the task loss against a numpy reference, the training tensors (links,
FAISS-mined hard negatives, false-negative masks), the relevance-aware held-out split, query offsets
chosen by validation, and the point of it all: with training relevance a kind beats the same kind
without it on a seeded task where identification and retrieval disagree. No data from ../shared.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from interlingua.server.transforms.base import AffineTransform, Calibration, apply_to_home
from interlingua.server.transforms.evaluate import split_calibration
from interlingua.server.transforms.fit import fit_transform, heldout_task_report
from interlingua.server.transforms.lambda_orthogonal import fit_lambda_orthogonal
from interlingua.server.transforms.offsets import choose_offsets, shifted, task_recall
from interlingua.server.transforms.procrustes import fit_procrustes, orthogonality_error
from interlingua.server.transforms.residual_mlp import build_module, fit_residual_mlp, to_transform
from interlingua.server.transforms.train import (
    OrthogonalMap,
    TaskData,
    TaskLoss,
    info_nce,
    mine_hard_negatives,
    torch_threads,
)

D = 16
FAST = {"epochs": 20, "batch_size": 64, "lr": 3e-3, "threads": 1, "hard_negatives": 2}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def unit(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    return out


def rotation(rng: np.random.Generator, d: int = D) -> np.ndarray:
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return Q


def disagreeing_task(n: int, seed: int, agree: bool = False) -> Calibration:
    """Docs: home = new @ R. Queries: new query i = doc i's new vector @ M (the new model's queries sit in
    a rotated frame), home query i = doc i's home vector @ P. Identification (new -> home of the same item,
    one shared map) wants R for docs and Mᵀ R P for queries; the task (new query -> its home doc) wants
    Mᵀ R. Query i's relevant doc is doc i. ``agree``: P = I, the old model's queries sit by their docs, so
    identification and the task agree (and home->home retrieval works)."""
    maps = np.random.default_rng(99)  # the models are fixed; ``seed`` draws the items
    R, M, P = rotation(maps), rotation(maps), rotation(maps)
    if agree:
        P = np.eye(D)
    rng = np.random.default_rng(seed)
    dn = unit(rng.normal(size=(n, D)))
    dh = unit(dn @ R + 0.05 * rng.normal(size=(n, D)))
    qn = unit(dn @ M + 0.3 * rng.normal(size=(n, D)))
    qh = unit(dh @ P + 0.3 * rng.normal(size=(n, D)))
    return Calibration(dn, dh, qn, qh, query_relevant=tuple(np.array([i]) for i in range(n)))


def reference_info_nce(pred: np.ndarray, target: np.ndarray, hard: np.ndarray, mask: np.ndarray, tau: float) -> float:
    p, t, h = (a / np.linalg.norm(a, axis=-1, keepdims=True) for a in (pred, target, hard))
    logits = np.concatenate([p @ t.T, np.einsum("bd,bhd->bh", p, h)], axis=1) / tau
    logits[mask] = -np.inf
    top = logits.max(1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(1))
    return float(np.mean(lse - np.diagonal(logits[:, : len(p)])))


# ---- the loss --------------------------------------------------------------------------------------------------


def test_info_nce_with_hard_negatives_and_mask_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    b, h = 6, 3
    pred, target, hard = rng.normal(size=(b, D)), rng.normal(size=(b, D)), rng.normal(size=(b, h, D))
    mask = np.zeros((b, b + h), dtype=bool)
    mask[0, 3] = mask[2, b + 1] = True  # another positive of row 0 in the batch; a padded negative of row 2
    got = info_nce(*(torch.tensor(a, dtype=torch.float64) for a in (pred, target)), 0.07,
                   torch.tensor(hard, dtype=torch.float64), torch.tensor(mask))  # fmt: skip
    assert float(got) == pytest.approx(reference_info_nce(pred, target, hard, mask, 0.07), rel=1e-10)
    plain = info_nce(torch.tensor(pred), torch.tensor(target), 0.07)
    no_mask = np.zeros((b, b), dtype=bool)
    assert float(plain) == pytest.approx(reference_info_nce(pred, target, hard[:, :0], no_mask, 0.07), rel=1e-6)


def test_task_loss_named_terms_and_weights() -> None:
    rng = np.random.default_rng(1)
    q, yq, yd = (torch.tensor(rng.normal(size=(5, D)), dtype=torch.float32) for _ in range(3))
    hard = torch.tensor(rng.normal(size=(5, 2, D)), dtype=torch.float32)
    parts = ((q, yq, None), (q, yd, None), (q, yd, hard, None))
    terms = TaskLoss(0.1, w_task=2.0, w_id=0.5)(*parts)
    assert list(terms) == ["task", "id_doc", "id_query", "total"]
    assert float(terms["task"]) == pytest.approx(float(info_nce(q, yd, 0.1, hard)))
    assert float(terms["id_query"]) == pytest.approx(float(info_nce(q, yq, 0.1)))
    expected = 2.0 * terms["task"] + 0.5 * (terms["id_doc"] + terms["id_query"]) / 2
    assert float(terms["total"]) == pytest.approx(float(expected))
    only_task = TaskLoss(0.1, w_task=1.0, w_id=0.0)(None, None, parts[2])
    assert float(only_task["total"]) == pytest.approx(float(terms["task"])) and float(only_task["id_doc"]) == 0.0


# ---- training tensors ------------------------------------------------------------------------------------------


def test_hard_negatives_are_the_old_models_confusers_minus_the_relevant() -> None:
    rng = np.random.default_rng(2)
    docs = unit(rng.normal(size=(30, D)))
    queries = unit(docs[:5] + 0.01 * rng.normal(size=(5, D)))
    relevant = tuple(np.array([i]) for i in range(5))
    hard = mine_hard_negatives(queries, docs, relevant, 3)
    S = queries @ docs.T
    for i in range(5):
        ranked = [j for j in np.argsort(-S[i]) if j != i]
        assert hard[i].tolist() == ranked[:3]
    assert (mine_hard_negatives(queries, docs[:2], relevant, 3)[0] == [1, -1, -1]).all()  # too few docs: -1 pads


def test_links_and_false_negative_mask() -> None:
    cal = disagreeing_task(8, 0)
    multi = (np.array([0, 1]), np.array([1]), *cal.query_relevant[2:])  # type: ignore[misc]
    cal = Calibration(cal.doc_new, cal.doc_home, cal.query_new, cal.query_home, query_relevant=multi)
    assert cal.links()[:3].tolist() == [[0, 0], [0, 1], [1, 1]]
    data = TaskData.build(cal, hard_negatives=2)
    batch = next(data.batches(64, torch.Generator().manual_seed(0)))
    assert batch.links is not None and batch.mask is not None and batch.hard is not None
    links = batch.links.tolist()
    for i, (qi, _) in enumerate(links):
        for j, (_, dj) in enumerate(links):
            relevant = dj in multi[qi].tolist() and i != j
            assert bool(batch.mask[i, j]) == relevant, (i, j)
        assert not bool(batch.mask[i, len(links) :].any())  # mined negatives are never relevant
    assert np.allclose(data.xq.mean(0).numpy(), 0, atol=1e-6)  # centred by the query mean


def test_split_keeps_each_heldout_querys_relevant_docs() -> None:
    cal = disagreeing_task(50, 0)
    rel = list(cal.query_relevant or ())
    rel[3] = np.array([3, 4])
    cal = Calibration(cal.doc_new, cal.doc_home, cal.query_new, cal.query_home, query_relevant=tuple(rel))
    train, held = split_calibration(cal, 0.2, seed=1)
    assert len(held.query_new) == 10 and held.query_relevant is not None and train.query_relevant is not None
    for i, r in enumerate(held.query_relevant):
        q = int(np.flatnonzero((cal.query_new == held.query_new[i]).all(1))[0])
        np.testing.assert_array_equal(held.doc_new[r], cal.doc_new[np.asarray(cal.query_relevant[q])])  # type: ignore[index]
    for r in train.query_relevant:  # no fitted query points at a held-out doc
        assert all(0 <= j < len(train.doc_new) for j in r)
    assert len(train.doc_new) + len(held.doc_new) == 50


# ---- offsets ---------------------------------------------------------------------------------------------------


def test_shifted_folds_input_and_output_offsets_into_the_biases() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, D)).astype(np.float32)
    din, dout = rng.normal(size=D), rng.normal(size=D)
    affine = AffineTransform({"query": rotation(rng)}, {"query": rng.normal(size=D)}, {"kind": "affine"}, "affine")
    model = build_module(D, D, 8, rotation(rng).astype(np.float32), seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.tensor(rng.normal(scale=0.3, size=p.shape), dtype=torch.float32))
    mlp = to_transform(model, {"query": np.zeros(D, np.float32), "doc": np.zeros(D, np.float32)}, {"hidden": 8})
    for t in (affine, mlp):
        moved = shifted(t, "query", din, dout)
        assert type(moved) is type(t) and moved.kind == t.kind
        np.testing.assert_allclose(moved.apply(x), t.apply(x + din.astype(np.float32)) + dout, atol=1e-4)
        np.testing.assert_array_equal(moved.apply(x, "doc"), t.apply(x, "doc"))  # the doc side is untouched


def test_offsets_chosen_by_the_heldout_task() -> None:
    cal = disagreeing_task(400, 0)
    cal = Calibration(cal.doc_new, cal.doc_home, cal.query_new + 0.5, cal.query_home, query_relevant=cal.query_relevant)
    train, held = split_calibration(cal, 0.25, seed=0)
    t = fit_procrustes(train, task_epochs=0).transform
    best, info = choose_offsets(t, train, held, "cosine")
    table = info["offset_table"]
    assert len(table) == 6 and (table[0]["input"], table[0]["output"]) == ("fitted", "fitted")
    top = max(table, key=lambda r: (r["r10"], r["mrr10"]))
    assert info["offsets"] == {"input": top["input"], "output": top["output"]}
    chosen = task_recall(best, held, "cosine", 10, train.doc_home)
    assert chosen is not None and chosen["r10"] == top["r10"] >= table[0]["r10"]
    no_rel = Calibration(train.doc_new, train.doc_home, train.query_new, train.query_home)
    same, why = choose_offsets(
        t, no_rel, Calibration(held.doc_new, held.doc_home, held.query_new, held.query_home), "cosine"
    )
    assert same is t and "no training relevance" in why["offsets"]


# ---- relevance beats identification where they disagree --------------------------------------------------------


def _task_r10(t: AffineTransform | object, test: Calibration) -> float:
    xq = apply_to_home(t, test.query_new, "cosine")  # type: ignore[arg-type]
    S = xq @ unit(test.doc_home).T
    own = np.diagonal(S)[:, None]
    return float(((own < S).sum(1) < 10).mean())


@pytest.mark.parametrize("kind", ["lambda_orthogonal", "residual_mlp"])
def test_relevance_beats_identification_when_they_disagree(kind: str) -> None:
    cal, test = disagreeing_task(600, 0), disagreeing_task(600, 1)
    blind = Calibration(cal.doc_new, cal.doc_home, cal.query_new, cal.query_home)
    fit = fit_lambda_orthogonal if kind == "lambda_orthogonal" else fit_residual_mlp
    kw = {**FAST, "lam": math.inf} if kind == "lambda_orthogonal" else {**FAST, "hidden": 32}
    with_rel, without = fit(cal, **kw), fit(blind, **kw)  # type: ignore[arg-type]
    good, bad = _task_r10(with_rel.transform, test), _task_r10(without.transform, test)
    assert with_rel.info["relevance"] == 600 and without.info["relevance"] == 0
    assert with_rel.history[-1]["task"] > 0 and without.history[-1]["task"] == 0.0
    assert good > bad + 0.2, (good, bad)  # measured: lambda_orthogonal 0.33 vs 0.005, residual_mlp 0.29 vs 0.003


def test_procrustes_task_refinement_stays_a_scaled_isometry() -> None:
    cal = disagreeing_task(300, 0, agree=True)
    plain = fit_procrustes(cal, task_epochs=0)
    refined = fit_procrustes(cal, task_epochs=10, threads=1)
    assert plain.info["task_epochs"] == 0 and refined.info["task_epochs"] == 10
    t = refined.transform
    assert isinstance(t, AffineTransform)
    W = t.W["query"].astype(np.float64)
    s = np.linalg.norm(W, axis=0).mean()
    assert orthogonality_error(W / s) < 1e-3
    test = disagreeing_task(300, 1, agree=True)
    assert _task_r10(t, test) >= _task_r10(plain.transform, test) - 0.02
    assert not np.allclose(W, plain.transform.W["query"])  # it moved
    with pytest.raises(ValueError, match=r"Q0 must be a 2-d matrix with orthonormal columns or rows"):
        OrthogonalMap(2 * np.eye(4, dtype=np.float32))


def test_report_estimates_retention_without_evaluation_queries() -> None:
    cal = disagreeing_task(400, 0, agree=True)
    result, report = fit_transform("procrustes", cal, {"task_epochs": 0})
    assert report["label_free"] is True
    assert report["estimated_retention"] > 0 and report["heldout_task_r10"] > 0 and report["heldout_home_r10"] > 0
    assert report["estimated_retention"] == pytest.approx(report["heldout_task_r10"] / report["heldout_home_r10"])
    blind = Calibration(cal.doc_new, cal.doc_home, cal.query_new, cal.query_home)
    _, report = fit_transform("procrustes", blind, {})
    assert report["estimated_retention"] is None and report["retention_estimate"].startswith("none:")
    train, held = split_calibration(blind, 0.1)
    assert heldout_task_report(result.transform, train, held, "cosine")["estimated_retention"] is None


def test_validate_calibration_checks_training_relevance() -> None:
    from interlingua.server.transforms.fit import validate_calibration

    cal = disagreeing_task(20, 0)
    rel = list(cal.query_relevant or ())
    base = (cal.doc_new, cal.doc_home, cal.query_new, cal.query_home)
    with pytest.raises(ValueError, match="query_relevant has 19 entries for 20 query pairs"):
        validate_calibration(Calibration(*base, query_relevant=tuple(rel[:19])), "procrustes")
    with pytest.raises(ValueError, match=r"query_relevant\[2\] must list doc-pair rows in \[0, 20\), got \[20\]"):
        validate_calibration(Calibration(*base, query_relevant=(*rel[:2], np.array([20]), *rel[3:])), "procrustes")
    with pytest.raises(ValueError, match=r"query_relevant\[0\] must list doc-pair rows"):
        validate_calibration(Calibration(*base, query_relevant=(np.array([0.5]), *rel[1:])), "procrustes")
    validate_calibration(Calibration(*base, query_relevant=(np.array([], dtype=np.int64), *rel[1:])), "procrustes")


def test_pseudo_relevance_is_the_old_models_top1() -> None:
    from interlingua.server.transforms.fit import validate_config, with_pseudo_relevance

    cal = disagreeing_task(60, 0, agree=True)
    blind = Calibration(cal.doc_new, cal.doc_home, cal.query_new, cal.query_home)
    pseudo = with_pseudo_relevance(blind, "cosine")
    assert pseudo.query_relevant is not None
    S = unit(cal.query_home) @ unit(cal.doc_home).T
    assert [int(r[0]) for r in pseudo.query_relevant] == S.argmax(1).tolist()
    _, report = fit_transform("affine", blind, {"task_epochs": 1})
    assert report["relevance"] == "pseudo" and report["heldout_task_r10"] > 0
    _, report = fit_transform("affine", blind, {"pseudo_relevance": False})
    assert report["relevance"] == "none" and "heldout_task_r10" not in report
    docs_only = Calibration(cal.doc_new, cal.doc_home, cal.doc_new[:0], cal.doc_home[:0])
    assert fit_transform("affine", docs_only, {})[1]["relevance"] == "none"  # no queries: nothing to rank
    with pytest.raises(ValueError, match="pseudo_relevance must be true or false, got 'yes'"):
        validate_config("affine", {"pseudo_relevance": "yes"})


def test_mining_knn_switches_to_ivf_past_its_exact_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from interlingua.server.transforms import mining
    from interlingua.server.transforms.evaluate import knn

    rng = np.random.default_rng(4)
    xb = unit(rng.normal(size=(2000, D)))
    xq = unit(xb[:50] + 0.01 * rng.normal(size=(50, D)))
    exact = mining.mining_knn(xq, xb, 5, "ip")
    np.testing.assert_array_equal(exact, knn(xq, xb, 5, "ip"))
    monkeypatch.setattr(mining, "EXACT_LIMIT", 10)  # force the IVF path
    approx = mining.mining_knn(xq, xb, 5, "ip")
    assert approx.shape == (50, 5) and (approx[:, 0] == np.arange(50)).mean() >= 0.9  # each finds its own doc
