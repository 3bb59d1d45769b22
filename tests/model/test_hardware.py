"""What the engine choice reads off the CPU: its ISA class, and whether int8 is offered."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidecar.errors import ModelLoadError
from sidecar.model import hardware
from sidecar.model.engines.onnxruntime_engine import int8_withheld_reason, onnxruntime_precisions
from sidecar.model.engines.registry import Unavailable, engine_spec
from sidecar.model.engines.selection import plan_candidates
from sidecar.model.hardware import CpuInfo, parse_cpuinfo

# The first lines of /proc/cpuinfo on the three classes this project has run on (flags abridged).
ZEN2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7R32
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2

processor\t: 1
model name\t: AMD EPYC 7R32
"""
ZEN4 = """processor\t: 0
model name\t: AMD EPYC 9R14
flags\t\t: sse4_2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni avx512vbmi
"""
SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni
"""


@pytest.mark.parametrize(
    ("text", "model", "isa_class", "int8_dot"),
    [
        (ZEN2, "AMD EPYC 7R32", "avx2", False),
        (ZEN4, "AMD EPYC 9R14", "avx512-vnni-bf16", True),
        (SAPPHIRE_RAPIDS, "Intel(R) Xeon(R) Platinum 8488C", "amx", True),
        ("", "x86_64", "x86_64", False),
    ],
)
def test_each_cpu_class_is_named(text: str, model: str, isa_class: str, int8_dot: bool):
    cpu = parse_cpuinfo(text, "x86_64")
    assert (cpu.model, cpu.isa_class, cpu.has_int8_dot) == (model, isa_class, int8_dot)
    assert cpu.describe() == f"{model} ({isa_class})"


def test_this_machine_has_a_name_and_class():
    cpu = hardware.cpu_info()
    assert cpu.model
    assert cpu.isa_class


@pytest.fixture
def cpu_without_vnni(monkeypatch: pytest.MonkeyPatch) -> None:
    zen2 = parse_cpuinfo(ZEN2, "x86_64")
    monkeypatch.setattr("sidecar.model.engines.onnxruntime_engine.cpu_info", lambda: zen2)


def test_without_int8_dot_products_int8_is_not_offered_and_says_why(cpu_without_vnni):
    assert onnxruntime_precisions("cpu") == ("fp32",)
    reason = int8_withheld_reason("cpu")
    assert reason is not None
    assert "AMD EPYC 7R32 (avx2)" in reason
    assert "VNNI" in reason
    offers = {
        "tensorrt": Unavailable("no GPU"),
        "onnxruntime": ("fp32",),
        "openvino": ("fp32",),
        "torch": ("fp32",),
    }
    withheld = {name: engine_spec(name).withheld("cpu") for name in offers}
    candidates, notes = plan_candidates("auto", "auto", offers, withheld)
    assert [str(candidate) for candidate in candidates] == ["onnxruntime/fp32", "openvino/fp32", "torch/fp32"]
    assert notes[1] == f"onnxruntime/int8: not offered here: {reason}"
    with pytest.raises(ModelLoadError, match="onnxruntime: does not run int8 here: this CPU"):
        plan_candidates("onnxruntime", "int8", offers, withheld)


def test_with_int8_dot_products_int8_is_offered(monkeypatch: pytest.MonkeyPatch):
    zen4 = parse_cpuinfo(ZEN4, "x86_64")
    monkeypatch.setattr("sidecar.model.engines.onnxruntime_engine.cpu_info", lambda: zen4)
    assert onnxruntime_precisions("cpu") == ("int8", "fp32")
    assert int8_withheld_reason("cpu") is None
    assert isinstance(zen4, CpuInfo)


def cgroup_tree(root: Path, files: dict[str, str], membership: str) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = root / "proc-self-cgroup"
    proc.write_text(membership)
    return proc


@pytest.mark.parametrize(
    ("files", "membership", "cpus"),
    [
        ({"cpu.max": "250000 100000\n"}, "0::/\n", 2.5),  # v2, a namespace of its own
        ({"kubepods/pod1/c1/cpu.max": "100000 100000\n"}, "0::/kubepods/pod1/c1\n", 1.0),  # v2, the host's
        ({"cpu.max": "max 100000\n"}, "0::/\n", 0.0),  # v2, no limit
        (
            {"cpu,cpuacct/cpu.cfs_quota_us": "200000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
            "4:memory:/\n3:cpu,cpuacct:/\n0::/\n",
            2.0,
        ),  # v1 (its unified hierarchy holds no cpu controller)
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "1:cpu:/\n", 0.0),
        ({}, "", 0.0),  # nothing to read
    ],
)
def test_the_cpu_quota_is_read_from_cgroup_v2_or_v1(
    tmp_path: Path, files: dict, membership: str, cpus: float
):
    proc = cgroup_tree(tmp_path, files, membership)
    assert hardware.cpu_quota(tmp_path, proc) == cpus


def test_usable_cpus_are_the_affinity_capped_by_the_quota(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(hardware, "cpu_quota", lambda root, proc: 0.0)
    assert hardware.usable_cpus() == 64
    monkeypatch.setattr(hardware, "cpu_quota", lambda root, proc: 2.5)
    assert hardware.usable_cpus() == 2  # rounded down: a thread past the quota waits for it
    monkeypatch.setattr(hardware, "cpu_quota", lambda root, proc: 0.5)
    assert hardware.usable_cpus() == 1
