"""Request and response bodies, field by field as their reference APIs define them: Cohere's Rerank (v1
and v2), text-embeddings-inference's /rerank and /embed, and OpenAI's /v1/embeddings.

Fields the sidecar has no use for (Cohere's ``rank_fields``, OpenAI's ``user``) are accepted and ignored,
so existing clients send what they always send.
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _valid_unicode(text: str) -> str:
    """JSON can escape a lone UTF-16 surrogate (``\\ud800``), which is no Unicode character: refuse it
    here, naming the field, rather than fail in the tokenizer."""
    try:
        text.encode()
    except UnicodeEncodeError as error:
        raise ValueError(
            f"character {error.start} is a lone UTF-16 surrogate (\\u{ord(text[error.start]):04x}); "
            "send valid Unicode text"
        ) from None
    return text


# A text the models read.
Text = Annotated[str, AfterValidator(_valid_unicode)]


class CohereRerankV2Request(BaseModel):
    model: str = Field(
        "", description="Accepted and ignored: the sidecar serves one model, named in the answer."
    )
    query: Text
    documents: list[Text] = Field(min_length=1, description="The texts to rank.")
    top_n: int | None = Field(None, ge=1, description="Return only the best N; all when unset.")
    max_tokens_per_doc: int | None = Field(
        None,
        ge=1,
        description="Caps each (query, document) pair at this many tokens, below the model's own limit.",
    )


class CohereDocument(BaseModel):
    model_config = ConfigDict(extra="allow")

    text: Text


class CohereRerankV1Request(BaseModel):
    model: str = Field(
        "", description="Accepted and ignored: the sidecar serves one model, named in the answer."
    )
    query: Text
    documents: list[Text | CohereDocument] = Field(
        min_length=1, description="The texts to rank, as strings or as objects with a `text` field."
    )
    top_n: int | None = Field(None, ge=1, description="Return only the best N; all when unset.")
    return_documents: bool = Field(False, description="Echo each document's text in its result.")


class CohereDocumentText(BaseModel):
    text: str


class CohereRerankResult(BaseModel):
    index: int
    relevance_score: float = Field(description="The gRPC Rerank score: normalized to [0, 1].")
    document: CohereDocumentText | None = None


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
    model: str = Field(description="The served model's id.")


class TruncationDirection(enum.StrEnum):
    RIGHT = "Right"  # keep the start of the text
    LEFT = "Left"  # keep the end of the text


class TeiRerankRequest(BaseModel):
    query: Text
    texts: list[Text] = Field(min_length=1)
    raw_scores: bool = Field(False, description="The log-odds (the gRPC raw_scores) instead of [0, 1].")
    return_text: bool = False
    truncate: bool | None = Field(
        None,
        description="Accepted; inputs past the model's limit are always truncated (TEI's --auto-truncate).",
    )
    truncation_direction: TruncationDirection = TruncationDirection.RIGHT


class TeiRank(BaseModel):
    index: int
    score: float
    text: str | None = None


class TeiEmbedRequest(BaseModel):
    inputs: Text | list[Text]
    normalize: bool = Field(
        True, description="Scale vectors to unit length; false returns the model's own pooling output."
    )
    truncate: bool | None = Field(
        None,
        description="Accepted; inputs past the model's limit are always truncated (TEI's --auto-truncate).",
    )
    truncation_direction: TruncationDirection = TruncationDirection.RIGHT


class OpenAIEmbeddingsRequest(BaseModel):
    input: Text | list[Text] = Field(description="A text or a list of texts (token arrays are not accepted).")
    model: str = Field(
        "", description="Accepted and ignored: the sidecar serves one model, named in the answer."
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="Must be the model's dimensions when set.")


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
