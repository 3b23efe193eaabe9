"""Snapshots over a real server: consistent while a writer runs, backup, offline restore, error paths.

A writer thread upserts, overwrites and deletes while the snapshot is taken; the snapshot
must hold exactly the writes at or below its manifest sequence (every write acknowledged
before the call among them). The backup is restored into a fresh data dir with the CLI, a
server started on it, and its searches compared with a brute-force numpy reference over
the expected points; a routed search through a fitted transform answers as before.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import brute_force, make_data, start_server

from interlingua.client import AlreadyExists, Client, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from interlingua.client.cli import main
from interlingua.server.auth import hash_key
from interlingua.server.config import ApiKey
from interlingua.server.errors import FailedPrecondition as Refused
from interlingua.server.restore import restore
from interlingua.server.snapshots import sha256_file
from interlingua.v1 import points_pb2 as ppb
from interlingua.v1 import points_pb2_grpc as pgrpc
from interlingua.v1 import snapshots_pb2 as snpb
from interlingua.v1 import snapshots_pb2_grpc as sngrpc

D, D_NEW = 16, 20


def _unit(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


class Writer(threading.Thread):
    """Upserts new ids, overwrites and deletes earlier ones until stopped; logs each acknowledged write."""

    def __init__(self, client: Client, port: int, start: int) -> None:
        super().__init__(daemon=True)
        self.points = pgrpc.PointServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))  # deletes: their sequence
        self.client, self.next, self.stop = client, start, threading.Event()
        self.log: list[tuple[int, str, list[str], np.ndarray | None]] = []  # (sequence, op, ids, x)
        self.lock = threading.Lock()
        self.error: Exception | None = None
        self.rng = np.random.default_rng(7)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                i = len(self.log)
                if i % 5 == 4:  # delete two earlier ids
                    ids, x, op = [str(j) for j in self.rng.choice(self.next, 2, replace=False)], None, "delete"
                    r = self.points.DeletePoints(ppb.DeletePointsRequest(collection="docs", ids=ids, missing_ok=True))
                    if r.deleted == 0:  # nothing changed and no sequence taken
                        continue
                    seq = int(r.sequence)
                else:  # 15 new ids and 5 overwrites of earlier ones
                    old = [str(j) for j in self.rng.choice(self.next, 5, replace=False)]
                    ids, op = [str(j) for j in range(self.next, self.next + 15)] + old, "upsert"
                    x = make_data(20, D, seed=1000 + i)
                    seq = self.client.upsert("docs", ids, x, space="old@1")
                    self.next += 15
                with self.lock:
                    self.log.append((seq, op, ids, x))
        except Exception as e:  # reported by the test
            self.error = e


def _state_at(
    seed: dict[str, np.ndarray], log: list[tuple[int, str, list[str], np.ndarray | None]], seq: int
) -> dict[str, np.ndarray]:
    """id -> unit vector after replaying the seeded points and every logged write at or below ``seq``."""
    state = dict(seed)
    for s, op, ids, x in sorted(log, key=lambda e: e[0]):
        if s > seq:
            break
        if op == "delete":
            for pid in ids:
                state.pop(pid, None)
        else:
            assert x is not None
            state.update(zip(ids, _unit(x), strict=True))
    return state


def test_snapshot_while_writing_then_backup_and_restore(tmp_path: Path) -> None:
    srv, port = start_server(tmp_path / "data")
    try:
        with Client(f"127.0.0.1:{port}") as c:
            c.register_space("old@1", dim=D, metric="cosine")
            c.register_space("new@2", dim=D_NEW, metric="cosine")
            xb = make_data(300, D, seed=1)
            c.create_collection("docs", "old@1", "Flat")
            c.upsert("docs", [str(i) for i in range(300)], xb, space="old@1")
            seed = dict(zip([str(i) for i in range(300)], _unit(xb), strict=True))
            # a static routed collection: its routed searches must answer the same after the restore
            rot = np.linalg.qr(np.random.default_rng(3).standard_normal((D_NEW, D_NEW)))[0][:, :D]
            xs = make_data(400, D, seed=2)
            c.create_collection("static", "old@1", "Flat")
            c.upsert(
                "static", [f"s{i}" for i in range(400)], xs, space="old@1", payloads=[{"i": i} for i in range(400)]
            )
            pairs = (_unit(xs) @ rot.T).astype(np.float32), xs
            c.fit_transform("new-to-old", "procrustes", source_space="new@2", target_space="old@1", doc_pairs=pairs)
            c.activate_route("static", "new-to-old", force=True)
            xq_new = pairs[0][:20]
            _, ids_before = c.search("static", xq_new, k=5, space="new@2")

            writer = Writer(c, port, 300)
            writer.start()
            while len(writer.log) < 8 and writer.is_alive():
                threading.Event().wait(0.01)
            with writer.lock:
                acked = [s for s, *_ in writer.log]
            info = c.create_snapshot("during-writes")
            while len(writer.log) < len(acked) + 8 and writer.is_alive():
                threading.Event().wait(0.01)
            writer.stop.set()
            writer.join()
            assert writer.error is None, writer.error
            assert max(acked) <= info.sequence  # everything acknowledged before the call is in it
            assert any(s > info.sequence for s, *_ in writer.log)  # writes continued past it
            expected = _state_at(seed, writer.log, info.sequence)
            assert info.points == {"docs": len(expected), "static": 400}
            assert (info.spaces, info.transforms, info.manifest["routes"]) == (2, 1, 1)
            assert info.manifest["files"]["interlingua.db"]["sha256"]
            assert [s.name for s in c.list_snapshots()] == ["during-writes"]

            backup = ["backup", "--to", str(tmp_path / "backup"), "--name", "b1", "--target", f"127.0.0.1:{port}"]
            assert main(backup) == 0
            assert [s.name for s in c.list_snapshots()] == ["during-writes"]  # b1 deleted after its download
            c.download_snapshot("during-writes", tmp_path / "dl")
    finally:
        srv.stop(None)

    # restore the snapshot taken during the writes into a fresh data dir, with the CLI, and serve it
    fresh = tmp_path / "fresh"
    assert main(["restore", str(tmp_path / "dl"), "--data-dir", str(fresh)]) == 0
    assert (tmp_path / "backup" / "manifest.json").is_file()
    srv, port = start_server(fresh)
    try:
        with Client(f"127.0.0.1:{port}") as c:
            assert c.get_collection("docs").num_points == len(expected)
            ids = sorted(expected)
            got = c.get("docs", ids, with_vectors=True)
            np.testing.assert_allclose(
                np.stack([p.vectors["old@1"] for p in got]), np.stack([expected[i] for i in ids]), atol=1e-6
            )
            xb_ref = np.stack([expected[i] for i in ids])
            xq = make_data(25, D, seed=9)
            scores, found = c.search("docs", xq, k=10, space="old@1")
            D_ref, I_ref = brute_force(xb_ref, xq, 10)
            np.testing.assert_allclose(scores, D_ref, atol=1e-5)
            for row in range(len(xq)):  # ids agree where the reference has no near-tie at the cut
                distinct = np.abs(np.diff(D_ref[row])) > 1e-5
                if distinct.all():
                    assert list(found[row]) == [ids[j] for j in I_ref[row]]
            assert [t.name for t in c.list_transforms()] == ["new-to-old"]
            assert [r.transform for r in c.list_routes("static").active] == ["new-to-old"]
            _, ids_after = c.search("static", xq_new, k=5, space="new@2")
            np.testing.assert_array_equal(ids_after, ids_before)
    finally:
        srv.stop(None)


def test_errors_corruption_and_roles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = (ApiKey("reader", hash_key("read-key"), "read"), ApiKey("boss", hash_key("admin-key"), "admin"))
    srv, port = start_server(tmp_path / "data", keys=keys)
    target = f"127.0.0.1:{port}"
    try:
        with Client(target, api_key="admin-key") as c, Client(target, api_key="read-key") as reader:
            channel = grpc.insecure_channel(target)
            stub, admin = sngrpc.SnapshotServiceStub(channel), (("authorization", "Bearer admin-key"),)
            c.register_space("s@1", dim=D, metric="l2")
            c.create_collection("docs", "s@1")
            c.upsert("docs", [str(i) for i in range(50)], make_data(50, D), space="s@1")
            with pytest.raises(PermissionDenied, match="CreateSnapshot needs 'admin'"):
                reader.create_snapshot("x")
            stale = tmp_path / "data" / "snapshots" / ".tmp-crashed-1234"
            stale.mkdir(parents=True)  # left by a crash mid-create: removed, never listed
            first = c.create_snapshot("")
            assert not stale.exists()
            assert first.name.startswith("snap-") and first.points == {"docs": 50}
            c.create_snapshot("a")
            with pytest.raises(AlreadyExists, match="'a' already exists"):
                c.create_snapshot("a")
            for bad in (".hidden", "../escape", "a/b", "x" * 20_000, "é"):
                with pytest.raises(InvalidArgument, match="snapshot name") as err:
                    c.create_snapshot(bad)
                assert len(err.value.message) < 300  # never echoed whole
            for call in (c.delete_snapshot, c.verify_snapshot, lambda n: c.download_snapshot(n, tmp_path / "x")):
                with pytest.raises(NotFound, match="snapshot 'nope' does not exist"):
                    call("nope")
            assert not (tmp_path / "x").exists()
            assert c.verify_snapshot("a").sequence == first.sequence
            with pytest.raises(grpc.RpcError) as rpc_err:
                stub.RestoreSnapshot(snpb.RestoreSnapshotRequest(name="a"), metadata=admin)

            assert rpc_err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            hint = rpc_err.value.details() or ""
            assert "`interlingua restore " in hint and "snapshots/a --data-dir" in hint
            channel.close()

            # corrupt one byte: refused by the server (naming the file), by the download and offline
            db = tmp_path / "data" / "snapshots" / "a" / "interlingua.db"
            raw = bytearray(db.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            db.write_bytes(bytes(raw))
            with pytest.raises(FailedPrecondition, match=r"'a' is corrupt: interlingua\.db does not match"):
                c.verify_snapshot("a")
            with pytest.raises(FailedPrecondition, match=r"interlingua\.db does not match"):
                c.download_snapshot("a", tmp_path / "dl")
            assert not (tmp_path / "dl").exists()
            with pytest.raises(Refused, match="a server is running"):
                restore(tmp_path / "data" / "snapshots" / first.name, tmp_path / "data")
            cli = ["--target", target, "--api-key", "admin-key"]
            capsys.readouterr()
            assert main(["snapshots", "verify", "a", *cli]) == 1
            assert "error: FAILED_PRECONDITION: snapshot 'a' is corrupt" in capsys.readouterr().err
            assert main(["snapshots", "delete", "a", *cli]) == 0
            assert main(["snapshots", "create", "c", *cli]) == 0
            assert main(["snapshots", "list", "--json", *cli]) == 0
            listed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
            assert [(s["name"], s["points"]) for s in listed] == [("c", {"docs": 50}), (first.name, {"docs": 50})]
            assert main(["snapshots", "create", "c", *cli]) == 1  # ALREADY_EXISTS
            c.delete_snapshot("c")
            assert [s.name for s in c.list_snapshots()] == [first.name]
            c.download_snapshot(first.name, tmp_path / "good")
    finally:
        srv.stop(None)

    # offline: a corrupt snapshot changes nothing; a good one replaces the state and sets the old aside
    other = tmp_path / "other"
    assert main(["restore", str(tmp_path / "good"), "--data-dir", str(other)]) == 0
    before = sha256_file(other / "interlingua.db")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "interlingua.db").write_bytes(b"not sqlite")
    manifest = json.loads((tmp_path / "good" / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps(manifest))
    assert main(["restore", str(broken), "--data-dir", str(other)]) == 2
    assert main(["restore", str(tmp_path / "missing"), "--data-dir", str(other)]) == 2
    assert sha256_file(other / "interlingua.db") == before and not list(other.glob("pre-restore-*"))
    done = restore(tmp_path / "good", other)
    assert done.previous is not None and (done.previous / "interlingua.db").is_file()
    srv, port = start_server(other)
    try:
        with Client(f"127.0.0.1:{port}", api_key="admin-key") as c:
            assert c.get_collection("docs").num_points == 50
    finally:
        srv.stop(None)
