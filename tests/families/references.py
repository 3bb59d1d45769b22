"""Each family's reference scoring, written out as its model card or sentence-transformers does it.

The prompts are the model cards' (testkit.model_cards), not the sidecar's, so a wrong prompt in the
sidecar fails the comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from testkit.model_cards import GEMMA_PROMPT, QWEN3_INSTRUCTION, QWEN3_PREFIX, QWEN3_SUFFIX


def cross_encoder_scores(model_dir: Path, query: str, documents: Sequence[str]) -> np.ndarray:
    """sentence-transformers' CrossEncoder: the encoder families' reference (sigmoid of one logit)."""
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(model_dir), device="cpu")
    return np.asarray(model.predict([(query, document) for document in documents]), dtype=np.float64)


def qwen3_card_ids(tokenizer, query: str, documents: Sequence[str], instruction: str, max_length: int):
    """The Qwen3-Reranker card's inputs, before padding."""
    prefix = tokenizer.encode(QWEN3_PREFIX, add_special_tokens=False)
    suffix = tokenizer.encode(QWEN3_SUFFIX, add_special_tokens=False)
    pairs = [f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}" for document in documents]
    inputs = tokenizer(
        pairs,
        padding=False,
        truncation="longest_first",
        return_attention_mask=False,
        max_length=max_length - len(prefix) - len(suffix),
    )
    return [prefix + ids + suffix for ids in inputs["input_ids"]]


def qwen3_card_scores(
    model_dir: Path, query: str, documents: Sequence[str], *, instruction: str = "", max_length: int = 8192
) -> np.ndarray:
    """The Qwen3-Reranker model card's scoring, step by step: left padding, the prompt around the
    instruction, query and document, then P(yes) from the softmax of the last token's no/yes logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    ids = qwen3_card_ids(tokenizer, query, documents, instruction or QWEN3_INSTRUCTION, max_length)
    batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**batch).logits[:, -1, :]
    answers = torch.nn.functional.log_softmax(torch.stack([logits[:, no], logits[:, yes]], dim=1), dim=1)
    return answers[:, 1].exp().double().numpy()


def qwen3_seq_cls_scores(model_dir: Path, query: str, documents: Sequence[str]) -> np.ndarray:
    """A seq-cls conversion as its model card scores it: CrossEncoder on the templated pair."""
    from sentence_transformers import CrossEncoder

    templated_query = f"{QWEN3_PREFIX}<Instruct>: {QWEN3_INSTRUCTION}\n<Query>: {query}\n"
    templated = [f"<Document>: {document}{QWEN3_SUFFIX}" for document in documents]
    model = CrossEncoder(str(model_dir), device="cpu")
    return np.asarray(model.predict([(templated_query, text) for text in templated]), dtype=np.float64)


def gemma_card_ids(tokenizer, query: str, documents: Sequence[str], prompt: str, max_length: int):
    """The bge-reranker-v2-gemma card's inputs (its get_inputs), before padding. Its max_length leaves
    out the separator and prompt after the passage."""
    prompt_inputs = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    sep_inputs = tokenizer("\n", add_special_tokens=False)["input_ids"]
    rows = []
    for document in documents:
        query_inputs = tokenizer(
            f"A: {query}", add_special_tokens=False, max_length=max_length * 3 // 4, truncation=True
        )
        passage_inputs = tokenizer(
            f"B: {document}", add_special_tokens=False, max_length=max_length, truncation=True
        )
        # The card's prepare_for_model(first, second, truncation="only_second", max_length=max_length,
        # add_special_tokens=False), which transformers 5 no longer has: cut the second from the right.
        first = [tokenizer.bos_token_id] + query_inputs["input_ids"]
        second = (sep_inputs + passage_inputs["input_ids"])[: max(0, max_length - len(first))]
        rows.append(first + second + sep_inputs + prompt_inputs)
    return rows


def gemma_card_scores(
    model_dir: Path,
    query: str,
    documents: Sequence[str],
    *,
    prompt: str = GEMMA_PROMPT,
    max_length: int = 1024,
) -> np.ndarray:
    """The bge-reranker-v2-gemma card's scoring: the last token's "Yes" logit, through a sigmoid
    (FlagEmbedding's normalize=True)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    yes = tokenizer("Yes", add_special_tokens=False)["input_ids"][0]
    ids = gemma_card_ids(tokenizer, query, documents, prompt, max_length)
    batch = tokenizer.pad({"input_ids": ids}, padding=True, pad_to_multiple_of=8, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**batch, return_dict=True).logits[:, -1, yes].double()
    return torch.sigmoid(logits).numpy()
