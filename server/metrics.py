"""Prometheus metrics: the standard gRPC server metrics and the service's own.

Names follow the conventions (seconds, ``_total`` on counters; prometheus-client
appends ``_total`` to a Counter's name). Each :class:`Metrics` owns its
``CollectorRegistry``, so servers (and tests) never share state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["Metrics", "MetricsInterceptor"]

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
            "Retention M(T(new), home) / M(new, new) of a transform's report (Recall@10).",
            ["transform"],
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

    def serve_http(self, port: int, host: str = "") -> tuple[Any, int]:
        """Starts the ``/metrics`` HTTP server; returns (server, bound port)."""
        server, _thread = start_http_server(port, addr=host or "0.0.0.0", registry=self.registry)
        return server, int(server.server_port)


def _split(full_method: str) -> tuple[str, str]:
    _, service, method = full_method.split("/", 2) if full_method.count("/") >= 2 else ("", "", full_method)
    return service, method


def _wrap_rpc_behavior(handler: grpc.RpcMethodHandler[Any, Any] | None, fn: Callable[..., Any]) -> Any:
    """Returns ``handler`` with its behaviour wrapped by ``fn(behavior, streaming_req, streaming_resp)``."""
    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    return factory(
        fn(behavior, handler.request_streaming, handler.response_streaming),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class MetricsInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Counts every RPC by final status code and times it (streams until their last message)."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        service, method = _split(details.method)
        handled, handling = self.m.handled, self.m.handling.labels(service, method)

        def record(context: grpc.ServicerContext, start: float, failed: bool) -> None:
            code = context.code() if hasattr(context, "code") else None
            if code is None:
                code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
            handled.labels(service, method, code.name).inc()
            handling.observe(time.perf_counter() - start)

        def wrap(behavior: Callable[..., Any], _req_stream: bool, resp_stream: bool) -> Callable[..., Any]:
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

        return _wrap_rpc_behavior(continuation(details), wrap)
