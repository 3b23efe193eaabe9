"""Embedded mode: the service's own engine in this process, behind the same :class:`Client` API.

:meth:`Client.embedded(path, **config) <interlingua.client.Client.embedded>` builds the server side
on the data directory ``path`` (:class:`interlingua.server.engine.Engine` and the very servicers a
server registers, imported only here, so ``import interlingua.client`` stays light) and gives the
client stub-like objects (:class:`Embedded`) whose methods call the servicer methods directly with
an in-process :class:`_Context`. Every check, error and write therefore runs exactly as on a server:
``context.abort(code, details)`` raises :class:`EmbeddedRpcError`, a :class:`grpc.RpcError` and
:class:`grpc.Call` with ``code()`` and ``details()``, which ``Client._call`` maps to the same typed
exceptions as over the network. As on the server, a request larger than ``limits.receive_bytes`` is
RESOURCE_EXHAUSTED, a handler's domain error leaves with its status code, anything else as UNKNOWN,
and handlers run with one OpenMP thread (the server's workers have one; the caller's own setting is
restored after each call).

What a server adds around the servicers is not here: the gate (API keys, roles, rate limits, stream
caps), the gRPC metrics interceptor, TLS, the concurrency cap, deadlines (a call runs to its end on
the calling thread). Service metrics (``interlingua_*``) are kept in the engine's registry; they
are served over HTTP only when ``metrics_port`` is given. The data directory is locked exclusively
(``server/restore.py``): one process at a time, server or embedded, may open it. Covered by
``tests/test_embedded.py``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import faiss
import grpc
from grpc_health.v1 import health_pb2

from interlingua.v1 import (
    collections_pb2,
    migrations_pb2,
    points_pb2,
    snapshots_pb2,
    spaces_pb2,
    transforms_pb2,
)

from ._exceptions import InvalidArgument, from_rpc_error

__all__ = ["Embedded", "EmbeddedRpcError"]

Metadata = tuple[tuple[str, str], ...]
_OK = grpc.StatusCode.OK
_get_omp = faiss.omp_get_max_threads
_set_omp = faiss.omp_set_num_threads


class EmbeddedRpcError(grpc.RpcError, grpc.Call):
    """A failed in-process call, shaped like grpc's own failed call (``code()``, ``details()``)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Metadata = ()) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> Metadata:
        return ()

    def trailing_metadata(self) -> Any:  # grpc's stubs: tuple[_Metadatum, ...]
        return self._trailing

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> Any:  # None: no deadline
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False


class _Context:
    """The part of :class:`grpc.ServicerContext` the servicers use, in process."""

    __slots__ = ("_code", "_details", "_metadata", "_trailing")

    def __init__(self, metadata: Metadata | None) -> None:
        self._metadata = metadata or ()
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: Metadata = ()

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise EmbeddedRpcError(code, details, self._trailing)

    def abort_with_status(self, status: Any) -> NoReturn:
        raise EmbeddedRpcError(status.code, status.details, tuple(status.trailing_metadata or ()))

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def set_trailing_metadata(self, metadata: Metadata) -> None:
        self._trailing = tuple(metadata)

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def peer(self) -> str:
        return "embedded"

    def is_active(self) -> bool:
        return True

    def time_remaining(self) -> float | None:
        return None

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    def failed(self) -> EmbeddedRpcError | None:
        """The error a handler that returned normally set with ``set_code`` (health: NOT_FOUND)."""
        if self._code is None or self._code is _OK:
            return None
        return EmbeddedRpcError(self._code, self._details, self._trailing)


class _Fail(BaseException):
    """Carries ``error`` past the servicers' ``except Exception`` out of a request stream: the
    caller's own request iterator failed, or a message was over ``receive_bytes``."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error


def _too_large(size: int, limit: int) -> EmbeddedRpcError:
    """grpc's own refusal of a message over the receive limit, word for word."""
    return EmbeddedRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, f"SERVER: Received message larger than max ({size} vs. {limit})"
    )


class _Methods:
    """Wraps servicer methods as stub methods: the error mapping a server's handler wrapping does."""

    def __init__(self, receive_bytes: int) -> None:
        from interlingua.server.errors import InterlinguaError, status_for

        self.limit = receive_bytes
        self._domain = InterlinguaError
        self._status_for = status_for

    def error(self, e: BaseException, ctx: _Context) -> BaseException:
        """The exception a caller sees for ``e`` escaping a handler (grpc.RpcError ones as they are)."""
        if isinstance(e, grpc.RpcError):
            return e
        if isinstance(e, _Fail):
            return e.error
        if isinstance(e, self._domain):  # as rpcwrap.DecodeInterceptor: its status code
            return EmbeddedRpcError(self._status_for(e), e.message, ctx._trailing)
        if isinstance(e, Exception):  # grpc: an exception escaping a handler is UNKNOWN
            return EmbeddedRpcError(grpc.StatusCode.UNKNOWN, f"Exception calling application: {e}")
        return e

    def requests(self, it: Iterator[Any]) -> Iterator[Any]:
        """The caller's request iterator as a handler reads it: size-checked, its failures carried out."""
        limit = self.limit
        it = iter(it)
        while True:
            try:
                msg = next(it)
            except StopIteration:
                return
            except BaseException as e:
                raise _Fail(e) from None
            size = msg.ByteSize()
            if size > limit:
                raise _Fail(_too_large(size, limit))
            yield msg

    def unary(self, behavior: Callable[[Any, Any], Any], stream_in: bool) -> Callable[..., Any]:
        limit, error = self.limit, self.error
        requests = self.requests

        def call(request: Any, timeout: float | None = None, metadata: Metadata | None = None, **_: Any) -> Any:
            if stream_in:
                request = requests(request)
            else:
                size = request.ByteSize()
                if size > limit:
                    raise _too_large(size, limit)
            ctx = _Context(metadata)
            omp = _get_omp()
            if omp != 1:
                _set_omp(1)
            try:
                response = behavior(request, ctx)
            except BaseException as e:
                raise error(e, ctx) from None
            finally:
                if omp != 1:
                    _set_omp(omp)
            failed = ctx.failed()
            if failed is not None:
                raise failed
            return response

        return call

    def streaming(self, behavior: Callable[[Any, Any], Any], stream_in: bool) -> Callable[..., Any]:
        limit, requests = self.limit, self.requests

        def call(request: Any, timeout: float | None = None, metadata: Metadata | None = None, **_: Any) -> Any:
            if stream_in:
                request = requests(request)
            else:
                size = request.ByteSize()
                if size > limit:
                    raise _too_large(size, limit)
            ctx = _Context(metadata)
            return _Responses(self, behavior(request, ctx), ctx)

        return call


class _Responses:
    """A server-streaming call's responses, as grpc's iterator of them (``cancel()`` included)."""

    def __init__(self, methods: _Methods, it: Iterator[Any], ctx: _Context) -> None:
        self._methods, self._it, self._ctx = methods, it, ctx
        self._done = False

    def __iter__(self) -> _Responses:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        omp = _get_omp()
        if omp != 1:
            _set_omp(1)
        try:
            return next(self._it)
        except StopIteration:
            self._done = True
            failed = self._ctx.failed()
            if failed is not None:
                raise failed from None
            raise
        except BaseException as e:
            self._done = True
            raise self._methods.error(e, self._ctx) from None
        finally:
            if omp != 1:
                _set_omp(omp)

    def cancel(self) -> bool:
        if self._done:
            return False
        self._done = True
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        return True


class _Stub:
    """One service's methods (``stub.Search(request, timeout=..., metadata=...)``), in process."""

    def __init__(self, servicer: Any, service: Any, methods: _Methods) -> None:
        for m in service.methods:
            behavior = getattr(servicer, m.name)
            wrap = methods.streaming if m.server_streaming else methods.unary
            setattr(self, m.name, wrap(behavior, m.client_streaming))


class _Health:
    """``grpc.health.v1.Health/Check`` from the engine's lifecycle: SERVING while it serves."""

    def __init__(self, engine: Any, names: tuple[str, ...]) -> None:
        from interlingua.server.engine import Lifecycle

        self._engine, self._serving, self._names = engine, Lifecycle.SERVING, frozenset(("", *names))

    def Check(self, request: Any, timeout: float | None = None, metadata: Metadata | None = None, **_: Any) -> Any:
        if request.service not in self._names:
            raise EmbeddedRpcError(grpc.StatusCode.NOT_FOUND, "")
        r = health_pb2.HealthCheckResponse
        return r(status=r.SERVING if self._engine.state is self._serving else r.NOT_SERVING)


def _in_thread(fn: Callable[[], None], name: str) -> None:
    """``fn()`` on a short-lived thread (the engine sets FAISS's per-thread OpenMP count while it
    opens and closes: the caller's stays as it was); re-raises what it raised."""
    box: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:
            box.append(e)

    t = threading.Thread(target=run, name=name)
    try:
        t.start()
    except RuntimeError:  # no new threads at interpreter shutdown (a close at exit): here then
        run()
    else:
        t.join()
    if box:
        raise box[0]


_UINT32 = 0xFFFFFFFF


class Embedded:
    """The engine and servicers of one data directory in this process, with stub-like services;
    :meth:`search` is ``Search`` without the messages."""

    def __init__(self, path: str | Path, config: dict[str, Any]) -> None:
        from interlingua.server.app import SERVICE_NAMES
        from interlingua.server.config import ServerConfig
        from interlingua.server.engine import Engine
        from interlingua.server.errors import InterlinguaError, status_for
        from interlingua.server.metrics import Metrics
        from interlingua.server.migration_servicer import MigrationServicer
        from interlingua.server.serial import search_one
        from interlingua.server.servicers import CollectionServicer, PointServicer, SpaceServicer, request_params
        from interlingua.server.snapshot_servicer import SnapshotServicer
        from interlingua.server.transform_servicer import TransformServicer

        config = {"metrics_port": None, **config}
        registry = config.pop("registry", None)
        try:
            self.config = ServerConfig(data_dir=Path(path), **config)
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"Client.embedded: {e}") from None
        self.metrics = Metrics(registry)
        self.engine = Engine(self.config, self.metrics)
        self.metrics_port: int | None = None
        self._http: Any = None
        self._closed = False
        self._lock = threading.Lock()
        try:
            _in_thread(self.engine.open, "interlingua-embedded-open")
        except BaseException as e:
            _in_thread(self.engine.close, "interlingua-embedded-close")  # releases what it took (the lock)
            if isinstance(e, InterlinguaError):
                raise from_rpc_error(EmbeddedRpcError(status_for(e), e.message)) from None
            raise
        if self.config.metrics_port is not None:  # no API keys in process: /metrics is open
            self._http, self.metrics_port = self.metrics.serve_http(self.config.metrics_port, self.config.host)
        methods = _Methods(self.config.limits.receive_bytes)
        eng = self.engine
        self.spaces = _Stub(SpaceServicer(eng), spaces_pb2.DESCRIPTOR.services_by_name["SpaceService"], methods)
        self.collections = _Stub(
            CollectionServicer(eng), collections_pb2.DESCRIPTOR.services_by_name["CollectionService"], methods
        )
        self.points = _Stub(PointServicer(eng), points_pb2.DESCRIPTOR.services_by_name["PointService"], methods)
        self.transforms = _Stub(
            TransformServicer(eng), transforms_pb2.DESCRIPTOR.services_by_name["TransformService"], methods
        )
        self.snapshots = _Stub(
            SnapshotServicer(eng), snapshots_pb2.DESCRIPTOR.services_by_name["SnapshotService"], methods
        )
        self.migrations = _Stub(
            MigrationServicer(eng), migrations_pb2.DESCRIPTOR.services_by_name["MigrationService"], methods
        )
        self.health = _Health(eng, SERVICE_NAMES)
        self.receive_bytes = self.config.limits.receive_bytes
        self._domain, self._status_for = InterlinguaError, status_for
        self.search_one, self._request_params = search_one, request_params  # (Client.search calls search_one)

    def search(
        self,
        collection: str,
        x: Any,
        k: int,
        space: str,
        ints: tuple[int | None, int | None, int | None, int | None],
        with_payload: bool,
    ) -> Any:
        """``Search`` straight into the engine: x (nq, d) little-endian float32, C-contiguous;
        ``ints`` = (ef_search, nprobe, shortlist_k, k_factor). The servicer's checks, errors and
        messages are the engine's, so they are the same; what the messages did (pack, size check,
        parse, reply, unpack: ~25 µs a search) is skipped. Returns the engine's SearchResult, or None
        where the request must take the message path to fail as it would there: a value a proto
        field refuses (the caller's ValueError / TypeError), or a request near ``receive_bytes``."""
        request_params = self._request_params
        if type(collection) is not str or type(space) is not str or type(k) is not int or not 0 <= k <= _UINT32:
            return None
        for v in ints:
            if v is not None and (type(v) is not int or not 0 <= v <= _UINT32):
                return None
        if x.nbytes + 4 * (len(collection) + len(space)) + 64 > self.receive_bytes:
            return None
        ef_search, nprobe, shortlist_k, k_factor = ints
        # (one HNSW query took the serial path in Client.search already; others try it in Engine.search,
        # with the OpenMP setting below around them)
        params = request_params(k, ef_search=ef_search, nprobe=nprobe, shortlist_k=shortlist_k, k_factor=k_factor)
        omp = _get_omp()
        if omp != 1:
            _set_omp(1)
        try:
            return self.engine.search(collection, space, x.tobytes(), x.shape[1], params, with_payload)
        except self._domain as e:
            err = EmbeddedRpcError(self._status_for(e), e.message)
        except Exception:  # as the servicer's rpc wrapper: logged, INTERNAL
            logging.getLogger("interlingua.server.servicers").exception("unexpected error in Search")
            err = EmbeddedRpcError(grpc.StatusCode.INTERNAL, "internal error in Search; see the server log")
        finally:
            if omp != 1:
                _set_omp(omp)
        raise from_rpc_error(err) from err

    def close(self) -> None:
        """Shuts the engine down as a server's stop does (final merges and checkpoints, the store
        closed, the data dir's lock released) and the metrics endpoint if any. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _in_thread(self.engine.close, "interlingua-embedded-close")
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
