"""Part 5: a soak of overwrites and deletes on a few thousand live ids; memory must stay bounded.

One writer overwrites batches of 200 of 3,000 ids (HNSW32, 32-d, l2) with new vectors
and deletes 100 now and then (they come back with later overwrites), so dead labels
pile up as fast as the server can write, while a searcher runs 8-query batches.
Every 5 s the server's RSS (``/proc/<pid>/status`` VmRSS), the collection's dead
labels (``CollectionInfo.deleted_labels``; also ``interlingua_dead_labels`` from
/metrics) and compactions are sampled. ``soak_rss_growth_mb`` is the last sample
minus the first after the warm-up (a fifth of the run, at most 60 s). Duration:
``RELIABILITY_SOAK_SECONDS`` (``--soak-seconds`` of the driver; default 600). At
the end the store must equal the model (counts, a sample of exact vectors, searches
finding themselves), and after a restart the dead labels are reported again.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from ._harness import ServerProcess, Stubs, env_float, metric_values, record

SOAK_SECONDS = env_float("RELIABILITY_SOAK_SECONDS", 600)
pytestmark = [pytest.mark.slow, pytest.mark.reliability, pytest.mark.timeout(int(SOAK_SECONDS) + 600)]

D, LIVE = 32, 3000


def dead_from_metrics(srv: ServerProcess) -> float | None:
    try:
        values = metric_values(srv.metrics(), "interlingua_dead_labels")
    except OSError:
        return None
    return sum(values.values()) if values else None


def test_soak_overwrites_and_deletes(server: Callable[..., ServerProcess]) -> None:
    warmup = min(60.0, SOAK_SECONDS / 5)
    srv = server("soak")
    srv.start_serving()
    s = srv.stubs()
    s.register("s@1", D, "l2")
    s.create("soak", "s@1", "HNSW32")
    rng = np.random.default_rng(7)
    model: dict[str, np.ndarray] = {}
    x = rng.standard_normal((LIVE, D)).astype(np.float32)
    ids = [f"p{i}" for i in range(LIVE)]
    for i in range(0, LIVE, 500):
        s.upsert("soak", "s@1", ids[i : i + 500], x[i : i + 500])
    model.update(zip(ids, x, strict=True))

    stop = threading.Event()
    failures: list[str] = []
    ops = {"upserts": 0, "deletes": 0, "searches": 0}
    windows: list[int] = []  # search batches per 10 s

    def writer() -> None:
        r = random.Random(1)
        st = srv.stubs()
        while not stop.is_set():
            try:
                if r.random() < 0.2:
                    pids = r.sample(ids, 100)
                    st.delete("soak", pids)
                    for p in pids:
                        model.pop(p, None)
                    ops["deletes"] += 1
                else:
                    pids = r.sample(ids, 200)
                    xb = rng.standard_normal((200, D)).astype(np.float32)
                    st.upsert("soak", "s@1", pids, xb)
                    model.update(zip(pids, xb, strict=True))
                    ops["upserts"] += 1
            except grpc.RpcError as e:
                failures.append(f"write: {e.code().name}: {e.details()}")
                time.sleep(0.5)

    def searcher() -> None:
        st = srv.stubs()
        q = np.random.default_rng(3).standard_normal((8, D)).astype(np.float32)
        n, t0 = 0, time.monotonic()
        while not stop.is_set():
            try:
                st.search("soak", "s@1", q, 10, timeout=30)
                n += 1
                ops["searches"] += 1
            except grpc.RpcError as e:
                failures.append(f"search: {e.code().name}: {e.details()}")
            if time.monotonic() - t0 >= 10:
                windows.append(n)
                n, t0 = 0, time.monotonic()

    threads = [threading.Thread(target=writer), threading.Thread(target=searcher)]
    for t in threads:
        t.start()
    t_start = time.monotonic()
    #: (t, RSS MB, dead labels, dead labels from /metrics, compactions, fresh vectors, checkpoint lag)
    samples: list[tuple[float, float, int, float | None, int, int, int]] = []
    try:
        while (elapsed := time.monotonic() - t_start) < SOAK_SECONDS:
            info = s.info("soak")
            lag = info.last_sequence - info.checkpoint_sequence
            dead_metric = dead_from_metrics(srv)
            samples.append(
                (elapsed, srv.rss_mb(), info.deleted_labels, dead_metric, info.compactions, info.fresh_vectors, lag)
            )
            time.sleep(5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    after = [smp for smp in samples if smp[0] >= warmup] or samples[-1:]
    growth = after[-1][1] - after[0][1]
    for smp in samples[:: max(1, len(samples) // 12)] + samples[-1:]:
        print(
            f"t={smp[0]:5.0f}s RSS {smp[1]:7.1f} MB, dead labels {smp[2]} (metric {smp[3]}), "
            f"compactions {smp[4]}, fresh {smp[5]}, checkpoint lag {smp[6]}"
        )

    unreachable: list[str] = []
    problems = verify(s, model, unreachable)
    info = s.info("soak")
    srv.stop()
    srv.start_serving()
    dead_after_restart = srv.stubs().info("soak").deleted_labels
    record(
        soak_rss_growth_mb=round(growth, 1),
        soak_seconds=SOAK_SECONDS,
        soak_rss_mb_first_after_warmup=round(after[0][1], 1),
        soak_rss_mb_last=round(after[-1][1], 1),
        soak_rss_mb_max=round(max(smp[1] for smp in samples), 1),
        soak_dead_labels_max=max(smp[2] for smp in samples),
        soak_dead_labels_end=info.deleted_labels,
        soak_dead_labels_after_restart=dead_after_restart,
        soak_dead_labels_metric_end=samples[-1][3],
        soak_compactions=info.compactions,
        soak_live_points=info.num_points,
        soak_upsert_batches=ops["upserts"],
        soak_delete_batches=ops["deletes"],
        soak_search_batches_per_10s_first=windows[0] if windows else None,
        soak_search_batches_per_10s_last=windows[-1] if windows else None,
        soak_failed_requests=len(failures),
        soak_store_mismatches=len(problems),
        soak_hnsw_unreachable=len(unreachable),
    )
    assert not failures, failures[:10]
    assert not problems, problems[:10]
    assert growth < 100, f"RSS grew {growth:.0f} MB after the warm-up"


def verify(s: Stubs, model: dict[str, np.ndarray], unreachable: list[str]) -> list[str]:
    """Store = model (counts, 200 exact vectors). Returns the problems; of 100 of those vectors, the
    ones that even ef_search 4096 does not find go to ``unreachable`` (HNSW nodes no search reaches)."""
    problems = []
    info = s.info("soak")
    if info.num_points != len(model):
        problems.append(f"{info.num_points} points stored, {len(model)} in the model")
    if info.indexed_vectors + info.fresh_vectors != info.num_points:
        problems.append(f"index live {info.indexed_vectors}+{info.fresh_vectors} != store {info.num_points}")
    sample = random.Random(2).sample(sorted(model), min(200, len(model)))
    got = s.get("soak", sample, "s@1")
    problems += [f"{p}: wrong or missing vector" for p in sample if not np.array_equal(got.get(p), model[p])]
    _, I = s.search("soak", "s@1", np.stack([model[p] for p in sample[:100]]), 10, ef_search=256)
    for p, row in zip(sample, I, strict=False):
        if p not in set(row):  # again near-exhaustively: an HNSW node no search reaches is not a lost write
            _, I2 = s.search("soak", "s@1", model[p][None], 100, ef_search=4096)
            if p not in set(I2[0]):  # its stored vector is checked above
                unreachable.append(f"{p}: not found by its own vector")
    return problems
