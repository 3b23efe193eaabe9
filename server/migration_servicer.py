"""Thin gRPC servicer of ``MigrationService``: proto <-> :class:`~.migration.manager.Migrations`.

Every check and state change is the manager's (``server/migration/manager.py``); this module only
converts requests and :class:`~.migration.runtime.MigrationBase` (either backend) to and from the proto. Covered by
``tests/test_migration.py``.
"""

from __future__ import annotations

import grpc

from interlingua.v1 import migrations_pb2 as mpb
from interlingua.v1 import migrations_pb2_grpc as mgrpc

from .engine import Engine
from .errors import InvalidArgument, Unavailable
from .migration.manager import Migrations
from .migration.runtime import MigrationBase
from .servicers import rpc

__all__ = ["MigrationServicer", "migration_pb"]

_PHASE = {
    "backfill": mpb.MIGRATION_PHASE_BACKFILL,
    "cutover": mpb.MIGRATION_PHASE_CUTOVER,
    "finished": mpb.MIGRATION_PHASE_FINISHED,
    "aborted": mpb.MIGRATION_PHASE_ABORTED,
}
_STRATEGY = {"two_indexes": mpb.MIGRATION_STRATEGY_TWO_INDEXES, "shared_index": mpb.MIGRATION_STRATEGY_SHARED_INDEX}
_STRATEGY_NAME = {v: k for k, v in _STRATEGY.items()}


def migration_pb(m: MigrationBase) -> mpb.MigrationInfo:
    r, fw, cal = m.rec, m.rec.forward, m.calibration
    home = r.new_space if r.phase in ("cutover", "finished") else r.old_space
    return mpb.MigrationInfo(
        collection=r.collection,
        old_space=r.old_space,
        new_space=r.new_space,
        home_space=home,
        phase=_PHASE[r.phase],
        strategy=_STRATEGY[r.strategy],
        transform=r.transform,
        reverse_transform=r.reverse_transform,
        points=m.points(),
        backfilled=m.backfilled(),
        projected=len(m.projected),
        coverage=m.coverage(),
        calibration=mpb.ScoreCalibration(scale=cal.scale, bias=cal.bias, source=cal.source),
        forward=mpb.ForwardProgress(
            state=str(fw.get("state", "")),
            transform=str(fw.get("transform", "")),
            done=int(fw.get("done", 0)),
            total=int(fw.get("total", 0)),
            error=str(fw.get("error", "")),
        ),
        started_at=r.started_at,
        cutover_at=r.cutover_at,
        forced=r.forced,
    )


class MigrationServicer(mgrpc.MigrationServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _m(self) -> Migrations:
        self.engine._ready()
        if self.engine.migrations is None:
            raise Unavailable("migrations are not loaded yet")
        return self.engine.migrations

    @rpc
    def StartMigration(self, request: mpb.StartMigrationRequest, context: grpc.ServicerContext) -> mpb.MigrationInfo:
        if request.strategy not in (0, *_STRATEGY_NAME):
            raise InvalidArgument(f"strategy {request.strategy} is not a MigrationStrategy")
        strategy = _STRATEGY_NAME.get(request.strategy, "two_indexes")
        m = self._m().start(
            request.collection, request.new_space, request.transform, request.reverse_transform, strategy
        )
        return migration_pb(m)

    @rpc
    def GetMigration(self, request: mpb.GetMigrationRequest, context: grpc.ServicerContext) -> mpb.MigrationInfo:
        return migration_pb(self._m().require(request.collection))

    @rpc
    def Cutover(self, request: mpb.CutoverRequest, context: grpc.ServicerContext) -> mpb.MigrationInfo:
        return migration_pb(self._m().cutover(request.collection, request.force))

    @rpc
    def RollbackCutover(self, request: mpb.RollbackCutoverRequest, context: grpc.ServicerContext) -> mpb.MigrationInfo:
        return migration_pb(self._m().rollback(request.collection))

    @rpc
    def FinishMigration(self, request: mpb.FinishMigrationRequest, context: grpc.ServicerContext) -> mpb.MigrationInfo:
        return migration_pb(self._m().finish(request.collection))

    @rpc
    def AbortMigration(self, request: mpb.AbortMigrationRequest, context: grpc.ServicerContext) -> mpb.MigrationInfo:
        return migration_pb(self._m().abort(request.collection))

    @rpc
    def ForwardUpgrade(self, request: mpb.ForwardUpgradeRequest, context: grpc.ServicerContext) -> mpb.MigrationInfo:
        return migration_pb(self._m().forward_upgrade(request.collection, request.transform))

    @rpc
    def SuggestBackfillOrder(
        self, request: mpb.SuggestBackfillOrderRequest, context: grpc.ServicerContext
    ) -> mpb.SuggestBackfillOrderResponse:
        ids, scores = self._m().suggest(request.collection, request.n)
        return mpb.SuggestBackfillOrderResponse(ids=ids, scores=scores.tolist())
