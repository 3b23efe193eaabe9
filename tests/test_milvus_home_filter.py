"""A milvus collection with several vector fields filters its searches to points with a home vector only
while some point lacks one (``MilvusCollection._home_filter``): Milvus Lite evaluates that filter row by row,
so a collection whose points all have a home vector searches without it, with the same answers as numpy.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import brute_force, make_data, start_server, wait_for

from interlingua.client import Client

HAVE_MILVUS = all(importlib.util.find_spec(m) is not None for m in ("pymilvus", "milvus_lite"))
pytestmark = pytest.mark.skipif(not HAVE_MILVUS, reason="needs the milvus extra: pip install 'interlingua[milvus]'")
D, N = 16, 400


def test_the_home_filter_follows_the_counts(tmp_path: Path) -> None:
    srv, port = start_server(tmp_path / "data", backend="milvus")
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as c:
            c.register_space("old", D)
            c.register_space("new", D)  # before the collection: a second vector field
            c.create_collection("g", "old", "Flat")
            xb = make_data(N, D, seed=1)
            ids = np.array([f"p{i}" for i in range(N)] + ["lonely"])
            c.upsert("g", list(ids[:N]), xb, space="old")
            col = srv.engine.collections["g"]
            assert col._home_filter() == ""  # every point has a home vector
            c.upsert("g", ["lonely"], make_data(1, D, seed=5), space="new")  # a point without one
            assert "array_contains" in col._home_filter()
            xq = make_data(8, D, seed=2)
            _, ref = brute_force(xb, xq, 10)
            np.testing.assert_array_equal(c.search("g", xq, 10, space="old").ids, ids[:N][ref])  # "lonely" left out
            x_lonely = make_data(1, D, seed=6)
            c.upsert("g", ["lonely"], x_lonely, space="old")
            assert col._home_filter() == ""
            _, ref = brute_force(np.vstack([xb, x_lonely]), xq, 10)
            np.testing.assert_array_equal(c.search("g", xq, 10, space="old").ids, ids[ref])
        srv.stop(None)
        srv, port = start_server(tmp_path / "data", backend="milvus")  # counts unknown after a start: filtered
        col = srv.engine.collections["g"]
        with Client(f"127.0.0.1:{port}", timeout=60) as c:
            np.testing.assert_array_equal(c.search("g", xq, 10, space="old").ids, ids[ref])
            wait_for(lambda: col._home_filter() == "", 30)  # the maintenance thread counted
            assert col.npoints == N + 1
            np.testing.assert_array_equal(c.search("g", xq, 10, space="old").ids, ids[ref])
            with col.lock:
                col.forget_counts()  # as after another front-end's write: counted again by the maintenance,
            assert "array_contains" in col._home_filter()  # filtered meanwhile,
            col._next_count = time.monotonic() + 3600  # at most every RECOUNT_SECONDS
            time.sleep(0.5)
            assert col.npoints is None
            col._next_count = 0.0
            wait_for(lambda: col._home_filter() == "", 30)
    finally:
        srv.stop(None)
