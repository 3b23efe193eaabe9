"""The domain exception hierarchy of the service, and its one table to gRPC status codes.

::

    InterlinguaError                     (base; never raised itself)
    ├── InvalidArgument                  INVALID_ARGUMENT: the request is malformed
    ├── NotFound                         NOT_FOUND: unknown space, collection or id
    ├── AlreadyExists                    ALREADY_EXISTS: the name is taken
    ├── FailedPrecondition               FAILED_PRECONDITION: valid, but not in this state
    │   └── NoRoute                      query space is neither home nor routed
    ├── ResourceExhausted                RESOURCE_EXHAUSTED: over a configured cap, or out of memory
    │   └── RateLimited                  over the key's rate limit; carries ``retry_after``
    ├── Unauthenticated                  UNAUTHENTICATED: missing or unknown API key
    ├── PermissionDenied                 PERMISSION_DENIED: a known key whose role is too low
    └── Unavailable                      UNAVAILABLE: the service is loading or draining

The domain core raises these; the servicer layer turns them into a status with
:func:`status_for`, so no bad input ever leaves as UNKNOWN or INTERNAL. A MemoryError
(numpy's ``_ArrayMemoryError`` too) in a handler is a request too large for the host's
memory, not a bug: :func:`out_of_memory` gives its ResourceExhausted. A rejected
request changes nothing: every check runs before the write transaction starts.
Messages are capped at :data:`MAX_MESSAGE_CHARS` (a 20 KB name echoed whole once
overflowed the error metadata); :func:`shown` quotes a value shortened.
"""

from __future__ import annotations

import grpc

__all__ = [
    "MAX_MESSAGE_CHARS",
    "STATUS_TABLE",
    "AlreadyExists",
    "FailedPrecondition",
    "InterlinguaError",
    "InvalidArgument",
    "NoRoute",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "out_of_memory",
    "shown",
    "status_for",
]

MAX_MESSAGE_CHARS = 1024


def shown(value: object, limit: int = 64) -> str:
    """``repr(value)``, cut to ``limit`` characters with its full length said when longer."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} chars)" if isinstance(value, str | bytes) else ""
    return f"{text[: limit - 3]}...{size}"


class InterlinguaError(Exception):
    """Base of every error the service reports to a caller."""

    def __init__(self, message: str) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = f"{message[: MAX_MESSAGE_CHARS - 40]}... ({len(message)} chars, cut)"
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


class RateLimited(ResourceExhausted):
    """The key is over its rate limit; ``retry_after`` seconds until a call would pass."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unauthenticated(InterlinguaError):
    """The request carries no API key or an unknown one."""


class PermissionDenied(InterlinguaError):
    """The API key is known but its role does not allow this call."""


class Unavailable(InterlinguaError):
    """The service is loading, recovering or shutting down; retry later."""


# The one table; the most specific match wins (the class nearest in the exception's MRO), so the
# order of the entries does not matter and a subclass without its own entry takes its parent's.
STATUS_TABLE: dict[type[InterlinguaError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_for(exc: InterlinguaError) -> grpc.StatusCode:
    """The gRPC status code of a domain error: the table entry of its most specific class."""
    for cls in type(exc).__mro__:
        code = STATUS_TABLE.get(cls)
        if code is not None:
            return code
    raise TypeError(f"no status code for {type(exc).__name__}")  # a bug, not bad input


def out_of_memory(what: str) -> ResourceExhausted:
    """The error of a MemoryError raised in ``what`` (a handler, a message's parsing)."""
    return ResourceExhausted(
        f"{what} ran out of memory on the server; retry with fewer queries, a smaller k or shortlist_k,"
        " or a smaller batch"
    )
