"""The committed Python modules for the protos are exactly what protoc generates from them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_generator():
    spec = importlib.util.spec_from_file_location("generate", REPO / "protos" / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_the_protos(tmp_path: Path):
    generator = load_generator()
    generator.generate(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "protoc generated nothing"
    for relative in generated:
        committed = REPO / "protos" / relative
        assert committed.exists(), f"{relative} is not committed; run `python protos/generate.py`"
        assert committed.read_text() == (tmp_path / relative).read_text(), (
            f"{relative} is stale; run `python protos/generate.py` and commit the result"
        )
