"""Every fitted transform kind on debdesc: fit on ``fit/``, score new-model queries against the old gallery of ``dev/``.

Each new -> home kind (``CROSS_KINDS``: the home -> home ``HOME_KINDS`` left out) is fitted with its
default config by :func:`fit_transform` on the fit split's 10k doc and 10k query pairs, with the
training relevance of the task (``--relevance diagonal``: fit query i's relevant doc is fit doc i, as
an operator's logged clicks would give; ``pseudo`` gives none, so the service trains on the old model's
own top-1 calibration doc per query; ``none`` fits on identification only). ``--holdout`` (default 0.1) of the
pairs is held out: each kind picks its query offsets on it (and ``lambda_orthogonal`` its λ on its own
slice of the rest). Then :func:`evaluate` searches the 20k dev docs with the 20k dev queries (query i's
only relevant doc is doc i; cosine; exact ``faiss.knn``, k=10). The table has the baselines home->home
(old_query vs old_doc: what users have today), new->new (a full re-index), raw new->home, the five-line
numpy baseline (Procrustes fitted on centred doc pairs, applied to ``new_query − mean(new fit
queries)``, no home mean added back) and T(new)->home per kind; retention is R@10 / home->home R@10.

Progress goes to stderr; the report to stdout, its last line one JSON object: per kind K ``K_r10``,
``K_mrr10``, ``K_fit_s``, ``K_flip_rate``, ``K_retention``; ``home_r10``, ``new_r10``, ``raw_r10``,
``baseline_r10``, ``baseline_mrr10``, ``best_kind`` and ``best_retention`` (best K_r10 / home_r10).
``--plot PNG`` draws Recall@10 per kind with the old->old and new->new lines (needs the ``bench`` extra).
Runs on ``--threads`` threads (torch, FAISS; set ``OPENBLAS_NUM_THREADS`` for numpy too).

    .venv/bin/python bench/transforms.py --data DIR [--kinds procrustes,affine] [--n N] [--plot out.png]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from _common import log
from _data import load_task

from interlingua.server.transforms.base import AffineTransform, Calibration
from interlingua.server.transforms.evaluate import evaluate
from interlingua.server.transforms.fit import HOME_KINDS, KINDS, fit_transform, fitter
from interlingua.server.transforms.kinds import get_kind

CROSS_KINDS = tuple(k for k in KINDS if k not in HOME_KINDS)  #: new -> home maps (home -> home kinds excluded)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / ".." / "shared" / "data" / "debdesc"
K = 10


def five_line_baseline(fit: dict[str, np.ndarray]) -> AffineTransform:
    """Procrustes on centred doc pairs, applied to new_query − mean(new fit queries), no home mean added."""
    X = fit["new_doc"] - fit["new_doc"].mean(0)
    Y = fit["old_doc"] - fit["old_doc"].mean(0)
    U, _, Vt = np.linalg.svd(X.T.astype(np.float64) @ Y)
    R = U @ Vt
    return AffineTransform({"query": R}, {"query": -fit["new_query"].mean(0) @ R}, {"kind": "baseline"})


def fmt(v: Any, spec: str = ".4f") -> str:
    """A table cell: "–" for a missing figure."""
    return "–" if v is None else format(v, spec)


def row(name: str, r: dict[str, Any], prefix: str, fit_s: float | None = None) -> str:
    """One markdown row; a baseline (prefix home/new/raw) has no compatibility figures."""
    cells = [fmt(r[f"{prefix}_r1"]), fmt(r[f"{prefix}_r{K}"]), fmt(r[f"{prefix}_mrr{K}"])]
    if prefix == "transformed":
        cells += [fmt(r["retention"]), fmt(r["ecc_margin"], "+.4f"), fmt(r["neg_flip"]), fmt(r["nbr_agreement"])]
        cells += [fmt(r["ortho_error"], ".3g"), fmt(r["us_per_query"], ".2f"), fmt(fit_s, ".1f")]
    else:
        cells += [fmt(r[f"{prefix}_r{K}"] / r[f"home_r{K}"])] + ["–"] * 6
    return f"| {name} | " + " | ".join(cells) + " |"


def plot(path: Path, figures: dict[str, Any], kinds: Sequence[str]) -> None:
    """Bar chart of Recall@10 per kind (and the baseline) with the old->old and new->new lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: make bench (installs the bench extra)") from None
    names = ["five-line\nbaseline", *[k.replace("_", "\n") for k in kinds]]
    values = [figures["baseline_r10"], *[figures[f"{k}_r10"] for k in kinds]]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    bars = ax.bar(names, values, color=["#999999"] + ["#3b6ea8"] * len(kinds))
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.axhline(figures["home_r10"], color="#c0392b", ls="--", label=f"old->old {figures['home_r10']:.3f}")
    ax.axhline(figures["new_r10"], color="#27ae60", ls=":", label=f"new->new {figures['new_r10']:.3f}")
    ax.axhline(0.9 * figures["home_r10"], color="#c0392b", ls=":", lw=0.8, label="90% of old->old")
    ax.set_ylabel("Recall@10, new queries -> old gallery")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("debdesc dev: e5-small queries searching the MiniLM-L6 gallery")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with fit/ and dev/ (default %(default)s)")
    p.add_argument("--kinds", default=",".join(CROSS_KINDS), help="comma-separated kinds to fit (default: all)")
    p.add_argument("--n", type=int, default=None, help="use only the first N rows of each split (quick runs)")
    p.add_argument("--threads", type=int, default=2, help="torch and FAISS threads (default 2)")
    p.add_argument(
        "--relevance",
        choices=("diagonal", "pseudo", "none"),
        default="diagonal",
        help="training relevance: diagonal (query i -> doc i), pseudo (none given: the old model's top-1), none",
    )
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of pairs held out for validation")
    p.add_argument("--plot", type=Path, help="write a PNG of Recall@10 per kind")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    kinds = [k for k in args.kinds.split(",") if k]
    bad = sorted(set(kinds) - set(CROSS_KINDS))
    if bad:
        raise SystemExit(f"unknown kind(s) {', '.join(bad)}; known: {', '.join(CROSS_KINDS)}")
    task = load_task(args.data, args.n, relevance=args.relevance == "diagonal")
    fit, dev, eval_kw = task.fit, task.dev, task.eval_kw()
    m = len(fit["new_query"])
    cal = Calibration(fit["new_doc"], fit["old_doc"], fit["new_query"], fit["old_query"], query_relevant=task.relevant)
    print(f"# transforms: {time.strftime('%Y-%m-%d %H:%M')}; data {args.data.resolve()}")
    print(f"# fit: {len(cal.doc_new)} doc + {m} query pairs, training relevance {args.relevance}, holdout")
    print(f"# {args.holdout}; dev: {len(dev['new_query'])} queries, {len(dev['old_doc'])} docs; cosine, k={K};")
    print(f"# threads={args.threads}; new = e5-small, home = MiniLM-L6; retention = R@10 / home->home R@10")
    cache: dict[str, Any] = {}
    baseline = evaluate(five_line_baseline(fit), home_metric="cosine", k=K, cache=cache, **eval_kw)
    reports: dict[str, tuple[dict[str, Any], float]] = {}
    notes = []
    for kind in kinds:
        try:
            fitter(kind)
        except ImportError as e:
            notes.append(f"{kind}: skipped, not importable ({e})")
            log(notes[-1])
            continue
        config: dict[str, Any] = {"threads": args.threads} if "threads" in get_kind(kind).params else {}
        if args.relevance == "none":
            config["pseudo_relevance"] = False
        log(f"fitting {kind} {config}")
        t0 = time.perf_counter()
        result, _ = fit_transform(kind, cal, config, holdout=args.holdout)
        fit_s = time.perf_counter() - t0
        log(f"{kind}: fitted in {fit_s:.1f}s; evaluating")
        reports[kind] = evaluate(result.transform, home_metric="cosine", k=K, cache=cache, **eval_kw), fit_s
        info = {k: v for k, v in result.info.items() if k not in ("offset_table",)}
        log(f"{kind}: R@10 {reports[kind][0][f'transformed_r{K}']:.4f}; info {json.dumps(info, default=str)}")
    if not reports:
        raise SystemExit("no kind was fitted")
    print("| search | R@1 | R@10 | MRR@10 | retention | ECC margin | neg-flip | nbr-agreement | ‖WᵀW−I‖_F ", end="")
    print("| µs/query | fit s |")
    print("|---|" + "---:|" * 10)
    print(row("home->home (old->old)", baseline, "home"))
    print(row("new->new (re-index)", baseline, "new"))
    print(row("raw new->home", baseline, "raw"))
    print(row("five-line numpy baseline", baseline, "transformed"))
    for kind, (r, fit_s) in reports.items():
        print(row(f"{kind} T(new)->home", r, "transformed", fit_s))
    for note in notes:
        print(f"\n_{note}_")
    figures: dict[str, Any] = {}
    for kind, (r, fit_s) in reports.items():
        figures.update({f"{kind}_r10": r[f"transformed_r{K}"], f"{kind}_mrr10": r[f"transformed_mrr{K}"]})
        figures.update({f"{kind}_fit_s": round(fit_s, 2), f"{kind}_flip_rate": r["neg_flip"]})
        figures[f"{kind}_retention"] = r["retention"]
    figures.update(home_r10=baseline[f"home_r{K}"], new_r10=baseline[f"new_r{K}"], raw_r10=baseline[f"raw_r{K}"])
    figures.update(baseline_r10=baseline[f"transformed_r{K}"], baseline_mrr10=baseline[f"transformed_mrr{K}"])
    best = max(reports, key=lambda k: reports[k][0][f"transformed_r{K}"])
    figures.update(best_kind=best, best_retention=figures[f"{best}_r10"] / figures["home_r10"])
    figures["skipped"] = [n.split(":")[0] for n in notes]
    if args.plot:
        plot(args.plot, figures, list(reports))
        log(f"wrote {args.plot}")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
