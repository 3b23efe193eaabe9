"""``CollectionSpec`` directly: ``checked`` normalizes the index spec and resolves the training
threshold (or raises the service's messages), and the store writes a spec and reads the same one back."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from interlingua.server.collection_spec import CollectionSpec
from interlingua.server.config import Limits
from interlingua.server.errors import InvalidArgument
from interlingua.server.store import SpaceRow, Store

HOME = SpaceRow("s", 32, "l2", "", 0.0)


def test_checked_normalizes_and_resolves() -> None:
    assert CollectionSpec("c", "s", "").checked(HOME, Limits()) == CollectionSpec("c", "s", "Flat")
    spec = CollectionSpec("c", "s", " IVF4,Flat ", prefix_dims=8).checked(HOME, Limits())
    assert (spec.index_spec, spec.train_min_points, spec.index_dims(HOME)) == ("IVF4,Flat", 256, 8)
    assert spec.parse_index(HOME).d == 8


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (CollectionSpec("c", "s", prefix_dims=32), "prefix_dims is 32; it must be between 1 and dim-1 = 31"),
        (CollectionSpec("c", "s", "IVF4,PQ4", train_min_points=4), "needs at least 256 training points"),
        (CollectionSpec("c", "s", "IVF64,Flat"), "64 IVF lists exceed the cap of 16"),
    ],
)
def test_checked_raises(spec: CollectionSpec, needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        spec.checked(HOME, Limits(max_nlist=16))


def test_store_round_trip(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    try:
        store.add_space(SpaceRow("s", 32, "l2", "", time.time()))
        spec = CollectionSpec("c", "s", "HNSW16", 0, 8, "", 64)
        row = store.add_collection(spec)
        assert row.spec == spec and store.collections() == [row] and store.collection("c") == row
    finally:
        store.close()
