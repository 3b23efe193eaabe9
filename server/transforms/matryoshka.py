"""Matryoshka truncation: keep the first m of d dimensions, re-normalized for cosine and inner-product spaces.

A model trained with a Matryoshka loss (Kusupati et al., NeurIPS 2022) nests its embeddings: the
first m coordinates are themselves a usable embedding. :func:`shrink` is the one definition used
everywhere (the ``matryoshka`` kind, the adapter's loss, the benchmarks): **truncate, then
L2-normalize** (``normalize=True``), as sentence-transformers' ``shrink()`` does.

Which spaces re-normalize (:func:`renormalizes`):

* ``cosine`` and ``ip``: yes. A prefix of a unit vector is shorter than 1 by a per-item amount, so
  its raw inner products mix the prefix's direction with how much of the item's energy the prefix
  holds; the re-normalized prefix scores by direction alone, which is what the full vectors do.
* ``l2``: no. ‖x[:m] − y[:m]‖² is a partial sum of ‖x − y‖², a lower bound that only grows with m,
  which is what a funnel's first stage wants; re-normalizing would break it.

Linearity: truncation alone is the linear map ``x @ I[:, :m]`` (:meth:`MatryoshkaTransform.affine`
gives it when ``normalize=False``); with re-normalization the map is not linear and ``affine()`` is
None, so a :func:`~.chain.compose` containing it stays a :class:`~.chain.ChainTransform`.

Composition rule (:func:`then_truncate`): **transform into the home space first, then truncate.**
Nesting is a property of one particular basis: the coordinates the MRL model was trained to order.
A rotation (``procrustes``, ``pca_basis``) or any learned map mixes every input coordinate into every
output coordinate, so the first m outputs of a rotated MRL vector are *not* its MRL prefix and carry
no nesting guarantee; truncating first and then mapping is not even defined (the map takes d inputs).
The two orders that are right: (a) a map *into* an MRL-trained home space, then truncation of the
home vector (its nesting is the home model's); (b) for a model not trained with MRL, a map that
*creates* nesting (``pca_basis``, ``mrl_adapter``) applied to gallery and queries alike, then
truncation. Since truncate-then-normalize ignores the input's scale, it does not matter whether the
home vector was normalized before truncation.

Covered by ``tests/test_matryoshka_transforms.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Transform

__all__ = ["RENORMALIZE", "MatryoshkaTransform", "check_m", "matryoshka", "renormalizes", "shrink", "then_truncate"]

RENORMALIZE = {"cosine": True, "ip": True, "l2": False}  #: home metric -> whether prefixes are re-normalized


def renormalizes(metric: str) -> bool:
    """Whether prefixes are re-normalized in a space scored with ``metric`` (module docstring: why)."""
    if metric not in RENORMALIZE:
        raise ValueError(f"metric must be one of {', '.join(RENORMALIZE)}, got {metric!r}")
    return RENORMALIZE[metric]


def check_m(m: Any, d: Any) -> tuple[int, int]:
    """(m, d) as ints after checking 1 <= d and 0 < m <= d; raises ValueError with the reason."""
    if isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 1:
        raise ValueError(f"d must be an integer >= 1: got d={d!r}")
    if isinstance(m, bool) or not isinstance(m, int | np.integer):
        raise ValueError(f"m must be an integer: got m={m!r}")
    if not 0 < m <= d:
        raise ValueError(f"m must be in (0, d]: got m={m} for d={d}")
    return int(m), int(d)


def shrink(x: np.ndarray, m: int, normalize: bool = True) -> np.ndarray:
    """The first m columns of x (n, d) as a new (n, m) float32 array, L2-normalized per row if ``normalize``.

    A zero prefix stays zero (its norm is floored at 1e-12)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-d array (n, d), got shape {x.shape}")
    m, _ = check_m(m, int(x.shape[1]))
    y = np.array(x[:, :m], dtype=np.float32, order="C")
    if normalize:
        y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), np.float32(1e-12))
    return y


class MatryoshkaTransform(Transform):
    """x (n, d) -> shrink(x, m, normalize) (n, m): the ``matryoshka`` kind; the same map for both sides.

    Built, not fitted (:func:`matryoshka`). ``config``: ``{"kind": "matryoshka", "d", "m", "normalize"}``.
    """

    kind = "matryoshka"

    def __init__(self, d: int, m: int, normalize: bool = True, config: dict[str, Any] | None = None) -> None:
        m, d = check_m(m, d)
        if not isinstance(normalize, bool | np.bool_):
            raise ValueError(f"normalize must be a bool: got normalize={normalize!r}")
        self.m, self.normalize = m, bool(normalize)
        super().__init__(d, m, {**(config or {}), "kind": self.kind, "d": d, "m": m, "normalize": self.normalize})

    def apply(self, x: np.ndarray, side: str = "query") -> np.ndarray:
        """x : (n, d) -> (n, m) float32: the first m columns, L2-normalized when ``normalize``."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"x must have shape (n, {self.d_in}), got {x.shape}")
        return shrink(x, self.m, self.normalize)

    def affine(self, side: str = "query") -> tuple[np.ndarray, np.ndarray] | None:
        """(I[:, :m] (d, m), 0 (m,)) without re-normalization; None with it (not a linear map)."""
        if self.normalize:
            return None
        return np.eye(self.d_in, self.m, dtype=np.float32), np.zeros(self.m, dtype=np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        """``d``, ``m`` and ``normalize`` as (1,) int64 arrays: the artefact describes itself without its config."""
        values = {"d": self.d_in, "m": self.m, "normalize": int(self.normalize)}
        return {k: np.array([v], dtype=np.int64) for k, v in values.items()}

    @classmethod
    def from_arrays(
        cls, d_in: int, d_out: int, config: dict[str, Any], arrays: dict[str, np.ndarray]
    ) -> MatryoshkaTransform:
        def scalar(name: str, default: int) -> int:
            return int(np.asarray(arrays[name]).ravel()[0]) if name in arrays else default

        d, m = scalar("d", d_in), scalar("m", d_out)
        normalize = bool(scalar("normalize", int(config.get("normalize", True))))
        if (d, m) != (d_in, d_out):
            raise ValueError(f"arrays hold d={d}, m={m} but the artefact maps {d_in} -> {d_out}")
        return cls(d, m, normalize, {k: v for k, v in config.items() if k not in ("d", "m", "normalize")})


def matryoshka(d: int, m: int, normalize: bool = True) -> MatryoshkaTransform:
    """The ``matryoshka`` transform keeping the first m of d dims (re-normalized unless ``normalize=False``)."""
    return MatryoshkaTransform(d, m, normalize)


def then_truncate(t: Transform, m: int, normalize: bool = True) -> Transform:
    """t, then truncation to its first m output dims: the composition rule (module docstring).

    An affine t with ``normalize=False`` folds into one affine map (W[:, :m], b[:m]) of kind ``chain``;
    otherwise a :class:`~.chain.ChainTransform` applies t and then :func:`shrink`."""
    from .chain import compose

    check_m(m, t.d_out)
    return compose([t, MatryoshkaTransform(t.d_out, m, normalize)])
