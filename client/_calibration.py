"""FitTransform streams: calibration pairs and evaluation queries to a header and batches of messages.

A stream is one ``FitHeader``, then ``PairBatch`` messages (doc pairs, query
pairs, then the eval-only gallery) and ``EvalQueries`` messages, each of at most
``batch_size`` rows packed as little-endian float32. :func:`fit_requests` checks
the cheap things up front (shapes (n, d), one source row per target row, one
label / id per pair, one relevant-id list per evaluation query) and then slices
rows lazily, so memory-mapped float16 ``.npy`` files stream through. Values
(NaN, dims against the spaces) are the server's to check. Covered by
``tests/test_client_transforms.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from interlingua.v1 import transforms_pb2

from ._exceptions import InvalidArgument
from ._wire import as_matrix, pack_vectors

__all__ = ["Gallery", "Pairs", "fit_requests"]

#: Row-aligned pairs: (source (n, d_source), target (n, d_target)).
Pairs = tuple[npt.ArrayLike, npt.ArrayLike]
#: An evaluation gallery: (ids (n,), source (n, d_source), target (n, d_target)).
Gallery = tuple[Sequence[str], npt.ArrayLike, npt.ArrayLike]


@dataclass
class _Part:
    """One run of messages of the same kind: rows of xn/xh, with per-row labels, ids or relevant ids."""

    side: transforms_pb2.PairSide.ValueType  # UNSPECIFIED for evaluation queries
    xn: npt.NDArray[Any]
    xh: npt.NDArray[Any]
    labels: npt.NDArray[np.int64] | None = None
    ids: Sequence[str] | None = None
    relevant: list[list[str]] | None = None
    eval_only: bool = False


def _pairs(pairs: Pairs, what: str) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    if not isinstance(pairs, tuple | list) or len(pairs) != 2:
        raise InvalidArgument(f"{what} must be a tuple (source (n, d), target (n, d))")
    xn, xh = as_matrix(pairs[0], f"{what} source"), as_matrix(pairs[1], f"{what} target")
    if xn.shape[0] != xh.shape[0]:
        raise InvalidArgument(f"{what}: {xn.shape[0]} source vectors but {xh.shape[0]} target vectors")
    return xn, xh


def _labels(labels: npt.ArrayLike | None, n: int, what: str) -> npt.NDArray[np.int64] | None:
    if labels is None:
        return None
    arr = np.asarray(labels)
    if arr.shape != (n,) or (arr.size and arr.dtype.kind not in "iu"):
        raise InvalidArgument(f"{what} must be {n} integers (one per pair), got shape {arr.shape} of {arr.dtype}")
    return arr.astype(np.int64)


def _ids(ids: Sequence[str] | None, n: int, what: str) -> Sequence[str] | None:
    if ids is not None and len(ids) != n:
        raise InvalidArgument(f"got {len(ids)} {what} for {n} pairs")
    return ids


def _relevant(relevant: Sequence[Sequence[str]], nq: int, what: str = "eval_relevant") -> list[list[str]]:
    """One list of ids per query; a bare str counts as one id, not as its characters."""
    if len(relevant) != nq:
        queries = "evaluation queries" if what == "eval_relevant" else "query pairs"
        raise InvalidArgument(f"got {len(relevant)} relevant-id lists ({what}) for {nq} {queries}")
    return [[r] if isinstance(r, str) else [str(pid) for pid in r] for r in relevant]


def fit_requests(
    header: transforms_pb2.FitHeader,
    *,
    doc_pairs: Pairs | None,
    query_pairs: Pairs | None,
    doc_labels: npt.ArrayLike | None,
    query_labels: npt.ArrayLike | None,
    doc_ids: Sequence[str] | None,
    eval_queries: Pairs | None,
    eval_relevant: Sequence[Sequence[str]] | None,
    eval_gallery: Gallery | None,
    batch_size: int,
    progress: bool,
    query_relevant: Sequence[Sequence[str]] | None = None,
) -> Iterator[transforms_pb2.FitTransformRequest]:
    """Checks the arguments now, then returns an iterator of the header and one message per batch."""
    if batch_size < 1:
        raise InvalidArgument(f"batch_size must be >= 1, got {batch_size}")
    parts: list[_Part] = []
    for side, pairs, labels, what in (
        (transforms_pb2.PAIR_SIDE_DOC, doc_pairs, doc_labels, "doc"),
        (transforms_pb2.PAIR_SIDE_QUERY, query_pairs, query_labels, "query"),
    ):
        if pairs is None:
            if what == "query" and query_relevant is not None:
                raise InvalidArgument("query_relevant was given without query_pairs")
            if labels is not None or (what == "doc" and doc_ids is not None):
                raise InvalidArgument(f"{what} labels or ids were given without {what}_pairs")
            continue
        xn, xh = _pairs(pairs, f"{what}_pairs")
        part = _Part(side, xn, xh, _labels(labels, len(xn), f"{what}_labels"))
        if what == "doc":
            part.ids = _ids(doc_ids, len(xn), "doc_ids")
        elif query_relevant is not None:
            if doc_ids is None:
                raise InvalidArgument("query_relevant names doc pairs by id: give doc_ids too")
            part.relevant = _relevant(query_relevant, len(xn), "query_relevant")
        parts.append(part)
    if eval_gallery is not None:
        if not isinstance(eval_gallery, tuple | list) or len(eval_gallery) != 3:
            raise InvalidArgument("eval_gallery must be a tuple (ids, source (n, d), target (n, d))")
        xn, xh = _pairs((eval_gallery[1], eval_gallery[2]), "eval_gallery")
        ids = _ids(eval_gallery[0], len(xn), "eval_gallery ids")
        parts.append(_Part(transforms_pb2.PAIR_SIDE_DOC, xn, xh, ids=ids, eval_only=True))
    if (eval_queries is None) != (eval_relevant is None):
        raise InvalidArgument("eval_queries and eval_relevant go together: give both or neither")
    if eval_queries is not None and eval_relevant is not None:
        if doc_ids is None and eval_gallery is None:
            raise InvalidArgument("evaluation queries need a gallery with ids: give doc_ids or eval_gallery")
        xn, xh = _pairs(eval_queries, "eval_queries")
        parts.append(_Part(transforms_pb2.PAIR_SIDE_UNSPECIFIED, xn, xh, relevant=_relevant(eval_relevant, len(xn))))
    return _messages(header, parts, batch_size, progress)


def _messages(
    header: transforms_pb2.FitHeader, parts: list[_Part], batch_size: int, progress: bool
) -> Iterator[transforms_pb2.FitTransformRequest]:
    yield transforms_pb2.FitTransformRequest(header=header)
    total = sum(len(p.xn) for p in parts)
    with tqdm(total=total, unit="pair", disable=not progress, desc=f"{header.name}: upload") as bar:
        for p in parts:
            n = len(p.xn)
            for i0 in range(0, n, batch_size):
                i1 = min(n, i0 + batch_size)
                xn, xh = pack_vectors(p.xn[i0:i1]), pack_vectors(p.xh[i0:i1])
                rel = [] if p.relevant is None else p.relevant[i0:i1]
                ids = [pid for r in rel for pid in r]
                offsets = [] if p.relevant is None else [0, *itertools.accumulate(len(r) for r in rel)]
                if p.side == transforms_pb2.PAIR_SIDE_UNSPECIFIED:
                    ev = transforms_pb2.EvalQueries(source=xn, target=xh, relevant_ids=ids, relevant_offsets=offsets)
                    yield transforms_pb2.FitTransformRequest(eval=ev)
                else:
                    batch = transforms_pb2.PairBatch(
                        side=p.side,
                        source=xn,
                        target=xh,
                        labels=[] if p.labels is None else p.labels[i0:i1].tolist(),
                        ids=[] if p.ids is None else list(p.ids[i0:i1]),
                        eval_only=p.eval_only,
                        relevant_ids=ids,
                        relevant_offsets=offsets,
                    )
                    yield transforms_pb2.FitTransformRequest(pairs=batch)
                bar.update(i1 - i0)
