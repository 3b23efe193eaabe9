"""Result types of the client (frozen dataclasses), each built from its protobuf message.

Enums become lower-case strings (``METRIC_COSINE`` -> ``"cosine"``,
``INDEX_STATE_READY`` -> ``"ready"``, ``TRANSFORM_KIND_PROCRUSTES`` ->
``"procrustes"``, ``MIGRATION_PHASE_BACKFILL`` -> ``"backfill"``), packed vectors
become float32 arrays and JSON payloads become dicts (``None`` for "no payload"; a
transform's config and report are ``{}`` when empty). Covered by
``tests/test_client.py``, ``tests/test_client_transforms.py`` and
``tests/test_migration_client.py``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from interlingua.v1 import collections_pb2, common_pb2, migrations_pb2, points_pb2, transforms_pb2

from ._wire import Payload, decode_payload, unpack_vectors

__all__ = [
    "KINDS",
    "MIGRATION_STRATEGIES",
    "BackfillOrder",
    "CollectionInfo",
    "CollectionMove",
    "ForwardProgress",
    "IndexRecommendation",
    "MigrationInfo",
    "OperatingPoint",
    "Payload",
    "PointRecord",
    "Route",
    "RouteInfo",
    "RoutesListing",
    "ScoreCalibration",
    "SearchResult",
    "Space",
    "TransformInfo",
    "milvus_uri",
    "serial_route",
]

METRICS: dict[str, common_pb2.Metric.ValueType] = {
    "cosine": common_pb2.METRIC_COSINE,
    "ip": common_pb2.METRIC_IP,
    "l2": common_pb2.METRIC_L2,
}
#: Transform kinds by their client name (``"procrustes"``, ...), as FitHeader.kind values.
KINDS: dict[str, transforms_pb2.TransformKind.ValueType] = {
    transforms_pb2.TransformKind.Name(v).removeprefix("TRANSFORM_KIND_").lower(): v
    for v in transforms_pb2.TransformKind.values()
    if v != transforms_pb2.TRANSFORM_KIND_UNSPECIFIED
}
#: Migration strategies by their client name (``"two_indexes"``, ``"shared_index"``), as request values.
MIGRATION_STRATEGIES: dict[str, migrations_pb2.MigrationStrategy.ValueType] = {
    migrations_pb2.MigrationStrategy.Name(v).removeprefix("MIGRATION_STRATEGY_").lower(): v
    for v in migrations_pb2.MigrationStrategy.values()
    if v != migrations_pb2.MIGRATION_STRATEGY_UNSPECIFIED
}


@dataclass(frozen=True)
class Space:
    """A registered embedding space: ``metric`` is ``"cosine"``, ``"ip"`` or ``"l2"``."""

    name: str
    dim: int
    metric: str
    description: str
    created_at: float  #: server time of registration, seconds since the Unix epoch

    @classmethod
    def from_proto(cls, msg: common_pb2.Space) -> Space:
        metric = common_pb2.Metric.Name(msg.metric).removeprefix("METRIC_").lower()
        return cls(msg.name, msg.dim, metric, msg.description, msg.created_at)


@dataclass(frozen=True)
class OperatingPoint:
    """One measured operating point of an index: a spec with its search parameters (0: not applicable),
    its Recall@k against exact search, QPS, estimated memory per vector, build time and training size."""

    index_spec: str
    ef_search: int
    nprobe: int
    k_factor: int  #: refine stage: k * k_factor candidates re-ranked
    recall: float
    qps: float
    bytes_per_vector: int
    build_seconds: float
    train_points: int  #: fewest points the spec trains on (0: no training)
    tuned_points: int = 0  #: ``auto`` collections: live points its last tuning pass measured on (0: not tuned)
    tuned_queries: int = 0  #: ``auto`` collections: recent queries that pass searched (0: stored vectors)

    @classmethod
    def from_proto(cls, msg: collections_pb2.OperatingPoint) -> OperatingPoint:
        return cls(
            index_spec=msg.index_spec,
            ef_search=msg.ef_search,
            nprobe=msg.nprobe,
            k_factor=msg.k_factor,
            recall=msg.recall,
            qps=msg.qps,
            bytes_per_vector=msg.bytes_per_vector,
            build_seconds=msg.build_seconds,
            train_points=msg.train_points,
            tuned_points=msg.tuned_points,
            tuned_queries=msg.tuned_queries,
        )


@dataclass(frozen=True)
class IndexRecommendation:
    """The index advisor's answer: the QPS / recall ``frontier`` (recall ascending) and the ``chosen``
    point, the fastest whose recall reaches ``target_recall``, with what was measured."""

    frontier: list[OperatingPoint]
    chosen: OperatingPoint
    sample_points: int
    num_queries: int
    k: int
    target_recall: float
    held_out_queries: bool  #: the queries were stored vectors held out of the sample
    batch_size: int  #: queries per timed search call
    points_measured: int
    seconds: float

    @classmethod
    def from_proto(cls, msg: collections_pb2.RecommendIndexResponse) -> IndexRecommendation:
        return cls(
            frontier=[OperatingPoint.from_proto(p) for p in msg.frontier],
            chosen=OperatingPoint.from_proto(msg.chosen),
            sample_points=msg.sample_points,
            num_queries=msg.num_queries,
            k=msg.k,
            target_recall=msg.target_recall,
            held_out_queries=msg.held_out_queries,
            batch_size=msg.batch_size,
            points_measured=msg.points_measured,
            seconds=msg.seconds,
        )


@dataclass(frozen=True)
class CollectionInfo:
    """Description and live state of a collection; ``state`` is ``"exact"``, ``"training"``, ``"ready"`` or
    ``"failed"`` (its index cannot be built: ``failure_reason`` says why; searches answer FailedPrecondition)."""

    name: str
    home_space: str
    index_spec: str
    state: str
    num_points: int
    vectors_per_space: dict[str, int]
    indexed_vectors: int
    fresh_vectors: int
    last_sequence: int
    checkpoint_sequence: int
    train_min_points: int
    created_at: float
    deleted_labels: int
    prefix_dims: int = 0  #: dimensions the index holds
    index_bytes_per_vector: int = 0
    rerank_bytes_per_vector: int = 0  #: full vectors kept for reranking (prefix collections)
    basis_transform: str = ""
    recall_at_dims: dict[int, float] = field(default_factory=dict)
    ef_construction: int = 0  #: HNSW build-time candidate list (0: not HNSW)
    failure_reason: str = ""  #: why the index cannot be built (state "failed")
    failed_at: float = 0.0  #: when it last failed, seconds since the epoch (0: never)
    compactions: int = 0  #: index rebuilds that reclaimed dead labels since the server started
    target_recall: float = 0.0  #: index_spec "auto": the Recall@10 target (0 otherwise)
    operating_point: OperatingPoint | None = None  #: index_spec "auto": the advisor's choice (None until chosen)
    advisor_status: str = ""  #: index_spec "auto": where the advisor stands
    backend: str = "embedded"  #: where the points and search live: "embedded" or "milvus"
    backend_uri: str = ""  #: "milvus": the engine's address or Milvus Lite file

    @classmethod
    def from_proto(cls, msg: collections_pb2.CollectionInfo) -> CollectionInfo:
        return cls(
            name=msg.name,
            home_space=msg.home_space,
            index_spec=msg.index_spec,
            state=collections_pb2.IndexState.Name(msg.state).removeprefix("INDEX_STATE_").lower(),
            num_points=msg.num_points,
            vectors_per_space=dict(msg.vectors_per_space),
            indexed_vectors=msg.indexed_vectors,
            fresh_vectors=msg.fresh_vectors,
            last_sequence=msg.last_sequence,
            checkpoint_sequence=msg.checkpoint_sequence,
            train_min_points=msg.train_min_points,
            created_at=msg.created_at,
            deleted_labels=msg.deleted_labels,
            prefix_dims=msg.prefix_dims,
            index_bytes_per_vector=msg.index_bytes_per_vector,
            rerank_bytes_per_vector=msg.rerank_bytes_per_vector,
            basis_transform=msg.basis_transform,
            recall_at_dims=dict(msg.recall_at_dims),
            ef_construction=msg.ef_construction,
            failure_reason=msg.failure_reason,
            failed_at=msg.failed_at,
            compactions=msg.compactions,
            target_recall=msg.target_recall,
            operating_point=OperatingPoint.from_proto(msg.operating_point) if msg.HasField("operating_point") else None,
            advisor_status=msg.advisor_status,
            backend=msg.backend or "embedded",
            backend_uri=msg.backend_uri,
        )


@dataclass(frozen=True)
class CollectionMove:
    """What :meth:`~interlingua.client.Client.move_collection` did: the collection on its new backend, what was
    copied and caught up, and the verification's figures (counts equal on both sides, spot searches)."""

    collection: CollectionInfo
    points_copied: int  #: by the bulk copy
    vectors_copied: int  #: by the bulk copy, all spaces together
    writes_caught_up: int  #: points written during the copy and copied again
    deletes_caught_up: int  #: points deleted during the copy and deleted in the engine
    seconds: float  #: the whole move
    write_pause_seconds: float  #: how long the collection's writes waited (last catch-up, verification, switch)
    spot_queries: int  #: spot searches on both sides (stored home vectors, k = 10)
    spot_top1_self_embedded: int  #: spot searches whose top-1 is the queried point (0 for ip spaces)
    spot_top1_self_milvus: int
    spot_top1_agreement: float  #: fraction with the same top-1 on both sides
    spot_top10_overlap: float  #: mean top-10 overlap of the two sides
    num_points: int  #: verified equal on both sides
    vectors_per_space: dict[str, int]  #: verified equal on both sides

    @classmethod
    def from_proto(cls, msg: collections_pb2.MoveCollectionResponse) -> CollectionMove:
        return cls(
            collection=CollectionInfo.from_proto(msg.collection),
            points_copied=msg.points_copied,
            vectors_copied=msg.vectors_copied,
            writes_caught_up=msg.writes_caught_up,
            deletes_caught_up=msg.deletes_caught_up,
            seconds=msg.seconds,
            write_pause_seconds=msg.write_pause_seconds,
            spot_queries=msg.spot_queries,
            spot_top1_self_embedded=msg.spot_top1_self_embedded,
            spot_top1_self_milvus=msg.spot_top1_self_milvus,
            spot_top1_agreement=msg.spot_top1_agreement,
            spot_top10_overlap=msg.spot_top10_overlap,
            num_points=msg.num_points,
            vectors_per_space=dict(msg.vectors_per_space),
        )


def milvus_uri(to: str) -> str:
    """The engine address a move names: ``milvus://host:port`` -> ``http://host:port`` (port 19530 when none),
    ``http(s)://`` and ``tcp://`` as given, "" (the server's default) as given, anything else a Milvus Lite file
    (``*.db``) made absolute. ValueError for a path that is not a ``.db`` file or a ``milvus://`` without a host."""
    to = to.strip()
    if not to or re.match(r"^(https?|tcp)://", to):
        return to
    if to.startswith("milvus://"):
        m = re.fullmatch(r"milvus://([^\s/:]+)(:\d+)?/?", to)
        if m is None:
            raise ValueError(f"{to!r} is not milvus://HOST[:PORT]")
        return f"http://{m.group(1)}{m.group(2) or ':19530'}"
    if "://" in to or not to.endswith(".db"):
        raise ValueError(f"{to!r} is neither milvus://HOST:PORT, http(s)://HOST:PORT nor a Milvus Lite file (*.db)")
    return os.path.abspath(os.path.expanduser(to))


@dataclass(frozen=True, eq=False)
class PointRecord:
    """A stored point: ``vectors`` maps space name -> array of shape (d,), float32."""

    id: str
    vectors: dict[str, npt.NDArray[np.float32]]
    payload: Payload | None
    sequence: int

    @classmethod
    def from_proto(cls, msg: points_pb2.Point) -> PointRecord:
        vectors = {sv.space: unpack_vectors(sv.vector).reshape(-1) for sv in msg.vectors}
        return cls(msg.id, vectors, decode_payload(msg.payload), msg.sequence)


@dataclass(frozen=True)
class Route:
    """How a query batch was served: ``transform`` is ``"identity"`` or a transform's name."""

    query_space: str
    home_space: str
    transform: str


_LE_F32 = np.dtype("<f4")  #: the wire's scores
_BIG_ENDIAN = sys.byteorder == "big"
_ROUTES: dict[tuple[str, str, str], Route] = {}  #: SearchResult.from_proto's Route values


def _route(key: tuple[str, str, str]) -> Route:
    """One immutable Route per distinct route, not one per search."""
    route = _ROUTES.get(key)
    if route is None:
        route = Route(*key)
        if len(_ROUTES) < 1024:
            _ROUTES[key] = route
    return route


_SERIAL_ROUTES: dict[int, tuple[Any, Route]] = {}  #: id(engine route) -> (that route, its Route)


def serial_route(r: Any) -> Route:
    """The Route of an engine's route object ``r`` (``query_space``, ``home_space``, ``transform``),
    cached by the object (an embedded client's serial searches return the engine's few route objects
    again and again); the cache holds ``r``, so its id is not reused while cached."""
    hit = _SERIAL_ROUTES.get(id(r))
    if hit is not None and hit[0] is r:
        return hit[1]
    route = _route((r.query_space, r.home_space, r.transform))
    if len(_SERIAL_ROUTES) < 1024:
        _SERIAL_ROUTES[id(r)] = (r, route)
    return route


@dataclass(frozen=True, eq=False)
class SearchResult:
    """The k nearest neighbours of nq queries; unpacks as ``D, I = client.search(...)``.

    ``scores`` : shape (nq, k), float32 -- inner products (cosine, ip; descending)
    or squared L2 distances (ascending); padding is -inf (cosine, ip) or +inf (l2).
    ``ids`` : shape (nq, k), dtype object (str) -- ``""`` pads a row when the
    collection holds fewer than k points (FAISS would say -1).
    ``payloads`` : nq lists of k decoded payloads, or ``None`` without ``with_payload``.
    """

    scores: npt.NDArray[np.float32]
    ids: npt.NDArray[np.object_]
    payloads: list[list[Payload | None]] | None
    route: Route
    exact: bool  #: True when the batch was served by brute force (index not trained yet)

    def __iter__(self) -> Iterator[npt.NDArray[Any]]:
        yield self.scores
        yield self.ids

    @classmethod
    def from_proto(cls, msg: points_pb2.SearchResponse, with_payload: bool) -> SearchResult:
        nq, k = msg.nq, msg.k
        n = nq * k
        if len(msg.scores) != 4 * n or len(msg.ids) != n:
            raise ValueError(
                f"a SearchResponse of nq={nq}, k={k} holds {len(msg.ids)} ids and {len(msg.scores)} score bytes"
            )
        payloads = None
        if with_payload:
            flat = [decode_payload(p) for p in msg.payloads]
            payloads = [flat[i * k : (i + 1) * k] for i in range(nq)]
        # one numpy call per array and no dataclass __init__: after a 1M search has evicted the caches,
        # each call costs ~10 us (this reads a reply in ~50 us there, against ~75 us for frombuffer,
        # astype, reshape and cls(...); bench/grpc_breakdown.py measures the whole client)
        scores = np.ndarray((nq, k), _LE_F32, bytearray(msg.scores))  # its own writable copy
        if _BIG_ENDIAN:
            scores = scores.astype(np.float32)
        r = msg.route
        res = cls.__new__(cls)
        res.__dict__.update(
            scores=scores,
            ids=np.fromiter(msg.ids, dtype=object, count=n).reshape(nq, k),
            payloads=payloads,
            route=_route((r.query_space, r.home_space, r.transform)),
            exact=msg.exact,
        )
        return res

    @classmethod
    def from_arrays(
        cls,
        D: npt.NDArray[np.float32],
        ids: npt.NDArray[np.object_],
        payloads: list[str] | None,
        route: tuple[str, str, str],
        exact: bool,
        with_payload: bool,
    ) -> SearchResult:
        """The result of an embedded client's direct search (the engine's arrays, copied), as
        :meth:`from_proto` reads the same search's reply: D (nq, k), ids (nq, k) object, the
        payloads' JSON texts row-major."""
        nq, k = D.shape
        out = None
        if with_payload:
            flat = [decode_payload(p) for p in payloads or ()]
            out = [flat[i * k : (i + 1) * k] for i in range(nq)]
        # D is the search's own new array: no copy; ids too, but a route's shadow check may still read them
        res = cls.__new__(cls)  # the frozen dataclass's fields in one update (its __init__: a setattr per field)
        res.__dict__.update(
            scores=D if D.dtype == np.float32 else D.astype(np.float32),
            ids=ids if route[2] == "identity" and ids.dtype == object else ids.astype(object),
            payloads=out,
            route=_route(route),
            exact=exact,
        )
        return res


@dataclass(frozen=True)
class TransformInfo:
    """A fitted (or fitting) transform; ``state`` is ``"fitting"``, ``"ready"`` or ``"failed"``.

    ``kind`` is ``"procrustes"``, ``"affine"``, ``"lambda_orthogonal"``, ``"basis"``,
    ``"residual_mlp"`` or ``"chain"``; ``config`` and ``report`` are the decoded JSON
    objects (the report holds the evaluation numbers once ready); ``progress`` in
    [0, 1] and ``stage`` follow the background fit.
    """

    name: str
    kind: str
    source_space: str
    target_space: str
    state: str
    error: str  #: why the fit failed ("" unless failed)
    config: dict[str, Any]
    report: dict[str, Any]
    checksum: str  #: SHA-256 of kind, config and weights ("" until ready)
    d_in: int
    d_out: int
    created_at: float  #: server time, seconds since the Unix epoch
    progress: float
    stage: str
    doc_pairs: int
    query_pairs: int

    @classmethod
    def from_proto(cls, msg: transforms_pb2.TransformInfo) -> TransformInfo:
        return cls(
            name=msg.name,
            kind=transforms_pb2.TransformKind.Name(msg.kind).removeprefix("TRANSFORM_KIND_").lower(),
            source_space=msg.source_space,
            target_space=msg.target_space,
            state=transforms_pb2.TransformState.Name(msg.state).removeprefix("TRANSFORM_STATE_").lower(),
            error=msg.error,
            config=_json_object(msg.config_json),
            report=_json_object(msg.report_json),
            checksum=msg.checksum,
            d_in=msg.d_in,
            d_out=msg.d_out,
            created_at=msg.created_at,
            progress=msg.progress,
            stage=msg.stage,
            doc_pairs=msg.doc_pairs,
            query_pairs=msg.query_pairs,
        )


@dataclass(frozen=True)
class RouteInfo:
    """One route of a collection, live or historical: queries of ``query_space`` reach ``home_space``
    through ``transform`` (``""``: the route was removed), with ``shadow`` (``""``: none) mirrored."""

    collection: str
    query_space: str
    home_space: str
    transform: str
    shadow: str
    activated_at: float  #: seconds since the Unix epoch (0 when the server does not say)
    deactivated_at: float  #: 0 while live
    forced: bool  #: activated despite a failing gate

    @classmethod
    def from_proto(cls, msg: transforms_pb2.RouteInfo) -> RouteInfo:
        return cls(
            msg.collection,
            msg.query_space,
            msg.home_space,
            msg.transform,
            msg.shadow,
            msg.activated_at,
            msg.deactivated_at,
            msg.forced,
        )


@dataclass(frozen=True)
class RoutesListing:
    """A collection's routing table: ``active`` (one per routed query space) and ``history``
    (every activation, newest first)."""

    active: list[RouteInfo]
    history: list[RouteInfo]

    @classmethod
    def from_proto(cls, msg: transforms_pb2.ListRoutesResponse) -> RoutesListing:
        return cls([RouteInfo.from_proto(r) for r in msg.active], [RouteInfo.from_proto(r) for r in msg.history])


@dataclass(frozen=True)
class ScoreCalibration:
    """The two-index merge's score calibration: old-index scores ``s`` become ``scale * s + bias``."""

    scale: float
    bias: float
    source: str  #: where it was fitted: ``"transform report (N pairs)"`` or ``"identity: <why>"``

    @classmethod
    def from_proto(cls, msg: migrations_pb2.ScoreCalibration) -> ScoreCalibration:
        return cls(msg.scale, msg.bias, msg.source)

    def to_proto(self) -> migrations_pb2.ScoreCalibration:
        return migrations_pb2.ScoreCalibration(scale=self.scale, bias=self.bias, source=self.source)


@dataclass(frozen=True)
class ForwardProgress:
    """A migration's forward upgrade (old vectors projected into the new space in the background);
    ``state`` is ``""`` (never run), ``"running"``, ``"done"``, ``"failed"`` or ``"cancelled"``."""

    state: str
    transform: str
    done: int  #: points projected (or found backfilled) so far, of ``total``
    total: int
    error: str  #: why it failed ("" unless failed)

    @property
    def fraction(self) -> float:
        """``done / total`` (1.0 when there is nothing to project)."""
        return self.done / self.total if self.total else 1.0

    @classmethod
    def from_proto(cls, msg: migrations_pb2.ForwardProgress) -> ForwardProgress:
        return cls(msg.state, msg.transform, msg.done, msg.total, msg.error)

    def to_proto(self) -> migrations_pb2.ForwardProgress:
        return migrations_pb2.ForwardProgress(
            state=self.state, transform=self.transform, done=self.done, total=self.total, error=self.error
        )


@dataclass(frozen=True)
class MigrationInfo:
    """A collection's migration from ``old_space`` to ``new_space``.

    ``phase`` is ``"backfill"`` (old space home, new vectors upserted beside the old ones),
    ``"cutover"`` (new space home, old vectors kept for a rollback), ``"finished"`` or
    ``"aborted"``; ``strategy`` is ``"two_indexes"`` or ``"shared_index"``. ``coverage`` is
    ``backfilled / points`` (1.0 for an empty collection); ``calibration`` is ``None`` when the
    server sent none; timestamps are seconds since the Unix epoch (0: not yet).
    """

    collection: str
    old_space: str
    new_space: str
    home_space: str
    phase: str
    strategy: str
    transform: str  #: new space -> old space, for new-space queries on points not backfilled
    reverse_transform: str  #: old space -> new space, for old-space queries after the cutover ("" : none)
    points: int
    backfilled: int  #: points with a real new-space vector
    projected: int  #: points with a forward projection
    coverage: float
    calibration: ScoreCalibration | None
    forward: ForwardProgress
    started_at: float
    cutover_at: float
    finished_at: float
    forced: bool  #: the cutover was forced below 100% coverage

    @classmethod
    def from_proto(cls, msg: migrations_pb2.MigrationInfo) -> MigrationInfo:
        return cls(
            collection=msg.collection,
            old_space=msg.old_space,
            new_space=msg.new_space,
            home_space=msg.home_space,
            phase=migrations_pb2.MigrationPhase.Name(msg.phase).removeprefix("MIGRATION_PHASE_").lower(),
            strategy=migrations_pb2.MigrationStrategy.Name(msg.strategy).removeprefix("MIGRATION_STRATEGY_").lower(),
            transform=msg.transform,
            reverse_transform=msg.reverse_transform,
            points=msg.points,
            backfilled=msg.backfilled,
            projected=msg.projected,
            coverage=msg.coverage,
            calibration=ScoreCalibration.from_proto(msg.calibration) if msg.HasField("calibration") else None,
            forward=ForwardProgress.from_proto(msg.forward),
            started_at=msg.started_at,
            cutover_at=msg.cutover_at,
            finished_at=msg.finished_at,
            forced=msg.forced,
        )

    def to_proto(self) -> migrations_pb2.MigrationInfo:
        """The protobuf message this was built from (``from_proto(info.to_proto()) == info``)."""
        msg = migrations_pb2.MigrationInfo(
            collection=self.collection,
            old_space=self.old_space,
            new_space=self.new_space,
            home_space=self.home_space,
            phase=migrations_pb2.MigrationPhase.Value(f"MIGRATION_PHASE_{self.phase.upper()}"),
            strategy=migrations_pb2.MigrationStrategy.Value(f"MIGRATION_STRATEGY_{self.strategy.upper()}"),
            transform=self.transform,
            reverse_transform=self.reverse_transform,
            points=self.points,
            backfilled=self.backfilled,
            projected=self.projected,
            coverage=self.coverage,
            forward=self.forward.to_proto(),
            started_at=self.started_at,
            cutover_at=self.cutover_at,
            finished_at=self.finished_at,
            forced=self.forced,
        )
        if self.calibration is not None:
            msg.calibration.CopyFrom(self.calibration.to_proto())
        return msg


@dataclass(frozen=True, eq=False)
class BackfillOrder:
    """Ids not backfilled yet whose re-embedding should help most, best first, with their scores
    (distance to their k-means centre, float32, descending); fewer than asked when fewer are left."""

    ids: list[str]
    scores: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_proto(cls, msg: migrations_pb2.SuggestBackfillOrderResponse) -> BackfillOrder:
        return cls(list(msg.ids), np.asarray(msg.scores, dtype=np.float32))


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text) if text else {}
    return value if isinstance(value, dict) else {"value": value}
