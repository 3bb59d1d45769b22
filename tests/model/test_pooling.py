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
    model = load_bi_encoder(source)
    network = load_network(source, ModelKind.BI_ENCODER)
    pairs = model.tokenizer.encode_texts(TEXTS, PairSpec(max_length=model.max_length)).pairs
    batch = collate(pairs, model.pad_token_id, model.uses_token_type_ids)
    with torch.inference_mode():
        ours = network(**{name: torch.from_numpy(array) for name, array in batch.as_dict().items()}).numpy()
    reference = SentenceTransformer(str(directory), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


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
