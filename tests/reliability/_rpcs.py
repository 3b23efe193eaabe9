"""Every RPC the server offers, from the generated descriptors, and one generic way to call each.

:func:`discover` lists the methods of every service in ``interlingua.v1.*_pb2``
(whatever modules exist: new services are fuzzed without editing this file), the
standard ``grpc.health.v1.Health`` and server reflection. :func:`call` sends
already-serialized request bytes through a generic channel call
(``request_serializer=None``), for the four call kinds, and returns the status
code the server answered, never raising.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

import interlingua.v1


@dataclass(frozen=True)
class Rpc:
    path: str  #: "/package.Service/Method"
    input: Descriptor
    client_streaming: bool
    server_streaming: bool

    @property
    def service(self) -> str:
        return self.path.split("/")[1]

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[1]

    def message_class(self) -> Any:
        return message_factory.GetMessageClass(self.input)


def api_modules() -> list[ModuleType]:
    names = sorted(m.name for m in pkgutil.iter_modules(interlingua.v1.__path__) if m.name.endswith("_pb2"))
    return [importlib.import_module(f"interlingua.v1.{n}") for n in names]


def discover() -> list[Rpc]:
    """Every method of every service: the API's, health's and reflection's, by path."""
    out = []
    for mod in [*api_modules(), health_pb2, reflection_pb2]:
        for svc in mod.DESCRIPTOR.services_by_name.values():
            for m in svc.methods:
                out.append(Rpc(f"/{svc.full_name}/{m.name}", m.input_type, m.client_streaming, m.server_streaming))
    return sorted(out, key=lambda r: r.path)


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: int


def call(
    channel: grpc.Channel,
    rpc: Rpc,
    requests: Sequence[bytes],
    *,
    timeout: float,
    metadata: tuple[tuple[str, str], ...] = (),
    max_responses: int = 50,
) -> Outcome:
    """One call of ``rpc`` with raw request bytes (a unary method sends ``requests[0]``, b"" if none)."""
    first = requests[0] if requests else b""
    n = 0
    try:
        if rpc.client_streaming and rpc.server_streaming:
            it = channel.stream_stream(rpc.path, request_serializer=None, response_deserializer=None)(
                iter(requests), timeout=timeout, metadata=metadata
            )
            n = _drain(it, max_responses)
        elif rpc.client_streaming:
            channel.stream_unary(rpc.path, request_serializer=None, response_deserializer=None)(
                iter(requests), timeout=timeout, metadata=metadata
            )
            n = 1
        elif rpc.server_streaming:
            it = channel.unary_stream(rpc.path, request_serializer=None, response_deserializer=None)(
                first, timeout=timeout, metadata=metadata
            )
            n = _drain(it, max_responses)
        else:
            channel.unary_unary(rpc.path, request_serializer=None, response_deserializer=None)(
                first, timeout=timeout, metadata=metadata
            )
            n = 1
    except grpc.RpcError as e:
        return Outcome(e.code(), e.details() or "", n)  # type: ignore[attr-defined]
    return Outcome(grpc.StatusCode.OK, "", n)


def _drain(it: Any, max_responses: int) -> int:
    n = 0
    for _ in it:
        n += 1
        if n >= max_responses:
            it.cancel()
            break
    return n
