"""The transform registry: fitted transforms, their fit jobs and their persistence.

* **Fit** (:meth:`Compat.fit`): the config (every value, by building the kind's
  config dataclass), the spaces, a chain's links and the calibration pairs (enough
  for the kind once the held-out slices are set aside) are checked on the request
  thread (INVALID_ARGUMENT, nothing stored), then fitted and evaluated on a
  dedicated worker thread while the service keeps serving; the transform is
  ``fitting`` until it is ``ready`` (persisted with weights, config, report and
  checksum) or ``failed`` (:mod:`.fit_jobs`: the queue, cancels, the time budget).
* **Cancel / delete** (:meth:`Compat.cancel`, :meth:`Compat.delete`): a cancelled
  fit is ``failed`` with error "cancelled"; a transform is deleted (any state) only
  while no live route, shadow, chain or collection basis uses it.

The routes that put a transform in the query path (activation, rollback, shadow) are owned by
:class:`~.routes.Routes`, which takes this registry's :attr:`Compat.lock`, so a route change and a
deletion exclude each other.
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
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from .backends.base import AnyCollection
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from .fit_jobs import DEFAULT_HOLDOUT, FitJobs, TransformRecord
from .fit_limits import check_steps
from .metrics import Metrics
from .store import SpaceRow, Store, TransformRow
from .transforms import Calibration, Transform, load_transform
from .transforms.artefact import EvalData
from .transforms.kinds import REGISTRY, WIRE_KINDS

__all__ = ["Compat", "TransformRecord"]

log = logging.getLogger(__name__)
_NAME = re.compile(r"[A-Za-z0-9._@:-]{1,128}")  #: matched whole: ``$`` passed a final newline


class Compat:
    def __init__(self, store: Store, metrics: Metrics, *, omp_threads: int = 1) -> None:
        self.store = store
        self.metrics = metrics
        self.transforms: dict[str, TransformRecord] = {}
        self.lock = threading.Lock()  #: registry changes, and route changes (``routes.Routes`` takes it too)
        #: called with a transform's name once its fit is stored (``shared.py`` publishes it)
        self.on_stored: list[Callable[[str], None]] = []
        self.jobs = FitJobs(store, metrics, self._fitted, omp_threads)

    def close(self) -> None:
        """Cancels queued fits, stops a running one at its next progress step, and waits for it."""
        self.jobs.close()

    # -- persistence ---------------------------------------------------------------------------

    def load_transforms(self) -> None:
        """Loads every stored transform (chains after their links)."""
        rows = sorted(self.store.transforms(), key=lambda r: (r.kind == "chain", r.created_at))
        for row in rows:
            rec = self._record(row)
            self.transforms[row.name] = rec
            self._export_report(rec)

    def adopt(self, row: TransformRow) -> TransformRecord:
        """Stores and registers a transform fitted elsewhere (another front-end of a shared registry,
        ``shared.py``); the caller holds :attr:`lock`. Its links must be registered first."""
        rec = self._record(row)
        self.store.add_transform(row)
        self.transforms[row.name] = rec
        self._export_report(rec)
        return rec

    def forget(self, name: str) -> None:
        """Removes a transform deleted elsewhere (``shared.py``); the caller holds :attr:`lock` and has
        checked that nothing here uses it."""
        self.store.delete_transform(name)
        self.transforms.pop(name, None)
        for gauge in (self.metrics.ecc_margin, self.metrics.retention):
            with contextlib.suppress(KeyError):
                gauge.remove(name)

    def _record(self, row: TransformRow) -> TransformRecord:
        """The ready transform of a stored row (its weights loaded)."""
        with np.load(io.BytesIO(row.weights)) as z:
            arrays = {k: z[k] for k in z.files}
        config = json.loads(row.config)
        fn = load_transform(row.kind, row.d_in, row.d_out, config, arrays, self._link)
        return TransformRecord(
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

    def _link(self, name: str) -> Transform:
        rec = self.transforms.get(name)
        if rec is None or rec.fn is None:
            raise NotFound(f"transform {name!r} does not exist or is not ready")
        return rec.fn

    def _fitted(self, rec: TransformRecord) -> None:
        self._export_report(rec)
        for fn in self.on_stored:
            fn(rec.name)

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
        if not _NAME.fullmatch(name):
            raise InvalidArgument(f"transform name {name!r} is invalid: use 1 to 128 characters from [A-Za-z0-9._@:-]")
        if kind not in WIRE_KINDS:
            raise InvalidArgument(f"kind {kind!r} is not one of {', '.join(WIRE_KINDS)}")
        if not 0 <= holdout < 0.9:
            raise InvalidArgument(f"holdout is {holdout}; it must be in [0, 0.9)")
        if kind == "chain":
            links = self._check_chain(chain, source, target, config, cal, holdout)
        else:
            if chain:
                raise InvalidArgument(f"chain names the links of a chain transform; a {kind} transform takes none")
            _check_fit(kind, source, target, config, cal, holdout or DEFAULT_HOLDOUT)
            links = []
        with self.lock:
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

    def _check_chain(
        self,
        chain: list[str],
        source: SpaceRow,
        target: SpaceRow,
        config: dict[str, Any],
        cal: Calibration,
        holdout: float,
    ) -> list[Transform]:
        """The ready links of a chain request, each reading the space the link before it writes, from
        ``source`` into ``target``; InvalidArgument (NotFound for a link not ready) otherwise. A chain composes
        fitted transforms: pairs, a config or a holdout would be ignored, so they are refused."""
        if not chain:
            raise InvalidArgument("a chain transform needs `chain`: the names of its links")
        n_doc, n_query = len(cal.doc_new), len(cal.query_new)
        if n_doc or n_query or config or holdout:
            raise InvalidArgument(
                "a chain transform composes fitted transforms; it takes no pairs/config (got "
                f"{n_doc} doc pairs, {n_query} query pairs, config {config!r}, holdout {holdout:g}); "
                "evaluation queries and eval_only gallery pairs are the only data it takes"
            )
        links = [self._link(n) for n in chain]  # NotFound unless every link exists and is ready
        recs = [self.get(n) for n in chain]
        for i in range(1, len(recs)):
            prev, rec = recs[i - 1], recs[i]
            if rec.source != prev.target:
                raise InvalidArgument(
                    f"chain link {i} ({rec.name!r}) maps {rec.source!r} -> {rec.target!r}, but link {i - 1} "
                    f"({prev.name!r}) maps into {prev.target!r}: each link must read the space the link before it "
                    "writes"
                )
        first, last = recs[0], recs[-1]
        if (first.source, last.target) != (source.name, target.name):
            raise InvalidArgument(
                f"chain maps {first.source!r} -> {last.target!r}, not {source.name!r} -> {target.name!r}"
            )
        return links

    def cancel(self, name: str) -> TransformRecord:
        """Cancels the fit of ``name`` (:meth:`.FitJobs.cancel`): it is FAILED with error "cancelled"."""
        rec = self.get(name)
        if not self.jobs.cancel(rec):
            raise FailedPrecondition(f"transform {name!r} is {rec.state}, not fitting: there is no fit to cancel")
        return rec

    def users(self, name: str, collections: Iterable[AnyCollection]) -> list[str]:
        """What uses transform ``name``: live routes, shadows, chains and collection bases, one phrase each."""
        out = []
        for col in collections:
            if col.row.spec.basis_transform == name:
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

    def delete(self, name: str, collections: Iterable[AnyCollection]) -> TransformRecord:
        """Removes ``name`` (any state; a fit is cancelled first) from the registry and the store;
        FailedPrecondition naming its users while anything uses it. The caller holds the lock that
        serializes collection creation, so no new collection can take it as a basis meanwhile."""
        with self.lock:
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


def _check_fit(
    kind: str, source: SpaceRow, target: SpaceRow, config: dict[str, Any], cal: Calibration, holdout: float
) -> None:
    """InvalidArgument, before a fit of ``kind`` is queued, for what its fit would refuse: the config (keys,
    step caps, then every value: :func:`~.transforms.fit.build_config`), a home -> home kind between two
    spaces, and calibration pairs that are malformed or too few once ``holdout`` (the fit's, default applied)
    and the kind's own held-out slice are set aside."""
    from .transforms.fit import build_config, check_split, validate_calibration, validate_config

    try:
        validate_config(kind, config)
        check_steps(config)
        settings = build_config(kind, config, target.dim)
    except ValueError as e:
        raise InvalidArgument(f"config: {e}") from None
    if REGISTRY[kind].home and source.name != target.name:
        raise InvalidArgument(
            f"{kind} maps a collection's home space to itself (a basis_transform): source_space and target_space "
            f"must be the same space, got {source.name!r} -> {target.name!r}"
        )
    try:
        validate_calibration(cal, kind)
        check_split(cal, kind, config, settings, holdout)
    except ValueError as e:
        raise InvalidArgument(f"calibration data: {e}") from None
