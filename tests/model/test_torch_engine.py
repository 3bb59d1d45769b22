from __future__ import annotations

import pytest

from sidecar.errors import ModelLoadError
from sidecar.model.engines.torch_engine import TorchEngine, cpu_supports_bf16
from sidecar.model.parity import compare


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16")
def test_bf16_passes_the_parity_gate_and_leaves_the_reference_fp32(tiny_network, tiny_reference, tiny_probe):
    engine = TorchEngine(tiny_network, precision="bf16", device="cpu")
    report = compare(tiny_probe.scores(engine), tiny_probe.scores(tiny_reference), "bf16")
    assert report.passed, report.describe()
    assert report.max_abs_diff > 0  # it really ran in bf16
    assert next(tiny_network.parameters()).dtype.is_floating_point
    assert str(next(tiny_network.parameters()).dtype) == "torch.float32"


def test_fp16_is_refused_on_the_cpu(tiny_network):
    with pytest.raises(ModelLoadError, match="does not run fp16 on cpu"):
        TorchEngine(tiny_network, precision="fp16", device="cpu")
