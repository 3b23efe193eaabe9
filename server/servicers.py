"""Thin gRPC servicers: convert the request, call the :class:`~.engine.Engine`, build the reply.

Domain errors leave through ``context.abort`` with the code from the one table
in ``errors.py``, a MemoryError as RESOURCE_EXHAUSTED (``errors.out_of_memory``);
an unexpected exception (a bug) leaves as INTERNAL with a log line, never as UNKNOWN.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import numpy as np

from interlingua.v1 import collections_pb2 as cpb
from interlingua.v1 import collections_pb2_grpc as cgrpc
from interlingua.v1 import common_pb2 as pb
from interlingua.v1 import points_pb2 as ppb
from interlingua.v1 import points_pb2_grpc as pgrpc
from interlingua.v1 import spaces_pb2 as spb
from interlingua.v1 import spaces_pb2_grpc as sgrpc

from .advisor import BATCH, OperatingPoint
from .backends.base import AnyCollection
from .backends.milvus import MilvusCollection
from .collection_spec import CollectionSpec
from .engine import Engine
from .errors import InterlinguaError, InvalidArgument, out_of_memory
from .pipeline import SearchParams
from .rpcwrap import abort_with
from .serial import search_one
from .store import SpaceRow

__all__ = ["CollectionServicer", "PointServicer", "SpaceServicer"]

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R")

METRIC_TO_PB = {"cosine": pb.METRIC_COSINE, "ip": pb.METRIC_IP, "l2": pb.METRIC_L2}
PB_TO_METRIC = {v: k for k, v in METRIC_TO_PB.items()}
STATE_TO_PB = {
    "exact": cpb.INDEX_STATE_EXACT,
    "training": cpb.INDEX_STATE_TRAINING,
    "ready": cpb.INDEX_STATE_READY,
    "failed": cpb.INDEX_STATE_FAILED,
}


def rpc_call(fn: Callable[..., R], request: Any, context: grpc.ServicerContext, what: str) -> R:
    """fn(request), with domain errors mapped to their status code, a MemoryError to RESOURCE_EXHAUSTED
    and anything else to INTERNAL."""
    try:
        return fn(request)
    except InterlinguaError as e:
        abort_with(context, e)  # (a rate limit: with retry-after)
    except MemoryError:
        log.warning("out of memory in %s", what)
        abort_with(context, out_of_memory(what))
    except Exception:
        log.exception("unexpected error in %s", what)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error in {what}; see the server log")
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def rpc(fn: F) -> F:
    """Decorates a unary (or stream-in) servicer method with :func:`rpc_call`."""

    what = fn.__name__

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:  # rpc_call's body, inlined: no closure per call
            return fn(self, request, context)
        except InterlinguaError as e:
            abort_with(context, e)  # (a rate limit: with retry-after)
        except MemoryError:
            log.warning("out of memory in %s", what)
            abort_with(context, out_of_memory(what))
        except Exception:
            log.exception("unexpected error in %s", what)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in {what}; see the server log")
        raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises

    return wrapper  # type: ignore[return-value]


def space_pb(s: SpaceRow) -> pb.Space:
    return pb.Space(
        name=s.name, dim=s.dim, metric=METRIC_TO_PB[s.metric], description=s.description, created_at=s.created_at
    )


def collection_pb(c: AnyCollection) -> cpb.CollectionInfo:
    if isinstance(c, MilvusCollection):
        return milvus_collection_pb(c)
    snap = c.segments.snapshot
    return cpb.CollectionInfo(
        name=c.name,
        home_space=c.home.name,
        index_spec=c.row.spec.index_spec,
        state=STATE_TO_PB[c.state()],
        num_points=c.num_points(),
        vectors_per_space=c.counts,
        indexed_vectors=snap.nsealed - snap.ndead_sealed,
        fresh_vectors=snap.nfresh - snap.ndead_fresh,
        last_sequence=c.last_sequence,
        checkpoint_sequence=c.checkpoint_sequence,
        train_min_points=c.segments.train_min_points,
        created_at=c.row.created_at,
        deleted_labels=snap.ndead_sealed + snap.ndead_fresh,
        prefix_dims=c.index_dims,
        index_bytes_per_vector=c.index_bytes_per_vector(),
        rerank_bytes_per_vector=4 * c.home.dim if c.row.spec.prefix_dims else 0,
        basis_transform=c.row.spec.basis_transform,
        ef_construction=c.spec.ef_construction,
        recall_at_dims=c.recall_at_dims(),
        failure_reason=c.failure.reason if c.failure else "",
        failed_at=c.failure.at if c.failure else 0.0,
        compactions=c.compactions,
        target_recall=c.row.spec.target_recall,
        operating_point=point_pb(OperatingPoint.from_dict(p)) if (p := c.row.spec.point()) else None,
        advisor_status=c.advisor_status,
        backend=c.row.spec.backend or "embedded",
    )


def milvus_collection_pb(c: MilvusCollection, known: tuple[int, dict[str, int]] | None = None) -> cpb.CollectionInfo:
    """A ``milvus`` collection's info: the counts the front-end keeps (counted in the engine once, when
    first needed: UNAVAILABLE while it is unreachable then), or ``known`` ones (points, vectors per
    space: a move's, just verified)."""
    num_points, counts = known if known is not None else c.counted()
    home = counts.get(c.home.name, 0)
    flushed = home - min(c.unflushed, home)
    # indexed: what the engine's index covers of the flushed rows (its own report, less the rows still
    # waiting for it; a move's verified counts are taken as flushed), fresh: the rest (unflushed, or
    # flushed and still searched by brute force while the engine indexes it)
    if known is not None:
        indexed = flushed
    else:
        done, pending = c.index_progress()
        indexed = max(0, min(flushed - pending, done))
    spec = c.row.spec
    return cpb.CollectionInfo(
        name=c.name,
        home_space=c.home.name,
        index_spec=spec.index_spec,
        state=STATE_TO_PB[c.state()],
        num_points=num_points,
        vectors_per_space=counts,
        indexed_vectors=indexed,
        fresh_vectors=home - indexed,  # written since the last flush, or not indexed by the engine yet
        last_sequence=c.last_sequence,
        created_at=c.row.created_at,
        prefix_dims=c.home.dim,
        basis_transform=spec.basis_transform,
        ef_construction=c.index.params.get("efConstruction", 0),
        backend=spec.backend,
        backend_uri=spec.backend_uri,
    )


def point_pb(p: OperatingPoint) -> cpb.OperatingPoint:
    return cpb.OperatingPoint(
        index_spec=p.index_spec,
        ef_search=p.ef_search,
        nprobe=p.nprobe,
        k_factor=p.k_factor,
        recall=p.recall,
        qps=p.qps,
        bytes_per_vector=p.bytes_per_vector,
        build_seconds=p.build_seconds,
        train_points=p.train_points,
        tuned_points=p.tuned_points,
        tuned_queries=p.tuned_queries,
    )


_LE_F4 = np.dtype("<f4")
#: SearchParams by (k, ef_search, nprobe, shortlist_k, funnel, k_factor): one per distinct request, not one per call
_PARAMS: dict[tuple[Any, ...], SearchParams] = {}


_ROUTE_PB: dict[int, tuple[Any, pb.Route]] = {}  #: id(engine route) -> (that route, its message)


def route_pb(r: Any) -> pb.Route:
    """The Route message of an engine's route object ``r``, built once per route object (the cache
    holds ``r``: its id is not reused while cached); a reply's constructor copies it in."""
    hit = _ROUTE_PB.get(id(r))
    if hit is not None and hit[0] is r:
        return hit[1]
    msg = pb.Route(query_space=r.query_space, home_space=r.home_space, transform=r.transform)
    if len(_ROUTE_PB) < 1024:
        _ROUTE_PB[id(r)] = (r, msg)
    return msg


def request_params(
    k: int,
    *,
    ef_search: int | None = None,
    nprobe: int | None = None,
    shortlist_k: int | None = None,
    funnel: tuple[tuple[int, int], ...] = (),
    k_factor: int | None = None,
) -> SearchParams:
    """A search's parameters as the engine takes them (None: not set), for the servicer and for an
    embedded client's direct search (``interlingua.client._embedded``)."""
    key = (k, ef_search, nprobe, shortlist_k, funnel, k_factor)
    params = _PARAMS.get(key)
    if params is None:
        params = SearchParams(k, ef_search, nprobe, shortlist_k, funnel, k_factor)
        if len(_PARAMS) < 4096:  # values are checked later: a bounded cache of what the wire carried
            _PARAMS[key] = params
    return params


class SpaceServicer(sgrpc.SpaceServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @rpc
    def RegisterSpace(self, request: spb.RegisterSpaceRequest, context: grpc.ServicerContext) -> pb.Space:
        s = request.space
        if s.metric not in PB_TO_METRIC:
            raise InvalidArgument(f"space.metric must be METRIC_COSINE, METRIC_IP or METRIC_L2 (got {s.metric})")
        return space_pb(self.engine.register_space(s.name, s.dim, PB_TO_METRIC[s.metric], s.description))

    @rpc
    def GetSpace(self, request: spb.GetSpaceRequest, context: grpc.ServicerContext) -> pb.Space:
        return space_pb(self.engine.get_space(request.name))

    @rpc
    def ListSpaces(self, request: spb.ListSpacesRequest, context: grpc.ServicerContext) -> spb.ListSpacesResponse:
        return spb.ListSpacesResponse(spaces=[space_pb(s) for s in self.engine.list_spaces()])


class CollectionServicer(cgrpc.CollectionServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @rpc
    def CreateCollection(self, request: cpb.CreateCollectionRequest, context: grpc.ServicerContext) -> Any:
        r = request
        spec = CollectionSpec(
            name=r.name,
            home_space=r.home_space,
            index_spec=r.index_spec,
            train_min_points=r.train_min_points,
            prefix_dims=r.prefix_dims,
            basis_transform=r.basis_transform,
            ef_construction=r.ef_construction,
            target_recall=r.target_recall,
            backend=r.backend,
            backend_uri=r.backend_uri,
        )
        return collection_pb(self.engine.create_collection(spec))

    @rpc
    def GetCollection(self, request: cpb.GetCollectionRequest, context: grpc.ServicerContext) -> Any:
        return collection_pb(self.engine.collection(request.name))

    @rpc
    def ListCollections(self, request: cpb.ListCollectionsRequest, context: grpc.ServicerContext) -> Any:
        return cpb.ListCollectionsResponse(collections=[collection_pb(c) for c in self.engine.list_collections()])

    @rpc
    def DeleteCollection(self, request: cpb.DeleteCollectionRequest, context: grpc.ServicerContext) -> Any:
        self.engine.delete_collection(request.name)
        return cpb.DeleteCollectionResponse()

    @rpc
    def MoveCollection(self, request: cpb.MoveCollectionRequest, context: grpc.ServicerContext) -> Any:
        m = self.engine.move_collection(request.name, request.backend, request.backend_uri)
        return cpb.MoveCollectionResponse(
            collection=milvus_collection_pb(m.collection, (m.num_points, m.vectors_per_space)),
            points_copied=m.points_copied,
            vectors_copied=m.vectors_copied,
            writes_caught_up=m.writes_caught_up,
            deletes_caught_up=m.deletes_caught_up,
            seconds=m.seconds,
            write_pause_seconds=m.write_pause_seconds,
            spot_queries=m.spot.queries,
            spot_top1_self_embedded=m.spot.self_embedded,
            spot_top1_self_milvus=m.spot.self_milvus,
            spot_top1_agreement=m.spot.agreement,
            spot_top10_overlap=m.spot.overlap,
            num_points=m.num_points,
            vectors_per_space=m.vectors_per_space,
        )

    @rpc
    def RecommendIndex(self, request: cpb.RecommendIndexRequest, context: grpc.ServicerContext) -> Any:
        r = request
        rec = self.engine.recommend_index(
            r.collection,
            r.target_recall,
            r.k,
            r.queries.data,
            r.queries.dim,
            sample_size=r.sample_size,
            num_queries=r.num_queries,
            candidates=list(r.candidates),
        )
        return cpb.RecommendIndexResponse(
            frontier=[point_pb(p) for p in rec.frontier],
            chosen=point_pb(rec.chosen) if rec.chosen is not None else None,
            sample_points=rec.sample_points,
            num_queries=rec.num_queries,
            k=rec.k,
            target_recall=rec.target_recall,
            held_out_queries=rec.held_out,
            batch_size=BATCH,
            points_measured=rec.points_measured,
            seconds=rec.seconds,
        )


class PointServicer(pgrpc.PointServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _upsert(self, r: ppb.UpsertRequest) -> int:
        return self.engine.upsert(r.collection, r.space, list(r.ids), r.vectors.data, r.vectors.dim, list(r.payloads))

    @rpc
    def Upsert(self, request: ppb.UpsertRequest, context: grpc.ServicerContext) -> ppb.UpsertResponse:
        seq = self._upsert(request)
        return ppb.UpsertResponse(upserted=len(request.ids), sequence=seq)

    @rpc
    def UpsertStream(self, request_iterator: Iterator[ppb.UpsertRequest], context: grpc.ServicerContext) -> Any:
        total = seq = done = 0
        try:  # (reading the next message can fail too: a message that does not parse, the key's rate limit)
            for r in request_iterator:
                seq = self._upsert(r)
                total += len(r.ids)
                done += 1
        except InterlinguaError as e:
            head = "" if e.message.startswith(f"stream message {done} ") else f"stream message {done}: "
            e.message = f"{head}{e.message} (messages 0..{done - 1}, {total} vectors, were committed)"
            raise
        return ppb.UpsertResponse(upserted=total, sequence=seq)

    @rpc
    def DeletePoints(self, request: ppb.DeletePointsRequest, context: grpc.ServicerContext) -> Any:
        n, seq = self.engine.delete_points(request.collection, list(request.ids), request.missing_ok)
        return ppb.DeletePointsResponse(deleted=n, sequence=seq)

    @rpc
    def GetPoints(self, request: ppb.GetPointsRequest, context: grpc.ServicerContext) -> ppb.GetPointsResponse:
        r = request
        recs = self.engine.get_points(r.collection, list(r.ids), r.with_vectors, r.with_payload, list(r.spaces))
        dims = {name: s.dim for name, s in self.engine.spaces.items()}
        return ppb.GetPointsResponse(
            points=[
                ppb.Point(
                    id=p.id,
                    vectors=[
                        ppb.SpaceVector(space=s, vector=pb.Vectors(data=b, dim=dims[s])) for s, b in p.vectors.items()
                    ],
                    payload=p.payload or "",
                    sequence=p.sequence,
                )
                for p in recs
            ]
        )

    def _search(self, r: ppb.SearchRequest) -> ppb.SearchResponse:
        p, q = r.params, r.queries
        if not r.with_payload and not p.funnel and not p.HasField("shortlist_k"):
            data = q.data
            if len(data) == 4 * q.dim:  # the serial hot path (serial.py) from here: fewer frames on cold caches
                one = search_one(
                    self.engine,
                    r.collection,
                    r.query_space,
                    np.frombuffer(data, dtype=_LE_F4),
                    r.k,
                    p.ef_search if p.HasField("ef_search") else None,
                    p.nprobe if p.HasField("nprobe") else None,
                    p.k_factor if p.HasField("k_factor") else None,
                )
                if one is not None:
                    k = one.D.shape[1]
                    return ppb.SearchResponse(
                        nq=1, k=k, ids=one.ids.ravel().tolist(), scores=one.D.tobytes(), route=route_pb(one.route)
                    )
        if not p.ListFields():  # no parameter set: one SearchParams per k, not one per call
            params = request_params(r.k)
        else:
            params = request_params(
                r.k,
                ef_search=p.ef_search if p.HasField("ef_search") else None,
                nprobe=p.nprobe if p.HasField("nprobe") else None,
                shortlist_k=p.shortlist_k if p.HasField("shortlist_k") else None,
                funnel=tuple((st.dims, st.keep) for st in p.funnel),
                k_factor=p.k_factor if p.HasField("k_factor") else None,
            )
        res = self.engine.search_pipeline(r.collection, r.query_space, q.data, q.dim, params, r.with_payload)
        D, route = res.D, res.route
        reply = ppb.SearchResponse(
            nq=D.shape[0],
            k=D.shape[1],
            ids=res.ids.ravel().tolist(),
            scores=(D if D.dtype == _LE_F4 and D.flags.c_contiguous else np.ascontiguousarray(D, "<f4")).tobytes(),
            exact=res.exact,
        )
        if res.payloads:
            reply.payloads.extend(res.payloads)
        reply.route.query_space = route.query_space
        reply.route.home_space = route.home_space
        reply.route.transform = route.transform
        return reply

    @rpc
    def Search(self, request: ppb.SearchRequest, context: grpc.ServicerContext) -> ppb.SearchResponse:
        return self._search(request)

    def SearchStream(
        self, request_iterator: Iterator[ppb.SearchRequest], context: grpc.ServicerContext
    ) -> Iterator[ppb.SearchResponse]:
        for i, request in enumerate(request_iterator):
            yield rpc_call(self._search, request, context, f"SearchStream request {i}")
