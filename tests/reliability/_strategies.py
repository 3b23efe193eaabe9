"""Hypothesis strategies for fuzzing: well-typed messages with odd values, and bytes that are not.

:func:`message` builds any request message from its descriptor, field by field:
names drawn from the server's real names and from odd ones (empty, 20 KB, path
traversal, NUL, non-ASCII), ids and JSON payloads/configs with odd shapes (5,000
nested brackets, NaN, 1e999, lone surrogates, 70 KB), integers at their type's
boundaries, floats that are NaN, infinite or 3e38, enums outside their range,
and ``Vectors`` whose bytes hold NaN/Inf/3e38 or do not match ``dim``.
:func:`request_bytes` turns one into bytes, or mangles it: truncated, garbage
appended, invalid UTF-8 in a string field; :func:`raw_bytes` is plain random bytes.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

#: names the fuzz server really has (see test_fuzz.py), so that requests reach past the lookups
REAL_NAMES = ["old@1", "new@2", "l2@1", "gallery", "hnsw", "ivf", "t1", "snap1", "fuzz-new"]
ODD_NAMES = [
    "",
    " ",
    "x" * 300,
    "n" * 20_000,
    "../../../../tmp/escape",
    "/tmp/escape",
    "..",
    ".",
    "a/b",
    ".hidden",
    "nul\x00byte",
    "名前@1",
    "emoji😀",
    "with space",
    "@",
    "new@",
    "\n",
    "%s%n",
]
ODD_JSON = [
    "",
    "{}",
    "[]",
    "null",
    '"text"',
    "1e999",
    "{",
    '{"a": 1}',
    '{"x": NaN}',
    '{"x": Infinity}',
    '{"x": -Infinity}',
    '{"x": 1e999}',
    '{"a": "\\ud800"}',
    '{"\\udfff": 1}',
    "[" * 5000 + "]" * 5000,
    '{"a":' * 2000 + "1" + "}" * 2000,
    '{"epochs": 10000000}',
    '{"epochs": -1}',
    '{"epochs": 1e308}',
    '{"lr": NaN}',
    '{"hidden": 100000000, "epochs": 1}',
    '{"batch_size": 0}',
    '{"a": "' + "x" * 70_000 + '"}',
    json.dumps({"k" * 1000: list(range(1000))}),
]
ODD_FLOATS = [float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 0.0, -0.0, 1e-45, 1.0, 2.0]
UINT_EDGES = [0, 1, 2, 4, 8, 12, 16, 24, 64, 1000, 2**16, 2**31 - 1, 2**31, 2**32 - 1]
INT_EDGES = [0, 1, -1, 2, 8, 2**31 - 1, -(2**31)]
LIMITS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
NAME_FIELDS = {
    "name",
    "collection",
    "home_space",
    "space",
    "query_space",
    "source_space",
    "target_space",
    "transform",
    "basis_transform",
    "shadow",
    "service",
    "chain",
    "spaces",
    "file_containing_symbol",
    "list_services",
    "filename",
}


def long_text() -> st.SearchStrategy[str]:
    return st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "😀", "[", "\x00"]), st.integers(100, 30_000))


def names() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(REAL_NAMES), st.sampled_from(REAL_NAMES), st.sampled_from(ODD_NAMES), st.text(max_size=20)
    )


def ids() -> st.SearchStrategy[str]:
    return st.one_of(
        st.builds(lambda i: f"p{i}", st.integers(0, 300)), st.sampled_from(ODD_NAMES), st.text(max_size=300)
    )


def json_texts() -> st.SearchStrategy[str]:
    values = st.recursive(
        st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=10),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
        max_leaves=20,
    )
    return st.one_of(
        st.sampled_from(ODD_JSON), values.map(lambda v: json.dumps(v, allow_nan=True)), st.text(max_size=40)
    )


def packed_floats(n: int, draw: Any) -> bytes:
    kind = draw(st.sampled_from(["normal", "normal", "odd", "zeros"]))
    if kind == "normal":
        x = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(n)
    elif kind == "zeros":
        x = np.zeros(n)
    else:
        x = np.array(draw(st.lists(st.sampled_from(ODD_FLOATS), min_size=n, max_size=n)), dtype=np.float64)
    return np.asarray(x, dtype="<f4").tobytes()


@st.composite
def vectors_message(draw: Any, cls: Any) -> Any:
    """A Vectors message: plausible dims, n rows of normal/NaN/Inf/3e38/zero values, sometimes
    with bytes that do not match dim (cut, extended, or dim 0 / 2**32-1)."""
    dim = draw(st.sampled_from([0, 1, 7, 8, 12, 16, 24, 48, 2**31, 2**32 - 1]))
    n = draw(st.integers(0, 6))
    data = packed_floats(n * min(dim, 64), draw)
    mangle = draw(st.sampled_from(["none", "none", "none", "cut", "extend", "random"]))
    if mangle == "cut" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mangle == "extend":
        data += draw(st.binary(min_size=1, max_size=9))
    elif mangle == "random":
        data = draw(st.binary(max_size=200))
    return cls(data=data, dim=dim)


def scalar(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = f.type
    if t == FieldDescriptor.TYPE_STRING:
        if f.name in NAME_FIELDS:
            return names()
        if f.name in ("ids", "id", "relevant_ids"):
            return ids()
        if "json" in f.name or f.name in ("payloads", "payload"):
            return json_texts()
        return st.one_of(st.text(max_size=30), st.sampled_from(ODD_NAMES), long_text())
    if t == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=300), st.builds(lambda n: b"\x00" * n, st.integers(0, 100_000)))
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in f.enum_type.values]), st.integers(-5, 50))
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        width = 32 if t == FieldDescriptor.TYPE_FLOAT else 64
        return st.one_of(st.sampled_from(ODD_FLOATS), st.floats(width=width))
    lo, hi = LIMITS[t]
    edges = [v for v in (UINT_EDGES + INT_EDGES + [lo, hi]) if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi), st.integers(0, 64))


@st.composite
def message(draw: Any, desc: Descriptor, depth: int = 0) -> Any:
    """A message of type ``desc`` with a random subset of its fields set to odd values."""
    cls = message_factory.GetMessageClass(desc)
    if desc.full_name == "interlingua.v1.Vectors" and draw(st.booleans()):
        return draw(vectors_message(cls))
    msg = cls()
    for f in desc.fields:
        if not draw(st.integers(0, 9)) < 6:  # ~60% of fields set
            continue
        repeated = f.is_repeated
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 3:
                continue
            if f.message_type.GetOptions().map_entry:
                key_f, val_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
                target = getattr(msg, f.name)
                for k, v in draw(st.lists(st.tuples(scalar(key_f), scalar(val_f)), max_size=3)):
                    if val_f.type == FieldDescriptor.TYPE_MESSAGE:
                        continue
                    target[k] = v
                continue
            if repeated:
                for sub in draw(st.lists(message(f.message_type, depth + 1), max_size=3)):
                    getattr(msg, f.name).add().CopyFrom(sub)
            else:
                getattr(msg, f.name).CopyFrom(draw(message(f.message_type, depth + 1)))
        elif repeated:
            size = draw(st.sampled_from([0, 1, 2, 3, 5, 17]))
            getattr(msg, f.name).extend(draw(st.lists(scalar(f), min_size=size, max_size=size)))
        else:
            setattr(msg, f.name, draw(scalar(f)))
    return msg


def varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def invalid_utf8_field(desc: Descriptor, draw: Any) -> bytes:
    """A length-delimited field holding invalid UTF-8, on a string field of ``desc`` (field 1 if none)."""
    strings = [f.number for f in desc.fields if f.type == FieldDescriptor.TYPE_STRING] or [1]
    number = draw(st.sampled_from(strings))
    bad = draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"a\xed\xa0\x80b", b"\xfe\xfe\xff", b"ok\x80"]))
    return varint(number << 3 | 2) + varint(len(bad)) + bad


@st.composite
def request_bytes(draw: Any, desc: Descriptor) -> bytes:
    """A typed message serialized, or mangled: truncated, garbage appended, invalid UTF-8 inserted."""
    data = draw(message(desc)).SerializeToString()
    how = draw(st.sampled_from(["typed", "typed", "typed", "typed", "utf8", "utf8", "cut", "append"]))
    if how == "utf8":
        field = invalid_utf8_field(desc, draw)
        return field + data if draw(st.booleans()) else data + field
    if how == "cut" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "append":
        return data + draw(st.binary(min_size=1, max_size=32))
    return bytes(data)


def raw_bytes() -> st.SearchStrategy[bytes]:
    edge = [b"\xff" * 8, b"\x0a\xff\xff\xff\xff\x0f", b"\x08" + b"\xff" * 10, struct.pack("<I", 0xFFFFFFFF), b"\x00"]
    return st.one_of(st.binary(max_size=512), st.sampled_from(edge))
