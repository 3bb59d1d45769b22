"""Named conditions for tests that depend on the CPU's instruction set, so a skip says why."""

from __future__ import annotations

import pytest

from sidecar.model.engines.onnxruntime_engine import onnxruntime_precisions
from sidecar.model.engines.openvino_engine import openvino_precisions
from sidecar.model.engines.torch_engine import cpu_supports_bf16
from sidecar.model.hardware import cpu_info

THIS_CPU = cpu_info().describe()

needs_int8_dot_products = pytest.mark.skipif(
    "int8" not in onnxruntime_precisions("cpu"),
    reason=f"int8 needs int8 dot-product instructions (VNNI), which {THIS_CPU} lacks, so it is not offered",
)
needs_openvino_int8 = pytest.mark.skipif(
    "int8" not in openvino_precisions("cpu"),
    reason=f"OpenVINO's static int8 needs AVX-512 or int8 dot products (VNNI), which {THIS_CPU} lacks, "
    "so it is not offered",
)
needs_native_bf16 = pytest.mark.skipif(
    not cpu_supports_bf16(),
    reason=f"bf16 needs native bf16 arithmetic (AVX512-BF16 or AMX), which {THIS_CPU} lacks",
)
