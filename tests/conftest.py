"""Shared fixtures: a real server on port 0 over a real channel, and seeded data.

``server`` starts :func:`interlingua.server.create_server` on a temporary data
dir with its own Prometheus registry; ``stubs`` are raw gRPC stubs on a channel
to it. ``make_data`` gives seeded vectors of low intrinsic dimension (as FAISS's
``SyntheticDataset``), so approximate indexes behave as on real embeddings.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from interlingua.server import Server, ServerConfig, create_server
from interlingua.v1 import collections_pb2 as cpb
from interlingua.v1 import collections_pb2_grpc as cgrpc
from interlingua.v1 import common_pb2 as pb
from interlingua.v1 import points_pb2 as ppb
from interlingua.v1 import points_pb2_grpc as pgrpc
from interlingua.v1 import spaces_pb2 as spb
from interlingua.v1 import spaces_pb2_grpc as sgrpc


@dataclass
class Stubs:
    channel: grpc.Channel
    spaces: sgrpc.SpaceServiceStub
    collections: cgrpc.CollectionServiceStub
    points: pgrpc.PointServiceStub
    target: str = ""  #: "127.0.0.1:<port>", for an interlingua.client.Client on the same server

    def register(self, name: str, dim: int, metric: int = pb.METRIC_COSINE) -> pb.Space:
        return self.spaces.RegisterSpace(spb.RegisterSpaceRequest(space=pb.Space(name=name, dim=dim, metric=metric)))

    def create(self, name: str, home: str, spec: str = "Flat", train_min: int = 0) -> cpb.CollectionInfo:
        return self.collections.CreateCollection(
            cpb.CreateCollectionRequest(name=name, home_space=home, index_spec=spec, train_min_points=train_min)
        )

    def info(self, name: str) -> cpb.CollectionInfo:
        return self.collections.GetCollection(cpb.GetCollectionRequest(name=name))

    def upsert(self, col: str, space: str, ids: list[str], x: np.ndarray, payloads: list[str] | None = None) -> int:
        req = ppb.UpsertRequest(
            collection=col,
            space=space,
            ids=ids,
            vectors=pb.Vectors(data=np.ascontiguousarray(x, "<f4").tobytes(), dim=x.shape[1]),
            payloads=payloads or [],
        )
        return int(self.points.Upsert(req).sequence)

    def search(
        self, col: str, space: str, xq: np.ndarray, k: int, **kw: object
    ) -> tuple[np.ndarray, np.ndarray, ppb.SearchResponse]:
        """Returns D (nq, k) float32, ids (nq, k) object array, and the raw reply."""
        params = pb.SearchParams(**{key: kw.pop(key) for key in ("ef_search", "nprobe", "k_factor") if key in kw})
        req = ppb.SearchRequest(
            collection=col,
            query_space=space,
            k=k,
            params=params,
            queries=pb.Vectors(data=np.ascontiguousarray(xq, "<f4").tobytes(), dim=xq.shape[1]),
            **kw,  # type: ignore[arg-type]
        )
        r = self.points.Search(req)
        D = np.frombuffer(r.scores, dtype="<f4").reshape(r.nq, r.k)
        return D, np.array(list(r.ids), dtype=object).reshape(r.nq, r.k), r


def start_server(data_dir: Path, **kw: object) -> tuple[Server, int]:
    kw.setdefault("metrics_port", None)
    server, port = create_server(ServerConfig(data_dir=data_dir, port=0, **kw))  # type: ignore[arg-type]
    server.start()
    assert server.wait_ready(60), server.load_error
    return server, port


def connect(port: int) -> Stubs:
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    stubs = Stubs(ch, sgrpc.SpaceServiceStub(ch), cgrpc.CollectionServiceStub(ch), pgrpc.PointServiceStub(ch))
    stubs.target = f"127.0.0.1:{port}"
    return stubs


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Server, int]]:
    srv, port = start_server(tmp_path / "data")
    yield srv, port
    srv.stop(None)


@pytest.fixture
def stubs(server: tuple[Server, int]) -> Iterator[Stubs]:
    s = connect(server[1])
    yield s
    s.channel.close()


def make_data(n: int, d: int, seed: int = 0, intrinsic: int = 16) -> np.ndarray:
    """Seeded float32 vectors of shape (n, d) on a low-dimensional manifold plus noise."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((intrinsic, d))
    x = np.tanh(rng.standard_normal((n, intrinsic)) @ basis) + 0.1 * rng.standard_normal((n, d))
    return x.astype(np.float32)


def recall_at(I: np.ndarray, Iref: np.ndarray) -> float:
    """Recall@k of approximate labels I (nq, k) against exact ones Iref (nq, >= k): mean |I[i] & Iref[i, :k]| / k."""
    k = I.shape[1]
    return float(np.mean([len(set(a) & set(b[:k])) / k for a, b in zip(I.tolist(), Iref.tolist(), strict=True)]))


def brute_force(xb: np.ndarray, xq: np.ndarray, k: int, metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """Reference kNN in float64: D, I of shape (nq, k)."""
    xb64, xq64 = xb.astype(np.float64), xq.astype(np.float64)
    if metric == "cosine":
        xb64 /= np.linalg.norm(xb64, axis=1, keepdims=True)
        xq64 /= np.linalg.norm(xq64, axis=1, keepdims=True)
    if metric == "l2":
        S = (xq64**2).sum(1)[:, None] - 2 * xq64 @ xb64.T + (xb64**2).sum(1)[None, :]
        I = np.argsort(S, axis=1, kind="stable")[:, :k]
    else:
        S = xq64 @ xb64.T
        I = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(S, I, axis=1), I


def milvus_keys(srv: Server, name: str) -> dict[str, int]:
    """id -> primary key of every row a milvus collection ``name`` holds in its engine, asserting one row
    per id and no key handed out twice (``server/backends/milvus_table.py``, "Keys")."""
    col = srv.engine.collections[name]
    got = col._call("q", lambda c: c.query(col.mname, filter="pk >= 0", output_fields=["pk", "id"], limit=16384))
    rows = [(str(r["id"]), int(r["pk"])) for r in got]
    assert len({pid for pid, _ in rows}) == len(rows), "an id has two rows"
    assert len({pk for _, pk in rows}) == len(rows), "a key was handed out twice"
    return dict(rows)


def wait_for(cond: Callable[[], object], timeout: float = 5.0) -> None:
    """Polls ``cond`` every 20 ms until it is truthy; fails the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.02)


_CHILD = """
import json, sys, threading
from pathlib import Path
from interlingua.server import ServerConfig, create_server
from interlingua.server.config import Limits
cfg = json.loads(sys.argv[1])
limits = Limits(**cfg.pop("limits", {}))
server, port = create_server(
    ServerConfig(data_dir=Path(cfg.pop("data_dir")), port=0, metrics_port=None, limits=limits, **cfg)
)
server.start()
print(port, flush=True)
threading.Event().wait()
"""


@contextmanager
def child_server(tmp_path: Path, data: Path, **overrides: object) -> Iterator[tuple[subprocess.Popen[str], Stubs]]:
    """A server in a subprocess on a free port, serving ``data`` (``overrides``: ServerConfig fields, ``limits``
    as a dict); yields (process, stubs) once health says SERVING. Killed (SIGKILL) on exit if it still runs."""
    log = tmp_path / "child.log"
    cfg = json.dumps({"data_dir": str(data), **overrides})
    with (
        open(log, "w") as err,
        subprocess.Popen([sys.executable, "-c", _CHILD, cfg], stdout=subprocess.PIPE, stderr=err, text=True) as proc,
    ):
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip().isdigit(), f"the server subprocess did not start:\n{log.read_text()[-3000:]}"
            stubs = connect(int(line))
            health = health_pb2_grpc.HealthStub(stubs.channel)
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
                try:
                    if health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            try:
                yield proc, stubs
            finally:
                stubs.channel.close()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
