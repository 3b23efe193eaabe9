"""The Interlingua Python client (numpy in, numpy out) and the ``interlingua`` CLI.

>>> from interlingua.client import Client
>>> with Client("localhost:50051") as client:  # doctest: +SKIP
...     D, I = client.search("gallery", xq, k=10, space="minilm-l6@1")

Errors are :class:`InterlinguaError` subclasses (see ``_exceptions.py`` for the tree).
"""

from __future__ import annotations

from ._client import Client, SearchStream
from ._exceptions import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    FitFailed,
    InterlinguaError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unknown,
)
from ._snapshots import SnapshotInfo
from ._tls import TLS
from ._types import CollectionInfo, PointRecord, Route, RouteInfo, RoutesListing, SearchResult, Space, TransformInfo

__all__ = [
    "TLS",
    "AlreadyExists",
    "Cancelled",
    "Client",
    "CollectionInfo",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FitFailed",
    "InterlinguaError",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "PointRecord",
    "ResourceExhausted",
    "Route",
    "RouteInfo",
    "RoutesListing",
    "SearchResult",
    "SearchStream",
    "SnapshotInfo",
    "Space",
    "TransformInfo",
    "Unauthenticated",
    "Unavailable",
    "Unknown",
]
