"""A migration survives SIGKILL in the middle of each phase: during backfill upserts, during a forward
upgrade (which resumes at its cursor and completes), and after a cutover; every acknowledged write is
there after the restart and the companion index agrees with the collection."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import child_server, wait_for
from test_migration import IDS, N, search, setup, world

from interlingua.client import Client

pytestmark = pytest.mark.slow


def _kill(proc: object) -> None:
    os.kill(proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    proc.wait(30)  # type: ignore[attr-defined]


def test_sigkill_during_backfill_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    data = tmp_path / "data"
    w = world(2)
    acked: list[int] = []
    with child_server(tmp_path, data) as (proc, stubs):
        client = Client(stubs.target)
        setup(client, w)
        client.start_migration("c", "new", "t", reverse_transform="r")

        def backfill() -> None:
            try:
                for i in range(0, N, 10):
                    client.upsert("c", IDS[i : i + 10], w["docs_new"][i : i + 10], space="new")
                    acked.append(i)
            except Exception:  # the kill ends it
                pass

        t = threading.Thread(target=backfill)
        t.start()
        wait_for(lambda: len(acked) >= 8, timeout=60)
        _kill(proc)
        t.join()
        client.close()
    assert 8 <= len(acked) < N // 10, "the kill came too late to land mid-backfill"
    with child_server(tmp_path, data) as (_, stubs):
        client = Client(stubs.target)
        info = client.get_migration("c")
        assert info.phase == "backfill"
        assert len(acked) * 10 <= info.backfilled <= len(acked) * 10 + 10  # the batch in flight may have landed
        stored = client.get("c", IDS, with_vectors=True)
        assert info.backfilled == sum("new" in p.vectors for p in stored)  # companion == collection
        # the rest of the backfill and a cutover still work; the result is new -> new
        client.upsert("c", IDS, w["docs_new"], space="new")
        client.cutover("c")
        q = w["q_new"] / np.linalg.norm(w["q_new"], axis=1, keepdims=True)
        x = w["docs_new"] / np.linalg.norm(w["docs_new"], axis=1, keepdims=True)
        ref = np.array(IDS, dtype=object)[np.argsort(-q @ x.T, 1)[:, :10]]
        got = search(client, "new", w["q_new"])
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), ref.tolist(), strict=True)]) >= 0.99
        client.close()


def test_sigkill_during_forward_upgrade_resumes_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    w = world(3)
    slow = {"forward_batch": 16, "forward_pause_seconds": 0.05}
    with child_server(tmp_path, data, **slow) as (proc, stubs):
        client = Client(stubs.target)
        setup(client, w)
        client.start_migration("c", "new", "t", strategy="shared_index")
        client.upsert("c", IDS[:100], w["docs_new"][:100], space="new")
        client.forward_upgrade("c", "r")
        wait_for(lambda: client.get_migration("c").forward.done >= 64, timeout=60)
        info = client.get_migration("c")
        _kill(proc)
        client.close()
    assert info.forward.state == "running" and info.forward.done < N
    with child_server(tmp_path, data, forward_batch=64) as (proc, stubs):
        client = Client(stubs.target)
        info = client.wait_forward_upgrade("c", timeout=60)
        assert (info.forward.state, info.backfilled, info.projected) == ("done", 100, N - 100)
        assert info.forward.done == info.forward.total == N
        before = search(client, "new", w["q_new"])
        info = client.cutover("c", force=True)
        _kill(proc)  # right after the cutover was acknowledged
        client.close()
    with child_server(tmp_path, data) as (_, stubs):
        client = Client(stubs.target)
        info = client.get_migration("c")
        assert (info.phase, info.forced, info.projected) == ("cutover", True, N - 100)
        np.testing.assert_array_equal(search(client, "new", w["q_new"]), before)  # shared index == after cutover
        client.rollback_cutover("c")
        client.abort_migration("c")
        assert [c.name for c in client.list_collections()] == ["c"]
        client.close()
