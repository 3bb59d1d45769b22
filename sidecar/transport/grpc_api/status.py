"""The one table from the server's errors to gRPC status codes."""

from __future__ import annotations

import grpc

from sidecar.errors import (
    DeadlineExpired,
    EngineFailure,
    InvalidArgument,
    ModelLoadError,
    NotReady,
    Overloaded,
    SidecarError,
)

STATUS_OF_ERROR: dict[type[SidecarError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    EngineFailure: grpc.StatusCode.INTERNAL,
    ModelLoadError: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(error: SidecarError) -> grpc.StatusCode:
    """The status of the nearest mapped class in the error's ancestry; INTERNAL for one unmapped."""
    for cls in type(error).__mro__:
        if cls in STATUS_OF_ERROR:
            return STATUS_OF_ERROR[cls]
    return grpc.StatusCode.INTERNAL
