"""Snapshots: a consistent copy of the whole store, taken while the service keeps serving.

:meth:`Snapshots.create` copies ``interlingua.db`` with SQLite's online backup API in
one step: one read transaction, so the copy holds exactly the writes committed up to
one sequence number (every write acknowledged before the call, none half-done), and a
WAL reader never blocks the writer. The copy lands in ``snapshots/.tmp-*`` with a
``manifest.json`` (format version, sequence, counts per collection, size and SHA-256
of every file); the folder is then renamed into place, so a snapshot is complete or
absent. FAISS indexes are not copied: a restored server rebuilds them from the store
(``restore.py``). :func:`verify` checks a snapshot folder against its manifest and
names the first file that does not match. Covered by ``tests/test_snapshots.py``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from .checkpoint import fsync_dir
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, shown

__all__ = ["DB_FILE", "FORMAT_VERSION", "MANIFEST", "Manifest", "Snapshots", "check_name", "sha256_file", "verify"]

FORMAT = "interlingua-snapshot"
FORMAT_VERSION = 1
DB_FILE = "interlingua.db"
MANIFEST = "manifest.json"
CHUNK_BYTES = 1 << 20  #: bytes per DownloadSnapshot message
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")  #: matched whole: ``$`` passed a final newline


def check_name(name: str) -> str:
    """``name`` if it is a valid snapshot name (a folder name that cannot escape the snapshots folder)."""
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"snapshot name {shown(name)} is invalid: use 1 to 128 characters from [A-Za-z0-9._-],"
            " not starting with '.'"
        )
    return name


def default_name(now: float) -> str:
    """``snap-YYYYmmdd-HHMMSS-mmm`` (UTC) of the Unix time ``now``."""
    return time.strftime("snap-%Y%m%d-%H%M%S", time.gmtime(now)) + f"-{int(now * 1000) % 1000:03d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """What a snapshot holds; ``manifest.json`` is this, as JSON."""

    name: str
    created_at: float
    sequence: int  #: the store's sequence number in the copy: every write at or below it, none above
    collections: dict[str, dict[str, Any]]  #: name -> {home_space, index_spec, points, vectors: {space: n}}
    spaces: list[str]
    transforms: list[str]
    routes: int  #: live routes (query space -> collection through a transform)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  #: file -> {bytes, sha256}
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def bytes(self) -> int:
        return sum(int(f["bytes"]) for f in self.files.values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def parse(cls, text: str, where: str) -> Manifest:
        """The manifest in ``text``; FailedPrecondition naming ``where`` when it is not one."""
        try:
            raw = json.loads(text)
            m = cls(**raw)
            ok = (
                m.format == FORMAT
                and isinstance(m.sequence, int)
                and isinstance(m.files, dict)
                and DB_FILE in m.files
                and all(isinstance(f.get("sha256"), str) and isinstance(f.get("bytes"), int) for f in m.files.values())
            )
        except (ValueError, TypeError, AttributeError) as e:
            raise FailedPrecondition(f"snapshot {where}: {MANIFEST} is not a snapshot manifest: {e}") from None
        if not ok:
            raise FailedPrecondition(f"snapshot {where}: {MANIFEST} is not a snapshot manifest")
        if m.format_version != FORMAT_VERSION:
            raise FailedPrecondition(
                f"snapshot {where}: {MANIFEST} is format version {m.format_version}; this one reads {FORMAT_VERSION}"
            )
        if any(Path(name).name != name or name == MANIFEST for name in m.files):
            raise FailedPrecondition(f"snapshot {where}: {MANIFEST} lists a file outside its folder")
        return m


def read_manifest(folder: Path, where: str) -> Manifest:
    try:
        text = (folder / MANIFEST).read_text("utf-8")
    except FileNotFoundError:
        raise FailedPrecondition(f"snapshot {where} is corrupt: {MANIFEST} is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FailedPrecondition(f"snapshot {where}: cannot read {MANIFEST}: {e}") from None
    return Manifest.parse(text, where)


def verify(folder: Path, where: str) -> Manifest:
    """The manifest of the snapshot in ``folder`` once every file it lists has its size and SHA-256.

    FailedPrecondition names the first file that is missing or differs (``where`` names the snapshot)."""
    m = read_manifest(folder, where)
    for name, meta in sorted(m.files.items()):
        path = folder / name
        if not path.is_file():
            raise FailedPrecondition(f"snapshot {where} is corrupt: {name} is missing")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise FailedPrecondition(
                f"snapshot {where} is corrupt: {name} has {size} bytes, manifest says {meta['bytes']}"
            )
        if sha256_file(path) != meta["sha256"]:
            raise FailedPrecondition(f"snapshot {where} is corrupt: {name} does not match its SHA-256 in {MANIFEST}")
    return m


def describe(db: sqlite3.Connection, name: str, now: float) -> Manifest:
    """The manifest (without files) of the store open in ``db``: its sequence and counts."""
    (sequence,) = db.execute("SELECT value FROM meta WHERE key='sequence'").fetchone()
    collections: dict[str, dict[str, Any]] = {}
    for cid, cname, home, spec in db.execute("SELECT cid, name, home_space, index_spec FROM collections"):
        (points,) = db.execute("SELECT count(*) FROM points WHERE cid=?", (cid,)).fetchone()
        vectors = dict(db.execute("SELECT space, count(*) FROM vectors WHERE cid=? GROUP BY space", (cid,)))
        collections[cname] = {"home_space": home, "index_spec": spec, "points": points, "vectors": vectors}
    spaces = [r[0] for r in db.execute("SELECT name FROM spaces ORDER BY name")]
    transforms = [r[0] for r in db.execute("SELECT name FROM transforms ORDER BY name")]
    (routes,) = db.execute("SELECT count(*) FROM routes WHERE deactivated_at=0 AND transform != ''").fetchone()
    return Manifest(name, now, int(sequence), collections, spaces, transforms, int(routes))


def copy_store(db_path: Path, dest: Path) -> None:
    """Copies the SQLite store at ``db_path`` into a new self-contained file ``dest`` (no WAL), fsynced."""
    src = sqlite3.connect(f"file:{db_path}?mode=rw", uri=True, timeout=30.0)
    try:
        dst = sqlite3.connect(dest)
        try:
            src.backup(dst)  # pages=-1: all pages in one step, one read transaction: one sequence number
            dst.execute("PRAGMA journal_mode=DELETE")  # one file, no -wal beside it
        finally:
            dst.close()
    finally:
        src.close()
    with dest.open("rb") as f:
        os.fsync(f.fileno())


class Snapshots:
    """The snapshots of one data dir: ``<data_dir>/snapshots/<name>/``."""

    def __init__(self, data_dir: Path, db_path: Path) -> None:
        self.root = data_dir / "snapshots"
        self.db_path = db_path
        self._lock = threading.Lock()  #: one create or delete at a time (a copy is I/O-bound anyway)
        for pattern in (".tmp-*", ".del-*"):  # left by a crash during a create or a delete
            for stale in self.root.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)

    def folder(self, name: str) -> Path:
        """The folder of an existing snapshot; NotFound when there is none."""
        path = self.root / check_name(name)
        if not (path / MANIFEST).is_file():
            raise NotFound(f"snapshot {name!r} does not exist")
        return path

    def create(self, name: str = "") -> Manifest:
        """Copies the store into a new snapshot ``name`` (default: :func:`default_name`)."""
        now = time.time()
        name = check_name(name or default_name(now))
        with self._lock:
            if (self.root / name).exists():
                raise AlreadyExists(f"snapshot {name!r} already exists")
            self.root.mkdir(parents=True, exist_ok=True)
            staging = self.root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
            try:
                copy_store(self.db_path, staging / DB_FILE)
                con = sqlite3.connect(f"file:{staging / DB_FILE}?mode=ro", uri=True)
                try:
                    m = describe(con, name, now)
                finally:
                    con.close()
                db = staging / DB_FILE
                files = {DB_FILE: {"bytes": db.stat().st_size, "sha256": sha256_file(db)}}
                m = Manifest(**{**asdict(m), "files": files})
                with (staging / MANIFEST).open("w", encoding="utf-8") as f:
                    f.write(m.to_json())
                    f.flush()
                    os.fsync(f.fileno())
                fsync_dir(staging)
                staging.rename(self.root / name)
                fsync_dir(self.root)
            except BaseException as e:
                shutil.rmtree(staging, ignore_errors=True)
                if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                    raise ResourceExhausted(f"no space left for snapshot {name!r} under {self.root}") from None
                if isinstance(e, OSError | sqlite3.Error):
                    raise FailedPrecondition(f"cannot write snapshot {name!r}: {e}") from None
                raise
        return m

    def list(self) -> list[Manifest]:
        """Every snapshot with a readable manifest, by name (staging folders start with '.')."""
        out = []
        for path in sorted(self.root.glob("*/" + MANIFEST)) if self.root.is_dir() else []:
            if _NAME.fullmatch(path.parent.name):
                with contextlib.suppress(FailedPrecondition):
                    out.append(read_manifest(path.parent, repr(path.parent.name)))
        return out

    def delete(self, name: str) -> None:
        with self._lock:
            folder = self.folder(name)
            trash = self.root / f".del-{name}-{uuid.uuid4().hex[:8]}"
            folder.rename(trash)  # gone from listings at once, even if the removal is slow
            shutil.rmtree(trash, ignore_errors=True)

    def verify(self, name: str) -> Manifest:
        return verify(self.folder(name), repr(name))

    def chunks(self, name: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[str, int, bytes, int]]:
        """(file, offset, data, file_bytes) of the snapshot's files: the manifest first, then its files.

        Every file is opened before the first chunk (a concurrent delete does not cut the stream);
        FailedPrecondition after a file's last chunk when its bytes do not match the manifest."""
        folder = self.folder(name)
        m = read_manifest(folder, repr(name))
        handles: list[tuple[str, IO[bytes], dict[str, Any] | None]] = []
        try:
            for file, meta in [(MANIFEST, None), *sorted(m.files.items())]:
                try:
                    handles.append((file, (folder / file).open("rb"), meta))
                except FileNotFoundError:
                    raise FailedPrecondition(f"snapshot {name!r} is corrupt: {file} is missing") from None
            for file, f, meta in handles:
                size, h, offset = os.fstat(f.fileno()).st_size, hashlib.sha256(), 0
                while True:
                    data = f.read(chunk_bytes)
                    if data or offset == 0:
                        yield file, offset, data, size
                    if not data:
                        break
                    h.update(data)
                    offset += len(data)
                if meta is not None and (offset != meta["bytes"] or h.hexdigest() != meta["sha256"]):
                    raise FailedPrecondition(f"snapshot {name!r} is corrupt: {file} does not match {MANIFEST}")
        finally:
            for _, f, _ in handles:
                f.close()
