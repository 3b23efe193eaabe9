"""Helpers shared by the benchmark scripts: logging, machine facts, batching, recall and timing.

The scripts in ``bench/`` import from here (and :mod:`_data` for the vectors), never from each
other. Nothing here prints to stdout: reports are the scripts' own.

* :func:`log`: one time-stamped progress line on stderr;
* :func:`machine_info` (:func:`machine_basics` and more): date, CPU, cores, versions and load, for
  the JSON line of a report;
* :func:`batches_of`: a query set cut into (nq, d) batches;
* :func:`recall_at`: Recall@k of approximate labels against exact ones; :func:`labels_of`: service
  ids back to row labels;
* :class:`Window`, :func:`warm_up`, :func:`run_window`, :func:`run_threads`, :func:`interleaved`:
  fixed wall-clock windows of calls, the sides of a comparison run in alternating slices.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import grpc
import numpy as np

__all__ = [
    "SLICE_S",
    "Call",
    "Window",
    "batches_of",
    "interleaved",
    "labels_of",
    "log",
    "machine_basics",
    "machine_info",
    "recall_at",
    "run_threads",
    "run_window",
    "warm_up",
]

K = 10
SLICE_S = 0.5  #: seconds of one side before switching to the other


def log(msg: str) -> None:
    """A progress line on stderr, time-stamped."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine_basics() -> dict[str, Any]:
    """Date, CPU model, cores and Python version: the start of every report's ``machine``."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }


def machine_info() -> dict[str, Any]:
    """:func:`machine_basics`, the library versions and the load average at the start."""
    return {
        **machine_basics(),
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "grpcio": grpc.__version__,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def batches_of(xq: np.ndarray, nq: int, most: int | None = None) -> list[np.ndarray]:
    """Contiguous batches of ``nq`` queries (a last partial batch is dropped), at most ``most``."""
    out = [np.ascontiguousarray(xq[i : i + nq]) for i in range(0, len(xq) - nq + 1, nq)]
    return out if most is None else out[:most]


def recall_at(I: np.ndarray, gt: np.ndarray, k: int = K) -> float:
    """Mean |I[i, :k] & gt[i, :k]| / k: Recall@k of an approximate result against exact labels."""
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(I, gt, strict=True)]))


def labels_of(ids: np.ndarray) -> np.ndarray:
    """Service point ids ("17") back to row labels (17); "" (no hit) -> -1."""
    return np.array([int(s) if s else -1 for s in ids.ravel()], dtype=np.int64).reshape(ids.shape)


# -- timing --------------------------------------------------------------------------------------


@dataclass
class Window:
    calls: int
    seconds: float
    nq: int
    lat: np.ndarray = field(default_factory=lambda: np.zeros(0))  #: per-call seconds (sequential runs)

    @property
    def qps(self) -> float:
        return self.calls * self.nq / self.seconds

    def pct_ms(self, q: float) -> float:
        return float(np.percentile(self.lat, q) * 1e3) if self.lat.size else float("nan")

    def __add__(self, other: Window) -> Window:
        return Window(self.calls + other.calls, self.seconds + other.seconds, self.nq, np.hstack([self.lat, other.lat]))


Call = Callable[[Any], object]


def warm_up(call: Call, batches: Sequence[Any], seconds: float = 0.3, calls: int = 3) -> None:
    i, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end or i < calls:
        call(batches[i % len(batches)])
        i += 1


def run_window(call: Call, batches: Sequence[Any], nq: int, seconds: float, offset: int = 0) -> Window:
    """Sequential calls over ``batches`` (cycled from ``offset``) for ``seconds``, timing each call."""
    lat: list[float] = []
    t = start = time.perf_counter()
    end, i = start + seconds, 0
    while t < end:
        call(batches[(offset + i) % len(batches)])
        t2 = time.perf_counter()
        lat.append(t2 - t)
        t, i = t2, i + 1
    return Window(i, t - start, nq, np.array(lat))


def run_threads(
    call: Call, batches: Sequence[Any], nq: int, seconds: float, threads: int, init: Callable[[], None] | None
) -> Window:
    """Like :func:`run_window` from ``threads`` threads at once (each at its own offset, after one
    untimed call); the window spans the first start to the last finish."""
    barrier = threading.Barrier(threads)
    out: list[tuple[int, float, float]] = [(0, 0.0, 0.0)] * threads

    def worker(j: int) -> None:
        if init is not None:
            init()
        off = j * len(batches) // threads
        call(batches[off])
        barrier.wait()
        t = start = time.perf_counter()
        end, i = start + seconds, 0
        while t < end:
            call(batches[(off + 1 + i) % len(batches)])
            t, i = time.perf_counter(), i + 1
        out[j] = (i, start, t)

    pool = [threading.Thread(target=worker, args=(j,)) for j in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    calls = sum(c for c, _, _ in out)
    return Window(calls, max(e for _, _, e in out) - min(s for _, s, _ in out), nq)


def interleaved(
    sides: dict[str, Call],
    batches: Sequence[Any],
    nq: int,
    seconds: float,
    *,
    threads: int = 1,
    init: Callable[[], None] | None = None,
    slice_s: float = SLICE_S,
) -> dict[str, Window]:
    """``seconds`` of calls per side, run in alternating slices (A B B A A B ...) so that both sides
    see the same machine: a shared 2-core VM drifts by more than the differences measured here."""
    rounds = max(1, round(seconds / slice_s))
    names = list(sides)
    acc: dict[str, Window] = {}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            if threads > 1:
                w = run_threads(sides[name], batches, nq, seconds / rounds, threads, init)
            else:
                w = run_window(sides[name], batches, nq, seconds / rounds, offset=acc[name].calls if r else 0)
            acc[name] = acc[name] + w if name in acc else w
    return acc
