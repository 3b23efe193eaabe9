"""Compatibility transforms: maps from a new model's space into a collection's home space.

A transform is an immutable, versioned artefact: its kind, its configuration,
its weights (numpy arrays), its fit report and a checksum over all of them. At
serve time it maps a whole query batch at once: one matmul plus a bias for the
linear kinds (every kind but ``residual_mlp``), which also lets ``chain``
precompute a composition into one matrix. Re-normalization for cosine home
spaces is the caller's job (:func:`apply_to_home`).

Queries and gallery items have different distributions, so the linear maps are
kept per *side* (``"query"`` and ``"doc"``): with centering, the means differ
per side, hence so does the bias (and the matrix may too). A side fitted without
its own pairs falls back to the other side's map.

Shapes use FAISS vocabulary: ``x`` is (n, d_in), the result (n, d_out).
"""

from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

import numpy as np

__all__ = [
    "SIDES",
    "AffineTransform",
    "Calibration",
    "Transform",
    "apply_to_home",
    "check_bool",
    "check_int",
    "check_threads",
    "checksum",
    "configure",
    "pad_home",
]

C = TypeVar("C")

SIDES = ("query", "doc")
MAX_SEED = 2**63 - 1  #: torch.manual_seed takes at most 2**64 - 1, numpy's default_rng no negative seed
MAX_THREADS = 1024  #: torch threads of one fit


def check_bool(name: str, value: Any) -> None:
    """ValueError unless ``value`` is a bool (a config's JSON true or false; 1 and "yes" are not)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def check_int(name: str, value: Any, low: int, high: int) -> None:
    """ValueError unless ``value`` is an integer (not a bool, not a float such as JSON's 1e9) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def check_threads(threads: Any) -> None:
    """ValueError unless ``threads`` (torch threads of a fit) is None or an integer in [1, MAX_THREADS]."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:  # as train.torch_threads says it
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    if threads > MAX_THREADS:
        raise ValueError(f"threads must be at most {MAX_THREADS}, got {threads!r}")


@dataclass(frozen=True)
class Calibration:
    """Items embedded by both models, row-aligned: row i of ``*_new`` and ``*_home`` is one item.

    doc_new : (n, d_new), doc_home : (n, d_home)  -- gallery items (doc pairs), may be empty
    query_new : (m, d_new), query_home : (m, d_home) -- logged queries (query pairs), may be empty
    doc_labels : (n,) int64 or None -- class labels of the doc pairs (SupCon, CMC, mAP)
    query_labels : (m,) int64 or None
    query_relevant : m arrays of doc-pair rows, or None -- training relevance: query i's relevant docs
        (the logged clicks an operator has); the task loss trains mapped query i to find them
    """

    doc_new: np.ndarray
    doc_home: np.ndarray
    query_new: np.ndarray
    query_home: np.ndarray
    doc_labels: np.ndarray | None = None
    query_labels: np.ndarray | None = None
    query_relevant: tuple[np.ndarray, ...] | None = None

    @property
    def d_new(self) -> int:
        return int((self.doc_new if len(self.doc_new) else self.query_new).shape[1])

    @property
    def d_home(self) -> int:
        return int((self.doc_home if len(self.doc_home) else self.query_home).shape[1])

    def links(self) -> np.ndarray:
        """(L, 2) int64 (query row, doc row) relevance links, sorted; empty without ``query_relevant``."""
        if not self.query_relevant:
            return np.zeros((0, 2), dtype=np.int64)
        rows = [np.column_stack([np.full(len(r), i), r]) for i, r in enumerate(self.query_relevant) if len(r)]
        if not rows:
            return np.zeros((0, 2), dtype=np.int64)
        return np.unique(np.vstack(rows).astype(np.int64), axis=0)

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """All pairs stacked (docs first): X (n+m, d_new), Y (n+m, d_home)."""
        return np.vstack([self.doc_new, self.query_new]), np.vstack([self.doc_home, self.query_home])


class Transform(abc.ABC):
    """A fitted map R^d_in -> R^d_out. Subclasses are immutable once built."""

    kind: ClassVar[str]

    def __init__(self, d_in: int, d_out: int, config: dict[str, Any]) -> None:
        self.d_in, self.d_out, self.config = d_in, d_out, dict(config)

    @abc.abstractmethod
    def apply(self, x: np.ndarray, side: str = "query") -> np.ndarray:
        """x : (n, d_in) float32 -> (n, d_out) float32 (not normalized)."""

    def affine(self, side: str = "query") -> tuple[np.ndarray, np.ndarray] | None:
        """(W (d_in, d_out), b (d_out,)) with apply(x) = x @ W + b, or None for a non-linear kind."""
        return None

    @abc.abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        """Every weight, by name, for persistence (``np.savez``)."""

    @classmethod
    @abc.abstractmethod
    def from_arrays(cls, d_in: int, d_out: int, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Transform:
        """Rebuilds the transform saved by :meth:`arrays`."""


class AffineTransform(Transform):
    """x -> x @ W[side] + b[side]: the serve-time form of every linear kind."""

    kind = "affine"

    def __init__(
        self, W: dict[str, np.ndarray], b: dict[str, np.ndarray], config: dict[str, Any], kind: str | None = None
    ) -> None:
        w0 = next(iter(W.values()))
        super().__init__(int(w0.shape[0]), int(w0.shape[1]), config)
        if kind is not None:
            self.kind = kind  # type: ignore[misc]
        self.W = {s: np.ascontiguousarray(W.get(s, w0), dtype=np.float32) for s in SIDES}
        b0 = next(iter(b.values()))
        self.b = {s: np.ascontiguousarray(b.get(s, b0), dtype=np.float32) for s in SIDES}
        for s in SIDES:
            if self.W[s].shape != (self.d_in, self.d_out) or self.b[s].shape != (self.d_out,):
                raise ValueError(f"side {s}: W {self.W[s].shape} and b {self.b[s].shape} do not match")

    def apply(self, x: np.ndarray, side: str = "query") -> np.ndarray:
        y = x @ self.W[side]
        y += self.b[side]
        return y

    def affine(self, side: str = "query") -> tuple[np.ndarray, np.ndarray]:
        return self.W[side], self.b[side]

    def arrays(self) -> dict[str, np.ndarray]:
        return {**{f"W_{s}": self.W[s] for s in SIDES}, **{f"b_{s}": self.b[s] for s in SIDES}}

    @classmethod
    def from_arrays(
        cls, d_in: int, d_out: int, config: dict[str, Any], arrays: dict[str, np.ndarray]
    ) -> AffineTransform:
        return cls(
            {s: arrays[f"W_{s}"] for s in SIDES},
            {s: arrays[f"b_{s}"] for s in SIDES},
            config,
            kind=config.get("kind"),
        )


def apply_to_home(t: Transform, x: np.ndarray, home_metric: str, side: str = "query") -> np.ndarray:
    """Maps x (n, d_in) into the home space, re-normalized when the home metric is cosine."""
    y = t.apply(np.ascontiguousarray(x, dtype=np.float32), side)
    if home_metric == "cosine":
        y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(y, dtype=np.float32)


def pad_home(x_home: np.ndarray, d_out: int) -> np.ndarray:
    """[x_home, 0]: x_home (n, d_home) zero-padded to (n, d_out) float32, the basis space's old items
    (``basis.py``; here, beside :func:`apply_to_home`, so that ``evaluate.py`` needs no fitter)."""
    x = np.asarray(x_home, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] > d_out:
        raise ValueError(f"x_home must have shape (n, d_home) with d_home <= {d_out}, got {x.shape}")
    out = np.zeros((x.shape[0], d_out), dtype=np.float32)
    out[:, : x.shape[1]] = x
    return out


def checksum(kind: str, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over kind, config (canonical JSON) and every array (name, dtype, shape, bytes)."""
    h = hashlib.sha256(kind.encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass
class FitResult:
    """What a fit returns: the transform, the numbers that describe the fit, and its loss history."""

    transform: Transform
    info: dict[str, Any] = field(default_factory=dict)  #: e.g. chosen ridge/lambda, final ||W^T W - I||_F
    history: list[dict[str, float]] = field(default_factory=list)  #: named loss terms per epoch


def configure(cls: type[C], config: C | None, overrides: dict[str, Any]) -> C:
    """A fitter's config: ``config`` (default: ``cls``'s defaults) with the keyword ``overrides`` put in; the
    config class validates the result (``fit_procrustes(cal, refine_steps=0)`` builds ``ProcrustesConfig``)."""
    if config is None:
        return cls(**overrides)
    if not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    if not overrides:
        return config
    return cls(**{**{f.name: getattr(config, f.name) for f in fields(config)}, **overrides})  # type: ignore[arg-type]
