"""Embedded mode (``Client.embedded``): the same answers, errors and durability as over gRPC, and one
process per data directory.

A data directory is filled in one mode, closed and reopened in the other: searches (Flat against
numpy brute force, HNSW), reads, a routed search through a fitted transform and the streaming calls
agree exactly. The same failing calls raise the same typed exceptions with the same messages in
both modes. The data directory's exclusive lock refuses a second opener (a server subprocess
against an embedded client and the reverse, two embedded clients in two processes, and in one)
with FailedPrecondition naming the folder and the holder's pid.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from conftest import brute_force, child_server, make_data, start_server, wait_for

from interlingua.client import (
    AlreadyExists,
    Client,
    FailedPrecondition,
    InterlinguaError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SearchResult,
)
from interlingua.server.config import Limits
from interlingua.server.errors import FailedPrecondition as Refused
from interlingua.server.restore import restore

D, N, NQ, K = 32, 400, 20, 10
FAST = {"merge_idle_seconds": 0.05}


def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xb = make_data(N, D, seed=3)
    xq = make_data(NQ, D, seed=4)
    rot, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((D, D)))
    return xb, xq, (xb @ rot).astype(np.float32)


def _fill(c: Client) -> None:
    """Two spaces, a Flat and an HNSW collection with payloads and deletes, a fitted route."""
    xb, _, xb_new = _data()
    c.register_space("old", D)
    c.register_space("new", D)
    ids = [f"p{i}" for i in range(N)]
    for name, spec in (("flat", "Flat"), ("hnsw", "HNSW16")):
        c.create_collection(name, "old", spec)
        c.upsert(name, ids[:200], xb[:200], space="old", payloads=[{"i": i} for i in range(200)])
        c.upsert_stream(name, ids[200:], xb[200:], space="old", batch_size=64)
        c.delete(name, ids[:10])
    c.fit_transform("t", "procrustes", source_space="new", target_space="old", doc_pairs=(xb_new, xb), timeout=60)
    c.activate_route("flat", "t", force=True)
    _wait_merged(c)


def _wait_merged(c: Client) -> None:
    for name in ("flat", "hnsw"):
        wait_for(lambda: c.get_collection(name).fresh_vectors == 0, 30)  # noqa: B023 - called at once


def _answers(c: Client) -> dict[str, Any]:
    """Everything the comparison looks at, as plain values."""
    _, xq, _ = _data()
    rot_q = xq @ np.linalg.qr(np.random.default_rng(5).standard_normal((D, D)))[0]
    out: dict[str, Any] = {}
    for name in ("flat", "hnsw"):
        r = c.search(name, xq, K, space="old", with_payload=True)
        out[f"{name}/search"] = (r.scores.tolist(), r.ids.tolist(), r.payloads, r.route, r.exact)
        flat = [p for row in r.payloads or [] for p in row]
        for pid, payload in zip(r.ids.ravel().tolist(), flat, strict=True):
            i = int(pid[1:]) if pid.startswith("p") else -1
            assert payload == ({"i": i} if 0 <= i < 200 else {"by": "grpc"} if pid == "extra" else None), pid
        with c.search_stream() as stream:
            s = [stream.search(name, xq[i], K, space="old") for i in range(3)]
        out[f"{name}/stream"] = [(x.scores.tolist(), x.ids.tolist()) for x in s]
        info = c.get_collection(name)
        out[f"{name}/info"] = (info.num_points, info.indexed_vectors, info.deleted_labels, info.index_spec)
    wide = c.search("hnsw", xq, K, space="old", ef_search=200)
    out["hnsw/ef200"] = (wide.scores.tolist(), wide.ids.tolist())
    routed = c.search("flat", rot_q, K, space="new")
    out["flat/routed"] = (routed.scores.tolist(), routed.ids.tolist(), routed.route)
    pts = c.get("flat", ["p10", "p11", "p399"], with_vectors=True, with_payload=True)
    out["get"] = [(p.id, p.payload, {s: v.tolist() for s, v in p.vectors.items()}) for p in pts]
    out["spaces"] = [(s.name, s.dim, s.metric) for s in c.list_spaces()]
    t = c.get_transform("t")
    out["transform"] = (t.state, t.checksum, t.kind)
    out["routes"] = [(r.query_space, r.transform) for r in c.list_routes("flat").active]
    return out


def _check_flat(r: SearchResult, xb: np.ndarray, xq: np.ndarray) -> None:
    """Flat answers: numpy brute force over the live points p10..p399."""
    Dref, Iref = brute_force(xb[10:], xq, K)
    assert r.ids.tolist() == [[f"p{i + 10}" for i in row] for row in Iref.tolist()]
    np.testing.assert_allclose(r.scores, Dref, rtol=1e-5, atol=1e-5)


def test_embedded_and_grpc_give_identical_results(tmp_path: Path) -> None:
    data = tmp_path / "data"
    xb, xq, _ = _data()
    with Client.embedded(data, **FAST) as c:  # type: ignore[arg-type]
        assert c.health() == "SERVING"
        _fill(c)
        _check_flat(c.search("flat", xq, K, space="old"), xb, xq)
        first = _answers(c)
    assert c.health() == "NOT_SERVING"  # closed: the engine is stopped

    server, port = start_server(data)
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as g:
            assert _answers(g) == first
            _check_flat(g.search("flat", xq, K, space="old"), xb, xq)
            g.upsert("hnsw", ["extra"], xb[:1] + 0.5, space="old", payloads=[{"by": "grpc"}])
            _wait_merged(g)
            second = _answers(g)
    finally:
        server.stop(None)

    with Client.embedded(data) as c:
        assert _answers(c) == second
        assert c.get("hnsw", ["extra"], with_payload=True)[0].payload == {"by": "grpc"}


def _failures(c: Client) -> list[Callable[[], object]]:
    x = np.ones((1, D), np.float32)
    return [
        lambda: c.get_space("nope"),
        lambda: c.register_space("old", D),
        lambda: c.register_space("bad name!", D),
        lambda: c.get_collection("nope"),
        lambda: c.search("nope", x, K, space="old"),
        lambda: c.search("flat", np.ones((1, D + 1), np.float32), K, space="old"),
        lambda: c.search("flat", x, 0, space="old"),
        lambda: c.search("flat", np.zeros((1, D), np.float32), K, space="old"),
        lambda: c.search("flat", x, K, space="other"),
        lambda: c.search("flat", x, K, space="old", ef_search=10),
        lambda: c.get("flat", ["p1", "missing"]),
        lambda: c.delete("flat", ["missing"]),
        lambda: c.upsert("flat", ["a", "a"], np.ones((2, D)), space="old"),
        lambda: c.upsert_stream("flat", ["a", "b"], np.ones((2, D)) * np.nan, space="old", batch_size=1),
        lambda: c.upsert("flat", ["big"], np.ones((1, 4096)), space="old"),  # over receive_bytes
        lambda: c.get_transform("nope"),
        lambda: c.rollback_route("flat", "old"),
        lambda: c.get_migration("flat"),
        lambda: c.delete_snapshot("nope"),
        lambda: c.health("no.such.Service"),
        # the embedded client's direct search: a request over receive_bytes takes the message path
        lambda: c.search("flat", np.ones((1, 4096)), K, space="old"),
        lambda: c.search("flat", x, K, space="old", k_factor=2),
        lambda: c.search("flat", x, K, space="old", nprobe=0),
    ]


def _raised(calls: list[Callable[[], object]]) -> list[tuple[type[InterlinguaError], str]]:
    out = []
    for call in calls:
        with pytest.raises(InterlinguaError) as e:
            call()
        out.append((type(e.value), e.value.message))
    return out


def _setup_errors(c: Client) -> None:
    c.register_space("old", D)
    c.register_space("other", D)
    c.create_collection("flat", "old", "Flat")
    c.upsert("flat", ["p1"], np.ones((1, D)), space="old")


def test_errors_map_to_the_same_typed_exceptions(tmp_path: Path) -> None:
    small = Limits(max_message_bytes=16 * 1024, max_batch=64)  # receive_bytes 16 KiB: one 4096-d vector is over
    with Client.embedded(tmp_path / "e", limits=small) as c:
        _setup_errors(c)
        embedded = _raised(_failures(c))
    server, port = start_server(tmp_path / "g", limits=small)
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as g:
            _setup_errors(g)
            remote = _raised(_failures(g))
    finally:
        server.stop(None)
    assert [t for t, _ in embedded] == [t for t, _ in remote]
    assert embedded == remote  # the same messages too (the same servicers wrote them)
    kinds = [t for t, _ in embedded]
    assert kinds[:4] == [NotFound, AlreadyExists, InvalidArgument, NotFound]
    assert kinds[5:10] == [InvalidArgument] * 3 + [FailedPrecondition, InvalidArgument]
    assert kinds[14] is ResourceExhausted and "larger than max" in embedded[14][1]
    assert "stream message 0" in embedded[13][1]
    assert kinds[20] is ResourceExhausted and "larger than max" in embedded[20][1]
    assert kinds[21:] == [InvalidArgument] * 2


@pytest.mark.parametrize("bad", [{"k": -1}, {"ef_search": -5}, {"k_factor": 2**32}, {"k": True}])
def test_values_a_message_refuses_fail_alike(tmp_path: Path, bad: dict[str, object]) -> None:
    """Values a proto field refuses raise the same exception in process as over gRPC: the direct
    search leaves them to the message path."""
    x = np.ones((1, D), np.float32)
    kw: dict[str, object] = {"k": K, "space": "old", **bad}
    got = []
    with Client.embedded(tmp_path / "e") as c:
        _setup_errors(c)
        with pytest.raises(Exception) as e:
            c.search("flat", x, **kw)  # type: ignore[arg-type]
        got.append((type(e.value), str(e.value)))
    server, port = start_server(tmp_path / "g")
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as g:
            _setup_errors(g)
            with pytest.raises(Exception) as e:
                g.search("flat", x, **kw)  # type: ignore[arg-type]
            got.append((type(e.value), str(e.value)))
    finally:
        server.stop(None)
    assert got[0] == got[1], got


def test_a_failing_request_iterator_raises_its_own_error(tmp_path: Path) -> None:
    class Boom(Exception):
        pass

    def requests() -> Iterator[Any]:
        from interlingua.v1 import common_pb2, points_pb2

        vec = common_pb2.Vectors(data=np.ones(D, "<f4").tobytes(), dim=D)
        yield points_pb2.UpsertRequest(collection="flat", space="old", ids=["q"], vectors=vec)
        raise Boom("from the caller")

    with Client.embedded(tmp_path / "e") as c:
        _setup_errors(c)
        with pytest.raises(Boom):
            c._points.UpsertStream(requests())
        assert [p.id for p in c.get("flat", ["q"])] == ["q"]  # the first message was committed


def test_embedded_restart_keeps_every_write(tmp_path: Path) -> None:
    data = tmp_path / "data"
    xb, xq, _ = _data()
    ids = [f"p{i}" for i in range(N)]
    with Client.embedded(data, merge_min_fresh=64, **FAST) as c:  # type: ignore[arg-type]
        c.register_space("old", D)
        c.create_collection("flat", "old", "Flat")
        c.create_collection("hnsw", "old", "HNSW16")
        for name in ("flat", "hnsw"):
            c.upsert(name, ids, xb, space="old", payloads=[{"i": i} for i in range(N)], batch_size=100)
            c.delete(name, ids[:10])
        c.upsert("flat", ["p10"], xb[10:11], space="old", payloads=[{"i": "again"}])
        _wait_merged(c)  # the close merges nothing more: the same graph answers after the restart
        before = c.search("hnsw", xq, K, space="old")
        snap = c.create_snapshot("s1")
        manifest = c.download_snapshot("s1", tmp_path / "dl")
        assert manifest["sequence"] == snap.sequence and (tmp_path / "dl" / "interlingua.db").exists()
    with Client.embedded(data) as c:
        _check_flat(c.search("flat", xq, K, space="old"), xb, xq)
        after = c.search("hnsw", xq, K, space="old")
        assert after.ids.tolist() == before.ids.tolist()
        np.testing.assert_array_equal(after.scores, before.scores)
        assert c.get("flat", ["p10"], with_payload=True)[0].payload == {"i": "again"}
        assert c.get_collection("flat").num_points == N - 10
        with pytest.raises(NotFound):
            c.get("hnsw", ["p0"])
        assert [s.name for s in c.list_snapshots()] == ["s1"]


_EMBED = """
import sys
from interlingua.client import Client, InterlinguaError
try:
    Client.embedded(sys.argv[1]).close()
except InterlinguaError as e:
    print(type(e).__name__, e.message)
else:
    print("opened")
"""


def _refusal(data: Path, pid: int, message: str) -> None:
    assert f"data directory {data} is in use by another process (pid {pid})" in message, message


def test_a_locked_data_dir_is_refused_by_a_second_process(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with Client.embedded(data) as c:
        c.register_space("old", D)
        # another embedded client, in another process
        out = subprocess.run([sys.executable, "-c", _EMBED, str(data)], capture_output=True, text=True, timeout=120)
        assert out.stdout.startswith("FailedPrecondition "), out.stdout + out.stderr
        _refusal(data, os.getpid(), out.stdout)
        # a server: `interlingua serve` exits at once with the message (exit 2), it does not hang
        cmd = [sys.executable, "-m", "interlingua.client.cli", "serve", "--data-dir", str(data), "--port", "0"]
        out = subprocess.run([*cmd, "--no-metrics"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr
        _refusal(data, os.getpid(), out.stderr)
        # in this process too (another lock file description), and a restore
        with pytest.raises(FailedPrecondition) as e:
            Client.embedded(data)
        _refusal(data, os.getpid(), e.value.message)
        snapshot = _snapshot(c)
        with pytest.raises(Refused, match=re.escape(f"a server is running on {data} (pid {os.getpid()})")):
            restore(snapshot, data)
        assert c.get_space("old").dim == D  # the holder is untouched
    # closed: the lock is free again
    with Client.embedded(data) as c:
        assert c.get_space("old").dim == D


def _snapshot(c: Client) -> Path:
    c.create_snapshot("s")
    return Path(c._embedded.config.data_dir) / "snapshots" / "s"


def test_an_embedded_client_is_refused_while_a_server_runs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with child_server(tmp_path, data) as (proc, _stubs):
        with pytest.raises(FailedPrecondition) as e:
            Client.embedded(data)
        _refusal(data, proc.pid, e.value.message)
        # an in-process server's start fails with the same message, before it serves anything
        with pytest.raises(Refused) as refused:
            start_server(data)
        _refusal(data, proc.pid, refused.value.message)
    with Client.embedded(data) as c:  # the server is gone (killed): its lock went with it
        assert c.health() == "SERVING"


def test_embedded_calls_keep_the_callers_openmp_setting(tmp_path: Path) -> None:
    faiss.omp_set_num_threads(3)
    try:
        with Client.embedded(tmp_path / "data") as c:
            _setup_errors(c)
            c.search("flat", np.ones((1, D)), 1, space="old")
            c.search("flat", np.ones((2, D)), 1, space="old")
            assert faiss.omp_get_max_threads() == 3
    finally:
        faiss.omp_set_num_threads(os.cpu_count() or 1)


@pytest.mark.parametrize("n", [1, 7])
def test_one_pass_query_normalization_is_bit_identical(n: int) -> None:
    """The search path's one-pass checks and normalization (validate.unpack_queries) give exactly
    what unpack_vectors + normalize_rows gave (one query: to the last bit of its norm), and leave
    every refusal to them, in their order."""
    from interlingua.server import validate as v
    from interlingua.server.errors import InvalidArgument as Invalid

    d = 384
    x = make_data(n, d, seed=9) * np.float32(10.0) ** np.arange(-3, n - 3, dtype=np.float32)[:n, None]
    fast, done = v.unpack_queries(x.tobytes(), d, d, cosine=True, what="queries")
    slow = v.normalize_rows(v.unpack_vectors(x.tobytes(), d, d, what="queries"), what="queries")
    assert done and fast.dtype == np.float32 and fast.flags.c_contiguous
    if n == 1:  # one query: its norm from a BLAS dot (the summation order differs from the pairwise sum)
        np.testing.assert_allclose(fast, slow, rtol=1e-6, atol=0)
        assert abs(float(np.linalg.norm(fast.astype(np.float64))) - 1.0) < 1e-6
    else:
        np.testing.assert_array_equal(fast, slow)
    plain, done = v.unpack_queries(x.tobytes(), d, d, cosine=False, what="queries")
    assert not done and np.array_equal(plain, x)
    for bad, needle in ((np.nan, "NaN or Inf"), (np.inf, "NaN or Inf"), (2e18, "L2 norm"), (0.0, "")):
        y = x.copy()
        y[-1] = bad
        if needle:
            with pytest.raises(Invalid, match=needle):
                v.unpack_queries(y.tobytes(), d, d, cosine=True, what="queries")
        else:  # a zero row: reported by normalize_rows, after the index parameter checks
            got, done = v.unpack_queries(y.tobytes(), d, d, cosine=True, what="queries")
            assert not done and np.array_equal(got, y)
            with pytest.raises(Invalid, match="zero"):
                v.normalize_rows(got, what="queries")
    for data, dim in ((x.tobytes(), d + 1), (b"", d), (x.tobytes()[:-4], d)):
        with pytest.raises(Invalid):
            v.unpack_queries(data, dim, d, cosine=True, what="queries")
