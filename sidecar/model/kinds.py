"""What differs between the model kinds, in one table: how each loads and is rebuilt on a warm start,
its network, its parity probe and calibration rows, how it turns a request into rows and its outputs
into scores, what Info says of it, and whether it serves embeddings.

Every other module asks ``kind_of(model)`` (or ``KINDS[kind]``) instead of testing the kind itself.
Decoder rerankers are cross-encoders here; which network a cross-encoder needs follows from its
family (``families.py``) and whether its checkpoint is a causal LM.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np

from sidecar.model.batch import EncodedPair
from sidecar.model.families import FAMILIES, family_of
from sidecar.model.loading import (
    BiEncoderModel,
    CrossEncoderModel,
    ModelKind,
    ModelSource,
    Pooling,
    TextModel,
    detect_kind,
    load_bi_encoder,
    load_cross_encoder,
)
from sidecar.model.parity import Probe, bi_encoder_probe, cross_encoder_probe
from sidecar.model.tokenization import PairSpec, PairTokenizer, PromptPairTokenizer, RowEncoder

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from sidecar.model.network import Network

M = TypeVar("M", bound=TextModel)


class KindSpec(ABC, Generic[M]):
    """One model kind's behaviour; ``M`` is the loaded model's class."""

    kind: ClassVar[ModelKind]
    # Whether the model turns single texts into vectors, so it can serve the Embedder.
    embeds: ClassVar[bool]

    @abstractmethod
    def load(self, source: ModelSource, max_length_cap: int = 0, instruction: str = "") -> M:
        """Read the model's config and tokenizer (its weights are the network's)."""

    @abstractmethod
    def rebuild(
        self, fields: dict[str, Any], remembered: dict[str, Any], tokenizer: Tokenizer, instruction: str
    ) -> M:
        """The model as a cold start loaded it, from the fields every kind has, what ``warm_fields``
        remembered, and the cached tokenizer."""

    @abstractmethod
    def warm_fields(self, model: M) -> dict[str, Any]:
        """What a warm start needs to rebuild this kind's own fields."""

    @abstractmethod
    def network(self, model: M) -> Network:
        """The fp32 PyTorch network, on the CPU, in eval mode (imports torch)."""

    @abstractmethod
    def probe(self, model: M, vocab_size: int, max_batch_pairs: int, max_batch_tokens: int) -> Probe:
        """The parity gate's probe, batched as the batcher would."""

    @abstractmethod
    def describe_outputs(self, model: M) -> str:
        """The model's outputs, as the start's log line names them."""

    @abstractmethod
    def calibration_rows(self, model: M, query: str, text: str, spec: PairSpec) -> list[EncodedPair]:
        """The rows one calibration pair gives: the pair itself, or the query and the text apart."""

    def query_encoder(self, model: M, spec: PairSpec) -> RowEncoder | None:
        """What encodes the query into rows of its own, ahead of the documents' rows; None when the
        query only ever goes with a document."""
        return None

    @abstractmethod
    def document_encoder(self, model: M, query: str, spec: PairSpec) -> RowEncoder:
        """What encodes a request's documents into rows."""

    @abstractmethod
    def raw_scores(self, model: M, outputs: np.ndarray) -> np.ndarray:
        """One raw score per document row (float32), from the outputs of every row the encoders gave."""

    @staticmethod
    @abstractmethod
    def normalize(raw: np.ndarray) -> np.ndarray:
        """Raw scores mapped into [0, 1], in fp64."""

    def num_labels(self, model: M) -> int:
        """The classifier's labels, as Info reports them; 0 for a model with no classifier."""
        return 0

    def embedding_model(self, model: M) -> BiEncoderModel | None:
        """The model as the Embedder takes it, or None when it cannot embed."""
        return None


class CrossEncoderKind(KindSpec[CrossEncoderModel]):
    """Reads each (query, chunk) pair and gives its log-odds of relevance."""

    kind = ModelKind.CROSS_ENCODER
    embeds = False

    def load(self, source: ModelSource, max_length_cap: int = 0, instruction: str = "") -> CrossEncoderModel:
        return load_cross_encoder(source, max_length_cap, instruction)

    def rebuild(
        self, fields: dict[str, Any], remembered: dict[str, Any], tokenizer: Tokenizer, instruction: str
    ) -> CrossEncoderModel:
        prompt = next((family.prompt for family in FAMILIES if family.name == fields["family"]), None)
        pair_tokenizer = (
            PairTokenizer(tokenizer)
            if prompt is None
            else PromptPairTokenizer(tokenizer, prompt, instruction)
        )
        answers = remembered["answer_token_ids"]
        return CrossEncoderModel(
            **fields,
            tokenizer=pair_tokenizer,
            num_labels=remembered["num_labels"],
            answer_token_ids=None if answers is None else (answers[0], answers[1]),
        )

    def warm_fields(self, model: CrossEncoderModel) -> dict[str, Any]:
        return {"num_labels": model.num_labels, "answer_token_ids": model.answer_token_ids}

    def network(self, model: CrossEncoderModel) -> Network:
        from sidecar.model.network import causal_lm_network, classifier_network

        if model.answer_token_ids is not None:
            return causal_lm_network(model.source, model.answer_token_ids)
        return classifier_network(model.source, decoder=family_of(model.model_type).prompt is not None)

    def probe(
        self, model: CrossEncoderModel, vocab_size: int, max_batch_pairs: int, max_batch_tokens: int
    ) -> Probe:
        return cross_encoder_probe(
            model, max_batch_pairs, vocab_size=vocab_size, max_batch_tokens=max_batch_tokens
        )

    def describe_outputs(self, model: CrossEncoderModel) -> str:
        return f"{model.num_labels} label(s)"

    def calibration_rows(
        self, model: CrossEncoderModel, query: str, text: str, spec: PairSpec
    ) -> list[EncodedPair]:
        return model.tokenizer.encode(query, [text], spec).pairs

    def document_encoder(self, model: CrossEncoderModel, query: str, spec: PairSpec) -> RowEncoder:
        return RowEncoder(model.tokenizer, spec, query)

    def raw_scores(self, model: CrossEncoderModel, outputs: np.ndarray) -> np.ndarray:
        logits = outputs.astype(np.float32, copy=False)
        # One log-odds per pair: the logit, or positive minus negative for two-label models.
        return logits[:, 0] if model.num_labels == 1 else logits[:, 1] - logits[:, 0]

    @staticmethod
    def normalize(raw: np.ndarray) -> np.ndarray:
        """Sigmoid: the probability of relevance, in fp64 so large logits do not overflow."""
        return 1.0 / (1.0 + np.exp(-raw.astype(np.float64)))

    def num_labels(self, model: CrossEncoderModel) -> int:
        return model.num_labels


class BiEncoderKind(KindSpec[BiEncoderModel]):
    """Embeds the query and each chunk apart; a chunk's score is their cosine."""

    kind = ModelKind.BI_ENCODER
    embeds = True

    def load(self, source: ModelSource, max_length_cap: int = 0, instruction: str = "") -> BiEncoderModel:
        return load_bi_encoder(source, max_length_cap)

    def rebuild(
        self, fields: dict[str, Any], remembered: dict[str, Any], tokenizer: Tokenizer, instruction: str
    ) -> BiEncoderModel:
        pooling = Pooling(mode=remembered["pooling_mode"], normalize=remembered["pooling_normalize"])
        return BiEncoderModel(
            **fields, tokenizer=PairTokenizer(tokenizer), dims=remembered["dims"], pooling=pooling
        )

    def warm_fields(self, model: BiEncoderModel) -> dict[str, Any]:
        return {
            "dims": model.dims,
            "pooling_mode": model.pooling.mode,
            "pooling_normalize": model.pooling.normalize,
        }

    def network(self, model: BiEncoderModel) -> Network:
        from sidecar.model.network import bi_encoder_network

        return bi_encoder_network(model.source, model.pooling)

    def probe(
        self, model: BiEncoderModel, vocab_size: int, max_batch_pairs: int, max_batch_tokens: int
    ) -> Probe:
        return bi_encoder_probe(
            model.tokenizer,
            max_length=model.max_length,
            pad_token_id=model.pad_token_id,
            with_token_type_ids=model.uses_token_type_ids,
            max_batch=max_batch_pairs,
            vocab_size=vocab_size,
            max_batch_tokens=max_batch_tokens,
        )

    def describe_outputs(self, model: BiEncoderModel) -> str:
        return f"{model.dims} dims, {model.pooling.mode} pooling"

    def calibration_rows(
        self, model: BiEncoderModel, query: str, text: str, spec: PairSpec
    ) -> list[EncodedPair]:
        return model.tokenizer.encode_texts([query, text], spec).pairs

    def query_encoder(self, model: BiEncoderModel, spec: PairSpec) -> RowEncoder:
        # The query is never chunked: one row, cut at the request's length.
        return RowEncoder(model.tokenizer, PairSpec(max_length=spec.max_length))

    def document_encoder(self, model: BiEncoderModel, query: str, spec: PairSpec) -> RowEncoder:
        return RowEncoder(model.tokenizer, spec)

    def raw_scores(self, model: BiEncoderModel, outputs: np.ndarray) -> np.ndarray:
        vectors = unit_vectors(outputs)
        return (vectors[1:] @ vectors[0]).astype(np.float32)  # the query's row comes first

    @staticmethod
    def normalize(raw: np.ndarray) -> np.ndarray:
        """Cosine similarity mapped from [-1, 1] to [0, 1]."""
        return (raw.astype(np.float64) + 1.0) / 2.0

    def embedding_model(self, model: BiEncoderModel) -> BiEncoderModel:
        return model


def unit_vectors(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)


KINDS: dict[ModelKind, KindSpec[Any]] = {spec.kind: spec for spec in (CrossEncoderKind(), BiEncoderKind())}


def kind_of(model: TextModel) -> KindSpec[Any]:
    return KINDS[model.kind]


def load_model(
    source: ModelSource, max_length_cap: int = 0, instruction: str = ""
) -> CrossEncoderModel | BiEncoderModel:
    """The model at ``source``, as the kind its files declare (``loading.detect_kind``)."""
    model: CrossEncoderModel | BiEncoderModel = KINDS[detect_kind(source)].load(
        source, max_length_cap, instruction
    )
    return model


def load_network(source: ModelSource, kind: ModelKind) -> Network:
    """The fp32 network of the model at ``source``, read as a model of ``kind`` (imports torch)."""
    spec = KINDS[kind]
    return spec.network(spec.load(source))


def load_model_network(model: CrossEncoderModel | BiEncoderModel) -> Network:
    """The network of a loaded model, with a decoder reranker's last-token head (imports torch)."""
    return kind_of(model).network(model)
