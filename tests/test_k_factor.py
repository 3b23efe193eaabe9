"""``SearchParams.k_factor``: a search sets how many candidates (k * k_factor) an index's refine
stage re-ranks, exactly as FAISS's ``IndexRefineSearchParameters`` on the same index; the
collection's default (4, or an ``auto`` collection's chosen point) otherwise. INVALID_ARGUMENT on
an index without a refine stage and out of range, nothing searched."""

from __future__ import annotations

import time

import faiss
import grpc
import numpy as np
import pytest
from conftest import Stubs, brute_force, make_data, recall_at

from interlingua.client import Client, InvalidArgument
from interlingua.server.index_spec import MAX_K_FACTOR

D = 32
SPEC = "IVF16,PQ8x4fs,RFlat"


def _filled(stubs: Stubs, server: object) -> tuple[np.ndarray, np.ndarray, object]:
    xb, xq = make_data(3000, D, seed=5), make_data(200, D, seed=6)
    stubs.register("s", D)
    stubs.create("r", "s", SPEC, train_min=1000)
    stubs.upsert("r", "s", [str(i) for i in range(len(xb))], xb)
    deadline = time.monotonic() + 60
    while stubs.info("r").indexed_vectors < len(xb):
        assert time.monotonic() < deadline, stubs.info("r")
        time.sleep(0.05)
    sealed = server.engine.collection("r").segments.snapshot.sealed  # type: ignore[attr-defined]
    return xb, xq, sealed


def test_k_factor_reaches_the_refine_stage(server: tuple[object, int], stubs: Stubs) -> None:
    xb, xq, sealed = _filled(stubs, server[0])
    _, Iref = brute_force(xb, xq, 10)
    qn = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    recalls = []
    for kf in (1, 4, 32):
        D_, ids, _ = stubs.search("r", "s", xq, 10, nprobe=16, k_factor=kf)
        I = np.vectorize(int)(ids)
        # the same index searched by FAISS with the same parameters: identical labels
        ivf = faiss.SearchParametersIVF(nprobe=16)
        p = faiss.IndexRefineSearchParameters(k_factor=float(kf), base_index_params=ivf)
        Df, If = sealed.search(qn.astype(np.float32), 10, params=p)  # type: ignore[attr-defined]
        np.testing.assert_array_equal(I, If)
        np.testing.assert_allclose(D_, Df, rtol=1e-5, atol=1e-5)
        recalls.append(recall_at(I, Iref))
    assert recalls[0] < recalls[1] <= recalls[2], recalls
    assert recalls[2] >= 0.98, recalls
    # unset: the collection's default, 4
    _, ids, _ = stubs.search("r", "s", xq, 10, nprobe=16)
    _, ids4, _ = stubs.search("r", "s", xq, 10, nprobe=16, k_factor=4)
    np.testing.assert_array_equal(ids, ids4)
    # the client and its stream carry it
    with Client(stubs.target) as c:
        got = c.search("r", xq, 10, space="s", nprobe=16, k_factor=32).ids
        with c.search_stream() as st:
            again = st.search("r", xq, 10, space="s", nprobe=16, k_factor=32).ids
        np.testing.assert_array_equal(got, again)
        _, ids32, _ = stubs.search("r", "s", xq, 10, nprobe=16, k_factor=32)
        np.testing.assert_array_equal(got, ids32.astype(str))


@pytest.mark.parametrize(
    ("spec", "kf", "needle"),
    [
        ("HNSW16", 4, "k_factor applies to indexes with a refine stage"),
        ("Flat", 2, "k_factor applies to indexes with a refine stage"),
        ("SQ8,RFlat", 0, "k_factor is 0; it must be between 1 and 256"),
        ("SQ8,RFlat", MAX_K_FACTOR + 1, f"k_factor is {MAX_K_FACTOR + 1}; it must be between 1 and 256"),
    ],
)
def test_k_factor_errors(stubs: Stubs, spec: str, kf: int, needle: str) -> None:
    stubs.register("s", D)
    stubs.create("c", "s", spec)
    x = make_data(50, D, seed=1)
    stubs.upsert("c", "s", [str(i) for i in range(50)], x)
    with pytest.raises(grpc.RpcError) as e:
        stubs.search("c", "s", x[:2], 5, k_factor=kf)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in str(e.value.details()), e.value.details()
    with Client(stubs.target) as c, pytest.raises(InvalidArgument, match="k_factor"):
        c.search("c", x[:2], 5, space="s", k_factor=kf)
