"""Model migration on debdesc: new-model queries searching a partly re-embedded gallery, per backfill fraction β.

Fits on ``DIR/fit`` (as ``bench/transforms.py``: :func:`fit_transform` with the diagonal relevance and its
``--holdout``): the query-side transform T new -> old (``--kind``, default ``lambda_orthogonal``; its
``info["score_calibration"]`` calibrates the two-index merge), the reverse R old -> new (same kind; old-model
queries after the cutover) and the forward map F old -> new for gallery vectors: R applied with side "doc" (what
the service's ForwardUpgrade does), compared with the pseudo-inverse of T's doc side (linear kinds) and ridge least
squares on the doc pairs; each is normalized and moved onto the new docs' mean and spread (as the service does
with the map's ``doc_moments``).

Then on ``DIR/dev`` (gallery = dev docs, query i relevant to doc i, exact search, cosine, k = 10), for β = 0 ...
1 (``--steps``) and the orders ``random`` (seeded) and ``suggested`` (:func:`backfill_order` on the old vectors):

* (a) one index in the new space: x_new for the backfilled docs, F(x_old) for the rest, raw queries;
* (b) two indexes: T(q) on the old vectors of the docs not backfilled (scores calibrated), q on the new vectors of
  the backfilled ones, merged by :func:`merge_topk`;
* old-model queries: natively on the old index (old vectors kept until FinishMigration), and in the layout where
  the old index holds only the docs not backfilled (the others found by R(q_old) in the new index, merged with
  R's calibration); after the cutover R(q_old) against the full new gallery.

Searches go through a pluggable ``search_fn(xq, backfilled) -> I`` (:func:`evaluate_curve`); the offline one here
searches exactly among the allowed rows (a top-``CANDIDATES`` list per query, exact fallback where it runs out),
so (a)'s two lists merged by raw score equal one search of the shared index. Also measured: the calibration
methods and the order methods (strategy (b): worst margin and area under R@10 over β).

Then the service itself (``_backfill_service.py``, ``--service-betas``, default 0, 0.5, 1): an in-process server
fits T and R on the same pairs, migrates two collections of the dev gallery ((b) ``two_indexes``; (a)
``shared_index`` after a ForwardUpgrade with R), backfills in SuggestBackfillOrder's order and searches over gRPC;
its R@10 is printed beside the offline curves (``service_r10_a/b``, ``service_max_abs_diff_r10``).

stdout: a markdown report; its last line one JSON object (``min_margin_r10_a/b``: worst β minus β = 0, suggested
order; ``end_gap_r10_a/b``: β = 1 minus new->new; ``auc_r10_suggested`` / ``auc_r10_random``: strategy (b);
``forward_upgrade_r10``; curves and the comparisons). Progress on stderr. ``--plot PNG`` draws R@10 vs β.

    .venv/bin/python bench/backfill.py --data DIR [--kind K] [--n N] [--steps 11] [--plot out.png]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from _backfill_service import measure as service_measure
from _common import log, machine_info
from _data import load_task

from interlingua.server.migration.calibration import (
    IDENTITY,
    ScoreCalibration,
    fit_score_calibration,
    merge_topk,
)
from interlingua.server.migration.calibration import (
    METHODS as CALIBRATION_METHODS,
)
from interlingua.server.migration.order import METHODS as ORDER_METHODS
from interlingua.server.migration.order import backfill_order
from interlingua.server.transforms.base import Calibration, Transform, apply_to_home
from interlingua.server.transforms.evaluate import split_calibration
from interlingua.server.transforms.fit import fit_transform
from interlingua.server.transforms.kinds import get_kind

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / ".." / "shared" / "data" / "debdesc"
K = 10
CANDIDATES = 256  #: precomputed top rows per query; a query with fewer than k allowed among them is searched exactly
SearchFn = Callable[[np.ndarray], np.ndarray]  #: backfilled mask (nb,) bool -> I (nq, k) gallery rows, -1 padded


def normalized(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), dtype=np.float32)


class SubsetSearch:
    """Exact inner-product top-k of xq (nq, d) among the allowed rows of xb (nb, d), from a precomputed list."""

    def __init__(self, xq: np.ndarray, xb: np.ndarray, candidates: int = CANDIDATES) -> None:
        self.xq, self.xb = np.ascontiguousarray(xq, np.float32), np.ascontiguousarray(xb, np.float32)
        self.D, self.I = faiss.knn(self.xq, self.xb, min(candidates, len(xb)), faiss.METRIC_INNER_PRODUCT)

    def search(self, allowed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(D, I) (nq, k): the top-k among rows where ``allowed`` (nb,) bool, best first; -inf / -1 padded."""
        nq, n_allowed = len(self.xq), int(allowed.sum())
        D, I = np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
        if n_allowed == 0:
            return D, I
        v = allowed[self.I]
        sel = v & (np.cumsum(v, 1) <= k)
        idx = np.argsort(~sel, axis=1, kind="stable")[:, :k]
        ok = np.take_along_axis(sel, idx, 1)
        kk = idx.shape[1]
        D[:, :kk] = np.where(ok, np.take_along_axis(self.D, idx, 1), -np.inf)
        I[:, :kk] = np.where(ok, np.take_along_axis(self.I, idx, 1), -1)
        short = np.flatnonzero(ok.sum(1) < min(k, n_allowed))
        if len(short):  # the precomputed list ran out: search these queries exactly among the allowed rows
            rows = np.flatnonzero(allowed)
            Ds, Is = faiss.knn(self.xq[short], self.xb[rows], min(k, len(rows)), faiss.METRIC_INNER_PRODUCT)
            D[short, : Ds.shape[1]], I[short, : Is.shape[1]] = Ds, rows[Is]
        return D, I


def ids(I: np.ndarray) -> np.ndarray:
    """Rows -> object ids for :func:`merge_topk` ('' = padding)."""
    out = I.astype(object)
    out[I < 0] = ""
    return out


def rows_of(I_obj: np.ndarray) -> np.ndarray:
    return np.array([-1 if v == "" else v for v in I_obj.ravel()], dtype=np.int64).reshape(I_obj.shape)


def two_index(old: SubsetSearch, new: SubsetSearch, cal: ScoreCalibration, k: int = K, swap: bool = False) -> SearchFn:
    """Strategy (b): the old index holds the docs not backfilled (scores calibrated), the new index the others.
    ``swap``: the calibrated side holds the backfilled docs instead (old-model queries: R(q_old) in the new index)."""

    def search(backfilled: np.ndarray) -> np.ndarray:
        D_old, I_old = old.search(backfilled if swap else ~backfilled, max(k, cal.depth))
        D_new, I_new = new.search(~backfilled if swap else backfilled, k)
        D_old = np.where(I_old >= 0, cal.apply(D_old), -np.inf)
        _, I = merge_topk(D_old, ids(I_old), D_new, ids(I_new), k)
        return rows_of(I)

    return search


def one_index(native: SubsetSearch, upgraded: SubsetSearch, k: int = K) -> SearchFn:
    """Strategy (a): one new-space index, x_new rows for the backfilled docs and F(x_old) rows for the rest (two
    exact lists merged by raw score: the same top-k as one search of the shared index)."""
    return two_index(upgraded, native, IDENTITY, k)


def ranking(I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hit (nq,) bool: query i's doc i in its top-k, reciprocal rank (nq,))."""
    H = np.arange(len(I))[:, None] == I
    hit = H.any(1)
    return hit, np.where(hit, 1.0 / (H.argmax(1) + 1), 0.0)


def evaluate_curve(search_fn: SearchFn, order: np.ndarray, betas: Sequence[float]) -> dict[str, list[float]]:
    """R@10, MRR@10 and the negative-flip rate against β = 0 at each β; the first round(β·nb) rows of ``order``
    are backfilled. ``search_fn(backfilled)`` returns each query's top-10 gallery rows."""
    nb = len(order)
    out: dict[str, list[float]] = {"r10": [], "mrr10": [], "neg_flip": []}
    first: np.ndarray | None = None
    for beta in betas:
        backfilled = np.zeros(nb, dtype=bool)
        backfilled[order[: round(beta * nb)]] = True
        hit, rr = ranking(search_fn(backfilled))
        first = hit if first is None else first
        out["r10"].append(float(hit.mean()))
        out["mrr10"].append(float(rr.mean()))
        out["neg_flip"].append(float((first & ~hit).mean()))
    return out


def auc(betas: Sequence[float], r: Sequence[float]) -> float:
    return float(np.trapezoid(r, betas))


def moment_matched(f: Callable[[np.ndarray], np.ndarray], x_old: np.ndarray, x_new: np.ndarray) -> Callable[..., Any]:
    """f (old -> new, unit rows) corrected so that f(x_old) of the fit docs has the new docs' mean and mean distance
    to it, then L2-normalized: mapped rows then mix with native ones in one index (without it they sit off the
    native score scale: backfilling 10% of a 3k gallery dropped (a)'s R@10 from 0.42 to 0.10)."""
    P, Y = f(x_old).astype(np.float64), x_new.astype(np.float64)
    mf, mn = P.mean(0), Y.mean(0)
    ratio = np.linalg.norm(Y - mn, axis=1).mean() / max(np.linalg.norm(P - mf, axis=1).mean(), 1e-12)
    return lambda x: normalized((f(x) - mf) * ratio + mn)


def forward_candidates(T: Transform, R: Transform, fit: dict[str, np.ndarray], xb_old: np.ndarray) -> dict[str, Any]:
    """F(x_old) (nb, d_new) per candidate, each normalized and :func:`moment_matched` on the fit docs: R's doc side; the
    pseudo-inverse of T's doc side (linear kinds); ridge least squares on the centred fit doc pairs."""
    fns: dict[str, Callable[[np.ndarray], np.ndarray]] = {"reverse transform R (doc side)": lambda x: R.apply(x, "doc")}
    affine = T.affine("doc")
    if affine is not None:
        W_pinv, b = np.linalg.pinv(affine[0]), affine[1]
        fns["pseudo-inverse of T (doc side)"] = lambda x: (x - b) @ W_pinv
    X, Y = fit["old_doc"].astype(np.float64), fit["new_doc"].astype(np.float64)
    mx, my = X.mean(0), Y.mean(0)
    W = np.linalg.solve((X - mx).T @ (X - mx) + 0.1 * np.eye(X.shape[1]), (X - mx).T @ (Y - my))
    fns["least squares on doc pairs"] = lambda x: (x - mx) @ W + my
    unit = {name: (lambda x, f=f: normalized(f(x))) for name, f in fns.items()}  # normalized, then matched
    return {name: moment_matched(f, fit["old_doc"], fit["new_doc"])(xb_old) for name, f in unit.items()}


def calibration_of(T: Transform, cal: Calibration, holdout: float, seed: int, method: str) -> ScoreCalibration:
    """Refits T's score calibration with ``method`` exactly as fit_transform does (its held-out queries among the
    held-out and fitted docs), for the comparison of methods."""
    train, held = split_calibration(cal, holdout, seed)
    doc_new, doc_old = np.vstack([held.doc_new, train.doc_new]), np.vstack([held.doc_home, train.doc_home])
    mapped = apply_to_home(T, held.query_new, "cosine")
    return fit_score_calibration(held.query_new, mapped, doc_new, doc_old, method=method)


def fit(kind: str, cal: Calibration, args: argparse.Namespace) -> tuple[Transform, dict[str, Any], float]:
    config: dict[str, Any] = {"threads": args.threads} if "threads" in get_kind(kind).params else {}
    t0 = time.perf_counter()
    result, _ = fit_transform(kind, cal, config, holdout=args.holdout, seed=args.seed)
    return result.transform, result.info, time.perf_counter() - t0


def plot(path: Path, betas: Sequence[float], curves: dict[str, dict[str, list[float]]], fig_: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: make bench (installs the bench extra)") from None
    fig, ax = plt.subplots(figsize=(8, 4.8))
    style = {"b suggested": ("#3b6ea8", "-"), "b random": ("#3b6ea8", "--")}
    style.update({"a suggested": ("#e67e22", "-"), "a random": ("#e67e22", "--")})
    for name, (color, ls) in style.items():
        label = ("(b) two indexes" if name[0] == "b" else "(a) one index, F(x_old)") + ", " + name.split()[1]
        ax.plot(betas, curves[name]["r10"], color=color, ls=ls, marker="o", ms=3, label=label)
    ax.axhline(fig_["new_r10"], color="#27ae60", ls=":", label=f"new->new {fig_['new_r10']:.3f}")
    ax.axhline(fig_["old_r10"], color="#c0392b", ls=":", label=f"old->old {fig_['old_r10']:.3f}")
    ax.set_xlabel("backfill fraction β (docs re-embedded with the new model)")
    ax.set_ylabel("Recall@10, new-model queries")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("debdesc dev: migrating MiniLM-L6 -> e5-small while backfilling")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with fit/ and dev/ (default %(default)s)")
    p.add_argument("--kind", default="lambda_orthogonal", help="transform kind for T, R and F (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="fit split, random order and k-means seed")
    p.add_argument("--threads", type=int, default=2, help="torch and FAISS threads (default 2)")
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of pairs held out (as bench/transforms.py)")
    p.add_argument("--n", type=int, default=None, help="use only the first N rows of each split (quick runs)")
    p.add_argument("--steps", type=int, default=11, help="backfill fractions from 0 to 1 (default 11)")
    p.add_argument("--plot", type=Path, help="write a PNG of Recall@10 vs β")
    p.add_argument(
        "--service-betas",
        default="0,0.5,1",
        help="β at which the service itself (in-process gRPC server) is measured beside the offline curves "
        "(comma-separated; '' skips it; default %(default)s)",
    )
    return p.parse_args(argv)


def fmt(v: float) -> str:
    return f"{v:.4f}"


def report(
    args: argparse.Namespace,
    betas: Sequence[float],
    curves: dict[str, dict[str, list[float]]],
    cal_methods: dict[str, dict[str, Any]],
    order_methods: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Prints the per-β table and the two comparisons; returns their figures."""
    names = ["a random", "a suggested", "b random", "b suggested", "old mixed random"]
    print(
        f"# backfill: {time.strftime('%Y-%m-%d %H:%M')}; data {args.data.resolve()}; kind {args.kind}; seed {args.seed}"
    )
    print("\nCells: R@10 / MRR@10 / negative-flip rate against β = 0. (a) one new-space index (F(x_old) rows until")
    print("backfilled); (b) two indexes merged after calibration; old mixed: old-model queries, old index without the")
    print("backfilled docs, R(q_old) in the new index for them.\n")
    print("| β | " + " | ".join(f"{n}" for n in names) + " |")
    print("|---:|" + "---:|" * len(names))
    for i, beta in enumerate(betas):
        cells = [" / ".join(fmt(curves[n][m][i]) for m in ("r10", "mrr10", "neg_flip")) for n in names]
        print(f"| {beta:.1f} | " + " | ".join(cells) + " |")
    print("| area R@10 | " + " | ".join(fmt(auc(betas, curves[n]["r10"])) for n in names) + " |")
    print("\nCalibration methods, strategy (b), random order (fitted on the fit split's held-out queries):\n")
    print("| method | scale | level | bias | worst β minus β=0 | area R@10 |")
    print("|---|---:|---:|---:|---:|---:|")
    for m, c in cal_methods.items():
        print(f"| {m} | {c['scale']:.4f} | {c['level']:.4f} | {c['bias']:.4f} | {c['min_margin_r10']:+.4f} ", end="")
        print(f"| {c['auc_r10']:.4f} |")
    print("\nOrder methods (`backfill_order(method=...)` on the old vectors; random is the seeded baseline):\n")
    print("| order | area R@10 (b) | worst margin (b) | area R@10 (a) | worst margin (a) | order s |")
    print("|---|---:|---:|---:|---:|---:|")
    for m, o in order_methods.items():
        print(f"| {m} | {o['auc_r10_b']:.4f} | {o['min_margin_r10_b']:+.4f} | {o['auc_r10_a']:.4f} ", end="")
        print(f"| {o['min_margin_r10_a']:+.4f} | {o['order_s']:.2f} |")
    cals = {m: {k: v for k, v in c.items() if k != "r10"} for m, c in cal_methods.items()}
    return {"calibration_methods": cals, "order_methods": order_methods}


def print_summary(f: dict[str, Any]) -> None:
    print(f"\nBaselines: new->new R@10 {f['new_r10']:.4f} (MRR@10 {f['new_mrr10']:.4f}); old->old {f['old_r10']:.4f}")
    print(f"({f['old_mrr10']:.4f}), which old-model queries keep during the backfill (old vectors kept); after the")
    print(f"cutover R(q_old) -> new gallery {f['old_after_cutover_r10']:.4f} ({f['old_after_cutover_mrr10']:.4f}).")
    maps = ", ".join(f"{k} {v:.4f}" for k, v in f["forward_maps"].items())
    print(f"Forward upgrade (raw new queries vs F(x_old)): {maps}; used (the service's): {f['forward_map']}.")
    for s in "ab":
        print(f"({s}): worst β minus β=0 {f[f'min_margin_r10_{s}']:+.4f} (suggested), ", end="")
        print(
            f"{f[f'min_margin_r10_{s}_random']:+.4f} (random); β=1 minus new->new {f[f'end_gap_r10_{s}']:+.4f}; ",
            end="",
        )
        print(f"area suggested {f[f'auc_r10_suggested_{s}']:.4f} vs random {f[f'auc_r10_random_{s}']:.4f}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    task = load_task(args.data, args.n)
    fit_, dev = task.fit, task.dev
    betas = [round(float(b), 6) for b in np.linspace(0, 1, args.steps)]
    cal = Calibration(
        fit_["new_doc"], fit_["old_doc"], fit_["new_query"], fit_["old_query"], query_relevant=task.relevant
    )
    rcal = Calibration(
        fit_["old_doc"], fit_["new_doc"], fit_["old_query"], fit_["new_query"], query_relevant=task.relevant
    )
    log(f"fitting T: {args.kind} new -> old on {len(cal.doc_new)} doc + {len(cal.query_new)} query pairs")
    T, info_T, fit_s_T = fit(args.kind, cal, args)
    log(f"T fitted in {fit_s_T:.1f}s; fitting R: {args.kind} old -> new")
    R, info_R, fit_s_R = fit(args.kind, rcal, args)
    log(f"R fitted in {fit_s_R:.1f}s; searching the dev candidates")
    calibration = ScoreCalibration.from_dict(info_T["score_calibration"])
    xq, xq_old, xb_new, xb_old = dev["new_query"], dev["old_query"], dev["new_doc"], dev["old_doc"]
    n = len(xb_new)
    native, old = SubsetSearch(xq, xb_new), SubsetSearch(apply_to_home(T, xq, "cosine"), xb_old)
    forward = {name: SubsetSearch(xq, F) for name, F in forward_candidates(T, R, fit_, xb_old).items()}
    forward_r10 = {name: float(ranking(s.I[:, :K])[0].mean()) for name, s in forward.items()}
    # the service's ForwardUpgrade maps with a fitted old -> new transform: R's doc side (the others are compared)
    forward_map = "reverse transform R (doc side)"
    log(f"forward maps (R@10 of raw new queries vs F(x_old)): {forward_r10}; used: {forward_map}")
    new_r10, new_mrr = (float(v.mean()) for v in ranking(native.I[:, :K]))
    old_native = SubsetSearch(xq_old, xb_old)
    old_r10, old_mrr = (float(v.mean()) for v in ranking(old_native.I[:, :K]))
    reverse = SubsetSearch(apply_to_home(R, xq_old, "cosine"), xb_new)
    cutover_r10, cutover_mrr = (float(v.mean()) for v in ranking(reverse.I[:, :K]))
    t0 = time.perf_counter()
    orders = {"random": backfill_order(xb_old, n, seed=args.seed, method="random")[0]}
    orders["suggested"] = backfill_order(xb_old, n, seed=args.seed)[0]
    order_s = time.perf_counter() - t0
    searchers = {"b": two_index(old, native, calibration), "a": one_index(native, forward[forward_map])}
    curves = {
        f"{s} {o}": evaluate_curve(fn, order, betas) for s, fn in searchers.items() for o, order in orders.items()
    }
    rcalibration = ScoreCalibration.from_dict(info_R["score_calibration"])
    for o, order in orders.items():  # old-model queries, old index = the docs not backfilled, R(q_old) for the rest
        curves[f"old mixed {o}"] = evaluate_curve(two_index(reverse, old_native, rcalibration, swap=True), order, betas)
    log("comparing calibration methods (strategy (b), random order)")
    cal_methods: dict[str, dict[str, Any]] = {}
    for method in (*CALIBRATION_METHODS, "identity"):
        c = IDENTITY if method == "identity" else calibration_of(T, cal, args.holdout, args.seed, method)
        r = evaluate_curve(two_index(old, native, c), orders["random"], betas)["r10"]
        cal_methods[method] = {"min_margin_r10": min(r) - r[0], "auc_r10": auc(betas, r), "r10": r, **c.to_dict()}
    log("comparing order methods (strategy (b))")
    order_methods: dict[str, dict[str, Any]] = {}
    for method in ORDER_METHODS:
        t0 = time.perf_counter()
        order = backfill_order(xb_old, n, seed=args.seed, method=method)[0]
        seconds = time.perf_counter() - t0
        r = evaluate_curve(searchers["b"], order, betas)["r10"]
        ra = evaluate_curve(searchers["a"], order, betas)["r10"]
        order_methods[method] = {"auc_r10_b": auc(betas, r), "auc_r10_a": auc(betas, ra), "order_s": seconds}
        order_methods[method].update(min_margin_r10_b=min(r) - r[0], min_margin_r10_a=min(ra) - ra[0])
    figures = report(args, betas, curves, cal_methods, order_methods)
    figures.update(new_r10=new_r10, new_mrr10=new_mrr, old_r10=old_r10, old_mrr10=old_mrr)
    figures.update(old_after_cutover_r10=cutover_r10, old_after_cutover_mrr10=cutover_mrr)
    figures.update(forward_upgrade_r10=forward_r10[forward_map], forward_map=forward_map, forward_maps=forward_r10)
    for s in "ab":
        r = curves[f"{s} suggested"]["r10"]
        figures[f"min_margin_r10_{s}"] = min(r) - r[0]
        figures[f"end_gap_r10_{s}"] = r[-1] - new_r10
        figures[f"min_margin_r10_{s}_random"] = min(curves[f"{s} random"]["r10"]) - curves[f"{s} random"]["r10"][0]
        for o in orders:
            figures[f"auc_r10_{o}_{s}"] = auc(betas, curves[f"{s} {o}"]["r10"])
    figures.update(auc_r10_suggested=figures["auc_r10_suggested_b"], auc_r10_random=figures["auc_r10_random_b"])
    figures.update(kind=args.kind, score_calibration=calibration.to_dict(), fit_s_T=fit_s_T, fit_s_R=fit_s_R)
    figures.update(order_s=order_s, betas=betas, n_dev=n, machine=machine_info())
    figures["curves"] = {name: {k: [round(v, 5) for v in vs] for k, vs in c.items()} for name, c in curves.items()}
    if args.service_betas:
        sb = [float(b) for b in args.service_betas.split(",")]
        log(f"measuring the service itself at β = {sb}")
        svc = service_measure(fit_, dev, args.kind, args.holdout, sb)
        offline = {s: np.interp(sb, betas, curves[f"{s} suggested"]["r10"]) for s in "ab"}
        svc["service_betas"] = sb
        svc["service_max_abs_diff_r10"] = max(
            float(np.max(np.abs(np.asarray(svc[f"service_r10_{s}"]) - offline[s]))) for s in "ab"
        )
        figures.update(svc)
    print_summary(figures)
    if "service_r10_b" in figures:
        print("\nThe service itself (in-process gRPC server: FitTransform, StartMigration, SuggestBackfillOrder,")
        print("ForwardUpgrade, backfill upserts, Search), suggested order, R@10 / MRR@10:\n")
        print("| β | (b) service | (b) offline | (a) service | (a) offline |")
        print("|---:|---:|---:|---:|---:|")
        for i, b in enumerate(figures["service_betas"]):
            cells = []
            for s in "ba":
                off = float(np.interp(b, betas, curves[f"{s} suggested"]["r10"]))
                cells += [f"{figures[f'service_r10_{s}'][i]:.4f} / {figures[f'service_mrr10_{s}'][i]:.4f}", fmt(off)]
            print(f"| {b:.2f} | " + " | ".join(cells) + " |")
        print(f"\nLargest |service - offline| R@10: {figures['service_max_abs_diff_r10']:.4f}; old-model queries")
        print(f"after the service's cutover (through R): {figures['service_old_after_cutover_r10']:.4f}.")
    if args.plot:
        plot(args.plot, betas, curves, figures)
        log(f"wrote {args.plot}")
    print(json.dumps(figures, default=float))
    return figures


if __name__ == "__main__":
    main()
