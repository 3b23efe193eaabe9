"""Wire conversions: numpy arrays to packed ``Vectors``, payloads to JSON, upserts to batches.

Vectors cross the wire as one ``Vectors(data, dim)`` of n*d little-endian
float32 values (row-major). :func:`upsert_requests` checks the cheap things up
front (x.ndim == 2, one id and payload per row) and then slices the rows lazily,
converting each batch on its own, so a memory-mapped float16 ``.npy`` of any
size streams through at ``batch_size`` rows of float32 at a time. Covered by
``tests/test_client.py`` and ``tests/test_cli.py``.

A single search's request is the hot path's one message: :func:`search_head` serializes its
fields but the queries once per distinct request shape, and :func:`search_request_bytes` appends
the queries' ``Vectors`` field to those bytes (protobuf parsers read fields in any order, so the
server parses the same ``SearchRequest``). On a 1M gallery a search evicts the caches, and building
the nested message object cost 26-30 µs a call there against ~4 µs warm; with the leaner reply read
(``SearchResult.from_proto``) a unary search costs 0.034 ms less at 1M (``bench/grpc_breakdown.py``'s
``client_saves_ms``). ``tests/test_search_wire.py`` parses both forms and compares them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from interlingua.v1 import common_pb2, points_pb2

from ._exceptions import InvalidArgument

__all__ = [
    "Payload",
    "PayloadArg",
    "as_matrix",
    "decode_payload",
    "encode_payloads",
    "pack_vectors",
    "search_head",
    "search_params_pb",
    "search_request_bytes",
    "unpack_vectors",
    "upsert_requests",
]

_PARAMS_PB: dict[tuple[Any, ...], common_pb2.SearchParams] = {}  #: search_params_pb's messages
_SEARCH_HEADS: dict[tuple[Any, ...], bytes] = {}  #: search_head's bytes, per distinct (typed) request shape


def search_params_pb(
    ef_search: int | None, nprobe: int | None, shortlist_k: int | None, k_factor: int | None
) -> common_pb2.SearchParams | None:
    """The SearchParams message of these values (None when none is set: the server reads an absent
    message as empty), one per distinct (typed) setting; a value a field refuses raises as the
    constructor does (TypeError, ValueError)."""
    if ef_search is None and nprobe is None and shortlist_k is None and k_factor is None:
        return None
    key = (type(ef_search), ef_search, type(nprobe), nprobe, type(shortlist_k), shortlist_k, type(k_factor), k_factor)
    try:
        msg = _PARAMS_PB.get(key)
    except TypeError:  # an unhashable value: the constructor's own error
        msg = None
    if msg is None:
        msg = common_pb2.SearchParams(ef_search=ef_search, nprobe=nprobe, shortlist_k=shortlist_k, k_factor=k_factor)
        if len(_PARAMS_PB) < 1024:
            _PARAMS_PB[key] = msg  # (reached with hashable values only: the constructor refuses the others)
    return msg


def search_head(
    collection: str,
    space: str,
    k: int,
    with_payload: bool,
    ef_search: int | None,
    nprobe: int | None,
    shortlist_k: int | None,
    k_factor: int | None,
) -> bytes:
    """A SearchRequest's serialized fields but its queries (field 3), one per distinct (typed) request
    shape. A value a field refuses raises as the message's constructor does (TypeError, ValueError)."""
    key = (
        type(collection), collection, type(space), space, type(k), k, type(with_payload), with_payload,
        type(ef_search), ef_search, type(nprobe), nprobe, type(shortlist_k), shortlist_k, type(k_factor), k_factor,
    )  # fmt: skip
    try:
        head = _SEARCH_HEADS.get(key)
    except TypeError:  # an unhashable value: the constructor's own error
        head = None
    if head is None:
        params = search_params_pb(ef_search, nprobe, shortlist_k, k_factor)
        head = points_pb2.SearchRequest(
            collection=collection, query_space=space, k=k, with_payload=with_payload, params=params
        ).SerializeToString()
        if len(_SEARCH_HEADS) < 1024:
            _SEARCH_HEADS[key] = head  # (hashable values only: the constructor refuses the others)
    return head


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def search_request_bytes(head: bytes, x: npt.NDArray[np.float32]) -> bytes:
    """``head`` (:func:`search_head`) followed by field 3, ``queries = Vectors(data=x, dim=d)``: the
    serialized SearchRequest. x: (nq, d) C-contiguous little-endian float32."""
    n, d = x.nbytes, x.shape[1]
    size = _varint(n)
    dim = b"\x10" + _varint(d)  # Vectors.dim, field 2, varint
    return b"".join((head, b"\x1a", _varint(1 + len(size) + n + len(dim)), b"\x0a", size, x.data, dim))


#: A JSON payload as the client returns it.
Payload = dict[str, Any]
#: Payloads as the client takes them: one per point, a mapping, JSON text or None (keep).
PayloadArg = Sequence[Mapping[str, Any] | str | None] | None


def as_matrix(x: npt.ArrayLike, what: str) -> npt.NDArray[Any]:
    """``x`` as an array of shape (n, d) without copying (dtype is converted per batch)."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise InvalidArgument(f"{what} must have shape (n, d), got shape {arr.shape}")
    return arr


def pack_vectors(x: npt.NDArray[Any]) -> common_pb2.Vectors:
    """Packs x, shape (n, d), as n*d little-endian float32 values."""
    x = np.ascontiguousarray(x, dtype="<f4")
    return common_pb2.Vectors(data=x.tobytes(), dim=x.shape[1])


def unpack_vectors(msg: common_pb2.Vectors) -> npt.NDArray[np.float32]:
    """The (writable, native float32) array of shape (n, dim) of a Vectors message."""
    return np.frombuffer(msg.data, dtype="<f4").astype(np.float32).reshape(-1, max(msg.dim, 1))


def encode_payloads(payloads: PayloadArg, n: int) -> list[str]:
    """JSON text per point: a mapping is dumped, a str kept as is, ``None`` -> ``""`` (keep)."""
    if payloads is None:
        return []
    if len(payloads) != n:
        raise InvalidArgument(f"got {len(payloads)} payloads for {n} ids")
    return [p if isinstance(p, str) else "" if p is None else json.dumps(p) for p in payloads]


def decode_payload(text: str) -> Payload | None:
    """The decoded JSON payload, or ``None`` for an empty string (no payload)."""
    if not text:
        return None
    value: Payload = json.loads(text)
    return value


def upsert_requests(
    collection: str,
    ids: Sequence[str],
    vectors: npt.ArrayLike,
    *,
    space: str,
    payloads: PayloadArg,
    batch_size: int,
    progress: bool,
) -> Iterator[points_pb2.UpsertRequest]:
    """Checks the arguments now, then returns an iterator of one request per batch of rows.

    vectors : shape (n, d), any float dtype (converted to float32 per batch).
    """
    xb = as_matrix(vectors, "vectors")
    n = xb.shape[0]
    if len(ids) != n:
        raise InvalidArgument(f"got {len(ids)} ids for {n} vectors")
    if batch_size < 1:
        raise InvalidArgument(f"batch_size must be >= 1, got {batch_size}")
    texts = encode_payloads(payloads, n)
    return _batches(collection, ids, xb, space, texts, batch_size, progress)


def _batches(
    collection: str,
    ids: Sequence[str],
    xb: npt.NDArray[Any],
    space: str,
    texts: list[str],
    batch_size: int,
    progress: bool,
) -> Iterator[points_pb2.UpsertRequest]:
    n = xb.shape[0]
    with tqdm(total=n, unit="vec", disable=not progress, desc=collection) as bar:
        for i0 in range(0, n, batch_size):
            i1 = min(n, i0 + batch_size)
            yield points_pb2.UpsertRequest(
                collection=collection,
                space=space,
                ids=list(ids[i0:i1]),
                vectors=pack_vectors(xb[i0:i1]),
                payloads=texts[i0:i1],
            )
            bar.update(i1 - i0)
