"""What a warm start needs to know about a model without torch or transformers.

A cold start loads the model through transformers and selects an engine; when a compiled engine wins,
it remembers here what it learned: the model's metadata, its network's content hash (which the engine
verdict and the cached artifacts are keyed by) and the description of its ONNX export, and it caches
the Rust tokenizer it built. A restart on the same model files rebuilds the model from these with the
``tokenizers`` library alone.

One record per model directory under ``--cache-dir/warm``. Its key holds the SHA-256 of every file
in the model directory and whatever else shapes the loaded model (the length cap, the instruction,
the versions of the libraries that read it, what torch's default thread count follows from); a record
whose key differs is not used, and the start loads the model in full, logged with the reason (a
model file that went missing is named with its path).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from sidecar import __version__
from sidecar.errors import ModelLoadError
from sidecar.model.cache import ArtifactCache, file_sha256, key_digest, write_json_atomically
from sidecar.model.export import ExportedModel
from sidecar.model.hardware import usable_cpus
from sidecar.model.kinds import KINDS, kind_of
from sidecar.model.loading import BiEncoderModel, CrossEncoderModel, ModelKind, ModelSource
from sidecar.model.tokenization import PairTokenizer

logger = logging.getLogger(__name__)

# 2: the export's description lost is_bi_encoder, which nothing read.
_FORMAT = 2
# How the loaded tokenizer is built from the model's files; a new way leaves the tokenizers cached the old
# way unused. 2: a sentence-transformers model's do_lower_case lowercases.
_TOKENIZER_BUILD = 2
# How ``recall`` begins its reason when the model's remembered engine runs the PyTorch network.
NEEDS_NETWORK = "the remembered engine runs the PyTorch network"
_TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class WarmRecord:
    """A loaded model as a warm start rebuilds it, and what its engine is found by."""

    kind: str
    model_type: str
    family: str
    max_length: int
    pad_token_id: int
    uses_token_type_ids: bool
    revision: str
    # The content hash of the PyTorch network (``network.content_hash``).
    model_hash: str
    vocab_size: int
    input_names: tuple[str, ...]
    # torch.get_num_threads() before the server changed it: what --threads 0 means.
    default_threads: int
    # The ONNX export's description (its path is found again through the cache).
    export: dict[str, Any]
    num_labels: int = 0
    answer_token_ids: tuple[int, int | None] | None = None
    dims: int = 0
    pooling_mode: str = ""
    pooling_normalize: bool = False


def record_of(
    model: CrossEncoderModel | BiEncoderModel,
    *,
    model_hash: str,
    vocab_size: int,
    input_names: tuple[str, ...],
    default_threads: int,
    exported: ExportedModel,
) -> WarmRecord:
    export = {name: value for name, value in asdict(exported).items() if name != "path"}
    export["input_names"] = list(exported.input_names)
    fields: dict[str, Any] = {
        "kind": model.kind.value,
        "model_type": model.model_type,
        "family": model.family,
        "max_length": model.max_length,
        "pad_token_id": model.pad_token_id,
        "uses_token_type_ids": model.uses_token_type_ids,
        "revision": model.revision,
        "model_hash": model_hash,
        "vocab_size": vocab_size,
        "input_names": input_names,
        "default_threads": default_threads,
        "export": export,
    }
    fields |= kind_of(model).warm_fields(model)
    return WarmRecord(**fields)


def model_files(directory: Path) -> dict[str, str]:
    """The SHA-256 of every file under a model directory, by relative path; hidden entries (a hub
    download's ``.cache``) are left out."""
    files: dict[str, str] = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        files[relative.as_posix()] = file_sha256(path)
    return files


def threads_environment() -> str:
    """What torch's default thread count follows from, read without importing torch."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    variables = ",".join(
        f"{name}={os.environ.get(name, '')}" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    )
    return f"cpus={os.cpu_count()},affinity={affinity},usable={usable_cpus()},{variables}"


def warm_key(
    files: Mapping[str, str], *, max_length_cap: int, instruction: str, trust_remote_code: bool
) -> dict[str, str]:
    """Everything the loaded model depends on: its files, the settings that shape it (and whether its
    own code was trusted to load it), and the versions of this package and of what read it."""
    versions = {package: importlib.metadata.version(package) for package in ("transformers", "tokenizers")}
    return {
        "model_files": key_digest(files),
        "max_length_cap": str(max_length_cap),
        "instruction": instruction,
        "trust_remote_code": str(trust_remote_code),
        "sidecar": __version__,
        "tokenizer_build": str(_TOKENIZER_BUILD),
        "threads_environment": threads_environment(),
        **versions,
    }


def tokenizer_key(key: Mapping[str, str]) -> dict[str, str]:
    return {name: key[name] for name in ("model_files", "tokenizer_build", "transformers", "tokenizers")}


def differing_files(directory: Path, remembered: Mapping[str, str], current: Mapping[str, str]) -> str:
    """Which model files went missing, changed or appeared since the record was made, with paths."""
    missing = [directory / name for name in remembered if name not in current]
    changed = [
        directory / name for name in remembered if name in current and current[name] != remembered[name]
    ]
    added = [directory / name for name in current if name not in remembered]
    parts = [
        f"{what}: {', '.join(map(str, paths))}"
        for what, paths in (("missing", missing), ("changed", changed), ("added", added))
        if paths
    ]
    return "the model files differ from the ones the engine was chosen for (" + "; ".join(parts) + ")"


class WarmStore:
    def __init__(self, root: Path) -> None:
        self.directory = root / "warm"
        self.cache = ArtifactCache(root)

    def _path(self, model_dir: Path) -> Path:
        name = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:24]
        return self.directory / f"{name}.json"

    def remembers(self, model_dir: Path) -> bool:
        """Whether a record exists for the model directory, whatever its key."""
        return self._path(model_dir).is_file()

    def forget(self, model_dir: Path) -> None:
        """Remove the record for the model directory, if any."""
        self._path(model_dir).unlink(missing_ok=True)

    def recall(
        self, model_dir: Path, files: Mapping[str, str], key: Mapping[str, str]
    ) -> tuple[WarmRecord | None, str]:
        """The record for exactly this key, or None and why there is none."""
        path = self._path(model_dir)
        if not path.is_file():
            return None, f"nothing is remembered for the model in {model_dir}"
        try:
            stored = json.loads(path.read_text())
            if stored.get("format") != _FORMAT:
                return None, f"{path} is in another format"
            remembered_key, remembered_files = stored["key"], stored["files"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return None, f"{path} is unreadable ({type(exc).__name__}: {exc})"
        if remembered_files != dict(files):
            return None, differing_files(model_dir, remembered_files, files)
        changed = sorted(
            name for name in {*key, *remembered_key} if key.get(name) != remembered_key.get(name)
        )
        if changed:
            described = "; ".join(
                f"{name} {remembered_key.get(name)!r} -> {key.get(name)!r}" for name in changed
            )
            return None, f"the model was loaded under other conditions: {described}"
        if "network" in stored:
            return None, f"{NEEDS_NETWORK}: {stored['network']}"
        try:
            fields = stored["record"]
            answers = fields.get("answer_token_ids")
            record = WarmRecord(
                **{
                    **fields,
                    "input_names": tuple(fields["input_names"]),
                    "answer_token_ids": tuple(answers) if answers is not None else None,
                }
            )
        except (KeyError, TypeError, AttributeError) as exc:
            return None, f"{path} is unreadable ({type(exc).__name__}: {exc})"
        return record, ""

    def remember_network(
        self, model_dir: Path, files: Mapping[str, str], key: Mapping[str, str], engine: str
    ) -> None:
        """Remember that ``engine``, which runs the PyTorch network, serves this model: the next start
        loads it in full at once, with no selection in a child process first."""
        stored = {"format": _FORMAT, "key": dict(key), "files": dict(files), "network": engine}
        try:
            write_json_atomically(self._path(model_dir), stored)
        except OSError as exc:
            logger.warning("could not remember the loaded model in %s: %s", self._path(model_dir), exc)

    def tokenizer(self, key: Mapping[str, str]) -> Tokenizer:
        """The cached Rust tokenizer; a ModelLoadError (naming the file) when it is missing or damaged."""
        path = self.cache.cached("tokenizer", tokenizer_key(key), _TOKENIZER_FILE)
        try:
            return Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust tokenizer raises a plain Exception on a bad file
            raise ModelLoadError(f"the cached tokenizer {path} does not load: {exc}") from exc

    def remember(
        self,
        model_dir: Path,
        files: Mapping[str, str],
        key: Mapping[str, str],
        record: WarmRecord,
        tokenizer: PairTokenizer,
    ) -> None:
        """Cache the tokenizer and write the record atomically; a cache that cannot be written costs
        only the next start's time."""
        path = self._path(model_dir)
        stored = {"format": _FORMAT, "key": dict(key), "files": dict(files), "record": asdict(record)}
        try:
            self.cache.get_or_build(
                "tokenizer",
                tokenizer_key(key),
                _TOKENIZER_FILE,
                lambda target: target.write_text(tokenizer.serialized()),
            )
            write_json_atomically(path, stored)
        except OSError as exc:
            logger.warning("could not remember the loaded model in %s: %s", path, exc)


def rebuild_model(
    record: WarmRecord, source: ModelSource, tokenizer: Tokenizer, instruction: str
) -> CrossEncoderModel | BiEncoderModel:
    """The model as the cold start loaded it, its tokenizer the cached one."""
    fields: dict[str, Any] = {
        "source": source,
        "model_type": record.model_type,
        "family": record.family,
        "max_length": record.max_length,
        "pad_token_id": record.pad_token_id,
        "uses_token_type_ids": record.uses_token_type_ids,
        "revision": record.revision,
    }
    model: CrossEncoderModel | BiEncoderModel = KINDS[ModelKind(record.kind)].rebuild(
        fields, asdict(record), tokenizer, instruction
    )
    return model
