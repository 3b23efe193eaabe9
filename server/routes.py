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
from typing import Any

from .errors import NoRoute

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
