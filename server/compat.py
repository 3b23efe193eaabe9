"""The compatibility layer: fitted transforms, and the routes that put them in the query path.

* **Fit** (:meth:`Compat.fit`): calibration pairs are checked on the request
  thread (INVALID_ARGUMENT, nothing stored), then fitted and evaluated on a
  dedicated worker thread while the service keeps serving; the transform is
  ``fitting`` until it is ``ready`` (persisted with weights, config, report and
  checksum) or ``failed`` (:mod:`.fit_jobs`: the queue, cancels, the time budget).
* **Cancel / delete** (:meth:`Compat.cancel`, :meth:`Compat.delete`): a cancelled
  fit is ``failed`` with error "cancelled"; a transform is deleted (any state) only
  while no live route, shadow, chain or collection basis uses it.
* **Activate / roll back** (:meth:`Compat.activate`, :meth:`Compat.rollback`):
  the new routing table is built beside the live one and swapped in with one
  reference assignment; searches never wait on a lock. Activation is gated on
  the report by a :class:`~.activation.GatePolicy` (the request's or the
  server's default: retention, negative flips, optionally ECC) unless forced.
* **Shadow** (:meth:`Compat.set_shadow`): a candidate transform runs beside
  the active one on sampled live queries, off the reply path (``shadow.py``,
  through the same query pipeline); its top-k agreement and latency are
  exported as metrics.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
import threading
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from .activation import GatePolicy, gate
from .collection import Collection
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from .fit_jobs import FitJobs, TransformRecord
from .fit_limits import check_steps
from .metrics import Metrics
from .routes import Route, Shadow
from .store import RouteRow, SpaceRow, Store
from .transforms import KINDS, Calibration, Transform, load_transform
from .transforms.artefact import EvalData

__all__ = ["Compat", "TransformRecord"]

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9._@:-]{1,128}$")


class Compat:
    def __init__(self, store: Store, metrics: Metrics, *, policy: GatePolicy, omp_threads: int = 1) -> None:
        self.store = store
        self.metrics = metrics
        self.policy = policy  #: the server's default activation gate
        self.transforms: dict[str, TransformRecord] = {}
        self._lock = threading.Lock()  # registry and route changes
        self.jobs = FitJobs(store, metrics, self._export_report, omp_threads)

    def close(self) -> None:
        """Cancels queued fits, stops a running one at its next progress step, and waits for it."""
        self.jobs.close()

    # -- persistence ---------------------------------------------------------------------------

    def load_transforms(self) -> None:
        """Loads every stored transform (chains after their links)."""
        rows = sorted(self.store.transforms(), key=lambda r: (r.kind == "chain", r.created_at))
        for row in rows:
            with np.load(io.BytesIO(row.weights)) as z:
                arrays = {k: z[k] for k in z.files}
            config = json.loads(row.config)
            fn = load_transform(row.kind, row.d_in, row.d_out, config, arrays, self._link)
            rec = TransformRecord(
                row.name,
                row.kind,
                row.source_space,
                row.target_space,
                config,
                row.created_at,
                row.doc_pairs,
                row.query_pairs,
                "ready",
                stage="done",
                progress=1.0,
                report=json.loads(row.report),
                checksum=row.checksum,
                fn=fn,
            )
            self.transforms[row.name] = rec
            self._export_report(rec)

    def load_routes(self, collections: dict[str, Collection]) -> None:
        """Puts every live route back into its collection's routing table."""
        for col in collections.values():
            live: dict[str, Route] = {}
            for r in self.store.routes(col.row.cid):
                if r.deactivated_at == 0 and r.transform and r.query_space not in live:
                    live[r.query_space] = self._route(col, r.query_space, r.transform, r.shadow, r.shadow_rate)
            col.routes = live
            for qs, route in live.items():
                self.metrics.route_active.labels(col.name, qs, route.transform).set(1)

    def _link(self, name: str) -> Transform:
        rec = self.transforms.get(name)
        if rec is None or rec.fn is None:
            raise NotFound(f"transform {name!r} does not exist or is not ready")
        return rec.fn

    def _is_ready(self, name: str) -> bool:
        rec = self.transforms.get(name)
        return rec is not None and rec.state == "ready"

    def _export_report(self, rec: TransformRecord) -> None:
        report = rec.report
        for key, gauge in (("ecc_margin", self.metrics.ecc_margin), ("retention", self.metrics.retention)):
            value = report.get(key)
            if value is None and key == "retention":
                value = report.get("estimated_retention")
            if isinstance(value, float) and math.isfinite(value):
                gauge.labels(rec.name).set(value)

    # -- transforms ----------------------------------------------------------------------------

    def get(self, name: str) -> TransformRecord:
        rec = self.transforms.get(name)
        if rec is None:
            raise NotFound(f"transform {name!r} does not exist")
        return rec

    def list_transforms(self) -> list[TransformRecord]:
        return sorted(self.transforms.values(), key=lambda r: r.name)

    def fit(
        self,
        name: str,
        kind: str,
        source: SpaceRow,
        target: SpaceRow,
        config: dict[str, Any],
        cal: Calibration,
        eval_set: EvalData | None,
        holdout: float,
        chain: list[str],
        *,
        max_seconds: float = math.inf,
    ) -> TransformRecord:
        """Registers ``name`` as fitting and fits it in the background for at most ``max_seconds`` once
        started. Checks run here, first: a refused fit is neither registered nor queued."""
        from .transforms.fit import validate_calibration, validate_config

        if not _NAME.match(name):
            raise InvalidArgument(f"transform name {name!r} is invalid: use 1 to 128 characters from [A-Za-z0-9._@:-]")
        if kind not in (*KINDS, "chain"):
            raise InvalidArgument(f"kind {kind!r} is not one of {', '.join((*KINDS, 'chain'))}")
        if not 0 <= holdout < 0.9:
            raise InvalidArgument(f"holdout is {holdout}; it must be in [0, 0.9)")
        links = [self._link(n) for n in chain] if kind == "chain" else []
        if kind == "chain":
            if not chain:
                raise InvalidArgument("a chain transform needs `chain`: the names of its links")
            first, last = self.get(chain[0]), self.get(chain[-1])
            if (first.source, last.target) != (source.name, target.name):
                raise InvalidArgument(
                    f"chain maps {first.source!r} -> {last.target!r}, not {source.name!r} -> {target.name!r}"
                )
        else:
            try:
                validate_config(kind, config)
                check_steps(config)
            except ValueError as e:
                raise InvalidArgument(f"config: {e}") from None
            try:
                validate_calibration(cal, kind)
            except ValueError as e:
                raise InvalidArgument(f"calibration data: {e}") from None
        with self._lock:
            old = self.transforms.get(name)
            if old is not None and old.state != "failed":  # a failed fit was never stored: its name is free
                raise AlreadyExists(f"transform {name!r} already exists (transforms are immutable)")
            if kind == "chain":
                config = {**config, "chain": list(chain)}
            rec = TransformRecord(
                name, kind, source.name, target.name, config, time.time(), len(cal.doc_new), len(cal.query_new)
            )
            self.jobs.submit(rec, target, cal, eval_set, holdout, links, max_seconds)  # queued, under the lock
            self.transforms[name] = rec
        return rec

    def cancel(self, name: str) -> TransformRecord:
        """Cancels the fit of ``name`` (:meth:`.FitJobs.cancel`): it is FAILED with error "cancelled"."""
        rec = self.get(name)
        if not self.jobs.cancel(rec):
            raise FailedPrecondition(f"transform {name!r} is {rec.state}, not fitting: there is no fit to cancel")
        return rec

    def users(self, name: str, collections: Iterable[Collection]) -> list[str]:
        """What uses transform ``name``: live routes, shadows, chains and collection bases, one phrase each."""
        out = []
        for col in collections:
            if col.row.basis_transform == name:
                out.append(f"collection {col.name!r} (basis_transform)")
            for qs, route in col.routes.items():
                if route.transform == name:
                    out.append(f"the live route {qs!r} -> collection {col.name!r}")
                if route.shadow is not None and route.shadow.transform == name:
                    out.append(f"the shadow of route {qs!r} -> collection {col.name!r}")
        for rec in self.transforms.values():
            if rec.kind == "chain" and rec.state != "failed" and name in rec.config.get("chain", ()):
                out.append(f"chain {rec.name!r}")
        return out

    def delete(self, name: str, collections: Iterable[Collection]) -> TransformRecord:
        """Removes ``name`` (any state; a fit is cancelled first) from the registry and the store;
        FailedPrecondition naming its users while anything uses it. The caller holds the lock that
        serializes collection creation, so no new collection can take it as a basis meanwhile."""
        with self._lock:
            rec = self.get(name)
            users = self.users(name, collections)
            if users:
                raise FailedPrecondition(f"transform {name!r} is in use by {', '.join(users)}; stop those first")
            self.jobs.cancel(rec)  # no-op unless fitting; a cancelled fit is never stored
            self.store.delete_transform(name)
            del self.transforms[name]
        for gauge in (self.metrics.ecc_margin, self.metrics.retention):
            with contextlib.suppress(KeyError):
                gauge.remove(name)
        return rec

    # -- routes --------------------------------------------------------------------------------

    def _route(self, col: Collection, query_space: str, transform: str, shadow: str = "", rate: float = 0.0) -> Route:
        fn = self.get(transform).fn
        sh = Shadow(shadow, self.get(shadow).fn, rate) if shadow and shadow in self.transforms else None
        return Route(query_space, col.home.name, transform, fn, sh)

    def activate(self, col: Collection, name: str, force: bool, policy: GatePolicy | None = None) -> Route:
        """Makes ``name`` the live route of its source space (module docstring), gated by ``policy`` (default:
        the server's) unless ``force``; FailedPrecondition quotes each failing figure against its threshold."""
        rec = self.get(name)
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
            if self.transforms.get(name) is not rec:
                raise NotFound(f"transform {name!r} was deleted")
            old = col.routes.get(rec.source)
            self.store.set_route(col.row.cid, rec.source, name, bool(reason), time.time())
            route = Route(rec.source, col.home.name, name, rec.fn, None)
            col.routes = {**col.routes, rec.source: route}  # the swap: one reference
        if old is not None:
            self.metrics.route_active.labels(col.name, rec.source, old.transform).set(0)
        self.metrics.route_active.labels(col.name, rec.source, name).set(1)
        return route

    def rollback(self, col: Collection, query_space: str) -> Route | None:
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

    def history(self, col: Collection) -> list[RouteRow]:
        """Every route version of a collection, newest first."""
        return self.store.routes(col.row.cid)

    def live_row(self, col: Collection, query_space: str) -> RouteRow | None:
        """The stored row of the live route from ``query_space`` (None when there is none)."""
        return next(
            (r for r in self.history(col) if r.query_space == query_space and r.deactivated_at == 0 and r.transform),
            None,
        )

    def set_shadow(self, col: Collection, query_space: str, name: str, rate: float) -> Route:
        if not 0 <= rate <= 1:
            raise InvalidArgument(f"sample_rate is {rate}; it must be in [0, 1]")
        with self._lock:
            route = col.routes.get(query_space)
            if route is None:
                raise FailedPrecondition(f"collection {col.name!r} has no active route from {query_space!r} to shadow")
            shadow = None
            if name:
                rec = self.get(name)
                if rec.state != "ready" or (rec.source, rec.target) != (query_space, col.home.name):
                    raise FailedPrecondition(
                        f"transform {name!r} ({rec.state}, {rec.source!r} -> {rec.target!r}) cannot shadow the route "
                        f"{query_space!r} -> {col.home.name!r}"
                    )
                shadow = Shadow(name, rec.fn, rate or 1.0)
            self.store.set_shadow(col.row.cid, query_space, name, shadow.sample_rate if shadow else 0.0)
            new = Route(route.query_space, route.home_space, route.transform, route.fn, shadow)
            col.routes = {**col.routes, query_space: new}
        return new
