"""The server's errors, free of any transport: each layer raises these, and each transport maps them to
its own status codes in one table at its edge (gRPC's in ``transport/grpc_api/status.py``, HTTP's in
``transport/http_api/status.py``)."""

from __future__ import annotations

from typing import TypeVar

Code = TypeVar("Code")


class ServingError(Exception):
    """An error whose message is fit for the caller: it says what went wrong and what to change."""


class InvalidArgument(ServingError):
    """The request is malformed or out of range; retrying it unchanged fails again. ``field`` names the
    field at fault, as the caller sent it, where one is (OpenAI's error ``param``)."""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class ModelNotServed(InvalidArgument):
    """The request's ``model`` names no model this server serves; the message lists those it does."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="model")


class RequestTooLarge(InvalidArgument):
    """The request, or the answer it asks for, is larger than the server sends or accepts
    (--max-message-bytes)."""


class Unauthenticated(ServingError):
    """The caller sent no bearer token, or the wrong one (--auth-token)."""


class Overloaded(ServingError):
    """The queue cannot take the request now; retry with backoff, or send less per request."""


class DeadlineExpired(ServingError):
    """The caller's deadline passed before its work ran."""


class NotReady(ServingError):
    """The model is still loading, or the server is draining."""


class EngineFailure(ServingError):
    """The model raised while running a batch; every request in that batch gets this."""


class NonFiniteOutput(EngineFailure):
    """The engine gave a NaN or infinite output for some of a request's rows; it is never served.

    Only that request fails: the engine stays in service, since the fault is tied to the input (a
    damaged weight row that only some tokens read, an overflow at one length), and taking the engine
    out would fail or slow every other caller. Damaged cached artifacts are caught before serving by
    their checksums and the parity gate; what still gets through is counted in
    ``rerank_non_finite_requests`` and logged with the model and engine.
    """

    def __init__(self, rows: int, of_rows: int) -> None:
        super().__init__(
            f"the model gave a non-finite output (NaN or infinity) for {rows} of this request's {of_rows} "
            "rows, which the server never returns as a score; the server log names the model and engine"
        )
        self.rows = rows


class TokenizationFailure(ServingError):
    """Tokenization failed for a reason other than the request's input: a tokenizer process died on it,
    and again on the retry."""


class ModelLoadError(ServingError):
    """The model could not be loaded; raised at start-up, not in a call."""


def nearest_mapped(error: ServingError, table: dict[type[ServingError], Code], default: Code) -> Code:
    """The code of the nearest class in the error's ancestry that ``table`` maps; ``default`` if none."""
    for cls in type(error).__mro__:
        if cls in table:
            return table[cls]
    return default
