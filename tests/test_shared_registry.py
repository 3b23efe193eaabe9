"""Several front-ends sharing one registry (``server/shared.py``) in a real etcd, over one Milvus Lite
server process: spaces, transforms, collections and route tables seen by every front-end, atomic
activation (a front-end acting on a table it has not seen yet loses, nothing changes), writes from
both front-ends, NOT_SERVING while etcd is gone and recovery, deletions while a front-end was down.

etcd is Debian's ``etcd-server`` (``make test`` installs it where it can); without the binary, or
without the milvus extra, these tests skip with the reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import brute_force, make_data, milvus_keys, start_server, wait_for

from interlingua.client import AlreadyExists, Client, FailedPrecondition, NotFound, Unavailable
from interlingua.server import Server
from interlingua.server.config import ServerConfig
from interlingua.server.errors import Unavailable as EtcdDown
from interlingua.server.etcd import Etcd, parse_registry_uri
from interlingua.server.shared import KEY_BLOCK

ETCD = shutil.which("etcd")
HAVE_MILVUS = all(importlib.util.find_spec(m) is not None for m in ("pymilvus", "milvus_lite"))
pytestmark = [
    pytest.mark.skipif(ETCD is None, reason="needs the etcd binary (Debian: apt-get install etcd-server)"),
    pytest.mark.skipif(not HAVE_MILVUS, reason="needs the milvus extra: pip install 'interlingua[milvus]'"),
]
D, N = 16, 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdProcess:
    """A real etcd on loopback ports of its own, restartable on the same data dir."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port, self.peer = folder, _free_port(), _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert ETCD is not None
        url, peer = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer}"
        args = [ETCD, "--data-dir", str(self.folder / "etcd"), "--listen-client-urls", url,
                "--advertise-client-urls", url, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"default={peer}"]  # fmt: skip
        with (self.folder / "etcd.log").open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        client = Etcd([f"127.0.0.1:{self.port}"], timeout=1.0)
        deadline = time.monotonic() + 30
        try:
            while True:
                try:
                    client.range("/")
                    return
                except EtcdDown:
                    if time.monotonic() > deadline:
                        self.kill()
                        raise AssertionError((self.folder / "etcd.log").read_text()[-2000:]) from None
                    time.sleep(0.1)
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(30)
            self.proc = None


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    e = EtcdProcess(tmp_path_factory.mktemp("etcd"))
    e.start()
    yield e
    e.kill()


@pytest.fixture(scope="module")
def milvus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Milvus Lite's own gRPC server in a process of its own: one engine for every front-end."""
    import sys

    folder, port = tmp_path_factory.mktemp("milvus"), _free_port()
    args = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(folder), "--host", "127.0.0.1"]
    with (folder / "log").open("ab") as out:
        proc = subprocess.Popen([*args, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    yield uri
    proc.kill()
    proc.wait(30)


@pytest.fixture
def direct(etcd: EtcdProcess) -> Iterator[Etcd]:
    """A client of the test's etcd, for reading and writing keys behind the front-ends' backs."""
    client = Etcd([f"127.0.0.1:{etcd.port}"])
    yield client
    client.close()


_prefixes = iter(range(1_000_000))


@pytest.fixture
def pair(tmp_path: Path, etcd: EtcdProcess, milvus: str) -> Iterator[Any]:
    """Two front-ends (own data dirs) sharing a fresh prefix of the etcd; returns a factory of more."""
    registry = f"etcd://127.0.0.1:{etcd.port}/il{next(_prefixes)}-{time.time_ns()}"
    servers: list[Server] = []
    clients: list[Client] = []

    def front_end(name: str, **overrides: object) -> tuple[Server, Client]:
        config = {"backend": "milvus", "milvus_uri": milvus, "registry": registry, "milvus_check_seconds": 0.2}
        config.update(overrides)
        srv, port = start_server(tmp_path / name, **config)  # type: ignore[arg-type]
        c = Client(f"127.0.0.1:{port}", timeout=60)
        servers.append(srv)
        clients.append(c)
        wait_for(lambda: c.health() == "SERVING", 30)
        return srv, c

    yield front_end
    for c in clients:
        c.close()
    for s in servers:
        s.stop(None)
    import pymilvus

    engine = pymilvus.MilvusClient(milvus)  # the next test starts on an empty engine
    for name in engine.list_collections():
        engine.drop_collection(name)
    engine.close()


def _create(c: Client, name: str) -> None:
    """The collection on the engine, which needs a moment to listen after it started."""
    deadline = time.monotonic() + 60
    while True:
        try:
            c.create_collection(name, "old", "Flat")
            return
        except Unavailable:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def _world(c: Client, name: str = "g") -> dict[str, np.ndarray]:
    c.register_space("old", D)
    c.register_space("new", D)
    _create(c, name)
    rng = np.random.default_rng(7)
    old = make_data(N, D, seed=3)
    rot = np.linalg.qr(rng.standard_normal((D, D)))[0].astype(np.float32)
    return {"old": old, "new": (old @ rot).astype(np.float32), "rot": rot}


def _fit(c: Client, name: str, w: dict[str, np.ndarray], noise: float = 0.0) -> None:
    rng = np.random.default_rng(len(name))
    new = (w["new"] + noise * rng.standard_normal(w["new"].shape)).astype(np.float32)
    c.fit_transform(name, "procrustes", source_space="new", target_space="old", doc_pairs=(new, w["old"]))


@contextlib.contextmanager
def _stalled(owner: Any, attr: str) -> Iterator[threading.Event]:
    """``owner.attr`` (a step of a front-end's watch) waits until the block ends, then runs; yields an event
    set once a call waits: the front-end has not applied what came from etcd meanwhile."""
    held, release, real = threading.Event(), threading.Event(), getattr(owner, attr)

    def slow(*args: Any, **kw: Any) -> Any:
        held.set()
        release.wait(30)
        return real(*args, **kw)

    setattr(owner, attr, slow)
    try:
        yield held
    finally:
        release.set()
        setattr(owner, attr, real)


def _ready(c: Client, name: str) -> bool:
    """Transform ``name`` is ready on ``c`` (not there yet: False)."""
    try:
        return c.get_transform(name).state == "ready"
    except NotFound:
        return False


def _live(c: Client, collection: str) -> dict[str, str]:
    return {r.query_space: r.transform for r in c.list_routes(collection).active}


def test_a_second_front_end_serves_what_the_first_registered(pair: Any) -> None:
    _, a = pair("a")
    _, b = pair("b")
    w = _world(a)
    ids = [f"p{i}" for i in range(N)]
    a.upsert("g", ids, w["old"], space="old")
    wait_for(lambda: [s.name for s in b.list_spaces()] == ["new", "old"], 10)
    wait_for(lambda: [col.name for col in b.list_collections()] == ["g"], 10)
    assert b.get_collection("g").num_points == N
    xq = w["old"][:20]
    _, ref = brute_force(w["old"], xq, 5)
    for c in (a, b):
        np.testing.assert_array_equal(c.search("g", xq, 5, space="old").ids, np.array(ids)[ref])
    _fit(a, "t", w)
    a.wait_transform("t")
    wait_for(lambda: _ready(b, "t"), 10)
    with pytest.raises(FailedPrecondition, match="no route"):
        b.search("g", w["new"][:3], 5, space="new")
    a.activate_route("g", "t", force=True)  # activated on a ...
    wait_for(lambda: _live(b, "g") == {"new": "t"}, 10)  # ... served by b
    qn = w["new"][:20]
    np.testing.assert_array_equal(b.search("g", qn, 5, space="new").ids, a.search("g", qn, 5, space="new").ids)
    assert (b.search("g", qn, 5, space="new").ids[:, 0] == np.array(ids)[:20]).all()  # the rotation undone
    b.rollback_route("g", "new")  # rolled back on b: a has no route either
    wait_for(lambda: _live(a, "g") == {}, 10)
    with pytest.raises(FailedPrecondition, match="no route"):
        a.search("g", qn, 5, space="new")


def test_an_activation_on_a_stale_table_loses_and_changes_nothing(pair: Any) -> None:
    """b has not seen a's activation yet (its watch is held): b's own activation is refused, b keeps
    serving the table it had, and once its watch runs again it serves a's."""
    _, a = pair("a")
    srv_b, b = pair("b")
    w = _world(a)
    a.upsert("g", [f"p{i}" for i in range(N)], w["old"], space="old")
    _fit(a, "t1", w)
    _fit(a, "t2", w, noise=0.01)
    for name in ("t1", "t2"):
        a.wait_transform(name)
        wait_for(lambda n=name: _ready(b, n), 10)
    with _stalled(srv_b.engine.shared, "_apply_routes") as held:  # b's watch stalls on the next route table
        a.activate_route("g", "t1", force=True)
        assert held.wait(10)
        with pytest.raises(FailedPrecondition, match="changed by another front-end"):
            b.activate_route("g", "t2", force=True)
        assert _live(b, "g") == {}  # nothing changed on b
    wait_for(lambda: _live(b, "g") == {"new": "t1"}, 10)
    b.activate_route("g", "t2", force=True)  # on the table it has now seen: accepted
    wait_for(lambda: _live(a, "g") == {"new": "t2"}, 10)
    assert [r.transform for r in b.list_routes("g").history][:2] == ["t2", "t1"]


def test_concurrent_activations_leave_one_table_everywhere(pair: Any, direct: Etcd) -> None:
    srv_a, a = pair("a")
    _, b = pair("b")
    w = _world(a)
    for i in range(3):
        _fit(a, f"t{i}", w, noise=0.01 * i)
        a.wait_transform(f"t{i}")
    wait_for(lambda: all(_ready(b, f"t{i}") for i in range(3)), 10)
    outcomes: list[str] = []
    go = threading.Barrier(6)

    def activate(c: Client, t: str) -> None:
        go.wait()
        try:
            c.activate_route("g", t, force=True)
            outcomes.append("won")
        except FailedPrecondition as e:
            assert "changed by another front-end" in e.message
            outcomes.append("lost")

    threads = [threading.Thread(target=activate, args=(c, f"t{i}")) for c in (a, b) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(outcomes) == 6 and "won" in outcomes
    shared = srv_a.engine.shared
    kv = direct.get(shared.key("routes", "g"))
    assert kv is not None
    import json

    final = json.loads(kv.value)["new"]["transform"]
    wait_for(lambda: _live(a, "g") == _live(b, "g") == {"new": final}, 10)


def test_writes_from_both_front_ends_merge_and_count(pair: Any, direct: Etcd) -> None:
    sa, a = pair("a")
    _, b = pair("b")
    w = _world(a)
    wait_for(lambda: [col.name for col in b.list_collections()] == ["g"], 10)
    half = N // 2
    errors: list[BaseException] = []

    def write(c: Client, lo: int, hi: int) -> None:
        try:
            for i in range(lo, hi, 25):
                j = min(i + 25, hi)
                c.upsert("g", [f"p{k}" for k in range(i, j)], w["old"][i:j], space="old")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(a, 0, half)), threading.Thread(target=write, args=(b, half, N))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    b.upsert("g", ["p0", "p1"], w["new"][:2], space="new")  # b adds new-space vectors to a's points
    for c in (a, b):
        info = c.get_collection("g")
        assert (info.num_points, info.vectors_per_space) == (N, {"old": N, "new": 2})
    got = a.get("g", ["p0"], with_vectors=True)[0]
    assert set(got.vectors) == {"old", "new"}  # a's old vector kept by b's write
    np.testing.assert_allclose(got.vectors["new"], w["new"][0] / np.linalg.norm(w["new"][0]), rtol=1e-5)
    a.delete("g", ["p0"])
    wait_for(lambda: b.get_collection("g").num_points == N - 1, 10)
    keys = milvus_keys(sa, "g")  # each front-end's new points took keys from its own block
    assert len(keys) == N - 1
    by_a = {keys[f"p{k}"] for k in range(1, half)}
    by_b = {keys[f"p{k}"] for k in range(half, N)}
    assert max(by_a) < min(by_b) or max(by_b) < min(by_a)
    assert max(keys.values()) < 2 * KEY_BLOCK
    registered = direct.get(sa.engine.shared.key("keys", "g"))
    assert registered is not None and int(registered.value) == 2 * KEY_BLOCK


def test_the_write_lock_of_a_crashed_front_end_expires(pair: Any, direct: Etcd) -> None:
    """A lock left by a front-end that died (its lease no longer renewed) holds writes until the lease
    expires, then they go through; a lock that outlasts registry_timeout_seconds is UNAVAILABLE, nothing
    written."""
    srv_a, a = pair("a", registry_timeout_seconds=3.0)
    w = _world(a)
    ids = [f"p{i}" for i in range(N)]
    a.upsert("g", ids[:10], w["old"][:10], space="old")
    lock = srv_a.engine.shared.key("locks", "g")
    direct.put(lock, b"a-front-end-that-died", lease=direct.grant(1))
    t0 = time.monotonic()
    a.upsert("g", ids[10:20], w["old"][10:20], space="old")  # waits for the lease to expire
    assert 0.5 < time.monotonic() - t0 < 3.0
    direct.put(lock, b"a-front-end-that-hangs")  # no lease: held until deleted
    with pytest.raises(Unavailable, match="being written by another front-end for over 3s"):
        a.upsert("g", ids[20:30], w["old"][20:30], space="old")
    assert a.get_collection("g").num_points == 20
    direct.delete(lock)
    a.upsert("g", ids[20:30], w["old"][20:30], space="old")
    assert a.get_collection("g").num_points == 30
    direct.revoke(srv_a.engine.shared.lease)  # a's own lease gone (a long pause): the next write takes another
    a.upsert("g", ids[30:40], w["old"][30:40], space="old")
    assert a.get_collection("g").num_points == 40 and a.health() == "SERVING"


def test_a_malformed_registry_value_is_skipped(pair: Any, direct: Etcd, caplog: pytest.LogCaptureFixture) -> None:
    """Values another tool (or version) wrote under the prefix that this front-end cannot read are logged
    and skipped, at the first read and from the watch: the front-ends stay SERVING and apply the rest."""
    srv_a, a = pair("a")
    shared = srv_a.engine.shared
    direct.put(shared.key("spaces", "junk"), b"not json")
    direct.put(shared.key("collections", "junk"), b'{"no": "spec"}')
    _, b = pair("b")  # its first read meets both
    a.register_space("ok", D)
    wait_for(lambda: [s.name for s in b.list_spaces()] == ["ok"], 10)
    direct.put(shared.key("routes", "junk"), b"[1, 2")
    direct.put(shared.key("migrations", "junk"), b'{"record": 3}')
    a.register_space("ok2", D)  # after the bad events: still applied
    wait_for(lambda: [s.name for s in b.list_spaces()] == ["ok", "ok2"], 10)
    assert a.health() == b.health() == "SERVING"
    assert "cannot be read here" in caplog.text


def test_health_follows_the_registry(pair: Any, etcd: EtcdProcess) -> None:
    srv_a, a = pair("a")
    _, b = pair("b")
    w = _world(a)
    a.upsert("g", [f"p{i}" for i in range(N)], w["old"], space="old")
    _fit(a, "t", w)
    a.wait_transform("t")

    def in_sync() -> float | None:
        return srv_a.engine.metrics.registry.get_sample_value("interlingua_registry_in_sync")

    assert in_sync() == 1.0
    etcd.kill()
    try:
        for c in (a, b):
            wait_for(lambda c=c: c.health() == "NOT_SERVING", 10)
        assert in_sync() == 0.0  # interlingua_registry_in_sync, for the dashboards
        assert b.search("g", w["old"][:2], 3, space="old").ids.shape == (2, 3)  # its last table still serves
        with pytest.raises(Unavailable, match="not in sync"):
            a.activate_route("g", "t", force=True)
        assert _live(a, "g") == {}
    finally:
        etcd.start()
    for c in (a, b):
        wait_for(lambda c=c: c.health() == "SERVING", 30)
    a.activate_route("g", "t", force=True)
    wait_for(lambda: _live(b, "g") == {"new": "t"}, 10)


def test_deletions_reach_every_front_end_even_one_that_was_down(pair: Any, tmp_path: Path) -> None:
    _, a = pair("a")
    srv_b, b = pair("b")
    w = _world(a)
    _create(a, "h")
    _fit(a, "t", w)
    a.wait_transform("t")
    wait_for(lambda: len(b.list_collections()) == 2 and _ready(b, "t"), 10)
    with pytest.raises(AlreadyExists, match="already exists"):
        b.create_collection("h", "old", "Flat")
    a.delete_collection("g")
    wait_for(lambda: [col.name for col in b.list_collections()] == ["h"], 10)
    with pytest.raises(NotFound):
        b.search("g", w["old"][:1], 3, space="old")
    srv_b.stop(None)  # b is down while a deletes h and t
    a.delete_collection("h")
    a.delete_transform("t")
    config = srv_b.engine.config
    srv_b2, port = start_server(
        config.data_dir, **{k: getattr(config, k) for k in ("backend", "milvus_uri", "registry")}
    )
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as b2:
            wait_for(lambda: b2.health() == "SERVING", 30)
            assert b2.list_collections() == [] and b2.list_transforms() == []
            assert [s.name for s in b2.list_spaces()] == ["new", "old"]
    finally:
        srv_b2.stop(None)


def test_a_collection_moved_to_the_engine_is_shared(pair: Any, milvus: str) -> None:
    """An embedded collection of a shared front-end moved to the shared engine is attached by the other
    front-end, with the same answers, and both go on with keys past the copy's; moving a name the registry
    has already is refused, nothing changed."""
    sa, a = pair("a")
    _, b = pair("b")
    a.register_space("old", D)
    a.create_collection("e", "old", "Flat", backend="embedded")  # local to a: not in the registry
    xb = make_data(N, D, seed=3)
    ids = np.array([f"p{i}" for i in range(N)])
    a.upsert("e", list(ids), xb, space="old")
    assert [col.name for col in b.list_collections()] == []
    deadline = time.monotonic() + 60
    while True:  # the engine process needs a moment to listen when this test runs first
        try:
            report = a.move_collection("e", milvus)
            break
        except Unavailable:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert report.points_copied == N and report.collection.backend == "milvus"
    wait_for(lambda: [col.name for col in b.list_collections()] == ["e"], 10)
    xq = make_data(10, D, seed=4)
    _, ref = brute_force(xb, xq, 5)
    for c in (a, b):
        np.testing.assert_array_equal(c.search("e", xq, 5, space="old").ids, ids[ref])
    copied = milvus_keys(sa, "e")
    assert sorted(copied.values()) == list(range(N))  # the copy's keys: the registry goes on from there
    b.upsert("e", ["b0"], make_data(1, D, seed=5), space="old")
    a.upsert("e", ["a0", "p3"], make_data(2, D, seed=6), space="old")
    keys = milvus_keys(sa, "e")
    assert keys["p3"] == copied["p3"] and min(keys["a0"], keys["b0"]) >= N and len(keys) == N + 2
    b.create_collection("e2", "old", "Flat", backend="embedded")  # b's own, then a's of the same name
    a.create_collection("e2", "old", "Flat", backend="embedded")
    b.move_collection("e2", milvus)
    with pytest.raises(AlreadyExists, match="already exists in the shared registry"):
        a.move_collection("e2", milvus)
    assert a.get_collection("e2").backend == "embedded"


def _migration_world(a: Client, b: Client) -> tuple[dict[str, np.ndarray], list[str]]:
    """Collection m (HNSW16: its new field gets the index at the cutover) with N old vectors, t (new -> old)
    and r (old -> new) fitted on a and seen by b."""
    w = _world(a)
    a.create_collection("m", "old", "HNSW16")
    ids = [f"p{i}" for i in range(N)]
    a.upsert("m", ids, w["old"], space="old")
    _fit(a, "t", w)
    a.fit_transform("r", "procrustes", source_space="old", target_space="new", doc_pairs=(w["old"], w["new"]))
    for name in ("t", "r"):
        a.wait_transform(name)
        wait_for(lambda n=name: _ready(b, n), 10)
    wait_for(lambda: "m" in [col.name for col in b.list_collections()], 10)
    return w, ids


def _migration(c: Client, collection: str) -> tuple[str, str]:
    """(phase, reverse transform) of the collection's migration; ("none", "") without one."""
    try:
        info = c.get_migration(collection)
    except NotFound:
        return "none", ""
    return info.phase, info.reverse_transform


def _phase(c: Client, collection: str) -> str:
    return _migration(c, collection)[0]


def test_a_migration_runs_across_front_ends(pair: Any) -> None:
    """Started on b, backfilled through both, cut over on a while b searches, rolled back on b, cut over and
    finished on a: every front-end follows each phase, answers alike, and ends with the new home."""
    _, a = pair("a")
    srv_b, b = pair("b")
    w, ids = _migration_world(a, b)
    b.start_migration("m", "new", "t", reverse_transform="r")
    wait_for(lambda: _phase(a, "m") == "backfill", 10)
    with pytest.raises(FailedPrecondition):
        a.start_migration("m", "new", "t")  # one migration per collection, on every front-end
    half = N // 2
    a.upsert("m", ids[:half], w["new"][:half], space="new")
    b.upsert("m", ids[half:], w["new"][half:], space="new")
    qn = w["new"][:20]
    for c in (a, b):
        info = c.get_migration("m")
        assert info.phase == "backfill"
        np.testing.assert_array_equal(c.search("m", qn, 5, space="new").ids[:, 0], np.array(ids)[:20])
    failures: list[BaseException] = []
    stop = threading.Event()

    def search_on_b() -> None:
        while not stop.is_set():
            try:
                b.search("m", w["old"][:4], 5, space="old")
                b.search("m", qn[:4], 5, space="new")
            except BaseException as e:
                failures.append(e)

    followed: list[bool] = []
    mig_b = srv_b.engine.migrations.active["m"]
    follow_switch = mig_b.follow_switch

    def record(switching: bool) -> None:
        followed.append(switching)
        follow_switch(switching)

    mig_b.follow_switch = record
    t = threading.Thread(target=search_on_b)
    t.start()
    try:
        a.cutover("m")  # the index switch: b's requests wait for it, none fails
    finally:
        stop.set()
        t.join(60)
    assert not failures, failures[:3]
    # b held its requests during a's switch, and let them go after it
    wait_for(lambda: True in followed and followed[-1] is False, 10)
    wait_for(lambda: _phase(b, "m") == "cutover", 10)
    b.rollback_cutover("m")
    wait_for(lambda: _phase(a, "m") == "backfill", 10)
    a.cutover("m")
    wait_for(lambda: _phase(b, "m") == "cutover", 10)
    a.finish_migration("m")
    wait_for(lambda: b.get_collection("m").home_space == "new", 10)
    assert _phase(b, "m") == "none"
    wait_for(lambda: _live(b, "m") == {"old": "r"}, 10)  # the reverse transform serves old-model queries
    for c in (a, b):
        np.testing.assert_array_equal(c.search("m", qn, 5, space="new").ids[:, 0], np.array(ids)[:20])
        got = c.search("m", w["old"][:20], 5, space="old").ids
        np.testing.assert_array_equal(got[:, 0], np.array(ids)[:20])
        # b may count while a drops the old vectors; a's write mark after the drop makes it count again
        wait_for(lambda c=c: c.get_collection("m").vectors_per_space == {"new": N}, 10)
        assert c.get_collection("m").num_points == N


def test_a_migration_changed_elsewhere_is_refused_then_followed(pair: Any) -> None:
    """b has not applied a's abort and restart yet (its watch is held): b's own abort of the migration it
    knows is refused with nothing changed; once its watch runs it follows, and its abort reaches a."""
    from interlingua.server.migration import follow

    _, a = pair("a")
    _, b = pair("b")
    w, ids = _migration_world(a, b)
    a.start_migration("m", "new", "t")
    wait_for(lambda: _phase(b, "m") == "backfill", 10)
    with _stalled(follow, "forget") as held:  # b's watch stalls on the next abort
        a.upsert("m", ids[:10], w["new"][:10], space="new")
        a.abort_migration("m")
        assert held.wait(10)
        a.start_migration("m", "new", "t", reverse_transform="r")  # a record b has not applied either
        with pytest.raises(FailedPrecondition, match="changed by another front-end"):
            b.abort_migration("m")
        assert _phase(b, "m") == "backfill" and _phase(a, "m") == "backfill"
    wait_for(lambda: _migration(b, "m") == ("backfill", "r"), 10)
    b.abort_migration("m")
    wait_for(lambda: _phase(a, "m") == "none", 10)
    assert a.get_collection("m").home_space == b.get_collection("m").home_space == "old"


def test_a_front_end_down_during_a_migration_catches_up(pair: Any) -> None:
    """b stops in backfill; a backfills, cuts over and finishes; b restarts on its data dir with the new home."""
    _, a = pair("a")
    srv_b, b = pair("b")
    w, ids = _migration_world(a, b)
    a.start_migration("m", "new", "t", reverse_transform="r")
    wait_for(lambda: _phase(b, "m") == "backfill", 10)
    config = srv_b.engine.config
    srv_b.stop(None)
    a.upsert("m", ids, w["new"], space="new")
    a.cutover("m")
    a.finish_migration("m")
    srv_b2, port = start_server(
        config.data_dir, **{k: getattr(config, k) for k in ("backend", "milvus_uri", "registry")}
    )
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as b2:
            wait_for(lambda: b2.health() == "SERVING", 30)
            info = b2.get_collection("m")
            assert (info.home_space, info.num_points, info.vectors_per_space) == ("new", N, {"new": N})
            assert _phase(b2, "m") == "none" and _live(b2, "m") == {"old": "r"}
            qn = w["new"][:20]
            np.testing.assert_array_equal(b2.search("m", qn, 5, space="new").ids, a.search("m", qn, 5, space="new").ids)
    finally:
        srv_b2.stop(None)


@pytest.mark.parametrize(
    "uri",
    ["etcd://127.0.0.1:2379", "http://127.0.0.1:2379/x", "etcd://127.0.0.1:notaport/x", "etcd:///x", "etcd://h:1//"],
)
def test_a_malformed_registry_is_refused_at_start(uri: str) -> None:
    with pytest.raises(ValueError, match="registry"):
        ServerConfig(registry=uri)


def test_registry_uri_parsing() -> None:
    assert parse_registry_uri("etcd://a:1,b:2/x/y") == (["a:1", "b:2"], "/x/y/")


def test_a_space_registered_elsewhere_with_another_definition_is_refused(pair: Any) -> None:
    """b has not seen a's space yet (its watch is held): its own registration of the name with another
    dimension is refused by the registry, and nothing is stored on b."""
    _, a = pair("a")
    srv_b, b = pair("b")
    with _stalled(srv_b.engine.shared, "_apply_space") as held:
        a.register_space("s", D)
        assert held.wait(10)
        with pytest.raises(AlreadyExists, match=f"already registered in the shared registry .* as {D} dims"):
            b.register_space("s", 2 * D)
        assert b.list_spaces() == []
    wait_for(lambda: [(s.name, s.dim) for s in b.list_spaces()] == [("s", D)], 10)
    b.register_space("t", D)  # and b's own registrations reach a
    wait_for(lambda: [s.name for s in a.list_spaces()] == ["s", "t"], 10)


def test_large_transform_weights_travel_in_chunks(pair: Any, direct: Etcd) -> None:
    srv_a, a = pair("a")
    _, b = pair("b")
    d = 384  # a procrustes map of 384 x 384 float32: 576 KiB of weights, over one chunk
    a.register_space("big-old", d)
    a.register_space("big-new", d)
    x = make_data(600, d, seed=5)
    rot = np.linalg.qr(np.random.default_rng(5).standard_normal((d, d)))[0].astype(np.float32)
    a.fit_transform("tb", "procrustes", source_space="big-new", target_space="big-old", doc_pairs=(x @ rot, x))
    info = a.wait_transform("tb")
    wait_for(lambda: _ready(b, "tb"), 20)
    assert b.get_transform("tb").checksum == info.checksum
    kvs, _ = direct.range(srv_a.engine.shared.key("weights", "tb/"))
    assert len(kvs) >= 2


def test_a_front_end_joining_publishes_what_it_has(tmp_path: Path, pair: Any, milvus: str) -> None:
    """A front-end that served a milvus collection on its own is restarted with the registry: its
    spaces, collection, transform and route reach the other front-end, which serves the same answers."""
    srv, port = start_server(tmp_path / "a", backend="milvus", milvus_uri=milvus)
    with Client(f"127.0.0.1:{port}", timeout=60) as solo:
        w = _world(solo, "j")
        ids = [f"p{i}" for i in range(N)]
        solo.upsert("j", ids, w["old"], space="old")
        _fit(solo, "t", w)
        solo.wait_transform("t")
        solo.activate_route("j", "t", force=True)
        before = solo.search("j", w["new"][:10], 5, space="new").ids
    srv.stop(None)
    _, a = pair("a")  # the same data dir, now with the registry
    _, b = pair("b")
    wait_for(lambda: [col.name for col in b.list_collections()] == ["j"] and _live(b, "j") == {"new": "t"}, 10)
    np.testing.assert_array_equal(b.search("j", w["new"][:10], 5, space="new").ids, before)
    assert b.get_collection("j").num_points == N
    assert _live(a, "j") == {"new": "t"}
