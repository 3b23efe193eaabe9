"""Output of the CLI: aligned text tables by default, one JSON object per line with ``--json``.

Score padding (ids ``""``, scores +-inf) is dropped from search output, so the
JSON stays strict (no ``Infinity``). Covered by ``tests/test_cli.py``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from ._types import CollectionInfo, SearchResult, Space

__all__ = [
    "print_collection",
    "print_collections",
    "print_json",
    "print_search",
    "print_spaces",
    "print_table",
]


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def print_json(objs: Sequence[Any], out: TextIO) -> None:
    """One JSON object per line; dataclasses are converted with ``asdict``."""
    for obj in objs:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            obj = dataclasses.asdict(obj)
        print(json.dumps(obj, allow_nan=False), file=out)


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
