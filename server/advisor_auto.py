"""``index_spec="auto"`` collections: the advisor's choice, rebuilt onto, tuned on the whole index.

:func:`auto_rebuild` serves ``index_spec="auto"`` collections from the maintenance thread: once one
holds :data:`AUTO_MIN_POINTS` live points it runs the advisor (``advisor.py``) at the collection's
target (k = 10; the fastest point beating it by :data:`AUTO_MARGIN` where one does) and rebuilds
the collection onto it (:func:`~.compaction.rebuild_onto`: beside the live index, one reference
swap). One advisor run at a time per process (``advisor.RUN_LOCK``).

The sample's spec carries over to the whole collection; its search parameters do not (an IVF list
or an HNSW search covers more points, the refine stage sees more near-ties: on 1M debdesc vectors
the sample's nprobe 48 / k_factor 4, 0.958 on 100k, gave 0.926). So after the swap the same
maintenance step tunes the point on the whole live index (:func:`tune_collection`):
:data:`TUNE_QUERIES` seeded stored vectors of the sealed index are the queries, each left out of
its own results; their exact neighbours come from ``faiss.knn`` over every indexed live vector;
efSearch (HNSW) or nprobe (IVF) is swept upward from the advised value (:data:`TUNE_STEPS_DOWN`),
each with the smallest refine k_factor that reaches the target plus
:data:`AUTO_MARGIN` (:func:`_sweep`), searched with the SearchParameters and IDSelector a search
builds while searches and writes go on; the fastest reaching setting (timed as the advisor times,
:data:`TUNE_TIME_SECONDS` each) becomes the collection's search defaults, published with the
snapshot and stored as its operating point (:func:`set_defaults`), else the most accurate one,
which ``advisor_status`` says. Stored vectors are easier queries on the whole index than on the
sample (their near-duplicates are all there), so the sweep corrects an under-reach they show and
never goes below the advised setting. As the collection grows the pass runs again at
:data:`RETUNE_GROWTH` times the points of the last one (and the advisor too when it falls short
of the target), and the advisor runs again, spec and all, at :data:`READVISE_GROWTH` times the
points it advised on. Covered by ``tests/test_advisor.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import faiss
import numpy as np

from .advisor import (
    AUTO_K,
    BATCH,
    EF_SEARCH,
    K_FACTORS,
    NPROBE,
    RUN_LOCK,
    SEED,
    OperatingPoint,
    choose,
    recall_at_k,
    recommend_collection,
    time_point,
)
from .compaction import rebuild_onto
from .errors import FailedPrecondition
from .index_spec import FAISS_METRIC, IndexSpec, search_params
from .query_sample import MIN_QUERIES
from .segment_snapshot import bit_slice

if TYPE_CHECKING:
    from .collection_index import CollectionIndex
    from .collection_spec import CollectionSpec

__all__ = [
    "AUTO_CANDIDATES",
    "AUTO_K",
    "AUTO_MARGIN",
    "AUTO_MIN_POINTS",
    "READVISE_GROWTH",
    "RETUNE_GROWTH",
    "TUNE_QUERIES",
    "Tuning",
    "auto_rebuild",
    "set_defaults",
    "stored_status",
    "tune_collection",
]

log = logging.getLogger(__name__)

AUTO_MIN_POINTS = 10_000  #: live points before an ``auto`` collection runs the advisor
AUTO_RETRY_SECONDS = 300.0  #: wait after an ``auto`` advisor run or rebuild that raised
#: an ``auto`` collection's choice must beat its target by this much where a point does: the sample
#: flatters (held-out stored vectors are easier queries than real ones, and the collection grows)
AUTO_MARGIN = 0.01
#: ``auto`` collections: the specs the advisor measures (empty: :func:`default_candidates`)
AUTO_CANDIDATES: tuple[str, ...] = ()
#: an ``auto`` collection's search defaults are tuned again on the whole index once its live points
#: reach this many times those of the last tuning...
RETUNE_GROWTH = 2.0
#: ...and the advisor runs again (spec and all) once they reach this many times those it advised on,
#: or when a re-tuning cannot reach the target
READVISE_GROWTH = 4.0
TUNE_QUERIES = 500  #: stored vectors (seeded, left out of their own results) the tuning pass searches
TUNE_GT_BATCH = 256  #: queries per brute-force ground-truth batch
TUNE_TIME_SECONDS = 0.5  #: each setting that reaches the goal is timed for at least this long
#: the tuning sweep starts this many grid steps below the advised ef_search / nprobe / k_factor
#: (0: at them, upward only). Not lower by default: held-out stored vectors are easier queries on
#: the whole index than on the sample (their near-duplicates are all there), so a setting below
#: the advised one can measure well and miss on real queries (200k tiled debdesc: nprobe 16,
#: k_factor 2 measured 0.980 on stored vectors and gave 0.884 on the real queries; the advised
#: nprobe 64, k_factor 4 gave 0.971)...
TUNE_STEPS_DOWN = 0
#: ...and goes on this many ef_search / nprobe steps past the first setting that reaches the goal
#: (each with a smaller k_factor), or, with none reaching, while a step gains more than this recall
TUNE_STEPS_UP = 3
TUNE_MIN_GAIN = 0.0005
#: the tuning pass's grids (a larger collection may need a larger k_factor than the sample did)
TUNE_EF_SEARCH = (*EF_SEARCH, 1536, 2048)
TUNE_NPROBE = (*NPROBE, 768, 1024, 1536, 2048)
TUNE_K_FACTORS = (*K_FACTORS, 64)


@dataclass(frozen=True)
class Tuning:
    """One tuning pass: the setting chosen on the whole live index, as an operating point."""

    point: OperatingPoint  #: the spec with the chosen setting, its recall and QPS on the whole index
    reached: bool  #: its recall reaches ``goal`` (else it is the best recall measured)
    goal: float
    points: int  #: indexed live points searched
    queries: int
    settings: int  #: settings whose recall was measured
    seconds: float
    recent: bool = False  #: the queries were the collection's recent ones (query_sample.py), not stored vectors

    def text(self) -> str:
        """``tuned on 20000 points: nprobe=8 k_factor=4 (Recall@10 0.9712, 9120 QPS on 500 queries)``."""
        p = self.point
        what = "recent queries" if self.recent else "held-out stored vectors"
        how = f"(Recall@{AUTO_K} {p.recall:.4f}, {p.qps:.0f} QPS on {self.queries} {what})"
        params = p.params() or "no parameters"
        if self.reached:
            return f"tuned on {self.points} points: {params} {how}"
        return (
            f"tuned on {self.points} points: no setting reached Recall@{AUTO_K} >= {self.goal:.4g};"
            f" the best, {params}, {how}"
        )


def _from_step(grid: Sequence[int], value: int) -> list[int]:
    """``grid`` from :data:`TUNE_STEPS_DOWN` steps below ``value``'s place on (0: all of it)."""
    i = sum(1 for g in grid if g < value) if value else 0
    return list(grid[max(0, i - TUNE_STEPS_DOWN) :])


def _knobs(spec: IndexSpec, primary: int, k_factor: int) -> dict[str, int]:
    out: dict[str, int] = {}
    if primary:
        out["ef_search" if spec.is_hnsw else "nprobe"] = primary
    if k_factor:
        out["k_factor"] = k_factor
    return out


def _drop_self(I: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Rows of k + 1 labels, shape (nq, k + 1), less each query's own label ``own[i]`` (the last
    one where the row lacks it): (nq, k). A stored vector finds itself; leaving it out measures the
    neighbours a query not in the collection would want."""
    is_self = own[:, None] == I
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(I, order, axis=1)


def _sweep(
    evaluate: Callable[[int, int], float], primary: Sequence[int], k_factors: Sequence[int], goal: float
) -> tuple[list[tuple[int, int, float]], list[tuple[int, int, float]]]:
    """Recall of settings (primary knob, k_factor), the primary knob ascending, each with the
    smallest k_factor that reaches ``goal``: the largest k_factor still useful first (below the one
    a smaller primary needed: a larger one at a larger primary is slower), then smaller ones until
    one falls short (recall grows with both knobs). Stops :data:`TUNE_STEPS_UP` primary values past
    the first that reaches, once the smallest k_factor reaches, or when, with nothing reaching, a
    larger primary gains at most :data:`TUNE_MIN_GAIN`. Returns (the reaching settings, every
    setting measured)."""
    reaching: list[tuple[int, int, float]] = []
    measured: list[tuple[int, int, float]] = []
    limit, prev_best, after = len(k_factors), -1.0, 0

    def measure(p: int, j: int) -> float:
        r = evaluate(p, k_factors[j])
        measured.append((p, k_factors[j], r))
        return r

    for p in primary:
        if reaching:
            after += 1
            if after > TUNE_STEPS_UP:
                break
        r = measure(p, limit - 1)
        if r < goal:
            if not reaching and r <= prev_best + TUNE_MIN_GAIN:
                break
            prev_best = max(prev_best, r)
            continue
        j = limit - 1
        while j > 0 and (r_lower := measure(p, j - 1)) >= goal:
            j, r = j - 1, r_lower
        reaching.append((p, k_factors[j], r))
        limit = j
        if limit == 0:
            break
    return reaching, measured


def tune_collection(
    col: CollectionIndex, start: OperatingPoint, goal: float, k: int = AUTO_K, queries: np.ndarray | None = None
) -> Tuning | None:
    """Tunes ``col``'s search defaults on its whole sealed index: ``queries`` (recent real ones, shape
    (nq, home dim), as ``pipeline.run`` sees them before the basis: query_sample.py) or else
    :data:`TUNE_QUERIES` seeded stored vectors of it are the queries (each left out of its own
    results), their exact k nearest live
    neighbours are computed by brute force (``faiss.knn``, in batches of :data:`TUNE_GT_BATCH`), and
    the spec's knobs are swept from ``start``'s setting (:func:`_from_step`, :func:`_sweep`) with the
    SearchParameters and IDSelector a search builds, on the live index while searches go on. The
    fastest setting reaching ``goal`` (timed as :func:`time_point` times) is chosen, else the most
    accurate. None when there is nothing to tune on yet."""
    t0 = time.perf_counter()
    seg = col.segments
    with col.maint_lock:  # no renumbering between the snapshot and the read
        s = seg.snapshot
        # a flat (fast-scan) PQ base takes no parameters nor selector: not tuned
        if col.dropped or s.sealed is None or s.spec is None or not s.spec.takes_params:
            return None
        labels, x = col.store.home_vectors_from(col.row.cid, 0, col.home.dim)
    spec = s.spec
    keep = labels < s.nsealed
    keep[keep] = bit_slice(s.alive, 0, s.nsealed)[labels[keep]]  # alive in s and still stored
    labels = labels[keep]
    n = len(labels)
    if n < 2 * (k + 1):
        return None
    xb = np.ascontiguousarray(col.index_view(col.to_basis(x[keep])), dtype=np.float32)
    del x
    sel, bitmap = None, None
    if n < s.nsealed:  # only the labels read: searched and ground truth over the same points
        member = np.zeros(s.nsealed, dtype=bool)
        member[labels] = True
        bitmap = np.packbits(member, bitorder="little")
        sel = faiss.IDSelectorBitmap(s.nsealed, faiss.swig_ptr(bitmap))
    own: np.ndarray | None = None
    if queries is not None:  # real queries: not in the collection, nothing to leave out
        xq = np.ascontiguousarray(col.index_view(col.to_basis(queries, "query")), dtype=np.float32)
        nq, kk = len(xq), k
    else:
        nq, kk = min(TUNE_QUERIES, n // 2), k + 1
        rows = np.sort(np.random.default_rng(SEED).choice(n, nq, replace=False))
        xq, own = np.ascontiguousarray(xb[rows]), labels[rows]
    gt = np.empty((nq, kk), dtype=np.int64)
    for b in range(0, nq, TUNE_GT_BATCH):
        _, pos = faiss.knn(xq[b : b + TUNE_GT_BATCH], xb, kk, metric=FAISS_METRIC[col.home.metric])
        gt[b : b + TUNE_GT_BATCH] = labels[pos]
    del xb
    if own is not None:
        gt = _drop_self(gt, own, k)
    index = s.sealed

    def evaluate(primary: int, k_factor: int) -> float:
        knobs = _knobs(spec, primary, k_factor)
        p = search_params(
            index,
            ef_search=knobs.get("ef_search"),
            nprobe=knobs.get("nprobe"),
            k_factor=knobs.get("k_factor"),
            sel=sel,
            k=kk,
        )
        I = np.empty((nq, kk), dtype=np.int64)
        for b in range(0, nq, BATCH):
            I[b : b + BATCH] = col.device.search_cpu(index, xq[b : b + BATCH], kk, p)[1]
        return recall_at_k(I if own is None else _drop_self(I, own, k), gt)

    same = start.index_spec == spec.spec
    primary = [0]
    if spec.is_hnsw:
        primary = _from_step(TUNE_EF_SEARCH, start.ef_search if same else 0)
    elif spec.nlist:
        primary = _from_step([v for v in TUNE_NPROBE if v <= spec.nlist], start.nprobe if same else 0)
    k_factors = [0]
    if spec.refine:
        k_factors = _from_step([f for f in TUNE_K_FACTORS if k * f <= n] or [1], start.k_factor if same else 0)
    reaching, measured = _sweep(evaluate, primary, k_factors, goal)
    timed = []
    for pr, kf, r in reaching or [max(measured, key=lambda m: m[2])]:
        _, qps = time_point(index, xq, k, _knobs(spec, pr, kf), col.device, sel, TUNE_TIME_SECONDS)
        timed.append((qps, pr, kf, r))
    qps, pr, kf, r = max(timed)
    del bitmap  # the selector's bits lived until here
    point = dataclasses.replace(
        start if same else OperatingPoint(spec.spec, bytes_per_vector=spec.memory_per_vector),
        ef_search=pr if spec.is_hnsw else 0,
        nprobe=pr if spec.nlist and not spec.is_hnsw else 0,
        k_factor=kf,
        recall=round(r, 6),
        qps=round(qps, 1),
        tuned_points=n,
        tuned_queries=nq if own is None else 0,
    )
    return Tuning(point, bool(reaching), goal, n, nq, len(measured), time.perf_counter() - t0, own is None)


def set_defaults(col: CollectionIndex, point: OperatingPoint, status: str) -> bool:
    """Makes ``point``'s search parameters ``col``'s defaults (the next snapshot carries them) and
    records ``point`` as its operating point in the store, so a restart keeps them. False when the
    collection was dropped or its index is no longer ``point``'s spec."""
    seg = col.segments
    defaults = point.defaults()
    with col.maint_lock, col.lock:  # no merge or write publishes a snapshot in between
        s = seg.snapshot
        if col.dropped or s.spec is None or s.spec.spec != point.index_spec:
            return False
        text = point.to_json()
        col.store.set_index_spec(col.row.cid, point.index_spec, text, col.row.spec.train_min_points)
        col.row = dataclasses.replace(col.row, spec=dataclasses.replace(col.row.spec, operating_point=text))
        seg.defaults = defaults
        seg.publish(dataclasses.replace(s, defaults=defaults))
        col.advisor_status = status
    return True


def stored_status(spec: CollectionSpec) -> str:
    """``advisor_status`` of an ``auto`` collection as the store leaves it (at start-up)."""
    if not spec.target_recall:
        return ""
    if spec.auto:
        return "waiting"
    p = OperatingPoint.from_dict(spec.point())
    if not p.tuned_points:
        return "chosen"
    return (
        f"chosen at {p.advised_points} points; tuned on {p.tuned_points} points: {p.params() or 'no parameters'}"
        f" (Recall@{AUTO_K} {p.recall:.4f}, {p.qps:.0f} QPS)"
    )


# -- an ``auto`` collection's maintenance ------------------------------------------------------


def auto_rebuild(col: CollectionIndex) -> bool:
    """One step of an ``auto`` collection (called by its maintenance, on the maintenance thread).
    Once it holds :data:`AUTO_MIN_POINTS` live points: runs the advisor at its target, rebuilds it
    onto the chosen point and tunes that point's search parameters on the whole index
    (:func:`tune_collection`). Later, as it grows: tuned again once its live points reach
    :data:`RETUNE_GROWTH` times those of the last tuning (and advised again when that cannot reach
    the target), advised again once they reach :data:`READVISE_GROWTH` times those it was advised
    on. Returns True after a rebuild or a tuning; a failure is logged, shown in the collection's
    ``advisor_status`` and retried after :data:`AUTO_RETRY_SECONDS`."""
    spec = col.row.spec
    if not spec.target_recall or col.dropped or col.retired or col.failure is not None:
        return False
    if time.monotonic() < col.auto_not_before:
        return False
    s = col.segments.snapshot
    live = s.nlabels - s.ndead_sealed - s.ndead_fresh
    if spec.auto and live < AUTO_MIN_POINTS:
        col.advisor_status = f"waiting for {AUTO_MIN_POINTS} points ({live} now)"
        return False
    try:
        if spec.auto:
            return _advise(col, live)
        point = OperatingPoint.from_dict(spec.point())
        if not point.tuned_points:  # rebuilt, not tuned yet (a restart came between)
            head = f"chose {point.index_spec}"
            return _tune(col, point, head, readvise=False, live=live)
        advised = point.advised_points or point.tuned_points
        if live >= READVISE_GROWTH * advised:
            return _advise(col, live, f"grown {live / advised:.1f}x since advised")
        if live >= RETUNE_GROWTH * point.tuned_points:
            head = f"{point.index_spec} (advised at {advised} points), grown {live / point.tuned_points:.1f}x"
            return _tune(col, point, head, readvise=True, live=live)
        sample = col.query_sample
        if not point.tuned_queries and sample is not None and len(sample) >= MIN_QUERIES:
            head = f"{point.index_spec} (advised at {advised} points), {len(sample)} recent queries"
            return _tune(col, point, head, readvise=True, live=live)
    except Exception as e:
        col.auto_not_before = time.monotonic() + AUTO_RETRY_SECONDS
        col.advisor_status = f"failed: {type(e).__name__}: {e}"[:300] + f"; retrying in {AUTO_RETRY_SECONDS:.0f}s"
        log.exception("collection %s: the index advisor, the rebuild or the tuning failed", col.name)
    return False


def _advise(col: CollectionIndex, live: int, why: str = "") -> bool:
    """Runs the advisor, rebuilds onto its choice where that is not the index already, and tunes."""
    target = col.row.spec.target_recall
    col.advisor_status = f"measuring ({why})" if why else "measuring"
    queries = _recent(col)
    with RUN_LOCK:
        rec = recommend_collection(
            col, target, AUTO_K, queries=queries, candidates=AUTO_CANDIDATES, require_target=False
        )
    # the target with a margin, else the target; nothing reached it (ties can keep even Flat a
    # hair below 1.0): stay exact
    point = choose(rec.frontier, min(1.0, target + AUTO_MARGIN)) or rec.chosen
    point = point or next((p for p in rec.measured if p.index_spec == "Flat"), None)
    if point is None:
        raise FailedPrecondition(f"no candidate reached Recall@{AUTO_K} >= {target:g} and Flat was not measured")
    point = dataclasses.replace(point, advised_points=live)
    chosen = (
        f"chose {point.index_spec} {point.params()} (Recall@{AUTO_K} {point.recall:.4f},"
        f" {point.qps:.0f} QPS on {rec.sample_points} points)"
    ).replace("  ", " ")
    chosen = f"{chosen}, {why}" if why else chosen
    log.info("collection %s: %s; advised in %.1fs", col.name, chosen, rec.seconds)
    current = col.segments.snapshot.spec
    if col.row.spec.auto or current is None or current.spec != point.index_spec:
        col.advisor_status = f"rebuilding onto {point.index_spec} {point.params()}".rstrip()
        spec = IndexSpec.parse(point.index_spec, col.index_dims, col.home.metric)
        if not rebuild_onto(col, spec, point.defaults(), point.to_json(), chosen):
            return False
    return _tune(col, point, chosen, readvise=False, live=live) or True


def _recent(col: CollectionIndex) -> np.ndarray | None:
    """The collection's recent queries (query_sample.py) once there are :data:`MIN_QUERIES`, else None
    (the advisor and the tuning pass then search stored vectors)."""
    sample = col.query_sample
    if sample is None or len(sample) < MIN_QUERIES:
        return None
    return sample.take()


def _tune(col: CollectionIndex, start: OperatingPoint, head: str, *, readvise: bool, live: int) -> bool:
    """A tuning pass from ``start``; its result becomes the defaults. With ``readvise``, a pass that
    cannot reach the target runs the advisor again. False when there was nothing to tune."""
    target = col.row.spec.target_recall
    col.advisor_status = f"{head}; tuning"
    with RUN_LOCK:
        t = tune_collection(col, start, min(1.0, target + AUTO_MARGIN), queries=_recent(col))
    if t is None:  # nothing to tune on (yet): not before the retry delay
        col.auto_not_before = time.monotonic() + AUTO_RETRY_SECONDS
        col.advisor_status = f"{head}; not tuned (nothing to tune on)"
        return False
    point = dataclasses.replace(t.point, advised_points=start.advised_points or live)
    status = f"{head}; {t.text()}"
    log.info(
        "collection %s: %s; %d settings measured in %.1fs", col.name, status, t.settings, t.seconds
    )  # fmt: skip
    if not set_defaults(col, point, status):
        return False
    if readvise and point.recall < target:
        return _advise(col, live, f"re-tuning reached Recall@{AUTO_K} {point.recall:.4f} < {target:g}")
    return True
