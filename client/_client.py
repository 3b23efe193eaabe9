"""The Python client: numpy in, numpy out, typed exceptions out of every call.

``Client(target)`` opens one insecure channel with the message-size options
set, sends the API key as ``authorization: Bearer <key>`` metadata on every
call, and turns each :class:`grpc.RpcError` into an
:class:`~interlingua.client.InterlinguaError` subclass (raised ``from`` it).
Large upserts are split into batches of ``batch_size`` rows, sliced lazily so a
memory-mapped ``.npy`` streams. Covered by ``tests/test_client.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from interlingua.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    common_pb2,
    points_pb2,
    points_pb2_grpc,
    spaces_pb2,
    spaces_pb2_grpc,
)

from ._exceptions import DeadlineExceeded, InterlinguaError, InvalidArgument, Unavailable, from_rpc_error
from ._types import METRICS, CollectionInfo, PointRecord, SearchResult, Space
from ._wire import PayloadArg, as_matrix, pack_vectors, upsert_requests

__all__ = ["Client"]

_T = TypeVar("_T")


class Client:
    """A connection to one Interlingua server; use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        timeout: float | None = 30.0,
        max_message_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.target = target
        self.timeout = timeout  #: seconds per call (each batch of an upsert is one call); None: no limit
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._channel = grpc.insecure_channel(target, options=options)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._spaces = spaces_pb2_grpc.SpaceServiceStub(self._channel)
        self._collections = collections_pb2_grpc.CollectionServiceStub(self._channel)
        self._points = points_pb2_grpc.PointServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def _call(self, method: Callable[..., _T], request: Any, timeout: float | None = None) -> _T:
        """One call with this client's timeout (or a shorter one) and metadata; raises typed errors."""
        if timeout is None or (self.timeout is not None and self.timeout < timeout):
            timeout = self.timeout
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    # -- spaces ---------------------------------------------------------------------------------------

    def register_space(self, name: str, dim: int, metric: str = "cosine", description: str = "") -> Space:
        """Registers a space; ``metric`` is ``"cosine"``, ``"ip"`` or ``"l2"``."""
        if metric not in METRICS:
            raise InvalidArgument(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
        space = common_pb2.Space(name=name, dim=dim, metric=METRICS[metric], description=description)
        msg: common_pb2.Space = self._call(self._spaces.RegisterSpace, spaces_pb2.RegisterSpaceRequest(space=space))
        return Space.from_proto(msg)

    def get_space(self, name: str) -> Space:
        msg: common_pb2.Space = self._call(self._spaces.GetSpace, spaces_pb2.GetSpaceRequest(name=name))
        return Space.from_proto(msg)

    def list_spaces(self) -> list[Space]:
        """All registered spaces, ordered by name."""
        resp: spaces_pb2.ListSpacesResponse = self._call(self._spaces.ListSpaces, spaces_pb2.ListSpacesRequest())
        return [Space.from_proto(s) for s in resp.spaces]

    # -- collections ----------------------------------------------------------------------------------

    def create_collection(
        self, name: str, home_space: str, index_spec: str = "Flat", train_min_points: int = 0
    ) -> CollectionInfo:
        """Creates an empty collection indexed in ``home_space`` with a FAISS factory string."""
        req = collections_pb2.CreateCollectionRequest(
            name=name, home_space=home_space, index_spec=index_spec, train_min_points=train_min_points
        )
        msg: collections_pb2.CollectionInfo = self._call(self._collections.CreateCollection, req)
        return CollectionInfo.from_proto(msg)

    def get_collection(self, name: str) -> CollectionInfo:
        req = collections_pb2.GetCollectionRequest(name=name)
        msg: collections_pb2.CollectionInfo = self._call(self._collections.GetCollection, req)
        return CollectionInfo.from_proto(msg)

    def list_collections(self) -> list[CollectionInfo]:
        """All collections, ordered by name."""
        req = collections_pb2.ListCollectionsRequest()
        resp: collections_pb2.ListCollectionsResponse = self._call(self._collections.ListCollections, req)
        return [CollectionInfo.from_proto(c) for c in resp.collections]

    def delete_collection(self, name: str) -> None:
        """Deletes a collection with its points, vectors and index files."""
        self._call(self._collections.DeleteCollection, collections_pb2.DeleteCollectionRequest(name=name))

    # -- points ---------------------------------------------------------------------------------------

    def upsert(
        self,
        collection: str,
        ids: Sequence[str],
        vectors: npt.ArrayLike,
        *,
        space: str,
        payloads: PayloadArg = None,
        batch_size: int = 4096,
        progress: bool = False,
    ) -> int:
        """Upserts n points, vectors shape (n, d), one atomic Upsert call per batch.

        Payload mappings are sent as JSON, ``None`` keeps the stored payload.
        Returns the sequence number of the last batch (0 when n == 0). A failed
        batch raises; the batches before it stay committed.
        """
        sequence = 0
        requests = upsert_requests(
            collection, ids, vectors, space=space, payloads=payloads, batch_size=batch_size, progress=progress
        )
        for req in requests:
            resp: points_pb2.UpsertResponse = self._call(self._points.Upsert, req)
            sequence = resp.sequence
        return sequence

    def upsert_stream(
        self,
        collection: str,
        ids: Sequence[str],
        vectors: npt.ArrayLike,
        *,
        space: str,
        payloads: PayloadArg = None,
        batch_size: int = 4096,
        progress: bool = False,
    ) -> int:
        """Like :meth:`upsert`, over one client-streaming UpsertStream call (``timeout`` covers it all).

        The progress bar counts batches handed to gRPC, not acknowledged ones.
        """
        requests = upsert_requests(
            collection, ids, vectors, space=space, payloads=payloads, batch_size=batch_size, progress=progress
        )
        resp: points_pb2.UpsertResponse = self._call(self._points.UpsertStream, requests)
        return resp.sequence

    def delete(self, collection: str, ids: Sequence[str], *, missing_ok: bool = False) -> int:
        """Deletes points by id, atomically; returns how many were deleted."""
        req = points_pb2.DeletePointsRequest(collection=collection, ids=list(ids), missing_ok=missing_ok)
        resp: points_pb2.DeletePointsResponse = self._call(self._points.DeletePoints, req)
        return resp.deleted

    def get(
        self,
        collection: str,
        ids: Sequence[str],
        *,
        with_vectors: bool = False,
        with_payload: bool = False,
        spaces: Sequence[str] = (),
    ) -> list[PointRecord]:
        """Reads points in the order of ``ids``; NotFound if any id is unknown."""
        req = points_pb2.GetPointsRequest(
            collection=collection,
            ids=list(ids),
            with_vectors=with_vectors,
            with_payload=with_payload,
            spaces=list(spaces),
        )
        resp: points_pb2.GetPointsResponse = self._call(self._points.GetPoints, req)
        return [PointRecord.from_proto(p) for p in resp.points]

    def search(
        self,
        collection: str,
        queries: npt.ArrayLike,
        k: int = 10,
        *,
        space: str,
        ef_search: int | None = None,
        nprobe: int | None = None,
        with_payload: bool = False,
    ) -> SearchResult:
        """k-NN search of xq, shape (nq, d) or (d,) (one query), embedded in ``space``.

        Returns a :class:`SearchResult` with ``scores`` (D) and ``ids`` (I) of shape
        (nq, k) -- (1, k) for a single query; ``scores, ids = client.search(...)``.
        """
        xq = np.asarray(queries)
        xq = as_matrix(xq.reshape(1, -1) if xq.ndim == 1 else xq, "queries")
        params = common_pb2.SearchParams(ef_search=ef_search, nprobe=nprobe)
        req = points_pb2.SearchRequest(
            collection=collection,
            query_space=space,
            queries=pack_vectors(xq),
            k=k,
            params=params,
            with_payload=with_payload,
        )
        resp: points_pb2.SearchResponse = self._call(self._points.Search, req)
        return SearchResult.from_proto(resp, with_payload)

    # -- health ---------------------------------------------------------------------------------------

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The standard health status of ``service`` ("" = the whole server): ``"SERVING"``, ..."""
        req = health_pb2.HealthCheckRequest(service=service)
        resp = self._call(self._health.Check, req, timeout)
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        return name

    def wait_ready(self, timeout: float, service: str = "") -> None:
        """Polls :meth:`health` until SERVING; raises DeadlineExceeded after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        status, delay = "UNREACHABLE", 0.02
        while True:
            try:
                status = self.health(service, timeout=max(deadline - time.monotonic(), 0.01))
                if status == "SERVING":
                    return
            except (Unavailable, DeadlineExceeded):
                status = "UNREACHABLE"
            except InterlinguaError as err:
                status = err.code.name
            if time.monotonic() + delay > deadline:
                raise DeadlineExceeded(f"{self.target} not SERVING after {timeout:g} s (last: {status})")
            time.sleep(delay)
            delay = min(2 * delay, 0.5)
