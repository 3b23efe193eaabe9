"""The four systems of ``bench/peers.py``, behind one small interface.

Every system holds the same gallery xb (n, d) float32, L2-normalized, under inner product, in an HNSW
graph of the same ``M`` and ``efConstruction``; ``set_ef`` changes the search-time candidate list and
``search`` returns the row labels I of shape (nq, k) int64 of a query batch xq (nq, d).

* :class:`Faiss` -- ``faiss.IndexHNSWFlat`` in this process: the limit.
* :class:`Interlingua` -- ``interlingua serve`` in its own process, over gRPC through
  :class:`interlingua.client.Client` (unary ``Search``; ``stream_search`` uses one ``SearchStream``;
  ``echo`` is the server's own ``grpc.health.v1.Health/Check``, an empty round trip on the same channel).
* :class:`InterlinguaAdvised` -- Interlingua at its index advisor's operating point: ``RecommendIndex``
  on :class:`Interlingua`'s collection (same server), a second collection on the chosen spec.
* :class:`InterlinguaEmbedded` -- the same engine in this process (``Client.embedded``), no gRPC;
  ``faiss_same_index`` searches its own sealed graph (the same object) with FAISS alone (the per-call cost).
* :class:`Chroma` -- ``chroma run`` (its Rust server) in its own process, over HTTP through
  ``chromadb.HttpClient``.
* :class:`MilvusLite` -- ``pymilvus.MilvusClient`` on a ``.db`` path: milvus-lite's embedded server,
  in this process by design; searched at consistency level Strong, the level Interlingua's ``milvus``
  backend reads at (read-your-writes; Milvus Lite's default, Bounded, answered ~5 ms sooner per
  search on 20k x 384, measured 2026-11-30), so ``interlingua_milvus`` is compared at equal guarantees.

Peers come from the ``bench`` extra (``pip install -e '.[bench]'``), never from the core dependencies.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from _common import labels_of

from interlingua.client import Client
from interlingua.server.segment_merge import REGRAPH_MIN

__all__ = ["Chroma", "Faiss", "Interlingua", "InterlinguaAdvised", "InterlinguaEmbedded", "MilvusLite", "System"]

NAME = "bench"  #: collection name on every server (Chroma wants 3+ characters)
ADVISED = "bench_advised"  #: Interlingua's collection on the index advisor's choice
NPROBE_SWEEP = (4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
K_FACTOR_SWEEP = (1, 2, 4, 8, 16, 32)
SPACE = "minilm-l6@1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port} after {timeout:g} s")


class System:
    """One system under test. ``ingest_s``: until the last write is acknowledged; ``ready_s``: until
    every vector is in the HNSW graph (a query then runs at full index speed)."""

    name = "?"
    ingest_s = float("nan")
    ready_s = float("nan")

    def build(self, xb: np.ndarray, m: int, efc: int, batch: int) -> None:
        raise NotImplementedError

    def set_ef(self, ef: int) -> None:
        raise NotImplementedError

    def points(self, ef_sweep: tuple[int, ...]) -> list[dict[str, int]]:
        """The search settings swept, cheapest first: efSearch for an HNSW graph."""
        return [{"ef_search": ef} for ef in ef_sweep]

    def set_point(self, point: dict[str, int]) -> None:
        """Searches from now on with ``point``, one of :meth:`points`."""
        self.set_ef(point["ef_search"])

    def search(self, xq: np.ndarray, k: int) -> np.ndarray:
        raise NotImplementedError

    def timed(self, xq: np.ndarray, k: int) -> object:
        """The search as the side-by-side timing calls it: the client call alone, its answer as the
        client gives it (ids, hits), without :meth:`search`'s conversion to row labels for recall,
        which FAISS's own answer does not need either."""
        return self.search(xq, k)

    def close(self) -> None:
        pass


class Faiss(System):
    name = "faiss"

    def __init__(self, omp_threads: int) -> None:
        faiss.omp_set_num_threads(omp_threads)
        self.omp_threads = omp_threads
        self.params: Any = None

    def build(self, xb: np.ndarray, m: int, efc: int, batch: int) -> None:
        t0 = time.perf_counter()
        self.index = faiss.IndexHNSWFlat(xb.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = efc
        self.index.add(xb)
        self.ingest_s = self.ready_s = time.perf_counter() - t0

    def set_ef(self, ef: int) -> None:
        self.params = faiss.SearchParametersHNSW(efSearch=ef)  # type: ignore[attr-defined]

    def search(self, xq: np.ndarray, k: int) -> np.ndarray:
        _, I = self.index.search(xq, k, params=self.params)
        return I  # type: ignore[no-any-return]


def build_collection(
    c: Client, xb: np.ndarray, m: int, efc: int, batch: int, *, name: str = NAME, spec: str = ""
) -> tuple[float, float, bool]:
    """Fills collection ``name`` (``spec``; default HNSW ``m`` with ``efc``) through ``c``; returns
    (ingest s, index complete s, last batch searchable)."""
    if not spec:
        c.register_space(SPACE, xb.shape[1], "cosine", description="bench: debdesc old_doc (MiniLM)")
        c.create_collection(name, SPACE, f"HNSW{m}", ef_construction=efc)
    else:
        c.create_collection(name, SPACE, spec)
    ids = [str(i) for i in range(len(xb))]
    t0 = time.perf_counter()
    c.upsert(name, ids, xb, space=SPACE, batch_size=batch)
    ingest_s = time.perf_counter() - t0
    # each acknowledged batch is searchable: the last one, before any merge could move it
    last = slice(len(xb) - min(batch, 64), len(xb))
    got = labels_of(c.search(name, xb[last], 10, space=SPACE).ids)
    want = np.arange(len(xb))[last]
    searchable = bool(np.all((got == want[:, None]).any(axis=1)))
    while True:
        info = c.get_collection(name)
        if info.state == "ready" and info.fresh_vectors == 0 and info.indexed_vectors == len(xb):
            break
        time.sleep(0.2)
    # a graph grown by merges is rebuilt in one add once the load is over (segment_merge.wants_regraph)
    while info.index_spec.startswith("HNSW") and len(xb) >= REGRAPH_MIN and info.compactions < 1:
        time.sleep(0.2)
        info = c.get_collection(name)
    ready_s = time.perf_counter() - t0
    while info.checkpoint_sequence < info.last_sequence:  # a checkpoint writing beside the sweep would skew it
        time.sleep(0.2)
        info = c.get_collection(name)
    return ingest_s, ready_s, searchable


def serve(data_dir: Path, omp_threads: int, *extra: str) -> tuple[subprocess.Popen[bytes], Client]:
    """``interlingua serve`` on ``data_dir`` and a free port in its own process (no metrics, warnings
    only, ``extra`` flags added), and a client once it serves."""
    port = free_port()
    cmd = [
        str(Path(sys.executable).with_name("interlingua")),
        "serve",
        *extra,
        "--data-dir",
        str(data_dir),
        "--port",
        str(port),
        "--no-metrics",
        "--omp-threads",
        str(omp_threads),
        "--log-level",
        "WARNING",
    ]
    proc = subprocess.Popen(cmd)
    client = Client(f"127.0.0.1:{port}", timeout=600)
    client.wait_ready(120)
    return proc, client


class Interlingua(System):
    name = "interlingua"

    def __init__(self, folder: Path, omp_threads: int) -> None:
        self.proc, self.client = serve(folder / "interlingua", omp_threads)
        self.ef: int | None = None
        self.stream: Any = None

    def build(self, xb: np.ndarray, m: int, efc: int, batch: int) -> None:
        self.ingest_s, self.ready_s, self.searchable_after_ack = build_collection(self.client, xb, m, efc, batch)

    def echo(self, _xq: np.ndarray | None = None) -> str:
        """An empty round trip: the server's health check, on the same channel."""
        return self.client.health()

    def set_ef(self, ef: int) -> None:
        self.ef = ef

    def search(self, xq: np.ndarray, k: int) -> np.ndarray:
        return labels_of(self.timed(xq, k).ids)

    def timed(self, xq: np.ndarray, k: int) -> Any:
        return self.client.search(NAME, xq, k, space=SPACE, ef_search=self.ef)

    def stream_search(self, xq: np.ndarray, k: int) -> Any:
        """One search over the long-lived SearchStream (timed as :meth:`timed`: the client's answer)."""
        if self.stream is None:
            self.stream = self.client.search_stream()
        return self.stream.search(NAME, xq, k, space=SPACE, ef_search=self.ef)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        self.client.close()
        self.proc.terminate()
        self.proc.wait(60)


class InterlinguaAdvised(System):
    """Interlingua at the index advisor's operating point, on :class:`Interlingua`'s server:
    ``RecommendIndex`` on its HNSW collection (the default candidates, a 100k sample, exact ground
    truth) with real queries kept apart from the evaluation ones, then a second collection created
    on the chosen spec and filled with the same gallery. Its swept settings start at the advisor's
    point (on the sample) and go up: nprobe (and the refine stage's k_factor, then twice it) for an
    IVF, efSearch for an HNSW graph. ``advise_s``: the advisor's run; ``ingest_s`` / ``ready_s``:
    the second collection's."""

    name = "interlingua_advised"

    def __init__(self, base: Interlingua, xq_tune: np.ndarray, target: float) -> None:
        self.client, self.xq_tune, self.target = base.client, xq_tune, target
        self.params: dict[str, int] = {}
        self.spec = ""
        self.chosen: Any = None
        self.advise_s = float("nan")

    def build(self, xb: np.ndarray, m: int, efc: int, batch: int) -> None:
        t0 = time.perf_counter()
        rec = self.client.recommend_index(NAME, self.target, 10, queries=self.xq_tune, timeout=7200)
        self.advise_s, self.chosen, self.spec = time.perf_counter() - t0, rec.chosen, rec.chosen.index_spec
        self.recommendation = rec
        self.ingest_s, self.ready_s, self.searchable_after_ack = build_collection(
            self.client, xb, m, efc, batch, name=ADVISED, spec=self.spec
        )

    def points(self, ef_sweep: tuple[int, ...]) -> list[dict[str, int]]:
        """The chosen spec's knob (efSearch or nprobe) swept up from its smallest value, for each
        refine k_factor in :data:`K_FACTOR_SWEEP` (``group``: :func:`peers.sweep` moves to the next
        k_factor once one reaches the target). Not from the advisor's own parameters: they were
        measured on a sample (at most 100k points), and at 1M an IVF list holds 10x the points and a
        refine stage has more near-ties to re-rank, so neither nprobe nor k_factor carries over."""
        p = self.chosen
        if not (p.ef_search or p.nprobe):
            return [{}]
        knob, values = ("ef_search", ef_sweep) if p.ef_search else ("nprobe", NPROBE_SWEEP)
        kfs = K_FACTOR_SWEEP if p.k_factor else (0,)
        return [{knob: v, **({"k_factor": kf} if kf else {})} for kf in kfs for v in values]

    group = "k_factor"  #: see :meth:`points`

    def set_point(self, point: dict[str, int]) -> None:
        self.params = dict(point)

    def search(self, xq: np.ndarray, k: int) -> np.ndarray:
        return labels_of(self.timed(xq, k).ids)

    def timed(self, xq: np.ndarray, k: int) -> Any:
        return self.client.search(ADVISED, xq, k, space=SPACE, **self.params)  # type: ignore[arg-type]


class InterlinguaEmbedded(System):
    name = "interlingua_embedded"

    def __init__(self, folder: Path, omp_threads: int) -> None:
        self.client = Client.embedded(folder / "embedded", omp_threads=omp_threads)
        self.ef: int | None = None
        self.same: Any = None
        self.same_params: Any = None

    def build(self, xb: np.ndarray, m: int, efc: int, batch: int) -> None:
        self.ingest_s, self.ready_s, self.searchable_after_ack = build_collection(self.client, xb, m, efc, batch)

    def set_ef(self, ef: int) -> None:
        self.ef = ef
        # FAISS alone on this collection's own sealed graph (the same object in memory, not a clone:
        # at 1M a clone is a second 1.5 GB copy, timed 0.05 ms p50 slower than the original), at the
        # same efSearch, given per call as plain FAISS takes it
        self.same = self.client._embedded.engine.collections[NAME].segments.snapshot.sealed
        self.same_params = faiss.SearchParametersHNSW(efSearch=ef)

    def search(self, xq: np.ndarray, k: int) -> np.ndarray:
        return labels_of(self.timed(xq, k).ids)

    def timed(self, xq: np.ndarray, k: int) -> Any:
        return self.client.search(NAME, xq, k, space=SPACE, ef_search=self.ef)

    def faiss_same_index(self, xq: np.ndarray, k: int) -> np.ndarray:
        _, I = self.same.search(xq, k, params=self.same_params)
        return I  # type: ignore[no-any-return]

    def close(self) -> None:
        self.client.close()


class Chroma(System):
    name = "chroma"

    def __init__(self, folder: Path) -> None:
        exe = shutil.which("chroma", path=str(Path(sys.executable).parent)) or "chroma"
        self.port = free_port()
        self.cmd = [exe, "run", "--path", str(folder / "chroma"), "--port", str(self.port)]
        self.log = folder / "chroma.log"
        self.ef = 64
        self._start()

    def _start(self) -> None:
        import chromadb

        env = dict(os.environ, ANONYMIZED_TELEMETRY="False")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_port(self.port, self.proc)
        settings = chromadb.Settings(anonymized_telemetry=False)
        self.client = chromadb.HttpClient(host="127.0.0.1", port=self.port, settings=settings)
        self.client.heartbeat()

    def build(self, xb: np.ndarray, m: int, efc: int, batch: int) -> None:
        hnsw = {"space": "ip", "max_neighbors": m, "ef_construction": efc, "ef_search": self.ef}
        self.probe = xb[:1].copy()
        self.col = self.client.create_collection(NAME, configuration={"hnsw": hnsw}, embedding_function=None)
        step = min(batch, int(self.client.get_max_batch_size()))
        t0 = time.perf_counter()
        for i in range(0, len(xb), step):
            self.col.add(ids=[str(j) for j in range(i, min(i + step, len(xb)))], embeddings=xb[i : i + step])
        self.ingest_s = time.perf_counter() - t0
        while self.col.count() < len(xb):
            time.sleep(0.2)
        self.col.query(query_embeddings=xb[:1], n_results=10, include=[])
        self.ready_s = time.perf_counter() - t0

    def set_ef(self, ef: int) -> None:
        """Chroma 1.5 stores a modified ef_search at once but its server keeps searching the loaded
        graph with the old one (checked here: recall moves only after a restart), so restart it."""
        if ef == self.ef:
            return
        self.col.modify(configuration={"hnsw": {"ef_search": ef}})
        self.close()
        self._start()
        self.col = self.client.get_collection(NAME, embedding_function=None)
        self.col.query(query_embeddings=self.probe, n_results=10, include=[])  # loads the graph
        self.ef = ef

    def search(self, xq: np.ndarray, k: int) -> np.ndarray:
        r = self.timed(xq, k)
        return np.array([[int(s) for s in row] + [-1] * (k - len(row)) for row in r["ids"]], dtype=np.int64)

    def timed(self, xq: np.ndarray, k: int) -> Any:
        return self.col.query(query_embeddings=xq, n_results=k, include=[])

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


class MilvusLite(System):
    name = "milvus_lite"

    def __init__(self, folder: Path) -> None:
        from pymilvus import MilvusClient

        self.db = folder / "milvus.db"
        self.client = MilvusClient(str(self.db))
        self.params: dict[str, Any] = {"params": {"ef": 64}}

    def build(self, xb: np.ndarray, m: int, efc: int, batch: int) -> None:
        from _common import log
        from _peers_milvus import lite_indexed
        from pymilvus import DataType

        c = self.client
        schema = c.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=xb.shape[1])
        index = c.prepare_index_params()
        # the build parameters flat (as pymilvus 3.0.2 sends them) and under "params" (the only form
        # Milvus Lite 3.2.2 reads: given flat only, it built its default index, and every efSearch
        # gave Recall@10 1.0; server/backends/milvus_schema.py sends both the same way)
        hnsw = {"M": m, "efConstruction": efc}
        index.add_index(field_name="vec", index_type="HNSW", metric_type="IP", params={**hnsw, "params": dict(hnsw)})
        c.create_collection(NAME, schema=schema, index_params=index, consistency_level="Strong")  # as the service's
        t0 = time.perf_counter()
        for i in range(0, len(xb), batch):
            c.insert(NAME, [{"id": j, "vec": xb[j]} for j in range(i, min(i + batch, len(xb)))])
        self.ingest_s = time.perf_counter() - t0
        c.flush(NAME)
        c.load_collection(NAME)  # loaded already (created with its index): Milvus Lite indexes loaded ones only
        # Milvus Lite's describe_index reports every row indexed at once, and searches a new segment by
        # brute force until its background thread has built that segment's index: wait for the files
        segments = lite_indexed(self.db, NAME, "vec", len(xb))
        self.search(xb[:1], 10)
        self.ready_s = time.perf_counter() - t0
        log(f"{self.name}: {segments} segments, every one indexed")

    def set_ef(self, ef: int) -> None:
        self.params = {"params": {"ef": ef}}

    def search(self, xq: np.ndarray, k: int) -> np.ndarray:
        hits = self.timed(xq, k)
        return np.array([[h["id"] for h in row] + [-1] * (k - len(row)) for row in hits], dtype=np.int64)

    def timed(self, xq: np.ndarray, k: int) -> Any:
        return self.client.search(
            NAME, data=xq, limit=k, search_params=self.params, output_fields=["id"], consistency_level="Strong"
        )

    def close(self) -> None:
        self.client.close()
