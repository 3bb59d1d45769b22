"""Each family's reference scoring, written as its model card or sentence-transformers does it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sidecar.model.families import QWEN3_RERANKER


def cross_encoder_scores(model_dir: Path, query: str, documents: Sequence[str]) -> np.ndarray:
    """sentence-transformers' CrossEncoder: the encoder families' reference (sigmoid of one logit)."""
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(model_dir), device="cpu")
    return np.asarray(model.predict([(query, document) for document in documents]), dtype=np.float64)


def qwen3_card_scores(
    model_dir: Path, query: str, documents: Sequence[str], *, instruction: str = "", max_length: int = 8192
) -> np.ndarray:
    """The Qwen3-Reranker model card's scoring, step by step: left padding, the prompt around the
    instruction, query and document, then P(yes) from the softmax of the last token's no/yes logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = QWEN3_RERANKER
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    prefix = tokenizer.encode(prompt.prefix, add_special_tokens=False)
    suffix = tokenizer.encode(prompt.suffix, add_special_tokens=False)
    instruction = instruction or prompt.default_instruction
    pairs = [f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}" for document in documents]
    inputs = tokenizer(
        pairs,
        padding=False,
        truncation="longest_first",
        return_attention_mask=False,
        max_length=max_length - len(prefix) - len(suffix),
    )
    inputs["input_ids"] = [prefix + ids + suffix for ids in inputs["input_ids"]]
    batch = tokenizer.pad(inputs, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**batch).logits[:, -1, :]
    answers = torch.nn.functional.log_softmax(torch.stack([logits[:, no], logits[:, yes]], dim=1), dim=1)
    return answers[:, 1].exp().double().numpy()


def qwen3_seq_cls_scores(model_dir: Path, query: str, documents: Sequence[str]) -> np.ndarray:
    """A seq-cls conversion as its model card scores it: CrossEncoder on the templated pair."""
    prompt = QWEN3_RERANKER
    templated_query = prompt.prefix + prompt.query.format(instruction=prompt.default_instruction, query=query)
    templated = [prompt.document + document + prompt.suffix for document in documents]
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(model_dir), device="cpu")
    return np.asarray(model.predict([(templated_query, text) for text in templated]), dtype=np.float64)
