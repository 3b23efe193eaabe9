"""Boundary checks: every request field is coerced and checked here, before any write.

Functions raise :class:`~interlingua.server.errors.InvalidArgument` (or
``ResourceExhausted`` for caps) with a message that names the field and the
offending value; nothing past this module re-validates input.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np
from faiss import fvec_norm_L2sqr, swig_ptr

from .config import Limits
from .errors import InvalidArgument, ResourceExhausted, shown

__all__ = [
    "FAST_MAX_NORM_SQ",
    "MAX_NORM",
    "METRICS",
    "check_collection_name",
    "check_dim",
    "check_ids",
    "check_k",
    "check_norms",
    "check_payloads",
    "check_space_name",
    "json_depth",
    "normalize_rows",
    "parse_json",
    "parse_json_object",
    "unpack_queries",
    "unpack_vectors",
]

METRICS = ("cosine", "ip", "l2")
#: matched whole (fullmatch): ``$`` also matches before a final newline, which let "c\n" through
_SPACE_NAME = re.compile(r"[A-Za-z0-9._@:/-]{1,128}")
_COLLECTION_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
MAX_DIM = 65536
#: Largest L2 norm of a vector: squared distances between two such vectors, (2 * 1e18)^2 = 4e36,
#: and inner products stay finite in float32 (max 3.4e38); l2 vectors of 3e38 once gave NaN scores.
MAX_NORM = 1e18
_SPECIAL = re.compile(r'["\\\[\]{}]')


def check_space_name(name: str) -> str:
    if not _SPACE_NAME.fullmatch(name):
        raise InvalidArgument(f"space name {shown(name)} is invalid: use 1 to 128 characters from [A-Za-z0-9._@:/-]")
    return name


def check_collection_name(name: str) -> str:
    if not _COLLECTION_NAME.fullmatch(name):
        raise InvalidArgument(f"collection name {shown(name)} is invalid: use 1 to 128 characters from [A-Za-z0-9._-]")
    return name


def json_depth(text: str) -> int:
    """Deepest nesting of ``[`` and ``{`` in a JSON text (strings skipped), without parsing it.

    One pass over the special characters, linear in the text whatever it holds.
    """
    depth = deepest = 0
    in_string, escaped_until = False, -1
    for m in _SPECIAL.finditer(text):
        c, at = m.group(), m.start()
        if in_string:
            if at < escaped_until:
                continue
            if c == "\\":
                escaped_until = at + 2
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise InvalidArgument(f"{name} is not a JSON number (NaN and Infinity are not allowed)")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise InvalidArgument(f"number {shown(text, 32)} overflows a double")
    return x


def parse_json(text: str, what: str, max_depth: int, max_bytes: int) -> Any:
    """``json.loads(text)`` with caps: at most ``max_bytes`` UTF-8 bytes and ``max_depth`` nesting,
    no NaN or Infinity. Raises InvalidArgument naming ``what`` (never RecursionError)."""
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise InvalidArgument(f"{what} is {size} bytes; the limit is {max_bytes}")
    depth = json_depth(text) if text.count("[") + text.count("{") > max_depth else 0
    if depth > max_depth:
        raise InvalidArgument(f"{what} nests {depth} levels deep; the limit is {max_depth}")
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except InvalidArgument as e:
        raise InvalidArgument(f"{what}: {e.message}") from None
    except (ValueError, RecursionError) as e:
        raise InvalidArgument(f"{what} is not valid JSON: {shown(str(e), 200)}") from None


def parse_json_object(text: str, what: str, max_depth: int = 32, max_bytes: int = 64 * 1024) -> dict[str, Any]:
    """:func:`parse_json` of a text that must hold a JSON object (e.g. a FitTransform ``config_json``)."""
    value = parse_json(text, what, max_depth, max_bytes)
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def unpack_vectors(data: bytes, dim: int, d: int, *, what: str, limit: int | None = None) -> np.ndarray:
    """Packed little-endian float32 bytes -> array of shape (n, d), without copying.

    ``dim`` is the dimension the caller declared, ``d`` the space's. Rejects a
    dim mismatch, a byte length that is not a multiple of d*4, an empty batch and
    NaN or Inf values and norms over :data:`MAX_NORM`. ``limit`` caps n (RESOURCE_EXHAUSTED
    above it); gRPC's receive limit (``Limits.receive_bytes``) caps the bytes before parsing.
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
    check_norms(x, what=what)
    return x


#: unpack_queries' bound on sqrt(d) * max|x| (check_norms' own bound on every norm, with a margin)
_FAST_MAX_NORM = 0.999 * MAX_NORM
#: the same bound on one query's float32 sum of squares (here and in serial.search_one)
FAST_MAX_NORM_SQ = _FAST_MAX_NORM * _FAST_MAX_NORM


def unpack_queries(
    data: bytes, dim: int, d: int, *, cosine: bool, what: str, limit: int | None = None
) -> tuple[np.ndarray, bool]:
    """:func:`unpack_vectors`, and for a ``cosine`` space the rows L2-normalized as
    :func:`normalize_rows` does, in one pass over the norms: (x, True). When a row is not finite,
    has zero norm or one near :data:`MAX_NORM`, the checks run one by one as before (their
    errors, in their order) and the caller normalizes: (x, False); also without ``cosine``.
    A batch is normalized bit for bit as :func:`normalize_rows` does; one query (the serial
    path) with its squared norm from FAISS's ``fvec_norm_L2sqr`` (one call into C++ instead of
    five numpy calls: each costs ~15 µs when a large search has just evicted the caches), which
    can differ from numpy's pairwise sum in the last bit of the norm (relative error < 1e-6)."""
    if not cosine or dim != d or not data or len(data) % (4 * d):
        return unpack_vectors(data, dim, d, what=what, limit=limit), False
    n = len(data) // (4 * d)
    if limit is not None and n > limit:
        raise ResourceExhausted(f"{what}: {n} vectors exceed the cap of {limit} per request")
    x = np.frombuffer(data, dtype="<f4")
    if n == 1:  # one FAISS call for the finiteness, norm and zero checks (NaN fails both comparisons, Inf too)
        ss = float(fvec_norm_L2sqr(swig_ptr(x), d))  # C++: no numpy dispatch, no overflow warning (inf)
        if 0.0 < ss <= FAST_MAX_NORM_SQ:
            return (x / np.float32(math.sqrt(ss))).reshape(1, d), True
        return unpack_vectors(data, dim, d, what=what, limit=limit), False
    # Every norm is at most sqrt(d) * max|x| (check_norms' own bound): under _FAST_MAX_NORM, x * x
    # and its sums stay finite (no overflow warning) and within MAX_NORM; False for NaN. Then
    # np.linalg.norm(x, axis=1) of float32 is exactly sqrt of the row sums of x * x, the same
    # pairwise sums over a row whether x is (d,) or (n, d).
    if max(float(x.max()), -float(x.min())) * math.sqrt(d) <= _FAST_MAX_NORM:
        x = x.reshape(n, d)
        norms = np.sqrt(np.add.reduce(x * x, axis=1, keepdims=True))
        if float(norms.min()) > 0.0:
            return np.ascontiguousarray(x / norms, dtype=np.float32), True
    return unpack_vectors(data, dim, d, what=what, limit=limit), False


def check_norms(x: np.ndarray, *, what: str) -> None:
    """InvalidArgument when a row of x (shape (n, d)) has an L2 norm above :data:`MAX_NORM`."""
    if len(x) == 0 or max(float(x.max()), -float(x.min())) * math.sqrt(x.shape[1]) <= MAX_NORM:
        return  # every norm is below sqrt(d) * max|x|
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    bad = int(np.argmax(norms))
    if norms[bad] > MAX_NORM:
        raise InvalidArgument(
            f"{what}: vector {bad} has L2 norm {norms[bad]:.3g}; the limit is {MAX_NORM:g} "
            "(scores and squared distances must stay finite in float32)"
        )


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
        raise InvalidArgument(f"{what}: id {shown(dup)} appears more than once in the batch")
    return ids


def check_payloads(payloads: list[str], n: int, limits: Limits) -> list[str | None]:
    """Payloads aligned with n ids; empty list means none. Each must be a JSON document of at most
    ``limits.max_payload_bytes`` and ``limits.max_json_depth`` levels, without NaN or Infinity."""
    if not payloads:
        return [None] * n
    if len(payloads) != n:
        raise InvalidArgument(f"payloads: {len(payloads)} payloads for {n} ids; give one per id or none")
    out: list[str | None] = []
    for i, p in enumerate(payloads):
        if not p:
            out.append(None)
            continue
        parse_json(p, f"payloads[{i}]", limits.max_json_depth, limits.max_payload_bytes)
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
