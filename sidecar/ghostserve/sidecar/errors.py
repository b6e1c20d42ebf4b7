"""Domain errors of the sidecar. Each names the gRPC status it becomes (see `service.status_of`), so the
pure modules (ledger, parity store, pools) stay free of gRPC while nothing reaches a client as UNKNOWN."""

from __future__ import annotations


class SidecarError(Exception):
    """Base of every error the sidecar reports to a client; `code` is a grpc.StatusCode name."""

    code = "INTERNAL"


class InvalidArgument(SidecarError):
    """The request is malformed: sizes, ranges, ids or a mismatch with what the group already holds."""

    code = "INVALID_ARGUMENT"


class NotFound(SidecarError):
    """Unknown group, request or rank."""

    code = "NOT_FOUND"


class AlreadyExists(SidecarError):
    """The thing to create exists with different settings."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(SidecarError):
    """The request is well formed but the state does not allow it now (e.g. a pool is invalid)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(SidecarError):
    """The parity budget is full and nothing can be evicted, or a pool cannot be allocated."""

    code = "RESOURCE_EXHAUSTED"


class DataLoss(SidecarError):
    """Rebuilt bytes do not match the checksum recorded at encode time."""

    code = "DATA_LOSS"


class Unavailable(SidecarError):
    """The sidecar is shutting down."""

    code = "UNAVAILABLE"


class PermissionDenied(SidecarError):
    """The caller's identity may not do this (not the group's owner, not the operator)."""

    code = "PERMISSION_DENIED"


class Aborted(SidecarError):
    """A concurrent change (a rank marked lost again) invalidated the operation; call it again."""

    code = "ABORTED"
