"""The kind registry: every fitted transform kind, once, with what the rest of the service reads about it.

One frozen :class:`Kind` per kind: its name, the ``TransformKind`` enum value that carries it on the
wire, where its fit function lives, which class rebuilds a stored one (:meth:`Kind.load`), what it
needs (``full_rank``: at least d_new pairs; ``paired``: row-aligned (query_home[i], doc_home[i])
positives; ``home``: maps a collection's own space to itself; ``trained``: trained with torch) and
the config it accepts. The config schema is read once, here, from the fields (name, annotation,
default) of the kind's frozen config dataclass (``ProcrustesConfig``, ``LambdaOrthogonalConfig``, ...:
next to each fitter, validated in ``__post_init__``, ``get_config_dict()`` what the artefact keeps);
each fitter is ``fit_<kind>(cal, config=None, *, progress=None, **overrides)``, the overrides building
or amending the config. Everything else is derived from :data:`REGISTRY`: ``fit.KINDS`` and the kind
sets, the servicer's enum mapping (by enum value name), the kind check of a FitTransform request,
``load_transform``. ``chain`` is requested on the wire too but built from registered links, not fitted
(:data:`CHAIN`); ``matryoshka`` is built by ``matryoshka.matryoshka(d, m)`` and never requested. The
client derives its kind names from the proto enum (it does not import the server); ``tests/test_kinds.py``
checks that both agree.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import Any

import numpy as np

from . import affine, basis, lambda_orthogonal, mrl_adapter, pca_basis, procrustes, residual_mlp
from .base import AffineTransform, FitResult, Transform

__all__ = [
    "CHAIN",
    "FULL_RANK_KINDS",
    "HOME_KINDS",
    "KINDS",
    "PAIRED_KINDS",
    "REGISTRY",
    "TRAINED_KINDS",
    "WIRE",
    "WIRE_KINDS",
    "ConfigKey",
    "Kind",
    "get_kind",
]


@dataclass(frozen=True)
class ConfigKey:
    """One accepted config key: ``type`` is the annotation as written in the fitter (``"int"``,
    ``"float | None"``, ``"Sequence[float]"``), ``default`` its default value."""

    name: str
    type: str
    default: Any


PSEUDO_RELEVANCE = ConfigKey("pseudo_relevance", "bool", True)  #: every new -> home kind (``fit.fit_transform``)


@dataclass(frozen=True)
class Kind:
    """A transform kind. ``params`` are the fields of its config dataclass (``settings``; ``seed`` included:
    the fit passes it); ``config`` the keys a request's config may set."""

    name: str
    proto: str  #: the ``TransformKind`` enum value name, e.g. ``"TRANSFORM_KIND_PROCRUSTES"``
    module: str  #: module of ``server.transforms`` holding the fit function ("" when built, not fitted)
    function: str  #: the fit function, ``fit(cal, **config) -> FitResult``
    full_rank: bool = False  #: needs n >= d_new pairs (XcᵀXc must be able to reach full rank)
    paired: bool = False  #: trains on (query_home[i], doc_home[i]) positive pairs: both sides row-aligned
    home: bool = False  #: maps a collection's own space to itself (gallery and queries alike)
    trained: bool = False  #: trained with torch (imported only when fitted)
    transform: str = ""  #: the class in ``module`` that rebuilds a stored one ("": an AffineTransform)
    params: Mapping[str, ConfigKey] = field(default_factory=lambda: MappingProxyType({}))
    settings: type[Any] | None = None  #: the config dataclass of the fit function (None for chain)

    @property
    def config(self) -> dict[str, ConfigKey]:
        """The config keys a request may give (``kind`` aside, which any config may repeat)."""
        keys = dict(self.params)
        if not self.home:
            keys[PSEUDO_RELEVANCE.name] = PSEUDO_RELEVANCE
        return keys

    def load(self, d_in: int, d_out: int, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Transform:
        """Rebuilds a stored transform of this kind from its config and arrays."""
        if not self.transform:
            return AffineTransform.from_arrays(d_in, d_out, {**config, "kind": self.name}, arrays)
        cls = getattr(importlib.import_module(f".{self.module}", __package__), self.transform)
        t: Transform = cls.from_arrays(d_in, d_out, config, arrays)
        return t

    def fitter(self) -> Callable[..., FitResult]:
        """The fit function, looked up on its module at each call (a test may replace it there)."""
        fn: Callable[..., FitResult] = getattr(importlib.import_module(f".{self.module}", __package__), self.function)
        return fn


def _params(settings: type[Any]) -> Mapping[str, ConfigKey]:
    """The fields of the config dataclass ``settings`` (the one place a schema is read)."""
    keys = {}
    for f in dataclasses.fields(settings):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        keys[f.name] = ConfigKey(f.name, str(f.type), default)
    return MappingProxyType(keys)


def _kind(
    name: str,
    proto: str,
    module: ModuleType,
    settings: type[Any],
    *,
    full_rank: bool = False,
    paired: bool = False,
    home: bool = False,
    trained: bool = False,
    transform: str = "",
) -> Kind:
    function = f"fit_{name}"
    short = module.__name__.rpartition(".")[2]
    return Kind(name, proto, short, function, full_rank, paired, home, trained, transform, _params(settings), settings)


#: The fitted kinds, in the order error messages list them.
REGISTRY: Mapping[str, Kind] = MappingProxyType(
    {
        k.name: k
        for k in (
            _kind("procrustes", "TRANSFORM_KIND_PROCRUSTES", procrustes, procrustes.ProcrustesConfig, full_rank=True),
            _kind("affine", "TRANSFORM_KIND_AFFINE", affine, affine.AffineConfig, full_rank=True),
            _kind(
                "lambda_orthogonal",
                "TRANSFORM_KIND_LAMBDA_ORTHOGONAL",
                lambda_orthogonal,
                lambda_orthogonal.LambdaOrthogonalConfig,
                trained=True,
            ),
            _kind(
                "basis", "TRANSFORM_KIND_BASIS", basis, basis.BasisConfig, full_rank=True, transform="BasisTransform"
            ),
            _kind(
                "residual_mlp",
                "TRANSFORM_KIND_RESIDUAL_MLP",
                residual_mlp,
                residual_mlp.ResidualMLPConfig,
                trained=True,
                transform="ResidualMLPTransform",
            ),
            _kind(
                "pca_basis", "TRANSFORM_KIND_PCA_BASIS", pca_basis, pca_basis.PCABasisConfig, home=True
            ),  # W = R, b = 0: an AffineTransform
            _kind(
                "mrl_adapter",
                "TRANSFORM_KIND_MRL_ADAPTER",
                mrl_adapter,
                mrl_adapter.MRLAdapterConfig,
                paired=True,
                home=True,
                trained=True,
                transform="MRLAdapterTransform",
            ),
        )
    }
)
#: Composition of registered transforms (``chain.compose``): requested like a kind, built rather than fitted.
CHAIN = Kind("chain", "TRANSFORM_KIND_CHAIN", "", "")

KINDS = tuple(REGISTRY)  #: chain is built by compose, matryoshka by matryoshka.matryoshka(d, m)
FULL_RANK_KINDS = tuple(k.name for k in REGISTRY.values() if k.full_rank)
PAIRED_KINDS = tuple(k.name for k in REGISTRY.values() if k.paired)
HOME_KINDS = tuple(k.name for k in REGISTRY.values() if k.home)
TRAINED_KINDS = tuple(k.name for k in REGISTRY.values() if k.trained)
WIRE = (*REGISTRY.values(), CHAIN)  #: every kind a FitTransform request may name, each a ``TransformKind`` value
WIRE_KINDS = tuple(k.name for k in WIRE)


def get_kind(name: str) -> Kind:
    """The registered kind ``name``; ValueError naming the registered kinds otherwise."""
    k = REGISTRY.get(name)
    if k is None:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {name!r}")
    return k
