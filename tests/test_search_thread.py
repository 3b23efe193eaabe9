"""Where the server's threads run: the one search thread (server/search_thread.py) gives results
and errors back to the caller, runs batches while single queries run inline, and concurrent callers
get exactly what a serial search gives; the maintenance thread runs at a lower priority."""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import brute_force, make_data, start_server

from interlingua.server.device import Device
from interlingua.server.lifecycle import lower_priority
from interlingua.server.search_thread import SearchThread


def test_run_returns_and_raises() -> None:
    st = SearchThread(1)
    try:
        assert st.run(lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(ZeroDivisionError):
            st.run(lambda: 1 / 0)
        assert st.run(threading.current_thread).name == "interlingua-search"
        assert st.run(lambda: st.run(lambda: 7)) == 7  # a call from the search thread runs inline
    finally:
        st.close()
    with pytest.raises(RuntimeError, match="search thread has stopped"):
        st.run(lambda: 1)


def test_batches_on_the_search_thread_single_queries_inline() -> None:
    seen: list[str] = []

    class Probe:
        def search(self, xq: np.ndarray, k: int, params: object = None) -> tuple[np.ndarray, np.ndarray]:
            seen.append(threading.current_thread().name)
            return np.zeros((len(xq), k), np.float32), np.zeros((len(xq), k), np.int64)

    dev = Device.parse("cpu")
    try:
        dev.search_cpu(Probe(), np.zeros((1, 4), np.float32), 3)
        dev.search_cpu(Probe(), np.zeros((5, 4), np.float32), 3)
    finally:
        dev.close()
    assert seen == [threading.current_thread().name, "interlingua-search"]


@pytest.mark.parametrize("spec", ["Flat", "HNSW16"])
def test_concurrent_callers_match_serial(spec: str) -> None:
    d = 24
    xb, xq = make_data(3000, d, seed=3), make_data(200, d, seed=4)
    index = faiss.index_factory(d, spec, faiss.METRIC_L2)
    index.add(xb)
    D0, I0 = index.search(xq, 10)
    if spec == "Flat":
        _, Iref = brute_force(xb, xq, 10, "l2")
        assert (Iref == I0).mean() > 0.99  # float32 ties aside, FAISS's Flat is the numpy reference
    dev = Device.parse("cpu")
    dev.omp_threads = 2
    batches = [(i, i + n) for i, n in zip(range(0, 200, 20), [1, 2, 7, 20, 1, 13, 20, 1, 5, 20], strict=True)]
    try:
        with ThreadPoolExecutor(6) as pool:
            futs = [(a, b, pool.submit(dev.search_cpu, index, xq[a:b], 10)) for a, b in batches * 5]
            for a, b, f in futs:
                D, I = f.result()
                np.testing.assert_array_equal(I, I0[a:b])
                np.testing.assert_allclose(D, D0[a:b], rtol=1e-6)
    finally:
        dev.close()


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
def test_maintenance_thread_runs_at_lower_priority(tmp_path: Path) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    server, _ = start_server(tmp_path / "data", maintenance_nice=3)
    try:
        (maint,) = [t for t in threading.enumerate() if t.name == "interlingua-maintain"]
        assert maint.native_id is not None
        deadline = time.monotonic() + 5
        while os.getpriority(os.PRIO_PROCESS, maint.native_id) == base and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.getpriority(os.PRIO_PROCESS, maint.native_id) == min(base + 3, 19)
        assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the caller's own priority is untouched
    finally:
        server.stop(None)


def test_lower_priority_is_inherited_by_threads_it_starts() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    seen: dict[str, int] = {}

    def child() -> None:
        seen["child"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def parent() -> None:
        lower_priority(2)
        seen["parent"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        t = threading.Thread(target=child)
        t.start()
        t.join()

    t = threading.Thread(target=parent)
    t.start()
    t.join()
    if sys.platform == "linux":
        assert seen == {"parent": min(base + 2, 19), "child": min(base + 2, 19)}
    lower_priority(0)  # a no-op
    assert os.getpriority(os.PRIO_PROCESS, 0) == base
