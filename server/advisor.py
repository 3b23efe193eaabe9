"""The index advisor: which index spec and search parameters are fastest at a recall target.

:func:`recommend` builds each candidate spec on a sample of vectors, sweeps its search parameters
and returns the operating points on the QPS / Recall@k frontier. It uses FAISS's own tools: a
``faiss.ParameterSpace`` holds each candidate's parameter grid (``efSearch``, ``nprobe``, the refine
stage's ``k_factor_rf``) and its ``explore`` measures the grid against exact ground truth
(``faiss.knn``, scored by a ``faiss.IntersectionCriterion``: Recall@k), skipping combinations a
measured one already dominates; each candidate's undominated points are then timed as the service
serves them (:func:`time_point`: batches of :data:`BATCH` queries on the server's search thread,
through :meth:`~.device.Device.search_cpu` with the same ``SearchParameters`` a search builds) and a
``faiss.OperatingPoints`` keeps the frontier across candidates. The point chosen is the fastest whose
recall reaches the target (:func:`choose`).

Candidates (:func:`default_candidates`): Flat, HNSW32, HNSW32 over SQ8 codes with a refine stage
(``HNSW32_SQ8,RFlat``), IVF with fast-scan 4-bit PQ and a refine stage
(``IVF<n>,PQ<d/2>x4fs,RFlat``) and IVF Flat, with ``n`` about 4 sqrt(points) lists (a power of
two; at most a 39th of the sample, FAISS's k-means minimum).

:func:`recommend_collection` serves ``RecommendIndex``: a seeded sample of a collection's stored
home vectors (at most :data:`SAMPLE_MAX`), as the index holds them (basis, prefix), with held-out
stored vectors (not in the sample) or the request's own as queries. :func:`auto_rebuild` serves
``index_spec="auto"`` collections from the maintenance thread: once one holds
:data:`AUTO_MIN_POINTS` live points it runs the advisor at the collection's target (k = 10; the
fastest point beating it by :data:`AUTO_MARGIN` where one does) and rebuilds the collection onto
it (:func:`~.compaction.rebuild_onto`: beside the live index, one reference swap). One advisor run
at a time per process (:data:`RUN_LOCK`). Recall and QPS are the sample's, and held-out stored
vectors are easier queries than real ones: on debdesc (20k x 384) the point measured at Recall@10
0.953 on held-out docs gave 0.928 on the real queries; pass real queries where there are some.

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
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import faiss
import numpy as np

from .compaction import rebuild_onto
from .errors import FailedPrecondition, InvalidArgument
from .index_spec import FAISS_METRIC, IndexSpec, SearchDefaults, search_params
from .segment_snapshot import bit_slice

if TYPE_CHECKING:
    from .collection_index import CollectionIndex
    from .collection_spec import CollectionSpec
    from .config import Limits
    from .device import Device

__all__ = [
    "AUTO_CANDIDATES",
    "AUTO_MIN_POINTS",
    "BATCH",
    "MIN_POINTS",
    "READVISE_GROWTH",
    "RETUNE_GROWTH",
    "RUN_LOCK",
    "SAMPLE_MAX",
    "TUNE_QUERIES",
    "OperatingPoint",
    "Recommendation",
    "Tuning",
    "auto_rebuild",
    "choose",
    "default_candidates",
    "recommend",
    "recommend_collection",
    "run_in_worker",
    "set_defaults",
    "stored_status",
    "tune_collection",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

AUTO_MIN_POINTS = 10_000  #: live points before an ``auto`` collection runs the advisor
MIN_POINTS = 1000  #: fewest live points RecommendIndex measures on
SAMPLE_MAX = 100_000  #: most vectors the candidates are built on
HELD_OUT_MAX = 1000  #: held-out queries by default
MAX_CANDIDATES = 16
BATCH = 64  #: queries per timed search call
TIME_MIN_SECONDS = 0.2  #: each point is timed for at least this long (and one pass over the queries)
SEED = 1234
AUTO_K = 10  #: k of an ``auto`` collection's Recall@k target
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

EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
NPROBE = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
K_FACTORS = (1, 2, 4, 8, 16, 32)
#: the tuning pass's grids (a larger collection may need a larger k_factor than the sample did)
TUNE_EF_SEARCH = (*EF_SEARCH, 1536, 2048)
TUNE_NPROBE = (*NPROBE, 768, 1024, 1536, 2048)
TUNE_K_FACTORS = (*K_FACTORS, 64)
#: ParameterSpace names -> the names of our search parameters
_NAMES = {"efSearch": "ef_search", "nprobe": "nprobe", "k_factor_rf": "k_factor"}

#: one advisor run at a time: each builds several indexes of the sample and times them
RUN_LOCK = threading.Lock()


@dataclass(frozen=True)
class OperatingPoint:
    """One measured point: a spec with its search parameters (0: not applicable), its Recall@k and
    QPS, estimated bytes per vector, and the seconds to build it on the sample."""

    index_spec: str
    ef_search: int = 0
    nprobe: int = 0
    k_factor: int = 0
    recall: float = 0.0
    qps: float = 0.0
    bytes_per_vector: int = 0
    build_seconds: float = 0.0
    train_points: int = 0
    advised_points: int = 0  #: ``auto`` collections: live points when the advisor chose the spec
    #: ``auto`` collections: points of the whole index the last tuning pass measured recall and QPS
    #: on (0: measured on the advisor's sample, not tuned yet)
    tuned_points: int = 0

    def defaults(self) -> SearchDefaults:
        """The point's search parameters as a collection's defaults."""
        return SearchDefaults(self.ef_search or None, self.nprobe or None, self.k_factor or None)

    def params(self) -> str:
        """The parameters as ``ef_search=64 k_factor=4`` ("" for none), for messages."""
        return " ".join(f"{k}={v}" for k, v in self.defaults().as_dict().items())

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OperatingPoint:
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in fields})


@dataclass(frozen=True)
class Recommendation:
    frontier: list[OperatingPoint]  #: recall ascending, QPS descending
    chosen: OperatingPoint | None  #: the fastest point reaching the target (None: none does)
    sample_points: int
    num_queries: int
    k: int
    target_recall: float
    held_out: bool
    points_measured: int
    seconds: float
    measured: list[OperatingPoint] = field(default_factory=list)  #: every point timed, frontier or not

    @property
    def best(self) -> OperatingPoint | None:
        return max(self.measured or self.frontier, key=lambda p: p.recall, default=None)


# -- the measurement ---------------------------------------------------------------------------


def _pow2_at_most(n: float) -> int:
    return 1 << math.floor(math.log2(n)) if n >= 1 else 0


def ivf_lists(n_sample: int, n_total: int) -> int:
    """IVF lists for a collection of ``n_total`` points measured on ``n_sample``: the power of two
    nearest 4 sqrt(n_total), at most n_sample / 39 (0: too few points for an IVF)."""
    want = 1 << max(0, round(math.log2(4 * math.sqrt(max(n_total, 1)))))
    nlist = min(want, _pow2_at_most(n_sample / 39))
    return nlist if nlist >= 8 else 0


def default_candidates(n_sample: int, n_total: int, d: int) -> list[str]:
    """The specs measured when a request names none."""
    out = ["Flat", "HNSW32", "HNSW32_SQ8,RFlat"]
    nlist = ivf_lists(n_sample, n_total)
    if nlist:
        m = d // 2 if d % 2 == 0 else d
        out += [f"IVF{nlist},PQ{m}x4fs,RFlat", f"IVF{nlist},Flat"]
    return out


def _recall(I: np.ndarray, gt: np.ndarray) -> float:
    """Recall@k: mean |I[i] & gt[i]| / k over the rows (k = gt's width; -1 never matches)."""
    nq, k = int(gt.shape[0]), int(gt.shape[1])
    if k <= 32:
        hit = (I[:, :, None] == gt[:, None, :]).any(axis=2) & (I >= 0)
        found = int(hit.sum())
    else:
        found = sum(int(np.intersect1d(a[a >= 0], b).size) for a, b in zip(I, gt, strict=True))
    return found / (nq * k)


def _parameter_space(spec: IndexSpec, k: int, n: int) -> Any:
    """The ParameterSpace of ``spec``'s sweep: efSearch (HNSW), nprobe (IVF, up to nlist) and the
    refine stage's k_factor_rf (k * k_factor at most n)."""
    ps = faiss.ParameterSpace()
    ps.verbose = 0
    ps.batchsize = BATCH
    grids: list[tuple[str, Sequence[int]]] = []
    if spec.is_hnsw:
        grids.append(("efSearch", EF_SEARCH))
    if spec.nlist:
        grids.append(("nprobe", [p for p in NPROBE if p <= spec.nlist]))
    if spec.refine:
        grids.append(("k_factor_rf", [f for f in K_FACTORS if k * f <= n] or [1]))
    for name, values in grids:
        pr = ps.add_range(name)
        faiss.copy_array_to_vector(np.asarray(values, dtype=np.float64), pr.values)
    return ps


def _params_of(key: str) -> dict[str, int]:
    """A ParameterSpace combination name (``efSearch=64,k_factor_rf=4``) as our parameters
    (``{"ef_search": 64, "k_factor": 4}``)."""
    out: dict[str, int] = {}
    for part in filter(None, key.split(",")):
        name, _, value = part.partition("=")
        if name in _NAMES:
            out[_NAMES[name]] = int(float(value))
    return out


def time_point(
    index: Any,
    xq: np.ndarray,
    k: int,
    params: dict[str, int],
    device: Device,
    sel: Any = None,
    min_seconds: float | None = None,
) -> tuple[np.ndarray, float]:
    """Searches every query in batches of :data:`BATCH` on the server's search thread with the
    SearchParameters a collection search builds (with the IDSelector ``sel``, if any); repeats until
    ``min_seconds`` (None: :data:`TIME_MIN_SECONDS`). Returns the labels of the first pass, shape
    (nq, k), and the queries per second."""
    least = TIME_MIN_SECONDS if min_seconds is None else min_seconds
    p = search_params(
        index, ef_search=params.get("ef_search"), nprobe=params.get("nprobe"), k_factor=params.get("k_factor"), sel=sel
    )
    nq = len(xq)
    I = np.empty((nq, k), dtype=np.int64)
    done, t0 = 0, time.perf_counter()
    while True:
        for b in range(0, nq, BATCH):
            xb = xq[b : b + BATCH]
            _, Ib = device.search_cpu(index, xb, k, p) if len(xb) > 1 else index.search(xb, k, params=p)
            if not done:
                I[b : b + BATCH] = Ib
        done += nq
        elapsed = time.perf_counter() - t0
        if elapsed >= least:
            return I, done / elapsed


def _build(spec: IndexSpec, xs: np.ndarray) -> tuple[Any, float]:
    t0 = time.perf_counter()
    index = spec.new_index()
    if spec.needs_training:
        index.train(xs)
    index.add(xs)
    return index, time.perf_counter() - t0


def recommend(
    xs: np.ndarray,
    xq: np.ndarray,
    k: int,
    target: float,
    metric: str,
    candidates: Sequence[str],
    device: Device,
    *,
    held_out: bool = True,
    cancelled: Callable[[], bool] = lambda: False,
) -> Recommendation:
    """Measures ``candidates`` (checked specs) built on ``xs`` (n, d) with queries ``xq`` (nq, d),
    both float32 as the index holds them. Returns the frontier and the chosen point."""
    t_start = time.perf_counter()
    xs = np.ascontiguousarray(xs, dtype=np.float32)
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    n, d = xs.shape
    nq = len(xq)
    _, gt = faiss.knn(xq, xs, k, metric=FAISS_METRIC[metric])
    gt = np.ascontiguousarray(gt, dtype=np.int64)
    measured: list[OperatingPoint] = []
    for text in candidates:
        if cancelled():
            break
        spec = IndexSpec.parse(text, d, metric)
        index, build_s = _build(spec, xs)
        ps = _parameter_space(spec, k, n)
        keys = [""]
        if ps.n_combinations() > 1:
            crit = faiss.IntersectionCriterion(nq, k)
            crit.set_groundtruth(None, gt)  # type: ignore[call-overload]  # faiss's Python form: (D, I)
            ops = ps.explore(index, xq, crit)
            keys = [ops.optimal_pts.at(i).key for i in range(ops.optimal_pts.size())]
            keys = [key for key in keys if key]  # the first is FAISS's "do nothing" point
        for key in keys:
            params = _params_of(key)
            I, qps = time_point(index, xq, k, params, device)
            measured.append(
                OperatingPoint(
                    spec.spec,
                    params.get("ef_search", 0),
                    params.get("nprobe", 0),
                    params.get("k_factor", 0),
                    round(_recall(I, gt), 6),
                    round(qps, 1),
                    spec.memory_per_vector,
                    round(build_s, 3),
                    spec.min_train_points,
                )
            )
        log.info(
            "advisor: %s built in %.2fs on %d points, %d point(s) kept of %d", spec.spec, build_s, n, len(keys),
            ps.n_combinations(),
        )  # fmt: skip
        del index
    frontier = _frontier(measured)
    return Recommendation(
        frontier,
        choose(frontier, target),
        n,
        nq,
        k,
        target,
        held_out,
        len(measured),
        time.perf_counter() - t_start,
        measured,
    )


def _frontier(points: list[OperatingPoint]) -> list[OperatingPoint]:
    """The undominated points (no other is both as fast and as accurate), recall ascending:
    FAISS's OperatingPoints over (recall, seconds per query)."""
    ops = faiss.OperatingPoints()
    for i, p in enumerate(points):
        ops.add(p.recall, 1.0 / max(p.qps, 1e-9), str(i), i)
    out = [points[int(ops.optimal_pts.at(i).key)] for i in range(ops.optimal_pts.size()) if ops.optimal_pts.at(i).key]
    return sorted(out, key=lambda p: (p.recall, -p.qps))


def choose(frontier: Sequence[OperatingPoint], target: float) -> OperatingPoint | None:
    """The fastest point whose recall reaches ``target`` (None: none does)."""
    ok = [p for p in frontier if p.recall >= target]
    return max(ok, key=lambda p: p.qps) if ok else None


# -- on a collection ---------------------------------------------------------------------------


def run_in_worker(fn: Callable[[], T], setup: Callable[[], None]) -> T:
    """``fn()`` on a new thread that first runs ``setup`` (its OpenMP threads, its priority), one
    advisor run at a time; re-raises what ``fn`` raised. A gRPC worker has one OpenMP thread."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            setup()
            with RUN_LOCK:
                box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=body, name="interlingua-advisor", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def _live_labels(col: CollectionIndex) -> np.ndarray:
    with col.lock:
        return np.fromiter((lab for lab in col.pids.values() if lab >= 0), dtype=np.int64)


def check_request(
    col: CollectionIndex,
    limits: Limits,
    target: float,
    k: int,
    candidates: Sequence[str],
) -> tuple[int, list[str]]:
    """Checks a RecommendIndex request against the collection: returns k (0 -> 10) and the checked
    candidate specs (empty: none named). InvalidArgument for a bad target, k or spec."""
    if math.isnan(target) or not 0 < target <= 1:
        raise InvalidArgument(f"target_recall is {target}; it must be in (0, 1]")
    k = k or AUTO_K
    if not 1 <= k <= min(limits.max_k, 1024):
        raise InvalidArgument(f"k is {k}; it must be between 1 and {min(limits.max_k, 1024)}")
    if len(candidates) > MAX_CANDIDATES:
        raise InvalidArgument(f"{len(candidates)} candidates; the limit is {MAX_CANDIDATES}")
    specs = []
    for text in candidates:
        spec = IndexSpec.parse(
            text, col.index_dims, col.home.metric, max_nlist=limits.max_nlist,
            max_overhead_bytes=limits.max_index_overhead_bytes,
        )  # fmt: skip
        specs.append(spec.spec)
    if col.failure is not None:
        raise FailedPrecondition(f"collection {col.name!r} failed: {col.failure.reason}")
    return k, specs


def recommend_collection(
    col: CollectionIndex,
    target: float,
    k: int,
    *,
    queries: np.ndarray | None = None,
    sample_size: int = 0,
    num_queries: int = 0,
    candidates: Sequence[str] = (),
    require_target: bool = True,
) -> Recommendation:
    """The advisor on ``col``'s stored home vectors (checked arguments: :func:`check_request`;
    ``queries`` in the home space, normalized for cosine). FailedPrecondition when the collection
    is too small or (``require_target``) no candidate reaches ``target``."""
    labels = _live_labels(col)
    n = len(labels)
    if n < MIN_POINTS:
        raise FailedPrecondition(
            f"collection {col.name!r} has {n} points; the index advisor needs at least {MIN_POINTS}"
        )
    rng = np.random.default_rng(SEED)
    order = labels[rng.permutation(n)]
    cap = min(sample_size or SAMPLE_MAX, SAMPLE_MAX)
    d = col.home.dim
    if queries is None:
        nq = num_queries or min(HELD_OUT_MAX, n // 10)
        if not 1 <= nq <= n // 2:
            raise InvalidArgument(f"num_queries is {nq}; it must be between 1 and half the points ({n // 2})")
        with col.maint_lock:  # no renumbering between the choice of labels and the read
            xq_home = col.store.home_vectors_at(col.row.cid, order[:nq], d)
            xs_home = col.store.home_vectors_at(col.row.cid, order[nq : nq + cap], d)
        xq = col.index_view(col.to_basis(xq_home))
    else:
        with col.maint_lock:
            xs_home = col.store.home_vectors_at(col.row.cid, order[:cap], d)
        xq = col.index_view(col.to_basis(queries, "query"))
    xs = col.index_view(col.to_basis(xs_home))
    if k > len(xs):
        raise InvalidArgument(f"k is {k}; the sample holds {len(xs)} points")
    names = list(candidates) or default_candidates(len(xs), n, col.index_dims)
    for text in names:
        spec = IndexSpec.parse(text, col.index_dims, col.home.metric)
        if spec.min_train_points > len(xs):
            raise InvalidArgument(
                f"index spec {spec.spec!r} trains on at least {spec.min_train_points} points;"
                f" the sample holds {len(xs)}"
            )
    rec = recommend(
        xs, xq, k, target, col.home.metric, names, col.device, held_out=queries is None, cancelled=lambda: col.dropped
    )
    if rec.chosen is None and require_target:
        best = rec.best
        where = f" ({best.index_spec} {best.params()})".replace(" )", ")") if best else ""
        raise FailedPrecondition(
            f"no candidate reaches Recall@{k} >= {target:g} on {len(xs)} points of collection {col.name!r}:"
            f" the best reached {best.recall if best else 0.0:.4f}{where}; lower the target or add candidates"
        )
    return rec


# -- tuning an ``auto`` collection on its whole index -------------------------------------------


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

    def text(self) -> str:
        """``tuned on 20000 points: nprobe=8 k_factor=4 (Recall@10 0.9712, 9120 QPS on 500 queries)``."""
        p = self.point
        how = f"(Recall@{AUTO_K} {p.recall:.4f}, {p.qps:.0f} QPS on {self.queries} held-out stored vectors)"
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


def tune_collection(col: CollectionIndex, start: OperatingPoint, goal: float, k: int = AUTO_K) -> Tuning | None:
    """Tunes ``col``'s search defaults on its whole sealed index: :data:`TUNE_QUERIES` seeded stored
    vectors of it are the queries (each left out of its own results), their exact k nearest live
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
    nq = min(TUNE_QUERIES, n // 2)
    rows = np.sort(np.random.default_rng(SEED).choice(n, nq, replace=False))
    xq, own = np.ascontiguousarray(xb[rows]), labels[rows]
    gt = np.empty((nq, k + 1), dtype=np.int64)
    for b in range(0, nq, TUNE_GT_BATCH):
        _, pos = faiss.knn(xq[b : b + TUNE_GT_BATCH], xb, k + 1, metric=FAISS_METRIC[col.home.metric])
        gt[b : b + TUNE_GT_BATCH] = labels[pos]
    del xb
    gt = _drop_self(gt, own, k)
    index = s.sealed

    def evaluate(primary: int, k_factor: int) -> float:
        knobs = _knobs(spec, primary, k_factor)
        p = search_params(
            index, ef_search=knobs.get("ef_search"), nprobe=knobs.get("nprobe"), k_factor=knobs.get("k_factor"), sel=sel
        )
        I = np.empty((nq, k + 1), dtype=np.int64)
        for b in range(0, nq, BATCH):
            I[b : b + BATCH] = col.device.search_cpu(index, xq[b : b + BATCH], k + 1, p)[1]
        return _recall(_drop_self(I, own, k), gt)

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
    )
    return Tuning(point, bool(reaching), goal, n, nq, len(measured), time.perf_counter() - t0)


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
    except Exception as e:
        col.auto_not_before = time.monotonic() + AUTO_RETRY_SECONDS
        col.advisor_status = f"failed: {type(e).__name__}: {e}"[:300] + f"; retrying in {AUTO_RETRY_SECONDS:.0f}s"
        log.exception("collection %s: the index advisor, the rebuild or the tuning failed", col.name)
    return False


def _advise(col: CollectionIndex, live: int, why: str = "") -> bool:
    """Runs the advisor, rebuilds onto its choice where that is not the index already, and tunes."""
    target = col.row.spec.target_recall
    col.advisor_status = f"measuring ({why})" if why else "measuring"
    with RUN_LOCK:
        rec = recommend_collection(col, target, AUTO_K, candidates=AUTO_CANDIDATES, require_target=False)
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


def _tune(col: CollectionIndex, start: OperatingPoint, head: str, *, readvise: bool, live: int) -> bool:
    """A tuning pass from ``start``; its result becomes the defaults. With ``readvise``, a pass that
    cannot reach the target runs the advisor again. False when there was nothing to tune."""
    target = col.row.spec.target_recall
    col.advisor_status = f"{head}; tuning"
    with RUN_LOCK:
        t = tune_collection(col, start, min(1.0, target + AUTO_MARGIN))
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
