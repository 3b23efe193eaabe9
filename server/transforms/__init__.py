"""Compatibility transforms: one module per kind, fitted offline or by the service.

================  ==========================================================  ==================
kind              what it is                                                   module
================  ==========================================================  ==================
procrustes        orthogonal map from the SVD of XᵀY (centred, scaled)          ``procrustes.py``
affine            ridge least squares W, b                                     ``affine.py``
lambda_orthogonal λ-orthogonality regularized affine map (Ricci et al. 2025)   ``lambda_orthogonal.py``
basis             post-hoc orthonormal basis transformation (after BT²)        ``basis.py``
residual_mlp      affine map plus a small residual MLP (after Drift-Adapter)   ``residual_mlp.py``
chain             composition of registered transforms                        ``chain.py``
matryoshka        keep the first m dims, re-normalized (built, not fitted)     ``matryoshka.py``
pca_basis         rotation onto the principal axes (home -> home, b = 0)       ``pca_basis.py``
mrl_adapter       learned Matryoshka adapter (home -> home)                    ``mrl_adapter.py``
================  ==========================================================  ==================

Torch is imported only by the modules that train with it, and only when they fit. The kind registry
(:mod:`.kinds`) says what each fitted kind needs and accepts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .base import SIDES, AffineTransform, Calibration, FitResult, Transform, apply_to_home, checksum
from .kinds import KINDS, REGISTRY  # the fitted kinds (chain and matryoshka are built, not fitted)

__all__ = [
    "KINDS",
    "SIDES",
    "AffineTransform",
    "Calibration",
    "FitResult",
    "Transform",
    "apply_to_home",
    "checksum",
    "load_transform",
]


def load_transform(
    kind: str,
    d_in: int,
    d_out: int,
    config: dict[str, Any],
    arrays: dict[str, np.ndarray],
    link: Callable[[str], Transform],
) -> Transform:
    """Rebuilds a stored transform; ``link(name)`` resolves a chain's links. A fitted kind rebuilds through
    the kind registry (:meth:`.kinds.Kind.load`); any other stored kind as an :class:`AffineTransform`."""
    if kind == "matryoshka":
        from .matryoshka import MatryoshkaTransform

        return MatryoshkaTransform.from_arrays(d_in, d_out, config, arrays)
    if kind == "chain" and not arrays.get("W_query", np.zeros(0)).size:
        from .chain import compose

        return compose([link(name) for name in config["chain"]])
    if kind in REGISTRY:
        return REGISTRY[kind].load(d_in, d_out, config, arrays)
    return AffineTransform.from_arrays(d_in, d_out, {**config, "kind": kind}, arrays)  # a linear chain
