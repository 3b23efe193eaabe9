"""Part 2: route swaps under load; no search may fail while routes change under it.

A gallery (HNSW32, 1,200 seeded old-model docs) gets two procrustes transforms
fitted from a new-model space (24-d, a rotated, shifted, padded copy of the old
one) into its home space (16-d). Three threads search with new-model queries
(routed), one over a SearchStream, one with home-space queries, and one upserts
more docs, while another thread activates one transform or the other (force),
rolls back, and turns a shadow on and off, as fast as it can. Every search must
answer OK with k ids that are gallery ids; ``failed_requests`` (here
``swap_failed_requests``) counts the ones that did not. Duration:
``RELIABILITY_SWAP_SECONDS`` (default 60).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from interlingua.v1 import points_pb2 as ppb
from interlingua.v1 import transforms_pb2 as tpb

from ._harness import ServerProcess, Stubs, env_float, make_data, record, vectors

pytestmark = [pytest.mark.slow, pytest.mark.reliability, pytest.mark.timeout(900)]

D_OLD, D_NEW, N = 16, 24, 1200


def world(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """docs_old (N, D_OLD) and docs_new (N, D_NEW): new = [old/|old|, noise] rotated and shifted."""
    rng = np.random.default_rng(seed)
    docs_old = make_data(N, D_OLD, seed=seed)
    Q, _ = np.linalg.qr(rng.standard_normal((D_NEW, D_NEW)))
    x = docs_old / np.linalg.norm(docs_old, axis=1, keepdims=True)
    extra = 0.05 * rng.standard_normal((N, D_NEW - D_OLD))
    docs_new = (np.hstack([x, extra]) @ Q + 0.8 * rng.standard_normal(D_NEW)).astype(np.float32)
    return docs_old, docs_new


def fit(s: Stubs, name: str, new: np.ndarray, old: np.ndarray) -> None:
    def requests() -> Iterator[tpb.FitTransformRequest]:
        yield tpb.FitTransformRequest(
            header=tpb.FitHeader(
                name=name, kind=tpb.TRANSFORM_KIND_PROCRUSTES, source_space="new@2", target_space="old@1"
            )
        )
        yield tpb.FitTransformRequest(
            pairs=tpb.PairBatch(side=tpb.PAIR_SIDE_DOC, source=vectors(new), target=vectors(old))
        )

    s.transforms.FitTransform(requests(), metadata=s.md, timeout=60)
    deadline = time.monotonic() + 120
    while True:
        info = s.transforms.GetTransform(tpb.GetTransformRequest(name=name), metadata=s.md, timeout=10)
        if info.state == tpb.TRANSFORM_STATE_READY:
            return
        assert info.state == tpb.TRANSFORM_STATE_FITTING, f"fit {name} failed: {info.error}"
        assert time.monotonic() < deadline, f"fit {name} still running"
        time.sleep(0.1)


def test_route_swaps_under_load(server: Callable[..., ServerProcess]) -> None:
    seconds = env_float("RELIABILITY_SWAP_SECONDS", 60)
    srv = server("swaps")
    srv.start_serving()
    s = srv.stubs()
    s.register("old@1", D_OLD)
    s.register("new@2", D_NEW)
    s.create("gallery", "old@1", "HNSW32")
    docs_old, docs_new = world()
    s.upsert("gallery", "old@1", [f"g{i}" for i in range(N)], docs_old)
    fit(s, "p1", docs_new[: N // 2], docs_old[: N // 2])
    fit(s, "p2", docs_new[N // 2 :], docs_old[N // 2 :])
    s.transforms.ActivateRoute(
        tpb.ActivateRouteRequest(collection="gallery", transform="p1", force=True), metadata=s.md
    )

    stop = threading.Event()
    lock = threading.Lock()
    counts: Counter[str] = Counter()
    failures: list[str] = []

    def fail(what: str) -> None:
        with lock:
            failures.append(what)

    def check(ids: list[str] | np.ndarray, nq: int, k: int, where: str) -> None:
        if len(ids) != nq * k or any(not i.startswith(("g", "w")) for i in ids):
            fail(f"{where}: bad reply ids {list(ids)[:5]}")

    def searcher(space: str, pool: np.ndarray, seed: int) -> None:
        rng = np.random.default_rng(seed)
        st = srv.stubs()
        while not stop.is_set():
            nq = int(rng.integers(1, 9))
            xq = pool[rng.integers(0, len(pool), nq)]
            try:
                _, I = st.search("gallery", space, xq, 10, timeout=10)
            except grpc.RpcError as e:
                fail(f"search {space}: {e.code().name}: {e.details()}")
                continue
            check(I.ravel().tolist(), nq, 10, f"search {space}")
            with lock:
                counts[f"search_{space}"] += 1

    def streamer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        st = srv.stubs()

        def requests() -> Iterator[ppb.SearchRequest]:
            while not stop.is_set():
                xq = docs_new[rng.integers(0, N, 4)]
                yield ppb.SearchRequest(collection="gallery", query_space="new@2", k=10, queries=vectors(xq))
                time.sleep(0.002)

        while not stop.is_set():
            try:
                for r in st.points.SearchStream(requests(), metadata=st.md, timeout=seconds + 60):
                    check(list(r.ids), 4, 10, "stream")
                    with lock:
                        counts["search_stream"] += 1
            except grpc.RpcError as e:
                fail(f"stream: {e.code().name}: {e.details()}")

    def writer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        st = srv.stubs()
        i = 0
        while not stop.is_set():
            x = make_data(8, D_OLD, seed=int(rng.integers(1 << 30)))
            try:
                st.upsert("gallery", "old@1", [f"w{i + j}" for j in range(8)], x, timeout=10)
                with lock:
                    counts["upsert"] += 1
            except grpc.RpcError as e:
                fail(f"upsert: {e.code().name}: {e.details()}")
            i += 8
            time.sleep(0.02)

    def swapper(seed: int) -> None:
        rng = random.Random(seed)
        st = srv.stubs()
        live = "p1"
        while not stop.is_set():
            other = "p2" if live == "p1" else "p1"
            try:
                req = tpb.ActivateRouteRequest(collection="gallery", transform=other, force=True)
                st.transforms.ActivateRoute(req, metadata=st.md, timeout=10)
                live = other
                with lock:
                    counts["activate"] += 1
                if rng.random() < 0.4:
                    req_rb = tpb.RollbackRouteRequest(collection="gallery", query_space="new@2")
                    r = st.transforms.RollbackRoute(req_rb, metadata=st.md, timeout=10)
                    assert r.transform in ("p1", "p2"), f"rollback left {r.transform!r}"
                    live = r.transform
                    with lock:
                        counts["rollback"] += 1
                if rng.random() < 0.2:
                    shadow = "" if rng.random() < 0.5 else ("p2" if live == "p1" else "p1")
                    req_sh = tpb.SetShadowRequest(
                        collection="gallery", query_space="new@2", transform=shadow, sample_rate=0.5 if shadow else 0
                    )
                    st.transforms.SetShadow(req_sh, metadata=st.md, timeout=10)
                    with lock:
                        counts["shadow"] += 1
            except grpc.RpcError as e:
                fail(f"swap: {e.code().name}: {e.details()}")
            time.sleep(rng.uniform(0, 0.02))

    threads = [
        threading.Thread(target=searcher, args=("new@2", docs_new, 1)),
        threading.Thread(target=searcher, args=("new@2", docs_new, 2)),
        threading.Thread(target=searcher, args=("new@2", docs_new, 3)),
        threading.Thread(target=searcher, args=("old@1", docs_old, 4)),
        threading.Thread(target=streamer, args=(5,)),
        threading.Thread(target=writer, args=(6,)),
        threading.Thread(target=swapper, args=(7,)),
    ]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a load thread hangs"
    assert srv.alive()

    searches = sum(v for k, v in counts.items() if k.startswith("search"))
    print(f"route swaps: {json.dumps(dict(counts))}, {len(failures)} failures")
    record(
        swap_failed_requests=len(failures),
        swap_searches=searches,
        swap_route_changes=counts["activate"] + counts["rollback"],
    )
    assert counts["activate"] > 0 and searches > 0
    assert not failures, f"{len(failures)} failed requests, first: {failures[:10]}"
