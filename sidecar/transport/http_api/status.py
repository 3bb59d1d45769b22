"""The one table from the server's errors to HTTP statuses, and the error body each API's clients expect."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from sidecar.errors import (
    DeadlineExpired,
    EngineFailure,
    InvalidArgument,
    ModelLoadError,
    ModelNotServed,
    NotReady,
    Overloaded,
    RequestTooLarge,
    ServingError,
    TokenizationFailure,
    Unauthenticated,
    nearest_mapped,
)

STATUS_OF_ERROR: dict[type[ServingError], int] = {
    InvalidArgument: 400,
    Unauthenticated: 401,
    ModelNotServed: 404,  # as Cohere's and OpenAI's APIs answer an unknown model
    RequestTooLarge: 413,
    Overloaded: 429,
    EngineFailure: 500,
    TokenizationFailure: 500,
    NotReady: 503,
    ModelLoadError: 503,
    DeadlineExpired: 504,
}

# A full queue drains in about a batch's time; the caller should back off, then retry.
RETRY_AFTER_S = 1


def status_of(error: ServingError) -> int:
    """The status of the nearest mapped class in the error's ancestry; 500 for one unmapped."""
    return nearest_mapped(error, STATUS_OF_ERROR, 500)


class ErrorShape(enum.Enum):
    """How each API's clients read an error: the body its reference server sends."""

    COHERE = "cohere"  # {"message": ...}, and this server's own routes
    TEI = "tei"  # {"error": ..., "error_type": ...}
    OPENAI = "openai"  # {"error": {"message", "type", "param", "code"}}


_SHAPE_OF_PATH = {"/rerank": ErrorShape.TEI, "/embed": ErrorShape.TEI, "/v1/embeddings": ErrorShape.OPENAI}
_TEI_ERROR_TYPE = {401: "Unauthorized", 429: "Overloaded", 503: "Unhealthy"}


def error_body(path: str, status: int, message: str, field: str = "") -> dict[str, Any]:
    shape = _SHAPE_OF_PATH.get(path, ErrorShape.COHERE)
    if shape is ErrorShape.TEI:
        error_type = _TEI_ERROR_TYPE.get(status, "Validation" if status < 500 else "Backend")
        return {"error": message, "error_type": error_type}
    if shape is ErrorShape.OPENAI:
        error_type = "invalid_request_error" if status < 500 else "server_error"
        code = "model_not_found" if status == 404 and field == "model" else None
        return {"error": {"message": message, "type": error_type, "param": field or None, "code": code}}
    return {"message": message}


def error_response(path: str, error: ServingError) -> JSONResponse:
    """The response for ``error`` on the route at ``path``, in that API's error shape."""
    status = status_of(error)
    headers = {}
    if status == 429:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    field = error.field if isinstance(error, InvalidArgument) else ""
    message = str(error)
    if isinstance(error, DeadlineExpired) and "X-Request-Timeout" not in message:
        # Over HTTP the only deadline is the caller's header, whichever timer noticed it first.
        message = f"{message} (X-Request-Timeout)"
    return JSONResponse(error_body(path, status, message, field), status_code=status, headers=headers)


def http_error_response(path: str, method: str, error: HTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, a method the route lacks, a body that does not parse),
    in the route's error shape, saying what is wrong."""
    cause = error.__cause__
    if isinstance(cause, UnicodeDecodeError):
        byte = cause.object[cause.start]
        message = f"the body is not valid UTF-8: byte {cause.start} ({byte:#04x}) {cause.reason}"
    elif isinstance(cause, RecursionError):
        message = "the body's JSON nests too deeply to parse; send flat objects and lists"
    elif error.status_code == 404:
        message = f"no route {path}; the API's routes are listed in /openapi.json"
    elif error.status_code == 405:
        allowed = (error.headers or {}).get("Allow", "")
        message = f"{method} is not allowed on {path}; use {allowed or 'another method'}"
    else:
        message = str(error.detail)
    return JSONResponse(
        error_body(path, error.status_code, message), status_code=error.status_code, headers=error.headers
    )


def internal_error_response(path: str, request_id: str) -> JSONResponse:
    message = f"internal error; the server log has the details under request id {request_id}"
    return JSONResponse(error_body(path, 500, message), status_code=500)


def describe_validation_errors(errors: Sequence[Any]) -> InvalidArgument:
    """One error naming each field the request got wrong, from pydantic's error list."""
    located = [(field_path(error["loc"]), error) for error in errors]
    # A value that fits no member of a union gets an error per member; where one member got further
    # (a string that is no valid text, an object without its field), that one is the caller's mistake.
    detailed = {location for location, error in located if not error["type"].endswith("_type")}
    errors = [
        error
        for location, error in located
        if not error["type"].endswith("_type") or not any(_within(other, location) for other in detailed)
    ]
    parts = []
    for error in errors[:5]:
        location = field_path(error["loc"])
        if error["type"] == "json_invalid":
            reason = error.get("ctx", {}).get("error", error["msg"])
            position = error["loc"][-1]
            parts.append(f"the body is not valid JSON: {reason} at character {position}")
        elif not location:
            parts.append("the body must be a JSON object (sent as Content-Type: application/json)")
        elif error["type"] == "value_error":
            parts.append(f"{location}: {error['ctx']['error']}")
        elif error["type"] == "string_pattern_mismatch":  # the one pattern: a query not blank
            parts.append(f"{location} is empty; send a text with more than whitespace")
        elif error["type"] == "none_required":
            parts.append(f"{location}: not supported here; leave it unset")
        else:
            parts.append(f"{location}: {error['msg']}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    first = field_path(errors[0]["loc"]) if errors and errors[0]["type"] != "json_invalid" else ""
    return InvalidArgument("invalid request: " + "; ".join(parts) + more, field=first)


def field_path(location: Sequence[str | int]) -> str:
    """A field as the caller wrote it, from pydantic's location: ``documents[2].text``. A union's
    member names (``list[str]``, ``CohereDocument``) are pydantic's, not the caller's, and are left out."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "body" and not _is_type_name(part):
            path += f".{part}" if path else part
    return path


def _within(path: str, location: str) -> bool:
    return path == location or path.startswith((f"{location}.", f"{location}["))


def _is_type_name(part: str) -> bool:
    return "[" in part or part[:1].isupper() or part in _TYPE_NAMES


_TYPE_NAMES = frozenset({"str", "int", "bool", "float", "function-after"})
