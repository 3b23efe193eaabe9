"""The torch-trained transforms: λ-orthogonal affine map and affine + residual MLP.

Every ValueError message, the loss numerics on hand-checkable inputs, and fits on seeded synthetic
pairs (an anisotropic linear map + translation + a small non-linearity of low-intrinsic-dimension
vectors) without training relevance (identification terms only): training improves on its
Procrustes start, is deterministic under a seed, the λ sweep picks by its held-out table, and the
numpy serve-time forward equals the torch model. The task loss with relevance is
``tests/test_task_loss.py``. Runs on one torch thread; no data from ../shared.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from interlingua.server.transforms import load_transform
from interlingua.server.transforms.base import SIDES, AffineTransform, Calibration, apply_to_home, checksum
from interlingua.server.transforms.lambda_orthogonal import (
    choose_lam,
    fit_lambda_orthogonal,
    identification,
)
from interlingua.server.transforms.procrustes import fit_procrustes
from interlingua.server.transforms.residual_mlp import (
    ResidualMLPTransform,
    build_module,
    fit_residual_mlp,
    to_transform,
)
from interlingua.server.transforms.train import (
    AffineMap,
    InfoNCELoss,
    LambdaOrthogonalityLoss,
    TaskData,
    TaskLoss,
    TrainConfig,
    info_nce,
    lambda_orthogonality,
    orthogonality_gap,
    sup_con,
    torch_threads,
)

D_NEW, D_HOME = 16, 12
FAST: dict[str, Any] = {"epochs": 15, "batch_size": 64, "lr": 3e-3, "threads": 1}  #: ~0.1 s per fit


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def _normalize(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def make_pairs(n: int, seed: int = 0, labels: bool = False) -> Calibration:
    """n doc + n query pairs. new: unit vectors of intrinsic dim 8 around a shared mean (queries shifted);
    home: unit(anisotropic linear map (singular values 1/3..3) + translation + 0.5·tanh² + noise 0.2),
    one map for both sides. A rotation cannot fit it: trained maps retrieve better than Procrustes."""
    gen = np.random.default_rng(1234)  # the map is fixed; ``seed`` draws the items
    basis = gen.normal(size=(8, D_NEW)) / math.sqrt(8)
    mean = gen.normal(size=D_NEW)
    Q, _ = np.linalg.qr(gen.normal(size=(D_NEW, D_NEW)))
    A = Q[:, :D_HOME] * np.geomspace(1 / 3, 3, D_HOME)
    shift = 0.12 * gen.normal(size=D_HOME)
    rng = np.random.default_rng(seed)

    def side(offset: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        z = rng.normal(size=(n, 8))
        x = _normalize(z @ basis + mean + offset)
        h = (x - x.mean(0)) @ A
        h /= np.linalg.norm(h, axis=1).mean()
        y = _normalize(h + shift + 0.5 * np.tanh(3 * h) ** 2 + 0.2 * rng.normal(size=(n, D_HOME)))
        return x, y, (z[:, 0] > 0).astype(np.int64)

    xd, yd, ld = side(0.0)
    xq, yq, lq = side(0.3)
    return Calibration(xd, yd, xq, yq, ld if labels else None, lq if labels else None)


def recall_at_k(xq: np.ndarray, yb: np.ndarray, k: int = 10) -> float:
    """Fraction of rows i whose own yb[i] is among the k cosine neighbours of xq[i] in yb (row-aligned)."""
    S = _normalize(xq) @ _normalize(yb).T
    own = np.diagonal(S)[:, None]
    return float(((own < S).sum(1) < k).mean())


def heldout_recall(t: AffineTransform | ResidualMLPTransform, cal: Calibration) -> float:
    """Recall@10 of T(x_new(i)) finding its own x_home(i) among its side's home items, mean over both sides."""
    return float(
        np.mean(
            [
                recall_at_k(apply_to_home(t, x, "cosine", side), y)
                for side, x, y in (("doc", cal.doc_new, cal.doc_home), ("query", cal.query_new, cal.query_home))
            ]
        )
    )


def procrustes_transform(cal: Calibration) -> AffineTransform:
    t = fit_procrustes(cal, task_epochs=0).transform
    assert isinstance(t, AffineTransform)
    return t


# ---- validation: every ValueError message ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: LambdaOrthogonalityLoss(lam=-1.0), r"lam must be >= 0 or math.inf \(\"inf\" in JSON\), got -1.0"),
        (lambda: LambdaOrthogonalityLoss(lam=math.nan), r"lam must be >= 0 or math.inf \(\"inf\" in JSON\), got nan"),
        (lambda: LambdaOrthogonalityLoss(alpha=0.0), r"alpha must be a finite number > 0, got 0.0"),
        (lambda: LambdaOrthogonalityLoss(alpha=math.inf), r"alpha must be a finite number > 0, got inf"),
        (lambda: InfoNCELoss(temperature=0.0), r"temperature must be a finite number > 0, got 0.0"),
        (lambda: TaskLoss(temperature=-1.0), r"temperature must be a finite number > 0, got -1.0"),
        (lambda: TaskLoss(w_task=0.0, w_id=0.0), r"w_task and w_id must not both be 0"),
        (lambda: TaskLoss(w_id=-1.0), r"w_id must be a finite number >= 0, got -1.0"),
        (lambda: AffineMap(0, 3), r"d_new and d_home must be >= 1, got 0 and 3"),
        (lambda: AffineMap(3, 2, np.zeros((2, 3))), r"W0 must have shape \(3, 2\), got \(2, 3\)"),
        (lambda: TrainConfig(w_task=0.0, w_id=0.0), r"w_task and w_id must not both be 0"),
        (lambda: TrainConfig(temperature=math.nan), r"temperature must be a finite number > 0, got nan"),
        (lambda: TrainConfig(epochs=0), r"epochs must be an integer in \[1, 1000\], got 0"),
        (lambda: TrainConfig(epochs=10_000_000), r"epochs must be an integer in \[1, 1000\], got 10000000"),
        (lambda: TrainConfig(batch_size=1), r"batch_size must be an integer in \[2, 65536\], got 1"),
        (lambda: TrainConfig(hard_negatives=-1), r"hard_negatives must be an integer in \[0, 64\], got -1"),
        (lambda: TrainConfig(lr=0.0), r"lr must be a number in \(0, 1\], got 0.0"),
        (lambda: build_module(4, 4, 0, np.eye(4, dtype=np.float32)), r"hidden must be >= 1, got 0"),
    ],
)
def test_constructor_errors(make: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()  # type: ignore[operator]


def test_forward_shape_errors() -> None:
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"pred \(3, 2\) and target \(2, 2\) differ in shape"):
        InfoNCELoss()(x, torch.zeros(2, 2))


def test_calibration_errors() -> None:
    cal = make_pairs(20)
    empty = np.zeros((0, D_NEW), np.float32)
    with pytest.raises(ValueError, match="calibration has no pairs"):
        TaskData.build(Calibration(empty, empty, empty, empty))
    with pytest.raises(ValueError, match=r"doc pairs are not row-aligned: new \(20, 16\), home \(19, 12\)"):
        TaskData.build(Calibration(cal.doc_new, cal.doc_home[:19], cal.query_new, cal.query_home))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lams": ()}, "lams must not be empty"),
        ({"lams": (0.0, -2.0)}, r"lam must be >= 0 or math.inf \(\"inf\" in JSON\), got -2.0"),
        ({"lam": -1.0}, r"lam must be >= 0 or math.inf \(\"inf\" in JSON\), got -1.0"),
        ({"alpha": -1.0}, r"alpha must be a finite number > 0, got -1.0"),
        ({"holdout": 0.0}, r"holdout must be in \(0, 1\), got 0.0"),
        ({"holdout": 1.0}, r"holdout must be in \(0, 1\), got 1.0"),
        ({"holdout": 0.05}, r"the held-out slice is too small to score: need more than 10 pairs on a side"),
        ({"epochs": 0}, r"epochs must be an integer in \[1, 1000\], got 0"),
        ({"threads": 0}, r"threads must be an integer >= 1, got 0"),
    ],
)
def test_fit_lambda_orthogonal_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit_lambda_orthogonal(make_pairs(100), **{"epochs": 1, **kwargs})


def test_residual_mlp_errors() -> None:
    cal = make_pairs(30)
    with pytest.raises(ValueError, match=r"hidden must be an integer in \[1, 16384\], got 0"):
        fit_residual_mlp(cal, hidden=0)
    with pytest.raises(ValueError, match=r"lam must be >= 0 or math.inf \(\"inf\" in JSON\), got -1.0"):
        fit_residual_mlp(cal, lam=-1.0)
    with pytest.raises(ValueError, match="model has no residual MLP: build it with build_module"):
        to_transform(AffineMap(4, 4), {}, {})
    t = fit_residual_mlp(cal, hidden=8, epochs=1).transform
    assert isinstance(t, ResidualMLPTransform)
    b1 = dict.fromkeys(SIDES, np.zeros(8))
    with pytest.raises(ValueError, match=r"W, W1 and W2 must be 2-d, got \(16,\), \(16, 8\) and \(8, 12\)"):
        ResidualMLPTransform(t.W[:, 0], t.b, t.W1, b1, t.W2, t.b2, {})
    with pytest.raises(ValueError, match=r"b and b1 need one vector per side \('query', 'doc'\), got \['doc'\]"):
        ResidualMLPTransform(t.W, {"doc": t.b["doc"]}, t.W1, b1, t.W2, t.b2, {})
    with pytest.raises(ValueError, match=r"shapes do not chain: W \(16, 12\), W1 \(16, 8\), W2 \(7, 12\)"):
        ResidualMLPTransform(t.W, t.b, t.W1, b1, t.W2[:7], t.b2, {})
    with pytest.raises(ValueError, match=r"x must have shape \(n, 16\), got \(2, 15\)"):
        t.apply(np.zeros((2, 15), np.float32))
    with pytest.raises(ValueError, match="arrays map 16 -> 12, expected 16 -> 13"):
        ResidualMLPTransform.from_arrays(16, 13, t.config, t.arrays())


# ---- numerics of the losses ------------------------------------------------------------------------------------


def test_orthogonality_gap() -> None:
    Q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert float(orthogonality_gap(Q)) < 10 * 8 * torch.finfo(torch.float64).eps
    assert float(orthogonality_gap(Q[:, :5])) < 10 * 8 * torch.finfo(torch.float64).eps  # orthonormal columns
    assert float(orthogonality_gap(2 * torch.eye(3))) == pytest.approx(3 * math.sqrt(3))  # ‖3 I_3‖_F


def test_lambda_orthogonality_numerics() -> None:
    W = 3 * torch.eye(4)  # WᵀW − I = 8 I, gap 16
    off = lambda_orthogonality(W.requires_grad_(), math.inf, 1.0)
    assert float(off) == 0.0 and not off.requires_grad
    W = W.detach()
    assert float(LambdaOrthogonalityLoss(math.inf)(W)) == 0.0
    assert float(lambda_orthogonality(W, 0.0, 1.0)) == pytest.approx(16.0, rel=1e-6)  # gap >> λ: ≈ gap
    assert float(lambda_orthogonality(W, 16.0, 5.0)) == pytest.approx(8.0)  # gap = λ: sigmoid(0) · gap
    assert float(lambda_orthogonality(W, 100.0, 1.0)) < 1e-30  # gap << λ: ≈ 0


def test_lambda_orthogonality_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(6, 4, dtype=torch.float64, generator=gen).requires_grad_()
    lam, alpha = 2.0, 0.7
    LambdaOrthogonalityLoss(lam, alpha)(W).backward()
    with torch.no_grad():
        M = W.T @ W - torch.eye(4, dtype=torch.float64)
        g = torch.linalg.matrix_norm(M)
        sig = torch.sigmoid(alpha * (g - lam))
        expected = (sig + g * alpha * sig * (1 - sig)) * 2 * W @ M / g  # dL/dg · dg/dW
    assert W.grad is not None and torch.allclose(W.grad, expected)


def test_info_nce_by_hand() -> None:
    e = math.e
    eye = torch.eye(2)
    assert float(info_nce(eye, eye, 1.0)) == pytest.approx(math.log(1 + 1 / e))
    pred = torch.tensor([[1.0, 0.0], [2.0, 0.0]])  # cosine: both rows point at target 0
    one_way = (math.log(1 + 1 / e) + math.log(1 + e)) / 2
    assert float(InfoNCELoss(1.0)(pred, eye)) == pytest.approx(one_way)
    # target -> pred: target 0 sees logits [1, 1], target 1 sees [0, 0]: log 2 each
    assert float(InfoNCELoss(1.0, symmetric=True)(pred, eye)) == pytest.approx((one_way + math.log(2)) / 2)
    assert float(info_nce(eye, eye, 0.5)) == pytest.approx(math.log(1 + math.exp(-2)))


def test_sup_con_by_hand() -> None:
    eye = torch.eye(3)
    labels = torch.tensor([0, 0, 1])
    # rows 0, 1: two positives of logits (1, 0) over (1, 0, 0); row 2: one positive
    expected = math.log(math.e + 2) - 2 / 3
    assert float(sup_con(eye, eye, labels, 1.0)) == pytest.approx(expected)
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    distinct = torch.arange(5)
    assert float(sup_con(pred, target, distinct, 0.1)) == pytest.approx(float(info_nce(pred, target, 0.1)))


def test_identification_measure() -> None:
    cal = make_pairs(40)
    t = procrustes_transform(cal)
    scores = identification(t, cal)
    assert set(scores) == {"r1", "r10", "mrr10"} and 0 < scores["r1"] <= scores["r10"] <= 1
    with pytest.raises(ValueError, match="the held-out slice is too small to score"):
        identification(t, make_pairs(5))


def test_choose_lam() -> None:
    rows = [
        {"lam": 0.0, "r10": 0.5, "mrr10": 0.3},
        {"lam": 6.0, "r10": 0.7, "mrr10": 0.4},
        {"lam": 12.0, "r10": 0.7, "mrr10": 0.5},
        {"lam": 16.0, "r10": 0.7, "mrr10": 0.5},
    ]
    assert choose_lam(rows) == 12.0  # R@10 tie: the better MRR, then the earlier row
    assert choose_lam([*rows, {"lam": math.inf, "r10": 0.9, "mrr10": 0.1}]) == math.inf


# ---- fits on synthetic pairs -----------------------------------------------------------------------------------


def test_lambda_orthogonal_improves_on_procrustes() -> None:
    cal, test = make_pairs(300, seed=0), make_pairs(300, seed=1)
    result = fit_lambda_orthogonal(cal, lam=math.inf, **FAST)
    t = result.transform
    assert isinstance(t, AffineTransform) and t.kind == "lambda_orthogonal"
    assert np.array_equal(t.W["query"], t.W["doc"]) and not np.array_equal(t.b["query"], t.b["doc"])
    start = heldout_recall(procrustes_transform(cal), test)
    assert heldout_recall(t, test) > start + 0.08  # measured: 0.59-0.62 -> 0.73-0.77 over 4 seeds
    assert list(result.history[0]) == ["task", "id_doc", "id_query", "penalty", "total"] and len(result.history) == 15
    assert result.history[0]["task"] == 0.0  # no training relevance: identification terms only
    assert result.history[-1]["total"] < result.history[0]["total"]
    assert result.info["lam"] == math.inf and result.info["sweep"] == []
    assert result.info["ortho_gap"] == pytest.approx(float(orthogonality_gap(torch.tensor(t.W["query"]))), rel=1e-4)


def test_lambda_zero_keeps_w_orthogonal() -> None:
    cal = make_pairs(300)
    free = fit_lambda_orthogonal(cal, lam=math.inf, **FAST).info["ortho_gap"]
    tight = fit_lambda_orthogonal(cal, lam=0.0, **FAST).info["ortho_gap"]
    assert tight < 0.5 < free


def test_sweep_picks_by_its_table_and_refits() -> None:
    cal = make_pairs(200)
    seen: list[dict[str, float]] = []
    result = fit_lambda_orthogonal(cal, lams=(0.0, 2.0, math.inf), holdout=0.2, progress=seen.append, **FAST)
    table = result.info["sweep"]
    assert [row["lam"] for row in table] == [0.0, 2.0, math.inf]
    assert set(table[0]) == {"lam", "r1", "r10", "mrr10", "ortho_gap"}
    assert result.info["sweep_metric"] == "heldout_identification"  # no training relevance
    assert result.info["lam"] == choose_lam(table)
    assert result.transform.config["lam"] == result.info["lam"]
    assert len(seen) == 3 * 7 + 15 and seen[-1]["fraction"] == 1.0  # sweep_epochs: epochs // 2
    assert all(a["fraction"] < b["fraction"] for a, b in itertools.pairwise(seen))


def test_fit_is_deterministic_under_seed() -> None:
    cal = make_pairs(120, labels=True)  # SupCon path
    kw: dict[str, Any] = {**FAST, "epochs": 3, "seed": 7}
    a = fit_lambda_orthogonal(cal, lam=6.0, **kw).transform
    b = fit_lambda_orthogonal(cal, lam=6.0, **kw).transform
    assert checksum(a.kind, a.config, a.arrays()) == checksum(b.kind, b.config, b.arrays())
    r1 = fit_residual_mlp(cal, hidden=8, **kw).transform
    r2 = fit_residual_mlp(cal, hidden=8, **kw).transform
    assert all(np.array_equal(r1.arrays()[k], r2.arrays()[k]) for k in r1.arrays())


def test_residual_mlp_improves_on_procrustes() -> None:
    cal, test = make_pairs(300, seed=0), make_pairs(300, seed=1)
    result = fit_residual_mlp(cal, hidden=32, **FAST)
    t = result.transform
    assert isinstance(t, ResidualMLPTransform) and t.kind == "residual_mlp" and t.affine() is None
    assert heldout_recall(t, test) > heldout_recall(procrustes_transform(cal), test) + 0.08  # 0.6 -> 0.78
    assert list(result.history[-1]) == ["task", "id_doc", "id_query", "penalty", "total"]
    assert result.info["hidden"] == 32 and result.history[-1]["penalty"] == 0.0


def test_residual_mlp_starts_at_the_affine_map() -> None:
    W0 = np.random.default_rng(0).normal(size=(D_NEW, D_HOME)).astype(np.float32)
    model = build_module(D_NEW, D_HOME, 8, W0, seed=0)
    x = torch.randn(5, D_NEW, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(x), x @ model.W + model.b)


def test_numpy_forward_equals_torch_and_round_trips() -> None:
    rng = np.random.default_rng(0)
    model = build_module(D_NEW, D_HOME, 8, rng.normal(size=(D_NEW, D_HOME)).astype(np.float32), seed=3)
    with torch.no_grad():  # a non-trivial MLP and bias
        for p in model.parameters():
            p.add_(torch.tensor(rng.normal(scale=0.3, size=p.shape), dtype=torch.float32))
    mean_new = {s: rng.normal(size=D_NEW).astype(np.float32) for s in SIDES}
    t = to_transform(model, mean_new, {"hidden": 8})
    x = rng.normal(size=(20, D_NEW)).astype(np.float32)
    for s in SIDES:
        with torch.no_grad():
            expected = model(torch.tensor(x - mean_new[s])).numpy()
        np.testing.assert_allclose(t.apply(x, s), expected, rtol=1e-5, atol=1e-5)
    back = load_transform("residual_mlp", D_NEW, D_HOME, t.config, t.arrays(), link=lambda name: t)
    assert isinstance(back, ResidualMLPTransform) and back.hidden == 8
    assert checksum(back.kind, back.config, back.arrays()) == checksum(t.kind, t.config, t.arrays())
    np.testing.assert_array_equal(back.apply(x, "doc"), t.apply(x, "doc"))


def test_lambda_orthogonal_round_trips_as_affine() -> None:
    t = fit_lambda_orthogonal(make_pairs(60), lam=3.0, epochs=1, batch_size=32).transform
    back = load_transform("lambda_orthogonal", D_NEW, D_HOME, t.config, t.arrays(), link=lambda name: t)
    assert back.kind == "lambda_orthogonal" and back.config["lam"] == 3.0
    x = make_pairs(5, seed=2).query_new
    np.testing.assert_array_equal(back.apply(x, "query"), t.apply(x, "query"))


def test_threads_restored() -> None:
    before = torch.get_num_threads()
    with torch_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
