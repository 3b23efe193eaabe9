"""Handler plumbing shared by the interceptors, and request decoding as INVALID_ARGUMENT.

:func:`wrap_rpc_behavior` wraps a handler's behaviour for all four call kinds and
keeps grpc's ``experimental_non_blocking`` marks (the health service's ``Watch``
holds no worker thread only while it keeps them). :class:`DecodeInterceptor`
registers every handler with raw bytes and parses them itself, so undecodable
protobuf bytes or invalid UTF-8 in a string field answer INVALID_ARGUMENT naming
the message type, not grpc's INTERNAL "Exception deserializing request!". A domain
error escaping a handler (e.g. from a request stream) leaves through
:func:`abort_with`, a MemoryError as RESOURCE_EXHAUSTED (``errors.out_of_memory``).
Covered by ``tests/test_hardening.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

from .errors import InterlinguaError, InvalidArgument, RateLimited, out_of_memory, status_for

__all__ = ["DecodeInterceptor", "abort_with", "wrap_rpc_behavior"]

Behavior = Callable[..., Any]
_NON_BLOCKING = ("experimental_non_blocking", "experimental_thread_pool")


def abort_with(context: grpc.ServicerContext, exc: InterlinguaError) -> None:
    """Ends the call with ``exc``'s status (a rate limit adds ``retry-after`` trailing metadata)."""
    if isinstance(exc, RateLimited):
        context.set_trailing_metadata((("retry-after", f"{exc.retry_after:.3f}"),))
    context.abort(status_for(exc), exc.message)


def is_non_blocking(behavior: Behavior) -> bool:
    return bool(getattr(behavior, "experimental_non_blocking", False))


def wrap_rpc_behavior(
    handler: grpc.RpcMethodHandler[Any, Any] | None,
    fn: Callable[[Behavior, bool, bool], Behavior],
    *,
    request_deserializer: Any = ...,
) -> Any:
    """``handler`` with its behaviour wrapped by ``fn(behavior, streaming_req, streaming_resp)``.

    The wrapper receives ``(request, context, *send_response_callback)``; the deserializer
    stays the handler's unless given.
    """
    if handler is None:
        return None
    behavior: Any
    factory: Any
    if handler.request_streaming and handler.response_streaming:
        behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    wrapped = fn(behavior, handler.request_streaming, handler.response_streaming)
    for attr in _NON_BLOCKING:
        if hasattr(behavior, attr):
            setattr(wrapped, attr, getattr(behavior, attr))
    deserializer = handler.request_deserializer if request_deserializer is ... else request_deserializer
    return factory(wrapped, request_deserializer=deserializer, response_serializer=handler.response_serializer)


def _decoder(parse: Callable[[bytes], Any]) -> Callable[[bytes, str], Any]:
    type_name = getattr(getattr(parse, "__self__", None), "__name__", "request")

    def decode(raw: bytes, where: str) -> Any:
        try:
            return parse(raw)
        except MemoryError:
            raise out_of_memory(f"parsing {where}") from None
        except Exception as e:  # DecodeError, invalid UTF-8 in a string field, ...
            raise InvalidArgument(f"{where} is not a valid {type_name} message: {e}") from None

    return decode


class DecodeInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Parses requests in the handler (INVALID_ARGUMENT when they do not parse); innermost. The
    wrapped handler is built once per method handler (nothing in it is per call), not per call."""

    def __init__(self) -> None:
        self._wrapped: dict[int, tuple[Any, Any]] = {}  #: id(handler) -> (handler, wrapped)

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        hit = self._wrapped.get(id(handler))
        if hit is not None and hit[0] is handler:
            return hit[1]
        wrapped = self._wrap(handler)
        if len(self._wrapped) < 4096:  # the service's handlers: a fixed set
            self._wrapped[id(handler)] = (handler, wrapped)
        return wrapped

    @staticmethod
    def _wrap(handler: Any) -> Any:
        decode = _decoder(handler.request_deserializer)

        def wrap(behavior: Behavior, req_stream: bool, resp_stream: bool) -> Behavior:
            def messages(raw: Iterator[bytes]) -> Iterator[Any]:
                for i, message in enumerate(raw):
                    yield decode(message, f"stream message {i}")

            def responses(it: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from it
                except InterlinguaError as e:
                    abort_with(context, e)
                except MemoryError:
                    abort_with(context, out_of_memory("the stream"))

            def call(raw: Any, context: grpc.ServicerContext, *callback: Any) -> Any:
                try:
                    request = messages(raw) if req_stream else decode(raw, "the request")
                    result = behavior(request, context, *callback)
                except InterlinguaError as e:
                    abort_with(context, e)
                except MemoryError:
                    abort_with(context, out_of_memory("the call"))
                if resp_stream and not callback and result is not None:
                    return responses(result, context)
                return result

            return call

        return wrap_rpc_behavior(handler, wrap, request_deserializer=None)
