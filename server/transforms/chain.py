"""Composition of transforms: ``compose([t1, t2, ...])`` applies t1, then t2, ... (space A -> B -> C).

When every link is affine (``Transform.affine`` is not None), the chain is precomputed per side
into one :class:`AffineTransform` of kind ``"chain"``: with ``x W1 + b1`` followed by ``y W2 + b2``,
``W = W1 W2`` and ``b = b1 W2 + b2``, folded left to right in float64, so serving it costs one
matmul whatever its length. Otherwise a :class:`ChainTransform` applies the links in order.

Dimensions are checked eagerly: link i's d_in must equal link i-1's d_out. The config records
every link's kind, dims and checksum (``links``), and the last link's ``d_home`` when it is a
basis transform, so the composition still marks its home prefix. A :class:`ChainTransform` has no
weights of its own (:meth:`ChainTransform.arrays` is empty): it is rebuilt by composing its
stored links again. Covered by ``tests/test_transforms_linear.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import SIDES, AffineTransform, Transform, checksum
from .basis import BasisTransform

__all__ = ["ChainTransform", "compose", "link_record"]


def link_record(t: Transform) -> dict[str, Any]:
    """What a chain's config keeps of one link: kind, dims, checksum and its own ``id`` when it has one."""
    rec: dict[str, Any] = {
        "kind": t.kind,
        "d_in": t.d_in,
        "d_out": t.d_out,
        "checksum": checksum(t.kind, t.config, t.arrays()),
    }
    if "id" in t.config:
        rec["id"] = t.config["id"]
    return rec


class ChainTransform(Transform):
    """Links applied in order; used when some link is not affine (e.g. ``residual_mlp``)."""

    kind = "chain"

    def __init__(self, links: Sequence[Transform], config: dict[str, Any]) -> None:
        super().__init__(links[0].d_in, links[-1].d_out, config)
        self.links = tuple(links)

    def apply(self, x: np.ndarray, side: str = "query") -> np.ndarray:
        """x : (n, d_in) float32 -> (n, d_out) float32, through every link (each sees the same side)."""
        for t in self.links:
            x = t.apply(np.ascontiguousarray(x, dtype=np.float32), side)
        return x

    def arrays(self) -> dict[str, np.ndarray]:
        """Nothing: the links are stored on their own, and their checksums are in the config."""
        return {}

    @classmethod
    def from_arrays(
        cls, d_in: int, d_out: int, config: dict[str, Any], arrays: dict[str, np.ndarray]
    ) -> ChainTransform:
        raise ValueError("a non-affine chain has no weights of its own: rebuild it with compose(links)")


def compose(links: Sequence[Transform]) -> Transform:
    """One transform equal to applying ``links`` in order: an AffineTransform(kind="chain") when every
    link is affine (a BasisTransform when the last link is one), else a :class:`ChainTransform`."""
    if len(links) == 0:
        raise ValueError("compose needs at least one link")
    for i in range(1, len(links)):
        prev, t = links[i - 1], links[i]
        if t.d_in != prev.d_out:
            raise ValueError(
                f"link {i} ({t.kind}) has d_in {t.d_in} but link {i - 1} ({prev.kind}) has d_out {prev.d_out}"
            )
    config: dict[str, Any] = {"kind": "chain", "links": [link_record(t) for t in links]}
    last = links[-1]
    if "d_home" in last.config:
        config["d_home"] = last.config["d_home"]
    W: dict[str, np.ndarray] = {}
    b: dict[str, np.ndarray] = {}
    for s in SIDES:
        forms = [t.affine(s) for t in links]
        affines = [f for f in forms if f is not None]
        if len(affines) < len(forms):
            return ChainTransform(links, config)
        Ws, bs = np.eye(links[0].d_in), np.zeros(links[0].d_in)
        for Wi, bi in affines:
            Ws, bs = Ws @ np.asarray(Wi, np.float64), bs @ np.asarray(Wi, np.float64) + np.asarray(bi, np.float64)
        W[s], b[s] = Ws, bs
    if isinstance(last, BasisTransform):
        return BasisTransform(W, b, config, kind="chain")
    return AffineTransform(W, b, config, kind="chain")
