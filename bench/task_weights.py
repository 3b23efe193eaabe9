"""The task loss's weights, measured one at a time around the defaults (debdesc: fit on ``fit/``, dev R@10).

Fits ``lambda_orthogonal`` with λ fixed (``--lam``, default inf: no sweep, so each row is one fit) on
the fit split with its training relevance (query i -> doc i) and holdout 0.1 (query offsets chosen
on it, as the service does), changing one setting per row from the defaults of
:class:`~interlingua.server.transforms.train.TrainConfig`: the temperature τ, the identification
weight ``w_id`` (0: task term only), the task weight ``w_task`` (0: identification only, the kinds'
behaviour without relevance), the number of mined hard negatives and the epochs; ``seed_*`` rows change
only the training seed (batch order, init of the MLP), the noise level the other rows must clear;
``+`` rows change two or three settings at once. Each row reports
dev Recall@10 / MRR@10 of the 20k dev new queries against the 20k dev old docs, and the fit time.
Prints the table, then one JSON object: ``{row_name: r10, ...}`` plus ``home_r10``.

    .venv/bin/python bench/task_weights.py --data ../shared/data/debdesc [--rows default,tau_0.05]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
from _common import K, log
from _data import load_task

from interlingua.server.transforms.base import Calibration
from interlingua.server.transforms.evaluate import evaluate
from interlingua.server.transforms.fit import fit_transform

DEFAULT_DATA = Path(__file__).resolve().parent.parent / ".." / "shared" / "data" / "debdesc"

ROWS: dict[str, dict[str, Any]] = {
    "default": {},
    "tau_0.02": {"temperature": 0.02},
    "tau_0.05": {"temperature": 0.05},
    "w_id_0": {"w_id": 0.0},
    "w_id_0.3": {"w_id": 0.3},
    "w_id_3": {"w_id": 3.0},
    "w_task_0": {"w_task": 0.0},
    "hard_0": {"hard_negatives": 0},
    "hard_16": {"hard_negatives": 16},
    "epochs_20": {"epochs": 20},
    "seed_1": {"seed": 1},
    "seed_2": {"seed": 2},
    "tau_0.05+hard_0": {"temperature": 0.05, "hard_negatives": 0},
    "tau_0.05+w_id_3": {"temperature": 0.05, "w_id": 3.0},
    "tau_0.05+w_id_3+hard_0": {"temperature": 0.05, "w_id": 3.0, "hard_negatives": 0},
}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with fit/ and dev/ (default %(default)s)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows (default: all)")
    p.add_argument("--kind", default="lambda_orthogonal", choices=("lambda_orthogonal", "residual_mlp"))
    p.add_argument("--lam", type=float, default=math.inf, help="λ of every fit (default inf)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=None, help="first N rows of each split (quick runs)")
    args = p.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown row(s) {', '.join(unknown)}; known: {', '.join(ROWS)}")
    task = load_task(args.data, args.n)
    fit, eval_kw = task.fit, task.eval_kw()
    cal = Calibration(fit["new_doc"], fit["old_doc"], fit["new_query"], fit["old_query"], query_relevant=task.relevant)
    print(f"# task_weights: {time.strftime('%Y-%m-%d %H:%M')}; {args.kind}, lam={args.lam}, holdout 0.1;")
    print(f"# threads={args.threads}; dev R@{K} of e5-small queries against the MiniLM-L6 gallery")
    print(f"| row | change | R@{K} | MRR@{K} | fit s |")
    print("|---|---|---:|---:|---:|")
    cache: dict[str, Any] = {}
    figures: dict[str, Any] = {}
    for name in rows:
        config = {"lam": args.lam, "threads": args.threads, **ROWS[name]}
        log(f"{name}: {config}")
        t0 = time.perf_counter()
        if args.kind != "lambda_orthogonal":
            config.pop("lam")
        result, _ = fit_transform(args.kind, cal, config, holdout=0.1)
        fit_s = time.perf_counter() - t0
        r = evaluate(result.transform, home_metric="cosine", k=K, cache=cache, **eval_kw)
        figures[name] = r[f"transformed_r{K}"]
        figures.setdefault("home_r10", r[f"home_r{K}"])
        change = json.dumps(ROWS[name]) if ROWS[name] else "defaults"
        print(f"| {name} | `{change}` | {r[f'transformed_r{K}']:.4f} | {r[f'transformed_mrr{K}']:.4f} | {fit_s:.1f} |")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
