"""API keys with roles: who is calling, and what each method needs.

Keys are configured hashed (:class:`~.config.ApiKey`, hex SHA-256); the plain
``api_key`` of older configs is an admin key. :meth:`Keyring.authenticate` reads
``authorization: Bearer <key>`` (or ``x-api-key``) and raises
:class:`~.errors.Unauthenticated` for a missing or unknown key;
:meth:`Keyring.authorize` raises :class:`~.errors.PermissionDenied` for a known key
whose role is below what the method needs (:func:`required_role`). Health checks and
reflection are open. Covered by ``tests/test_security.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from interlingua.v1 import collections_pb2, migrations_pb2, points_pb2, snapshots_pb2, spaces_pb2, transforms_pb2

from .config import ROLES, ApiKey, ServerConfig
from .errors import PermissionDenied, Unauthenticated

__all__ = ["METHODS", "OPEN_PREFIXES", "Keyring", "MethodKind", "Principal", "hash_key", "required_role"]

OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


@dataclass(frozen=True)
class MethodKind:
    request_streaming: bool
    response_streaming: bool


def _methods() -> dict[str, MethodKind]:
    out: dict[str, MethodKind] = {}
    for fd in (spaces_pb2, collections_pb2, points_pb2, transforms_pb2, snapshots_pb2, migrations_pb2):
        for service in fd.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                out[f"/{service.full_name}/{m.name}"] = MethodKind(m.client_streaming, m.server_streaming)
    return out


#: Every API method, full name ("/interlingua.v1.PointService/Search") -> its streaming kind.
METHODS = _methods()

#: Methods open to ``read`` and ``write`` keys; every other API method (snapshots, and new ones) needs ``admin``.
_READ = {
    "GetSpace",
    "ListSpaces",
    "GetCollection",
    "ListCollections",
    "GetPoints",
    "Search",
    "SearchStream",
    "GetTransform",
    "ListTransforms",
    "ListRoutes",
    "GetMigration",
}
_WRITE = {"Upsert", "UpsertStream", "DeletePoints"}


def required_role(method: str) -> str:
    """The least role that may call ``method`` (a full method name)."""
    name = method.rsplit("/", 1)[-1]
    return "read" if name in _READ else "write" if name in _WRITE else "admin"


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key, as configured in ``ApiKey.sha256``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the key's configured name, role and rate limit."""

    name: str
    role: str
    rate_per_second: float | None = None


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The key a call carries (``x-api-key`` or ``authorization: Bearer``), or ""."""
    md = {k: v for k, v in metadata or () if isinstance(v, str)}
    return (md.get("x-api-key") or md.get("authorization", "").removeprefix("Bearer ")).strip()


class Keyring:
    """The configured keys by hash; empty when authentication is off."""

    def __init__(self, keys: Sequence[ApiKey], legacy_key: str | None = None) -> None:
        self._by_hash = {k.sha256: Principal(k.name, k.role, k.rate_per_second) for k in keys}
        if legacy_key:
            self._by_hash[hash_key(legacy_key)] = Principal("api_key", "admin")

    @classmethod
    def of(cls, config: ServerConfig) -> Keyring:
        return cls(config.keys, config.api_key)

    @property
    def enabled(self) -> bool:
        return bool(self._by_hash)

    def lookup(self, key: str) -> Principal | None:
        """The principal of a plain key, or None (looked up by digest: timing reveals nothing of the key)."""
        return self._by_hash.get(hash_key(key))

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        """The caller of a call's metadata; Unauthenticated for a missing or unknown key."""
        key = bearer(metadata)
        if not key:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'")
        principal = self.lookup(key)
        if principal is None:
            raise Unauthenticated("wrong API key: it matches no configured key")
        return principal

    @staticmethod
    def authorize(principal: Principal, method: str) -> None:
        """PermissionDenied when ``principal``'s role is below what ``method`` needs."""
        need = required_role(method)
        if ROLES.index(principal.role) < ROLES.index(need):
            name = method.rsplit("/", 1)[-1]
            raise PermissionDenied(f"key {principal.name!r} has role {principal.role!r}; {name} needs {need!r}")
