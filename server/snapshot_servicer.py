"""Thin gRPC servicer of ``SnapshotService``: checks the lifecycle, calls :class:`~.snapshots.Snapshots`.

Restores run offline (``interlingua restore``, see ``restore.py``): RestoreSnapshot
checks the snapshot and, unless ``validate_only``, answers FAILED_PRECONDITION with
the command that restores it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc

from interlingua.v1 import snapshots_pb2 as snpb
from interlingua.v1 import snapshots_pb2_grpc as sngrpc

from .engine import Engine, Lifecycle
from .errors import FailedPrecondition, InterlinguaError, Unavailable, status_for
from .servicers import rpc
from .snapshots import Manifest, Snapshots

__all__ = ["SnapshotServicer", "snapshot_pb"]

log = logging.getLogger(__name__)


def snapshot_pb(m: Manifest) -> snpb.SnapshotInfo:
    return snpb.SnapshotInfo(
        name=m.name,
        created_at=m.created_at,
        sequence=m.sequence,
        points={name: int(c.get("points", 0)) for name, c in m.collections.items()},
        spaces=len(m.spaces),
        transforms=len(m.transforms),
        bytes=m.bytes,
        format_version=m.format_version,
        manifest_json=m.to_json(),
    )


class SnapshotServicer(sngrpc.SnapshotServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._snapshots: Snapshots | None = None

    def _ready(self) -> Snapshots:
        """The data dir's snapshots, once the engine serves (UNAVAILABLE while loading or draining)."""
        store = self.engine.store
        if self.engine.state is not Lifecycle.SERVING or store is None:
            raise Unavailable(f"the service is {self.engine.state.value}; retry when health reports SERVING")
        if self._snapshots is None:
            self._snapshots = Snapshots(Path(self.engine.config.data_dir), store.path)
        return self._snapshots

    @rpc
    def CreateSnapshot(self, request: snpb.CreateSnapshotRequest, context: grpc.ServicerContext) -> snpb.SnapshotInfo:
        snapshots = self._ready()
        on_milvus = sorted(c.name for c in self.engine.collections.values() if c.row.spec.on_milvus)
        if on_milvus:  # their points are in the engine: a copy of the store would hold none of them
            raise FailedPrecondition(
                f"the milvus backend does not support snapshots yet: collection(s) {', '.join(on_milvus[:5])} keep"
                " their points in a Milvus engine; back that up with Milvus' own tools"
            )
        return snapshot_pb(snapshots.create(request.name))

    @rpc
    def ListSnapshots(
        self, request: snpb.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> snpb.ListSnapshotsResponse:
        return snpb.ListSnapshotsResponse(snapshots=[snapshot_pb(m) for m in self._ready().list()])

    @rpc
    def DeleteSnapshot(
        self, request: snpb.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> snpb.DeleteSnapshotResponse:
        self._ready().delete(request.name)
        return snpb.DeleteSnapshotResponse()

    @rpc
    def RestoreSnapshot(self, request: snpb.RestoreSnapshotRequest, context: grpc.ServicerContext) -> snpb.SnapshotInfo:
        snapshots = self._ready()
        m = snapshots.verify(request.name)
        if request.validate_only:
            return snapshot_pb(m)
        data_dir = Path(self.engine.config.data_dir)
        raise FailedPrecondition(
            f"snapshot {m.name!r} is intact; restores run offline: stop the server, then run"
            f" `interlingua restore {snapshots.root / m.name} --data-dir {data_dir}` and start it again"
        )

    def DownloadSnapshot(
        self, request: snpb.DownloadSnapshotRequest, context: grpc.ServicerContext
    ) -> Iterator[snpb.SnapshotChunk]:
        try:
            for file, offset, data, size in self._ready().chunks(request.name):
                yield snpb.SnapshotChunk(file=file, offset=offset, data=data, file_bytes=size)
        except InterlinguaError as e:
            context.abort(status_for(e), e.message)
        except OSError as e:
            log.exception("DownloadSnapshot %r failed", request.name[:128])
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot read the snapshot: {e.strerror}")
