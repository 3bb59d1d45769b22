"""One error base class for the whole server; each error carries the gRPC status it maps to.

Layers raise these; the transport's interceptor turns them into a status in one place.
"""

from __future__ import annotations

import grpc


class SidecarError(Exception):
    """An error whose message is fit for the caller; ``code`` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(SidecarError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Overloaded(SidecarError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExpired(SidecarError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotReady(SidecarError):
    """The model is still loading, or the server is draining."""

    code = grpc.StatusCode.UNAVAILABLE


class EngineFailure(SidecarError):
    """The model raised while running a batch; every request in that batch gets this."""

    code = grpc.StatusCode.INTERNAL


class ModelLoadError(SidecarError):
    """The model could not be loaded; raised at start-up, not in a call."""

    code = grpc.StatusCode.FAILED_PRECONDITION
