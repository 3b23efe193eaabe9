"""Part 4: the index specs of issue 10 neither crash the server nor block its restart.

For each spec (HNSW1, HNSW0, IVF4_HNSW1,Flat, HNSW1_PQ4 on a 16-d space; IVF4,PQ48
with train_min_points=4 and 10 points; NSG2 with 50 points; IVF5000000,Flat) the
CreateCollection is either refused (INVALID_ARGUMENT or RESOURCE_EXHAUSTED) or
accepted; then valid specs at the grammar's boundaries (HNSW M = 2, PQ 4 bits, PCA
and OPQ before IVF-PQ), some trained on degenerate data (every point the same
vector). The points are upserted and the server gets a few seconds
(``RELIABILITY_BAD_SPEC_WAIT``, default 4) to merge, train or fail. Then it is
restarted (SIGTERM, start again), after every spec: it must reach SERVING within 60 s
(``bricked_restarts`` counts those that do not), the healthy collections beside it
must still answer searches exactly, and a search of the bad one answers OK or
FAILED_PRECONDITION (a collection marked failed), never INTERNAL. Bad collections
pile up: each restart loads all the earlier ones too. The server's log is read for
tracebacks, so that a failure retried in a tight loop shows.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from ._harness import ServerProcess, Stubs, env_float, make_data, record

pytestmark = [pytest.mark.slow, pytest.mark.reliability, pytest.mark.timeout(1800)]

#: (spec, space, train_min_points, points to upsert, data): the issue's specs, then valid specs at
#: the grammar's boundaries, some trained on degenerate data (every point the same vector)
SPECS = [
    ("HNSW1", "s16", 0, 50, "random"),
    ("HNSW0", "s16", 0, 50, "random"),
    ("IVF4_HNSW1,Flat", "s16", 0, 50, "random"),
    ("HNSW1_PQ4", "s16", 0, 50, "random"),
    ("IVF4,PQ48", "s48", 4, 10, "random"),
    ("IVF4,PQ48", "s16", 4, 10, "random"),
    ("NSG2", "s16", 0, 50, "random"),
    ("IVF5000000,Flat", "s16", 0, 50, "random"),
    ("HNSW2", "s16", 0, 50, "random"),
    ("IVF4_HNSW2,Flat", "s16", 0, 50, "random"),
    ("HNSW2_PQ4x4", "s16", 0, 60, "same"),
    ("IVF4,PQ48", "s48", 256, 300, "same"),
    ("PCA8,IVF4,PQ4x4", "s16", 16, 40, "same"),
    ("OPQ4,IVF4,PQ4x4", "s16", 256, 300, "same"),
]
DIMS = {"s16": 16, "s48": 48}
REFUSED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
GOOD = {"good-flat": "Flat", "good-hnsw": "HNSW32"}


def setup_good(s: Stubs) -> np.ndarray:
    for name, dim in DIMS.items():
        s.register(name, dim, "l2")
    x = make_data(300, 16, seed=3)
    for col, spec in GOOD.items():
        s.create(col, "s16", spec)
        s.upsert(col, "s16", [f"g{i}" for i in range(len(x))], x)
    return x


def good_collections_answer(s: Stubs, x: np.ndarray) -> list[str]:
    problems = []
    for col in GOOD:
        try:
            _, I = s.search(col, "s16", x[:20], 5, timeout=10, **({"ef_search": 128} if "hnsw" in col else {}))
            hits = sum(row[0] == f"g{i}" for i, row in enumerate(I))
            if hits < (20 if col == "good-flat" else 18):
                problems.append(f"{col}: {hits}/20 queries found themselves")
        except grpc.RpcError as e:
            problems.append(f"{col}: {e.code().name}: {e.details()}")
    return problems


def tracebacks(srv: ServerProcess) -> int:
    try:
        return srv.log.read_text(errors="replace").count("Traceback")
    except OSError:
        return 0


def test_bad_index_specs_never_brick_the_server(server: Callable[..., ServerProcess]) -> None:
    wait = env_float("RELIABILITY_BAD_SPEC_WAIT", 4)
    generation = 0
    srv = server("specs0")
    srv.start_serving()
    s = srv.stubs()
    x = setup_good(s)
    bricked, crashed, internal, others = 0, 0, [], []
    outcomes: dict[str, str] = {}
    retries: dict[str, int] = {}
    for i, (spec, space, train_min, n, data) in enumerate(SPECS):
        label, col = f"{spec} on {space}, {n} points", f"bad-{i}"
        rss0 = srv.rss_mb()
        accepted = True
        try:
            s.create(col, space, spec, train_min)
            outcomes[label] = "accepted"
        except grpc.RpcError as e:
            accepted = False
            outcomes[label] = f"refused {e.code().name}"
            if e.code() not in REFUSED:
                internal.append(f"create {label}: {e.code().name}: {e.details()}")
            print(f"{label}: {e.code().name}: {(e.details() or '')[:150]}; RSS +{srv.rss_mb() - rss0:.0f} MB")
        tb0 = tracebacks(srv)
        if accepted:
            xb = make_data(n, DIMS[space], seed=i)
            if data == "same":
                xb[:] = xb[0]
            try:
                s.upsert(col, space, [f"b{j}" for j in range(n)], xb)
            except grpc.RpcError as e:
                outcomes[label] += f", upsert {e.code().name}"
                if e.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE):
                    internal.append(f"upsert {label}: {e.code().name}: {e.details()}")
            time.sleep(wait)
        if not srv.alive():  # died by itself (a FAISS abort or segfault)
            crashed += 1
            outcomes[label] += ", CRASHED the server"
        else:
            retries[label] = tracebacks(srv) - tb0
            if accepted:
                try:
                    s.search(col, space, make_data(2, DIMS[space], seed=99), 3, timeout=10)
                    outcomes[label] += ", search OK"
                except grpc.RpcError as e:
                    outcomes[label] += f", search {e.code().name}"
                    if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                        internal.append(f"search {label}: {e.code().name}: {e.details()}")
            srv.stop()
        srv.start()
        took = srv.wait_serving(60)
        if took is None:
            bricked += 1
            outcomes[label] += ", restart BRICKED"
            print(f"{label}: restart did not reach SERVING:\n{srv.log_tail(20)}")
            srv.stop(grace=5)
            generation += 1  # go on with a fresh data dir
            srv = server(f"specs{generation}")
            srv.start_serving()
            s = srv.stubs()
            x = setup_good(s)
            continue
        outcomes[label] += f", restart SERVING in {took:.1f}s"
        s = srv.stubs()
        others += [f"after {label}: {p}" for p in good_collections_answer(s, x)]
        try:
            info = s.info(col)
            if not accepted:
                internal.append(f"{label}: refused, yet the collection exists after the restart")
            elif info.failure_reason:
                outcomes[label] += f", marked failed: {info.failure_reason[:80]}"
        except grpc.RpcError as e:
            if accepted or e.code() != grpc.StatusCode.NOT_FOUND:
                internal.append(f"get {label} after restart: {e.code().name}: {e.details()}")
        print(f"{label}: {outcomes[label]}; {retries.get(label, 0)} tracebacks in {wait:g}s")

    record(
        bricked_restarts=bricked,
        bad_spec_crashes=crashed,
        bad_spec_internal=len(internal),
        bad_spec_other_collection_failures=len(others),
        bad_spec_outcomes=outcomes,
        bad_spec_max_tracebacks=max(retries.values(), default=0),
    )
    assert not bricked and not crashed, outcomes
    assert not internal, internal
    assert not others, others
    assert max(retries.values(), default=0) <= 10, f"a failure retried in a tight loop: {retries}"
