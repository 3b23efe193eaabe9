"""One thread for every multi-query FAISS search, so that one OpenMP team serves them all.

FAISS parallelizes a batch over its queries with OpenMP, and libgomp keeps one team of worker
threads per *calling* thread. Called from the gRPC pool's threads, each of them grows its own
team, and an idle team's workers spin for a while after each batch (``GOMP_SPINCOUNT``), stealing
the cores the next batch's team needs: on 2 cores a 64-query HNSW batch took 4.7 ms from a pool of
4 callers against 2.0 ms from one (same index, same process). So the server hands every batch of
more than one query to :class:`SearchThread`, whose one thread owns the only search team
(``ServerConfig.omp_threads`` wide), and searches of a single query on the calling thread with
OpenMP off: one query gains nothing from a team (HNSW and IVF split a batch by query; a flat
index answered one query in 7.3 ms with one thread and 17 ms with two), and skipping the handoff
keeps single-query latency low. Concurrent single queries from several clients still run in
parallel, one per gRPC thread. ``bench/peers.py`` measures the effect end to end.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import faiss

__all__ = ["SearchThread"]

T = TypeVar("T")


class _Job:
    __slots__ = ("args", "done", "error", "fn", "result")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Lock()  # a latch: held until the job has run
        self.done.acquire()


class SearchThread:
    """Runs ``fn(*args)`` on one daemon thread with ``omp_threads`` OpenMP threads; :meth:`run`
    blocks until it returns (or re-raises what it raised). Calls from that thread run inline."""

    def __init__(self, omp_threads: int, name: str = "interlingua-search") -> None:
        self.omp_threads = omp_threads
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        faiss.omp_set_num_threads(self.omp_threads)
        while (job := self._jobs.get()) is not None:
            try:
                job.result = job.fn(*job.args)
            except BaseException as e:  # handed to the caller, raised there
                job.error = e
            job.done.release()

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        if threading.current_thread() is self._thread:
            return fn(*args)
        if not self._thread.is_alive():
            raise RuntimeError("the search thread has stopped")
        job = _Job(fn, args)
        self._jobs.put(job)
        job.done.acquire()
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[no-any-return]

    def close(self, timeout: float | None = 10.0) -> None:
        """Lets queued jobs finish, then stops the thread."""
        self._jobs.put(None)
        self._thread.join(timeout)
