"""Snapshot isolation of overwrites: a point being overwritten is never missing from a concurrent search.

A kill used to clear the old label in the bitmap the previous snapshot shared, so a search still reading that
snapshot lost the point until the new one was published (found by the migration cutover test)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from conftest import connect, make_data, start_server


def test_overwritten_points_stay_visible_to_concurrent_searches(tmp_path: Path) -> None:
    srv, port = start_server(tmp_path / "data", merge_min_fresh=1 << 20, merge_idle_seconds=3600)
    stubs = connect(port)
    try:
        stubs.register("s", 16)
        stubs.create("c", "s")
        xb = make_data(300, 16, seed=11)
        ids = [f"p{i}" for i in range(300)]
        stubs.upsert("c", "s", ids, xb)
        hot = np.arange(40)
        stop, misses, errors = threading.Event(), [], []

        def writer() -> None:
            try:
                while not stop.is_set():
                    stubs.upsert("c", "s", [ids[i] for i in hot], xb[hot])  # same vectors, new labels
            except Exception as e:
                errors.append(e)

        def reader() -> None:
            try:
                for _ in range(150):
                    _, got, _ = stubs.search("c", "s", xb[hot], 1)
                    misses.extend(int(i) for i in hot[got[:, 0] != np.array([ids[i] for i in hot], dtype=object)])
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads[1:]:
            t.join()
        stop.set()
        threads[0].join()
        assert not errors, errors[:3]
        assert not misses, f"{len(misses)} searches missed a point being overwritten (e.g. {misses[:5]})"
    finally:
        stubs.channel.close()
        srv.stop(None)
