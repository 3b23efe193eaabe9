"""What a search's memory traffic costs the gRPC reply path, with no Interlingua code in it (issue 13).

``grpc_p50_over_echo_ms`` (bench/peers.py) is the service's unary p50 minus an empty echo's p50 minus
the in-process search's p50. Part of it is not the service's code: after a 1M-vector HNSW search the
reply is built, sent and parsed on caches and TLBs the search has evicted, while the echo runs warm.
This benchmark measures that part alone. A plain grpcio server in a subprocess (a thread pool, as the
service) answers four empty methods, alternated by one client in one run:

- ``echo``: returns at once;
- ``spin``: spins ``--busy-ms`` on the CPU, touching nothing (the cost of the wait itself);
- ``stream``: reads the gallery's rows in order for ``--busy-ms`` (cache-evicting, TLB-friendly);
- ``gather``: reads random rows of the gallery for ``--busy-ms``, as an HNSW search does.

Each method's p50 minus ``echo`` minus ``--busy-ms`` is its cost beyond the floor; ``gather``'s is the
cold-reply share of ``grpc_p50_over_echo_ms`` (``cold_reply_ms``). The gallery is the first ``--n``
rows of ``--data`` (bench/_data.py; tiled past the split's size, as bench/peers.py does).

    .venv/bin/python bench/grpc_floor.py --data ../shared/data/debdesc/dev --n 1000000

Prints a table and, as its last line, one JSON object (``echo_p50_ms``, ``spin_over_ms``,
``stream_over_ms``, ``gather_over_ms``, ``cold_reply_ms``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import numpy as np

METHODS = ("echo", "spin", "stream", "gather")


def serve(data: str, n: int, busy_ms: float, port_file: str) -> None:
    """The server subprocess: the gallery in memory, the four methods, its port written to ``port_file``."""
    import grpc

    sys.path.insert(0, str(Path(__file__).parent))
    from _data import load

    xb = load(Path(data), n).xb
    busy = busy_ms / 1000
    rng = np.random.default_rng(0)

    def echo(req: bytes, ctx: object) -> bytes:
        return b""

    def spin(req: bytes, ctx: object) -> bytes:
        end = time.perf_counter() + busy
        while time.perf_counter() < end:
            pass
        return b""

    def stream(req: bytes, ctx: object) -> bytes:
        end, i = time.perf_counter() + busy, 0
        while time.perf_counter() < end:
            xb[i : i + 256].sum()
            i = (i + 256) % (len(xb) - 256)
        return b""

    def gather(req: bytes, ctx: object) -> bytes:
        end = time.perf_counter() + busy
        while time.perf_counter() < end:
            xb[rng.integers(0, len(xb), 64)].sum()
        return b""

    fns = {"echo": echo, "spin": spin, "stream": stream, "gather": gather}
    handlers = {m: grpc.unary_unary_rpc_method_handler(fns[m]) for m in METHODS}
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("floor", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(port_file).write_text(str(port))
    server.wait_for_termination()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a split folder (bench/_data.py), e.g. ../shared/data/debdesc/dev")
    ap.add_argument("--n", type=int, default=1_000_000, help="gallery rows held by the server")
    ap.add_argument("--busy-ms", type=float, default=1.1, help="work per call (FAISS HNSW32 ef 384 at 1M: ~1.1 ms)")
    ap.add_argument("--calls", type=int, default=3000, help="calls per method")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.data, args.n, args.busy_ms, args.serve)
        return
    import grpc

    port_file = Path(f"/tmp/grpc_floor.{os.getpid()}.port")
    port_file.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--data", args.data, "--n", str(args.n), "--busy-ms", str(args.busy_ms)]
    proc = subprocess.Popen([*cmd, "--serve", str(port_file)])
    try:
        deadline = time.monotonic() + 600
        while not (port_file.exists() and port_file.read_text()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server subprocess did not start")
            time.sleep(0.2)
        channel = grpc.insecure_channel(f"127.0.0.1:{port_file.read_text()}")
        calls = {m: channel.unary_unary(f"/floor/{m}") for m in METHODS}
        for _ in range(200):
            for c in calls.values():
                c(b"")
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        for i in range(args.calls):
            for m in METHODS if i % 2 else METHODS[::-1]:
                t0 = time.perf_counter()
                calls[m](b"")
                times[m].append(time.perf_counter() - t0)
        channel.close()
    finally:
        proc.kill()
        proc.wait()
        port_file.unlink(missing_ok=True)
    p50 = {m: 1000 * statistics.median(v) for m, v in times.items()}
    over = {m: p50[m] - p50["echo"] - (args.busy_ms if m != "echo" else 0.0) for m in METHODS}
    print(f"gallery {args.n} rows, {args.busy_ms} ms of work per call, {args.calls} calls per method, alternated")
    print("| method | p50 ms | over echo + work, ms |")
    print("|---|---|---|")
    for m in METHODS:
        print(f"| {m} | {p50[m]:.3f} | {over[m]:+.3f} |")
    fig = {
        "echo_p50_ms": round(p50["echo"], 3),
        "spin_over_ms": round(over["spin"], 3),
        "stream_over_ms": round(over["stream"], 3),
        "gather_over_ms": round(over["gather"], 3),
        "cold_reply_ms": round(over["gather"] - over["spin"], 3),
    }
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
