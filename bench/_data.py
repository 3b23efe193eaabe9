"""Benchmark data: a debdesc split tiled to ``n`` rows, or seeded vectors when the split is absent.

:func:`load` reads ``old_doc.npy`` and ``old_query.npy`` (float16, shape (m, d), L2-normalized; the
MiniLM space, see ``../shared/data/debdesc/README.md``) from a folder laid out like a debdesc split.
The m docs become the first m database rows unchanged, so query i's relevant doc is row i; the
further rows are copies of the docs plus seeded Gaussian noise (norm about ``NOISE_NORM``),
re-normalized, until there are ``n`` rows. Without the folder it falls back to seeded vectors of low
intrinsic dimension (as FAISS's ``contrib/datasets.py`` ``SyntheticDataset``) and says so in
``BenchData.source``. Every benchmark in ``bench/`` loads its data here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_DATA", "NOISE_NORM", "BenchData", "CrossModelTask", "load", "load_task", "normalize", "tile"]

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / ".." / "shared" / "data" / "debdesc" / "dev"
NOISE_NORM = 0.5  #: expected L2 norm of the noise added to each tiled copy (cosine to the original ~0.89)
SYNTHETIC_D = 384
SYNTHETIC_NQ = 10000
SYNTHETIC_INTRINSIC = 32


@dataclass(frozen=True)
class BenchData:
    xb: np.ndarray  #: database, shape (n, d) float32, L2-normalized
    xq: np.ndarray  #: queries, shape (nq, d) float32, L2-normalized
    source: str  #: where the vectors came from, in words
    real: bool  #: True for a debdesc split, False for the seeded fallback

    @property
    def d(self) -> int:
        return int(self.xb.shape[1])


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows of x divided by their L2 norm, as a new C-contiguous float32 array."""
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def tile(x: np.ndarray, n: int, rng: np.random.Generator, noise_norm: float = NOISE_NORM) -> np.ndarray:
    """n rows: x (m, d) unchanged, then copies of x plus Gaussian noise of norm ~noise_norm, normalized."""
    x = normalize(x)
    m, d = x.shape
    reps = -(-n // m)
    xb = np.tile(x, (reps, 1))[:n]
    if n > m:
        noise = rng.standard_normal((n - m, d), dtype=np.float32) * np.float32(noise_norm / np.sqrt(d))
        xb[m:] = normalize(xb[m:] + noise)
    return np.ascontiguousarray(xb)


def synthetic(n: int, nq: int, rng: np.random.Generator, d: int = SYNTHETIC_D) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (n, d) database and (nq, d) queries of intrinsic dimension ~32, L2-normalized."""
    proj = rng.standard_normal((SYNTHETIC_INTRINSIC, d), dtype=np.float32)
    x = rng.standard_normal((n + nq, SYNTHETIC_INTRINSIC), dtype=np.float32) @ proj
    x += 0.1 * rng.standard_normal(x.shape, dtype=np.float32)
    x = normalize(x)
    return x[:n].copy(), x[n:].copy()


def load(
    data: Path | None,
    n: int,
    *,
    seed: int = 1234,
    doc_file: str = "old_doc.npy",
    query_file: str = "old_query.npy",
) -> BenchData:
    """The benchmark vectors: ``data/doc_file`` tiled to n rows and ``data/query_file``, or seeded
    vectors when ``data`` (default :data:`DEFAULT_DATA`) lacks those files."""
    folder = Path(data) if data is not None else DEFAULT_DATA
    rng = np.random.default_rng(seed)
    docs, queries = folder / doc_file, folder / query_file
    if docs.is_file() and queries.is_file():
        x = np.load(docs, mmap_mode="r")
        xq = normalize(np.load(queries, mmap_mode="r"))
        m = x.shape[0]
        how = "as is" if n <= m else f"tiled with seeded noise (norm ~{NOISE_NORM}, seed {seed}) and re-normalized"
        source = f"{docs.resolve()} ({m} x {x.shape[1]} {x.dtype}) -> {n} rows {how}; queries {query_file}"
        return BenchData(tile(x, n, rng), xq, source, True)
    xb, xq = synthetic(n, SYNTHETIC_NQ, rng)
    source = f"SEEDED SYNTHETIC vectors (seed {seed}): {folder} has no {doc_file}/{query_file}"
    return BenchData(xb, xq, source, False)


PAIR_FILES = ("new_doc", "old_doc", "new_query", "old_query")


def load_split(folder: Path, n: int | None) -> dict[str, np.ndarray]:
    """The four (n, d) arrays of one debdesc split as float32 (stored float16, L2-normalized)."""
    out = {}
    for name in PAIR_FILES:
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise SystemExit(f"{path} not found: pass --data, a folder with fit/ and dev/ debdesc splits")
        out[name] = np.ascontiguousarray(np.load(path, mmap_mode="r")[:n], dtype=np.float32)
    return out


@dataclass(frozen=True)
class CrossModelTask:
    """A folder's ``fit/`` split as calibration pairs and its ``dev/`` split as the evaluation task."""

    fit: dict[str, np.ndarray]  #: new_doc, old_doc, new_query, old_query of fit/, each (n, d)
    dev: dict[str, np.ndarray]  #: the same of dev/; query i's only relevant doc is doc i
    relevant: tuple[np.ndarray, ...] | None  #: training relevance of the fit split (query i -> doc i) or None

    def eval_kw(self) -> dict[str, np.ndarray]:
        """The keyword arguments of ``evaluate`` for the dev task (new/home queries and galleries)."""
        d = self.dev
        return {"xq_new": d["new_query"], "xq_home": d["old_query"], "xb_new": d["new_doc"], "xb_home": d["old_doc"]}


def load_task(data: Path, n: int | None, relevance: bool = True) -> CrossModelTask:
    """``data``/fit and ``data``/dev (first ``n`` rows each); ``relevance``: fit query i -> fit doc i."""
    fit, dev = load_split(data / "fit", n), load_split(data / "dev", n)
    relevant = tuple(np.array([i]) for i in range(len(fit["new_query"]))) if relevance else None
    return CrossModelTask(fit, dev, relevant)
