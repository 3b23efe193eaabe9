"""Matryoshka truncation on debdesc: Recall@10 against the number of leading dims kept, for both models.

Section *recall vs dims*: for each model (old = MiniLM: old_query vs old_doc; new = e5-small:
new_query vs new_doc) and each m in ``--dims``, the ``--eval`` split's queries search its docs
(query i's only relevant doc is doc i; default the 20k x 20k dev split) by exact inner product
(``faiss.knn``) on the **re-normalized m-dim prefixes** (``matryoshka.shrink``) of:

* ``raw``: the model's own coordinates, truncated as they are;
* ``pca``: ``pca_basis`` fitted on that model's fit-split docs + queries (``DATA/fit``);
* ``adapter``: ``mrl_adapter`` fitted on that model's fit-split (query_i, doc_i) pairs (defaults,
  or ``--adapter-config JSON``). The adapter is applied to queries and docs alike; it changes the
  full-dim scores too, so its m = d row is its own full-dim R@10.

Each R@10 is also given as a ratio to the raw model's full-dim R@10 (the collection without any
transform); the adapter also as a ratio to its own full-dim R@10. One markdown table per model, a
plot of R@10 against m to ``docs/matryoshka_recall.png`` (``--plot``; needs matplotlib, the
``bench`` extra: without it the plot is skipped with a note), and the last stdout line is one JSON
object: ``raw64_r10_ratio``, ``pca64_r10_ratio``, ``best64_r10_ratio`` and ``best128_r10_ratio``
(each the worse of the two models; best = the best of raw, pca and adapter for that model), plus
``adapter_full_r10_ratio`` (worse model) and per-model details under ``models``. ``main()`` runs
the sections in turn and merges their figures.

Section *funnel* (``_funnel.py``): funnel search (prefix index + rerank, as prefix collections run
it) against full-dimensional Flat on a ``--funnel-n`` gallery (1M: dev docs tiled with seeded
noise), adding ``funnel_qps_ratio`` and ``funnel_r10_drop`` (the fastest funnel within 1 point).
Progress goes to stderr.

    .venv/bin/python bench/matryoshka.py [--data DIR] [--eval DIR] [--dims 16,32,64] [--threads 2] [--n N]
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

from interlingua.server.transforms.matryoshka import shrink
from interlingua.server.transforms.mrl_adapter import fit_mrl_adapter
from interlingua.server.transforms.pca_basis import fit_pca_basis

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / ".." / "shared" / "data" / "debdesc"
DEFAULT_PLOT = REPO / "docs" / "matryoshka_recall.png"
K = 10
MODELS = {"old": "MiniLM-L6 (old)", "new": "e5-small (new)"}
METHODS = ("raw", "pca", "adapter")


def load_pairs(folder: Path, model: str, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(queries (n, d), docs (n, d)) float32 of one model in one split (stored float16, L2-normalized)."""
    out = []
    for side in ("query", "doc"):
        path = folder / f"{model}_{side}.npy"
        if not path.is_file():
            raise SystemExit(f"{path} not found: pass --data (with fit/) and --eval, debdesc-like splits")
        out.append(np.ascontiguousarray(np.load(path, mmap_mode="r")[:n], dtype=np.float32))
    return out[0], out[1]


def recall_at_k(xq: np.ndarray, xb: np.ndarray, m: int, k: int = K) -> float:
    """R@k of xq (nq, d) against xb (nq, d) on the re-normalized m-dim prefixes; query i's relevant doc is row i."""
    _, I = faiss.knn(shrink(xq, m), shrink(xb, m), k, faiss.METRIC_INNER_PRODUCT)
    return float((np.arange(len(xq))[:, None] == I).any(1).mean())


def model_rows(args: argparse.Namespace, model: str, dims: list[int]) -> dict[str, Any]:
    """Fits pca_basis and the adapter on ``model``'s fit split, scores every method at every m on the eval split."""
    fq, fb = load_pairs(args.data / "fit", model, args.n)
    xq, xb = load_pairs(args.eval, model, args.n)
    d = xq.shape[1]
    t0 = time.perf_counter()
    pca = fit_pca_basis(np.vstack([fb, fq])).transform
    log(f"{model}: pca_basis fitted in {time.perf_counter() - t0:.1f}s")
    config = {"threads": args.threads, **json.loads(args.adapter_config)}
    t0 = time.perf_counter()
    adapter = fit_mrl_adapter((fq, fb), **config)
    adapter_s = time.perf_counter() - t0
    log(f"{model}: mrl_adapter fitted in {adapter_s:.1f}s; last epoch {adapter.history[-1]}")
    spaces = {
        "raw": (xq, xb),
        "pca": (pca.apply(xq, "query"), pca.apply(xb, "doc")),
        "adapter": (adapter.transform.apply(xq, "query"), adapter.transform.apply(xb, "doc")),
    }
    r10 = {method: {m: recall_at_k(q, b, m) for m in (*dims, d) if m <= d} for method, (q, b) in spaces.items()}
    log(f"{model}: {json.dumps(r10)}")
    full = r10["raw"][d]
    return {
        "d": d,
        "full_r10": full,
        "r10": r10,
        "ratio": {method: {m: v / full for m, v in r.items()} for method, r in r10.items()},
        "adapter_own_ratio": {m: v / r10["adapter"][d] for m, v in r10["adapter"].items()},
        "adapter_fit_s": adapter_s,
        "adapter_config": adapter.transform.config,
        "nq": len(xq),
        "n_fit_pairs": len(fq),
    }


def print_table(model: str, res: dict[str, Any], dims: list[int]) -> None:
    nq, full = res["nq"], res["full_r10"]
    print(f"\n### {MODELS[model]}: R@{K}, {nq} queries vs {nq} docs; raw full-dim R@{K} {full:.4f}\n")
    print("| m | bytes/vector | raw | ÷ full | pca_basis | ÷ full | mrl_adapter | ÷ full | ÷ own full |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in dims:
        if m > res["d"]:
            continue
        cells = [str(m), str(4 * m)]
        for method in METHODS:
            cells += [f"{res['r10'][method][m]:.4f}", f"{res['ratio'][method][m]:.3f}"]
        cells.append(f"{res['adapter_own_ratio'][m]:.3f}")
        print("| " + " | ".join(cells) + " |")


def plot(results: dict[str, dict[str, Any]], dims: list[int], path: Path) -> str | None:
    """R@10 against m, one panel per model, to ``path``; returns a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install -e '.[bench]')"
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), sharey=True, squeeze=False)
    for ax, (model, res) in zip(axes[0], results.items(), strict=True):
        ms = [m for m in dims if m <= res["d"]]
        for method, style in zip(METHODS, ("o--", "s-", "^-"), strict=True):
            ax.plot(ms, [res["r10"][method][m] for m in ms], style, label=method)
        ax.axhline(res["full_r10"], color="grey", lw=0.8, ls=":", label="raw, full dim")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.set_title(MODELS[model])
        ax.set_xlabel("leading dims kept (m)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"Recall@{K} (re-normalized prefix)")
    axes[0][0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _worst(results: dict[str, dict[str, Any]], m: int, methods: Sequence[str]) -> float | None:
    """The worse model's best ratio among ``methods`` at m (None when m was not measured)."""
    per_model = []
    for res in results.values():
        ratios = [res["ratio"][method].get(m) for method in methods]
        if any(r is None for r in ratios):
            return None
        per_model.append(max(r for r in ratios if r is not None))
    return min(per_model)


def recall_section(args: argparse.Namespace) -> dict[str, Any]:
    """The recall-vs-dims section: tables, plot and its JSON figures."""
    dims = sorted({int(m) for m in args.dims.split(",") if m})
    print(f"# matryoshka: {time.strftime('%Y-%m-%d %H:%M')}; fit {(args.data / 'fit').resolve()}")
    print(f"# eval {args.eval.resolve()}; exact IP on re-normalized prefixes; k={K}; threads={args.threads}")
    results = {model: model_rows(args, model, dims) for model in MODELS}
    for model, res in results.items():
        print_table(model, res, dims)
    print(f"\n_adapter config: {json.dumps(next(iter(results.values()))['adapter_config'])}_")
    if args.plot:
        note = plot(results, dims, args.plot)
        print(f"\n_{note}_" if note else f"\n_plot: {args.plot}_")
    figures: dict[str, Any] = {
        "raw64_r10_ratio": _worst(results, 64, ("raw",)),
        "pca64_r10_ratio": _worst(results, 64, ("pca",)),
        "best64_r10_ratio": _worst(results, 64, METHODS),
        "best128_r10_ratio": _worst(results, 128, METHODS),
        "adapter_full_r10_ratio": min(res["ratio"]["adapter"][res["d"]] for res in results.values()),
    }
    figures["models"] = {
        model: {
            "full_r10": res["full_r10"],
            **{f"{method}_r10": {str(m): v for m, v in res["r10"][method].items()} for method in METHODS},
        }
        for model, res in results.items()
    }
    return figures


def funnel_figures(args: argparse.Namespace) -> dict[str, Any]:
    """The funnel-QPS section (``_funnel.py``): funnel search vs full-dim Flat on a ``--funnel-n`` gallery."""
    if not args.funnel_n:
        return {}
    from _funnel import funnel_section

    res = funnel_section(args.eval, args.data / "fit", args.funnel_n, args.funnel_queries, 1234, log)
    print(f"\n## Funnel search vs full-dimensional Flat ({res['funnel_source']})\n")
    print(f"nq={64} batches, {res['funnel_queries']} queries, interleaved; MiniLM docs rotated by pca_basis\n")
    print(res.pop("table"))
    return res


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with fit/ (default %(default)s)")
    p.add_argument("--eval", type=Path, default=None, help="the split to evaluate on (default DATA/dev)")
    p.add_argument("--dims", default="16,32,64,128,192,256,384", help="prefix sizes m (default %(default)s)")
    p.add_argument("--adapter-config", default="{}", help="JSON overrides for fit_mrl_adapter (default: none)")
    p.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="where the plot goes (default %(default)s)")
    p.add_argument("--no-plot", dest="plot", action="store_const", const=None, help="skip the plot")
    p.add_argument("--n", type=int, default=None, help="use only the first N rows of each split (quick runs)")
    p.add_argument("--threads", type=int, default=1, help="torch and FAISS threads (default 1)")
    p.add_argument("--funnel-n", type=int, default=1_000_000, help="funnel gallery rows; 0 skips it (%(default)s)")
    p.add_argument("--funnel-queries", type=int, default=2048, help="funnel queries (default %(default)s)")
    args = p.parse_args(argv)
    if args.eval is None:
        args.eval = args.data / "dev"
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    figures: dict[str, Any] = {}
    for section in (recall_section, funnel_figures):
        figures.update(section(args))
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
