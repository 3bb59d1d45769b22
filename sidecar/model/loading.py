"""Finding a model's files and reading what the server needs to know about it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from sidecar.errors import ModelLoadError
from sidecar.model.tokenization import PairTokenizer

logger = logging.getLogger(__name__)

# These position embeddings start after the padding index, so two positions are unusable.
_POSITION_OFFSET_MODEL_TYPES = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert"}
_UNBOUNDED_TOKENIZER_LENGTH = 100_000


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files come from: a local directory, or a Hugging Face id and revision."""

    name: str
    revision: str = ""

    @property
    def is_local(self) -> bool:
        return Path(self.name).is_dir()

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        return {"revision": self.revision} if self.revision and not self.is_local else {}


@dataclass(frozen=True)
class CrossEncoderModel:
    """A loaded cross-encoder's metadata and tokenizer; an engine holds the weights."""

    source: ModelSource
    model_type: str
    num_labels: int
    max_length: int
    pad_token_id: int
    uses_token_type_ids: bool
    tokenizer: PairTokenizer
    revision: str

    kind: ClassVar[str] = "cross-encoder"


def load_failure(source: ModelSource, what: str, exc: Exception) -> ModelLoadError:
    if source.is_local:
        return ModelLoadError(f"Could not load the {what} of the model in directory {source.name}: {exc}")
    return ModelLoadError(
        f"Could not load the {what} of model {source.name!r}: it is not a local directory, and it could "
        f"not be fetched from the Hugging Face Hub ({type(exc).__name__}: {exc}). Where the Hub is "
        "unreachable, download the model on a machine that can reach it "
        f"(`hf download {source.name} --local-dir DIR`) and start with `--model DIR`."
    )


def load_cross_encoder(source: ModelSource, max_length_cap: int = 0) -> CrossEncoderModel:
    """Read the config and tokenizer of a sequence-classification model with one or two labels."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source.name, **source.from_pretrained_kwargs())
    except Exception as exc:  # transformers raises OSError, ValueError or hub errors
        raise load_failure(source, "config", exc) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.name, **source.from_pretrained_kwargs())
    except Exception as exc:
        raise load_failure(source, "tokenizer", exc) from exc

    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(
            f"Model {source.name!r} has no fast (Rust) tokenizer; the sidecar needs one (a tokenizer.json)."
        )
    if config.num_labels not in (1, 2):
        raise ModelLoadError(
            f"Model {source.name!r} has {config.num_labels} labels; a reranker needs 1 (a relevance logit) "
            "or 2 (not relevant, relevant)."
        )
    if tokenizer.pad_token_id is None:
        raise ModelLoadError(f"The tokenizer of {source.name!r} defines no padding token.")

    limit = _model_max_length(config, tokenizer.model_max_length)
    if max_length_cap:
        limit = min(limit, max_length_cap)
    pair_tokenizer = PairTokenizer(tokenizer.backend_tokenizer)
    if limit < pair_tokenizer.min_max_length():
        raise ModelLoadError(f"max length {limit} leaves no room for a query and a document")

    return CrossEncoderModel(
        source=source,
        model_type=config.model_type,
        num_labels=config.num_labels,
        max_length=limit,
        pad_token_id=int(tokenizer.pad_token_id),
        uses_token_type_ids="token_type_ids" in tokenizer.model_input_names,
        tokenizer=pair_tokenizer,
        revision=source.revision or getattr(config, "_commit_hash", None) or "",
    )


def _model_max_length(config: Any, tokenizer_max_length: int) -> int:
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and config.model_type in _POSITION_OFFSET_MODEL_TYPES:
        positions -= 2
    candidates = [int(tokenizer_max_length)] if tokenizer_max_length < _UNBOUNDED_TOKENIZER_LENGTH else []
    if positions is not None:
        candidates.append(int(positions))
    if not candidates:
        raise ModelLoadError("neither the tokenizer nor the config gives a maximum sequence length")
    return min(candidates)
