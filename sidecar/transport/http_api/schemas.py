"""Request and response bodies, field by field as their reference APIs define them: Cohere's Rerank (v1
and v2), text-embeddings-inference's /rerank and /embed, and OpenAI's /v1/embeddings.

Every field an API defines is honoured or refused with a 400 naming it; only OpenAI's ``user`` (an id for
OpenAI's abuse monitoring) and Cohere's ``priority`` (an order under load) are accepted and unused.
``model`` chooses among the served models by name (404 for one not served); TEI's routes, which carry
none, use the default.
Types are strict, as each API's JSON is: ``true`` is no count, ``0`` no boolean.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool


def _valid_unicode(value: object) -> object:
    """JSON can escape a lone UTF-16 surrogate (``\\ud800``), which is no Unicode character: refuse it
    here, naming the field, rather than fail in the tokenizer."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError as error:
            raise ValueError(
                f"character {error.start} is a lone UTF-16 surrogate (\\u{ord(value[error.start]):04x}); "
                "send valid Unicode text"
            ) from None
    return value


def _json_numeric(kind: str) -> Callable[[object], object]:
    """A check that a value is JSON's number, never a boolean or a string; pydantic then makes it the
    field's ``kind`` (an integer takes 4.0 too)."""

    def check(value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be {kind}, not {type(value).__name__} {value!r}")
        return value

    return check


_json_integer = _json_numeric("an integer")
_json_number = _json_numeric("a number")


# A count, at least 1: JSON Schema's integer.
Count = Annotated[int, Field(ge=1), BeforeValidator(_json_integer)]
# A text the models read.
Text = Annotated[str, BeforeValidator(_valid_unicode)]
# A query: a text with something in it besides whitespace.
Query = Annotated[str, Field(pattern=r"\S"), BeforeValidator(_valid_unicode)]
# OpenAI refuses an empty input.
NonEmptyText = Annotated[str, Field(min_length=1), BeforeValidator(_valid_unicode)]

_MODEL_DESCRIPTION = (
    "The served model to use, by its name (/info lists them under models); empty or unset uses the "
    "default. A name not served is a 404."
)


class Request(BaseModel):
    model_config = ConfigDict(regex_engine="python-re")


class RelevantSpans(BaseModel):
    mode: Literal["disabled"] = Field(description='Only "disabled": this server finds no relevant spans.')
    threshold: Annotated[float, BeforeValidator(_json_number)] | None = None
    max_spans: Count | None = None


class CohereRerankV2Request(Request):
    model: str = Field("", description=_MODEL_DESCRIPTION)
    query: Query
    documents: list[Text] = Field(min_length=1, description="The texts to rank.")
    top_n: Count | None = Field(None, description="Return only the best N; all when unset.")
    max_tokens_per_doc: Count | None = Field(
        None,
        description="Caps each (query, document) pair at this many tokens, below the model's own limit; "
        "a long query is cut so that each document keeps at least one token.",
    )
    return_documents: StrictBool = Field(False, description="Echo each document's text in its result.")
    priority: Annotated[int, Field(ge=0), BeforeValidator(_json_integer)] | None = Field(
        None, description="Accepted and unused: requests are served in the order they arrive."
    )
    relevant_spans: RelevantSpans | None = Field(
        None, description='Only `{"mode": "disabled"}`: this server finds no relevant spans.'
    )


class CohereDocument(BaseModel):
    """A document as an object: its `text`, and other fields that `rank_fields` may name; as a result's
    `document`, what the caller sent."""

    model_config = ConfigDict(extra="allow")

    text: Text


class CohereRerankV1Request(Request):
    model: str = Field("", description=_MODEL_DESCRIPTION)
    query: Query
    documents: list[Text | CohereDocument] = Field(
        min_length=1,
        description="The texts to rank, as strings or as objects with a `text` field; an object's other "
        "fields are kept, for `rank_fields` and in the results.",
    )
    top_n: Count | None = Field(None, description="Return only the best N; all when unset.")
    return_documents: StrictBool = Field(
        False, description="Echo each document in its result, as it was sent (a string as its `text`)."
    )
    rank_fields: list[str] | None = Field(
        None,
        min_length=1,
        description="The fields of each document object that are ranked, in this order, as "
        "`field: value` lines; a field a document lacks is left out. A string document's field is `text`.",
    )
    max_chunks_per_doc: Count | None = Field(
        None,
        description="Split a long document into up to this many chunks, scored by its best; unset: "
        "truncated to the model's limit.",
    )


class CohereRerankResult(BaseModel):
    index: int
    relevance_score: float = Field(description="The gRPC Rerank score: normalized to [0, 1].")
    document: CohereDocument | None = None


class CohereApiVersion(BaseModel):
    version: str


class CohereBilledUnits(BaseModel):
    search_units: int


class CohereMeta(BaseModel):
    api_version: CohereApiVersion
    billed_units: CohereBilledUnits


class CohereRerankResponse(BaseModel):
    id: str
    results: list[CohereRerankResult]
    meta: CohereMeta
    model: str = Field(description="The served model's id, or its directory's name.")


class TruncationDirection(enum.StrEnum):
    # text-embeddings-inference reads both spellings.
    RIGHT = "Right"  # keep the start of the text
    LEFT = "Left"  # keep the end of the text
    RIGHT_LOWER = "right"
    LEFT_LOWER = "left"


_TRUNCATE_DESCRIPTION = (
    "Unset or true: inputs past the model's limit are truncated (TEI's --auto-truncate); false: they are "
    "refused with a 400."
)


class TeiRerankRequest(Request):
    query: Query
    texts: list[Text] = Field(min_length=1)
    raw_scores: StrictBool = Field(False, description="The log-odds (the gRPC raw_scores) instead of [0, 1].")
    return_text: StrictBool = False
    truncate: StrictBool | None = Field(None, description=_TRUNCATE_DESCRIPTION)
    truncation_direction: TruncationDirection = TruncationDirection.RIGHT


class TeiRank(BaseModel):
    index: int
    score: float
    text: str | None = None


class TeiEmbedRequest(Request):
    inputs: Text | Annotated[list[Text], Field(min_length=1)]
    normalize: StrictBool = Field(
        True,
        description="Scale vectors to unit length. False returns the model's own pooling output, and is "
        "refused for a model that normalizes in the model itself (Info: normalized).",
    )
    truncate: StrictBool | None = Field(None, description=_TRUNCATE_DESCRIPTION)
    truncation_direction: TruncationDirection = TruncationDirection.RIGHT
    prompt_name: None = Field(
        None, description="Refused when set: the sidecar applies no sentence-transformers prompts."
    )
    dimensions: Count | None = Field(None, description="Must be the model's dimensions when set.")


class OpenAIEmbeddingsRequest(Request):
    input: NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1)] = Field(
        description="A text or a list of texts, none empty (token arrays are not accepted)."
    )
    model: str = Field("", description=_MODEL_DESCRIPTION)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Count | None = Field(None, description="Must be the model's dimensions when set.")
    user: str | None = Field(None, description="Accepted and unused.")


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="Floats, or little-endian float32 bytes in base64.")


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class CohereError(BaseModel):
    message: str


class TeiError(BaseModel):
    error: str
    error_type: str


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


class Health(BaseModel):
    status: Literal["loading", "serving", "draining", "stopped"]
