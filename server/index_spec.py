"""Index specs: the FAISS factory strings a collection may use, checked before anything is built.

A spec is parsed by our own grammar first, so that no parameter FAISS would crash on ever
reaches ``faiss.index_factory``; anything outside it is INVALID_ARGUMENT, with the spec and
what is wrong::

    spec   := [pre ","]* main ["," refine]         at most 8 components, 128 characters
    pre    := "PCA"["W"]["R"]k | "OPQ"m["_"k] | "RR"k                     1 <= k <= d
    main   := "Flat" | pq | fs | sq | "HNSW"M[("_"|",")store] | "IVF"nlist["_HNSW"M]","(store | fs)
    store  := "Flat" | pq | sq
    pq     := "PQ"m["x"nbits]                     m divides its input dim, 4 <= nbits <= 8
    fs     := "PQ"m"x4fs"                         fast-scan PQ (4-bit codes, SIMD distance tables)
    sq     := "SQ4" | "SQ6" | "SQ8" | "SQfp16"
    refine := "RFlat" | "Refine(" ("Flat" | "SQfp16" | "SQ8") ")"   re-ranks k * k_factor candidates

HNSW M is 2..256 everywhere, IVF coarse quantizers included (M = 0 or 1 crash FAISS's graph
build: SIGSEGV or abort, and every restart crashed again); PQ nbits is 4..8 (below 3 every
search threw; polysemous training, which we skip, ran for minutes at 10); NSG is refused (its
``add`` runs once, so the second merge fails), and so is L2norm (FAISS cannot clone it, and
every merge clones). Each quantizer sets a minimum of training points
(:attr:`IndexSpec.min_train_points`): nlist for IVF k-means, 2**nbits for PQ (256 for OPQ), k
for PCA; below it FAISS throws on every attempt. Creation caps nlist and an estimate of the
index's fixed memory (quantizer, codebooks, matrices); the estimate needs no index: a probe
index with one IVF list stands in for the real one (``IVF5000000,Flat`` once cost +780 MB on
every GetCollection, which instantiated it to read a code size). A refine stage wraps the whole
index (``IndexRefine``: its search parameters carry the base index's, with their ``IDSelector``,
and ``k_factor``); a flat fast-scan PQ, like a flat PQ, takes no search parameters or selector, so
its dead labels are dropped on the host (:attr:`IndexSpec.takes_params`); FAISS has no HNSW over
fast-scan codes (its factory throws). :func:`search_params` builds the parameters of any accepted
index from the index itself, an HNSW's efSearch at least the labels asked of it. A spec is ASCII
(``IVF\\u0663,Flat`` passed Python's ``\\d`` as IVF3, then failed every training). Float16 codes
bound the vectors an index takes (:meth:`IndexSpec.check_vectors`; larger ones were encoded as
inf). ``tests/test_index_safety.py`` builds, trains at the minimum, adds to twice and searches
every form of the grammar at its boundary values in subprocesses, none of which may crash;
``tests/test_index_robustness.py`` covers the ASCII rule, the train_min_points cap, the float16
bounds and the efSearch floor.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from .device import inner_index
from .errors import InvalidArgument

__all__ = [
    "DEFAULT_EF_SEARCH",
    "DEFAULT_K_FACTOR",
    "DEFAULT_NPROBE",
    "FAISS_METRIC",
    "FP16_MAX",
    "MAX_EF_CONSTRUCTION",
    "MAX_HNSW_M",
    "MAX_K_FACTOR",
    "MAX_TRAIN_MIN_POINTS",
    "IndexSpec",
    "SearchDefaults",
    "graph_codes",
    "graph_k_limit",
    "search_params",
    "unwrap",
]

FAISS_METRIC = {"cosine": faiss.METRIC_INNER_PRODUCT, "ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
MAX_EF_CONSTRUCTION = 4096  #: largest HNSW efConstruction a collection may ask for
MAX_HNSW_M = 256  #: largest HNSW M (level-0 links cost 8*M bytes per vector)
MIN_PQ_NBITS = 4  #: FAISS's PQ distance tables need ksub % 8 == 0 (PQ4x1 threw at every search)
MAX_PQ_NBITS = 8
MAX_SPEC_CHARS = 128
MAX_COMPONENTS = 8
PRECOMPUTED_TABLE_MAX = 2 << 30  #: FAISS's own cap on the IVFPQ precomputed table (bytes)
DEFAULT_EF_SEARCH = 64  #: HNSW efSearch when neither the request nor the collection sets one
DEFAULT_NPROBE = 16  #: IVF nprobe when neither the request nor the collection sets one (capped at nlist)
DEFAULT_K_FACTOR = 4  #: refine stage: candidates re-ranked per result when the collection sets none
MAX_K_FACTOR = 256  #: the largest k_factor a search may set
#: largest train_min_points: more points than one collection holds (and within SQLite's INTEGER, where
#: 2**63 and above failed the insert with INTERNAL)
MAX_TRAIN_MIN_POINTS = 1 << 32
FP16_MAX = 65504.0  #: largest finite float16: SQfp16 codes of larger components are inf (searches lost hits)
SUPPORTED = (
    "Flat, PQm[xnbits], PQmx4fs, SQ4|SQ6|SQ8|SQfp16, HNSWM[_store], IVFn[_HNSWM],store|PQmx4fs"
    " (store: Flat, PQ or SQ), after any of PCA[W][R]k, OPQm[_k], RRk, then optionally RFlat or Refine(Flat|SQfp16|SQ8)"
)

TRAIN_RULE = "nlist for IVF, 2**nbits for PQ, 256 for OPQ, k for PCAk"  #: minimum training points

# ASCII only: Python's \d and \w also match other scripts' digits and letters, which int() reads but
# FAISS's factory does not ('IVF\u0663,Flat' passed as IVF3, then every training of it failed)
_PRE = re.compile(r"PCAW?R?([0-9]+)|OPQ([0-9]+)(?:_([0-9]+))?|RR([0-9]+)", re.ASCII)
_PQ = re.compile(r"PQ([0-9]+)(?:x([0-9]+))?", re.ASCII)
_FS = re.compile(r"PQ([0-9]+)x([0-9]+)fs", re.ASCII)
_REFINE = re.compile(r"RFlat|Refine\(([A-Za-z0-9_]+)\)", re.ASCII)
_REFINE_STORES = ("Flat", "SQfp16", "SQ8")
_SQ = ("SQ4", "SQ6", "SQ8", "SQfp16")
_HNSW = re.compile(r"HNSW([0-9]+)(?:_([A-Za-z0-9_]+))?", re.ASCII)
_IVF = re.compile(r"IVF([0-9]+)(?:_HNSW([0-9]+))?", re.ASCII)
_PQ_ANY = re.compile(r"PQ[0-9]", re.ASCII)


def _show(spec: str) -> str:
    return repr(spec if len(spec) <= 64 else spec[:60] + "...")


@dataclass
class _Walk:
    """What the grammar walk learns of a spec: the probe spec (IVF lists -> 1), needs and costs."""

    spec: str
    d: int  #: dimension entering the next component
    probe: list[str]
    min_train: int = 1
    overhead: int = 0  #: bytes of fixed structures (matrices, codebooks, centroids, lists)
    nlist: int = 0
    graph_m: int = 0  #: M of an HNSW main index (0: none)
    fast_scan: bool = False
    refine: str = ""  #: storage of the refine stage ("": none)
    #: bound on the norm of a pre-transform's output over that of its input (a PCA subtracts a mean, at
    #: most doubling it; rotations keep it; whitening has none known before training: inf); 0: no pre-transform
    growth: float = 0.0
    fp16: str = ""  #: float16 codes of the main index: "vectors", "residuals" (IVF) or "" (none)

    def fail(self, what: str) -> InvalidArgument:
        return InvalidArgument(f"index spec {_show(self.spec)}: {what}")

    def hnsw_m(self, text: str, where: str) -> int:
        m = int(text)
        if not 2 <= m <= MAX_HNSW_M:
            raise self.fail(f"HNSW M is {m} in {where}; it must be between 2 and {MAX_HNSW_M}")
        return m

    def pre(self, tok: str) -> None:
        g = _PRE.fullmatch(tok)
        if g is None:
            raise self.fail(f"component {tok!r} is not a pre-transform")
        d_in = self.d
        self.growth = self.growth or 1.0
        if tok.startswith("PCA"):
            self.growth *= math.inf if tok.startswith("PCAW") else 2.0
            k = self._dim(int(g.group(1)), tok)
            self.min_train = max(self.min_train, k)
            self.overhead += 8 * d_in * d_in + 4 * d_in * k
        elif tok.startswith("OPQ"):
            m = int(g.group(2))
            k = self._dim(int(g.group(3) or d_in), tok)
            if m < 1 or k % m:
                raise self.fail(f"{tok}: OPQ m={m} must divide its output dimension {k}")
            self.min_train = max(self.min_train, 256)  # OPQ trains an 8-bit PQ inside
            self.overhead += 4 * d_in * k + 4 * 256 * k
        else:
            k = self._dim(int(g.group(4)), tok)
            self.overhead += 4 * d_in * k
        self.d = k
        self.probe.append(tok)

    def _dim(self, k: int, tok: str) -> int:
        if not 1 <= k <= self.d:
            raise self.fail(f"{tok}: output dimension {k} must be between 1 and its input dimension {self.d}")
        return k

    def store(self, tok: str, where: str, ivf: bool, fast_scan: bool = False) -> None:
        """Flat, PQ or SQ codes of the vectors (of an IVF's residuals when ``ivf``); fast-scan PQ
        where ``fast_scan`` (IVF lists and flat indexes)."""
        if tok == "Flat" or tok in _SQ:
            self.overhead += 8 * self.d
            if tok == "SQfp16":
                self.fp16 = "residuals" if ivf else "vectors"  # FAISS's IVF scalar quantizers encode residuals
            return
        if (f := _FS.fullmatch(tok)) is not None:
            if not fast_scan:
                raise self.fail(
                    f"{where} stores {tok!r}: fast-scan PQ is for IVF lists and flat indexes (FAISS has no HNSW on it)"
                )
            m, nbits = int(f.group(1)), int(f.group(2))
            if nbits != 4:
                raise self.fail(f"{tok}: fast-scan PQ needs 4-bit codes (PQ{m}x4fs)")
            if m < 1 or self.d % m:
                raise self.fail(f"{tok}: PQ m={m} must divide the dimension it encodes, {self.d}")
            self.min_train = max(self.min_train, 16)
            self.overhead += 4 * self.d * 16
            self.fast_scan = True
            return
        g = _PQ.fullmatch(tok)
        if g is None:
            raise self.fail(f"{where} stores {tok!r}; use Flat, PQm[xnbits] or one of {', '.join(_SQ)}")
        m, nbits = int(g.group(1)), int(g.group(2) or 8)
        if m < 1 or self.d % m:
            raise self.fail(f"{tok}: PQ m={m} must divide the dimension it encodes, {self.d}")
        if not MIN_PQ_NBITS <= nbits <= MAX_PQ_NBITS:
            raise self.fail(f"{tok}: PQ nbits is {nbits}; it must be between {MIN_PQ_NBITS} and {MAX_PQ_NBITS}")
        self.min_train = max(self.min_train, 2**nbits)
        self.overhead += 4 * self.d * 2**nbits
        if ivf:  # residual tables, precomputed for L2 while FAISS's own cap allows
            self.overhead += min(self.nlist * m * 2**nbits * 4, PRECOMPUTED_TABLE_MAX)

    def main(self, toks: list[str]) -> None:
        tok, rest = toks[0], toks[1:]
        if len(rest) > 1:
            raise self.fail(f"unexpected {','.join(rest[1:])!r} after {','.join(toks[:2])!r}")
        if tok.startswith("NSG"):
            raise self.fail("NSG indexes are not supported: FAISS builds them once and cannot add vectors later")
        if (g := _HNSW.fullmatch(tok)) is not None:
            self.graph_m = self.hnsw_m(g.group(1), tok)
            if g.group(2) and rest:
                raise self.fail(f"{tok!r} already names its storage; {rest[0]!r} follows it")
            self.store(g.group(2) or (rest[0] if rest else "Flat"), tok, ivf=False)
            self.probe.append(",".join(toks))
            return
        if (g := _IVF.fullmatch(tok)) is not None:
            self.nlist = int(g.group(1))
            if self.nlist < 1:
                raise self.fail("IVF needs at least 1 list")
            if g.group(2):
                self.hnsw_m(g.group(2), f"the coarse quantizer of {tok}")
            if not rest:
                raise self.fail(f"{tok} needs a storage after it, e.g. {tok},Flat")
            self.min_train = max(self.min_train, self.nlist)
            self.overhead += self.nlist * (4 * self.d + 48 + (8 * int(g.group(2)) if g.group(2) else 0))
            self.store(rest[0], tok, ivf=True, fast_scan=True)
            self.probe.append(",".join(["IVF1" + (f"_HNSW{g.group(2)}" if g.group(2) else ""), rest[0]]))
            return
        if not (tok == "Flat" or tok in _SQ or _PQ.fullmatch(tok) or _FS.fullmatch(tok)):
            raise self.fail(f"component {tok!r} is not supported; supported: {SUPPORTED}")
        if rest:
            raise self.fail(f"unexpected {rest[0]!r} after {tok!r}")
        self.store(tok, "the index", ivf=False, fast_scan=True)
        self.probe.append(tok)


def _coarse_code_size(nlist: int) -> int:
    """Bytes of an IVF list number in a code (FAISS ``Level1Quantizer::coarse_code_size``)."""
    nbytes, nl = 0, nlist - 1
    while nl > 0:
        nbytes, nl = nbytes + 1, nl >> 8
    return nbytes


@dataclass(frozen=True)
class IndexSpec:
    """A FAISS factory string checked against a dimension and metric."""

    spec: str
    d: int
    metric: str
    needs_training: bool
    is_hnsw: bool
    nlist: int  #: IVF lists, 0 for non-IVF indexes
    default_train_min: int  #: points needed before training by default (0: no training needed)
    ef_construction: int = 0  #: HNSW efConstruction (0: FAISS's default, 40)
    min_train_points: int = 0  #: fewest training points every quantizer of the spec accepts (0: no training)
    bytes_per_vector: int = 0  #: FAISS code size of one vector (with the refine stage's; HNSW: its storage's)
    overhead_bytes: int = 0  #: estimate of the fixed structures: matrices, codebooks, centroids, lists
    #: False for a flat IndexPQ (or fast-scan PQ): FAISS refuses any SearchParameters and IDSelector
    #: there, so its dead labels are dropped on the host (every search of a ``PQ16`` collection threw before)
    takes_params: bool = True
    refine: str = ""  #: storage of the refine stage ("Flat", "SQfp16", "SQ8"; "": none)
    graph_m: int = 0  #: HNSW M of the main index (0: not HNSW)
    fast_scan: bool = False  #: the codes are fast-scan PQ
    #: largest |component| of a vector the index may hold (inf: any): float16 codes (SQfp16 storage,
    #: Refine(SQfp16)) hold up to :data:`FP16_MAX`, an IVF's residuals up to twice a component
    max_abs_component: float = math.inf
    #: largest L2 norm of a vector the index may hold (inf: any): float16 codes after a pre-transform,
    #: whose output norm is at most ``growth`` times its input's (see :meth:`check_vectors`)
    max_norm: float = math.inf

    @classmethod
    def parse(
        cls,
        spec: str,
        d: int,
        metric: str,
        ef_construction: int = 0,
        *,
        max_nlist: int | None = None,
        max_overhead_bytes: int | None = None,
    ) -> IndexSpec:
        """Checks ``spec`` for vectors of dimension d (no index of its real size is built).

        ``max_nlist`` and ``max_overhead_bytes`` cap new collections (None: no cap, as at recovery).
        Raises InvalidArgument naming the spec and what is wrong.
        """
        spec = spec.strip() or "Flat"
        if len(spec) > MAX_SPEC_CHARS:
            raise InvalidArgument(f"index spec {_show(spec)} is {len(spec)} characters; the limit is {MAX_SPEC_CHARS}")
        if not spec.isascii():  # FAISS's factory reads ASCII digits and names only
            at, c = next((i, c) for i, c in enumerate(spec) if not c.isascii())
            raise InvalidArgument(
                f"index spec {_show(spec)} holds {c!r} (U+{ord(c):04X}) at position {at}; index specs are ASCII"
                " (digits 0-9)"
            )
        if "IDMap" in spec or spec.startswith(("Refine", "RFlat")):
            raise InvalidArgument(
                f"index spec {_show(spec)}: IDMap wrappers are managed by the service, and a refine stage comes last"
                " (e.g. IVF1024,PQ32x4fs,RFlat)"
            )
        toks = spec.split(",")
        if len(toks) > MAX_COMPONENTS:
            raise InvalidArgument(f"index spec {_show(spec)} has {len(toks)} components; the limit is {MAX_COMPONENTS}")
        w = _Walk(spec, d, [])
        refine_tok = ""
        if len(toks) > 1 and (r := _REFINE.fullmatch(toks[-1])) is not None:
            refine_tok = toks.pop()
            w.refine = r.group(1) or "Flat"
            if w.refine not in _REFINE_STORES:
                raise w.fail(f"{refine_tok} refines with {w.refine!r}; use RFlat or Refine(Flat|SQfp16|SQ8)")
        for tok in toks:
            if _REFINE.fullmatch(tok):
                raise w.fail(f"{tok!r} is a refine stage: it may only come last, once")
        i = 0
        while i < len(toks) - 1 and _PRE.fullmatch(toks[i]):
            w.pre(toks[i])
            i += 1
        w.main(toks[i:])
        if refine_tok:
            w.probe.append(refine_tok)
        if max_nlist is not None and w.nlist > max_nlist:
            raise w.fail(f"{w.nlist} IVF lists exceed the cap of {max_nlist}")
        if max_overhead_bytes is not None and w.overhead > max_overhead_bytes:
            raise w.fail(
                f"its fixed structures need about {w.overhead / 2**20:.0f} MiB for d={d}"
                f" (quantizers, codebooks, matrices); the cap is {max_overhead_bytes / 2**20:.0f} MiB per collection"
            )
        probe = _probe(spec, ",".join(w.probe), d, metric)
        needs = not probe.is_trained
        inner = unwrap(probe)
        is_hnsw = isinstance(inner, faiss.IndexHNSW)
        # flat PQ and flat fast-scan PQ: FAISS refuses any SearchParameters (IVF fast scan takes them)
        takes_params = not isinstance(inner, faiss.IndexPQ | faiss.IndexFastScan)
        code = _code_size(probe, d) + (_coarse_code_size(w.nlist) if w.nlist else 0)
        if ef_construction and not is_hnsw:
            raise InvalidArgument(f"ef_construction applies to HNSW indexes; index spec {_show(spec)} is not one")
        if not 0 <= ef_construction <= MAX_EF_CONSTRUCTION:
            raise InvalidArgument(
                f"ef_construction is {ef_construction}; it must be at most {MAX_EF_CONSTRUCTION} (0: the default, 40)"
            )
        min_train = w.min_train if needs else 0
        max_abs, max_norm = _fp16_bounds(w)
        default_min = 0
        if needs:  # 39 points per list (FAISS's k-means warns below), 9984 with codes to train
            default_min = max(39 * w.nlist, 256, min_train)
            if _PQ_ANY.search(spec) or "SQ" in spec:
                default_min = max(default_min, 9984)
        return cls(
            spec,
            d,
            metric,
            needs,
            is_hnsw,
            w.nlist,
            default_min,
            ef_construction,
            min_train,
            code,
            w.overhead,
            takes_params,
            w.refine,
            w.graph_m,
            w.fast_scan,
            max_abs,
            max_norm,
        )

    @property
    def memory_per_vector(self) -> int:
        """Estimated bytes one more vector costs in memory: its codes (and refine copy), an IVF
        list entry's 8-byte id, an HNSW node's level-0 links (2*M int32) and level bookkeeping."""
        list_id = 8 - _coarse_code_size(self.nlist) if self.nlist else 0
        return self.bytes_per_vector + list_id + (8 * self.graph_m + 12 if self.graph_m else 0)

    def check_train_min(self, train_min_points: int) -> int:
        """The training threshold of a new collection: the default for 0, else ``train_min_points``
        if every quantizer of the spec can train on that many points (InvalidArgument otherwise)."""
        if not self.needs_training:
            return 0
        if not train_min_points:
            return self.default_train_min
        if train_min_points < self.min_train_points:
            raise InvalidArgument(
                f"train_min_points is {train_min_points}; index spec {_show(self.spec)} needs at least"
                f" {self.min_train_points} training points ({TRAIN_RULE})"
            )
        if train_min_points > MAX_TRAIN_MIN_POINTS:
            raise InvalidArgument(
                f"train_min_points is {train_min_points}; it must be at most {MAX_TRAIN_MIN_POINTS} (0: the default,"
                f" {self.default_train_min} for index spec {_show(self.spec)})"
            )
        return train_min_points

    def check_vectors(self, x: np.ndarray, *, what: str) -> None:
        """InvalidArgument when a row of x (shape (n, d), as the index receives it) holds a component or
        has a norm the index's float16 codes cannot hold (:attr:`max_abs_component`, :attr:`max_norm`):
        encoded as inf, such a vector made searches return inf or NaN scores and lose their hits.
        A whitening PCA before float16 codes has no bound known before training and is not checked."""
        if len(x) == 0 or (self.max_abs_component == math.inf and self.max_norm == math.inf):
            return
        big = max(float(x.max()), -float(x.min()))
        if big > self.max_abs_component:
            i, j = divmod(int(np.argmax(np.abs(x) > self.max_abs_component)), x.shape[1])
            codes = "float16 codes of IVF residuals" if self.max_abs_component < FP16_MAX else "float16 codes"
            raise InvalidArgument(
                f"{what}: vector {i} has component {float(x[i, j]):.7g} at dimension {j}; the limit is"
                f" {self.max_abs_component:g} for index spec {_show(self.spec)} (its {codes} hold at most {FP16_MAX:g})"
            )
        if big * math.sqrt(x.shape[1]) > self.max_norm:  # every norm is at most sqrt(d) * max|x|
            norms = np.linalg.norm(x.astype(np.float64), axis=1)
            i = int(np.argmax(norms))
            if norms[i] > self.max_norm:
                raise InvalidArgument(
                    f"{what}: vector {i} has L2 norm {norms[i]:.7g}; the limit is {self.max_norm:g} for index spec"
                    f" {_show(self.spec)} (its float16 codes after the pre-transform hold at most {FP16_MAX:g})"
                )

    def new_index(self) -> Any:
        """An empty index of this spec. PQ codes skip polysemous training: it serves only Hamming
        filtering, which searches never ask for, and cost 9-12 s per training even on 256 points."""
        index = faiss.index_factory(self.d, self.spec, FAISS_METRIC[self.metric])
        inner = unwrap(index)
        if self.ef_construction:
            inner.hnsw.efConstruction = self.ef_construction
        for part in (inner, faiss.downcast_index(inner.storage) if isinstance(inner, faiss.IndexHNSW) else None):
            if part is not None and hasattr(part, "do_polysemous_training"):
                part.do_polysemous_training = False
        return index


@dataclass(frozen=True)
class SearchDefaults:
    """A collection's search parameters where a request sets none (None: the service's default),
    e.g. the operating point the index advisor chose for an ``auto`` collection."""

    ef_search: int | None = None
    nprobe: int | None = None
    k_factor: int | None = None

    def as_dict(self) -> dict[str, int]:
        named = (("ef_search", self.ef_search), ("nprobe", self.nprobe), ("k_factor", self.k_factor))
        return {k: v for k, v in named if v}


def unwrap(index: Any) -> Any:
    """The index doing the work inside a refine stage and a pre-transform (``PCA64,HNSW32,RFlat``
    -> the HNSW index), or ``index`` itself."""
    if isinstance(index, faiss.IndexRefine):
        index = faiss.downcast_index(index.base_index)
    return inner_index(index)


def _code_size(index: Any, d: int) -> int:
    """Bytes of one vector's codes in ``index`` (without an IVF list number): the refine stage's
    added to its base's; an HNSW index's storage's (the graph links are extra)."""
    if isinstance(index, faiss.IndexRefine):
        base = faiss.downcast_index(index.base_index)
        return _code_size(base, d) + _code_size(faiss.downcast_index(index.refine_index), d)
    inner = inner_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        inner = faiss.downcast_index(inner.storage)
    try:
        return int(inner.sa_code_size())
    except RuntimeError:  # a few index types do not implement sa_code_size: flat storage
        return 4 * d


def search_params(
    index: Any,
    *,
    ef_search: int | None = None,
    nprobe: int | None = None,
    k_factor: int | None = None,
    sel: Any = None,
    base: bool = True,
    k: int = 0,
) -> Any:
    """FAISS SearchParameters for ``index`` (any index of the grammar, built from its own structure):
    a refine stage's carry ``k_factor`` (default :data:`DEFAULT_K_FACTOR`) and its base's (none when
    ``base`` is False: a flat PQ base takes none), a pre-transform's its inner index's; HNSW gets
    ``ef_search``, IVF ``nprobe`` (capped at nlist), the innermost ones the selector ``sel``.

    ``k``: the labels the search must return (0: any number). An HNSW's efSearch is at least the
    labels asked of it, k, or k * k_factor under a refine stage (its base's candidates): FAISS's
    graph search stops at efSearch candidates, and HNSW8 of 2000 points answered k=500 with 482 at
    efSearch 64. An efSearch already at least that is kept, so are its results."""
    if isinstance(index, faiss.IndexRefine):
        kf = float(k_factor or DEFAULT_K_FACTOR)
        inner = (
            search_params(
                faiss.downcast_index(index.base_index), ef_search=ef_search, nprobe=nprobe, sel=sel, k=int(k * kf)
            )
            if base
            else None
        )
        return faiss.IndexRefineSearchParameters(k_factor=kf, base_index_params=inner)  # type: ignore[call-arg]
    if isinstance(index, faiss.IndexPreTransform):
        inner = search_params(faiss.downcast_index(index.index), ef_search=ef_search, nprobe=nprobe, sel=sel, k=k)
        return faiss.SearchParametersPreTransform(index_params=inner)  # type: ignore[call-arg]
    p: Any
    if isinstance(index, faiss.IndexHNSW):
        p = faiss.SearchParametersHNSW(efSearch=max(ef_search or DEFAULT_EF_SEARCH, k))  # type: ignore[attr-defined]
    elif isinstance(index, faiss.IndexIVF):
        p = faiss.SearchParametersIVF(nprobe=min(nprobe or DEFAULT_NPROBE, int(index.nlist)))  # type: ignore[call-arg]
    else:
        p = faiss.SearchParameters()
    if sel is not None:
        p.sel = sel
    return p


def graph_codes(index: Any) -> tuple[list[Any], Any]:
    """What an exhaustive search of an HNSW index of the grammar reads: (the pre-transforms to apply
    to the queries, in order; the index of every vector's codes, with its labels). Behind a refine
    stage, its refine index (the vectors as given, whose codes the stage re-ranks by); else the HNSW's
    storage (Flat, SQ or PQ codes) behind the pre-transforms."""
    if isinstance(index, faiss.IndexRefine):
        return [], faiss.downcast_index(index.refine_index)
    chain: list[Any] = []
    if isinstance(index, faiss.IndexPreTransform):
        vts: Any = index.chain  # a std::vector of the transforms (typed as a list)
        chain = [vts.at(i) for i in range(vts.size())]
        index = faiss.downcast_index(index.index)
    return chain, faiss.downcast_index(index.storage)


def graph_k_limit(spec: IndexSpec, ef_search: int | None, k_factor: int | None) -> int:
    """The largest k whose :func:`search_params` keep ``ef_search`` (or the default) as they are: the
    efSearch, over k_factor under a refine stage; unbounded (2**62) for indexes without a graph."""
    if not spec.is_hnsw:
        return 1 << 62
    ef = ef_search or DEFAULT_EF_SEARCH
    return ef // (k_factor or DEFAULT_K_FACTOR) if spec.refine else ef


def _fp16_bounds(w: _Walk) -> tuple[float, float]:
    """(largest |component|, largest norm) of a vector entering an index whose walk is ``w``: a refine
    stage's float16 copy holds the vectors as given; the main index's float16 codes hold them, their IVF
    residuals (a centroid is a mean of vectors: a residual's component is at most twice theirs, its norm
    twice theirs) or a pre-transform's output (norm at most ``w.growth`` times theirs)."""
    comp = norm = math.inf
    if w.refine == "SQfp16":
        comp = FP16_MAX
    if w.fp16:
        residual = 2.0 if w.fp16 == "residuals" else 1.0
        if w.growth:
            norm = FP16_MAX / (residual * w.growth)  # 0.0 for a whitening PCA: inf growth, no bound
            norm = norm or math.inf
        else:
            comp = min(comp, FP16_MAX / residual)
    return comp, norm


def _probe(spec: str, probe_spec: str, d: int, metric: str) -> Any:
    """The index of ``probe_spec`` (the spec with one IVF list): its type, training need and code size."""
    try:
        return faiss.index_factory(d, probe_spec, FAISS_METRIC[metric])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "not a valid factory string"
        raise InvalidArgument(f"index spec {_show(spec)} is not valid for d={d}: {first}") from None
