"""Snapshots on the client side: :class:`SnapshotInfo`, and writing a downloaded snapshot to a folder.

:func:`write_snapshot` writes the ``DownloadSnapshot`` chunks into a sibling
``<to>.partial-*`` folder, checks every file against the size and SHA-256 the
manifest gives, and only then renames the folder to ``to``: a backup folder is
complete and checked, or absent. Covered by ``tests/test_snapshots.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interlingua.v1 import snapshots_pb2

from ._exceptions import FailedPrecondition

__all__ = ["SnapshotInfo", "write_snapshot"]

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot on the server: the store's state at ``sequence``, ``points`` per collection."""

    name: str
    created_at: float  #: server time, seconds since the Unix epoch
    sequence: int  #: every write at or below this sequence number is in the snapshot, none above
    points: dict[str, int]  #: collection -> points
    spaces: int
    transforms: int
    bytes: int  #: size of its files (manifest excluded)
    format_version: int
    manifest: dict[str, Any]  #: the whole manifest: also vectors per space and the files' SHA-256

    @classmethod
    def from_proto(cls, msg: snapshots_pb2.SnapshotInfo) -> SnapshotInfo:
        return cls(
            name=msg.name,
            created_at=msg.created_at,
            sequence=msg.sequence,
            points=dict(msg.points),
            spaces=msg.spaces,
            transforms=msg.transforms,
            bytes=msg.bytes,
            format_version=msg.format_version,
            manifest=json.loads(msg.manifest_json) if msg.manifest_json else {},
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_snapshot(chunks: Iterable[snapshots_pb2.SnapshotChunk], to: Path) -> dict[str, Any]:
    """Writes a snapshot's chunks into the new folder ``to``; returns its manifest once every file checks.

    FileExistsError when ``to`` exists and is not an empty folder; FailedPrecondition when a file
    is out of order, missing, or differs from the manifest (``to`` is then not created)."""
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise FileExistsError(f"{to} exists and is not an empty folder")
    partial = to.with_name(f"{to.name}.partial-{uuid.uuid4().hex[:8]}")
    partial.mkdir(parents=True)
    try:
        out, name = None, ""
        try:
            for c in chunks:
                if c.file != name:
                    if out is not None:
                        out.close()
                    if Path(c.file).name != c.file or c.offset != 0 or (partial / c.file).exists():
                        raise FailedPrecondition(f"the server sent an unexpected chunk of {c.file!r} at {c.offset}")
                    name, out = c.file, (partial / c.file).open("wb")
                if out is None or out.tell() != c.offset:
                    raise FailedPrecondition(f"the server sent {name!r} out of order (offset {c.offset})")
                out.write(c.data)
        finally:
            if out is not None:
                out.close()
        manifest = _check(partial)
        for f in partial.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        if to.exists():
            to.rmdir()  # empty, checked above
        partial.rename(to)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest


def _check(folder: Path) -> dict[str, Any]:
    """The manifest in ``folder`` once every file it lists has its size and SHA-256."""
    try:
        manifest: dict[str, Any] = json.loads((folder / MANIFEST).read_text("utf-8"))
        files: dict[str, dict[str, Any]] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FailedPrecondition(f"the downloaded {MANIFEST} is missing or unreadable: {e}") from None
    for name, meta in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != meta.get("bytes") or _sha256(path) != meta.get("sha256"):
            raise FailedPrecondition(f"the downloaded {name} does not match its size and SHA-256 in {MANIFEST}")
    return manifest
