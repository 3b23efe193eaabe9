"""``interlingua fit``: calibration pairs from ``.npy`` files, fitted by a server or here (``--offline``).

Pairs are two row-aligned files, NEW.npy (n, d_new) and HOME.npy (n, d_home),
any float dtype, memory-mapped. ``--eval-dir`` names a folder laid out like a
debdesc split (``old_doc.npy``, ``new_doc.npy``, ``old_query.npy``,
``new_query.npy``; float16 accepted) whose query i's one relevant item is doc i.

* Online, the pairs stream to the server (the eval queries with relevant ids
  ``"0".."n-1"`` and the docs as an eval-only gallery under those ids), then the
  command polls the fit with a progress bar and prints the report.
* Offline (``--offline OUT.npz``) it runs ``interlingua.server.transforms`` in
  this process, as the service would (rows L2-normalized for cosine spaces,
  ``holdout`` 0 meaning 0.1, the eval-dir report merged in, the config saved
  with its ``kind``), and writes the weights to OUT.npz (``np.savez`` of
  ``Transform.arrays()``) and a JSON sidecar OUT.json with the kind, dims, config,
  report and checksum (``interlingua.server.transforms.artefact.build_artefact``, as the server).

Covered by ``tests/test_cli.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from interlingua.jsonsafe import finite

from ._cli_common import RowIds, UsageError, load_array
from ._client import FIT_BAR, Client
from ._output import print_json, print_report, print_transforms

__all__ = ["fit_offline", "fit_online"]

EVAL_FILES = ("old_doc", "new_doc", "old_query", "new_query")


def _pair(paths: list[str] | None, what: str) -> tuple[npt.NDArray[Any], npt.NDArray[Any]] | None:
    """(new (n, d_new), home (n, d_home)) from two files, or None when not given."""
    if paths is None:
        return None
    xn, xh = load_array(paths[0], f"{what} (new)"), load_array(paths[1], f"{what} (home)")
    if xn.ndim != 2 or xh.ndim != 2 or len(xn) != len(xh):
        raise UsageError(f"{what}: {paths[0]} {xn.shape} and {paths[1]} {xh.shape} must be (n, d) with the same n")
    return xn, xh


def _eval_dir(path: str) -> dict[str, npt.NDArray[Any]]:
    """The four arrays of a debdesc-like split, checked: docs (n, d_*), queries (n, d_*), row i <-> row i."""
    arrays = {name: load_array(str(Path(path) / f"{name}.npy"), f"{name} of --eval-dir") for name in EVAL_FILES}
    shapes = {name: a.shape for name, a in arrays.items()}
    if any(a.ndim != 2 for a in arrays.values()) or len({s[0] for s in shapes.values()}) != 1:
        raise UsageError(f"--eval-dir {path}: query i's relevant doc is doc i, so all four need n rows; got {shapes}")
    for model in ("old", "new"):
        if shapes[f"{model}_doc"][1] != shapes[f"{model}_query"][1]:
            raise UsageError(f"--eval-dir {path}: {model}_doc and {model}_query differ in dim: {shapes}")
    return arrays


def _config(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        config = json.loads(text)
    except ValueError as err:
        raise UsageError(f"--config is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise UsageError(f"--config must be a JSON object, got {text!r}")
    return config


def _relevance(spec: str | None, n_query: int, n_doc: int) -> list[list[int]] | None:
    """``--relevance``: per query pair, its relevant doc-pair rows ('diagonal': row i; else a JSON file); None
    for none given ('none' also turns the server's pseudo relevance off, see docs/TRANSFORMS.md)."""
    if not spec or spec == "none":
        return None
    if spec == "diagonal":
        if n_query != n_doc:
            raise UsageError(f"--relevance diagonal needs as many query as doc pairs, got {n_query} and {n_doc}")
        return [[i] for i in range(n_query)]
    try:
        rows = json.loads(Path(spec).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"--relevance {spec}: {err}") from None
    ok = isinstance(rows, list) and len(rows) == n_query
    ok = ok and all(isinstance(r, list) and all(isinstance(j, int) and 0 <= j < n_doc for j in r) for r in rows)
    if not ok:
        raise UsageError(f"--relevance {spec} must be a JSON list of {n_query} lists of doc-pair rows in [0, {n_doc})")
    return [[int(j) for j in r] for r in rows]


def _inputs(args: argparse.Namespace) -> tuple[Any, Any, dict[str, npt.NDArray[Any]] | None]:
    docs, queries = _pair(args.doc_pairs, "--doc-pairs"), _pair(args.query_pairs, "--query-pairs")
    if docs is None and queries is None and args.kind != "chain":
        raise UsageError(f"fit --kind {args.kind} needs --doc-pairs, --query-pairs or both")
    return docs, queries, _eval_dir(args.eval_dir) if args.eval_dir else None


def fit_online(client: Client, args: argparse.Namespace) -> None:
    """Streams the pairs to the server, waits for the fit (unless ``--no-wait``) and prints the report."""
    docs, queries, ev = _inputs(args)
    config = _config(args.config)
    eval_kw: dict[str, Any] = {}
    relevance = _relevance(args.relevance, len(queries[0]) if queries else 0, len(docs[0]) if docs else 0)
    if args.relevance == "none":
        config["pseudo_relevance"] = False
    if relevance is not None:
        eval_kw["doc_ids"] = [f"fit:{i}" for i in range(len(docs[0]))]
        eval_kw["query_relevant"] = [[f"fit:{j}" for j in r] for r in relevance]
    if ev is not None:
        n = len(ev["new_doc"])
        eval_kw = {
            "eval_queries": (ev["new_query"], ev["old_query"]),
            "eval_relevant": [[str(i)] for i in range(n)],
            "eval_gallery": (RowIds(n), ev["new_doc"], ev["old_doc"]),
        }
    info = client.fit_transform(
        args.name,
        args.kind,
        source_space=args.source_space,
        target_space=args.target_space,
        doc_pairs=docs,
        query_pairs=queries,
        config=config,
        holdout=args.holdout,
        chain=args.chain,
        batch_size=args.batch_size,
        wait=not args.no_wait,
        timeout=args.wait_timeout,
        progress=not args.no_progress,
        **eval_kw,
    )
    if args.json or args.no_wait:
        print_transforms([info], args.json, sys.stdout)
        return
    print(f"transform {info.name} ({info.kind}, {info.source_space} -> {info.target_space}) is {info.state}")
    print_report(info.report, sys.stdout)


def _normalized(x: npt.NDArray[Any], metric: str, what: str) -> npt.NDArray[np.float32]:
    """x as float32, rows L2-normalized for cosine (as the service stores them)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise UsageError(f"{what} contains NaN or Inf")
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if (norms == 0).any():
            raise UsageError(f"{what}: row {int(np.flatnonzero(norms[:, 0] == 0)[0])} has zero norm")
        x = np.ascontiguousarray(x / norms, dtype=np.float32)
    return x


def fit_offline(args: argparse.Namespace) -> None:
    """Fits with the server's library in this process and saves OUT.npz + OUT.json; no server involved."""
    from interlingua.server.transforms import Calibration
    from interlingua.server.transforms.artefact import EvalData, build_artefact

    if args.kind == "chain":
        raise UsageError("a chain composes registered transforms: it cannot be fitted --offline")
    docs, queries, ev = _inputs(args)
    config = _config(args.config)
    relevance = _relevance(args.relevance, len(queries[0]) if queries else 0, len(docs[0]) if docs else 0)
    if args.relevance == "none":
        config["pseudo_relevance"] = False
    out = Path(args.offline)
    sidecar = out.with_suffix(".json")
    src, home = args.source_metric or args.home_metric, args.home_metric

    def side(pair: Any, what: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        if pair is None:
            return np.zeros((0, 1), np.float32), np.zeros((0, 1), np.float32)
        return _normalized(pair[0], src, f"{what} (new)"), _normalized(pair[1], home, f"{what} (home)")

    (dn, dh), (qn, qh) = side(docs, "--doc-pairs"), side(queries, "--query-pairs")
    if not len(dn):  # the empty side takes the other side's dims
        dn, dh = np.zeros((0, qn.shape[1]), np.float32), np.zeros((0, qh.shape[1]), np.float32)
    if not len(qn):
        qn, qh = np.zeros((0, dn.shape[1]), np.float32), np.zeros((0, dh.shape[1]), np.float32)
    with tqdm(total=100, disable=args.no_progress, desc=args.name, bar_format=FIT_BAR) as bar:

        def progress(stage: str, fraction: float) -> None:
            bar.set_description_str(f"{args.name}: {stage}")
            bar.update(round(100 * fraction) - bar.n)

        eval_data = None
        if ev is not None:
            xb_new, xq_new = (_normalized(ev[f"new_{s}"], src, f"new_{s}") for s in ("doc", "query"))
            xb_home, xq_home = (_normalized(ev[f"old_{s}"], home, f"old_{s}") for s in ("doc", "query"))
            eval_data = EvalData(xq_new, xq_home, xb_new, xb_home)
        try:
            art = build_artefact(
                args.kind,
                Calibration(
                    dn, dh, qn, qh, query_relevant=None if relevance is None else tuple(map(np.array, relevance))
                ),
                config,
                home_metric=home,
                holdout=args.holdout or 0.1,
                eval_data=eval_data,
                progress=progress,
            )
        except ValueError as err:
            raise UsageError(f"fit {args.name}: {err}") from None
    t = art.transform
    meta = {
        "name": args.name,
        "kind": args.kind,
        "source_space": args.source_space,
        "target_space": args.target_space,
        "home_metric": home,
        "d_in": t.d_in,
        "d_out": t.d_out,
        "config": art.config,
        "report": art.report,
        "checksum": art.checksum,
    }
    try:
        with open(out, "wb") as f:  # a file object: np.savez would add ".npz" to a bare path
            f.write(art.weights())
        sidecar.write_text(json.dumps(finite(meta), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    except OSError as err:
        raise UsageError(f"cannot write {out} or {sidecar}: {err}") from None
    if args.json:
        print_json([meta], sys.stdout)
        return
    print(f"transform {args.name} ({args.kind}, d {t.d_in} -> {t.d_out}) fitted offline: wrote {out} and {sidecar}")
    print_report(meta["report"], sys.stdout)
