"""What an Interlingua collection is in Milvus: names, fields, the index and its search parameters.

One Milvus collection per Interlingua collection, named by :func:`milvus_name` (Milvus names allow
``[A-Za-z0-9_]`` only: the name is sanitized and a hash of the exact name appended, so two names that
sanitize alike stay apart). Its fields:

- ``pk``: INT64 primary key, handed out densely by the front-end (``milvus_table.py``, "Keys"; a
  collection created before it has ``id`` as its primary key, and is served as it is);
- ``id``: VARCHAR, the point id (at most ``MAX_ID_CHARS``); reads, deletes and results use it;
- ``payload``: VARCHAR, nullable: the JSON payload as the client sent it (at most 65,535 bytes);
- ``seq``: INT64, the sequence number of the point's last write (``GetPoints``' ``sequence``);
- ``spaces``: ARRAY of VARCHAR: the vector fields the point has a vector in; only in a collection with
  more than one vector field for spaces (with one, every point has its home vector: the front-end reads
  ``spaces`` as [home field] and writes none, ``MilvusTable.has_spaces``);
- one FLOAT_VECTOR field per space (:func:`field_name`), for the home space and the other spaces
  registered when the collection was created, oldest first, ``MAX_VECTOR_FIELDS`` in all with the
  prefix and basis fields below (Milvus' default cap on vector fields per collection). Milvus Lite
  3.2.2 answers ``AddCollectionField`` with UNIMPLEMENTED, so a space registered later, or one past
  the cap, cannot get a field: writes in it are refused (FAILED_PRECONDITION). The vector fields are
  not nullable: Milvus Lite 3.2.2 accepts nullable vector fields but returns a null as zeros in
  searches (scoring 0, filling results) and refuses an upsert batch whose nullable vector column is
  all null. A point without a vector in a space holds zeros there and ``spaces`` leaves the field
  out; searches of a collection with more than one space filter on ``array_contains(spaces, <home
  field>)``, and run without a filter with the home space alone.

The home field carries the collection's index (:func:`parse_index`: Flat -> FLAT, HNSW<M> ->
HNSW with efConstruction, IVF<n>,Flat -> IVF_FLAT, IVF<n>,SQ8 -> IVF_SQ8); other fields a FLAT
index (Milvus loads a collection only when every vector field is indexed). A collection created with
Matryoshka ``prefix_dims = m`` has one more vector field (:func:`prefix_field`, so one space less): the
first m dimensions of each home vector, re-normalized for cosine and ip as the embedded backend's
index holds them (:func:`~..transforms.matryoshka.shrink`); it carries the collection's index and the
home field a FLAT one, searched for ``shortlist_k`` candidates whose full vectors come back with the
hits and are reranked in the front-end (``funnel.rerank``, the embedded backend's stages). A collection
created with a ``basis_transform`` has one more vector field again (:func:`basis_field`): each home
vector mapped by the basis (its doc side, re-normalized for cosine), as the embedded backend's index
holds it; it carries the index (a prefix collection's prefix field then holds its prefix, and the rerank
reads it), the home field keeps the vectors as written (``GetPoints``) with a FLAT index. Metrics: cosine
(vectors normalized by the engine) and ip -> IP, l2 -> L2 (squared, as FAISS): scores equal the
embedded backend's. Covered by ``tests/test_backends.py`` and ``tests/test_milvus_basis.py``.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import FailedPrecondition, InvalidArgument
from ..index_spec import DEFAULT_EF_SEARCH, DEFAULT_NPROBE, MAX_EF_CONSTRUCTION, MAX_HNSW_M

__all__ = [
    "INSTALL_HINT",
    "MAX_PAYLOAD_BYTES",
    "MAX_VECTOR_FIELDS",
    "METRIC",
    "SUPPORTED",
    "MilvusIndex",
    "basis_field",
    "check_uri",
    "field_name",
    "id_filter",
    "milvus_name",
    "parse_index",
    "prefix_field",
    "require_pymilvus",
]

INSTALL_HINT = "the milvus backend needs pymilvus and milvus-lite: pip install 'interlingua[milvus]'"
SUPPORTED = "Flat, HNSW<M> (M 2..256, with ef_construction), IVF<nlist>,Flat and IVF<nlist>,SQ8"
METRIC = {"cosine": "IP", "ip": "IP", "l2": "L2"}  #: Interlingua metric -> Milvus metric_type
MAX_PAYLOAD_BYTES = 65535  #: Milvus VARCHAR's longest value
MAX_ID_CHARS = 512
#: vector fields of a collection: Milvus' default ``proxy.maxVectorFieldNum`` (a cluster refuses more)
MAX_VECTOR_FIELDS = 4
DEFAULT_EF_CONSTRUCTION = 40  #: FAISS's default, so both backends build the same graph by default

_HNSW = re.compile(r"HNSW([0-9]+)")  #: ASCII digits, matched whole (as index_spec.py)
_IVF = re.compile(r"IVF([0-9]+),(Flat|SQ8)")


def require_pymilvus() -> ModuleType:
    """The pymilvus module, imported on first use; FAILED_PRECONDITION with the install hint without it."""
    try:
        return importlib.import_module("pymilvus")
    except ImportError:
        raise FailedPrecondition(INSTALL_HINT) from None


def check_uri(uri: str, new: bool = False) -> str:
    """A Milvus address (``http://``, ``https://``, ``tcp://``) as given, or a Milvus Lite file (``*.db``)
    as an absolute path (relative to the server's working directory). INVALID_ARGUMENT for anything else,
    and with ``new`` (a collection created or moved there) for a file whose folder does not exist."""
    if re.match(r"^(https?|tcp)://[^\s/]+(:\d+)?/?$", uri):
        return uri
    if uri.endswith(".db") and "://" not in uri:
        try:
            path = Path(uri).expanduser().resolve()
        except (ValueError, RuntimeError, OSError) as e:  # a NUL byte, ~user with no home, a path too long
            raise InvalidArgument(f"milvus uri {uri!r} is not a usable path for a Milvus Lite file: {e}") from None
        if new and not path.parent.is_dir():
            raise InvalidArgument(
                f"milvus uri {uri!r}: the folder {str(path.parent)!r} of the Milvus Lite file does not exist"
            )
        return str(path)
    raise InvalidArgument(
        f"milvus uri {uri!r} is neither a Milvus address (http://host:19530) nor a Milvus Lite file (*.db)"
    )


def milvus_name(name: str) -> str:
    """The Milvus collection of Interlingua collection ``name``: ``il_<sanitized>_<hash>``."""
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"il_{re.sub(r'[^A-Za-z0-9_]', '_', name)[:100]}_{digest}"


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def id_filter(ids: Sequence[str]) -> str:
    """The expression ``id in ["...", ...]`` selecting ``ids``, each a double-quoted literal with ``\\``,
    ``"``, newline, carriage return and tab escaped (the escapes Milvus' grammar and Milvus Lite's both
    read). pymilvus' own ``ids=`` quotes nothing: an id holding ``'`` or ``\\`` broke the query, and one
    like ``x' or id != '`` selected other points."""
    quoted = ('"' + "".join(_ESCAPES.get(ch, ch) for ch in pid) + '"' for pid in ids)
    return f"id in [{', '.join(quoted)}]"


def field_name(space: str) -> str:
    """The vector field of ``space``: ``v_`` and a hash of its name (space names allow ``@``, ``.``, ``-``)."""
    return "v_" + hashlib.sha256(space.encode()).hexdigest()[:16]


def basis_field(space: str) -> str:
    """The basis field of a ``basis_transform`` collection whose home space is ``space``: its home vectors mapped."""
    return "b_" + hashlib.sha256(space.encode()).hexdigest()[:16]


def prefix_field(space: str) -> str:
    """The Matryoshka prefix field of a ``prefix_dims`` collection whose home space is ``space``."""
    return "p_" + hashlib.sha256(space.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class MilvusIndex:
    """A collection's index in Milvus: its type and build parameters, and how searches set theirs."""

    spec: str  #: the Interlingua spec it maps (as stored)
    index_type: str  #: FLAT, HNSW, IVF_FLAT, IVF_SQ8
    params: dict[str, int] = field(default_factory=dict)  #: build parameters
    nlist: int = 0

    @property
    def is_hnsw(self) -> bool:
        return self.index_type == "HNSW"

    @property
    def exact(self) -> bool:
        return self.index_type == "FLAT"

    def build_params(self) -> dict[str, Any]:
        """The index's build parameters as ``add_index`` takes them: flat (as pymilvus 3.0.2 sends them, and
        Milvus reads them) and again under ``params`` (the legacy JSON form, the only one Milvus Lite
        3.2.2 reads: without it Milvus Lite built every HNSW and IVF index with its defaults, nlist 128
        where IVF8 was asked, and a search with nprobe 8 lost a quarter of its recall; Milvus accepts it too)."""
        return {**self.params, "params": dict(self.params)} if self.params else {}

    def check_params(self, ef_search: int | None, nprobe: int | None, k_factor: int | None) -> None:
        """The search parameters' checks of the embedded backend, for this index."""
        if ef_search is not None:
            if not self.is_hnsw:
                raise InvalidArgument(f"ef_search applies to HNSW indexes; this collection's index is {self.spec!r}")
            if not 1 <= ef_search <= 32768:
                raise InvalidArgument(f"ef_search is {ef_search}; it must be between 1 and 32768")
        if nprobe is not None:
            if not self.nlist:
                raise InvalidArgument(f"nprobe applies to IVF indexes; this collection's index is {self.spec!r}")
            if not 1 <= nprobe <= self.nlist:
                raise InvalidArgument(f"nprobe is {nprobe}; it must be between 1 and nlist={self.nlist}")
        if k_factor is not None:
            raise InvalidArgument(
                f"k_factor applies to indexes with a refine stage; this collection's index is {self.spec!r} (milvus)"
            )

    def search_params(self, metric: str, k: int, ef_search: int | None, nprobe: int | None) -> dict[str, Any]:
        """Milvus search parameters: ``ef`` (at least k, as Milvus requires; FAISS searches max(ef, k)
        too), ``nprobe`` (capped at nlist); the embedded backend's defaults when unset."""
        params: dict[str, int] = {}
        if self.is_hnsw:
            params["ef"] = max(ef_search or DEFAULT_EF_SEARCH, k)
        elif self.nlist:
            params["nprobe"] = min(nprobe or DEFAULT_NPROBE, self.nlist)
        return {"metric_type": METRIC[metric], "params": params}


def parse_index(spec: str, ef_construction: int) -> MilvusIndex:
    """The Milvus index of a checked Interlingua ``spec``; INVALID_ARGUMENT naming the supported specs."""
    s = spec.strip()
    if ef_construction and not _HNSW.fullmatch(s):
        raise InvalidArgument(f"ef_construction applies to HNSW indexes; index spec is {spec!r}")
    if s == "Flat":
        return MilvusIndex(s, "FLAT")
    if m := _HNSW.fullmatch(s):
        M = int(m.group(1))
        if not 2 <= M <= MAX_HNSW_M:
            raise InvalidArgument(f"HNSW M is {M}; it must be between 2 and {MAX_HNSW_M}")
        efc = ef_construction or DEFAULT_EF_CONSTRUCTION
        if efc > MAX_EF_CONSTRUCTION:
            raise InvalidArgument(f"ef_construction is {efc}; it must be at most {MAX_EF_CONSTRUCTION}")
        return MilvusIndex(s, "HNSW", {"M": M, "efConstruction": efc})
    if m := _IVF.fullmatch(s):
        nlist = int(m.group(1))
        if not 1 <= nlist <= 65536:
            raise InvalidArgument(f"IVF nlist is {nlist}; it must be between 1 and 65536")
        kind = "IVF_FLAT" if m.group(2) == "Flat" else "IVF_SQ8"
        return MilvusIndex(s, kind, {"nlist": nlist}, nlist=nlist)
    raise InvalidArgument(f"index spec {spec!r} is not supported by the milvus backend; it supports {SUPPORTED}")
