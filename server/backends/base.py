"""The one type of a collection at run time, whichever backend holds it (see ``__init__.py``)."""

from __future__ import annotations

from typing import TypeAlias

from ..collection import Collection
from .milvus import MilvusCollection

__all__ = ["AnyCollection"]

#: a collection as the request path sees it: the embedded one or a Milvus engine's
AnyCollection: TypeAlias = Collection | MilvusCollection
