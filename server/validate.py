"""Boundary checks: every request field is coerced and checked here, before any write.

Functions raise :class:`~interlingua.server.errors.InvalidArgument` (or
``ResourceExhausted`` for caps) with a message that names the field and the
offending value; nothing past this module re-validates input.
"""

from __future__ import annotations

import json
import re

import numpy as np

from .config import Limits
from .errors import InvalidArgument, ResourceExhausted

__all__ = [
    "METRICS",
    "check_collection_name",
    "check_dim",
    "check_ids",
    "check_k",
    "check_payloads",
    "check_space_name",
    "normalize_rows",
    "unpack_vectors",
]

METRICS = ("cosine", "ip", "l2")
_SPACE_NAME = re.compile(r"^[A-Za-z0-9._@:/-]{1,128}$")
_COLLECTION_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
MAX_DIM = 65536


def check_space_name(name: str) -> str:
    if not _SPACE_NAME.match(name):
        raise InvalidArgument(f"space name {name!r} is invalid: use 1 to 128 characters from [A-Za-z0-9._@:/-]")
    return name


def check_collection_name(name: str) -> str:
    if not _COLLECTION_NAME.match(name):
        raise InvalidArgument(f"collection name {name!r} is invalid: use 1 to 128 characters from [A-Za-z0-9._-]")
    return name


def unpack_vectors(data: bytes, dim: int, d: int, *, what: str, limit: int | None = None) -> np.ndarray:
    """Packed little-endian float32 bytes -> array of shape (n, d), without copying.

    ``dim`` is the dimension the caller declared, ``d`` the space's. Rejects a
    dim mismatch, a byte length that is not a multiple of d*4, an empty batch and
    NaN or Inf values. ``limit`` caps n (RESOURCE_EXHAUSTED above it).
    """
    if dim != d:
        raise InvalidArgument(f"{what}: dim is {dim} but the space has dimension {d}")
    row = 4 * d
    if len(data) == 0:
        raise InvalidArgument(f"{what}: empty batch (no vectors)")
    if len(data) % row:
        raise InvalidArgument(
            f"{what}: {len(data)} bytes is not a whole number of {d}-dim float32 vectors "
            f"(expected n*{d}*4 = a multiple of {row})"
        )
    n = len(data) // row
    if limit is not None and n > limit:
        raise ResourceExhausted(f"{what}: {n} vectors exceed the cap of {limit} per request")
    x = np.frombuffer(data, dtype="<f4").reshape(n, d)
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise InvalidArgument(f"{what}: vector {bad} contains NaN or Inf")
    return x


def normalize_rows(x: np.ndarray, *, what: str) -> np.ndarray:
    """L2-normalize rows (cosine spaces). Returns a new float32 array of shape (n, d)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any() or not np.isfinite(norms).all():
        bad = int(np.flatnonzero((norms[:, 0] == 0) | ~np.isfinite(norms[:, 0]))[0])
        raise InvalidArgument(f"{what}: vector {bad} has zero (or overflowing) norm; cosine needs a direction")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def check_ids(ids: list[str], limits: Limits, *, what: str = "ids") -> list[str]:
    """Non-empty, unique, at most ``limits.max_id_bytes`` UTF-8 bytes each, under the batch cap."""
    if not ids:
        raise InvalidArgument(f"{what}: empty batch (no ids)")
    if len(ids) > limits.max_batch:
        raise ResourceExhausted(f"{what}: {len(ids)} ids exceed the cap of {limits.max_batch} per request")
    for i, pid in enumerate(ids):
        if not pid:
            raise InvalidArgument(f"{what}[{i}] is empty; ids are 1 to {limits.max_id_bytes} bytes")
        if len(pid) * 4 > limits.max_id_bytes and len(pid.encode("utf-8")) > limits.max_id_bytes:
            raise InvalidArgument(
                f"{what}[{i}] is {len(pid.encode('utf-8'))} bytes of UTF-8; the limit is {limits.max_id_bytes}"
            )
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(p for p in ids if p in seen or seen.add(p))  # type: ignore[func-returns-value]
        raise InvalidArgument(f"{what}: id {dup!r} appears more than once in the batch")
    return ids


def check_payloads(payloads: list[str], n: int, limits: Limits) -> list[str | None]:
    """Payloads aligned with n ids; empty list means none. Each must be a JSON document."""
    if not payloads:
        return [None] * n
    if len(payloads) != n:
        raise InvalidArgument(f"payloads: {len(payloads)} payloads for {n} ids; give one per id or none")
    out: list[str | None] = []
    for i, p in enumerate(payloads):
        if not p:
            out.append(None)
            continue
        size = len(p.encode("utf-8"))
        if size > limits.max_payload_bytes:
            raise InvalidArgument(f"payloads[{i}] is {size} bytes; the limit is {limits.max_payload_bytes}")
        try:
            json.loads(p)
        except ValueError as e:
            raise InvalidArgument(f"payloads[{i}] is not valid JSON: {e}") from None
        out.append(p)
    return out


def check_k(k: int, limits: Limits) -> int:
    if k <= 0 or k > limits.max_k:
        raise InvalidArgument(f"k is {k}; it must be between 1 and {limits.max_k}")
    return k


def check_dim(dim: int) -> int:
    if not 1 <= dim <= MAX_DIM:
        raise InvalidArgument(f"dim is {dim}; it must be between 1 and {MAX_DIM}")
    return dim
