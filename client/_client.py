"""The Python client: numpy in, numpy out, typed exceptions out of every call.

``Client(target)`` opens one channel (plain text, or TLS with ``tls=TLS(...)``,
client certificate optional) with the message-size options set, sends the API key
as ``authorization: Bearer <key>`` metadata on every call, and turns each
:class:`grpc.RpcError` into an :class:`~interlingua.client.InterlinguaError`
subclass (raised ``from`` it). :meth:`Client.embedded` runs the service's own engine and
servicers in process on a data directory instead (``_embedded.py``), behind the same methods.
Large upserts are split into batches of ``batch_size`` rows, sliced lazily so a
memory-mapped ``.npy`` streams; so are the calibration pairs of
:meth:`Client.fit_transform`, which then polls the background fit until it is
ready (or raises :class:`~interlingua.client.FitFailed`). Migrations
(:meth:`Client.start_migration` ... :meth:`Client.finish_migration`) return a
:class:`~interlingua.client.MigrationInfo`; :meth:`Client.wait_forward_upgrade`
polls a forward upgrade as :meth:`Client.wait_transform` polls a fit. Covered by
``tests/test_client.py``, ``tests/test_client_transforms.py``,
``tests/test_migration_client.py`` and (TLS) ``tests/test_security.py``.
"""

from __future__ import annotations

import json
import os
import queue
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tqdm import tqdm

from interlingua.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    common_pb2,
    migrations_pb2,
    migrations_pb2_grpc,
    points_pb2,
    points_pb2_grpc,
    snapshots_pb2,
    snapshots_pb2_grpc,
    spaces_pb2,
    spaces_pb2_grpc,
    transforms_pb2,
    transforms_pb2_grpc,
)

from ._calibration import Gallery, Pairs, fit_requests
from ._exceptions import (
    DeadlineExceeded,
    FailedPrecondition,
    FitFailed,
    ForwardUpgradeFailed,
    InterlinguaError,
    InvalidArgument,
    Unavailable,
    from_rpc_error,
)
from ._snapshots import SnapshotInfo, write_snapshot
from ._tls import TLS
from ._types import (
    KINDS,
    METRICS,
    MIGRATION_STRATEGIES,
    BackfillOrder,
    CollectionInfo,
    CollectionMove,
    IndexRecommendation,
    MigrationInfo,
    PointRecord,
    RouteInfo,
    RoutesListing,
    SearchResult,
    Space,
    TransformInfo,
    milvus_uri,
    serial_route,
)
from ._wire import PayloadArg, as_matrix, search_head, search_params_pb, search_request_bytes, upsert_requests

__all__ = ["TLS", "Client", "SearchStream"]

_T = TypeVar("_T")
#: tqdm layout of a fit's progress (the server reports a fraction and a stage name, not counts).
FIT_BAR = "{desc} {percentage:3.0f}%|{bar}| [{elapsed}]"


class Client:
    """A connection to one Interlingua server, or (:meth:`embedded`) the service in this process on a
    data directory; use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        timeout: float | None = 30.0,
        max_message_bytes: int = 256 * 1024 * 1024,
        tls: TLS | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout  #: seconds per call (each batch of an upsert is one call); None: no limit
        options: list[tuple[str, int | str]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if tls is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self._channel = grpc.secure_channel(target, tls.credentials(), options=options)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._spaces = spaces_pb2_grpc.SpaceServiceStub(self._channel)
        self._collections = collections_pb2_grpc.CollectionServiceStub(self._channel)
        self._points = points_pb2_grpc.PointServiceStub(self._channel)
        #: Search taking the request's serialized bytes (search_request_bytes), as the stub's Search otherwise
        self._search_bytes: Any = cast(Any, self._channel).unary_unary(  # (the stubs lack _registered_method)
            "/interlingua.v1.PointService/Search",
            request_serializer=None,
            response_deserializer=points_pb2.SearchResponse.FromString,
            _registered_method=True,
        )
        #: SearchStream taking serialized requests (SearchStream.search builds them as Search does)
        self._search_stream_bytes: Any = cast(Any, self._channel).stream_stream(
            "/interlingua.v1.PointService/SearchStream",
            request_serializer=None,
            response_deserializer=points_pb2.SearchResponse.FromString,
            _registered_method=True,
        )
        self._transforms = transforms_pb2_grpc.TransformServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._snapshots = snapshots_pb2_grpc.SnapshotServiceStub(self._channel)
        self._migrations = migrations_pb2_grpc.MigrationServiceStub(self._channel)
        self._close: Callable[[], None] = self._channel.close
        self._embedded: Any = None  #: the in-process engine of :meth:`embedded` (None: a channel)

    @classmethod
    def embedded(cls, path: str | os.PathLike[str], **config: Any) -> Client:
        """A client on the service's own engine in this process, on data directory ``path`` (created
        if missing), with no server and no gRPC: the same methods, checks, errors and durability, and
        the data directory stays usable by a server later (or before). ``config``: ServerConfig
        fields (``merge_idle_seconds=...``, ``limits=Limits(...)``, ``metrics_port=0`` to serve
        /metrics; none by default). One process at a time opens a data directory: FailedPrecondition,
        naming it and the pid holding it, while a server or another embedded client has it open.
        No API keys, rate limits or stream caps apply in process, and calls take no deadline.
        :meth:`close` (or the end of a ``with`` block, or of the process) shuts the engine down."""
        from ._embedded import Embedded

        backend = Embedded(Path(path), dict(config))
        client = cls.__new__(cls)
        client.target = f"embedded:{path}"
        client.timeout = None
        client._metadata = ()
        client._spaces = cast(spaces_pb2_grpc.SpaceServiceStub, backend.spaces)
        client._collections = cast(collections_pb2_grpc.CollectionServiceStub, backend.collections)
        client._points = cast(points_pb2_grpc.PointServiceStub, backend.points)
        client._search_bytes = client._search_stream_bytes = None
        client._transforms = cast(transforms_pb2_grpc.TransformServiceStub, backend.transforms)
        client._health = cast(health_pb2_grpc.HealthStub, backend.health)
        client._snapshots = cast(snapshots_pb2_grpc.SnapshotServiceStub, backend.snapshots)
        client._migrations = cast(migrations_pb2_grpc.MigrationServiceStub, backend.migrations)
        client._close = weakref.finalize(client, backend.close)  # at exit too, if never closed
        client._embedded = backend
        return client

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled. Embedded: shuts the engine down (final
        merges, store closed, the data directory's lock released)."""
        self._close()

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
        self,
        name: str,
        home_space: str,
        index_spec: str = "Flat",
        train_min_points: int = 0,
        *,
        prefix_dims: int = 0,
        basis_transform: str = "",
        ef_construction: int = 0,
        target_recall: float = 0.0,
        backend: str = "",
        backend_uri: str = "",
    ) -> CollectionInfo:
        """Creates an empty collection indexed in ``home_space`` with a FAISS factory string.

        ``prefix_dims`` indexes only that many leading dims (Matryoshka; searches rerank a shortlist
        with the full vectors), after the optional home -> home ``basis_transform`` (e.g. pca_basis).
        ``ef_construction`` sets an HNSW index's build-time candidate list (0: FAISS's default, 40).
        ``index_spec="auto"`` with ``target_recall`` (Recall@10, in (0, 1]): exact at first, then
        rebuilt in the background onto the index advisor's choice once the collection is big enough.
        ``backend``: "embedded" (SQLite + FAISS in the server) or "milvus" (a Milvus engine at
        ``backend_uri``, a cluster address or a Milvus Lite file); "" for the server's defaults."""
        req = collections_pb2.CreateCollectionRequest(
            name=name,
            home_space=home_space,
            index_spec=index_spec,
            train_min_points=train_min_points,
            prefix_dims=prefix_dims,
            basis_transform=basis_transform,
            ef_construction=ef_construction,
            target_recall=target_recall,
            backend=backend,
            backend_uri=backend_uri,
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

    def move_collection(self, name: str, to: str = "", *, timeout: float | None = 3600.0) -> CollectionMove:
        """Moves embedded collection ``name`` to a Milvus engine while it serves: copies every point, catches up
        the writes made meanwhile, verifies counts and spot searches on both sides, then switches it (searches
        and writes go on; writes wait during the last catch-up and the switch). ``to``: ``milvus://host:port``,
        ``http://host:port`` or a Milvus Lite file (``*.db``); "" for the server's default engine.
        FailedPrecondition (nothing changed) for a collection that cannot move, quoting why; Unavailable when
        the engine cannot be reached. ``timeout`` (seconds) replaces the client's per-call one when longer."""
        try:
            uri = milvus_uri(to)
        except ValueError as err:
            raise InvalidArgument(str(err)) from None
        req = collections_pb2.MoveCollectionRequest(name=name, backend="milvus", backend_uri=uri)
        timeout = max(timeout, self.timeout) if timeout is not None and self.timeout is not None else None
        try:
            msg = self._collections.MoveCollection(req, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return CollectionMove.from_proto(msg)

    def recommend_index(
        self,
        collection: str,
        target_recall: float,
        k: int = 10,
        queries: npt.ArrayLike | None = None,
        *,
        sample_size: int = 0,
        num_queries: int = 0,
        candidates: Sequence[str] = (),
        timeout: float | None = 600.0,
    ) -> IndexRecommendation:
        """The index advisor: measures candidate index specs and their search parameters on a sample
        of ``collection`` (up to 100k of its stored vectors; ``sample_size`` fewer) against exact
        search and returns the QPS / Recall@k frontier and the fastest point whose recall reaches
        ``target_recall``. ``queries`` (nq, d) in the home space; without them ``num_queries`` stored
        vectors held out of the sample (default min(1000, points / 10)). ``candidates``: the specs to
        measure (default: Flat, HNSW32, HNSW32_SQ8,RFlat, IVF fast-scan PQ with a refine stage, IVF Flat).
        FailedPrecondition, quoting the best recall reached, when no candidate reaches the target.
        ``timeout`` (seconds) replaces the client's per-call one when longer: a run takes minutes on
        large collections."""
        req = collections_pb2.RecommendIndexRequest(
            collection=collection,
            target_recall=target_recall,
            k=k,
            sample_size=sample_size,
            num_queries=num_queries,
            candidates=list(candidates),
        )
        if queries is not None:
            xq = np.ascontiguousarray(as_matrix(queries, "queries"), dtype="<f4")
            req.queries.CopyFrom(common_pb2.Vectors(data=xq.tobytes(), dim=xq.shape[1]))
        # the longer of the two limits; no limit on one side: none
        timeout = max(timeout, self.timeout) if timeout is not None and self.timeout is not None else None
        try:
            msg = self._collections.RecommendIndex(req, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return IndexRecommendation.from_proto(msg)

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
        shortlist_k: int | None = None,
        funnel: Sequence[tuple[int, int]] = (),
        k_factor: int | None = None,
    ) -> SearchResult:
        """k-NN search of xq, shape (nq, d) or (d,) (one query), embedded in ``space``.

        Returns a :class:`SearchResult` with ``scores`` (D) and ``ids`` (I) of shape
        (nq, k) -- (1, k) for a single query; ``scores, ids = client.search(...)``. On a prefix
        collection, ``shortlist_k`` candidates come from the prefix index and each ``funnel`` stage
        ``(dims, keep)`` reranks them before the final full-dimensional stage. On an index with a
        refine stage, ``k_factor`` sets how many candidates (k * k_factor) the refine codes re-rank.
        """
        emb = self._embedded
        if not funnel:  # the queries as sent, for the engine in process or the request's bytes
            x: Any = queries  # (query_matrix's own test, inline: a frame less per call on cold caches)
            if type(x) is not np.ndarray or x.dtype != _F32 or x.ndim != 2 or not x.flags.c_contiguous:
                x = query_matrix(queries)
        if emb is not None and not funnel:  # in process: straight into the engine
            if (
                len(x) == 1
                and type(k) is int
                and (ef_search is None or type(ef_search) is int)
                and (nprobe is None or type(nprobe) is int)
                and (k_factor is None or type(k_factor) is int)
                and shortlist_k is None
                and not with_payload
            ):  # the serial hot path (server/serial.py) called from here, one query on HNSW: at 1M every
                # Python frame between the user and FAISS costs 5-15 µs on cold caches (Embedded.search's
                # other checks are the proto fields' ranges: search_one only accepts parameters a pipeline
                # search built and checked, and declines anything else, which then takes Embedded.search)
                try:
                    one = None
                    if x.nbytes + 4 * (len(collection) + len(space)) + 64 <= emb.receive_bytes:
                        one = emb.search_one(
                            emb.engine, collection, space, x, k, ef_search, nprobe, k_factor, hnsw_only=True
                        )
                except Exception:
                    one = None  # the full path below answers, or fails as it does
                if one is not None:  # an identity route's own new arrays: SearchResult.from_arrays, inline
                    res = _new_result(SearchResult)
                    res.__dict__.update(
                        scores=one.D, ids=one.ids, payloads=None, route=serial_route(one.route), exact=False
                    )
                    return res
            ints = (ef_search, nprobe, shortlist_k, k_factor)
            res = emb.search(collection, x, k, space, ints, with_payload)
            if res is not None:
                r = res.route
                route = (r.query_space, r.home_space, r.transform)
                return SearchResult.from_arrays(res.D, res.ids, res.payloads, route, res.exact, with_payload)
        call: Any = self._points.Search
        if funnel or self._search_bytes is None:
            req: Any = search_request(
                collection, queries, k, space, ef_search, nprobe, with_payload, shortlist_k, funnel, k_factor
            )
        else:  # search_request's message as bytes: its fields but the queries serialized once (_wire.search_head)
            head = search_head(collection, space, k, with_payload, ef_search, nprobe, shortlist_k, k_factor)
            req, call = search_request_bytes(head, x), self._search_bytes
        try:  # (_call, inline)
            resp: points_pb2.SearchResponse = call(req, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return SearchResult.from_proto(resp, with_payload)

    def search_stream(self) -> SearchStream:
        """A :class:`SearchStream`: searches over one long-lived SearchStream RPC, for high rates of
        small batches (it saves the per-call cost of a unary RPC). Use it from one thread, as a
        context manager."""
        return SearchStream(self._points, self._metadata, self._search_stream_bytes)

    # -- transforms and routes -----------------------------------------------------------------------

    def fit_transform(
        self,
        name: str,
        kind: str,
        *,
        source_space: str,
        target_space: str,
        doc_pairs: Pairs | None = None,
        query_pairs: Pairs | None = None,
        doc_labels: npt.ArrayLike | None = None,
        query_labels: npt.ArrayLike | None = None,
        doc_ids: Sequence[str] | None = None,
        query_relevant: Sequence[Sequence[str]] | None = None,
        eval_queries: Pairs | None = None,
        eval_relevant: Sequence[Sequence[str]] | None = None,
        eval_gallery: Gallery | None = None,
        config: Mapping[str, Any] | None = None,
        holdout: float = 0.0,
        chain: Sequence[str] = (),
        batch_size: int = 4096,
        wait: bool = True,
        poll: float = 0.2,
        timeout: float | None = None,
        progress: bool = False,
    ) -> TransformInfo:
        """Fits ``name``, a transform of ``kind`` from ``source_space`` (new model) into ``target_space``.

        Pairs are row-aligned tuples (source (n, d_source), target (n, d_target)),
        any float dtype; ``*_labels`` give one int class per pair. Training relevance:
        ``query_relevant`` (one list of ``doc_ids`` per query pair, e.g. logged clicks)
        lets the trained kinds learn the task itself (query -> relevant doc). Evaluation:
        ``eval_queries`` (nq source, nq target) with ``eval_relevant`` (nq lists of
        ids) scored against a gallery of every doc pair with ids: ``doc_ids`` name
        the fitted doc pairs, ``eval_gallery`` (ids, source (n, d), target (n, d))
        adds pairs used only for evaluation. ``config`` is the kind's
        hyper-parameters; ``holdout`` 0 means the server's default (0.1); ``chain``
        names the links of a ``"chain"``.

        The pairs are streamed in one FitTransform call (the client's per-call
        timeout covers it). With ``wait`` this then polls :meth:`wait_transform`
        every ``poll`` seconds for at most ``timeout`` seconds (None: no limit) and
        returns the ready transform; raises FitFailed if the fit failed and
        DeadlineExceeded past ``timeout``. Without ``wait`` it returns the
        transform in state ``"fitting"``. ``progress`` shows the upload and the
        server's fit stages as tqdm bars.
        """
        if kind not in KINDS:
            raise InvalidArgument(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        if poll <= 0:
            raise InvalidArgument(f"poll must be > 0 seconds, got {poll}")
        header = transforms_pb2.FitHeader(
            name=name,
            kind=KINDS[kind],
            source_space=source_space,
            target_space=target_space,
            config_json=json.dumps(dict(config)) if config else "",
            chain=list(chain),
            holdout=holdout,
        )
        requests = fit_requests(
            header,
            doc_pairs=doc_pairs,
            query_pairs=query_pairs,
            doc_labels=doc_labels,
            query_labels=query_labels,
            doc_ids=doc_ids,
            eval_queries=eval_queries,
            eval_relevant=eval_relevant,
            eval_gallery=eval_gallery,
            batch_size=batch_size,
            progress=progress,
            query_relevant=query_relevant,
        )
        msg: transforms_pb2.TransformInfo = self._call(self._transforms.FitTransform, requests)
        info = TransformInfo.from_proto(msg)
        if not wait:
            return info
        return self.wait_transform(name, poll=poll, timeout=timeout, progress=progress)

    def wait_transform(
        self, name: str, *, poll: float = 0.2, timeout: float | None = None, progress: bool = False
    ) -> TransformInfo:
        """Polls :meth:`get_transform` until ``name`` is ready and returns it.

        Raises FitFailed (carrying the transform as ``info``) when its fit failed,
        DeadlineExceeded when it is still fitting after ``timeout`` seconds (None:
        no limit). ``progress`` shows the server's stage and progress as a tqdm bar.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with tqdm(total=100, disable=not progress, desc=name, bar_format=FIT_BAR) as bar:
            while True:
                info = self.get_transform(name)
                bar.set_description_str(f"{name}: {info.stage or info.state}")
                bar.update(round(100 * info.progress) - bar.n)
                if info.state == "ready":
                    return info
                if info.state == "failed":
                    raise FitFailed(f"fitting transform {name!r} failed: {info.error}", info=info)
                if deadline is not None and time.monotonic() + poll > deadline:
                    raise DeadlineExceeded(
                        f"transform {name!r} is still {info.state} after {timeout:g} s "
                        f"(stage {info.stage!r}, {info.progress:.0%})"
                    )
                time.sleep(poll)

    def get_transform(self, name: str) -> TransformInfo:
        """One transform with its config and report; NotFound if unknown."""
        req = transforms_pb2.GetTransformRequest(name=name)
        msg: transforms_pb2.TransformInfo = self._call(self._transforms.GetTransform, req)
        return TransformInfo.from_proto(msg)

    def list_transforms(self) -> list[TransformInfo]:
        """All transforms (fitting, ready and failed), ordered by name."""
        req = transforms_pb2.ListTransformsRequest()
        resp: transforms_pb2.ListTransformsResponse = self._call(self._transforms.ListTransforms, req)
        return [TransformInfo.from_proto(t) for t in resp.transforms]

    def cancel_fit(self, name: str) -> TransformInfo:
        """Cancels the fit of ``name``: a queued fit never runs, a running one stops at its next progress
        step; returns the transform, failed with error ``"cancelled"``. NotFound if unknown;
        FailedPrecondition when it is not fitting."""
        req = transforms_pb2.CancelFitRequest(name=name)
        msg: transforms_pb2.TransformInfo = self._call(self._transforms.CancelFit, req)
        return TransformInfo.from_proto(msg)

    def delete_transform(self, name: str) -> TransformInfo:
        """Deletes transform ``name`` in any state (a fit is cancelled first) and returns it as it was.
        FailedPrecondition, naming them, while a live route, a shadow, a chain or a collection's
        ``basis_transform`` uses it; NotFound if unknown."""
        req = transforms_pb2.DeleteTransformRequest(name=name)
        msg: transforms_pb2.TransformInfo = self._call(self._transforms.DeleteTransform, req)
        return TransformInfo.from_proto(msg)

    def activate_route(
        self,
        collection: str,
        transform: str,
        *,
        force: bool = False,
        min_retention: float | None = None,
        max_negative_flip_rate: float | None = None,
        require_ecc: bool | None = None,
    ) -> RouteInfo:
        """Routes ``transform``'s source space into ``collection`` through it, atomically.

        FailedPrecondition when the transform is not ready, does not map into the
        collection's home space, or its report fails the gate (unless ``force``); the
        message quotes each failing figure against its threshold. The gate policy is
        the server's default, with any of ``min_retention`` (transformed / home->home
        Recall@10), ``max_negative_flip_rate`` and ``require_ecc`` given here instead.
        """
        policy = {"min_retention": min_retention, "max_negative_flip_rate": max_negative_flip_rate}
        policy["require_ecc"] = require_ecc
        gate = transforms_pb2.GatePolicy(**{k: v for k, v in policy.items() if v is not None})  # type: ignore[arg-type]
        req = transforms_pb2.ActivateRouteRequest(collection=collection, transform=transform, force=force)
        if any(v is not None for v in policy.values()):
            req.gate.CopyFrom(gate)
        msg: transforms_pb2.RouteInfo = self._call(self._transforms.ActivateRoute, req)
        return RouteInfo.from_proto(msg)

    def rollback_route(self, collection: str, query_space: str) -> RouteInfo:
        """Restores the previous route from ``query_space``; its ``transform`` is ``""`` when the
        route is removed. FailedPrecondition when there is no active route to roll back."""
        req = transforms_pb2.RollbackRouteRequest(collection=collection, query_space=query_space)
        msg: transforms_pb2.RouteInfo = self._call(self._transforms.RollbackRoute, req)
        return RouteInfo.from_proto(msg)

    def list_routes(self, collection: str) -> RoutesListing:
        """The live routes of a collection and every activation, newest first."""
        req = transforms_pb2.ListRoutesRequest(collection=collection)
        resp: transforms_pb2.ListRoutesResponse = self._call(self._transforms.ListRoutes, req)
        return RoutesListing.from_proto(resp)

    def set_shadow(
        self, collection: str, query_space: str, transform: str | None, *, sample_rate: float = 1.0
    ) -> RouteInfo:
        """Mirrors a fraction ``sample_rate`` in (0, 1] of the route's live queries to the candidate
        ``transform`` (replies do not change); ``None`` or ``""`` stops the shadow."""
        if transform and not 0 < sample_rate <= 1:
            raise InvalidArgument(f"sample_rate must be in (0, 1], got {sample_rate}")
        req = transforms_pb2.SetShadowRequest(
            collection=collection,
            query_space=query_space,
            transform=transform or "",
            sample_rate=sample_rate if transform else 0.0,
        )
        msg: transforms_pb2.RouteInfo = self._call(self._transforms.SetShadow, req)
        return RouteInfo.from_proto(msg)

    # -- migrations -----------------------------------------------------------------------------------

    def start_migration(
        self,
        collection: str,
        new_space: str,
        transform: str,
        *,
        reverse_transform: str = "",
        strategy: str | None = None,
    ) -> MigrationInfo:
        """Starts migrating ``collection`` from its home space to ``new_space``; returns it in phase
        ``"backfill"``. Backfill by upserting new-space vectors for existing ids.

        ``transform`` (a ready transform new_space -> home space) maps new-model queries onto points
        not backfilled yet; ``reverse_transform`` (home space -> new_space, optional) serves old-model
        queries after the cutover. ``strategy`` is ``"two_indexes"`` (the server's default for
        ``None``) or ``"shared_index"``. NotFound for an unknown collection, space or transform;
        FailedPrecondition when a migration already runs, the transform is not ready, or the
        collection is failed or a prefix/basis collection; InvalidArgument when a transform maps
        other spaces than it must, or ``new_space`` is the home space."""
        if strategy is not None and strategy not in MIGRATION_STRATEGIES:
            raise InvalidArgument(f"strategy must be one of {sorted(MIGRATION_STRATEGIES)}, got {strategy!r}")
        req = migrations_pb2.StartMigrationRequest(
            collection=collection,
            new_space=new_space,
            transform=transform,
            reverse_transform=reverse_transform,
            strategy=MIGRATION_STRATEGIES[strategy] if strategy else migrations_pb2.MIGRATION_STRATEGY_UNSPECIFIED,
        )
        msg: migrations_pb2.MigrationInfo = self._call(self._migrations.StartMigration, req)
        return MigrationInfo.from_proto(msg)

    def get_migration(self, collection: str) -> MigrationInfo:
        """The collection's migration (phase, coverage, forward upgrade); NotFound when it has none."""
        req = migrations_pb2.GetMigrationRequest(collection=collection)
        msg: migrations_pb2.MigrationInfo = self._call(self._migrations.GetMigration, req)
        return MigrationInfo.from_proto(msg)

    def cutover(self, collection: str, *, force: bool = False) -> MigrationInfo:
        """Makes the new space home in one atomic swap (phase ``"cutover"``); the old vectors stay
        until :meth:`finish_migration`, so :meth:`rollback_cutover` can undo it. FailedPrecondition,
        quoting the coverage, below 100% backfilled unless ``force``; a forced cutover needs every
        point not backfilled to have a projection (:meth:`forward_upgrade` done)."""
        req = migrations_pb2.CutoverRequest(collection=collection, force=force)
        msg: migrations_pb2.MigrationInfo = self._call(self._migrations.Cutover, req)
        return MigrationInfo.from_proto(msg)

    def rollback_cutover(self, collection: str) -> MigrationInfo:
        """Undoes a cutover: the old space is home again and the migration back in ``"backfill"``.
        FailedPrecondition outside the cutover phase."""
        req = migrations_pb2.RollbackCutoverRequest(collection=collection)
        msg: migrations_pb2.MigrationInfo = self._call(self._migrations.RollbackCutover, req)
        return MigrationInfo.from_proto(msg)

    def finish_migration(self, collection: str) -> MigrationInfo:
        """Ends a cut-over migration (phase ``"finished"``): the old vectors and index are dropped and
        the new space is home for good. FailedPrecondition before :meth:`cutover`."""
        req = migrations_pb2.FinishMigrationRequest(collection=collection)
        msg: migrations_pb2.MigrationInfo = self._call(self._migrations.FinishMigration, req)
        return MigrationInfo.from_proto(msg)

    def abort_migration(self, collection: str) -> MigrationInfo:
        """Abandons the migration in backfill or cutover (phase ``"aborted"``): the old space stays (or
        becomes again) home, the new-space index and projections are dropped, backfilled vectors stay
        stored. NotFound when the collection has no migration; FailedPrecondition outside backfill and
        cutover."""
        req = migrations_pb2.AbortMigrationRequest(collection=collection)
        msg: migrations_pb2.MigrationInfo = self._call(self._migrations.AbortMigration, req)
        return MigrationInfo.from_proto(msg)

    def forward_upgrade(self, collection: str, transform: str) -> MigrationInfo:
        """Starts projecting every stored old vector into the new space with ``transform`` (a ready
        transform old space -> new space) in the background, and returns at once (``forward.state``
        ``"running"``; :meth:`wait_forward_upgrade` waits for it). Real new-space vectors are never
        overwritten. FailedPrecondition outside backfill or while one runs; NotFound /
        InvalidArgument for the transform as in :meth:`start_migration`."""
        req = migrations_pb2.ForwardUpgradeRequest(collection=collection, transform=transform)
        msg: migrations_pb2.MigrationInfo = self._call(self._migrations.ForwardUpgrade, req)
        return MigrationInfo.from_proto(msg)

    def wait_forward_upgrade(
        self, collection: str, timeout: float | None, poll: float = 0.2, *, progress: bool = False
    ) -> MigrationInfo:
        """Polls :meth:`get_migration` until the forward upgrade is ``"done"`` and returns the migration.

        Raises ForwardUpgradeFailed (carrying the migration as ``info``) when it ended ``"failed"`` or
        ``"cancelled"``, DeadlineExceeded when it still runs after ``timeout`` seconds (None: no
        limit), FailedPrecondition when none was ever started. ``progress`` shows a tqdm bar.
        """
        if poll <= 0:
            raise InvalidArgument(f"poll must be > 0 seconds, got {poll}")
        deadline = None if timeout is None else time.monotonic() + timeout
        with tqdm(total=100, disable=not progress, desc=collection, bar_format=FIT_BAR) as bar:
            while True:
                info = self.get_migration(collection)
                fwd = info.forward
                bar.set_description_str(f"{collection}: forward {fwd.state or 'not started'}")
                bar.update(int(100 * fwd.fraction) - bar.n)
                if fwd.state == "done":
                    return info
                if fwd.state in ("failed", "cancelled"):
                    why = f": {fwd.error}" if fwd.error else ""
                    raise ForwardUpgradeFailed(
                        f"forward upgrade of {collection!r} with {fwd.transform!r} {fwd.state}{why}", info=info
                    )
                if not fwd.state:
                    raise FailedPrecondition(f"no forward upgrade was started on {collection!r}")
                if deadline is not None and time.monotonic() + poll > deadline:
                    raise DeadlineExceeded(
                        f"forward upgrade of {collection!r} is still {fwd.state} after {timeout:g} s "
                        f"({fwd.done}/{fwd.total} points, {fwd.fraction:.0%})"
                    )
                time.sleep(poll)

    def suggest_backfill_order(self, collection: str, n: int) -> BackfillOrder:
        """The ``n`` points not backfilled yet whose re-embedding should help most, best first (farthest
        from their k-means centre in the old space), with their scores; fewer when fewer are left.
        InvalidArgument unless 1 <= n <= the server's max_batch; NotFound without a migration."""
        if n < 1:
            raise InvalidArgument(f"n must be >= 1, got {n}")
        req = migrations_pb2.SuggestBackfillOrderRequest(collection=collection, n=n)
        resp: migrations_pb2.SuggestBackfillOrderResponse = self._call(self._migrations.SuggestBackfillOrder, req)
        return BackfillOrder.from_proto(resp)

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

    # -- snapshots (admin) ----------------------------------------------------------------------------

    def create_snapshot(self, name: str = "") -> SnapshotInfo:
        """Snapshots the server's whole store as of now (writes continue); ``""`` picks a dated name."""
        req = snapshots_pb2.CreateSnapshotRequest(name=name)
        return SnapshotInfo.from_proto(self._call(self._snapshots.CreateSnapshot, req))

    def list_snapshots(self) -> list[SnapshotInfo]:
        resp = self._call(self._snapshots.ListSnapshots, snapshots_pb2.ListSnapshotsRequest())
        return [SnapshotInfo.from_proto(s) for s in resp.snapshots]

    def delete_snapshot(self, name: str) -> None:
        self._call(self._snapshots.DeleteSnapshot, snapshots_pb2.DeleteSnapshotRequest(name=name))

    def verify_snapshot(self, name: str) -> SnapshotInfo:
        """The snapshot's info once the server checked its files; FailedPrecondition names a corrupt one."""
        req = snapshots_pb2.RestoreSnapshotRequest(name=name, validate_only=True)
        return SnapshotInfo.from_proto(self._call(self._snapshots.RestoreSnapshot, req))

    def download_snapshot(self, name: str, to: str | os.PathLike[str]) -> dict[str, Any]:
        """Streams snapshot ``name`` into the new folder ``to`` and checks it; returns its manifest.

        No deadline (a large store takes as long as it takes); ``interlingua restore`` restores it."""
        stream = self._snapshots.DownloadSnapshot(
            snapshots_pb2.DownloadSnapshotRequest(name=name), metadata=self._metadata
        )
        try:
            return write_snapshot(stream, Path(to))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            stream.cancel()  # type: ignore[no-untyped-call]  # frees the call when we stop early


_F32 = np.dtype("<f4")
_new_result = object.__new__  #: a SearchResult without its frozen __init__ (from_arrays does the same)


def query_matrix(queries: npt.ArrayLike) -> npt.NDArray[Any]:
    """Queries of shape (nq, d) or (d,) as an (nq, d) C-contiguous little-endian float32 array."""
    if type(queries) is np.ndarray and queries.dtype == _F32 and queries.ndim == 2 and queries.flags.c_contiguous:
        return queries  # already so: no numpy calls
    xq = np.asarray(queries)
    if xq.ndim != 2:
        xq = as_matrix(xq.reshape(1, -1) if xq.ndim == 1 else xq, "queries")
    return np.ascontiguousarray(xq, dtype="<f4")


def search_request(
    collection: str,
    queries: npt.ArrayLike,
    k: int,
    space: str,
    ef_search: int | None,
    nprobe: int | None,
    with_payload: bool,
    shortlist_k: int | None = None,
    funnel: Sequence[tuple[int, int]] = (),
    k_factor: int | None = None,
) -> points_pb2.SearchRequest:
    """A SearchRequest for xq of shape (nq, d) or (d,), packed as little-endian float32 (the
    ``params`` message only when a parameter is set: the server reads an absent one as empty)."""
    x = query_matrix(queries)
    params = search_params_pb(ef_search, nprobe, shortlist_k, k_factor)
    if funnel:
        params = common_pb2.SearchParams(
            ef_search=ef_search,
            nprobe=nprobe,
            shortlist_k=shortlist_k,
            funnel=[common_pb2.FunnelStage(dims=dims, keep=keep) for dims, keep in funnel],
            k_factor=k_factor,
        )
    return points_pb2.SearchRequest(  # (Client.search builds the same inline for an array's plain search)
        collection=collection,
        query_space=space,
        k=k,
        with_payload=with_payload,
        queries=common_pb2.Vectors(data=x.tobytes(), dim=x.shape[1]),
        params=params,
    )


class SearchStream:
    """Searches sent one after the other over one bidirectional SearchStream call.

    Each :meth:`search` sends one request and waits for its reply. The first error ends the
    stream: it is raised as a typed exception and later calls raise it again.
    """

    _END = object()

    def __init__(
        self, points: points_pb2_grpc.PointServiceStub, metadata: tuple[tuple[str, str], ...], raw: Any = None
    ) -> None:
        """``raw``: a SearchStream callable taking serialized requests (a channel's), or None: ``points``'."""
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        requests = iter(self._requests.get, self._END)
        self._bytes = raw is not None
        self._replies = iter(
            points.SearchStream(requests, metadata=metadata) if raw is None else raw(requests, metadata=metadata)
        )
        self._error: InterlinguaError | None = None

    def __enter__(self) -> SearchStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Ends the stream (the server finishes it cleanly)."""
        self._requests.put(self._END)

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
        k_factor: int | None = None,
    ) -> SearchResult:
        """As :meth:`Client.search`, over the stream."""
        if self._error is not None:
            raise self._error
        req: Any
        if self._bytes:  # as Client.search: the request's bytes (_wire.search_head)
            x = query_matrix(queries)
            req = search_request_bytes(
                search_head(collection, space, k, with_payload, ef_search, nprobe, None, k_factor), x
            )
        else:
            req = search_request(collection, queries, k, space, ef_search, nprobe, with_payload, k_factor=k_factor)
        self._requests.put(req)
        try:
            resp: points_pb2.SearchResponse = next(self._replies)
        except grpc.RpcError as err:
            self._error = from_rpc_error(err)
            raise self._error from err
        return SearchResult.from_proto(resp, with_payload)
