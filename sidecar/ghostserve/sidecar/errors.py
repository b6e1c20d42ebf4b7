"""Domain errors of the sidecar. Each names the gRPC status it becomes (see `service.status_of`), so the
pure modules (ledger, parity store, pools) stay free of gRPC while nothing reaches a client as UNKNOWN."""

from __future__ import annotations


class SidecarError(Exception):
    """Base of every error the sidecar reports to a client; `code` is a grpc.StatusCode name, given by
    each subclass as a class keyword (`class NotFound(SidecarError, code="NOT_FOUND")`)."""

    code = "INTERNAL"

    def __init_subclass__(cls, *, code: str | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:  # a subclass of a subclass keeps its parent's code unless it names one
            cls.code = code


class InvalidArgument(SidecarError, code="INVALID_ARGUMENT"):
    """The request is malformed: sizes, ranges, ids or a mismatch with what the group already holds."""


class NotFound(SidecarError, code="NOT_FOUND"):
    """Unknown group, request or rank."""


class AlreadyExists(SidecarError, code="ALREADY_EXISTS"):
    """The thing to create exists with different settings."""


class FailedPrecondition(SidecarError, code="FAILED_PRECONDITION"):
    """The request is well formed but the state does not allow it now (e.g. a pool is invalid)."""


class ResourceExhausted(SidecarError, code="RESOURCE_EXHAUSTED"):
    """The parity budget is full and nothing can be evicted, or a pool cannot be allocated."""


class DataLoss(SidecarError, code="DATA_LOSS"):
    """Rebuilt bytes do not match the checksum recorded at encode time."""


class Unavailable(SidecarError, code="UNAVAILABLE"):
    """The sidecar is shutting down."""


class PermissionDenied(SidecarError, code="PERMISSION_DENIED"):
    """The caller's identity may not do this (not the group's owner, not the operator)."""


class Aborted(SidecarError, code="ABORTED"):
    """A concurrent change (a rank marked lost again) invalidated the operation; call it again."""
