"""Part 6: unauthenticated flooding neither stalls the server nor grows its memory or /metrics.

The server requires an API key. Eight ``Health.Watch`` streams (no key needed) and
eight idle ``SearchStream`` calls (four with the key, four without) stay open, while
16 threads send 20,000 calls (``RELIABILITY_FLOOD_CALLS``): made-up method names
(every one different), real methods of every service without a key or with a wrong
key, each with random bytes. Meanwhile an authenticated GetCollection every 100 ms
must answer within 1 s (``flood_probe_failures`` counts the ones that do not; they
add to ``failed_requests``). The size of /metrics is reported before and after (it
must stay within 256 KB of where it started: series only for known methods), and
so is the RSS growth. Afterwards the streams are closed and an authenticated
SearchStream must work again (the stream slots come back).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2

from interlingua.v1 import points_pb2 as ppb

from ._harness import ServerProcess, env_float, make_data, record, vectors
from ._rpcs import Rpc, call, discover

pytestmark = [pytest.mark.slow, pytest.mark.reliability, pytest.mark.timeout(1200)]

KEY = "reliability-flood-key"


def test_unauthenticated_flood(server: Callable[..., ServerProcess]) -> None:
    n_calls = int(env_float("RELIABILITY_FLOOD_CALLS", 20_000))
    srv = server("flood", api_key=KEY)
    srv.start_serving()
    s = srv.stubs()
    s.register("s@1", 8)
    s.create("gallery", "s@1", "Flat")
    x = make_data(100, 8)
    s.upsert("gallery", "s@1", [f"p{i}" for i in range(100)], x)
    time.sleep(1)
    metrics_before, rss_before = len(srv.metrics()), srv.rss_mb()

    stop = threading.Event()
    open_streams: list[grpc.Future] = []
    anon = srv.stubs(key=None)
    for _ in range(8):
        open_streams.append(anon.health.Watch(health_pb2.HealthCheckRequest(), timeout=600))

    def idle() -> Iterator[ppb.SearchRequest]:
        stop.wait()
        return
        yield  # a generator that sends nothing until the flood ends

    for st in (s, s, s, s, anon, anon, anon, anon):
        open_streams.append(st.points.SearchStream(idle(), metadata=st.md, timeout=600))
    time.sleep(0.5)

    probes: list[float] = []
    probe_failures: list[str] = []

    def probe() -> None:
        st = srv.stubs()
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                st.info("gallery", timeout=1.0)
                probes.append(time.monotonic() - t0)
            except grpc.RpcError as e:
                probe_failures.append(f"{e.code().name} after {time.monotonic() - t0:.2f}s")
            time.sleep(0.1)

    rpcs = [r for r in discover() if r.service.startswith("interlingua.")]
    channel = srv.stubs(key=None).channel
    codes: dict[str, int] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        rng = random.Random(i)
        payload = [rng.randbytes(rng.randint(0, 64))]
        if i % 2 == 0:
            out = call(channel, _made_up(i), payload, timeout=10)
        else:
            md = () if i % 4 == 1 else (("authorization", f"Bearer wrong-{i}"),)
            out = call(channel, rpcs[i % len(rpcs)], payload, timeout=10, metadata=md)
        with lock:
            codes[out.code.name] = codes.get(out.code.name, 0) + 1

    prober = threading.Thread(target=probe)
    prober.start()
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(n_calls)))
    flood_s = time.monotonic() - t0
    rss_after = srv.rss_mb()
    stop.set()
    prober.join(30)
    for f in open_streams:
        f.cancel()
    time.sleep(1)
    metrics_after = len(srv.metrics())

    # the slots come back: an authenticated stream searches again
    def one_query() -> Iterator[ppb.SearchRequest]:
        yield ppb.SearchRequest(collection="gallery", query_space="s@1", k=3, queries=vectors(x[:2]))

    replies = list(s.points.SearchStream(one_query(), metadata=s.md, timeout=10))
    serving = srv.wait_serving(10) is not None

    print(
        f"flood: {n_calls} calls in {flood_s:.1f}s, codes {codes}; probes {len(probes)} ok "
        f"(max {max(probes, default=0):.3f}s), {len(probe_failures)} failed; /metrics {metrics_before} -> "
        f"{metrics_after} bytes; RSS {rss_before:.0f} -> {rss_after:.0f} MB"
    )
    record(
        flood_calls=n_calls,
        flood_codes=codes,
        flood_probe_failures=len(probe_failures),
        flood_probe_max_seconds=round(max(probes, default=0.0), 3),
        flood_metrics_bytes_before=metrics_before,
        flood_metrics_bytes_after=metrics_after,
        flood_rss_growth_mb=round(rss_after - rss_before, 1),
    )
    assert serving and len(replies) == 1
    assert not probe_failures, probe_failures[:10]
    assert probes and max(probes) < 1.0
    assert codes.get("INTERNAL", 0) == codes.get("UNKNOWN", 0) == 0, codes
    assert metrics_after - metrics_before < 256 * 1024, (metrics_before, metrics_after)
    assert rss_after - rss_before < 100, (rss_before, rss_after)


def _made_up(i: int) -> Rpc:
    path = f"/made.up.Service{i % 97}/Method{i}" if i % 3 else f"/interlingua.v1.PointService/Nope{i}"
    return Rpc(path, health_pb2.HealthCheckRequest.DESCRIPTOR, False, False)
