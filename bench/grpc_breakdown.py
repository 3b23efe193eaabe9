"""Where ``grpc_p50_over_echo_ms`` goes: one real server's search taken apart (issue 13).

``bench/peers.py``'s key is the service's unary p50 minus an empty echo's p50 minus the embedded
client's p50 on the same graph. This benchmark measures the parts of that difference on one HNSW32
collection of ``--n`` vectors (``--data``'s docs tiled, or seeded vectors), in one run:

1. ``interlingua serve`` on the data dir in a subprocess, with its metrics on. One client alternates
   an empty echo (the raw ``Health/Check`` bytes on the search's channel), a unary ``Client.search``
   of one query (a different query each call), and the same search as ``Client.search`` made it
   before 1 December (``search_before``: a message object through the generated stub, the reply read
   by the old ``SearchResult.from_proto``, :func:`result_before`); the echo is also sent padded with
   a query's bytes (an unknown field the server skips). The server's own
   ``grpc_server_handling_seconds`` (Search, Check) and ``interlingua_search_seconds{stage="index"}``
   (the FAISS call and the labels-to-ids lookup) are read from its /metrics before and after.
2. The server stopped, the same data dir opened by ``Client.embedded``: the same queries through the
   embedded client, through FAISS alone on the collection's own index, and through FAISS alone after
   a gap as long as the echo, slept (``time.sleep``: the CPU idles, as a server's does between
   searches) or spent in a busy wait.

Derived (means, ms): ``wire_and_client_ms`` = (search - echo) - (server Search - server Check): the
larger messages and the client's build and parse; ``server_python_ms`` = server Search - server index
stage (interceptors, servicer, checks, reply); ``server_index_slowdown_ms`` = the server's index stage
- FAISS alone back to back in process (the same search, slower in a server); ``idle_gap_ms`` = FAISS
after the slept gap - FAISS back to back; ``busy_gap_ms``, the same after the busy wait;
``padded_echo_ms`` = padded echo - echo; ``server_check_ms``; ``embedded_over_faiss_ms``. The parts
add up: ``over_echo_mean_ms`` = wire_and_client + server_python + server_index_slowdown -
server_check - embedded_over_faiss. ``over_echo_p50_ms`` is the peers key's
definition on these p50s; ``client_saves_ms`` = search_before - search. ``--pin`` puts
the server on CPU 1 and this process on CPU 0.

    nice -n -5 .venv/bin/python bench/grpc_breakdown.py --data ../shared/data/debdesc/dev --n 100000

Prints a table and, as its last line, one JSON object (the names above, plus ``echo_p50_ms``,
``search_p50_ms``, ``embedded_p50_ms``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from _data import load
from _peers import free_port
from embedded_overhead import make_data, wait_merged
from grpc_health.v1 import health_pb2

from interlingua.client import Client, Route, SearchResult
from interlingua.client._client import search_request
from interlingua.client._wire import _varint
from interlingua.v1 import points_pb2

K, SPACE, NQ = 10, "s", 2000  #: k; the space a new collection is made in; queries
_SAMPLE = re.compile(r"^(\w+)_(sum|count)\{(.*)\} (\S+)$")


def scrape(port: int) -> dict[tuple[str, str, str], float]:
    """(metric, labels, sum|count) -> value for the two histograms this benchmark reads."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) in ("grpc_server_handling_seconds", "interlingua_search_seconds"):
            out[(m.group(1), m.group(3), m.group(2))] = float(m.group(4))
    return out


def mean_ms(before: dict[Any, float], after: dict[Any, float], metric: str, *labels: str) -> float:
    """The mean in ms of the observations between two scrapes of the series whose labels hold ``labels``."""
    keys = [k for k in after if k[0] == metric and k[2] == "sum" and all(lab in k[1] for lab in labels)]
    if len(keys) != 1:
        raise SystemExit(f"{metric} {labels}: {len(keys)} series on /metrics")
    s, c = keys[0], (metric, keys[0][1], "count")
    n = after[c] - before.get(c, 0.0)
    return 1000 * (after[s] - before.get(s, 0.0)) / n if n else float("nan")


def build(folder: Path, name: str, xb: np.ndarray) -> str:
    """A cosine HNSW32 collection ``name`` of ``xb`` in ``folder`` (kept if already there, as
    bench/embedded_overhead.py's ``--keep`` leaves it), fully merged. Returns its home space."""
    with Client.embedded(folder, merge_idle_seconds=0.2) as client:
        built = name in {c.name for c in client.list_collections()}
        if not built:
            if SPACE not in {s.name for s in client.list_spaces()}:
                client.register_space(SPACE, xb.shape[1], "cosine")
            client.create_collection(name, SPACE, "HNSW32")
            for i in range(0, len(xb), 20000):
                ids = [f"p{j}" for j in range(i, min(i + 20000, len(xb)))]
                client.upsert(name, ids, xb[i : i + 20000], space=SPACE)
        wait_merged(client, name, len(xb), built_now=not built)
        return client.get_collection(name).home_space


def result_before(msg: points_pb2.SearchResponse) -> SearchResult:
    """``SearchResult.from_proto`` as it was before 1 December (without payloads)."""
    nq, k = msg.nq, msg.k
    scores = np.frombuffer(msg.scores, dtype="<f4").astype(np.float32).reshape(nq, k)
    ids = np.fromiter(msg.ids, dtype=object, count=len(msg.ids))
    r = msg.route
    return SearchResult(scores, ids.reshape(nq, k), None, Route(r.query_space, r.home_space, r.transform), msg.exact)


def query_of(i: int, side: str | int, sides: dict[str, Any], nq: int) -> int:
    """The query side ``side`` (a name or a position) searches at step ``i``: every side a different
    one (``nq`` > 4 x 397), and a query comes back 397 steps later at the earliest. A search right
    after one of the same query on the same index finds its graph path in the caches (0.3 ms faster
    at 1M)."""
    j = list(sides).index(side) if isinstance(side, str) else side
    return (i + 397 * j) % nq


def remote(
    folder: Path, name: str, space: str, xq: np.ndarray, calls: int, warmup: int, ef: int, pin: bool
) -> dict[str, Any]:
    """Step 1: echo and unary search times (s) alternated, and the server's means between two scrapes."""
    port, mport = free_port(), free_port()
    cmd = [str(Path(sys.executable).with_name("interlingua")), "serve", "--data-dir", str(folder), "--port", str(port),
           "--metrics-port", str(mport), "--omp-threads", "1", "--log-level", "WARNING"]  # fmt: skip
    proc = subprocess.Popen((["taskset", "-c", "1"] if pin else []) + cmd)
    try:
        client = Client(f"127.0.0.1:{port}", timeout=600)
        client.wait_ready(300)
        echo_call = client._channel.unary_unary("/grpc.health.v1.Health/Check")
        hreq = health_pb2.HealthCheckRequest().SerializeToString()
        # a query's bytes, as an unknown length-delimited field 15 the server skips
        hreq_padded = hreq + b"\x7a" + _varint(4 * xq.shape[1]) + b"\0" * (4 * xq.shape[1])
        sides = {
            "echo": lambda i: echo_call(hreq, timeout=60),
            "echo_padded": lambda i: echo_call(hreq_padded, timeout=60),
            "search": lambda i: client.search(name, xq[i : i + 1], K, space=space, ef_search=ef),
            "search_before": lambda i: result_before(
                client._points.Search(
                    search_request(name, xq[i : i + 1], K, space, ef, None, False), timeout=600, metadata=()
                )
            ),
        }
        for i in range(warmup):
            for f in sides.values():
                f(i % len(xq))
        t: dict[str, list[float]] = {s: [] for s in sides}
        before = scrape(mport)
        for i in range(calls):
            for s in sides if i % 2 else list(sides)[::-1]:
                t0 = time.perf_counter()
                sides[s](query_of(i, s, sides, len(xq)))
                t[s].append(time.perf_counter() - t0)
        after = scrape(mport)
        client.close()
    finally:
        proc.terminate()
        proc.wait(120)
    return {
        "times": t,
        "server_search_ms": mean_ms(before, after, "grpc_server_handling_seconds", '"Search"'),
        "server_check_ms": mean_ms(before, after, "grpc_server_handling_seconds", '"Check"'),
        "server_index_ms": mean_ms(before, after, "interlingua_search_seconds", f'collection="{name}"', '"index"'),
    }


def local(
    folder: Path, name: str, space: str, xq: np.ndarray, calls: int, warmup: int, ef: int, gap_s: float
) -> dict[str, list[float]]:
    """Step 2: the embedded client, FAISS alone on the same index, and FAISS alone after ``gap_s``
    slept or spent in a busy wait."""
    faiss.omp_set_num_threads(1)
    with Client.embedded(folder) as client:
        index = client._embedded.engine.collections[name].segments.snapshot.sealed
        params = faiss.SearchParametersHNSW(efSearch=ef)
        xn = xq / np.linalg.norm(xq, axis=1, keepdims=True)

        def after_gap(i: int, spin: bool) -> Any:
            end = time.perf_counter() + gap_s
            if spin:  # a busy wait: the CPU stays busy
                while time.perf_counter() < end:
                    pass
            else:  # the thread sleeps: the CPU idles, as a server's does between searches
                time.sleep(gap_s)
            t0 = time.perf_counter()
            index.search(xn[i : i + 1], K, params=params)
            return time.perf_counter() - t0

        sides = {
            "embedded": lambda i: client.search(name, xq[i : i + 1], K, space=space, ef_search=ef),
            "faiss": lambda i: index.search(xn[i : i + 1], K, params=params),
        }
        for i in range(warmup):
            for f in sides.values():
                f(i % len(xq))
        t: dict[str, list[float]] = {s: [] for s in (*sides, "faiss_after_gap", "faiss_after_spin")}
        for i in range(calls):
            for s in sides if i % 2 else list(sides)[::-1]:
                t0 = time.perf_counter()
                sides[s](query_of(i, s, sides, len(xq)))
                t[s].append(time.perf_counter() - t0)
            t["faiss_after_gap"].append(after_gap(query_of(i, 2, sides, len(xq)), False))
            t["faiss_after_spin"].append(after_gap(query_of(i, 3, sides, len(xq)), True))
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="a split folder (bench/_data.py); default: seeded vectors")
    ap.add_argument("--n", type=int, default=100_000, help="gallery vectors")
    ap.add_argument("--calls", type=int, default=3000, help="calls per side and step")
    ap.add_argument("--warmup", type=int, default=300, help="untimed calls per side first")
    ap.add_argument("--ef-search", type=int, default=128)
    ap.add_argument("--keep", type=Path, default=None, help="data dir to build in and reuse (default: a temporary one)")
    ap.add_argument("--collection", default="c", help="the collection to measure (built if missing)")
    ap.add_argument("--pin", action="store_true", help="server on CPU 1, this process on CPU 0")
    args = ap.parse_args()
    if args.data is not None:
        data = load(args.data, args.n)
        xb, xq, source = data.xb, data.xq[:NQ], data.source
        if len(xq) <= 4 * 397:
            raise SystemExit(f"{args.data}: {len(xq)} queries; this benchmark needs more than {4 * 397}")
    else:
        xb, xq, source = make_data(args.n, 384, 0), make_data(NQ, 384, 1), "seeded"
    if args.pin:
        os.sched_setaffinity(0, {0})
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "data"
        space = build(folder, args.collection, xb)
        r = remote(folder, args.collection, space, xq, args.calls, args.warmup, args.ef_search, args.pin)
        echo_s = float(np.median(r["times"]["echo"]))
        loc = local(folder, args.collection, space, xq, args.calls, args.warmup, args.ef_search, echo_s)
    times = {**r["times"], **loc}
    p50 = {s: 1000 * float(np.median(v)) for s, v in times.items()}
    mean = {s: 1000 * float(np.mean(v)) for s, v in times.items()}
    print(f"# grpc_breakdown: n={len(xb)}, d={xb.shape[1]}, HNSW32 ef {args.ef_search}, k={K}, {args.calls} calls"
          f" per side, pin={args.pin}; data: {source}\n")  # fmt: skip
    print("| measured | p50 ms | mean ms |")
    print("|---|---|---|")
    for s in times:
        print(f"| {s} | {p50[s]:.3f} | {mean[s]:.3f} |")
    for s in ("server_search_ms", "server_check_ms", "server_index_ms"):
        print(f"| {s.removesuffix('_ms').replace('_', ' ')} (server's metrics) | | {r[s]:.3f} |")
    fig = {
        "echo_p50_ms": p50["echo"],
        "search_p50_ms": p50["search"],
        "embedded_p50_ms": p50["embedded"],
        "over_echo_p50_ms": p50["search"] - p50["echo"] - p50["embedded"],
        "over_echo_mean_ms": mean["search"] - mean["echo"] - mean["embedded"],
        "wire_and_client_ms": (mean["search"] - mean["echo"]) - (r["server_search_ms"] - r["server_check_ms"]),
        "server_python_ms": r["server_search_ms"] - r["server_index_ms"],
        "server_check_ms": r["server_check_ms"],
        "server_index_slowdown_ms": r["server_index_ms"] - mean["faiss"],
        "idle_gap_ms": mean["faiss_after_gap"] - mean["faiss"],
        "busy_gap_ms": mean["faiss_after_spin"] - mean["faiss"],
        "padded_echo_ms": mean["echo_padded"] - mean["echo"],
        "embedded_over_faiss_ms": mean["embedded"] - mean["faiss"],
        "client_saves_ms": mean["search_before"] - mean["search"],
    }
    fig = {k: round(v, 4) for k, v in fig.items()}
    parts = [
        ("larger messages, client build and parse (wire_and_client_ms)", fig["wire_and_client_ms"]),
        ("  of which: an echo padded to a query's bytes (padded_echo_ms)", fig["padded_echo_ms"]),
        ("server's Python around the index (server_python_ms)", fig["server_python_ms"]),
        ("the same FAISS search, slower in the server (server_index_slowdown_ms)", fig["server_index_slowdown_ms"]),
        ("  of which: FAISS in process after an idle gap as long as the echo (idle_gap_ms)", fig["idle_gap_ms"]),
        ("  the same gap spent in a busy wait instead (busy_gap_ms)", fig["busy_gap_ms"]),
        ("minus the echo's own handler (server_check_ms)", -r["server_check_ms"]),
        ("minus the embedded client's own overhead (embedded_over_faiss_ms)", -fig["embedded_over_faiss_ms"]),
        ("= service - echo - embedded (over_echo_mean_ms)", fig["over_echo_mean_ms"]),
    ]
    print("\n| part of the service's time over echo + embedded (means) | ms |")
    print("|---|---|")
    for label, v in parts:
        print(f"| {label} | {v:+.4f} |")
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
