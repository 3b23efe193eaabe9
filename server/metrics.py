"""Prometheus metrics: the standard gRPC server metrics and the service's own.

Names follow the conventions (seconds, ``_total`` on counters; prometheus-client
appends ``_total`` to a Counter's name). Each :class:`Metrics` owns its
``CollectorRegistry``, so servers (and tests) never share state.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from .rpcwrap import is_non_blocking, wrap_rpc_behavior

__all__ = ["KeyCheck", "Metrics", "MetricsInterceptor"]

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


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            ["grpc_service", "grpc_method", "grpc_code"],
            registry=r,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Time to handle an RPC on the server.",
            ["grpc_service", "grpc_method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.search_queries = Counter(
            "interlingua_search_queries",
            "Query vectors searched, by query space and route.",
            ["collection", "query_space", "route"],
            registry=r,
        )
        self.search_seconds = Histogram(
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
        self.transform_seconds = Histogram(
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

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        service, method = _split(details.method)
        handled, handling = self.m.handled, self.m.handling.labels(service, method)

        def record(context: grpc.ServicerContext, start: float, failed: bool) -> None:
            code = context.code() if hasattr(context, "code") else None
            if code is None:
                code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
            handled.labels(service, method, code.name).inc()
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
