"""What the ``interlingua`` CLI's command modules share: the usage error and the input readers.

``cli.py`` (the parser and the client commands) and ``_fit_cli.py`` (``fit``, online and
offline) both import from here, never from each other's module. Covered by ``tests/test_cli.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, overload

import numpy as np
import numpy.typing as npt

__all__ = ["RowIds", "UsageError", "load_array", "parse_rows", "read_lines"]


class UsageError(Exception):
    """A bad argument or input file, found before any call: exit code 2."""


class RowIds(Sequence[str]):
    """The ids "0".."n-1" of an ingest without ``--ids``, made on demand (no n strings in memory)."""

    def __init__(self, n: int) -> None:
        self._n = n

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[str]: ...
    def __getitem__(self, i: int | slice) -> str | Sequence[str]:
        if isinstance(i, slice):
            return [str(j) for j in range(self._n)[i]]
        return str(range(self._n)[i])


def load_array(path: str, what: str) -> npt.NDArray[Any]:
    """A float .npy, memory-mapped so that ingest streams it batch by batch."""
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load {what} from {path}: {err}") from None
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        raise UsageError(f"{what} in {path} must be one float16/32/64 array")
    return x


def read_lines(path: str, n: int, what: str) -> list[str]:
    """The n lines of a text file (ids, payloads), one per vector."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read {what} from {path}: {err}") from None
    if len(lines) != n:
        raise UsageError(f"{path} has {len(lines)} {what} lines for {n} vectors")
    return lines


def parse_rows(spec: str | None, n: int) -> slice:
    """``--rows START:STOP`` or ``ROW`` as a slice of n rows (all of them without one)."""
    if spec is None:
        return slice(0, n)
    try:
        parts = [int(p) if p else None for p in spec.split(":")]
    except ValueError:
        raise UsageError(f"--rows must be START:STOP or ROW, got {spec!r}") from None
    if len(parts) == 1 and parts[0] is not None:
        return slice(parts[0], parts[0] + 1)
    if len(parts) == 2:
        return slice(parts[0], parts[1])
    raise UsageError(f"--rows must be START:STOP or ROW, got {spec!r}")
