"""Pair tokenization with explicit truncation and chunking, safe to call from several threads.

We own a private copy of the model's Rust tokenizer with truncation and padding switched off, and
only ever call ``encode``/``post_process`` on it. Mutating a shared fast tokenizer per call (as
``tokenizer(..., truncation=...)`` does) races between threads and fails with "Already borrowed".
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Encoding, Tokenizer

from sidecar.errors import InvalidArgument
from sidecar.model.batch import EncodedPair

# Before a text is tokenized it is cut to this many characters per token a pair may use, so a
# megabyte document costs what its budget reads, not a megabyte's encoding. Tokens are almost never
# this long; where the cut left too few tokens, the whole text is tokenized, so the result is exact.
_CHARS_PER_TOKEN = 16
# Tokens beyond the most a pair may use, so those at the cut (a word cut in two) are never used.
_CUT_MARGIN_TOKENS = 8


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
    # False: a text past its budget is refused rather than cut (text-embeddings-inference's truncate).
    truncate: bool = True

    def tokens_used(self) -> int:
        """The most tokens of one document that its pairs can hold: one pair's, or every chunk's."""
        return self.max_length * (self.max_chunks_per_doc if self.chunk else 1)

    @property
    def keeps_end(self) -> bool:
        """Whether a long document keeps its end (chunks always start at its start)."""
        return self.truncation is Truncation.LEFT and not self.chunk


@dataclass(frozen=True, slots=True)
class EncodedDocuments:
    """A request's documents as model rows (pairs with the query, or single texts), and which document
    each row (chunk) belongs to."""

    pairs: list[EncodedPair]
    document_of_pair: list[int]

    @property
    def tokens(self) -> int:
        return sum(len(pair) for pair in self.pairs)


@dataclass(frozen=True, slots=True)
class SpecialTokenLayout:
    """Where the tokenizer's post-processor puts special tokens around one sequence (a text) or two (a
    query and a document), and the token type of each part: learned once, so a pair is assembled by
    list concatenation. ``post_process`` per pair holds the GIL, which at a GPU's pace was the
    serving path's largest share of it (benchmarks/RESULTS.md, "NVIDIA H200")."""

    # Special tokens (ids, type ids) before the first sequence, between the two, and after the last.
    before: tuple[tuple[int, ...], tuple[int, ...]]
    between: tuple[tuple[int, ...], tuple[int, ...]]
    after: tuple[tuple[int, ...], tuple[int, ...]]
    # The type id of each sequence's own tokens.
    sequence_type_ids: tuple[int, ...]

    @classmethod
    def learn(cls, tokenizer: Tokenizer, *, pair: bool) -> SpecialTokenLayout | None:
        """The layout ``post_process`` follows, as the one way to place the sequences in its output that
        two probes of different lengths agree on; None where they do not (a post-processor that is not
        a fixed template)."""
        agreed: set[SpecialTokenLayout] | None = None
        for texts in (("alpha beta gamma", "delta"), ("alpha", "delta epsilon zeta eta")):
            encodings = [tokenizer.encode(text, add_special_tokens=False) for text in texts[: 1 + pair]]
            merged = tokenizer.post_process(*encodings, add_special_tokens=True)
            found = cls._placements(merged.ids, merged.type_ids, [encoding.ids for encoding in encodings])
            agreed = found if agreed is None else agreed & found
        return next(iter(agreed)) if agreed is not None and len(agreed) == 1 else None

    @classmethod
    def _placements(
        cls, ids: list[int], types: list[int], sequences: list[list[int]]
    ) -> set[SpecialTokenLayout]:
        """Every layout that puts ``sequences``, in order and each with one type id, into ``ids``."""

        def starts(sequence: list[int], lowest: int) -> list[int]:
            width = len(sequence)
            return [at for at in range(lowest, len(ids) - width + 1) if ids[at : at + width] == sequence]

        def part(begin: int, end: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
            return tuple(ids[begin:end]), tuple(types[begin:end])

        first, *rest = sequences
        layouts = set()
        for a in starts(first, 0):
            a_end = a + len(first)
            for b in starts(rest[0], a_end) if rest else [a_end]:
                b_end = b + len(rest[0]) if rest else a_end
                spans = [(a, a_end), (b, b_end)] if rest else [(a, a_end)]
                sequence_types = [set(types[begin:end]) for begin, end in spans]
                if all(len(kinds) == 1 for kinds in sequence_types):
                    between = part(a_end, b) if rest else ((), ())
                    kinds = tuple(kinds.pop() for kinds in sequence_types)
                    layouts.add(cls(part(0, a), between, part(b_end, len(ids)), kinds))
        return layouts

    def head(self, query_ids: list[int] | None) -> tuple[list[int], list[int]]:
        """What comes before a document: the leading special tokens, and the query with what follows it."""
        ids, types = list(self.before[0]), list(self.before[1])
        if query_ids is not None:
            ids += [*query_ids, *self.between[0]]
            types += [self.sequence_type_ids[0]] * len(query_ids) + list(self.between[1])
        return ids, types

    def assemble(self, head: tuple[list[int], list[int]], document_ids: list[int]) -> EncodedPair:
        """One row: ``head``, the document, and the closing special tokens."""
        ids = [*head[0], *document_ids, *self.after[0]]
        types = [*head[1], *[self.sequence_type_ids[-1]] * len(document_ids), *self.after[1]]
        return EncodedPair(ids, types)


class PairTokenizer:
    # What a decoder reranker is told when a request brings no instruction; empty: the model reads none.
    instruction: str = ""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.special_tokens_per_pair = self._tokenizer.num_special_tokens_to_add(is_pair=True)
        self._pair_layout = SpecialTokenLayout.learn(self._tokenizer, pair=True)
        self._single_layout = SpecialTokenLayout.learn(self._tokenizer, pair=False)

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

    def has_tokens(self, text: str) -> bool:
        """Whether ``text`` tokenizes to anything: zero-width, control or other characters the
        normalizer drops can leave a text that is not blank with no token. Reads only its start where
        that holds a token."""
        (encoding,) = self._encode_bounded([text], 1, keep_end=False)
        return len(encoding) > 0

    def encode(self, query: str, documents: Sequence[str], spec: PairSpec) -> EncodedDocuments:
        """(query, document) pairs for a cross-encoder; a long document is truncated or chunked."""
        # A long query keeps at most half the budget, and is cut further where the special tokens would
        # leave the document no token: a pair always holds at least one token of its document. With
        # truncation off, nothing is cut: the query may take all but that token, or it is refused.
        query_limit = spec.max_length - self.special_tokens_per_pair - 1
        query_budget = min(spec.max_length // 2, query_limit) if spec.truncate else query_limit
        (query_encoding,) = self._encode_bounded([query], query_budget, keep_end=False)
        if len(query_encoding.ids) > query_budget:
            check_query_fits(query_budget, spec)
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
        encodings = self._encode_bounded(documents, spec.tokens_used(), spec.keeps_end)
        layout = self._single_layout if query is None else self._pair_layout
        head = None if layout is None else layout.head(None if query is None else query.ids)
        for index, document in enumerate(encodings):
            if layout is not None and head is not None:
                for piece_ids in self._piece_ids(document, budget, spec):
                    pairs.append(layout.assemble(head, piece_ids))
                    document_of_pair.append(index)
                continue
            for piece in self._pieces(document, budget, spec):
                # A post-processor whose layout could not be learned assembles each pair itself.
                merged = self._tokenizer.post_process(*(query, piece) if query else (piece,))
                pairs.append(EncodedPair(merged.ids, merged.type_ids))
                document_of_pair.append(index)
        return EncodedDocuments(pairs, document_of_pair)

    def _encode_bounded(
        self, texts: Sequence[str], tokens: int, keep_end: bool, lead: str = ""
    ) -> list[Encoding]:
        """Each ``lead + text`` tokenized from only as much of the text as ``tokens`` tokens can span (its
        end with ``keep_end``); the same tokens as tokenizing it whole, where a pair uses no more."""
        chars = (tokens + _CUT_MARGIN_TOKENS) * _CHARS_PER_TOKEN
        cuts = [_cut(text, chars, keep_end) for text in texts]
        encodings = self._tokenizer.encode_batch([lead + cut for cut in cuts], add_special_tokens=False)
        for index, (text, cut) in enumerate(zip(texts, cuts, strict=True)):
            if len(cut) < len(text) and len(encodings[index]) < tokens + _CUT_MARGIN_TOKENS:
                encodings[index] = self._tokenizer.encode(lead + text, add_special_tokens=False)
        return encodings

    @classmethod
    def _piece_ids(cls, document: Encoding, budget: int, spec: PairSpec) -> list[list[int]]:
        """The token ids of each piece ``_pieces`` cuts; a truncated document's by slicing its ids, which
        holds the GIL far less than truncating the Encoding (offsets, token strings and all)."""
        if spec.chunk:
            return [piece.ids for piece in cls._pieces(document, budget, spec)]
        ids = document.ids
        check_fits(len(ids), budget, spec)
        return [ids[:budget] if spec.truncation is Truncation.RIGHT else ids[max(0, len(ids) - budget) :]]

    @staticmethod
    def _pieces(document: Encoding, budget: int, spec: PairSpec) -> list[Encoding]:
        if not spec.chunk:
            check_fits(len(document), budget, spec)
            document.truncate(budget, direction=spec.truncation.value)
            return [document]
        document.truncate(budget, stride=spec.chunk_overlap, direction="right")
        return [document, *document.overflowing][: spec.max_chunks_per_doc]


@dataclass(frozen=True, slots=True)
class RowEncoder:
    """Turns texts into model rows with ``tokenizer``: each paired with ``query`` (a cross-encoder), or
    alone when ``query`` is None (a bi-encoder). Plain data, so a tokenizer process can run it on its own
    copy of the tokenizer (``scheduling.tokenizer_pool``)."""

    tokenizer: PairTokenizer
    spec: PairSpec
    query: str | None = None

    def __call__(self, texts: Sequence[str]) -> EncodedDocuments:
        if self.query is None:
            return self.tokenizer.encode_texts(texts, self.spec)
        return self.tokenizer.encode(self.query, texts, self.spec)


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
        return len(fixed) + len(self._ids(self.prompt.document.rstrip())) + 2

    def encode(self, query: str, documents: Sequence[str], spec: PairSpec) -> EncodedDocuments:
        instruction = spec.instruction or self.instruction
        suffix = self._pieces_ids(self.prompt.suffix, instruction)
        lead = self.prompt.document
        encodings = self._encode_bounded(documents, spec.tokens_used(), spec.keeps_end, lead=lead)
        # A token that starts in the lead is the lead's, even where it runs into the document's text.
        leads = [sum(1 for start, _ in piece.offsets if start < self._lead_chars) for piece in encodings]
        # What no request can cut: the prompt with the instruction, the suffix and the longest lead.
        fixed = len(self._head("", instruction)) + len(suffix) + max(leads, default=0)
        head = self._query_head(query, instruction, spec, fixed)
        pairs: list[EncodedPair] = []
        document_of_pair: list[int] = []
        for index, (encoding, lead) in enumerate(zip(encodings, leads, strict=True)):
            lead_ids, document_ids = encoding.ids[:lead], encoding.ids[lead:]
            budget = spec.max_length - len(head) - lead - len(suffix)
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

    def _query_head(self, query: str, instruction: str, spec: PairSpec, fixed: int) -> list[int]:
        """The head with as much of the query as leaves every document one token, and at most half of
        ``max_length``; cut at a token boundary of the query alone (the model cards cut the document
        first, or keep three quarters), a token more while the cut query tokenizes longer in the prompt.
        With truncation off the whole query, or a refusal where it leaves a document no token."""
        max_length = spec.max_length
        room = max_length - fixed - 1  # the query's tokens, leaving one for each document
        limit = min(max_length // 2, room) if spec.truncate else room
        (encoding,) = self._encode_bounded([query], max(limit, 0), keep_end=False)
        offsets = encoding.offsets
        if not offsets and room >= 0:
            return self._head(query, instruction)
        empty_head = len(self._head("", instruction))
        if not spec.truncate and room > 0:
            if len(offsets) <= room:
                head = self._head(query, instruction)
                if len(head) - empty_head <= room:
                    return head
            check_query_fits(room, spec)
        for keep in range(min(len(offsets), limit), 0, -1):
            cut = query if keep == len(offsets) else query[: offsets[keep - 1][1]]
            head = self._head(cut, instruction)
            if len(head) - empty_head <= room:
                return head
        raise InvalidArgument(
            f"max_length {max_length} is too small for this request: the prompt and the instruction take "
            f"{fixed} tokens, so at least {fixed + 2} are needed for one token of the query and one of "
            "each document"
        )


def _windows(ids: list[int], budget: int, spec: PairSpec) -> list[list[int]]:
    """The document tokens a pair keeps: truncated to ``budget``, or chunks of it sharing
    ``chunk_overlap`` tokens, as the Rust tokenizer's truncation with a stride cuts them."""
    if not spec.chunk:
        check_fits(len(ids), budget, spec)
        return [ids[:budget] if spec.truncation is Truncation.RIGHT else ids[max(0, len(ids) - budget) :]]
    step = budget - spec.chunk_overlap
    starts = range(0, max(1, len(ids) - spec.chunk_overlap), step)
    return [ids[start : start + budget] for start in starts][: spec.max_chunks_per_doc]


def check_query_fits(budget: int, spec: PairSpec) -> None:
    """Refuse a query past its budget when truncation is off."""
    if not spec.truncate:
        raise InvalidArgument(
            f"the query is longer than the {budget} tokens that fit in max_length {spec.max_length} beside "
            "the special tokens and one token of a document, and truncation is off (truncate: false); "
            "shorten it, or send truncate: true to cut it",
            field="query",
        )


def check_fits(tokens: int, budget: int, spec: PairSpec) -> None:
    """Refuse a text past its budget when truncation is off."""
    if not spec.truncate and tokens > budget:
        raise InvalidArgument(
            f"a text is longer than the {budget} tokens that fit in max_length {spec.max_length} beside the "
            "special tokens (and the query), and truncation is off (truncate: false); shorten it, or send "
            "truncate: true to cut it"
        )


def _cut(text: str, chars: int, keep_end: bool) -> str:
    """The first ``chars`` characters of ``text`` (the last, with ``keep_end``), ending (starting) at a
    whitespace where one lies in the outer quarter, so no word is cut in two."""
    if len(text) <= chars:
        return text
    if keep_end:
        part = text[-chars:]
        first = _WHITESPACE.search(part, 0, chars // 4)
        return part[first.start() :] if first else part
    part = text[:chars]
    last = _LAST_WHITESPACE.search(part, chars - chars // 4)
    return part[: last.start()] if last else part


_WHITESPACE = re.compile(r"\s")
_LAST_WHITESPACE = re.compile(r"\s(?=\S*\Z)")
