"""Bi-encoder pooling is read from the sentence-transformers config and computed as it computes it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from sidecar.errors import ModelLoadError
from sidecar.model.batch import collate
from sidecar.model.kinds import load_network
from sidecar.model.loading import ModelKind, ModelSource, Pooling, load_bi_encoder, read_pooling
from sidecar.model.tokenization import PairSpec
from testkit.models import bert_tokenizer_dir

UNKNOWN_TOKEN_ID = 100  # [UNK] in bert-base-uncased's vocabulary
TEXTS = ["Cats are obligate carnivores.", "short", "A much longer sentence about the stock market and rain."]


def with_pooling(directory: Path, mode: str) -> Path:
    """The packaged all-MiniLM-L6-v2, its pooling switched to ``mode``."""
    shutil.copytree(bert_tokenizer_dir(), directory)
    config_file = directory / "1_Pooling" / "config.json"
    config = json.loads(config_file.read_text())
    for key in ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens"):
        config[key] = key == f"pooling_mode_{mode}_token" or key == f"pooling_mode_{mode}_tokens"
    config_file.write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
def test_pooling_matches_sentence_transformers(tmp_path: Path, mode: str):
    directory = with_pooling(tmp_path / mode, mode)
    source = ModelSource(str(directory))
    assert read_pooling(source) == Pooling(mode=mode, normalize=True)
    reference = SentenceTransformer(str(directory), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(our_vectors(source, TEXTS), reference, atol=1e-5)


def our_vectors(source: ModelSource, texts: list[str]) -> np.ndarray:
    model = load_bi_encoder(source)
    network = load_network(source, ModelKind.BI_ENCODER)
    pairs = model.tokenizer.encode_texts(texts, PairSpec(max_length=model.max_length)).pairs
    batch = collate(pairs, model.pad_token_id, model.uses_token_type_ids)
    with torch.inference_mode():
        return network(**{name: torch.from_numpy(array) for name, array in batch.as_dict().items()}).numpy()


def test_do_lower_case_lowercases_before_a_cased_tokenizer(tmp_path: Path):
    # A cased tokenizer under sentence-transformers' do_lower_case: each text is lowercased first. Served
    # as written, "Cats" would be a word the uncased vocabulary lacks.
    directory = with_pooling(tmp_path / "lowercased", "mean")
    tokenizer_file = directory / "tokenizer.json"
    tokenizer = json.loads(tokenizer_file.read_text())
    tokenizer["normalizer"]["lowercase"] = False
    tokenizer_file.write_text(json.dumps(tokenizer))
    tokenizer_config_file = directory / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_file.read_text())
    tokenizer_config_file.write_text(json.dumps({**tokenizer_config, "do_lower_case": False}))
    trained_file = directory / "sentence_bert_config.json"
    trained_file.write_text(json.dumps({**json.loads(trained_file.read_text()), "do_lower_case": True}))
    texts = ["Cats ARE Obligate Carnivores.", "ÉCOLE Normale"]
    source = ModelSource(str(directory))
    (pair,) = load_bi_encoder(source).tokenizer.encode_texts(texts[:1], PairSpec(max_length=32)).pairs
    assert UNKNOWN_TOKEN_ID not in pair.input_ids
    reference = SentenceTransformer(str(directory), device="cpu").encode(texts)
    np.testing.assert_allclose(our_vectors(source, texts), reference, atol=1e-5)
    np.testing.assert_allclose(our_vectors(source, texts), our_vectors(source, [t.lower() for t in texts]))


@pytest.mark.parametrize(
    "flags", [("pooling_mode_cls_token", "pooling_mode_mean_tokens"), ("pooling_mode_mean_sqrt_len_tokens",)]
)
def test_pooling_the_sidecar_does_not_compute_is_refused(tmp_path: Path, flags: tuple[str, ...]):
    # sentence-transformers concatenates several modes; serving one would give other vectors silently.
    directory = with_pooling(tmp_path / "pooling", "mean")
    config_file = directory / "1_Pooling" / "config.json"
    config = {**json.loads(config_file.read_text()), "pooling_mode_mean_tokens": False}
    config_file.write_text(json.dumps({**config, **dict.fromkeys(flags, True)}))
    with pytest.raises(ModelLoadError, match=f"pools with {', '.join(flags)}"):
        read_pooling(ModelSource(str(directory)))


def test_a_length_cap_lowers_the_trained_length_never_raises_it(tmp_path: Path):
    source = ModelSource(str(with_pooling(tmp_path / "capped", "mean")))  # trained at 256 tokens
    assert load_bi_encoder(source).max_length == 256
    assert load_bi_encoder(source, max_length_cap=400).max_length == 256
    assert load_bi_encoder(source, max_length_cap=128).max_length == 128
