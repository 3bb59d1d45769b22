"""The OpenAPI document, true to the server: each route's errors in its API's shape (not FastAPI's 422),
and the limits this server was started with, which the static schemas cannot know."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from sidecar.serving.core import ServingCore, ServingState
from sidecar.settings import Settings
from sidecar.transport.http_api.schemas import CohereError, Health

_CALL_ERRORS = {
    400: "The request is malformed or out of range; the message names the field.",
    401: "No bearer token, or the wrong one (--auth-token).",
    413: "The body is over --max-message-bytes.",
    429: "The queue is full; retry after the Retry-After header's seconds.",
    500: "The model failed while running the batch.",
    503: "The models are still loading, or the server is draining.",
    504: "The X-Request-Timeout deadline passed first.",
}


def call_errors(shape: type[BaseModel], *, chooses_model: bool = False) -> dict[int | str, dict[str, Any]]:
    """The error responses of a call route, each in the route's API's error shape; with a 404 for a route
    whose body's ``model`` chooses the served model."""
    errors = {status: {"model": shape, "description": text} for status, text in _CALL_ERRORS.items()}
    if chooses_model:
        errors[404] = {
            "model": shape,
            "description": "`model` names no served model; the message lists them.",
        }
    return dict(sorted(errors.items()))


HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": Health, "description": "The models serve."},
    503: {"model": Health, "description": "The models are loading, or the server is draining."},
}
INFO_ERRORS = {status: call_errors(CohereError)[status] for status in (401, 503, 504)}
METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus' text exposition format.",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


def openapi_document(app: FastAPI, core: ServingCore, settings: Settings) -> dict[str, Any]:
    """FastAPI's document less its 422s, with this server's limits and, once loaded, its models'
    dimensions; kept once the models serve."""
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    for path_item in document["paths"].values():
        for operation in path_item.values():
            operation["responses"].pop("422", None)
    schemas = document["components"]["schemas"]
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    texts = settings.max_documents_per_request
    limits = {
        "CohereRerankV2Request": {"documents": {"maxItems": texts}, "top_n": {"maximum": texts}},
        "CohereRerankV1Request": {
            "documents": {"maxItems": texts},
            "top_n": {"maximum": texts},
            "max_chunks_per_doc": {"maximum": settings.max_chunks_per_doc},
        },
        "TeiRerankRequest": {"texts": {"maxItems": texts}},
        "TeiEmbedRequest": {"inputs": {"maxItems": texts}},
        "OpenAIEmbeddingsRequest": {"input": {"maxItems": texts}},
    }
    if core.models is not None:  # what ``model`` may name: a served model, or nothing for the default
        limits["CohereRerankV2Request"]["model"] = {"enum": ["", *core.models.rerankers]}
        limits["CohereRerankV1Request"]["model"] = {"enum": ["", *core.models.rerankers]}
        if core.models.embedders:
            limits["OpenAIEmbeddingsRequest"]["model"] = {"enum": ["", *core.models.embedders]}
    if core.models is not None and core.embedder is not None:
        # TEI's /embed serves the default embedder; OpenAI's route, whichever `model` names.
        limits["TeiEmbedRequest"]["dimensions"] = {"enum": [core.embedder.model.dims]}
        every_dims = sorted({embedder.model.dims for embedder in core.models.embedders.values()})
        limits["OpenAIEmbeddingsRequest"]["dimensions"] = {"enum": every_dims}
        if core.embedder.model.pooling.normalize:  # its own Normalize module: only normalized vectors
            limits["TeiEmbedRequest"]["normalize"] = {"enum": [True]}
    for name, fields in limits.items():
        if name not in schemas:
            continue
        for field, constraints in fields.items():
            _constrain(schemas[name]["properties"][field], constraints)
    if settings.auth_token:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path_item in document["paths"].values():
            for operation in path_item.values():
                if "401" in operation["responses"]:
                    operation["security"] = [{"bearer": []}]
    if core.state is ServingState.SERVING:
        app.openapi_schema = document
    return document


def _constrain(schema: dict[str, Any], constraints: dict[str, Any]) -> None:
    """Add each constraint to the member of the field's schema (or of its anyOf) of the type it fits."""
    for member in schema.get("anyOf", [schema]):
        for keyword, value in constraints.items():
            if member.get("type") == _fitting_type(keyword, value):
                member[keyword] = value


def _fitting_type(keyword: str, value: Any) -> str:
    if keyword == "maxItems":
        return "array"
    if keyword == "enum" and isinstance(value[0], str):
        return "string"
    if keyword == "enum":
        return "boolean" if isinstance(value[0], bool) else "integer"
    return "integer"
