"""Routes: which transform brings a query space into a collection's home space, and the table of them.

A query names the space of its vectors. The home space is served natively
(transform ``identity``); any other space must have an active route, or the
search fails with FAILED_PRECONDITION naming both spaces. Silent mixing of
embedding spaces is impossible by construction.

A collection's routing table is an immutable mapping that activation and
rollback replace whole (one reference swap), so a search resolves its route
without a lock and never sees a half-built table. :class:`Routes` is the one
owner of those tables: it loads them at start, activates a transform (gated by
a :class:`~.activation.GatePolicy` unless forced), rolls back, sets a shadow
candidate, and is the only code that swaps them; the store keeps every version.
The shadow searches themselves run in ``shadow.py``. Covered by
``tests/test_routes.py``, ``tests/test_gate_policy.py`` and ``tests/test_pipeline.py``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .activation import GatePolicy, gate
from .errors import FailedPrecondition, InvalidArgument, NoRoute, NotFound, Unavailable
from .metrics import Metrics
from .store import RouteRow, Store

if TYPE_CHECKING:
    from .backends.base import AnyCollection
    from .compat import Compat
    from .shared import SharedRegistry

__all__ = ["IDENTITY", "Route", "Routes", "Shadow", "resolve"]

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


_IDENTITY_ROUTES: dict[str, Route] = {}


def resolve(collection: str, home_space: str, query_space: str, table: Mapping[str, Route]) -> Route:
    """The route serving ``query_space`` on a collection whose index holds ``home_space``."""
    if query_space == home_space:
        route = _IDENTITY_ROUTES.get(query_space)
        if route is None:  # one immutable value per space, not one per search
            route = _IDENTITY_ROUTES[query_space] = Route(query_space, query_space, IDENTITY)
        return route
    route = table.get(query_space)
    if route is None:
        raise NoRoute(
            f"query space {query_space!r} is not the home space {home_space!r} of collection "
            f"{collection!r} and no route from {query_space!r} to {home_space!r} is active"
        )
    return route


class Routes:
    """The owner of every collection's route table (module docstring). ``registry`` gives the
    transforms; ``policy`` is the server's default activation gate."""

    def __init__(self, store: Store, metrics: Metrics, registry: Compat, *, policy: GatePolicy) -> None:
        self.store = store
        self.metrics = metrics
        self.registry = registry
        self.policy = policy
        #: the registry's lock: a route change and a transform's deletion exclude each other (searches never take it)
        self._lock = registry.lock
        #: a shared registry (``shared.py``): milvus collections' route changes are committed there first
        self.shared: SharedRegistry | None = None

    def load(self, collections: Mapping[str, AnyCollection]) -> None:
        """Puts every live route back into its collection's routing table."""
        for col in collections.values():
            live: dict[str, Route] = {}
            for r in self.store.routes(col.row.cid):
                if r.deactivated_at == 0 and r.transform and r.query_space not in live:
                    live[r.query_space] = self._route(col, r.query_space, r.transform, r.shadow, r.shadow_rate)
            col.routes = live
            for qs, route in live.items():
                self.metrics.route_active.labels(col.name, qs, route.transform).set(1)

    def _route(
        self, col: AnyCollection, query_space: str, transform: str, shadow: str = "", rate: float = 0.0
    ) -> Route:
        fn, known = self.registry.get(transform).fn, self.registry.transforms
        sh = Shadow(shadow, self.registry.get(shadow).fn, rate) if shadow and shadow in known else None
        return Route(query_space, col.home.name, transform, fn, sh)

    def _is_ready(self, name: str) -> bool:
        rec = self.registry.transforms.get(name)
        return rec is not None and rec.state == "ready"

    def activate(self, col: AnyCollection, name: str, force: bool, policy: GatePolicy | None = None) -> Route:
        """Makes ``name`` the live route of its source space, gated by ``policy`` (default: the
        server's) unless ``force``; FailedPrecondition quotes each failing figure against its threshold."""
        rec = self.registry.get(name)
        if rec.state != "ready":
            raise FailedPrecondition(f"transform {name!r} is {rec.state}{': ' + rec.error if rec.error else ''}")
        if rec.source == rec.target:
            raise FailedPrecondition(
                f"transform {name!r} maps {rec.source!r} onto itself: use it as a collection's basis_transform, "
                "not as a route"
            )
        if rec.target != col.home.name:
            raise FailedPrecondition(
                f"transform {name!r} maps {rec.source!r} -> {rec.target!r}, but collection {col.name!r} has home "
                f"space {col.home.name!r}"
            )
        reason = gate(rec.report, policy or self.policy)
        if reason and not force:
            raise FailedPrecondition(f"transform {name!r} is not activated: {reason}; set force to override")
        with self._lock:
            if self.registry.transforms.get(name) is not rec:
                raise NotFound(f"transform {name!r} was deleted")
            old = col.routes.get(rec.source)
            self._commit(col, rec.source, {"transform": name, "forced": bool(reason), "shadow": "", "shadow_rate": 0.0})
            self.store.set_route(col.row.cid, rec.source, name, bool(reason), time.time())
            route = Route(rec.source, col.home.name, name, rec.fn, None)
            col.routes = {**col.routes, rec.source: route}  # the swap: one reference
        if old is not None:
            self.metrics.route_active.labels(col.name, rec.source, old.transform).set(0)
        self.metrics.route_active.labels(col.name, rec.source, name).set(1)
        return route

    def rollback(self, col: AnyCollection, query_space: str) -> Route | None:
        """Restores the route active before the current one, skipping deleted transforms; returns it (None:
        the route is removed)."""
        with self._lock:
            history = [r for r in self.store.routes(col.row.cid) if r.query_space == query_space]
            if not history or history[0].deactivated_at != 0 or not history[0].transform:
                raise FailedPrecondition(
                    f"collection {col.name!r} has no active route from {query_space!r} to roll back"
                )
            live = history[0]
            ready = [r.transform for r in history[1:] if not r.transform or self._is_ready(r.transform)]
            previous = next((t for t in ready if t != live.transform), "")
            change = {"transform": previous, "forced": False, "shadow": "", "shadow_rate": 0.0}
            self._commit(col, query_space, change if previous else None)
            self.store.set_route(col.row.cid, query_space, previous, False, time.time())
            table = dict(col.routes)
            route = self._route(col, query_space, previous) if previous else None
            if route is None:
                table.pop(query_space, None)
            else:
                table[query_space] = route
            col.routes = table
        self.metrics.route_active.labels(col.name, query_space, live.transform).set(0)
        if route is not None:
            self.metrics.route_active.labels(col.name, query_space, route.transform).set(1)
        return route

    def _commit(self, col: AnyCollection, query_space: str, change: dict[str, Any] | None) -> None:
        """A shared collection's change goes to the shared registry first (``shared.py``: compare-and-swap
        on the table this front-end applied; FAILED_PRECONDITION when another front-end changed it)."""
        if self.shared is not None and col.row.spec.on_milvus:
            self.shared.commit_route(col, query_space, change)  # type: ignore[arg-type]

    def replace(self, col: AnyCollection, entries: Mapping[str, Mapping[str, Any]]) -> None:
        """Makes ``entries`` (query space -> transform, forced, shadow, shadow_rate: a shared registry's
        table) the collection's table, then records each change in the store's history (the registry is
        the source of truth here, the store its mirror: a route ListRoutes shows live is already served);
        the caller holds :attr:`_lock`. UNAVAILABLE if a transform it names is not registered here yet (the
        registry re-reads)."""
        for qs, e in entries.items():
            for t in (e.get("transform", ""), e.get("shadow", "")):
                if t and not self._is_ready(t):
                    raise Unavailable(f"transform {t!r} of the route {qs!r} -> collection {col.name!r} is not here yet")
        now, old = time.time(), col.routes
        table: dict[str, Route] = {}
        for qs, e in entries.items():
            if e.get("transform"):
                table[qs] = self._route(col, qs, e["transform"], e.get("shadow", ""), float(e.get("shadow_rate", 0.0)))
        col.routes = table  # the swap, one reference, before the history: a route ListRoutes shows live serves
        for qs in sorted({*old, *entries}):
            before, e = old.get(qs), entries.get(qs, {})
            transform, shadow, rate = e.get("transform", ""), e.get("shadow", ""), float(e.get("shadow_rate", 0.0))
            if (before.transform if before else "") != transform:
                self.store.set_route(col.row.cid, qs, transform, bool(e.get("forced", False)), now)
            was = before.shadow if before else None
            if transform and (was.transform if was else "", was.sample_rate if was else 0.0) != (shadow, rate):
                self.store.set_shadow(col.row.cid, qs, shadow, rate)
        for qs in {*old, *table}:
            if qs in old and (qs not in table or table[qs].transform != old[qs].transform):
                self.metrics.route_active.labels(col.name, qs, old[qs].transform).set(0)
            if qs in table:
                self.metrics.route_active.labels(col.name, qs, table[qs].transform).set(1)

    def history(self, col: AnyCollection) -> list[RouteRow]:
        """Every route version of a collection, newest first."""
        return self.store.routes(col.row.cid)

    def live_row(self, col: AnyCollection, query_space: str) -> RouteRow | None:
        """The stored row of the live route from ``query_space`` (None when there is none)."""
        return next(
            (r for r in self.history(col) if r.query_space == query_space and r.deactivated_at == 0 and r.transform),
            None,
        )

    def set_shadow(self, col: AnyCollection, query_space: str, name: str, rate: float) -> Route:
        """Mirrors a ``rate`` fraction (0: all) of the route's queries to ``name`` ("" stops it)."""
        if not 0 <= rate <= 1:
            raise InvalidArgument(f"sample_rate is {rate}; it must be in [0, 1]")
        with self._lock:
            route = col.routes.get(query_space)
            if route is None:
                raise FailedPrecondition(f"collection {col.name!r} has no active route from {query_space!r} to shadow")
            shadow = None
            if name:
                rec = self.registry.get(name)
                if rec.state != "ready" or (rec.source, rec.target) != (query_space, col.home.name):
                    raise FailedPrecondition(
                        f"transform {name!r} ({rec.state}, {rec.source!r} -> {rec.target!r}) cannot shadow the route "
                        f"{query_space!r} -> {col.home.name!r}"
                    )
                shadow = Shadow(name, rec.fn, rate or 1.0)
            self._commit(col, query_space, {"shadow": name, "shadow_rate": shadow.sample_rate if shadow else 0.0})
            self.store.set_shadow(col.row.cid, query_space, name, shadow.sample_rate if shadow else 0.0)
            new = Route(route.query_space, route.home_space, route.transform, route.fn, shadow)
            col.routes = {**col.routes, query_space: new}
        return new
