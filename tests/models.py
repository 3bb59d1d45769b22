"""The tiny random-weight models only the tests use (the benchmarks share testkit.models'), and random
token batches to feed them.

Their scores are meaningless as relevance; tests use them only to check plumbing and arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from sidecar.model.batch import TokenBatch
from testkit.model_cards import GEMMA_PROMPT
from testkit.models import (
    TINY_SIZES,
    bert_tokenizer_dir,
    qwen3_config,
    save_model,
    tokenizer_corpus,
    unigram_backend,
)


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


def save_tiny_electra(directory: Path, *, seed: int = 0) -> Path:
    """ms-marco-electra-shaped: WordPiece (bert-base-uncased), the discriminator-style head."""
    from transformers import ElectraConfig, ElectraForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(bert_tokenizer_dir())
    tokenizer.model_max_length = 512
    config = ElectraConfig(
        vocab_size=tokenizer.vocab_size, embedding_size=16, num_labels=1, initializer_range=0.2, **TINY_SIZES
    )
    return save_model(directory, ElectraForSequenceClassification, config, tokenizer, seed)


def save_tiny_deberta_v2(directory: Path, *, seed: int = 0) -> Path:
    """mxbai-rerank-shaped DeBERTa-v3: relative attention, no token type embeddings, Unigram tokenizer."""
    from tokenizers.processors import TemplateProcessing
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, DebertaV2TokenizerFast

    backend = unigram_backend(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"])
    backend.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 1), ("[SEP]", 2)],
    )
    tokenizer = DebertaV2TokenizerFast(tokenizer_object=backend, model_max_length=512)
    config = DebertaV2Config(
        vocab_size=backend.get_vocab_size(),
        max_position_embeddings=512,
        type_vocab_size=0,
        relative_attention=True,
        position_buckets=256,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        max_relative_positions=-1,
        pad_token_id=0,
        num_labels=1,
        initializer_range=0.2,
        **TINY_SIZES,
    )
    return save_model(directory, DebertaV2ForSequenceClassification, config, tokenizer, seed)


def save_tiny_qwen3_seq_cls(directory: Path, causal_dir: Path) -> Path:
    """The one-logit sequence-classification conversion of a causal checkpoint, made as the published
    "seq-cls" conversions are: the score row is the yes row minus the no row of the vocabulary projection."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM, Qwen3ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(causal_dir)
    causal = Qwen3ForCausalLM.from_pretrained(causal_dir).eval()
    classifier = Qwen3ForSequenceClassification(qwen3_config(tokenizer, num_labels=1)).eval()
    classifier.model.load_state_dict(causal.model.state_dict())
    rows = causal.lm_head.weight.detach()
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    with torch.no_grad():
        classifier.score.weight.copy_((rows[yes] - rows[no]).unsqueeze(0))
    classifier.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_bge_reranker_gemma(directory: Path, *, seed: int = 0) -> Path:
    """bge-reranker-v2-gemma-shaped: a Gemma causal LM scored by its "Yes" logit, with a SentencePiece-style
    byte-fallback BPE tokenizer (spaces as "\u2581", no pre-tokenizer), <bos> added by the prompt."""
    from tokenizers import decoders, models, normalizers, trainers
    from transformers import GemmaConfig, GemmaForCausalLM, GemmaTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"])
    backend.train_from_iterator([*tokenizer_corpus(), GEMMA_PROMPT, "A: ", "B: "] * 3, trainer)
    tokenizer = GemmaTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=1024,
    )
    config = GemmaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.2,
    )
    return save_model(directory, GemmaForCausalLM, config, tokenizer, seed)
