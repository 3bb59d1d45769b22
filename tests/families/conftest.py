"""One tiny random-weight model per reranker family, built once per session and saved locally."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from testkit.models import save_tiny_modernbert, save_tiny_qwen3_reranker, save_tiny_xlm_roberta
from tests import models

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "bert": models.save_tiny_bert,
    "xlm-roberta": save_tiny_xlm_roberta,
    "electra": models.save_tiny_electra,
    "deberta-v2": models.save_tiny_deberta_v2,
    "modernbert": save_tiny_modernbert,
    "qwen3-reranker": save_tiny_qwen3_reranker,
    "bge-reranker-gemma": models.save_tiny_bge_reranker_gemma,
}


class FamilyModels:
    """Builds each family's model on first use, so a run of one family builds only that one."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._built: dict[str, Path] = {}

    def __getitem__(self, name: str) -> Path:
        if name not in self._built:
            if name == "qwen3-reranker-seq-cls":
                self._built[name] = models.save_tiny_qwen3_seq_cls(self._root / name, self["qwen3-reranker"])
            else:
                self._built[name] = BUILDERS[name](self._root / name)
        return self._built[name]


@pytest.fixture(scope="session")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> FamilyModels:
    return FamilyModels(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="session")
def family_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for every family's start, so each family is exported once for all its engines."""
    return tmp_path_factory.mktemp("family-cache")
