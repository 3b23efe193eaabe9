"""The pieces every reliability test shares: a server subprocess, raw stubs, seeded data, results.

:class:`ServerProcess` runs ``python -m interlingua.client.cli serve`` on a data
dir, on ports found by binding port 0, in a session of its own (teardown kills
the whole group, so nothing is left behind); it waits for the standard health
service to say SERVING, reads the server's RSS from ``/proc/<pid>/status`` and
fetches ``/metrics``. :class:`Stubs` are the generated stubs on one channel with
the optional bearer key. :func:`record` merges figures into the JSON file the
driver (``python -m tests.reliability``) reads back to print its last line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from interlingua.v1 import collections_pb2 as cpb
from interlingua.v1 import collections_pb2_grpc as cgrpc
from interlingua.v1 import common_pb2 as pb
from interlingua.v1 import points_pb2 as ppb
from interlingua.v1 import points_pb2_grpc as pgrpc
from interlingua.v1 import spaces_pb2 as spb
from interlingua.v1 import spaces_pb2_grpc as sgrpc
from interlingua.v1 import transforms_pb2_grpc as tgrpc

RESULTS_ENV = "INTERLINGUA_RELIABILITY_RESULTS"
SERVING = health_pb2.HealthCheckResponse.SERVING
METRICS = {"cosine": pb.METRIC_COSINE, "ip": pb.METRIC_IP, "l2": pb.METRIC_L2}


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    return float(value) if value.strip() else default


def record(**figures: Any) -> None:
    """Merges ``figures`` into the results file (``$INTERLINGUA_RELIABILITY_RESULTS``), if one is set."""
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    p = Path(path)
    data = json.loads(p.read_text()) if p.exists() and p.stat().st_size else {}
    data.update(figures)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(p)


def free_port() -> int:
    """A port nobody listens on right now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_data(n: int, d: int, seed: int = 0, intrinsic: int = 8) -> np.ndarray:
    """Seeded float32 vectors (n, d) on a low-dimensional manifold plus noise (as tests/conftest.py)."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((intrinsic, d))
    x = np.tanh(rng.standard_normal((n, intrinsic)) @ basis) + 0.1 * rng.standard_normal((n, d))
    return x.astype(np.float32)


def vectors(x: np.ndarray) -> pb.Vectors:
    x = np.ascontiguousarray(x, dtype="<f4")
    return pb.Vectors(data=x.tobytes(), dim=x.shape[1])


@dataclass
class Stubs:
    """Generated stubs on one channel; ``md`` is the call metadata (the bearer key, if any)."""

    channel: grpc.Channel
    md: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        ch = self.channel
        self.spaces = sgrpc.SpaceServiceStub(ch)
        self.collections = cgrpc.CollectionServiceStub(ch)
        self.points = pgrpc.PointServiceStub(ch)
        self.transforms = tgrpc.TransformServiceStub(ch)
        self.health = health_pb2_grpc.HealthStub(ch)

    def register(self, name: str, dim: int, metric: str = "cosine") -> None:
        req = spb.RegisterSpaceRequest(space=pb.Space(name=name, dim=dim, metric=METRICS[metric]))
        self.spaces.RegisterSpace(req, metadata=self.md, timeout=30)

    def create(self, name: str, home: str, spec: str = "Flat", train_min: int = 0) -> cpb.CollectionInfo:
        req = cpb.CreateCollectionRequest(name=name, home_space=home, index_spec=spec, train_min_points=train_min)
        info: cpb.CollectionInfo = self.collections.CreateCollection(req, metadata=self.md, timeout=60)
        return info

    def info(self, name: str, timeout: float = 30) -> cpb.CollectionInfo:
        req = cpb.GetCollectionRequest(name=name)
        info: cpb.CollectionInfo = self.collections.GetCollection(req, metadata=self.md, timeout=timeout)
        return info

    def upsert(self, col: str, space: str, ids: list[str], x: np.ndarray, timeout: float = 30) -> int:
        req = ppb.UpsertRequest(collection=col, space=space, ids=ids, vectors=vectors(x))
        return int(self.points.Upsert(req, metadata=self.md, timeout=timeout).sequence)

    def delete(self, col: str, ids: list[str], timeout: float = 30) -> int:
        req = ppb.DeletePointsRequest(collection=col, ids=ids, missing_ok=True)
        return int(self.points.DeletePoints(req, metadata=self.md, timeout=timeout).deleted)

    def get(self, col: str, ids: list[str], space: str, timeout: float = 30) -> dict[str, np.ndarray]:
        """id -> stored vector in ``space`` (shape (d,)); NOT_FOUND (raised) when any id is unknown."""
        req = ppb.GetPointsRequest(collection=col, ids=ids, with_vectors=True, spaces=[space])
        r = self.points.GetPoints(req, metadata=self.md, timeout=timeout)
        out = {}
        for p in r.points:
            for sv in p.vectors:
                if sv.space == space:
                    out[p.id] = np.frombuffer(sv.vector.data, dtype="<f4").copy()
        return out

    def search(
        self, col: str, space: str, xq: np.ndarray, k: int, timeout: float = 30, **params: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """D (nq, k) float32 and I (nq, k) object array of ids ('' where fewer than k)."""
        req = ppb.SearchRequest(
            collection=col, query_space=space, k=k, queries=vectors(xq), params=pb.SearchParams(**params)
        )
        r = self.points.Search(req, metadata=self.md, timeout=timeout)
        D = np.frombuffer(r.scores, dtype="<f4").reshape(r.nq, r.k)
        return D, np.array(list(r.ids), dtype=object).reshape(r.nq, r.k)


class ServerProcess:
    """``interlingua serve`` in a subprocess on a data dir; start, wait SERVING, kill, restart.

    Each start picks fresh free ports (a port left in use by the previous process never
    blocks a restart). ``config`` is written as the TOML ``--config`` file; ``api_key``
    turns authentication on. The log of every start is appended to ``log``.
    """

    def __init__(
        self, data_dir: Path, log: Path, *, config: dict[str, Any] | None = None, api_key: str | None = None
    ) -> None:
        self.data_dir, self.log, self.api_key = data_dir, log, api_key
        self.config = dict(config or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = self.metrics_port = 0
        self.starts = 0
        self._channels: list[grpc.Channel] = []

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.port, self.metrics_port = free_port(), free_port()
        cfg_path = self.log.with_suffix(".toml")
        cfg_path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in self.config.items()))
        cmd = [sys.executable, "-m", "interlingua.client.cli", "serve", "--config", str(cfg_path)]
        cmd += ["--data-dir", str(self.data_dir), "--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        cmd += ["--log-level", os.environ.get("RELIABILITY_LOG_LEVEL", "WARNING")]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with self.log.open("ab") as log:
            log.write(f"\n=== start {self.starts} at {time.strftime('%H:%M:%S')}: {' '.join(cmd)}\n".encode())
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        self.starts += 1

    def wait_serving(self, timeout: float = 60.0) -> float | None:
        """Seconds until health says SERVING; None if the process exits or ``timeout`` passes first."""
        t0 = time.monotonic()
        with grpc.insecure_channel(self.target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() - t0 < timeout:
                if not self.alive():
                    return None
                with contextlib.suppress(grpc.RpcError):
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING:
                        return time.monotonic() - t0
                time.sleep(0.1)
        return None

    def start_serving(self, timeout: float = 60.0) -> float:
        self.start()
        took = self.wait_serving(timeout)
        assert took is not None, f"server did not reach SERVING in {timeout}s:\n{self.log_tail()}"
        return took

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sigkill(self) -> None:
        """SIGKILL the server process alone (a crash), then reap it and anything left in its group."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._kill_group()
        self._close_channels()

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM (graceful), SIGKILL after ``grace`` s; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._kill_group()
        self._close_channels()
        return self.proc.returncode

    def _kill_group(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the session start_new_session made: only ours

    # -- talking to it ------------------------------------------------------------------------------

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stubs(self, *, key: str | bool | None = True) -> Stubs:
        """Stubs on a new channel (closed at stop); ``key``: True = the server's key, False/None = none."""
        ch = grpc.insecure_channel(
            self.target,
            options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
        )
        self._channels.append(ch)
        k = self.api_key if key is True else (key or None)
        return Stubs(ch, (("authorization", f"Bearer {k}"),) if k else ())

    def _close_channels(self) -> None:
        for ch in self._channels:
            ch.close()
        self._channels.clear()

    def rss_mb(self) -> float:
        """The server's resident set size in MiB (VmRSS)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
        raise RuntimeError("no VmRSS")

    def metrics(self, timeout: float = 10.0) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        req = urllib.request.Request(url)
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return str(r.read().decode())

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def metric_values(text: str, name: str) -> dict[str, float]:
    """Sample line (with labels) -> value for every sample of metric ``name`` in an exposition text."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            if head.split("{", 1)[0] == name:
                out[head] = float(value)
    return out
