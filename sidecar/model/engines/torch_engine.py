"""The fallback engine: the model's own PyTorch forward pass."""

from __future__ import annotations

import logging

import numpy as np
import torch

from sidecar.errors import ModelLoadError
from sidecar.model.batch import TokenBatch
from sidecar.model.engines.base import Engine
from sidecar.model.loading import ModelSource, load_failure

logger = logging.getLogger(__name__)


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {requested} was requested but torch sees no CUDA device")
    return requested


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, source: ModelSource, *, device: str = "auto", threads: int = 0) -> None:
        from transformers import AutoModelForSequenceClassification

        device = resolve_device(device)
        super().__init__(precision="fp32", device=device)
        if threads:
            torch.set_num_threads(threads)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                source.name, dtype=torch.float32, **source.from_pretrained_kwargs()
            )
        except Exception as exc:
            raise load_failure(source, "weights", exc) from exc
        self._model = model.eval().to(device)
        logger.info(
            "torch engine loaded %s on %s with %d threads", source.name, device, torch.get_num_threads()
        )

    def forward(self, batch: TokenBatch) -> np.ndarray:
        inputs = {name: torch.from_numpy(array).to(self.device) for name, array in batch.as_dict().items()}
        with torch.inference_mode():
            logits = self._model(**inputs).logits
        return logits.float().cpu().numpy()
