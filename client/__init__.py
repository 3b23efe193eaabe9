"""The Interlingua Python client (numpy in, numpy out) and the ``interlingua`` CLI.

>>> from interlingua.client import Client
>>> with Client("localhost:50051") as client:  # doctest: +SKIP
...     D, I = client.search("gallery", xq, k=10, space="minilm-l6@1")
>>> with Client.embedded("./data") as client:  # doctest: +SKIP
...     D, I = client.search("gallery", xq, k=10, space="minilm-l6@1")  # in process: no server, no gRPC

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
    ForwardUpgradeFailed,
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
from ._types import (
    BackfillOrder,
    CollectionInfo,
    CollectionMove,
    ForwardProgress,
    MigrationInfo,
    PointRecord,
    Route,
    RouteInfo,
    RoutesListing,
    ScoreCalibration,
    SearchResult,
    Space,
    TransformInfo,
)

__all__ = [
    "TLS",
    "AlreadyExists",
    "BackfillOrder",
    "Cancelled",
    "Client",
    "CollectionInfo",
    "CollectionMove",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FitFailed",
    "ForwardProgress",
    "ForwardUpgradeFailed",
    "InterlinguaError",
    "Internal",
    "InvalidArgument",
    "MigrationInfo",
    "NotFound",
    "PermissionDenied",
    "PointRecord",
    "ResourceExhausted",
    "Route",
    "RouteInfo",
    "RoutesListing",
    "ScoreCalibration",
    "SearchResult",
    "SearchStream",
    "SnapshotInfo",
    "Space",
    "TransformInfo",
    "Unauthenticated",
    "Unavailable",
    "Unknown",
]
