"""What the engine choice depends on in the machine: the CPU's model and the ISA features that decide
speed, or the GPU. The remembered engine choice is keyed by it, and int8 is offered only where the CPU
has int8 instructions an engine's kernels use (dot products for ONNX Runtime; those or AVX-512 for
OpenVINO).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

# The x86 features that change which engine and precision is fastest, or whether it is exact.
SPEED_FEATURES = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
# bf16 arithmetic in hardware, not emulated in fp32.
_NATIVE_BF16_FEATURES = frozenset({"avx512_bf16", "amx_bf16"})
# int8 dot products without saturation: VNNI on x86, the dot-product extension on Arm.
_INT8_DOT_FEATURES = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})
# Variables that keep torch's and oneDNN's kernels to a smaller instruction set than the CPU has.
_ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    architecture: str
    features: frozenset[str]

    @property
    def isa_class(self) -> str:
        """One name per class of CPU this project is measured on, as benchmarks and Info print it."""
        has = self.features.__contains__
        if has("amx_tile"):
            return "amx"
        if has("avx512f"):
            extras = [name for name, flag in (("vnni", "avx512_vnni"), ("bf16", "avx512_bf16")) if has(flag)]
            return "-".join(["avx512", *extras])
        if has("avx2"):
            return "avx2"
        return self.architecture

    @property
    def has_int8_dot(self) -> bool:
        """Whether int8 GEMMs have dot-product instructions; without them ONNX Runtime's u8s8 x86
        kernels can saturate their 16-bit intermediate sums, which moves scores (its quantization guide)."""
        return bool(self.features & _INT8_DOT_FEATURES)

    @property
    def has_native_bf16(self) -> bool:
        """Whether the CPU computes bf16 in hardware (AVX512-BF16 or AMX), read without importing torch."""
        return bool(self.features & _NATIVE_BF16_FEATURES)

    def describe(self) -> str:
        return f"{self.model} ({self.isa_class})"


@functools.cache
def cpu_info() -> CpuInfo:
    return parse_cpuinfo(_read_cpuinfo(), platform.machine())


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def usable_cpus() -> int:
    """The cores this process may run on (its affinity), fewer where its container's CPU quota allows
    fewer (a Kubernetes CPU limit, ``docker run --cpus``): at least 1, the quota rounded down. Threads
    past the quota are throttled, not run, and a host's core count is not the pod's."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota(Path("/sys/fs/cgroup"), Path("/proc/self/cgroup"))
    return max(1, min(cores, int(quota))) if quota else cores


def cpu_quota(cgroup_root: Path, proc_cgroup: Path) -> float:
    """The CPUs the process's cgroup quota allows (cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``
    over ``cpu.cfs_period_us``), or 0 where it sets none or cannot be read."""
    try:
        memberships = proc_cgroup.read_text().splitlines()
    except OSError:
        memberships = []
    for line in memberships:
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "":  # v2: one unified hierarchy
            candidates = [cgroup_root / relative / "cpu.max", cgroup_root / "cpu.max"]
            for limit in candidates:
                with contextlib.suppress(OSError, ValueError):
                    quota, period = limit.read_text().split()
                    return 0.0 if quota == "max" else int(quota) / int(period)
        elif "cpu" in controllers.split(","):
            for directory in (cgroup_root / controllers / relative, cgroup_root / controllers):
                with contextlib.suppress(OSError, ValueError):
                    quota_us = int((directory / "cpu.cfs_quota_us").read_text())
                    period_us = int((directory / "cpu.cfs_period_us").read_text())
                    return quota_us / period_us if quota_us > 0 else 0.0
    return 0.0


def parse_cpuinfo(text: str, architecture: str) -> CpuInfo:
    """The model name and the feature flags of the first processor listed in ``/proc/cpuinfo``."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    model = fields.get("model name") or fields.get("Model") or platform.processor() or architecture
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return CpuInfo(model=model, architecture=architecture, features=frozenset(flags))


def device_fingerprint(device: str) -> dict[str, str]:
    """What identifies the hardware an engine choice was measured on: the CPU model and its speed
    features, plus the GPU's name, compute capability and driver on CUDA."""
    cpu = cpu_info()
    fingerprint = {
        "cpu": cpu.model,
        "cpu_features": ",".join(name for name in SPEED_FEATURES if name in cpu.features),
    }
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index or 0
        properties = torch.cuda.get_device_properties(index)
        fingerprint |= {
            "gpu": properties.name,
            "compute_capability": f"{properties.major}.{properties.minor}",
            "cuda": str(torch.version.cuda),
            "driver": _nvidia_driver_version(),
        }
    return fingerprint


def kernel_target() -> dict[str, str]:
    """What compiled CPU kernels are built for here: the CPU's model and speed features, and the
    variables that cap them. TorchInductor's cache does not tell apart kernels built for another
    instruction set: one reused under another gave wrong scores or aborted the process (with oneDNN and
    torch capped at AVX2, kernels built without the cap, and the other way round)."""
    return {**device_fingerprint("cpu"), **{name: os.environ.get(name, "") for name in _ISA_CAPS}}


def _nvidia_driver_version() -> str:
    try:
        first_line = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    except (OSError, IndexError):
        return "unknown"
    return first_line.split("Kernel Module")[-1].split()[0] if "Kernel Module" in first_line else first_line


def describe_device(device: str) -> str:
    """A line naming the hardware, for logs and benchmark records."""
    if device.startswith("cuda"):
        fingerprint = device_fingerprint(device)
        return f"{fingerprint['gpu']} (compute capability {fingerprint['compute_capability']})"
    return cpu_info().describe()
