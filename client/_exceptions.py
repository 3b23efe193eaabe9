"""The client's exception hierarchy, and its one table from gRPC status codes.

::

    InterlinguaError                 any failed call (also: a status code not in the table)
    ├── InvalidArgument              INVALID_ARGUMENT     input error: malformed request
    ├── NotFound                     NOT_FOUND            input error: unknown space, collection or id
    ├── AlreadyExists                ALREADY_EXISTS       input error: the name is taken
    ├── FailedPrecondition           FAILED_PRECONDITION  valid, but not in this state (e.g. no route)
    ├── ResourceExhausted            RESOURCE_EXHAUSTED   retriable: over a cap, a rate limit, or overloaded
    ├── Unauthenticated              UNAUTHENTICATED      missing or unknown API key
    ├── PermissionDenied             PERMISSION_DENIED    the key's role does not allow the call
    ├── Unavailable                  UNAVAILABLE          retriable: loading, draining, unreachable
    ├── DeadlineExceeded             DEADLINE_EXCEEDED    retriable: the call ran past its timeout
    ├── Internal                     INTERNAL
    ├── Unknown                      UNKNOWN
    ├── Cancelled                    CANCELLED
    ├── FitFailed                    (none)               the calls succeeded, the transform's fit failed
    └── ForwardUpgradeFailed         (none)               the calls succeeded, the forward upgrade failed

``retriable`` says whether the same call may succeed if sent again later
(:class:`ResourceExhausted` carries the server's ``retry-after`` hint, in seconds, as
``retry_after`` when it sent one: a key over its rate limit);
``is_input_error`` says the request itself is wrong and must be changed. Every
:class:`~interlingua.client.Client` method turns a :class:`grpc.RpcError` into one
of these with :func:`from_rpc_error` and raises it ``from`` the original error.
Client-side checks (shapes, lengths) raise :class:`InvalidArgument` too, so one
``except`` clause serves a mistake whether the client or the server caught it.
:class:`FitFailed` is the one class no status code maps to: a transform whose
background fit ended in state ``failed`` (:meth:`Client.wait_transform`); it
carries the transform's :class:`~interlingua.client.TransformInfo` as ``info``;
:class:`ForwardUpgradeFailed` is its twin for a migration's background forward upgrade
(:meth:`Client.wait_forward_upgrade`), carrying the :class:`~interlingua.client.MigrationInfo`.
Covered by ``tests/test_client.py``, ``tests/test_client_transforms.py`` and
``tests/test_migration_client.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import grpc

if TYPE_CHECKING:
    from ._types import MigrationInfo, TransformInfo

__all__ = [
    "AlreadyExists",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FitFailed",
    "ForwardUpgradeFailed",
    "InterlinguaError",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unknown",
    "from_rpc_error",
]


class InterlinguaError(Exception):
    """A call failed; ``code`` is its gRPC status code and ``message`` the server's details."""

    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    retriable: ClassVar[bool] = False
    is_input_error: ClassVar[bool] = False

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        self.code: grpc.StatusCode = self.default_code if code is None else code
        self.message = message
        super().__init__(f"{self.code.name}: {message}")


class InvalidArgument(InterlinguaError):
    """The request is malformed: wrong dim, NaN, bad id, bad k, bad payload..."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT
    is_input_error = True


class NotFound(InterlinguaError):
    """A named space, collection or point id does not exist."""

    default_code = grpc.StatusCode.NOT_FOUND
    is_input_error = True


class AlreadyExists(InterlinguaError):
    """A space or collection with this name exists already."""

    default_code = grpc.StatusCode.ALREADY_EXISTS
    is_input_error = True


class FailedPrecondition(InterlinguaError):
    """The request is well formed but the service is not in a state to serve it."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(InterlinguaError):
    """A batch or message is over a configured cap, the key over its rate limit, or the server is
    overloaded; ``retry_after`` is the server's hint in seconds (None when it sent none)."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retriable = True

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class Unauthenticated(InterlinguaError):
    """The call carried no API key or one the server does not know."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(InterlinguaError):
    """The caller is known but not allowed to make this call."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(InterlinguaError):
    """The service is loading, draining or unreachable; retry later."""

    default_code = grpc.StatusCode.UNAVAILABLE
    retriable = True


class DeadlineExceeded(InterlinguaError):
    """The call did not finish within its timeout."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED
    retriable = True


class Internal(InterlinguaError):
    """The server broke an invariant: a bug to report, not an input to fix."""

    default_code = grpc.StatusCode.INTERNAL


class Unknown(InterlinguaError):
    """The server failed without a status (an uncaught exception in a handler)."""

    default_code = grpc.StatusCode.UNKNOWN


class Cancelled(InterlinguaError):
    """The call was cancelled, usually by the caller."""

    default_code = grpc.StatusCode.CANCELLED


class FitFailed(InterlinguaError):
    """A transform's background fit failed; ``info`` is the transform (state ``"failed"``, ``error`` set).

    Not a status code: FitTransform and GetTransform both succeeded. ``code`` is UNKNOWN.
    """

    def __init__(self, message: str, *, info: TransformInfo) -> None:
        super().__init__(message)
        self.info = info


class ForwardUpgradeFailed(InterlinguaError):
    """A migration's forward upgrade ended ``"failed"`` or ``"cancelled"``; ``info`` is the migration
    (``info.forward.error`` says why). Not a status code: the calls succeeded. ``code`` is UNKNOWN.
    """

    def __init__(self, message: str, *, info: MigrationInfo) -> None:
        super().__init__(message)
        self.info = info


# The one table: status code -> exception class. Codes not listed (UNIMPLEMENTED,
# ABORTED, OUT_OF_RANGE, DATA_LOSS) map to a plain InterlinguaError carrying the code.
EXCEPTION_TABLE: dict[grpc.StatusCode, type[InterlinguaError]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unauthenticated,
        PermissionDenied,
        Unavailable,
        DeadlineExceeded,
        Internal,
        Unknown,
        Cancelled,
    )
}


def from_rpc_error(err: grpc.RpcError) -> InterlinguaError:
    """The typed exception for a failed call; raise it ``from err``."""
    if isinstance(err, grpc.Call):
        code, message = err.code(), err.details() or ""
    else:  # an RpcError that is not a call carries no status
        code, message = grpc.StatusCode.UNKNOWN, str(err)
    cls = EXCEPTION_TABLE.get(code)
    if cls is None:
        return InterlinguaError(message, code=code)
    if cls is ResourceExhausted:
        return ResourceExhausted(message, retry_after=_retry_after(err))
    return cls(message)


def _retry_after(err: grpc.RpcError) -> float | None:
    """The ``retry-after`` trailing metadata of a failed call, in seconds, if any."""
    trailing: Any = err.trailing_metadata() if isinstance(err, grpc.Call) else None
    for key, value in trailing or ():
        if key == "retry-after":
            try:
                return float(value)
            except (TypeError, ValueError):
                return None
    return None
