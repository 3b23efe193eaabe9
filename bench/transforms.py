"""Every fitted transform kind on debdesc: fit on ``fit/``, score new-model queries against the old gallery of ``dev/``.

Each new -> home kind (``CROSS_KINDS``: the home -> home ``HOME_KINDS`` left out) is fitted with
its default config by :func:`fit_transform` on all 10k doc pairs and 10k query pairs of the fit
split (``holdout=0``; the kinds that tune a hyper-parameter do it on their own seeded slice),
then :func:`evaluate` searches the 20k dev docs with the 20k dev queries (query i's only
relevant doc is doc i; cosine; exact ``faiss.knn``, k=10). The table has the baselines
home->home (old_query vs old_doc), new->new (new_query vs new_doc) and raw new->home
(new_query vs old_doc), then T(new)->home per kind; the baselines' searches are shared
across kinds (``evaluate(..., cache=)``). A torch kind that does not import is skipped with a note.
Progress goes to stderr; the report to stdout, and its last line is one JSON object. Runs on one
thread (torch, FAISS; set ``OPENBLAS_NUM_THREADS=1`` for numpy too) so it can share the machine.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/transforms.py [--data DIR] [--kinds procrustes,affine] [--n N]
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from interlingua.server.transforms.base import Calibration
from interlingua.server.transforms.evaluate import evaluate
from interlingua.server.transforms.fit import HOME_KINDS, KINDS, fit_transform, fitter

CROSS_KINDS = tuple(k for k in KINDS if k not in HOME_KINDS)  #: new -> home maps (home -> home kinds excluded)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / ".." / "shared" / "data" / "debdesc"
K = 10
FILES = ("new_doc", "old_doc", "new_query", "old_query")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_split(folder: Path, n: int | None) -> dict[str, np.ndarray]:
    """The four (n, 384) arrays of one split as float32 (stored float16, L2-normalized)."""
    out = {}
    for name in FILES:
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise SystemExit(f"{path} not found: pass --data, a folder with fit/ and dev/ debdesc splits")
        out[name] = np.ascontiguousarray(np.load(path, mmap_mode="r")[:n], dtype=np.float32)
    return out


def fmt(v: Any, spec: str = ".4f") -> str:
    """A table cell: "–" for a missing figure."""
    return "–" if v is None else format(v, spec)


def row(name: str, r: dict[str, Any], prefix: str, fit_s: float | None = None) -> str:
    """One markdown row; a baseline (prefix home/new/raw) has no compatibility figures."""
    cells = [fmt(r[f"{prefix}_r1"]), fmt(r[f"{prefix}_r{K}"]), fmt(r[f"{prefix}_mrr{K}"])]
    if prefix == "transformed":
        cells += [fmt(r["ecc_margin"], "+.4f"), fmt(r["retention"]), fmt(r["neg_flip"]), fmt(r["nbr_agreement"])]
        cells += [fmt(r["ortho_error"], ".3g"), fmt(r["us_per_query"], ".2f"), fmt(fit_s, ".1f")]
    else:
        cells += ["–"] * 7
    return f"| {name} | " + " | ".join(cells) + " |"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with fit/ and dev/ (default %(default)s)")
    p.add_argument("--kinds", default=",".join(CROSS_KINDS), help="comma-separated kinds to fit (default: all)")
    p.add_argument("--n", type=int, default=None, help="use only the first N rows of each split (quick runs)")
    p.add_argument("--threads", type=int, default=1, help="torch and FAISS threads (default 1)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    kinds = [k for k in args.kinds.split(",") if k]
    bad = sorted(set(kinds) - set(CROSS_KINDS))
    if bad:
        raise SystemExit(f"unknown kind(s) {', '.join(bad)}; known: {', '.join(CROSS_KINDS)}")
    fit, dev = load_split(args.data / "fit", args.n), load_split(args.data / "dev", args.n)
    cal = Calibration(fit["new_doc"], fit["old_doc"], fit["new_query"], fit["old_query"])
    eval_kw = {"xq_new": dev["new_query"], "xq_home": dev["old_query"], "xb_new": dev["new_doc"]}
    eval_kw["xb_home"] = dev["old_doc"]
    print(f"# transforms: {time.strftime('%Y-%m-%d %H:%M')}; data {args.data.resolve()}")
    print(f"# fit: {len(cal.doc_new)} doc + {len(cal.query_new)} query pairs; dev: {len(dev['new_query'])} queries,")
    print(f"# {len(dev['old_doc'])} docs; cosine, k={K}; threads={args.threads}; new = e5-small, home = MiniLM-L6")
    cache: dict[str, Any] = {}
    reports: dict[str, tuple[dict[str, Any], float]] = {}
    notes = []
    for kind in kinds:
        try:
            fn = fitter(kind)
        except ImportError as e:
            notes.append(f"{kind}: skipped, not importable ({e})")
            log(notes[-1])
            continue
        config = {"threads": args.threads} if "threads" in inspect.signature(fn).parameters else {}
        log(f"fitting {kind} {config}")
        t0 = time.perf_counter()
        result, _ = fit_transform(kind, cal, config, holdout=0.0)
        fit_s = time.perf_counter() - t0
        log(f"{kind}: fitted in {fit_s:.1f}s; evaluating")
        reports[kind] = evaluate(result.transform, home_metric="cosine", k=K, cache=cache, **eval_kw), fit_s
        log(f"{kind}: R@10 {reports[kind][0][f'transformed_r{K}']:.4f}; info {json.dumps(result.info, default=str)}")
    if not reports:
        raise SystemExit("no kind was fitted")
    first = next(iter(reports.values()))[0]
    print("| search | R@1 | R@10 | MRR@10 | ECC margin | retention | neg-flip | nbr-agreement | ‖WᵀW−I‖_F ", end="")
    print("| µs/query | fit s |")
    print("|---|" + "---:|" * 10)
    print(row("home->home", first, "home"))
    print(row("new->new", first, "new"))
    print(row("raw new->home", first, "raw"))
    for kind, (r, fit_s) in reports.items():
        print(row(f"{kind} T(new)->home", r, "transformed", fit_s))
    for note in notes:
        print(f"\n_{note}_")
    figures: dict[str, Any] = {f"{kind}_r10": r[f"transformed_r{K}"] for kind, (r, _) in reports.items()}
    figures.update(home_r10=first[f"home_r{K}"], new_r10=first[f"new_r{K}"], raw_r10=first[f"raw_r{K}"])
    figures["skipped"] = [n.split(":")[0] for n in notes]
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
