"""The parity gate: an engine serves only if its scores on a fixed probe set match torch fp32.

Scores are compared after normalization, as callers see them: the sigmoid of a cross-encoder's
log-odds, or the cosine similarity of a bi-encoder's query and document embeddings. Three measures
are checked against per-precision tolerances: the largest absolute difference of any score, the
Spearman rank correlation over all probe pairs (what a reranker must keep: the order), and for int8
how many of the reference's 10 best-scored pairs stay among the engine's 10 best (what a caller reads).

Tolerances (normalized scores in [0, 1] or [-1, 1]):

| precision | max abs diff | min Spearman | why |
|---|---|---|---|
| fp32 | 1e-4 | 0.999 | the same arithmetic in another order |
| bf16, fp16 | 0.02 | 0.995 | measured 0.9996 on MiniLM-L6 weights; catches overflow and bad casts |
| int8 | 0.05 | 0.995, 9 of the top 10 kept | dynamic int8 measures 0.91-0.97 and reorders the top 10 |

Any non-finite output (NaN or infinity) fails the gate, whatever the tolerance. Besides the texts below,
the probe sweeps the vocabulary: rows of token ids spread evenly over the whole embedding table, so a
damaged table (a corrupt compiled artifact) shows in the probe even where no probe text reads the
damaged rows. The sweep holds up to ``SWEEP_TOKENS`` ids: every id of a smaller vocabulary, every
n-th of a larger one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from sidecar.model.batch import EncodedPair, TokenBatch, batches_digest, collate
from sidecar.model.engines.base import Engine, forward_side_by_side
from sidecar.model.loading import CrossEncoderModel
from sidecar.model.tokenization import PairSpec, PairTokenizer

TOP = 10


@dataclass(frozen=True)
class Tolerance:
    max_abs_diff: float
    min_spearman: float
    # Of the reference's TOP best-scored probe pairs, how many must stay among the engine's TOP best.
    min_top_kept: int = 0


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs_diff=1e-4, min_spearman=0.999),
    "bf16": Tolerance(max_abs_diff=0.02, min_spearman=0.995),
    "fp16": Tolerance(max_abs_diff=0.02, min_spearman=0.995),
    "int8": Tolerance(max_abs_diff=0.05, min_spearman=0.995, min_top_kept=TOP - 1),
}

# Token ids the vocabulary sweep holds at most, in rows of at most SWEEP_ROW_TOKENS: every few rows of a
# BERT vocabulary, for about as many tokens as the cross-encoder probe's texts.
SWEEP_TOKENS = 4096
SWEEP_ROW_TOKENS = 256

# Queries and passages of varied topic and length, so relevant and irrelevant pairs spread the scores.
PROBE_QUERIES = (
    "what causes the seasons on earth",
    "how do vaccines train the immune system",
    "best way to store fresh basil",
    "python list comprehension syntax",
    "symptoms of vitamin d deficiency",
    "who painted the sistine chapel ceiling",
    "how does a heat pump work in winter",
    "effects of caffeine on sleep quality",
)
PROBE_DOCUMENTS = (
    "Earth's axis is tilted about 23.4 degrees, so each hemisphere receives more direct sunlight for "
    "part of the year and less for the rest; this tilt, not the distance to the sun, causes seasons.",
    "Vaccines expose the immune system to a harmless piece or weakened form of a pathogen, prompting "
    "B cells to make antibodies and leaving memory cells that respond quickly to a later infection.",
    "Basil keeps best at room temperature with its stems in a glass of water, loosely covered; the "
    "refrigerator turns the leaves black within a day or two.",
    "A list comprehension builds a list in one expression: [f(x) for x in items if condition(x)].",
    "Low vitamin D can cause fatigue, bone pain, muscle weakness and, over years, soft or brittle bones.",
    "Michelangelo painted the ceiling of the Sistine Chapel between 1508 and 1512 for Pope Julius II.",
    "A heat pump moves heat rather than making it: in winter its refrigerant absorbs heat from the "
    "outdoor air, even when cold, and a compressor raises its temperature to warm the house.",
    "Caffeine blocks adenosine receptors; taken within six hours of bedtime it shortens total sleep "
    "time and reduces deep sleep, even when people do not notice any difference.",
    "The stock market closed higher on Friday as technology shares rallied after strong earnings.",
    "Preheat the oven to 220 degrees, toss the vegetables in olive oil and salt, and roast for forty "
    "minutes, turning once, until the edges are brown and crisp.",
    "The offside rule in football requires an attacker to have two opponents, usually the goalkeeper "
    "and a defender, between them and the goal line when the ball is played forward.",
    " ".join(
        [
            "Sleep is regulated by two processes: a circadian rhythm that tracks the time of day, and a "
            "homeostatic pressure that builds the longer one stays awake."
        ]
        * 6
    ),
)


@dataclass(frozen=True)
class Probe:
    """Fixed model inputs and how to turn the engine's outputs for them into normalized scores.

    The rows are batched in order of length, as the batcher would, so the gate pays for little padding;
    ``order`` maps each batched row back to its place in the probe.
    """

    batches: tuple[TokenBatch, ...]
    order: np.ndarray
    to_scores: Callable[[np.ndarray], np.ndarray]

    def scores(self, engine: Engine, side_by_side: int = 1) -> np.ndarray:
        """Normalized scores of the engine on the probe; NaN where a row's output is not finite, which
        normalizing alone could hide (the sigmoid of an infinite logit is 1). With ``side_by_side`` > 1
        that many batches run at once (``forward_side_by_side``)."""
        calls = [(engine, batch) for batch in self.batches]
        batched = np.concatenate(forward_side_by_side(calls, side_by_side))
        outputs = np.empty_like(batched, dtype=np.float64)
        outputs[self.order] = batched
        outputs[~np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1)] = np.nan
        return self.to_scores(outputs)

    def digest(self) -> str:
        """A digest of the probe's tokens, so a remembered reference is used only for the same probe."""
        return batches_digest(self.batches)

    def longest_row(self) -> np.ndarray:
        """The real tokens of the probe's longest row."""
        last = self.batches[-1]
        return last.input_ids[-1][last.attention_mask[-1] == 1]


def length_sorted_probe(
    rows: Sequence[EncodedPair],
    pad_token_id: int,
    with_token_type_ids: bool,
    max_batch_pairs: int,
    to_scores: Callable[[np.ndarray], np.ndarray],
    max_batch_tokens: int = 0,
) -> Probe:
    """A probe of ``rows`` batched in order of length, at most ``max_batch_pairs`` rows and (when set)
    ``max_batch_tokens`` padded tokens a batch."""
    order = np.argsort([len(row.input_ids) for row in rows], kind="stable")
    ordered = [rows[index] for index in order]
    groups: list[list[EncodedPair]] = [[]]
    for row in ordered:
        # Rows grow in length, so the padded size of a batch is its rows times this row's length.
        padded = (len(groups[-1]) + 1) * len(row.input_ids)
        if groups[-1] and (len(groups[-1]) == max_batch_pairs or 0 < max_batch_tokens < padded):
            groups.append([])
        groups[-1].append(row)
    batches = tuple(collate(group, pad_token_id, with_token_type_ids) for group in groups)
    return Probe(batches, order, to_scores)


def vocabulary_sweep(vocab_size: int, *, pad_token_id: int, max_length: int) -> list[EncodedPair]:
    """Rows of token ids spread evenly over ``[0, vocab_size)``, the padding id left out (position ids
    of some models skip it): every embedding row when the vocabulary is small, else every n-th.

    The rows are raw ids, no special tokens or prompt: the gate compares engines on the same inputs,
    and every token reaches the output through attention.
    """
    ids = np.unique(np.linspace(0, vocab_size - 1, min(vocab_size, SWEEP_TOKENS)).round().astype(np.int64))
    ids = ids[ids != pad_token_id]
    row_tokens = min(max_length, SWEEP_ROW_TOKENS)
    return [
        EncodedPair(row.tolist(), [0] * len(row))
        for row in (ids[start : start + row_tokens] for start in range(0, len(ids), row_tokens))
    ]


def cross_encoder_probe(
    model: CrossEncoderModel, max_batch_pairs: int, *, vocab_size: int, max_batch_tokens: int = 0
) -> Probe:
    """Every probe query against every probe document, as the reranker would send them, then the
    vocabulary sweep; batched as the batcher would, within ``max_batch_tokens`` when given, so the gate
    leaves an engine's scratch memory no larger than serving does."""
    spec = PairSpec(max_length=model.max_length)
    pairs = [
        pair for query in PROBE_QUERIES for pair in model.tokenizer.encode(query, PROBE_DOCUMENTS, spec).pairs
    ]
    pairs += vocabulary_sweep(vocab_size, pad_token_id=model.pad_token_id, max_length=model.max_length)

    def to_scores(logits: np.ndarray) -> np.ndarray:
        log_odds = logits[:, 0] if model.num_labels == 1 else logits[:, 1] - logits[:, 0]
        return 1.0 / (1.0 + np.exp(-log_odds))

    return length_sorted_probe(
        pairs, model.pad_token_id, model.uses_token_type_ids, max_batch_pairs, to_scores, max_batch_tokens
    )


def bi_encoder_probe(
    tokenizer: PairTokenizer,
    *,
    max_length: int,
    pad_token_id: int,
    with_token_type_ids: bool,
    max_batch: int,
    vocab_size: int,
    max_batch_tokens: int = 0,
) -> Probe:
    """Probe queries and documents embedded separately, the vocabulary sweep's rows as more documents;
    scores are the cosine of every query-document pair."""
    texts = [*PROBE_QUERIES, *PROBE_DOCUMENTS]
    rows = tokenizer.encode_texts(texts, PairSpec(max_length=max_length)).pairs
    rows += vocabulary_sweep(vocab_size, pad_token_id=pad_token_id, max_length=max_length)

    def to_scores(embeddings: np.ndarray) -> np.ndarray:
        unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
        queries, documents = unit[: len(PROBE_QUERIES)], unit[len(PROBE_QUERIES) :]
        return (queries @ documents.T).ravel()

    return length_sorted_probe(
        rows, pad_token_id, with_token_type_ids, max_batch, to_scores, max_batch_tokens
    )


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation, ties given their average rank; NaN when either side is constant."""
    ranks_a, ranks_b = _average_ranks(a), _average_ranks(b)
    if np.ptp(ranks_a) == 0 or np.ptp(ranks_b) == 0:
        return float("nan")
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def top_kept(scores: np.ndarray, reference: np.ndarray, top: int = TOP) -> int:
    """How many of the reference's ``top`` best-scored rows are among the scores' ``top`` best."""
    best = set(np.argsort(-scores, kind="stable")[:top].tolist())
    return len(best & set(np.argsort(-reference, kind="stable")[:top].tolist()))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


@dataclass(frozen=True)
class ParityReport:
    precision: str
    max_abs_diff: float
    spearman: float
    tolerance: Tolerance
    # Probe scores that are NaN or infinite; any fails the gate.
    non_finite: int
    scored: int
    top_kept: int = TOP

    @property
    def passed(self) -> bool:
        # NaN fails both comparisons, so a constant or broken output never passes.
        return bool(
            self.non_finite == 0
            and self.max_abs_diff <= self.tolerance.max_abs_diff
            and self.spearman >= self.tolerance.min_spearman
            and self.top_kept >= self.tolerance.min_top_kept
        )

    def describe(self) -> str:
        top = f", top {TOP} kept {self.top_kept}"
        if self.tolerance.min_top_kept:
            top += f" (limit {self.tolerance.min_top_kept})"
        described = (
            f"max abs diff {self.max_abs_diff:.2e} (limit {self.tolerance.max_abs_diff:g}), "
            f"Spearman {self.spearman:.4f} (limit {self.tolerance.min_spearman:g}){top}"
        )
        if self.non_finite:
            return (
                f"{self.non_finite} of {self.scored} probe scores not finite (NaN or infinity); {described}"
            )
        return described


def compare(scores: np.ndarray, reference: np.ndarray, precision: str) -> ParityReport:
    return ParityReport(
        precision=precision,
        max_abs_diff=float(np.max(np.abs(scores - reference))),
        spearman=spearman(scores, reference),
        tolerance=TOLERANCES[precision],
        non_finite=int(np.count_nonzero(~np.isfinite(scores))),
        scored=len(scores),
        top_kept=top_kept(scores, reference),
    )
