"""Thin gRPC servicer of ``TransformService``: assembles calibration streams, calls the engine's
transform registry (:class:`~.compat.Compat`) and route tables (:class:`~.routes.Routes`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc

from interlingua.jsonsafe import finite
from interlingua.v1 import transforms_pb2 as tpb
from interlingua.v1 import transforms_pb2_grpc as tgrpc

from . import validate as v
from .activation import GatePolicy
from .backends.base import AnyCollection
from .compat import TransformRecord
from .engine import Engine
from .errors import InvalidArgument
from .fit_stream import Assembler
from .routes import Routes
from .servicers import rpc
from .store import RouteRow
from .transforms.kinds import WIRE

__all__ = ["TransformServicer"]

#: kind name -> TransformKind, by enum value name, for every kind a request may name (the kind registry)
KIND_TO_PB = {k.name: tpb.TransformKind.Value(k.proto) for k in WIRE}
PB_TO_KIND = {value: key for key, value in KIND_TO_PB.items()}
STATE_TO_PB = {
    "fitting": tpb.TRANSFORM_STATE_FITTING,
    "ready": tpb.TRANSFORM_STATE_READY,
    "failed": tpb.TRANSFORM_STATE_FAILED,
}


def transform_pb(r: TransformRecord) -> tpb.TransformInfo:
    return tpb.TransformInfo(
        name=r.name,
        kind=KIND_TO_PB[r.kind],
        source_space=r.source,
        target_space=r.target,
        state=STATE_TO_PB[r.state],
        error=r.error,
        config_json=json.dumps(finite(r.config), allow_nan=False),  # transforms stored before strict JSON
        report_json=json.dumps(finite(r.report), allow_nan=False),
        checksum=r.checksum,
        d_in=r.d_in,
        d_out=r.d_out,
        created_at=r.created_at,
        progress=r.progress,
        stage=r.stage,
        doc_pairs=r.doc_pairs,
        query_pairs=r.query_pairs,
    )


def route_pb(collection: str, home: str, row: RouteRow) -> tpb.RouteInfo:
    return tpb.RouteInfo(
        collection=collection,
        query_space=row.query_space,
        home_space=home,
        transform=row.transform,
        shadow=row.shadow,
        activated_at=row.activated_at,
        deactivated_at=row.deactivated_at,
        forced=bool(row.forced),
    )


def live_route_pb(routes: Routes, col: AnyCollection, query_space: str) -> tpb.RouteInfo:
    """The live route from ``query_space`` as stored (transform "" when there is none)."""
    row = routes.live_row(col, query_space)
    if row is None:
        return tpb.RouteInfo(collection=col.name, query_space=query_space, home_space=col.home.name)
    return route_pb(col.name, col.home.name, row)


def gate_policy(default: GatePolicy, g: tpb.GatePolicy) -> GatePolicy:
    """The server's default policy with the request's set fields; InvalidArgument for an out-of-range value."""
    given = {
        "min_retention": g.min_retention if g.HasField("min_retention") else None,
        "max_negative_flip_rate": g.max_negative_flip_rate if g.HasField("max_negative_flip_rate") else None,
        "require_ecc": g.require_ecc if g.HasField("require_ecc") else None,
    }
    try:
        return default.override(**given)
    except ValueError as e:
        raise InvalidArgument(f"gate: {e}") from None


class TransformServicer(tgrpc.TransformServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @rpc
    def FitTransform(self, request_iterator: Iterator[tpb.FitTransformRequest], context: grpc.ServicerContext) -> Any:
        compat = self.engine.require_compat()
        it = iter(request_iterator)
        first = next(it, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("the first FitTransform message must be a header")
        h = first.header
        if h.kind not in PB_TO_KIND:
            raise InvalidArgument("header.kind must be set to a TransformKind")
        source, target = self.engine.get_space(h.source_space), self.engine.get_space(h.target_space)
        config = v.parse_json_object(h.config_json, "header.config_json") if h.config_json else {}
        asm = Assembler(source, target, self.engine.limits)
        asm.budget.message(first.ByteSize(), 0)
        for i, msg in enumerate(it, start=1):
            asm.budget.message(msg.ByteSize(), i)
            part = msg.WhichOneof("part")
            if part == "pairs":
                asm.add_pairs(msg.pairs, i)
            elif part == "eval":
                asm.add_eval(msg.eval, i)
            else:
                raise InvalidArgument(f"message {i}: only the first message may be a header")
        rec = compat.fit(
            h.name,
            PB_TO_KIND[h.kind],
            source,
            target,
            config,
            asm.calibration(),
            asm.eval_set(),
            h.holdout,
            list(h.chain),
            max_seconds=self.engine.limits.max_fit_seconds,
        )
        return transform_pb(rec)

    @rpc
    def CancelFit(self, request: tpb.CancelFitRequest, context: grpc.ServicerContext) -> Any:
        return transform_pb(self.engine.require_compat().cancel(request.name))

    @rpc
    def DeleteTransform(self, request: tpb.DeleteTransformRequest, context: grpc.ServicerContext) -> Any:
        return transform_pb(self.engine.delete_transform(request.name))

    @rpc
    def GetTransform(self, request: tpb.GetTransformRequest, context: grpc.ServicerContext) -> Any:
        return transform_pb(self.engine.require_compat().get(request.name))

    @rpc
    def ListTransforms(self, request: tpb.ListTransformsRequest, context: grpc.ServicerContext) -> Any:
        return tpb.ListTransformsResponse(
            transforms=[transform_pb(r) for r in self.engine.require_compat().list_transforms()]
        )

    @rpc
    def ActivateRoute(self, request: tpb.ActivateRouteRequest, context: grpc.ServicerContext) -> Any:
        routes, col = self.engine.require_routes(), self.engine.collection(request.collection)
        policy = gate_policy(routes.policy, request.gate) if request.HasField("gate") else None
        route = routes.activate(col, request.transform, request.force, policy)
        return live_route_pb(routes, col, route.query_space)

    @rpc
    def RollbackRoute(self, request: tpb.RollbackRouteRequest, context: grpc.ServicerContext) -> Any:
        routes, col = self.engine.require_routes(), self.engine.collection(request.collection)
        routes.rollback(col, request.query_space)
        return live_route_pb(routes, col, request.query_space)

    @rpc
    def ListRoutes(self, request: tpb.ListRoutesRequest, context: grpc.ServicerContext) -> Any:
        routes, col = self.engine.require_routes(), self.engine.collection(request.collection)
        history = [route_pb(col.name, col.home.name, r) for r in routes.history(col)]
        active = sorted((r for r in history if r.deactivated_at == 0 and r.transform), key=lambda r: r.query_space)
        return tpb.ListRoutesResponse(active=active, history=history)

    @rpc
    def SetShadow(self, request: tpb.SetShadowRequest, context: grpc.ServicerContext) -> Any:
        routes, col = self.engine.require_routes(), self.engine.collection(request.collection)
        route = routes.set_shadow(col, request.query_space, request.transform, request.sample_rate)
        return live_route_pb(routes, col, route.query_space)
