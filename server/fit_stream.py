"""Assembles a FitTransform stream into a Calibration and an optional EvalData, checking each part.

Every message is counted against the fit caps (:class:`~.fit_limits.StreamBudget`) before it is decoded or
kept, so an over-cap stream is refused (RESOURCE_EXHAUSTED) as soon as it passes a cap, not after it was
buffered whole. Doc pairs with ids form the evaluation gallery (and carry training relevance); eval-only
pairs are only gallery. Every evaluation query needs a relevant id (its recall is scored against them).
Covered by ``tests/test_client_transforms.py``, ``tests/test_fit_limits.py`` and ``tests/test_fit_validation.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from interlingua.v1 import transforms_pb2 as tpb

from . import validate as v
from .config import Limits
from .errors import InvalidArgument
from .fit_limits import StreamBudget
from .store import SpaceRow
from .transforms import Calibration
from .transforms.artefact import EvalData

__all__ = ["Assembler"]


class Assembler:
    """Collects a FitTransform stream into a Calibration and an optional EvalData, checking each part."""

    def __init__(self, source: SpaceRow, target: SpaceRow, limits: Limits) -> None:
        self.source, self.target = source, target
        self.budget = StreamBudget(limits)
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in ("dn", "dh", "qn", "qh")}
        self.labels: dict[str, list[int]] = {"doc": [], "query": []}
        self.doc_ids: list[str] = []
        self.gallery: dict[str, list[Any]] = {"ids": [], "new": [], "home": [], "labels": [], "eval_only": []}
        self.eval_q: list[tuple[np.ndarray, np.ndarray, list[np.ndarray]]] = []
        self.eval_ids: list[list[str]] = []
        self.eval_labels: list[int | None] = []
        self.fit_doc_ids: list[str | None] = []  #: per fitted doc pair (calibration row), its id if given
        self.query_relevant: list[list[str]] = []  #: per query pair, its relevant doc ids (training relevance)
        self.relevance_batches = 0

    def _pair(self, batch: tpb.PairBatch, i: int) -> tuple[np.ndarray, np.ndarray]:
        what = f"message {i}"
        xn = v.unpack_vectors(batch.source.data, batch.source.dim, self.source.dim, what=f"{what} source")
        xh = v.unpack_vectors(batch.target.data, batch.target.dim, self.target.dim, what=f"{what} target")
        if len(xn) != len(xh):
            raise InvalidArgument(f"{what}: {len(xn)} source vectors but {len(xh)} target vectors")
        if self.source.metric == "cosine":
            xn = v.normalize_rows(xn, what=f"{what} source")
        if self.target.metric == "cosine":
            xh = v.normalize_rows(xh, what=f"{what} target")
        return xn, xh

    def add_pairs(self, batch: tpb.PairBatch, i: int) -> None:
        if batch.side not in (tpb.PAIR_SIDE_DOC, tpb.PAIR_SIDE_QUERY):
            raise InvalidArgument(f"message {i}: pairs.side must be PAIR_SIDE_DOC or PAIR_SIDE_QUERY")
        xn, xh = self._pair(batch, i)
        n = len(xn)
        for name, values in (("labels", batch.labels), ("ids", batch.ids)):
            if values and len(values) != n:
                raise InvalidArgument(f"message {i}: {len(values)} {name} for {n} pairs")
        if batch.ids:
            self.budget.add("gallery", n, i)
        if not batch.eval_only:
            self.budget.add("pairs", n, i)
        if batch.ids:
            self.gallery["ids"].extend(batch.ids)
            self.gallery["labels"].extend(batch.labels or [None] * n)
            self.gallery["new"].append(xn)
            self.gallery["home"].append(xh)
            self.gallery["eval_only"].extend([batch.eval_only] * n)
        if batch.eval_only:
            if batch.side != tpb.PAIR_SIDE_DOC or not batch.ids:
                raise InvalidArgument(f"message {i}: eval_only pairs must be doc pairs with ids")
            return
        side = "doc" if batch.side == tpb.PAIR_SIDE_DOC else "query"
        if batch.relevant_offsets or batch.relevant_ids:
            if side != "query":
                raise InvalidArgument(f"message {i}: relevant_ids are training relevance of query pairs, not doc pairs")
            self.query_relevant.extend(_id_lists(batch.relevant_ids, batch.relevant_offsets, n, i))
            self.relevance_batches += 1
        elif side == "query":
            self.query_relevant.extend([] for _ in range(n))
        if side == "doc":
            self.fit_doc_ids.extend(batch.ids or [None] * n)
        self.parts["dn" if side == "doc" else "qn"].append(xn)
        self.parts["dh" if side == "doc" else "qh"].append(xh)
        self.labels[side].extend(batch.labels)

    def add_eval(self, e: tpb.EvalQueries, i: int) -> None:
        xn, xh = self._pair(tpb.PairBatch(source=e.source, target=e.target), i)
        self.budget.add("eval_queries", len(xn), i)
        id_lists = _id_lists(e.relevant_ids, e.relevant_offsets, len(xn), i)
        empty = [j for j, ids in enumerate(id_lists) if not ids]
        if empty:  # the report scores recall against them (evaluate: "relevant[q] must be a non-empty array")
            raise InvalidArgument(
                f"message {i}: evaluation query {len(self.eval_ids) + empty[0]} has no relevant ids; each "
                "evaluation query needs at least one (relevant_ids, cut by relevant_offsets)"
            )
        if e.labels and len(e.labels) != len(xn):
            raise InvalidArgument(f"message {i}: {len(e.labels)} labels for {len(xn)} evaluation queries")
        self.eval_labels.extend(e.labels or [None] * len(xn))
        self.eval_q.append((xn, xh, []))
        self.eval_ids.extend(id_lists)

    def calibration(self) -> Calibration:
        def stack(key: str, d: int) -> np.ndarray:
            return np.vstack(self.parts[key]) if self.parts[key] else np.zeros((0, d), np.float32)

        s, t = self.source.dim, self.target.dim
        labels = {}
        for side, n in (("doc", sum(map(len, self.parts["dn"]))), ("query", sum(map(len, self.parts["qn"])))):
            got = self.labels[side]
            if got and len(got) != n:
                raise InvalidArgument(f"{side} pairs: labels were given for {len(got)} of {n} pairs; give all or none")
            labels[side] = np.asarray(got, dtype=np.int64) if got else None
        return Calibration(
            stack("dn", s),
            stack("dh", t),
            stack("qn", s),
            stack("qh", t),
            labels["doc"],
            labels["query"],
            self._training_relevance(),
        )

    def _training_relevance(self) -> tuple[np.ndarray, ...] | None:
        """Query pair i's relevant doc-pair ids as calibration doc rows; None when no batch carried relevance."""
        if not self.relevance_batches:
            return None
        n_query = sum(map(len, self.parts["qn"]))
        if self.relevance_batches != len(self.parts["qn"]):
            raise InvalidArgument(
                f"training relevance was given for {self.relevance_batches} of {len(self.parts['qn'])} query "
                "batches; give it for all or none"
            )
        index = {pid: row for row, pid in enumerate(self.fit_doc_ids) if pid is not None}
        if len(index) != sum(pid is not None for pid in self.fit_doc_ids):
            raise InvalidArgument("doc pair ids must be unique")
        rows = []
        for qi, ids in enumerate(self.query_relevant[:n_query]):
            missing = [pid for pid in ids if pid not in index]
            if missing:
                raise InvalidArgument(
                    f"query pair {qi}: relevant ids not among the fitted doc pairs: {[m[:64] for m in missing[:3]]!r}"
                )
            rows.append(np.array([index[pid] for pid in ids], dtype=np.int64))
        return tuple(rows)

    def eval_set(self) -> EvalData | None:
        """The evaluation queries against the gallery of doc pairs with ids. When eval-only pairs are given
        and no evaluation query names a fitted pair, the gallery is the eval-only pairs alone (fitted pairs
        then carry ids only for training relevance)."""
        if not self.eval_q:
            return None
        ids, eval_only = self.gallery["ids"], np.asarray(self.gallery["eval_only"], dtype=bool)
        if len(set(ids)) != len(ids):
            raise InvalidArgument("doc pair ids must be unique")
        named = {pid for r in self.eval_ids for pid in r}
        keep = np.ones(len(ids), dtype=bool)
        if eval_only.any() and not any(pid in named for pid, e in zip(ids, eval_only, strict=True) if not e):
            keep = eval_only
        rows = np.flatnonzero(keep)
        index = {ids[j]: i for i, j in enumerate(rows)}
        relevant = []
        for qi, ids in enumerate(self.eval_ids):
            missing = [pid for pid in ids if pid not in index]
            if missing:
                raise InvalidArgument(f"evaluation query {qi}: relevant ids not among the doc pairs: {missing[:3]!r}")
            relevant.append(np.array([index[pid] for pid in ids], dtype=np.int64))
        g_labels_all = self.gallery["labels"]
        q_labels, g_labels = _all_or_none(self.eval_labels), _all_or_none([g_labels_all[j] for j in rows])
        if (q_labels is None) != (g_labels is None):
            raise InvalidArgument(
                "class labels need both sides: label every evaluation query and every doc pair with an id, or none"
            )
        return EvalData(
            np.vstack([q[0] for q in self.eval_q]),
            np.vstack([q[1] for q in self.eval_q]),
            np.vstack(self.gallery["new"])[rows],
            np.vstack(self.gallery["home"])[rows],
            relevant,
            q_labels,
            g_labels,
        )


def _id_lists(ids: Sequence[str], offsets: Sequence[int], n: int, i: int) -> list[list[str]]:
    """Split ``ids`` by ``offsets`` (n+1 entries from 0 to len(ids), not decreasing) into n lists."""
    offs = list(offsets)
    if len(offs) != n + 1 or offs[0] != 0 or offs[-1] != len(ids):
        raise InvalidArgument(f"message {i}: relevant_offsets needs n+1 = {n + 1} entries from 0 to len(relevant_ids)")
    if any(b < a for a, b in itertools.pairwise(offs)):
        raise InvalidArgument(f"message {i}: relevant_offsets must not decrease")
    values = list(ids)
    return [values[a:b] for a, b in itertools.pairwise(offs)]


def _all_or_none(labels: list[int | None]) -> np.ndarray | None:
    """(n,) int64 when every entry has a label, None when none has; a partial set is an error."""
    given = [x for x in labels if x is not None]
    if not given:
        return None
    if len(given) != len(labels):
        raise InvalidArgument(f"labels were given for {len(given)} of {len(labels)} items; give all or none")
    return np.asarray(given, dtype=np.int64)
