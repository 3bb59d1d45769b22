"""The one table from the server's errors to gRPC status codes."""

from __future__ import annotations

import grpc

from sidecar.errors import (
    DeadlineExpired,
    EngineFailure,
    InvalidArgument,
    ModelLoadError,
    ModelNotServed,
    NonFiniteOutput,
    NotReady,
    Overloaded,
    RequestTooLarge,
    ServingError,
    TokenizationFailure,
    Unauthenticated,
    nearest_mapped,
)

STATUS_OF_ERROR: dict[type[ServingError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotServed: grpc.StatusCode.INVALID_ARGUMENT,
    RequestTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    EngineFailure: grpc.StatusCode.INTERNAL,
    TokenizationFailure: grpc.StatusCode.INTERNAL,
    NonFiniteOutput: grpc.StatusCode.INTERNAL,
    ModelLoadError: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(error: ServingError) -> grpc.StatusCode:
    """The status of the nearest mapped class in the error's ancestry; INTERNAL for one unmapped."""
    return nearest_mapped(error, STATUS_OF_ERROR, grpc.StatusCode.INTERNAL)
