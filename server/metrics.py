"""Prometheus metrics: the standard gRPC server metrics and the service's own.

Names follow the conventions (seconds, ``_total`` on counters; prometheus-client
appends ``_total`` to a Counter's name). Each :class:`Metrics` owns its
``CollectorRegistry``, so servers (and tests) never share state.
"""

from __future__ import annotations

import collections
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.samples import Sample

from .rpcwrap import is_non_blocking, wrap_rpc_behavior

__all__ = [
    "FOLD_EVERY",
    "BufferedCounter",
    "BufferedHistogram",
    "KeyCheck",
    "Metrics",
    "MetricsInterceptor",
    "StageTimes",
]

#: Returns True for a key allowed to read /metrics.
KeyCheck = Callable[[str], bool]

_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
)


#: observations a buffered series holds before it folds them itself (bounded memory without a scraper)
FOLD_EVERY = 4096


class _Buffer:
    """What :class:`BufferedHistogram` and :class:`BufferedCounter` share: values wait in a deque
    (an append is atomic under the GIL) and are folded into the series by ``_fold`` when it is
    collected, once :data:`FOLD_EVERY` wait, or from the :class:`StageTimes` that feed it."""

    _pending: collections.deque[float]
    _fold_lock: threading.Lock
    _sources: list[StageTimes]  #: folded into this child before it is collected

    def _buffer_init(self) -> None:
        self._pending = collections.deque()
        self._fold_lock = threading.Lock()
        self._sources = []

    def _push(self, amount: float) -> None:
        pending = self._pending
        pending.append(amount)
        if len(pending) >= FOLD_EVERY:
            self._fold()

    def _drain(self) -> np.ndarray | None:
        """The values waiting, shape (n,) float64 (None: none), taken under the fold lock: popleft() of
        the n that are there, so appends meanwhile stay for the next fold. Call with the lock held."""
        pending = self._pending
        n = len(pending)
        return np.fromiter((pending.popleft() for _ in range(n)), dtype=np.float64, count=n) if n else None

    def _fold(self) -> None:
        raise NotImplementedError

    def _fold_all(self) -> None:
        for source in self._sources:
            source.fold()
        self._fold()


class BufferedHistogram(_Buffer, Histogram):
    """A Histogram for the search path: ``observe`` appends to a deque (~0.05 µs) instead of two
    locked increments and a bucket scan (~1.5 µs); the values are folded into the buckets and the
    sum when the series is collected (a scrape, ``generate_latest``), or once :data:`FOLD_EVERY`
    wait. :class:`StageTimes` feeds several children with one append per search. A scrape shows
    every observation made before it; the exposition is a Histogram's. No exemplars."""

    def _metric_init(self) -> None:
        super()._metric_init()
        self._buffer_init()
        self._bounds = np.asarray(self._upper_bounds, dtype=np.float64)

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        self._push(amount)

    def _fold(self) -> None:
        with self._fold_lock:
            v = self._drain()
            if v is not None:
                self._add(v)

    def _add(self, v: np.ndarray) -> None:
        """Observes every value of ``v`` (shape (n,) float64) as ``Histogram.observe`` would. Call
        with the fold lock held."""
        # bucket i counts the values <= its bound: the first bound >= v (NaN: none, as Histogram.observe)
        counts = np.bincount(np.searchsorted(self._bounds, v, side="left"), minlength=len(self._bounds) + 1)
        for i in np.flatnonzero(counts[: len(self._bounds)]):
            self._buckets[i].inc(float(counts[i]))
        self._sum.inc(float(v.sum()))

    def _child_samples(self) -> Iterable[Sample]:
        self._fold_all()
        return super()._child_samples()


class StageTimes(collections.deque):  # type: ignore[type-arg]
    """A collection's search stage times, one ``append((validate, transform, index, fetch))`` per
    search (seconds; ``fetch`` None when no payloads were read: not observed), for its
    ``interlingua_search_seconds`` children (:class:`BufferedHistogram`): folded into them when they
    are collected, or by :meth:`fold` once :data:`FOLD_EVERY` wait (the searcher checks ``len``).
    A fifth value counts queries into ``queries`` (the serial path's, one append for both)."""

    def __init__(
        self, histogram: BufferedHistogram, collection: str, stages: Iterable[str], queries: Any = None
    ) -> None:
        super().__init__()
        self.children: list[BufferedHistogram] = [histogram.labels(collection, s) for s in stages]
        self.lock = threading.Lock()
        for child in self.children:
            child._sources.append(self)
        #: the queries counter's child a row's fifth value adds to (serial.py: the identity route's)
        self.queries: BufferedCounter | None = queries
        if queries is not None:
            queries._sources.append(self)

    def fold(self) -> None:
        with self.lock:
            n = len(self)
            if not n:
                return
            rows = [self.popleft() for _ in range(n)]
        for j, child in enumerate(self.children):
            v = np.array([r[j] for r in rows if r[j] is not None], dtype=np.float64)
            if len(v):
                with child._fold_lock:
                    child._add(v)
        counted = sum(r[4] for r in rows if len(r) > 4)
        if counted and self.queries is not None:
            self.queries.inc(counted)


class BufferedCounter(_Buffer, Counter):
    """A Counter for the search path, buffered as :class:`BufferedHistogram` (``inc`` appends)."""

    def _metric_init(self) -> None:
        super()._metric_init()
        self._buffer_init()

    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self._push(amount)

    def _fold(self) -> None:
        with self._fold_lock:
            v = self._drain()
            if v is not None:
                self._value.inc(float(v.sum()))

    def _child_samples(self) -> Iterable[Sample]:
        self._fold_all()
        return super()._child_samples()


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.handled = BufferedCounter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            ["grpc_service", "grpc_method", "grpc_code"],
            registry=r,
        )
        self.handling = BufferedHistogram(
            "grpc_server_handling_seconds",
            "Time to handle an RPC on the server.",
            ["grpc_service", "grpc_method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.search_queries = BufferedCounter(
            "interlingua_search_queries",
            "Query vectors searched, by query space and route.",
            ["collection", "query_space", "route"],
            registry=r,
        )
        self.search_seconds = BufferedHistogram(
            "interlingua_search_seconds",
            "Time of each stage of a search batch.",
            ["collection", "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.points = Gauge(
            "interlingua_points",
            "Stored vectors per collection and space.",
            ["collection", "space"],
            registry=r,
        )
        self.index_ready = Gauge(
            "interlingua_index_ready",
            "1 when the collection's ANN index is trained and serving.",
            ["collection"],
            registry=r,
        )
        self.dead_labels = Gauge(
            "interlingua_dead_labels",
            "Index labels of deleted or overwritten points, filtered at search time until compacted.",
            ["collection"],
            registry=r,
        )
        self.compactions = Counter(
            "interlingua_compactions", "Rebuilds of a sealed index without its dead labels.", ["collection"], registry=r
        )
        self.collection_failed = Gauge(
            "interlingua_collection_failed",
            "1 when the collection's index cannot be built (see CollectionInfo.failure_reason).",
            ["collection"],
            registry=r,
        )
        self.checkpoint_seconds = Histogram(
            "interlingua_index_checkpoint_seconds", "Time to write an index checkpoint.", registry=r
        )
        self.recovery_replayed = Counter(
            "interlingua_recovery_replayed",
            "Writes replayed from the store into indexes at start-up.",
            registry=r,
        )

        self.route_active = Gauge(
            "interlingua_route_active",
            "1 for the transform that serves a query space on a collection, 0 for retired ones.",
            ["collection", "query_space", "transform"],
            registry=r,
        )
        self.transform_seconds = BufferedHistogram(
            "interlingua_transform_seconds",
            "Time to map a query batch through a transform.",
            ["transform"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ecc_margin = Gauge(
            "interlingua_transform_ecc_margin",
            "ECC margin M(T(new), home) - M(home, home) of a transform's report (Recall@10).",
            ["transform"],
            registry=r,
        )
        self.retention = Gauge(
            "interlingua_transform_retention",
            "Retention M(T(new), home) / M(home, home) of a transform's report (Recall@10; without evaluation "
            "queries, its estimate on the held-out calibration slice).",
            ["transform"],
            registry=r,
        )
        self.migration_phase = Gauge(
            "interlingua_migration_phase",
            "1 for a collection's current migration phase (backfill, cutover, finished, aborted), 0 for the others.",
            ["collection", "phase"],
            registry=r,
        )
        self.registry_in_sync = Gauge(
            "interlingua_registry_in_sync",
            "1 while this front-end has read its shared registry (serve --registry) and watches it, 0 while the "
            "watch is broken (health NOT_SERVING); absent without a registry.",
            registry=r,
        )
        self.migration_coverage = Gauge(
            "interlingua_migration_coverage",
            "Fraction of a migrating collection's points with a client-written vector in each of its two spaces.",
            ["collection", "space"],
            registry=r,
        )
        self.migration_forward_progress = Gauge(
            "interlingua_migration_forward_progress",
            "Fraction of a migrating collection's old vectors a forward upgrade has projected (1 when done).",
            ["collection"],
            registry=r,
        )
        self.fits = Counter(
            "interlingua_fits",
            "Transform fits ended, by kind and outcome (ready, failed, cancelled, timeout).",
            ["kind", "outcome"],
            registry=r,
        )
        self.fit_seconds = Histogram(
            "interlingua_fit_seconds",
            "Time of each transform fit that ended ready (fit, evaluation and store write).",
            ["kind"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=r,
        )
        self.shadow_agreement = Histogram(
            "interlingua_shadow_agreement",
            "Top-k overlap of a shadow candidate's results with the live route's, per query.",
            ["collection", "query_space", "transform"],
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
            registry=r,
        )
        self.shadow_seconds = Histogram(
            "interlingua_shadow_seconds",
            "Time of a shadow candidate's transform and search for one batch.",
            ["collection", "query_space", "transform"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def serve_http(self, port: int, host: str = "", check_key: KeyCheck | None = None) -> tuple[Any, int]:
        """Starts the ``/metrics`` HTTP server; returns (server, bound port).

        With ``check_key`` every request needs ``Authorization: Bearer <key>`` for which it
        returns True (401 otherwise).
        """
        app = make_wsgi_app(self.registry)
        if check_key is not None:
            app = _bearer_only(app, check_key)
        addr = host or "0.0.0.0"
        server_class = _Server6 if ":" in addr else ThreadingWSGIServer
        httpd = make_server(addr, port, app, server_class, handler_class=_Quiet)
        threading.Thread(target=httpd.serve_forever, name="interlingua-metrics", daemon=True).start()
        return httpd, int(httpd.server_port)


def _bearer_only(app: Any, check_key: KeyCheck) -> Any:
    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        given = str(environ.get("HTTP_AUTHORIZATION", "")).removeprefix("Bearer ").strip()
        if given and check_key(given):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
        return [b"metrics need 'Authorization: Bearer <key>'\n"]

    return guarded


class _Server6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no access log on stderr
        pass


def _split(full_method: str) -> tuple[str, str]:
    _, service, method = full_method.split("/", 2) if full_method.count("/") >= 2 else ("", "", full_method)
    return service, method


class MetricsInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Counts every RPC by final status code and times it (streams until their last message).

    Only methods the server has a handler for get series: a call to an unknown method creates
    none (20,000 made-up names once grew /metrics to 43.6 MB). A non-blocking stream (health
    ``Watch``) is counted when it closes and holds no worker thread meanwhile.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics
        self._wrapped: dict[tuple[str, int], tuple[Any, Any]] = {}  #: (method, id(handler)) -> (handler, wrapped)

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        key = (details.method, id(handler))
        hit = self._wrapped.get(key)
        if hit is not None and hit[0] is handler:  # built once per method handler, not per call
            return hit[1]
        wrapped = self._wrap(handler, details.method)
        if len(self._wrapped) < 4096:  # only methods with a handler get here: a fixed set
            self._wrapped[key] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: Any, full_method: str) -> Any:
        service, method = _split(full_method)
        handling = self.m.handling.labels(service, method)
        by_code: dict[str, Any] = {}  #: status code name -> the handled counter's child

        def record(context: grpc.ServicerContext, start: float, failed: bool) -> None:
            code = context.code() if hasattr(context, "code") else None
            if code is None:
                code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
            child = by_code.get(code.name)
            if child is None:
                child = by_code[code.name] = self.m.handled.labels(service, method, code.name)
            child.inc()
            handling.observe(time.perf_counter() - start)

        def wrap(behavior: Callable[..., Any], _req_stream: bool, resp_stream: bool) -> Callable[..., Any]:
            if is_non_blocking(behavior):

                def non_blocking(request: Any, context: grpc.ServicerContext, *callback: Any) -> Any:
                    start = time.perf_counter()
                    if not context.add_callback(lambda: record(context, start, False)):
                        record(context, start, False)
                    return behavior(request, context, *callback)

                return non_blocking

            if resp_stream:

                def stream(request: Any, context: grpc.ServicerContext) -> Any:
                    start, failed = time.perf_counter(), True
                    try:
                        yield from behavior(request, context)
                        failed = False
                    finally:
                        record(context, start, failed)

                return stream

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                start, failed = time.perf_counter(), True
                try:
                    response = behavior(request, context)
                    failed = False
                    return response
                finally:
                    record(context, start, failed)

            return unary

        return wrap_rpc_behavior(handler, wrap)
