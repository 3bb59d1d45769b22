"""Reranker families: which architecture a checkpoint has, and what serving it correctly takes.

Encoder families read a (query, document) pair through the tokenizer's own pair template and score
it with their sequence-classification head. Decoder families are causal LLMs scored from their last
token behind a prompt template; a causal-LM checkpoint's "yes" and "no" rows of the vocabulary
projection become a one-logit head at load time (``network.DecoderRerankerNetwork``).
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.model.tokenization import PromptFormat

# The Qwen3-Reranker model card's scoring: P(yes) from the last token's yes/no logits.
QWEN3_RERANKER = PromptFormat(
    prefix=(
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
        'the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
        "<|im_start|>user\n",
    ),
    query="<Instruct>: {instruction}\n<Query>: {query}\n",
    separator=(),
    document="<Document>: ",
    suffix=("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",),
    default_instruction="Given a web search query, retrieve relevant passages that answer the query",
    yes="yes",
    no="no",
    max_length=8192,
)
# The bge-reranker-v2-gemma model card's scoring: the last token's "Yes" logit, whose sigmoid is the
# normalized score; its "prompt" is the instruction, after the passage.
BGE_RERANKER_GEMMA = PromptFormat(
    prefix=("<bos>",),
    query="A: {query}",
    separator=("\n",),
    document="B: ",
    suffix=("\n", "{instruction}"),
    default_instruction="Given a query A and a passage B, determine whether the passage contains an answer "
    "to the query by providing a prediction of either 'Yes' or 'No'.",
    yes="Yes",
    no=None,
    max_length=1024,
)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: frozenset[str]
    # Decoder families only: the prompt the model was trained to answer.
    prompt: PromptFormat | None = None


FAMILIES = (
    Family("bert", frozenset({"bert"})),
    Family("xlm-roberta", frozenset({"xlm-roberta", "roberta", "camembert"})),
    Family("electra", frozenset({"electra"})),
    Family("deberta-v2", frozenset({"deberta-v2"})),
    Family("modernbert", frozenset({"modernbert"})),
    Family("qwen3-reranker", frozenset({"qwen3"}), prompt=QWEN3_RERANKER),
    Family("bge-reranker-gemma", frozenset({"gemma"}), prompt=BGE_RERANKER_GEMMA),
)
# Decoder-only architectures: scored from the last token, so the sidecar needs their prompt format.
DECODER_MODEL_TYPES = frozenset({"qwen2", "qwen3", "gemma", "gemma2", "gemma3", "llama", "mistral", "phi3"})


def family_of(model_type: str) -> Family:
    """The family of a model type; an encoder the sidecar has not verified is a family of its own."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return Family(model_type, frozenset({model_type}))
