"""The process set-up before anything loads: a --calibration-file nothing in this start can use is said
so, with the reason; TorchInductor's kernels are cached per CPU."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from sidecar.composition import prepare_process
from sidecar.model import hardware
from sidecar.model.hardware import parse_cpuinfo
from sidecar.serving import runtime as runtime_module
from sidecar.serving.runtime import calibration_unused_reason
from sidecar.settings import parse_settings

_AVX2_ALONE = "this CPU (AMD EPYC 7R32 (avx2)) has neither AVX-512 nor int8 dot products (VNNI)"


@pytest.fixture
def int8_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_module, "int8_withheld_reason", lambda: None)


@pytest.mark.parametrize(
    ("flags", "unused"),
    [
        pytest.param([], None, id="defaults"),
        pytest.param(["--engine", "openvino", "--precision", "int8"], None, id="openvino int8"),
        pytest.param(["--engine", "torch"], "--engine torch has no static int8", id="torch"),
        pytest.param(["--precision", "bf16"], "--precision bf16 leaves out static int8", id="bf16"),
        pytest.param(["--device", "cuda"], "static int8 runs on the CPU, and --device is cuda", id="cuda"),
    ],
)
def test_the_settings_say_whether_static_int8_can_calibrate(
    flags: list[str], unused: str | None, int8_offered: None
):
    settings = parse_settings(["--device", "cpu", *flags], {})
    reason = calibration_unused_reason(settings)
    if unused is None:
        assert reason is None
    else:
        assert reason is not None
        assert reason.startswith(unused)


def test_a_cpu_without_static_int8_leaves_the_file_unused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(runtime_module, "int8_withheld_reason", lambda: _AVX2_ALONE)
    reason = calibration_unused_reason(parse_settings(["--device", "cpu"], {}))
    assert reason == f"static int8 is not offered here: {_AVX2_ALONE}"


def test_the_start_warns_once_with_the_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, int8_offered: None
):
    # prepare_process sets process-wide variables (and glibc's mmap threshold unless one is set): here
    # only in a copy of the environment.
    monkeypatch.setattr(os, "environ", {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"query": "q", "text": "t"}\n')
    flags = ["--device", "cpu", "--engine", "onnxruntime", "--cache-dir", str(tmp_path / "cache")]
    with caplog.at_level(logging.WARNING, logger="sidecar.composition"):
        prepare_process(parse_settings([*flags, "--calibration-file", str(pairs)], {}))
        prepare_process(parse_settings(flags, {}))  # no file given: nothing to say
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == [
        f"--calibration-file {pairs} is not used: --engine onnxruntime has no static int8, "
        "the only candidate that calibrates"
    ]


def test_compiled_kernels_are_cached_per_cpu_and_instruction_set_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    def kernels_dir(cpu_flags: str, caps: dict[str, str]) -> str:
        cpu = parse_cpuinfo(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {cpu_flags}\n", "x86_64")
        monkeypatch.setattr(hardware, "cpu_info", lambda: cpu)
        # Without this environment's own caps and kernel folder (.ci/as-avx2 sets both).
        ours = {"TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"}
        environ = {key: value for key, value in os.environ.items() if key not in ours}
        monkeypatch.setattr(os, "environ", {**environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), **caps})
        prepare_process(parse_settings(["--cache-dir", str(tmp_path)], {}))
        return os.environ["TORCHINDUCTOR_CACHE_DIR"]

    avx512 = kernels_dir("avx2 avx512f avx512_vnni", {})
    assert Path(avx512).parent == tmp_path / "inductor"
    assert kernels_dir("avx2 avx512f avx512_vnni", {}) == avx512
    assert kernels_dir("avx2", {}) != avx512
    assert kernels_dir("avx2 avx512f avx512_vnni", {"ONEDNN_MAX_CPU_ISA": "AVX2"}) != avx512
