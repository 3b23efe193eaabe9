"""``ServerConfig.device``: parsing, the start-up check, host-side filtering of dead labels, and a
server whose sealed indexes and linear routes run on a GPU.

The server tests run twice: on ``fake-gpu``, a CPU stand-in for ``index_cpu_to_gpu`` (a clone of
the CPU index that refuses IDSelectors, as GPU indexes ignore them) and for torch's CUDA device
(torch on the CPU), which checks the wiring on any machine; and on ``cuda``, the real thing,
skipped unless faiss reports a GPU and torch has CUDA (``bench/gpu/run.sh`` runs it on one).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import torch
from conftest import Stubs, brute_force, connect, make_data, start_server

from interlingua.client._serve_config import ConfigError
from interlingua.client.cli import build_parser, build_server_config, main
from interlingua.server import Server, ServerConfig, create_server
from interlingua.server import segments as segments_mod
from interlingua.server.device import Device, GpuSearchIndex, gpu_unsupported_reason
from interlingua.server.errors import FailedPrecondition
from interlingua.server.pipeline import map_queries
from interlingua.server.segments import IndexSpec, Segments, drop_dead
from interlingua.server.transforms import AffineTransform
from interlingua.v1 import collections_pb2 as cpb
from interlingua.v1 import common_pb2 as pb
from interlingua.v1 import points_pb2 as ppb
from interlingua.v1 import transforms_pb2 as tpb
from interlingua.v1 import transforms_pb2_grpc as tgrpc

HAS_GPU = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs faiss-gpu with a GPU and torch with CUDA")
NO_GPU_MESSAGE = "device 'cuda' asked for but faiss reports 0 GPUs (faiss-cpu installed? pip install faiss-gpu==1.15.1)"


# -- Device.parse, ServerConfig and the CLI ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "gpu", "name"), [("cpu", None, "cpu"), ("cuda", 0, "cuda:0"), ("cuda:1", 1, "cuda:1")]
)
def test_parse(text: str, gpu: int | None, name: str) -> None:
    dev = Device.parse(text)
    assert (dev.gpu, dev.name, dev.is_gpu, dev.text) == (gpu, name, gpu is not None, text)


@pytest.mark.parametrize("text", ["gpu", "", "cuda:", "cuda:-1", "cuda:x", "cpu:0", "cuda0", "cuda:1:2"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"device must be 'cpu', 'cuda' or 'cuda:N', got {text!r}")):
        Device.parse(text)
    with pytest.raises(ValueError, match="device must be"):
        ServerConfig(device=text)


def test_cpu_device_is_the_identity() -> None:
    dev = Device.parse("cpu")
    index = faiss.IndexFlatL2(4)
    index.add(np.eye(4, dtype=np.float32))
    assert dev.to_search_index(index, "c") is index and dev.to_search_index(None) is None
    assert dev.apply_affine(AffineTransform({"query": np.eye(4)}, {"query": np.zeros(4)}, {}), np.eye(4)) is None
    dev.check_available()  # never raises


def test_serve_device_layers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("CONFIG", "DEVICE"):
        monkeypatch.delenv(f"INTERLINGUA_{var}", raising=False)

    def config_of(*argv: str) -> ServerConfig:
        return build_server_config(build_parser().parse_args(["serve", *argv]))

    assert config_of().device == "cpu"
    toml = tmp_path / "server.toml"
    toml.write_text('device = "cuda:1"\n')
    assert config_of("--config", str(toml)).device == "cuda:1"
    monkeypatch.setenv("INTERLINGUA_DEVICE", "cuda")
    assert config_of("--config", str(toml)).device == "cuda"
    assert config_of("--device", "cpu").device == "cpu"
    with pytest.raises(ConfigError, match=re.escape("device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'")):
        config_of("--device", "gpu")
    toml.write_text("device = 0\n")
    with pytest.raises(ConfigError, match="device must be str"):
        config_of("--config", str(toml))


@pytest.mark.skipif(HAS_GPU or faiss.get_num_gpus() > 0, reason="this machine has a GPU")
def test_cuda_without_gpu_fails_at_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(FailedPrecondition, match=re.escape(NO_GPU_MESSAGE)):
        create_server(ServerConfig(data_dir=tmp_path / "data", port=0, metrics_port=None, device="cuda"))
    code = main(["serve", "--device", "cuda", "--data-dir", str(tmp_path / "d"), "--port", "0", "--no-metrics"])
    assert code == 2 and NO_GPU_MESSAGE in capsys.readouterr().err


# -- dead labels filtered on the host, as on a GPU ------------------------------------------------------


def test_drop_dead_keeps_order_and_pads() -> None:
    alive = np.packbits(np.array([1, 0, 1, 1, 0, 1, 1, 1], dtype=bool), bitorder="little")
    D = np.array([[0.9, 0.8, 0.7, 0.6], [0.5, 0.4, -np.inf, -np.inf]], dtype=np.float32)
    I = np.array([[1, 2, 4, 3], [4, 0, -1, -1]], dtype=np.int64)
    worst = np.float32(-np.inf)
    Dk, Ik = drop_dead(D, I, alive, 3, worst)
    assert Ik.tolist() == [[2, 3, -1], [0, -1, -1]]
    np.testing.assert_array_equal(Dk, np.array([[0.8, 0.6, worst], [0.4, worst, worst]], dtype=np.float32))
    Dk, Ik = drop_dead(D[:, :1], I[:, :1], alive, 2, worst)  # fewer candidates than k: padded
    assert Ik.tolist() == [[-1, -1], [-1, -1]] and Dk.shape == (2, 2)


def _segments(spec: str, metric: str, n: int, d: int = 24, seed: int = 3) -> tuple[Segments, np.ndarray, set[int]]:
    """Segments with n sealed vectors, then 40 more in the fresh segment; a seeded third of each
    part killed. Returns the segments, every vector by label, and the dead labels."""
    x = make_data(n + 40, d, seed=seed)
    if metric == "cosine":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    seg = Segments(IndexSpec.parse(spec, d, metric), train_min_points=n if "IVF" in spec else 0)
    seg.append(0, [str(i) for i in range(n)], x[:n], [], 1)
    seg.merge()
    seg.append(n, [str(i) for i in range(n, n + 40)], x[n:], [], 2)
    dead = sorted({int(i) for i in np.random.default_rng(seed).choice(n + 40, (n + 40) // 3, replace=False)})
    seg.kill(dead, 3)
    assert seg.snapshot.nsealed == n and seg.snapshot.ndead_sealed > 0 and seg.snapshot.ndead_fresh > 0
    return seg, x, set(dead)


@pytest.mark.parametrize(("spec", "metric"), [("Flat", "l2"), ("Flat", "cosine"), ("IVF8,Flat", "l2")])
def test_host_filter_equals_idselector(spec: str, metric: str) -> None:
    seg, x, dead = _segments(spec, metric, 600)
    xq = make_data(12, x.shape[1], seed=9)
    if metric == "cosine":
        xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    for k in (1, 10, 50):
        D1, I1, _ = seg.search(xq, k, nprobe=8)  # IDSelectorBitmap
        seg.host_filter = True
        D2, I2, _ = seg.search(xq, k, nprobe=8)  # k + ndead_sealed candidates, dead dropped here
        seg.host_filter = False
        np.testing.assert_array_equal(I1, I2)
        np.testing.assert_allclose(D1, D2, rtol=1e-6, atol=1e-6)
        live = np.array(sorted(set(range(len(x))) - dead))
        Dref, Iref = brute_force(x[live], xq, k, "ip" if metric == "cosine" else metric)
        np.testing.assert_array_equal(I2, live[Iref])
        np.testing.assert_allclose(D2, Dref, rtol=1e-4, atol=1e-4)


class SelectorRefusing:
    """A CPU clone standing in for a GPU index: it fails on an IDSelector and counts searches."""

    def __init__(self, index: Any) -> None:
        self.index, self.ntotal, self.calls = index, index.ntotal, 0

    def search(self, xq: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        inner = getattr(params, "index_params", params)
        assert inner is None or inner.sel is None, "a GPU index would ignore this IDSelector"
        assert k <= segments_mod.GPU_MAX_K
        self.calls += 1
        D, I = self.index.search(xq, k, params=params)
        return D, I


def fake_clone(device: Device, index: Any) -> SelectorRefusing:
    return SelectorRefusing(faiss.clone_index(index))


def test_gpu_path_drops_dead_on_host_and_falls_back_past_k_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Device, "_clone_to_gpu", fake_clone)
    seg, x, dead = _segments("Flat", "l2", 500)
    cpu = Segments(seg.spec, 0)
    cpu.snapshot = seg.snapshot
    gpu = Segments(seg.spec, 0, Device.parse("cuda"), "c")
    s = seg.snapshot
    gpu.snapshot = type(s)(**{**s.__dict__, "sealed_search": gpu.device.to_search_index(s.sealed, "c")})
    assert gpu.snapshot.search_on_gpu and isinstance(gpu.snapshot.sealed_search, GpuSearchIndex)
    fake = gpu.snapshot.sealed_search.index
    xq = make_data(7, x.shape[1], seed=4)
    for k in (5, 20):
        D1, I1, _ = cpu.search(xq, k)
        D2, I2, _ = gpu.search(xq, k)
        np.testing.assert_array_equal(I1, I2)
        np.testing.assert_allclose(D1, D2, rtol=1e-6)
    assert fake.calls == 2
    monkeypatch.setattr(segments_mod, "GPU_MAX_K", s.ndead_sealed + 10)  # k + ndead > the GPU's k limit
    _, I3, _ = gpu.search(xq, 20)
    assert fake.calls == 2 and np.array_equal(I3, cpu.search(xq, 20)[1])  # the CPU index answered
    assert not set(I3.ravel()) & dead


def test_unsupported_indexes_stay_on_cpu(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(Device, "_clone_to_gpu", fake_clone)
    x = make_data(300, 16, seed=1)
    dev = Device.parse("cuda")
    hnsw = faiss.index_factory(16, "HNSW8")
    hnsw.add(x)
    assert "HNSW" in str(gpu_unsupported_reason(hnsw))
    assert gpu_unsupported_reason(faiss.index_factory(16, "IVF4_HNSW8,Flat")) is not None
    assert gpu_unsupported_reason(faiss.index_factory(16, "PCA8,IVF4,Flat")) is None
    with caplog.at_level("WARNING", logger="interlingua.server.device"):
        assert dev.to_search_index(hnsw, "h") is hnsw
        assert dev.to_search_index(hnsw, "h") is hnsw  # logged once per collection
    assert len(caplog.records) == 1 and "HNSW" in dev.fallbacks["h"]

    def failing(device: Device, index: Any) -> Any:
        raise RuntimeError("Error in ...: GPU out of memory\nsecond line")

    monkeypatch.setattr(Device, "_clone_to_gpu", failing)
    flat = faiss.IndexFlatL2(16)
    flat.add(x)
    assert dev.to_search_index(flat, "f") is flat and "second line" in dev.fallbacks["f"]


def test_apply_affine_math_and_cache() -> None:
    """Device.apply_affine's torch math, on torch's CPU device (the GPU run checks CUDA)."""
    rng = np.random.default_rng(0)
    W = {s: rng.standard_normal((12, 8)).astype(np.float32) for s in ("query", "doc")}
    b = {s: rng.standard_normal(8).astype(np.float32) for s in ("query", "doc")}
    t = AffineTransform(W, b, {})
    dev = Device.parse("cuda")
    dev._torch = torch.device("cpu")  # stand-in for cuda:0
    x = rng.standard_normal((5, 12)).astype(np.float32)
    for side in ("query", "doc"):
        y = dev.apply_affine(t, x, side)
        assert y is not None and y.dtype == np.float32
        np.testing.assert_allclose(y, t.apply(x, side), rtol=1e-5, atol=1e-5)
    assert set(dev._weights[t]) == {"query", "doc"}
    nonlinear = type("NonLinear", (), {"affine": lambda self, side: None})()
    assert dev.apply_affine(nonlinear, x) is None
    cos = map_queries(t, x, "cosine", 6, device=dev)
    np.testing.assert_allclose(cos, map_queries(t, x, "cosine", 6), rtol=1e-5, atol=1e-6)


# -- a whole server on a GPU ----------------------------------------------------------------------


@pytest.fixture(params=["fake-gpu", pytest.param("cuda", marks=needs_gpu)])
def gpu_server(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    if request.param == "fake-gpu":
        monkeypatch.setattr(Device, "check_available", lambda self: None)
        monkeypatch.setattr(Device, "_clone_to_gpu", fake_clone)
        monkeypatch.setattr(Device, "_torch_device", lambda self: torch.device("cpu"))
    srv, _ = start_server(tmp_path / "data", device="cuda", merge_idle_seconds=0.05)
    yield srv
    srv.stop(None)


def wait_merged(stubs: Stubs, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (info := stubs.info(name)).state != cpb.INDEX_STATE_READY or info.fresh_vectors:
        assert time.monotonic() < deadline, f"{name} not merged: {info}"
        time.sleep(0.05)


def check_exact(stubs: Stubs, col: str, xq: np.ndarray, k: int, live: dict[str, np.ndarray], metric: str) -> None:
    ids = np.array(sorted(live), dtype=object)
    Dref, Iref = brute_force(np.stack([live[i] for i in ids]), xq, k, metric)
    D, I, _ = stubs.search(col, "s", xq, k, nprobe=16) if "ivf" in col else stubs.search(col, "s", xq, k)
    np.testing.assert_allclose(D, Dref, rtol=1e-4, atol=1e-4)
    mismatch = ids[Iref] != I
    assert not mismatch.any() or np.allclose(D[mismatch], Dref[mismatch], atol=1e-5)  # only ties differ


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_gpu_server_flat_and_ivf_equal_brute_force(gpu_server: Server, metric: str) -> None:
    stubs = connect(gpu_server.port)
    d, n, k = 32, 3000, 10
    stubs.register("s", d, pb.METRIC_L2 if metric == "l2" else pb.METRIC_COSINE)
    xb, xq = make_data(n, d, seed=11), make_data(40, d, seed=12)
    for col, spec in (("flat", "Flat"), ("ivf", "IVF16,Flat")):
        stubs.create(col, "s", spec, train_min=1000)
        live = {f"p{i}": xb[i] for i in range(n)}
        for i in range(0, n, 1000):
            stubs.upsert(col, "s", [f"p{j}" for j in range(i, i + 1000)], xb[i : i + 1000])
        wait_merged(stubs, col)
        segs = gpu_server.engine.collections[col].segments
        assert segs.snapshot.search_on_gpu and segs.snapshot.ndead_sealed == 0
        check_exact(stubs, col, xq, k, live, metric)
        # deletes and overwrites of sealed points: dead labels the GPU index still holds
        gone = [f"p{i}" for i in range(0, n, 7)]
        stubs.points.DeletePoints(ppb.DeletePointsRequest(collection=col, ids=gone))
        moved = [f"p{i}" for i in range(1, 200, 10) if i % 7]
        stubs.upsert(col, "s", moved, xq[: len(moved)] * 1.01)
        for pid in gone:
            live.pop(pid)
        live.update({pid: xq[j] * 1.01 for j, pid in enumerate(moved)})
        assert segs.snapshot.ndead_sealed == len(gone) + len(moved)
        check_exact(stubs, col, xq, k, live, metric)  # dead dropped on the host, moved ones fresh
        wait_merged(stubs, col)
        assert segs.snapshot.search_on_gpu
        check_exact(stubs, col, xq, k, live, metric)
        check_exact(stubs, col, xq, 100, live, metric)
    stubs.channel.close()


def test_gpu_server_hnsw_stays_on_cpu(gpu_server: Server) -> None:
    stubs = connect(gpu_server.port)
    stubs.register("s", 16)
    stubs.create("h", "s", "HNSW16")
    xb = make_data(500, 16, seed=2)
    stubs.upsert("h", "s", [str(i) for i in range(500)], xb)
    wait_merged(stubs, "h")
    assert not gpu_server.engine.collections["h"].segments.snapshot.search_on_gpu
    assert "HNSW" in gpu_server.engine.device.fallbacks["h"]
    _, I, _ = stubs.search("h", "s", xb[:20], 1, ef_search=64)
    assert (I[:, 0] == np.array([str(i) for i in range(20)], dtype=object)).mean() >= 0.9
    stubs.channel.close()


def _vectors(x: np.ndarray) -> pb.Vectors:
    return pb.Vectors(data=np.ascontiguousarray(x, "<f4").tobytes(), dim=x.shape[1])


@pytest.mark.parametrize("new_metric", [pb.METRIC_COSINE, pb.METRIC_L2])  # l2: queries reach the map unnormalized
def test_gpu_routed_linear_transform_equals_cpu(gpu_server: Server, new_metric: int) -> None:
    stubs = connect(gpu_server.port)
    t = tgrpc.TransformServiceStub(stubs.channel)
    d_old, d_new, n = 16, 24, 1200
    rng = np.random.default_rng(5)
    docs_old = make_data(n, d_old, seed=5)
    Q = np.linalg.qr(rng.standard_normal((d_new, d_new)))[0]
    docs_new = (np.hstack([docs_old, 0.05 * rng.standard_normal((n, d_new - d_old))]) @ Q).astype(np.float32)
    stubs.register("old@1", d_old)
    stubs.register("new@2", d_new, new_metric)
    stubs.create("g", "old@1")
    stubs.upsert("g", "old@1", [f"g{i}" for i in range(n)], docs_old)

    def fit() -> Iterator[tpb.FitTransformRequest]:
        header = tpb.FitHeader(name="p", kind=tpb.TRANSFORM_KIND_AFFINE, source_space="new@2", target_space="old@1")
        yield tpb.FitTransformRequest(header=header)
        side = tpb.PAIR_SIDE_DOC
        yield tpb.FitTransformRequest(
            pairs=tpb.PairBatch(side=side, source=_vectors(docs_new), target=_vectors(docs_old))
        )

    t.FitTransform(fit())
    deadline = time.monotonic() + 120
    while (info := t.GetTransform(tpb.GetTransformRequest(name="p"))).state == tpb.TRANSFORM_STATE_FITTING:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert info.state == tpb.TRANSFORM_STATE_READY, info.error
    t.ActivateRoute(tpb.ActivateRouteRequest(collection="g", transform="p", force=True))
    wait_merged(stubs, "g")
    xq = docs_new[:64]
    D, I, reply = stubs.search("g", "new@2", xq, 10)
    assert reply.route.transform == "p"
    fn = gpu_server.engine.require_compat().get("p").fn
    assert fn in gpu_server.engine.device._weights  # the map ran on the device
    y = map_queries(fn, xq, "cosine", d_old)  # numpy, as on the CPU
    np.testing.assert_allclose(gpu_server.engine.device.apply_affine(fn, xq), fn.apply(xq), rtol=1e-4, atol=1e-4)
    Dref, Iref = brute_force(docs_old, y, 10, "cosine")
    np.testing.assert_allclose(D, Dref, rtol=1e-4, atol=1e-4)
    assert (np.array([f"g{i}" for i in range(n)], dtype=object)[Iref] == I).mean() > 0.99
    assert json.loads(info.report_json)
    stubs.channel.close()
