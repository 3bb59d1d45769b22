"""Pair tokenization with explicit truncation and chunking, safe to call from several threads.

We own a private copy of the model's Rust tokenizer with truncation and padding switched off, and
only ever call ``encode``/``post_process`` on it. Mutating a shared fast tokenizer per call (as
``tokenizer(..., truncation=...)`` does) races between threads and fails with "Already borrowed".
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Encoding, Tokenizer

from sidecar.errors import InvalidArgument
from sidecar.model.batch import EncodedPair


class Truncation(enum.Enum):
    RIGHT = "right"  # keep the start of the document
    LEFT = "left"  # keep the end of the document


@dataclass(frozen=True, slots=True)
class PairSpec:
    """How to turn one query and its documents into model inputs."""

    max_length: int
    truncation: Truncation = Truncation.RIGHT
    chunk: bool = False
    max_chunks_per_doc: int = 1
    chunk_overlap: int = 0
    # A decoder reranker's instruction for this request; empty uses the tokenizer's.
    instruction: str = ""


@dataclass(frozen=True, slots=True)
class EncodedDocuments:
    """A request's documents as model rows (pairs with the query, or single texts), and which document
    each row (chunk) belongs to."""

    pairs: list[EncodedPair]
    document_of_pair: list[int]

    @property
    def tokens(self) -> int:
        return sum(len(pair) for pair in self.pairs)


class PairTokenizer:
    # What a decoder reranker is told when a request brings no instruction; empty: the model reads none.
    instruction: str = ""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.special_tokens_per_pair = self._tokenizer.num_special_tokens_to_add(is_pair=True)

    def serialized(self) -> str:
        """The Rust tokenizer as tokenizer.json text, from which a warm start rebuilds it without
        transformers (``Tokenizer.from_str``)."""
        return self._tokenizer.to_str()

    def token_id(self, token: str) -> int | None:
        """The id of ``token`` when the tokenizer encodes it as exactly that one token."""
        ids = self._tokenizer.encode(token, add_special_tokens=False).ids
        return ids[0] if len(ids) == 1 and self._tokenizer.id_to_token(ids[0]) == token else None

    def min_max_length(self) -> int:
        """The smallest max_length that leaves room for one query token and one document token."""
        return self.special_tokens_per_pair + 2

    def encode(self, query: str, documents: Sequence[str], spec: PairSpec) -> EncodedDocuments:
        """(query, document) pairs for a cross-encoder; a long document is truncated or chunked."""
        query_encoding = self._tokenizer.encode(query, add_special_tokens=False)
        # A long query keeps at most half the budget, so documents always get the other half.
        query_budget = spec.max_length // 2
        if len(query_encoding.ids) > query_budget:
            query_encoding.truncate(query_budget, direction="right")
        document_budget = spec.max_length - self.special_tokens_per_pair - len(query_encoding.ids)
        return self._encode_documents(documents, document_budget, spec, query_encoding)

    def encode_texts(self, texts: Sequence[str], spec: PairSpec) -> EncodedDocuments:
        """Single texts for a bi-encoder, each truncated or chunked to ``spec.max_length``."""
        budget = spec.max_length - self._tokenizer.num_special_tokens_to_add(is_pair=False)
        return self._encode_documents(texts, budget, spec, query=None)

    def _encode_documents(
        self, documents: Sequence[str], budget: int, spec: PairSpec, query: Encoding | None
    ) -> EncodedDocuments:
        if spec.chunk and spec.chunk_overlap >= budget:
            raise InvalidArgument(
                f"chunk_overlap {spec.chunk_overlap} must be smaller than the chunk length: "
                f"{budget} document tokens fit in max_length {spec.max_length}"
            )
        pairs: list[EncodedPair] = []
        document_of_pair: list[int] = []
        for index, document in enumerate(self._tokenizer.encode_batch(documents, add_special_tokens=False)):
            for piece in self._pieces(document, budget, spec):
                if query is None:
                    merged = self._tokenizer.post_process(piece, add_special_tokens=True)
                else:
                    merged = self._tokenizer.post_process(query, piece, add_special_tokens=True)
                pairs.append(EncodedPair(merged.ids, merged.type_ids))
                document_of_pair.append(index)
        return EncodedDocuments(pairs, document_of_pair)

    @staticmethod
    def _pieces(document: Encoding, budget: int, spec: PairSpec) -> list[Encoding]:
        if not spec.chunk:
            document.truncate(budget, direction=spec.truncation.value)
            return [document]
        document.truncate(budget, stride=spec.chunk_overlap, direction="right")
        return [document, *document.overflowing][: spec.max_chunks_per_doc]


@dataclass(frozen=True, slots=True)
class PromptFormat:
    """How a decoder LLM reranker reads a (query, document) pair: a prompt around an instruction, the
    query and the document, after which the model answers ``yes`` (or ``no``).

    The pair is ``prefix``, ``query`` (with ``{query}``), ``separator``, ``document`` and the document's
    text, then ``suffix``. Each piece of a tuple is tokenized alone, as the model card does; any piece
    may hold ``{instruction}``. ``query`` and ``document`` end where the pre-tokenizer splits anyway
    (after a newline; before the space the document's first word carries), so tokenizing them apart
    gives the tokens a card that tokenizes them together gets.
    """

    prefix: tuple[str, ...]
    query: str
    separator: tuple[str, ...]
    document: str
    suffix: tuple[str, ...]
    default_instruction: str
    yes: str
    # None: the score is the "yes" logit alone, not yes against no.
    no: str | None
    # The longest prompt the model card scores with; the model's own position limit may be far longer.
    max_length: int


class PromptPairTokenizer(PairTokenizer):
    """Pairs for a decoder reranker, the prompt's pieces around the query and the document, with no
    special tokens but the prompt's own.

    Truncation and chunking apply to the document's tokens only; every chunk keeps the whole prompt.
    """

    def __init__(self, tokenizer: Tokenizer, prompt: PromptFormat, instruction: str) -> None:
        super().__init__(tokenizer)
        self.prompt = prompt
        self.instruction = instruction or prompt.default_instruction
        # The document's lead ends before the space its first word carries.
        self._lead_chars = len(prompt.document.rstrip())

    def _ids(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def _pieces_ids(self, pieces: tuple[str, ...], instruction: str) -> list[int]:
        return [token for piece in pieces for token in self._ids(piece.format(instruction=instruction))]

    def _head(self, query: str, instruction: str) -> list[int]:
        """The tokens before the document's lead."""
        prompt = self.prompt
        return [
            *self._pieces_ids(prompt.prefix, instruction),
            *self._ids(prompt.query.format(instruction=instruction, query=query)),
            *self._pieces_ids(prompt.separator, instruction),
        ]

    def min_max_length(self) -> int:
        fixed = self._head("", self.instruction) + self._pieces_ids(self.prompt.suffix, self.instruction)
        return len(fixed) + len(self._ids(self.prompt.document)) + 2

    def encode(self, query: str, documents: Sequence[str], spec: PairSpec) -> EncodedDocuments:
        instruction = spec.instruction or self.instruction
        # A long query keeps at most half the budget, cut at a token boundary of the query alone (the
        # model cards cut the document first, or keep three quarters).
        query_encoding = self._tokenizer.encode(query, add_special_tokens=False)
        if len(query_encoding.ids) > spec.max_length // 2:
            query = query[: query_encoding.offsets[spec.max_length // 2 - 1][1]]
        head = self._head(query, instruction)
        suffix = self._pieces_ids(self.prompt.suffix, instruction)
        pairs: list[EncodedPair] = []
        document_of_pair: list[int] = []
        texts = [self.prompt.document + document for document in documents]
        for index, encoding in enumerate(self._tokenizer.encode_batch(texts, add_special_tokens=False)):
            lead = sum(1 for _, end in encoding.offsets if end <= self._lead_chars)
            lead_ids, document_ids = encoding.ids[:lead], encoding.ids[lead:]
            budget = spec.max_length - len(head) - len(lead_ids) - len(suffix)
            if budget < 1:
                raise InvalidArgument(
                    f"max_length {spec.max_length} leaves no room for the document after the prompt, "
                    f"the instruction and the query ({len(head) + len(lead_ids) + len(suffix)} tokens)"
                )
            if spec.chunk and spec.chunk_overlap >= budget:
                raise InvalidArgument(
                    f"chunk_overlap {spec.chunk_overlap} must be smaller than the chunk length: "
                    f"{budget} document tokens fit in max_length {spec.max_length}"
                )
            for piece in _windows(document_ids, budget, spec):
                ids = head + lead_ids + piece + suffix
                pairs.append(EncodedPair(ids, [0] * len(ids)))
                document_of_pair.append(index)
        return EncodedDocuments(pairs, document_of_pair)


def _windows(ids: list[int], budget: int, spec: PairSpec) -> list[list[int]]:
    """The document tokens a pair keeps: truncated to ``budget``, or chunks of it sharing
    ``chunk_overlap`` tokens, as the Rust tokenizer's truncation with a stride cuts them."""
    if not spec.chunk:
        return [ids[:budget] if spec.truncation is Truncation.RIGHT else ids[max(0, len(ids) - budget) :]]
    step = budget - spec.chunk_overlap
    starts = range(0, max(1, len(ids) - spec.chunk_overlap), step)
    return [ids[start : start + budget] for start in starts][: spec.max_chunks_per_doc]
