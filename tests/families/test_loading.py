"""What is refused at start-up: code shipped with a model unless trusted, and decoders with no known
prompt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sidecar.errors import ModelLoadError
from sidecar.model.kinds import load_model
from sidecar.model.loading import ModelSource
from sidecar.model.tokenization import PairSpec, SpecialTokenLayout, Truncation
from sidecar.settings import parse_settings
from testkit.models import add_mean_pooling, qwen_tokenizer
from tests.families.conftest import FamilyModels


def with_remote_code(model: Path, target: Path) -> Path:
    shutil.copytree(model, target)
    config = json.loads((target / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_custom.CustomBert"}
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_a_model_with_remote_code_is_refused_unless_trusted(family_models: FamilyModels, tmp_path: Path):
    model = with_remote_code(family_models["bert"], tmp_path / "remote")
    with pytest.raises(ModelLoadError, match=r"modeling_custom\.CustomBert.*--trust-remote-code"):
        load_model(ModelSource(str(model)))
    trusted = ModelSource(str(model), trust_remote_code=True)
    assert trusted.from_pretrained_kwargs() == {"trust_remote_code": True}
    assert load_model(trusted).family == "bert"  # past the refusal: this auto_map names no real code


def test_trust_remote_code_is_a_flag_and_an_environment_variable():
    assert not parse_settings([], {}).trust_remote_code
    assert parse_settings(["--trust-remote-code"], {}).trust_remote_code
    assert parse_settings([], {"RERANK_TRUST_REMOTE_CODE": "1"}).trust_remote_code


@pytest.mark.parametrize("missing", ["/models/absent", "./absent", "../models/absent", "models/v2/absent"])
def test_a_path_that_does_not_exist_is_named_as_a_path_not_a_hub_id(
    missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="no such directory") as raised:
        load_model(ModelSource.resolve(missing))
    assert repr(missing) in str(raised.value)
    assert "Hugging Face Hub (" not in str(raised.value)


def test_a_file_given_as_the_model_is_refused_asking_for_its_directory(tmp_path: Path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file; give the directory"):
        load_model(ModelSource.resolve(str(weights)))


def test_a_decoder_without_a_known_prompt_is_refused(tmp_path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = qwen_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"decoder LLM \(llama\) with no reranking prompt"):
        load_model(ModelSource(str(tmp_path)))


def test_a_decoder_embedding_model_reads_no_reranking_prompt(tmp_path: Path):
    from transformers import Qwen3Config, Qwen3Model

    from sidecar.model.loading import BiEncoderModel
    from sidecar.model.tokenization import PromptPairTokenizer

    tokenizer = qwen_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen3Model(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = load_model(ModelSource(str(add_mean_pooling(tmp_path))))
    assert isinstance(model, BiEncoderModel)
    assert not isinstance(model.tokenizer, PromptPairTokenizer)
    assert model.family == "qwen3"


@pytest.mark.parametrize("family", ["bert", "xlm-roberta", "electra", "deberta-v2", "modernbert"])
def test_pairs_assembled_from_the_learned_layout_equal_the_post_processor_s(
    family: str, family_models: FamilyModels
):
    # Every encoder family's template is learned, and a request's pairs (truncated and chunked) come out
    # token for token as the tokenizer's post-processor makes them.

    tokenizer = load_model(ModelSource(str(family_models[family]))).tokenizer
    assert tokenizer._pair_layout is not None
    assert tokenizer._single_layout is not None
    documents = ["short", "a much longer document about heat pumps and rivers " * 20, "x"]
    specs = [PairSpec(max_length=32), PairSpec(max_length=24, truncation=Truncation.LEFT)]
    specs.append(PairSpec(max_length=20, chunk=True, max_chunks_per_doc=4, chunk_overlap=3))
    for spec in specs:
        assembled = tokenizer.encode("why do cats eat meat", documents, spec)
        texts = tokenizer.encode_texts(documents, spec)
        tokenizer._pair_layout = tokenizer._single_layout = None
        try:
            assert tokenizer.encode("why do cats eat meat", documents, spec) == assembled
            assert tokenizer.encode_texts(documents, spec) == texts
        finally:
            tokenizer._pair_layout = SpecialTokenLayout.learn(tokenizer._tokenizer, pair=True)
            tokenizer._single_layout = SpecialTokenLayout.learn(tokenizer._tokenizer, pair=False)
