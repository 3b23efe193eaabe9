"""The domain exception hierarchy of the service, and its one table to gRPC status codes.

::

    InterlinguaError                     (base; never raised itself)
    ├── InvalidArgument                  INVALID_ARGUMENT: the request is malformed
    ├── NotFound                         NOT_FOUND: unknown space, collection or id
    ├── AlreadyExists                    ALREADY_EXISTS: the name is taken
    ├── FailedPrecondition               FAILED_PRECONDITION: valid, but not in this state
    │   └── NoRoute                      query space is neither home nor routed
    ├── ResourceExhausted                RESOURCE_EXHAUSTED: over a configured cap
    ├── Unauthenticated                  UNAUTHENTICATED: missing or wrong API key
    └── Unavailable                      UNAVAILABLE: the service is loading or draining

The domain core raises these; the servicer layer turns them into a status with
:func:`status_for`, so no bad input ever leaves as UNKNOWN or INTERNAL. A rejected
request changes nothing: every check runs before the write transaction starts.
"""

from __future__ import annotations

import grpc

__all__ = [
    "STATUS_TABLE",
    "AlreadyExists",
    "FailedPrecondition",
    "InterlinguaError",
    "InvalidArgument",
    "NoRoute",
    "NotFound",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "status_for",
]


class InterlinguaError(Exception):
    """Base of every error the service reports to a caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(InterlinguaError):
    """The request is malformed: wrong dim, NaN, bad id, bad k, bad payload..."""


class NotFound(InterlinguaError):
    """A named space, collection or point id does not exist."""


class AlreadyExists(InterlinguaError):
    """A space or collection with this name exists already."""


class FailedPrecondition(InterlinguaError):
    """The request is well formed but the system is not in a state to serve it."""


class NoRoute(FailedPrecondition):
    """The query space is neither the collection's home space nor routed to it."""


class ResourceExhausted(InterlinguaError):
    """A batch or message is over a configured cap."""


class Unauthenticated(InterlinguaError):
    """The request carries no API key or a wrong one."""


class Unavailable(InterlinguaError):
    """The service is loading, recovering or shutting down; retry later."""


# One table, most specific class first: the first isinstance match wins.
STATUS_TABLE: tuple[tuple[type[InterlinguaError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (NoRoute, grpc.StatusCode.FAILED_PRECONDITION),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)


def status_for(exc: InterlinguaError) -> grpc.StatusCode:
    """The gRPC status code of a domain error (most specific match in STATUS_TABLE)."""
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            return code
    raise TypeError(f"no status code for {type(exc).__name__}")  # a bug, not bad input
