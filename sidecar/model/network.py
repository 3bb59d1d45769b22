"""The PyTorch network an engine runs or exports: one forward signature for both model kinds.

A cross-encoder maps a batch of (query, document) pairs to logits [pairs, num_labels]; a
bi-encoder maps a batch of texts to pooled embeddings [texts, dims]. Both take
``(input_ids, attention_mask[, token_type_ids])`` so the torch engine, the ONNX export and the
compiled engines treat them alike.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from sidecar.model.loading import (
    ModelSource,
    Pooling,
    load_failure,
)


def _run(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None,
) -> Any:
    extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
    return model(input_ids=input_ids, attention_mask=attention_mask, **extra)


class _RankingNetwork(torch.nn.Module):
    def output_settings(self) -> str:
        """What shapes the outputs besides the config and the weights, for ``content_hash``."""
        return ""


class CrossEncoderNetwork(_RankingNetwork):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _run(self.model, input_ids, attention_mask, token_type_ids).logits


class BiEncoderNetwork(_RankingNetwork):
    def __init__(self, model: torch.nn.Module, pooling: Pooling) -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling

    def output_settings(self) -> str:
        return repr(self.pooling)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        states = _run(self.model, input_ids, attention_mask, token_type_ids).last_hidden_state
        if self.pooling.mode == "cls":
            pooled = states[:, 0]
        elif self.pooling.mode == "max":
            padding = (attention_mask == 0).unsqueeze(-1)
            pooled = states.masked_fill(padding, torch.finfo(states.dtype).min).max(dim=1).values
        else:
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        if self.pooling.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
        return pooled


class DecoderRerankerNetwork(_RankingNetwork):
    """A decoder LLM reranker: the backbone's state at each pair's last real token through a linear head.

    Batches are right-padded, so with causal attention every real token sees what it would see alone,
    at the same positions; the last one sits at ``length - 1``.
    """

    def __init__(self, model: torch.nn.Module, head: torch.nn.Linear) -> None:
        super().__init__()
        self.model = model
        self.head = head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # No key/value cache: one forward pass scores the pair, and the export traces no cache tensors.
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        states = outputs.last_hidden_state
        last = (attention_mask.sum(dim=1) - 1).view(-1, 1, 1).expand(-1, 1, states.shape[-1])
        return self.head(states.gather(1, last).squeeze(1))


def answer_head(vocabulary_projection: torch.nn.Linear, yes: int, no: int | None) -> torch.nn.Linear:
    """One logit, with no vocabulary-wide matrix product: yes minus no, whose sigmoid is the softmax of
    [no, yes], P(yes); or, with no ``no``, the yes logit itself."""

    def row(values: torch.Tensor) -> torch.Tensor:
        return values[yes] - values[no] if no is not None else values[yes]

    weight = vocabulary_projection.weight.detach()
    head = torch.nn.Linear(weight.shape[1], 1, bias=vocabulary_projection.bias is not None)
    with torch.no_grad():
        head.weight.copy_(row(weight).unsqueeze(0))
        if vocabulary_projection.bias is not None:
            head.bias.copy_(row(vocabulary_projection.bias.detach()).unsqueeze(0))
    return head


Network = CrossEncoderNetwork | BiEncoderNetwork | DecoderRerankerNetwork


def classifier_network(source: ModelSource, *, decoder: bool) -> CrossEncoderNetwork | DecoderRerankerNetwork:
    """A sequence-classification checkpoint; ``decoder`` marks a decoder LLM reranker, scored from its
    last token."""
    from transformers import AutoModelForSequenceClassification

    with _loading(source):
        classifier = AutoModelForSequenceClassification.from_pretrained(
            source.name, dtype=torch.float32, **source.from_pretrained_kwargs()
        )
    if decoder:
        return DecoderRerankerNetwork(classifier.base_model, classifier.score).eval()
    return CrossEncoderNetwork(classifier).eval()


def causal_lm_network(
    source: ModelSource, answer_token_ids: tuple[int, int | None]
) -> DecoderRerankerNetwork:
    """A decoder reranker's causal-LM checkpoint, its vocabulary projection replaced by a one-logit head
    from the rows of ``answer_token_ids`` (yes, and no or None)."""
    from transformers import AutoModelForCausalLM

    with _loading(source):
        causal = AutoModelForCausalLM.from_pretrained(
            source.name, dtype=torch.float32, **source.from_pretrained_kwargs()
        )
    head = answer_head(causal.get_output_embeddings(), *answer_token_ids)
    return DecoderRerankerNetwork(causal.get_decoder(), head).eval()


def bi_encoder_network(source: ModelSource, pooling: Pooling) -> BiEncoderNetwork:
    from transformers import AutoModel

    with _loading(source):
        model = AutoModel.from_pretrained(source.name, dtype=torch.float32, **source.from_pretrained_kwargs())
    return BiEncoderNetwork(model, pooling).eval()


@contextmanager
def _loading(source: ModelSource) -> Iterator[None]:
    try:
        yield
    except Exception as exc:  # transformers raises OSError, ValueError or hub errors
        raise load_failure(source, "weights", exc) from exc


# Config entries that say where or how a model was loaded, not what it computes.
_LOCATION_KEYS = ("_name_or_path", "_commit_hash", "transformers_version", "_attn_implementation_internal")


def content_hash(network: Network) -> str:
    """A digest of everything that determines the network's outputs: its kind, config and weights."""
    digest = hashlib.sha256(type(network).__name__.encode())
    config = {k: v for k, v in network.model.config.to_dict().items() if k not in _LOCATION_KEYS}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(network.output_settings().encode())
    for name, tensor in sorted(network.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
