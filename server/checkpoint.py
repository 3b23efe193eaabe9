"""Index checkpoints: a FAISS index written with the sequence number it includes.

A checkpoint is one file, ``index.ckpt``: a JSON header line, then the bytes of
``faiss.serialize_index``. It is written to a temporary file, fsynced, renamed
over the old one and the directory fsynced, so a crash leaves either the old or
the new checkpoint, never a torn one. :func:`load` verifies the header (format,
spec, dimension, metric, length, SHA-256) and returns None for a missing or
corrupt file: the caller then rebuilds the index from the store, never serving
a damaged one. Covered by ``tests/test_durability.py`` and, for a prefix collection,
``tests/test_pipeline.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

__all__ = ["Checkpoint", "load", "remove", "save"]

log = logging.getLogger(__name__)
FORMAT = "interlingua-index-v1"
FILENAME = "index.ckpt"


@dataclass(frozen=True)
class Checkpoint:
    index: Any  #: the faiss.Index, holding labels 0 .. nsealed-1
    sequence: int  #: every home-vector write with a sequence <= this is in the index
    nsealed: int  #: index.ntotal


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that a rename or a new file in it is durable (also used by ``snapshots.py``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(folder: Path, index: Any, *, sequence: int, spec: str, metric: str) -> int:
    """Atomically writes ``index`` to ``folder/index.ckpt``; returns the bytes written. The header's
    ``d`` is the index's own (``index.d``: a Matryoshka prefix collection's index holds its prefix
    dims), so it always matches what :func:`load` finds in the blob."""
    folder.mkdir(parents=True, exist_ok=True)
    blob = faiss.serialize_index(index)
    header = {
        "format": FORMAT,
        "sequence": sequence,
        "nsealed": int(index.ntotal),
        "spec": spec,
        "d": int(index.d),
        "metric": metric,
        "length": int(blob.nbytes),
        "sha256": hashlib.sha256(blob.data).hexdigest(),
    }
    tmp = folder / (FILENAME + ".tmp")
    with open(tmp, "wb") as f:
        f.write(json.dumps(header).encode() + b"\n")
        f.write(blob.data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / FILENAME)
    fsync_dir(folder)
    return int(blob.nbytes)


def load(folder: Path, *, spec: str, d: int, metric: str) -> Checkpoint | None:
    """The checkpoint in ``folder``, or None when it is missing or fails any check."""
    path = folder / FILENAME
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            header = json.loads(f.readline())
            blob = np.frombuffer(f.read(), dtype=np.uint8)
        expected = {"format": FORMAT, "spec": spec, "d": d, "metric": metric, "length": blob.nbytes}
        for key, value in expected.items():
            if header.get(key) != value:
                raise ValueError(f"{key} is {header.get(key)!r}, expected {value!r}")
        if hashlib.sha256(blob.data).hexdigest() != header["sha256"]:
            raise ValueError("checksum mismatch")
        index = faiss.deserialize_index(blob)
        if index.ntotal != header["nsealed"] or index.d != d:
            raise ValueError("index size does not match its header")
        return Checkpoint(index=index, sequence=int(header["sequence"]), nsealed=int(header["nsealed"]))
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        log.warning("checkpoint %s is unusable (%s); the index will be rebuilt from the store", path, e)
        return None


def remove(folder: Path) -> None:
    """Deletes the checkpoint in ``folder``, durably (a restart then rebuilds from the store)."""
    path = folder / FILENAME
    if path.exists():
        path.unlink()
        fsync_dir(folder)
