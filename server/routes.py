"""Route resolution: which transform brings a query space into a collection's home space.

A query names the space of its vectors. The home space is served natively
(transform ``identity``); any other space must have an active route, or the
search fails with FAILED_PRECONDITION naming both spaces. Silent mixing of
embedding spaces is impossible by construction.

A collection's routing table is an immutable mapping that activation and
rollback replace whole (one reference swap), so a search resolves its route
without a lock and never sees a half-built table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import NoRoute

if TYPE_CHECKING:
    from .device import Device

__all__ = ["IDENTITY", "Route", "Shadow", "resolve"]

IDENTITY = "identity"


@dataclass(frozen=True)
class Shadow:
    """A candidate transform mirrored on a fraction of a route's live queries."""

    transform: str
    fn: Any  #: the candidate Transform
    sample_rate: float


@dataclass(frozen=True)
class Route:
    """How queries of ``query_space`` reach ``home_space``."""

    query_space: str
    home_space: str
    transform: str  #: "identity" or the active transform's name
    fn: Any = None  #: the active Transform (None for identity)
    shadow: Shadow | None = None

    def to_home(self, xq: np.ndarray, home_metric: str, home_dim: int, device: Device | None = None) -> np.ndarray:
        """Maps a query batch xq (nq, d_query) into the home space: (nq, home_dim) float32."""
        return map_queries(self.fn, xq, home_metric, home_dim, device=device)


def map_queries(
    fn: Any, xq: np.ndarray, home_metric: str, home_dim: int, side: str = "query", device: Device | None = None
) -> np.ndarray:
    """Applies a transform to a batch (queries by default). A basis transform maps into (home + Δ)
    dims; against a gallery of old items indexed as [x_old, 0] only its first ``home_dim``
    coordinates score. On a GPU ``device`` a linear transform runs there (``Device.apply_affine``);
    otherwise, and for non-linear kinds, ``fn.apply`` runs in numpy as on the CPU."""
    y = device.apply_affine(fn, xq, side) if device is not None and device.is_gpu else None
    if y is None:
        y = fn.apply(xq, side)
    y = y[:, :home_dim]
    if home_metric == "cosine":
        y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(y, dtype=np.float32)


def resolve(collection: str, home_space: str, query_space: str, table: Mapping[str, Route]) -> Route:
    """The route serving ``query_space`` on a collection whose index holds ``home_space``."""
    if query_space == home_space:
        return Route(query_space, home_space, IDENTITY)
    route = table.get(query_space)
    if route is None:
        raise NoRoute(
            f"query space {query_space!r} is not the home space {home_space!r} of collection "
            f"{collection!r} and no route from {query_space!r} to {home_space!r} is active"
        )
    return route
