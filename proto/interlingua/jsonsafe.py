"""Strict JSON for figures that may be infinite, shared by the server and the client.

λ = inf is a real setting of ``lambda_orthogonal``, and ``json.dumps`` would write it as the
non-standard ``Infinity``, which strict parsers (and ``allow_nan=False``) refuse. :func:`finite`
replaces every non-finite float, at any depth, by the string ``"inf"``, ``"-inf"`` or ``"nan"``.
Covered by ``tests/test_cli.py`` (JSON output of every command parses).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["finite"]


def finite(o: Any) -> Any:
    """``o`` (dicts, lists, tuples, scalars) with non-finite floats as "inf", "-inf" or "nan"."""
    if isinstance(o, float) and not math.isfinite(o):
        return "nan" if math.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [finite(v) for v in o]
    return o
