"""What sharing one registry in etcd costs several front-ends on one Milvus engine (issue 14).

One run starts its own etcd (``/usr/bin/etcd``, loopback ports of its own) and Milvus Lite server
process, and three front-ends in this process over that engine: ``A`` and ``B`` share a registry
prefix (``server/shared.py``) and serve the collection ``shared_g``; ``solo`` has no registry
(``registry=""``) and serves ``solo_g``. Both collections hold the same gallery: the first ``--n``
old-model (MiniLM) doc vectors of the ``--data`` split in their home space ``old`` (Flat, exact, so
an answer is reproducible), and two procrustes transforms ``new -> old`` fitted on the new-model
(e5) doc vectors of the same items (t1 on the first half, t2 on the second; ``new`` is registered
after the collection: one vector field, so a search has no filter, :func:`fill`). Without the
split's ``old_doc.npy`` / ``new_doc.npy`` it falls back to seeded vectors and says so. Side by side,
the sides alternating in every timing loop so that the machine's drift hits both alike:

- ``activate_ms_p50_shared`` / ``_solo``: ``activate_route`` (t1, t2 in turn, ``force``) on A and on
  solo; the shared one adds a compare-and-swap of the route table in etcd;
- ``activation_visible_ms_p50`` / ``_p95``: from A's ``activate_route`` returning until B lists the
  route live (B's ``list_routes`` polled in a tight loop; B learns of it from its etcd watch); then one
  search on B in the ``new`` space, on a probe query whose top-10 differs between t1 and t2, must
  answer what A answered under that transform (``activation_wrong_answers``). A search through
  Milvus Lite takes far longer than a ``list_routes``, too long to poll with;
- ``upsert_ms_p50_shared`` / ``_solo`` and ``write_lock_overhead_ms`` (their difference): upserts of
  ``--batch`` existing points; each shared batch takes and releases the write lock in etcd (2 etcd
  transactions, each one a commit to etcd's WAL; ``etcd_txn_ms_p50`` times one such put alone);
- ``search_ms_p50_shared`` / ``_solo``: nq=1, k=10 searches in the home space (no etcd on the path);
- ``concurrent_activation_winners`` of ``concurrent_activation_attempts``: ``--rounds`` rounds of
  ``--concurrent`` activations at once (threads behind a barrier, half on A, half on B); the
  compare-and-swap refuses a front-end whose table is stale (FAILED_PRECONDITION "changed by another
  front-end"), and after each round both front-ends must list the transform etcd holds.

Every front-end runs in this process (as ``tests/test_shared_registry.py`` runs them), so B's watch
shares the interpreter with the polling client. Progress goes to stderr, the report to stdout; its
last line is one JSON object. The processes are killed and ``--workdir`` removed at the end, on an
error or SIGTERM too (``--keep-workdir`` keeps it).

    nice -n 19 .venv/bin/python bench/registry.py --data ../shared/data/debdesc/dev [--n 20000] [--reps 50]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _common import log, machine_basics
from _data import DEFAULT_DATA, normalize

from interlingua.client import AlreadyExists, Client, FailedPrecondition, NotFound, Unavailable
from interlingua.server import Server, create_server
from interlingua.server.config import ServerConfig
from interlingua.server.errors import Unavailable as EtcdDown
from interlingua.server.etcd import Etcd

K = 10
D_SYNTHETIC = 384
SHARED, SOLO = "shared_g", "solo_g"
LOST = "changed by another front-end"


@dataclass(frozen=True)
class Pairs:
    old: np.ndarray  #: gallery, shape (n, d): the old model's doc vectors
    new: np.ndarray  #: shape (n, d): the new model's vectors of the same items
    xq: np.ndarray  #: home-space queries, shape (nq, d)
    source: str
    real: bool


def load_pairs(folder: Path, n: int) -> Pairs:
    """The first n rows of ``old_doc.npy`` and ``new_doc.npy`` (queries: ``old_query.npy``, else the
    docs); seeded vectors (new = a rotation of old plus noise) when either file is missing."""
    files = [folder / f for f in ("old_doc.npy", "new_doc.npy")]
    if all(f.exists() for f in files):
        old, new = (np.load(f, mmap_mode="r") for f in files)
        if len(old) < n:
            log(f"{folder} holds {len(old)} items: n = {len(old)}")
        n = min(n, len(old))
        q = folder / "old_query.npy"
        xq = np.load(q, mmap_mode="r")[:1000] if q.exists() else old[:1000]
        what = "old_query" if q.exists() else "old_doc"
        src = f"{folder}: old_doc / new_doc rows 0..{n - 1}, queries {what}"
        return Pairs(normalize(old[:n]), normalize(new[:n]), normalize(xq), src, True)
    missing = ", ".join(f.name for f in files if not f.exists())
    log(f"{folder}: {missing} missing: seeded random vectors instead")
    rng = np.random.default_rng(0)
    old = normalize(rng.standard_normal((n, D_SYNTHETIC), dtype=np.float32))
    rot = np.linalg.qr(rng.standard_normal((D_SYNTHETIC, D_SYNTHETIC)))[0].astype(np.float32)
    new = normalize(old @ rot + 0.05 * rng.standard_normal(old.shape, dtype=np.float32))
    xq = normalize(old[:1000] + 0.05 * rng.standard_normal((min(n, 1000), D_SYNTHETIC), dtype=np.float32))
    return Pairs(old, new, xq, f"seeded random ({missing} missing in {folder})", False)


# -- processes -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child: SIGKILL when the bench dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def spawn(args: list[str], log_file: Path) -> subprocess.Popen[bytes]:
    with log_file.open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)


def wait_until(ok: Callable[[], bool], seconds: float, what: str, pause: float = 0.05) -> float:
    """Polls ``ok`` until it holds; returns the seconds it took, RuntimeError after ``seconds``."""
    t0 = time.monotonic()
    while not ok():
        if time.monotonic() - t0 > seconds:
            raise RuntimeError(f"not within {seconds:g} s: {what}")
        time.sleep(pause)
    return time.monotonic() - t0


def start_etcd(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    etcd = shutil.which("etcd")
    if etcd is None:
        raise SystemExit("needs the etcd binary (Debian: apt-get install etcd-server)")
    port, peer = free_port(), free_port()
    url, purl = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer}"
    args = [etcd, "--data-dir", str(folder / "etcd"), "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", purl, "--initial-advertise-peer-urls", purl,
            "--initial-cluster", f"default={purl}"]  # fmt: skip
    proc = spawn(args, folder / "etcd.log")
    client = Etcd([f"127.0.0.1:{port}"], timeout=1.0)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError("etcd exited: " + (folder / "etcd.log").read_text()[-2000:])
        try:
            client.range("/")
            return True
        except EtcdDown:
            return False

    wait_until(up, 30, "etcd answering", 0.1)
    return proc, port


def start_milvus(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Milvus Lite's own gRPC server in a process of its own: the one engine of every front-end."""
    (folder / "milvus").mkdir()
    port = free_port()
    args = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(folder / "milvus"), "--host", "127.0.0.1"]
    proc = spawn([*args, "--port", str(port)], folder / "milvus.log")

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError("milvus_lite exited: " + (folder / "milvus.log").read_text()[-2000:])
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(up, 60, "Milvus Lite listening", 0.1)
    return proc, f"http://127.0.0.1:{port}"


def front_end(folder: Path, milvus_uri: str, registry: str) -> tuple[Server, Client]:
    config = ServerConfig(data_dir=folder, port=0, metrics_port=None, backend="milvus", milvus_uri=milvus_uri,
                          registry=registry, milvus_timeout_seconds=120.0)  # fmt: skip
    server, port = create_server(config)
    server.start()
    if not server.wait_ready(120):
        raise RuntimeError(f"front-end {folder.name} did not start: {server.load_error}")
    client = Client(f"127.0.0.1:{port}", timeout=120)
    wait_until(lambda: client.health() == "SERVING", 60, f"{folder.name} SERVING", 0.1)
    return server, client


# -- the world ---------------------------------------------------------------------------------------


def fill(c: Client, name: str, data: Pairs) -> None:
    """Space ``old``, the collection (retried while the engine warms up), the gallery, then space ``new``:
    registered after the collection, it gets no vector field there, so a search needs no filter on the
    points' spaces (Milvus Lite evaluates ``array_contains`` row by row in Python: over ten times the
    search's cost here). Queries of ``new`` reach the collection through the routes alone."""
    d = data.old.shape[1]
    c.register_space("old", d, "cosine", description="bench: old model's docs")
    deadline = time.monotonic() + 60
    while True:
        try:
            c.create_collection(name, "old", "Flat", backend="milvus")
            break
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    c.upsert(name, ids_of(0, len(data.old)), data.old, space="old", batch_size=4096)
    with contextlib.suppress(AlreadyExists):  # B or A registered it already (the spaces are shared)
        c.register_space("new", d, "cosine", description="bench: new model's docs")


def fit(c: Client, data: Pairs) -> None:
    half = len(data.old) // 2
    for t, rows in (("t1", slice(0, half)), ("t2", slice(half, None))):
        c.fit_transform(t, "procrustes", source_space="new", target_space="old",
                        doc_pairs=(data.new[rows], data.old[rows]))  # fmt: skip
    for t in ("t1", "t2"):
        c.wait_transform(t)


def ids_of(lo: int, hi: int) -> list[str]:
    return [f"g{i}" for i in range(lo, hi)]


def settled(c: Client, name: str, n: int) -> bool:
    info = c.get_collection(name)
    return bool(info.num_points >= n and info.indexed_vectors >= n and info.fresh_vectors == 0)


def ready(c: Client, t: str) -> bool:
    try:
        return bool(c.get_transform(t).state == "ready")
    except NotFound:
        return False


def live(c: Client, collection: str) -> dict[str, str]:
    return {r.query_space: r.transform for r in c.list_routes(collection).active}


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def ms(xs: list[float]) -> list[float]:
    return [1e3 * x for x in xs]


def interleave(sides: dict[str, Callable[[int], Any]], reps: int, warm: int = 3) -> dict[str, list[float]]:
    """``reps`` timed calls of each side (given the rep's number), the order rotated each rep; ``warm``
    untimed rounds first."""
    names = list(sides)
    out: dict[str, list[float]] = {s: [] for s in names}
    for r in range(-warm, reps):
        k = r % len(names)
        for s in names[k:] + names[:k]:
            t0 = time.perf_counter()
            sides[s](r)
            if r >= 0:
                out[s].append(time.perf_counter() - t0)
    return out


# -- the measurements --------------------------------------------------------------------------------


def pick_probe(a: Client, b: Client, data: Pairs) -> tuple[np.ndarray | None, dict[str, tuple[str, ...]]]:
    """A new-space query whose top-10 differs between t1 and t2 (preferring a different top 1), with
    each transform's answer on A; (None, {}) without one. Leaves t2 live on A and B."""
    xq = data.new[: min(256, len(data.new))]
    got = {}
    for t in ("t1", "t2"):
        a.activate_route(SHARED, t, force=True)
        got[t] = a.search(SHARED, xq, K, space="new").ids
    wait_until(lambda: live(b, SHARED) == {"new": "t2"}, 30, "B applying t2")
    differs = [i for i in range(len(xq)) if tuple(got["t1"][i]) != tuple(got["t2"][i])]
    if not differs:
        return None, {}
    i = next((i for i in differs if got["t1"][i][0] != got["t2"][i][0]), differs[0])
    return xq[i : i + 1], {t: tuple(got[t][i]) for t in ("t1", "t2")}


def activations(
    a: Client, b: Client, solo: Client, data: Pairs, reps: int
) -> tuple[dict[str, list[float]], list[float], dict[str, Any]]:
    """activate_route on A and on solo, interleaved, and after each of A's how long until B lists it
    live (polling ``list_routes``); then one search on B must answer what A answered under it."""
    probe, expect = pick_probe(a, b, data)
    solo.activate_route(SOLO, "t2", force=True)
    if probe is None:
        log("activation: no probe query's answer differs between t1 and t2: B's answers are not checked")
    times: dict[str, list[float]] = {"shared": [], "solo": []}
    visible: list[float] = []
    polls: list[int] = []
    late = wrong = 0

    def shared(r: int) -> None:
        nonlocal late, wrong
        t = ("t1", "t2")[r % 2]  # t2 is live before the first
        t0 = time.perf_counter()
        a.activate_route(SHARED, t, force=True)
        t1, n = time.perf_counter(), 0
        while True:
            n += 1
            if live(b, SHARED) == {"new": t}:
                break
            if time.perf_counter() - t1 > 30:
                late += 1
                break
        t2 = time.perf_counter()
        if probe is not None and tuple(b.search(SHARED, probe, K, space="new").ids[0]) != expect[t]:
            wrong += 1
        if r >= 0:
            times["shared"].append(t1 - t0)
            visible.append(t2 - t1)
            polls.append(n)

    def alone(r: int) -> None:
        t0 = time.perf_counter()
        solo.activate_route(SOLO, ("t1", "t2")[r % 2], force=True)
        if r >= 0:
            times["solo"].append(time.perf_counter() - t0)

    interleave({"shared": shared, "solo": alone}, reps, warm=2)  # even: rep 0 activates t1 over t2 on both
    info = {"first_poll": sum(p == 1 for p in polls) / max(1, len(polls)), "late": late, "wrong": wrong,
            "checked": probe is not None}  # fmt: skip
    return times, visible, info


def one_round(a: Client, b: Client, n: int, r: int) -> list[str]:
    """``n`` activations at once behind a barrier, on A and B in turn, t1 and t2 mixed: their outcomes
    (``won``, ``lost``: refused as made on a stale table, ``other: ...``)."""
    go = threading.Barrier(n)
    outcomes: list[str] = []

    def activate(c: Client, t: str) -> None:
        go.wait()
        try:
            c.activate_route(SHARED, t, force=True)
            outcomes.append("won")
        except FailedPrecondition as e:
            outcomes.append("lost" if LOST in e.message else f"other: {e}")
        except Exception as e:
            outcomes.append(f"other: {e!r}")

    threads = [threading.Thread(target=activate, args=((a, b)[i % 2], ("t1", "t2")[(i // 2 + r) % 2]))
               for i in range(n)]  # fmt: skip
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    return outcomes


def concurrent_rounds(
    a: Client, b: Client, etcd: Etcd, key: str, rounds: int, n: int
) -> tuple[int, int, int, list[str], list[float]]:
    """``rounds`` rounds of :func:`one_round`: (won, attempts, rounds after which A, B and etcd agreed,
    other errors, seconds until they agreed)."""
    won = attempts = agreed = 0
    other: list[str] = []
    settle: list[float] = []

    def agree() -> bool:
        kv = etcd.get(key)
        held = json.loads(kv.value).get("new", {}).get("transform") if kv is not None else None
        return live(a, SHARED) == live(b, SHARED) == {"new": held}

    wait_until(agree, 30, "A, B and etcd agreeing before the rounds")
    for r in range(rounds):
        outcomes = one_round(a, b, n, r)
        won += outcomes.count("won")
        attempts += n
        other += [o for o in outcomes if o.startswith("other")]
        try:
            settle.append(wait_until(agree, 30, f"A, B and etcd agreeing after round {r}", 0.005))
            agreed += 1
        except RuntimeError as e:
            log(str(e))
        log(f"round {r}: {outcomes.count('won')} won, {outcomes.count('lost')} lost, now {live(a, SHARED)}")
    return won, attempts, agreed, other, settle


# -- main --------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="debdesc split folder (default: %(default)s)")
    ap.add_argument("--n", type=int, default=20_000, help="gallery rows (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=50, help="activations per side (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=256, help="points per timed upsert (default: %(default)s)")
    ap.add_argument("--searches", type=int, help="searches per side (default: 5 x --reps)")
    ap.add_argument("--upserts", type=int, help="upserts per side (default: --reps)")
    ap.add_argument("--rounds", type=int, default=10, help="rounds of concurrent activations (default: %(default)s)")
    ap.add_argument("--concurrent", type=int, default=4, help="activations at once, half per front-end")
    ap.add_argument("--workdir", type=Path, help="where etcd, Milvus Lite and the front-ends keep their data")
    ap.add_argument("--keep-workdir", action="store_true", help="keep it (removed by default, even on error)")
    args = ap.parse_args()
    info = machine_basics()
    data = load_pairs(args.data, args.n)
    n, d = data.old.shape
    log(f"data: {data.source}; {n} x {d}")
    folder = Path(tempfile.mkdtemp(prefix="registry-", dir=args.workdir))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `timeout` or kill: the finally block still runs
    procs: list[subprocess.Popen[bytes]] = []
    servers: list[Server] = []
    clients: list[Client] = []
    try:
        etcd_proc, etcd_port = start_etcd(folder)
        procs.append(etcd_proc)
        milvus_proc, milvus_uri = start_milvus(folder)
        procs.append(milvus_proc)
        registry = f"etcd://127.0.0.1:{etcd_port}/interlingua-bench"
        log(f"etcd at 127.0.0.1:{etcd_port}, Milvus Lite at {milvus_uri}, data under {folder}")

        def start(name: str, reg: str) -> Client:
            srv, c = front_end(folder / name, milvus_uri, reg)
            servers.append(srv)
            clients.append(c)
            return c

        a, b, solo = start("a", registry), start("b", registry), start("solo", "")
        t0 = time.perf_counter()
        fill(a, SHARED, data)
        fill(solo, SOLO, data)
        log(f"gallery of {n} in both collections in {time.perf_counter() - t0:.1f} s")
        fit(a, data)
        fit(solo, data)
        wait_until(lambda: ready(b, "t1") and ready(b, "t2"), 60, "t1 and t2 on B")
        wait_until(lambda: SHARED in [c.name for c in b.list_collections()], 60, "the collection on B")
        wait_until(lambda: settled(a, SHARED, n) and settled(solo, SOLO, n), 600, "both collections indexed", 0.2)

        log(f"searches: nq=1, k={K}, home space")
        xq = [data.xq[i : i + 1] for i in range(len(data.xq))]
        reps_s = args.searches or 5 * args.reps
        search = interleave({
            "shared": lambda r: a.search(SHARED, xq[r % len(xq)], K, space="old"),
            "solo": lambda r: solo.search(SOLO, xq[r % len(xq)], K, space="old"),
        }, reps_s, warm=20)  # fmt: skip

        log(f"activations: {args.reps} per side")
        activate, visible, vis = activations(a, b, solo, data, args.reps)

        log(f"upserts: {args.batch} points per call")
        etcd = Etcd([f"127.0.0.1:{etcd_port}"], timeout=5.0)
        nb = max(1, n // args.batch)

        def upsert(c: Client, name: str, r: int) -> None:
            lo = (r % nb) * args.batch
            hi = min(lo + args.batch, n)
            c.upsert(name, ids_of(lo, hi), data.old[lo:hi], space="old", batch_size=args.batch)

        upserts = interleave({
            "shared": lambda r: upsert(a, SHARED, r),
            "solo": lambda r: upsert(solo, SOLO, r),
            "etcd_txn": lambda r: etcd.txn([], [etcd.op_put("/bench-probe", str(r).encode())]),
        }, args.upserts or args.reps)  # fmt: skip

        log(f"concurrent activations: {args.rounds} rounds of {args.concurrent}")
        shared = servers[0].engine.shared
        if shared is None:
            raise RuntimeError("front-end A has no shared registry")
        key = shared.key("routes", SHARED)
        won, attempts, agreed, other, settle = concurrent_rounds(a, b, etcd, key, args.rounds, args.concurrent)
    finally:
        for c in clients:
            with contextlib.suppress(Exception):
                c.close()
        for s in servers:
            with contextlib.suppress(Exception):
                s.stop(None)
        for p in reversed(procs):  # Milvus Lite, then etcd
            p.kill()
            p.wait(30)
        if args.keep_workdir:
            log(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)

    timings = {"activate": activate, "upsert": upserts, "search": search}
    report(args, info, data, timings, visible, vis, (won, attempts, agreed, other, settle))
    return 0


def report(
    args: argparse.Namespace,
    info: dict[str, Any],
    data: Pairs,
    timings: dict[str, dict[str, list[float]]],
    visible: list[float],
    vis: dict[str, Any],
    rounds: tuple[int, int, int, list[str], list[float]],
) -> None:
    n, d = data.old.shape
    won, attempts, agreed, other, settle = rounds
    p50 = {f"{what}_{side}": pct(ms(t[side]), 50) for what, t in timings.items() for side in ("shared", "solo")}
    p95 = {f"{what}_{side}": pct(ms(t[side]), 95) for what, t in timings.items() for side in ("shared", "solo")}
    print(f"# registry: n={n} x {d} (Flat), batch {args.batch}, two front-ends sharing etcd vs one alone")
    print(f"# {info['date']}, {info['cpu']}, {info['cores']} cores; data: {data.source}\n")
    print("| figure | shared (A) | solo | shared / solo | shared - solo |")
    print("|---|---|---|---|---|")
    labels = {"activate": "activate_route", "upsert": f"upsert of {args.batch}", "search": f"search nq=1 k={K}"}
    for what, label in labels.items():
        for q, tab in (("p50", p50), ("p95", p95)):
            sh, so = tab[f"{what}_shared"], tab[f"{what}_solo"]
            count = len(timings[what]["solo"])
            print(f"| {label} {q} ms ({count}) | {sh:.3f} | {so:.3f} | {sh / so:.2f} | {sh - so:+.3f} |")
    vis_ms = ms(visible)
    etcd_ms = pct(ms(timings["upsert"]["etcd_txn"]), 50)
    checked = f"; B's search then answered otherwise: {vis['wrong']}" if vis["checked"] else " (answers not checked)"
    print(
        f"\nA's activation listed live on B ({len(vis_ms)} activations, B's list_routes polled):"
        f" p50 {pct(vis_ms, 50):.2f} ms, p95 {pct(vis_ms, 95):.2f} ms, max {max(vis_ms):.2f} ms;"
        f" at the first poll {100 * vis['first_poll']:.0f}%, not within 30 s: {vis['late']}{checked}"
    )
    print(f"One etcd put (JSON gateway, a new connection, a WAL commit): p50 {etcd_ms:.3f} ms; a write batch takes 2")
    print(
        f"Concurrent activations: {won} won of {attempts} ({args.rounds} rounds of {args.concurrent}, half on A,"
        f" half on B); A, B and etcd agreed after {agreed} of {args.rounds} rounds"
        f" (within p50 {pct(ms(settle), 50):.1f} ms, max {max(ms(settle), default=float('nan')):.1f} ms);"
        f" other errors: {len(other)}"
    )
    for o in other[:5]:
        print(f"  {o[:300]}")
    figures = {
        "activation_visible_ms_p50": pct(vis_ms, 50),
        "activation_visible_ms_p95": pct(vis_ms, 95),
        "activation_visible_ms_max": max(vis_ms),
        "activation_visible_first_poll": vis["first_poll"],
        "activation_not_visible": vis["late"],
        "activation_wrong_answers": vis["wrong"] if vis["checked"] else None,
        "activate_ms_p50_shared": p50["activate_shared"],
        "activate_ms_p50_solo": p50["activate_solo"],
        "upsert_ms_p50_shared": p50["upsert_shared"],
        "upsert_ms_p50_solo": p50["upsert_solo"],
        "write_lock_overhead_ms": p50["upsert_shared"] - p50["upsert_solo"],
        "etcd_txn_ms_p50": etcd_ms,
        "search_ms_p50_shared": p50["search_shared"],
        "search_ms_p50_solo": p50["search_solo"],
        "concurrent_activation_winners": won,
        "concurrent_activation_attempts": attempts,
        "concurrent_rounds_agreed": agreed,
        "concurrent_other_errors": len(other),
    }
    run = {"n": n, "d": d, "batch": args.batch, "reps": args.reps, "searches": len(timings["search"]["solo"]),
           "upserts": len(timings["upsert"]["solo"]), "rounds": args.rounds, "concurrent": args.concurrent,
           "data": data.source, "real_data": data.real, "machine": info}  # fmt: skip
    print(json.dumps({**run, **figures}))


if __name__ == "__main__":
    sys.exit(main())
