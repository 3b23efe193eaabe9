"""The fit queue: one worker thread fits transforms in turn; a fit can be cancelled or run out of time.

:meth:`FitJobs.submit` queues a registered :class:`TransformRecord` (state ``fitting``); the worker fits
and evaluates it (:func:`~.transforms.artefact.build_artefact`), stores it and marks it ``ready``, or marks
it ``failed`` with the reason. A fit stops at its next progress step (the trained kinds report every
epoch, the closed-form kinds each stage; checked once more before the store write) when it was cancelled
(error ``"cancelled"``), ran past its budget (``"fit exceeded max_fit_seconds=…"``) or the service shuts
down. :meth:`FitJobs.cancel` marks the transform FAILED at once: a queued fit never runs, a running one
stops at its next step, and because the store write checks the flag under the same lock, a cancelled fit
is never stored. Outcomes are counted in ``interlingua_fits_total{kind,outcome}`` and ready fits timed in
``interlingua_fit_seconds{kind}``. Covered by ``tests/test_fit_limits.py``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import faiss

from .errors import Unavailable
from .metrics import Metrics
from .store import SpaceRow, Store, TransformRow
from .transforms import Calibration, Transform
from .transforms.artefact import EvalData, build_artefact

__all__ = ["DEFAULT_HOLDOUT", "OUTCOMES", "FitJobs", "TransformRecord"]

log = logging.getLogger(__name__)
OUTCOMES = ("ready", "failed", "cancelled", "timeout")  #: values of the ``outcome`` label of fits_total
DEFAULT_HOLDOUT = 0.1  #: the held-out slice of a fit whose request gives holdout 0


@dataclass
class TransformRecord:
    name: str
    kind: str
    source: str
    target: str
    config: dict[str, Any]
    created_at: float
    doc_pairs: int = 0
    query_pairs: int = 0
    state: str = "fitting"  #: fitting | ready | failed
    error: str = ""
    stage: str = "queued"
    progress: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)
    checksum: str = ""
    fn: Transform | None = None

    @property
    def d_in(self) -> int:
        return self.fn.d_in if self.fn is not None else 0

    @property
    def d_out(self) -> int:
        return self.fn.d_out if self.fn is not None else 0


class _Stop(Exception):
    """Raised inside a fit at a progress step: cancelled, out of time, or the service is closing."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass(eq=False)
class _Job:
    rec: TransformRecord
    max_seconds: float
    future: Future[None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: float = 0.0  #: time.monotonic() when the worker took it
    done: bool = False  #: its outcome is recorded


class FitJobs:
    """The fit worker and its queue. ``on_ready`` runs after a transform is stored and ready."""

    def __init__(
        self, store: Store, metrics: Metrics, on_ready: Callable[[TransformRecord], None], omp_threads: int = 1
    ) -> None:
        self.store, self.metrics, self._on_ready = store, metrics, on_ready
        omp = (omp_threads,)
        self._pool = ThreadPoolExecutor(1, "interlingua-fit", initializer=faiss.omp_set_num_threads, initargs=omp)
        self._lock = threading.Lock()  # outcomes, cancels and the store write of a fit
        self._jobs: dict[int, _Job] = {}  #: id(record) -> its job, while queued or running
        self._closing = threading.Event()

    def close(self) -> None:
        """Drops queued fits, stops a running one at its next progress step, and waits for the worker."""
        with self._lock:  # a submit either sees it or is queued before the shutdown (and dropped by it)
            self._closing.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(
        self,
        rec: TransformRecord,
        target: SpaceRow,
        cal: Calibration,
        eval_set: EvalData | None,
        holdout: float,
        links: list[Transform],
        max_seconds: float,
    ) -> None:
        """Queues the fit of ``rec``; it runs for at most ``max_seconds`` once started. Unavailable once
        the service is shutting down."""
        job = _Job(rec, max_seconds)
        with self._lock:
            if self._closing.is_set():
                raise Unavailable("the service is shutting down: no new fits")
            self._jobs[id(rec)] = job
            job.future = self._pool.submit(self._run, job, target, cal, eval_set, holdout, links)

    def cancel(self, rec: TransformRecord) -> bool:
        """Cancels the fit of ``rec`` and marks it FAILED "cancelled"; False when it is not fitting."""
        with self._lock:
            job = self._jobs.get(id(rec))
            if job is None:
                return False
            job.cancelled.set()
            if job.future is not None:
                job.future.cancel()  # a queued fit leaves the queue; a running one stops at its next step
            self._finish(job, "cancelled", "cancelled")
        return True

    def _check(self, job: _Job) -> None:
        if job.cancelled.is_set():
            raise _Stop("cancelled", "cancelled")
        if self._closing.is_set():
            raise _Stop("cancelled", "the service is shutting down")
        elapsed = time.monotonic() - job.started
        if elapsed > job.max_seconds:
            raise _Stop("timeout", f"fit exceeded max_fit_seconds={job.max_seconds:g} (stopped after {elapsed:.1f} s)")

    def _finish(self, job: _Job, outcome: str, error: str = "") -> None:
        """Records the outcome of ``job`` once (the first caller wins). Call with the lock held."""
        if job.done:
            return
        job.done = True
        self._jobs.pop(id(job.rec), None)
        rec = job.rec
        if outcome == "ready":
            rec.state, rec.stage, rec.progress = "ready", "done", 1.0
        else:
            rec.state, rec.error = "failed", error
        self.metrics.fits.labels(rec.kind, outcome).inc()

    def _run(
        self,
        job: _Job,
        target: SpaceRow,
        cal: Calibration,
        eval_set: EvalData | None,
        holdout: float,
        links: list[Transform],
    ) -> None:
        rec = job.rec
        job.started = time.monotonic()

        def progress(stage: str, fraction: float) -> None:
            self._check(job)
            rec.stage, rec.progress = stage, float(fraction)

        try:
            self._check(job)
            art = build_artefact(
                rec.kind,
                cal,
                rec.config,
                home_metric=target.metric,
                holdout=holdout or DEFAULT_HOLDOUT,
                eval_data=eval_set,
                links=links,
                progress=progress,
            )
            fn = art.transform
            row = TransformRow(
                rec.name,
                rec.kind,
                rec.source,
                rec.target,
                json.dumps(art.config),
                json.dumps(art.report),
                art.checksum,
                fn.d_in,
                fn.d_out,
                rec.created_at,
                rec.doc_pairs,
                rec.query_pairs,
                art.weights(),
            )
            with self._lock:
                self._check(job)
                self.store.add_transform(row)
                rec.config, rec.report, rec.checksum, rec.fn = art.config, art.report, art.checksum, fn
                self._finish(job, "ready")
            self.metrics.fit_seconds.labels(rec.kind).observe(time.monotonic() - job.started)
            self._on_ready(rec)
        except _Stop as e:
            log.info("fit of transform %s stopped: %s", rec.name, e)
            with self._lock:
                self._finish(job, e.outcome, str(e))
        except Exception as e:  # a failed fit is reported on the transform, never raised into a thread
            log.exception("fitting transform %s failed", rec.name)
            with self._lock:
                self._finish(job, "failed", f"{type(e).__name__}: {e}")
