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
stored vectors (not in the sample) or the request's own as queries. One advisor run at a time per
process (:data:`RUN_LOCK`). Recall and QPS are the sample's, and held-out stored vectors are easier
queries than real ones: on debdesc (20k x 384) the point measured at Recall@10 0.953 on held-out docs
gave 0.928 on the real queries; pass real queries where there are some. ``index_spec="auto"``
collections (rebuilt onto the advisor's choice, tuned on their whole index, advised again as they
grow) are :mod:`.advisor_auto`'s. Covered by ``tests/test_advisor.py``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import faiss
import numpy as np

from .errors import FailedPrecondition, InvalidArgument
from .index_spec import FAISS_METRIC, IndexSpec, SearchDefaults, search_params

if TYPE_CHECKING:
    from .collection_index import CollectionIndex
    from .config import Limits
    from .device import Device

__all__ = [
    "BATCH",
    "MIN_POINTS",
    "RUN_LOCK",
    "SAMPLE_MAX",
    "OperatingPoint",
    "Recommendation",
    "choose",
    "default_candidates",
    "recall_at_k",
    "recommend",
    "recommend_collection",
    "run_in_worker",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_POINTS = 1000  #: fewest live points RecommendIndex measures on
SAMPLE_MAX = 100_000  #: most vectors the candidates are built on
HELD_OUT_MAX = 1000  #: held-out queries by default
MAX_CANDIDATES = 16
BATCH = 64  #: queries per timed search call
TIME_MIN_SECONDS = 0.2  #: each point is timed for at least this long (and one pass over the queries)
SEED = 1234
AUTO_K = 10  #: k of an ``auto`` collection's Recall@k target (and RecommendIndex's default k)


EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
NPROBE = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
K_FACTORS = (1, 2, 4, 8, 16, 32)
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
    #: ``auto`` collections: recent real queries the last tuning pass searched (0: stored vectors)
    tuned_queries: int = 0

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


def recall_at_k(I: np.ndarray, gt: np.ndarray) -> float:
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
        index,
        ef_search=params.get("ef_search"),
        nprobe=params.get("nprobe"),
        k_factor=params.get("k_factor"),
        sel=sel,
        k=k,
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
    """The index of ``spec`` trained on and holding xs (n, d), and the seconds it took. A spec the
    grammar accepted but FAISS's factory refuses is the request's: INVALID_ARGUMENT, not INTERNAL."""
    t0 = time.perf_counter()
    try:
        index = spec.new_index()
    except RuntimeError as e:  # FAISS's message, after its source location
        why = re.split(r"\.(?:cpp|h):[0-9]+: ", " ".join(str(e).split()))[-1] or "FAISS refused it"
        raise InvalidArgument(f"index spec {spec.spec!r} is not valid for d={spec.d}: {why[:300]}") from None
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
                    round(recall_at_k(I, gt), 6),
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
