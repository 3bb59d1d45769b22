"""The GPU-free parts of the TensorRT engine, and (marked gpu) a real build where CUDA is present."""

from __future__ import annotations

import numpy as np
import pytest

from sidecar.model.cache import ArtifactCache
from sidecar.model.engines.tensorrt_engine import (
    ShapeProfile,
    engine_cache_key,
    profile_index,
    shape_profiles,
    unavailable_reason,
)
from sidecar.model.parity import compare


@pytest.mark.parametrize(
    ("pairs", "tokens", "max_length"), [(32, 8192, 512), (64, 4096, 256), (8, 1024, 40), (32, 8192, 8192)]
)
def test_profiles_cover_every_batch_the_batcher_forms(pairs, tokens, max_length):
    profiles = shape_profiles(pairs, tokens, max_length)
    for columns in range(1, max_length + 1):
        rows = max(1, min(pairs, tokens // columns))
        profile = profiles[profile_index(profiles, columns)]
        assert profile.min_columns <= columns <= profile.max_columns
        assert profile.min_rows <= rows <= profile.max_rows
    for profile in profiles:
        assert profile.min_rows <= profile.opt_rows <= profile.max_rows
        assert profile.min_columns <= profile.opt_columns <= profile.max_columns


def test_profiles_split_sequence_lengths_into_buckets():
    profiles = shape_profiles(32, 8192, 512)
    assert [(profile.min_columns, profile.max_columns) for profile in profiles] == [
        (1, 64),
        (65, 128),
        (129, 256),
        (257, 512),
    ]
    assert profiles[-1] == ShapeProfile(1, 16, 31, 257, 512, 512)
    with pytest.raises(ValueError, match="longer than every TensorRT profile"):
        profile_index(profiles, 513)
    long_context = shape_profiles(32, 8192, 8192)
    assert [profile.max_columns for profile in long_context] == [64, 128, 256, 512, 1024, 2048, 4096, 8192]


def test_the_engine_cache_key_changes_with_each_input():
    profiles = shape_profiles(32, 8192, 512)
    base = {
        "precision": "fp16",
        "tensorrt_version": "10.8.0",
        "compute_capability": (8, 9),
        "profiles": profiles,
    }
    key = engine_cache_key("model-a", **base)
    variants = [
        engine_cache_key("model-b", **base),
        engine_cache_key("model-a", **{**base, "precision": "fp32"}),
        engine_cache_key("model-a", **{**base, "tensorrt_version": "10.9.0"}),
        engine_cache_key("model-a", **{**base, "compute_capability": (9, 0)}),
        engine_cache_key("model-a", **{**base, "profiles": shape_profiles(16, 8192, 512)}),
    ]
    assert all(variant != key for variant in variants)
    assert engine_cache_key("model-a", **base) == key


def test_tensorrt_is_unavailable_without_a_cuda_device():
    assert unavailable_reason("cpu") == "TensorRT needs a CUDA device; the device is cpu"


@pytest.mark.gpu
def test_fp16_engine_passes_the_gate_and_its_plan_is_reused(
    tiny_exported, tmp_path, tiny_reference, tiny_probe
):
    reason = unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(reason)
    from sidecar.model.engines.tensorrt_engine import TensorRTEngine

    cache = ArtifactCache(tmp_path)
    profiles = shape_profiles(32, 8192, 512)
    engine = TensorRTEngine(tiny_exported, cache, precision="fp16", device="cuda", profiles=profiles)
    report = compare(tiny_probe.scores(engine), tiny_probe.scores(tiny_reference), "fp16")
    assert report.passed, report.describe()
    plans = sorted(tmp_path.glob("tensorrt-*/model.plan"))
    assert len(plans) == 1
    built_at = plans[0].stat().st_mtime_ns
    again = TensorRTEngine(tiny_exported, cache, precision="fp16", device="cuda", profiles=profiles)
    assert plans[0].stat().st_mtime_ns == built_at
    batch = tiny_probe.batches[0]
    np.testing.assert_allclose(again.forward(batch), engine.forward(batch), atol=1e-6)
