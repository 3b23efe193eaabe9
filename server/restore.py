"""Offline restore of a snapshot into a data dir, and the data-dir lock that keeps it offline.

A running engine (a server, or an embedded client: ``Client.embedded``) holds an exclusive
``flock`` on ``<data_dir>/interlingua.lock`` (:func:`lock_data_dir`), with its pid written in
the file: one process at a time opens a data dir, and a second opener (engine or restore) is
refused at once with FailedPrecondition naming the folder and that pid. :func:`restore` takes
the same lock, so it refuses while any server uses the folder. It checks the snapshot first (manifest,
sizes, SHA-256, then SQLite's ``quick_check`` and the sequence of a staged copy),
so a refused restore changes nothing. Then, in an order where a crash at any step
leaves a store that opens: the current store is folded into one file (WAL
checkpointed and truncated), the index checkpoints (``collections/``) move to
``pre-restore-<time>/``, the current store is hard-linked there, and the staged copy
replaces ``interlingua.db`` with one rename. The next start rebuilds every FAISS index
from the restored store. Covered by ``tests/test_snapshots.py``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .checkpoint import fsync_dir
from .errors import FailedPrecondition
from .snapshots import DB_FILE, Manifest, sha256_file, verify

__all__ = ["LOCK_FILE", "Restored", "lock_data_dir", "restore"]

LOCK_FILE = "interlingua.lock"


def lock_data_dir(data_dir: Path, *, exclusive: bool = True, purpose: str = "restore") -> IO[bytes]:
    """Holds ``data_dir``'s lock until the returned file is closed (or the process ends).

    Exclusive, without waiting: an engine (``purpose="open"``) or a restore (``"restore"``) fails at
    once with FailedPrecondition, naming the folder and the pid written in the lock file, while
    another holds it. (``exclusive=False``, a shared lock, remains for callers that only keep a
    restore out.) The holder's pid replaces the file's content."""
    f = (data_dir / LOCK_FILE).open("a+b")
    try:
        fcntl.flock(f.fileno(), (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        holder = _holder(data_dir)
        if purpose == "restore":
            raise FailedPrecondition(f"a server is running on {data_dir}{holder}; stop it before restoring") from None
        raise FailedPrecondition(
            f"data directory {data_dir} is in use by another process{holder}: one process at a time may open it"
            " (an interlingua server or Client.embedded); stop that one first"
        ) from None
    if exclusive:
        f.truncate(0)
        f.write(f"{os.getpid()}\n".encode())
        f.flush()
    return f


def _holder(data_dir: Path) -> str:
    """`` (pid N)`` from the lock file's content, or ``""`` when it names none."""
    try:
        text = (data_dir / LOCK_FILE).read_text(errors="replace").strip()
    except OSError:
        return ""
    return f" (pid {int(text)})" if text.isdigit() else ""


@dataclass(frozen=True)
class Restored:
    manifest: Manifest
    previous: Path | None  #: where the replaced store and checkpoints went (None: the data dir was empty)


def _check_copy(db: Path, m: Manifest, where: str) -> None:
    """FailedPrecondition unless the staged copy ``db`` is a sound SQLite store at ``m.sequence``."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            (ok,) = con.execute("PRAGMA quick_check").fetchone()
            (sequence,) = con.execute("SELECT value FROM meta WHERE key='sequence'").fetchone()
        finally:
            con.close()
    except sqlite3.Error as e:
        raise FailedPrecondition(f"snapshot {where}: {DB_FILE} is not a readable store: {e}") from None
    if ok != "ok":
        raise FailedPrecondition(f"snapshot {where}: {DB_FILE} fails SQLite's quick_check: {str(ok)[:200]}")
    if sequence != m.sequence:
        raise FailedPrecondition(f"snapshot {where}: {DB_FILE} is at sequence {sequence}, manifest says {m.sequence}")


def _fold_wal(db: Path) -> None:
    """Checkpoints the store's WAL into ``db`` and truncates it: ``db`` alone then holds every commit."""
    try:
        con = sqlite3.connect(db, isolation_level=None, timeout=1.0)
        try:
            (busy, _, _) = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            con.close()
    except sqlite3.Error as e:
        raise FailedPrecondition(f"cannot checkpoint the current store {db}: {e}") from None
    wal = Path(f"{db}-wal")
    if busy or (wal.exists() and wal.stat().st_size > 0):
        raise FailedPrecondition(f"cannot fold {wal} into the store: is another process using {db.parent}?")


def restore(snapshot: Path, data_dir: Path) -> Restored:
    """Replaces the store in ``data_dir`` (created if missing) with the snapshot in folder ``snapshot``.

    Refused (FailedPrecondition, nothing changed) when the snapshot is corrupt or a server
    holds the data dir. Index checkpoints are set aside, so the next start rebuilds them."""
    where = repr(snapshot.name)
    m = verify(snapshot, where)
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_data_dir(data_dir, exclusive=True)
    staging = data_dir / f".restore-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        staged = staging / DB_FILE
        shutil.copyfile(snapshot / DB_FILE, staged)
        if sha256_file(staged) != m.files[DB_FILE]["sha256"]:
            raise FailedPrecondition(f"snapshot {where}: the copy of {DB_FILE} differs from its SHA-256 (disk error?)")
        _check_copy(staged, m, where)
        with staged.open("rb") as f:
            os.fsync(f.fileno())
        db, previous = data_dir / DB_FILE, None
        if db.exists() or (data_dir / "collections").exists():
            if db.exists():
                _fold_wal(db)  # the last refusal: from here on the current state moves aside
            previous = data_dir / time.strftime("pre-restore-%Y%m%d-%H%M%S", time.gmtime())
            if previous.exists():
                previous = previous.with_name(f"{previous.name}-{uuid.uuid4().hex[:4]}")
            previous.mkdir()
            if (data_dir / "collections").exists():
                (data_dir / "collections").rename(previous / "collections")  # stale indexes never load
            if db.exists():
                try:
                    os.link(db, previous / DB_FILE)
                except OSError:  # a file system without hard links: a copy
                    shutil.copy2(db, previous / DB_FILE)
            fsync_dir(previous)
        for stale in (Path(f"{db}-wal"), Path(f"{db}-shm")):
            stale.unlink(missing_ok=True)
        os.replace(staged, db)  # one rename: the store is the old one or the snapshot's, never neither
        (data_dir / "collections").mkdir(exist_ok=True)
        fsync_dir(data_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        lock.close()
    return Restored(m, previous)
