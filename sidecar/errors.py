"""The server's errors, free of any transport: each layer raises these, and each transport maps them to
its own status codes in one table at its edge (``transport/grpc_api/status.py``)."""

from __future__ import annotations


class SidecarError(Exception):
    """An error whose message is fit for the caller: it says what went wrong and what to change."""


class InvalidArgument(SidecarError):
    """The request is malformed or out of range; retrying it unchanged fails again."""


class Overloaded(SidecarError):
    """The queue cannot take the request now; retry with backoff, or send less per request."""


class DeadlineExpired(SidecarError):
    """The caller's deadline passed before its work ran."""


class NotReady(SidecarError):
    """The model is still loading, or the server is draining."""


class EngineFailure(SidecarError):
    """The model raised while running a batch; every request in that batch gets this."""


class ModelLoadError(SidecarError):
    """The model could not be loaded; raised at start-up, not in a call."""
