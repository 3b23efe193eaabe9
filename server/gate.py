"""The outermost interceptor: authentication, roles, rate limit, then open-stream slots.

It runs before anything else looks at a call, so an unauthenticated caller creates
no metric series and reaches no handler. Health checks and reflection stay open
(load balancers call them without keys), so their streams (``Watch``, reflection)
take slots from a pool of their own: unauthenticated callers cannot use up the
slots of API streams. Both pools are capped per caller (the API key's name, else
the peer's address) and overall, and the worker pool holds ``workers + 2 *
max_streams`` threads, so unary calls always find a worker. Refused calls are
counted by status code only (``interlingua_rpc_denied_total{grpc_code}``), never by
method or key, so a flood of made-up names grows no series.
Covered by ``tests/test_hardening.py`` and ``tests/test_security.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from .auth import METHODS, OPEN_PREFIXES, Keyring, MethodKind, Principal
from .errors import InterlinguaError, RateLimited, status_for
from .rpcwrap import Behavior, abort_with, wrap_rpc_behavior
from .throttle import RateLimiter, StreamSlots

__all__ = ["METERED_STREAMS", "GateInterceptor", "OnDeny", "peer_host"]


def peer_host(peer: str) -> str:
    """``ipv4:1.2.3.4:5678`` -> ``ipv4:1.2.3.4``: one client, whatever port it calls from."""
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


def _deny(kind: MethodKind | None, exc: InterlinguaError) -> Any:
    """A handler of the method's kind that ends the call with ``exc``'s status."""

    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        abort_with(context, exc)

    if kind is None or not (kind.request_streaming or kind.response_streaming):
        return grpc.unary_unary_rpc_method_handler(deny)
    if kind.request_streaming and kind.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if kind.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    return grpc.unary_stream_rpc_method_handler(deny)


#: Called with the status code's name of each call the gate refuses (a fixed, small set of labels).
OnDeny = Callable[[str], None]


class GateInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(
        self,
        keyring: Keyring,
        limiter: RateLimiter,
        slots: StreamSlots,
        open_slots: StreamSlots,
        on_deny: OnDeny = lambda code: None,
    ) -> None:
        self.keyring, self.limiter = keyring, limiter
        self.slots, self.open_slots = slots, open_slots  #: API streams; health and reflection streams
        self.on_deny = on_deny

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        method = details.method
        is_open = method.startswith(OPEN_PREFIXES)
        principal: Principal | None = None
        if self.keyring.enabled and not is_open:
            try:
                principal = self.keyring.authenticate(details.invocation_metadata)
                self.keyring.authorize(principal, method)
                self.limiter.take(principal.name, principal.rate_per_second)
            except InterlinguaError as e:
                self.on_deny(status_for(e).name)
                return _deny(METHODS.get(method), e)
        handler = continuation(details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        caller = f"key:{principal.name}" if principal is not None else None
        slots = self.open_slots if is_open else self.slots
        if principal is not None and method in METERED_STREAMS:  # each message is a call's work: charged as one
            p, limiter, on_deny = principal, self.limiter, self.on_deny
            return wrap_rpc_behavior(
                handler,
                lambda behavior, _rq, _rs: _slotted(
                    _metered(behavior, limiter, p.name, p.rate_per_second, method, on_deny), slots, caller, on_deny
                ),
            )
        return wrap_rpc_behavior(handler, lambda behavior, _rq, _rs: _slotted(behavior, slots, caller, self.on_deny))


#: Request streams whose every message is the work of one unary call (a search batch, an upsert batch):
#: the key's rate limit charges each message after the first (the call itself took a token), so a
#: stream is no way around it. A FitTransform stream's chunks are one call's data, capped by the fit
#: limits instead.
METERED_STREAMS = frozenset({"/interlingua.v1.PointService/SearchStream", "/interlingua.v1.PointService/UpsertStream"})


def _metered(
    behavior: Behavior, limiter: RateLimiter, name: str, rate: float | None, method: str, on_deny: OnDeny
) -> Behavior:
    """``behavior`` with each request message after the first charged to key ``name``'s rate limit; over
    it, the stream ends with RESOURCE_EXHAUSTED and ``retry-after`` (the messages before it stand)."""
    what = method.rsplit("/", 1)[-1]

    def call(request_iterator: Any, context: grpc.ServicerContext, *callback: Any) -> Any:
        def charged() -> Any:
            first = True
            for message in request_iterator:
                if not first:
                    try:
                        limiter.take(name, rate)
                    except RateLimited as e:
                        on_deny(status_for(e).name)
                        raise RateLimited(
                            f"{e.message} (each {what} message counts as one call)", retry_after=e.retry_after
                        ) from None
                first = False
                yield message

        return behavior(charged(), context, *callback)

    return call


def _slotted(behavior: Behavior, slots: StreamSlots, caller: str | None, on_deny: OnDeny) -> Behavior:
    """``behavior`` holding one of ``slots`` while its call is open."""

    def call(request: Any, context: grpc.ServicerContext, *callback: Any) -> Any:
        who = caller or peer_host(context.peer())
        try:
            slots.acquire(who)
        except InterlinguaError as e:
            on_deny(status_for(e).name)
            abort_with(context, e)
        if not context.add_callback(lambda: slots.release(who)):
            slots.release(who)  # the call has ended already
        return behavior(request, context, *callback)

    return call
