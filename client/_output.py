"""Output of the CLI: aligned text tables by default, one JSON object per line with ``--json``.

Score padding (ids ``""``, scores +-inf) is dropped from search output, so the
JSON stays strict (no ``Infinity``). A transform's report (the flat dict of
``interlingua.server.transforms.evaluate``) prints as a before/after table:
one row per metric, one column per way of searching (home->home is the service
before the transform, T(new)->home after it), then the compatibility figures.
Covered by ``tests/test_cli.py``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from interlingua.jsonsafe import finite

from ._types import (
    CollectionInfo,
    CollectionMove,
    IndexRecommendation,
    OperatingPoint,
    RouteInfo,
    RoutesListing,
    SearchResult,
    Space,
    TransformInfo,
)

__all__ = [
    "print_collection",
    "print_collections",
    "print_json",
    "print_move",
    "print_recommendation",
    "print_report",
    "print_routes",
    "print_routes_listing",
    "print_search",
    "print_spaces",
    "print_table",
    "print_transform",
    "print_transforms",
    "report_recall",
]

#: Columns of the before/after table: report key prefix -> heading.
_MODES = {
    "home": "HOME->HOME (BEFORE)",
    "new": "NEW->NEW (RE-INDEX)",
    "raw": "NEW->HOME (RAW)",
    "transformed": "T(NEW)->HOME (AFTER)",
}
#: Compatibility figures of a report, in print order: key -> label.
_FIGURES = {
    "ecc_margin": "ECC margin (after - before R@k, >= 0 passes)",
    "retention": "retention (after / before R@k; the gate's min_retention)",
    "retention_vs_new": "after / re-index R@k",
    "neg_flip": "negative flips (top-1 right before, wrong after)",
    "nbr_agreement": "top-k agreement of after with re-index",
    "ortho_error": "||W^T W - I||_F",
    "us_per_query": "microseconds per query, in a batch of us_per_query_batch",
    "us_per_query_batch": "us_per_query_batch (queries)",
    "nq": "evaluation queries",
    "nb": "evaluation gallery",
}


#: Retention estimated on the held-out calibration slice (training relevance), in print order.
_ESTIMATE = ("heldout_task_r10", "heldout_home_r10", "estimated_retention", "retention_estimate")


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def print_json(objs: Sequence[Any], out: TextIO) -> None:
    """One JSON object per line (strict JSON: non-finite floats as strings); dataclasses via ``asdict``."""
    for obj in objs:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            obj = dataclasses.asdict(obj)
        print(json.dumps(finite(obj), allow_nan=False), file=out)


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO) -> None:
    """Left-aligned columns separated by two spaces; numbers right-aligned."""
    cells = [[str(c) for c in header], *[[_cell(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [bool(rows) and all(_is_number(row[i]) for row in rows) for i in range(len(header))]
    for r in cells:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)]
        print("  ".join(parts).rstrip(), file=out)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def print_spaces(spaces: Sequence[Space], as_json: bool, out: TextIO) -> None:
    if as_json:
        print_json(spaces, out)
        return
    rows = [(s.name, s.dim, s.metric, _when(s.created_at), s.description) for s in spaces]
    print_table(("NAME", "DIM", "METRIC", "CREATED (UTC)", "DESCRIPTION"), rows, out)


def print_collections(infos: Sequence[CollectionInfo], as_json: bool, out: TextIO) -> None:
    if as_json:
        print_json(infos, out)
        return
    header = ("NAME", "HOME SPACE", "INDEX", "STATE", "POINTS", "INDEXED", "FRESH", "DELETED", "SEQ", "CKPT")
    rows = [
        (
            c.name,
            c.home_space,
            c.index_spec,
            c.state,
            c.num_points,
            c.indexed_vectors,
            c.fresh_vectors,
            c.deleted_labels,
            c.last_sequence,
            c.checkpoint_sequence,
        )
        for c in infos
    ]
    print_table(header, rows, out)


def print_collection(info: CollectionInfo, as_json: bool, out: TextIO) -> None:
    """One collection, one field per line (vectors per space included)."""
    if as_json:
        print_json([info], out)
        return
    fields = dataclasses.asdict(info)
    fields["created_at"] = _when(info.created_at) + " UTC"
    fields["vectors_per_space"] = ", ".join(f"{k}={v}" for k, v in sorted(info.vectors_per_space.items()))
    print_table(("FIELD", "VALUE"), [(k, str(v)) for k, v in fields.items()], out)


def print_move(move: CollectionMove, as_json: bool, out: TextIO) -> None:
    """One line: where the collection went, what was copied and caught up, and the verification's figures."""
    if as_json:
        print_json([move], out)
        return
    c = move.collection
    print(
        f"moved collection {c.name} to {c.backend} at {c.backend_uri}: {move.points_copied} points"
        f" ({move.vectors_copied} vectors) copied, {move.writes_caught_up} writes and {move.deletes_caught_up} deletes"
        f" caught up; verified {move.num_points} points, spot searches {move.spot_queries} (top-1 self"
        f" {move.spot_top1_self_milvus}/{move.spot_queries}, agreement {move.spot_top1_agreement:.3f}, top-10 overlap"
        f" {move.spot_top10_overlap:.3f}); {move.seconds:.1f}s, writes paused {move.write_pause_seconds:.2f}s",
        file=out,
    )


def _params(p: OperatingPoint) -> str:
    named = (("ef_search", p.ef_search), ("nprobe", p.nprobe), ("k_factor", p.k_factor))
    return " ".join(f"{name}={v}" for name, v in named if v) or "-"


def print_recommendation(rec: IndexRecommendation, as_json: bool, out: TextIO) -> None:
    """The advisor's frontier, the chosen point marked ``*``, then one line on what was measured."""
    if as_json:
        print_json([rec], out)
        return
    header = ("", "INDEX SPEC", "PARAMS", f"RECALL@{rec.k}", "QPS", "BYTES/VEC", "BUILD S")
    rows = [
        ("*" if p == rec.chosen else "", p.index_spec, _params(p), f"{p.recall:.4f}", round(p.qps), p.bytes_per_vector,
         f"{p.build_seconds:.2f}")
        for p in rec.frontier
    ]  # fmt: skip
    print_table(header, rows, out)
    queries = "held-out stored vectors" if rec.held_out_queries else "given queries"
    c = rec.chosen
    print(
        f"chosen for Recall@{rec.k} >= {rec.target_recall:g}: {c.index_spec} {_params(c)} (recall {c.recall:.4f},"
        f" {c.qps:.0f} QPS); {rec.points_measured} points measured on {rec.sample_points} vectors,"
        f" {rec.num_queries} {queries}, {rec.batch_size}-query batches, {rec.seconds:.1f}s",
        file=out,
    )


def print_search(result: SearchResult, first_row: int, as_json: bool, out: TextIO) -> None:
    """Hits of each query (numbered from ``first_row``), padding dropped."""
    route = dataclasses.asdict(result.route)
    for i in range(result.ids.shape[0]):
        keep = [j for j in range(result.ids.shape[1]) if result.ids[i, j] != ""]
        ids = [str(result.ids[i, j]) for j in keep]
        scores = [float(result.scores[i, j]) for j in keep]
        payloads = None if result.payloads is None else [result.payloads[i][j] for j in keep]
        if as_json:
            obj: dict[str, Any] = {"query": first_row + i, "ids": ids, "scores": scores}
            if payloads is not None:
                obj["payloads"] = payloads
            print_json([{**obj, "route": route, "exact": result.exact}], out)
            continue
        how = "exact" if result.exact else "index"
        r = result.route
        print(f"query {first_row + i}  ({r.query_space} -> {r.home_space} via {r.transform}, {how})", file=out)
        header = ["RANK", "ID", "SCORE"] + (["PAYLOAD"] if payloads is not None else [])
        rows = [
            [rank, id_, score] + ([json.dumps(payloads[rank])] if payloads is not None else [])
            for rank, (id_, score) in enumerate(zip(ids, scores, strict=True))
        ]
        print_table(header, rows, out)


def _or_dash(value: Any) -> Any:
    return "-" if value is None or value == "" else value


def _k(report: dict[str, Any]) -> int:
    k = report.get("k")
    return k if isinstance(k, int) else 10


def report_recall(report: dict[str, Any]) -> float | None:
    """R@k (k of the report, 10 by default) of transformed new->home queries, or None without evaluation."""
    value = report.get(f"transformed_r{_k(report)}")
    return float(value) if isinstance(value, int | float) else None


def print_report(report: dict[str, Any], out: TextIO) -> None:
    """The before/after table of an evaluation, the label-free held-out figures and the fit's numbers,
    as tables separated by blank lines."""
    tables: list[tuple[Sequence[str], Sequence[Sequence[Any]]]] = []
    k = _k(report)
    metrics = {"r1": "R@1", f"r{k}": f"R@{k}", f"mrr{k}": f"MRR@{k}", "cmc1": "CMC@1", "cmc5": "CMC@5", "map": "mAP"}
    rows: list[Sequence[Any]] = [
        [label, *(_or_dash(report.get(f"{mode}_{m}")) for mode in _MODES)]
        for m, label in metrics.items()
        if any(f"{mode}_{m}" in report for mode in _MODES)
    ]
    if rows:
        tables.append((("METRIC", *_MODES.values()), rows))
        figures = [(label, _or_dash(report[key])) for key, label in _FIGURES.items() if key in report]
        tables.append((("FIGURE", "VALUE"), figures))
    sides = [s for s in ("query", "doc") if any(key.startswith(f"{s}_xid_") for key in report)]
    if sides:
        kx = next((int(m.group(1)) for key in report if (m := re.fullmatch(r"\w+_xid_mrr(\d+)", key))), 10)
        keys = ("n", "xid_r1", f"xid_r{kx}", f"xid_mrr{kx}", "nbr_agreement")
        header = ("HELD-OUT PAIRS", "N", "XID R@1", f"XID R@{kx}", f"XID MRR@{kx}", "TOP-K AGREEMENT")
        tables.append((header, [[s, *(_or_dash(report.get(f"{s}_{m}")) for m in keys)] for s in sides]))
    estimate = [(key, _or_dash(report.get(key))) for key in _ESTIMATE if key in report]
    if estimate:
        tables.append((("HELD-OUT TASK (NO EVALUATION QUERIES NEEDED)", "VALUE"), estimate))
    fit = report.get("fit")
    if isinstance(fit, dict):
        scalars = [(f"fit.{key}", _or_dash(v)) for key, v in fit.items() if isinstance(v, int | float | str | None)]
        if scalars:
            tables.append((("FIT", "VALUE"), scalars))
    if not tables:
        print("(no report)", file=out)
    for i, table in enumerate(tables):
        if i:
            print(file=out)
        print_table(*table, out)


def _state(t: TransformInfo) -> str:
    if t.state == "fitting":
        return f"fitting: {t.stage} {t.progress:.0%}"
    return t.state


def print_transforms(infos: Sequence[TransformInfo], as_json: bool, out: TextIO) -> None:
    if as_json:
        print_json(infos, out)
        return
    header = ("NAME", "KIND", "SOURCE -> TARGET", "STATE", "R@10 T(NEW)->HOME", "ECC MARGIN", "CREATED (UTC)")
    rows = [
        (
            t.name,
            t.kind,
            f"{t.source_space} -> {t.target_space}",
            _state(t),
            _or_dash(report_recall(t.report)),
            _or_dash(t.report.get("ecc_margin")),
            _when(t.created_at),
        )
        for t in infos
    ]
    print_table(header, rows, out)


def print_transform(info: TransformInfo, as_json: bool, out: TextIO) -> None:
    """One transform, one field per line (config as JSON), then its report (:func:`print_report`)."""
    if as_json:
        print_json([info], out)
        return
    fields = dataclasses.asdict(info)
    del fields["report"]
    fields["config"] = json.dumps(info.config, sort_keys=True)
    fields["created_at"] = _when(info.created_at) + " UTC"
    fields["progress"] = f"{info.progress:.0%}"
    print_table(("FIELD", "VALUE"), [(k, str(v)) for k, v in fields.items()], out)
    if info.state == "ready":
        print(file=out)
        print_report(info.report, out)


def print_routes(routes: Sequence[RouteInfo], as_json: bool, out: TextIO) -> None:
    if as_json:
        print_json(routes, out)
        return
    header = ("COLLECTION", "QUERY SPACE", "HOME SPACE", "TRANSFORM", "SHADOW", "ACTIVATED (UTC)", "DEACTIVATED (UTC)")
    rows = [
        (
            r.collection,
            r.query_space,
            r.home_space,
            (r.transform or "(removed)") + (" (forced)" if r.forced else ""),
            _or_dash(r.shadow),
            _when(r.activated_at),
            _when(r.deactivated_at),
        )
        for r in routes
    ]
    print_table(header, rows, out)


def print_routes_listing(listing: RoutesListing, as_json: bool, out: TextIO) -> None:
    """The live routes, then the history (newest first); with ``--json`` one object per route with ``"live"``."""
    if as_json:
        for live, routes in ((True, listing.active), (False, listing.history)):
            print_json([{**dataclasses.asdict(r), "live": live} for r in routes], out)
        return
    for title, routes in (("active routes:", listing.active), ("history (newest first):", listing.history)):
        print(title, file=out)
        if routes:
            print_routes(routes, False, out)
        else:
            print("  (none)", file=out)
