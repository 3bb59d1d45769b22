"""TensorRT: FP16 engines built from the ONNX export, for NVIDIA GPUs.

LayerNorm, softmax, reductions and the final outputs are pinned to FP32 through precision
constraints (FP16 overflow in BERT LayerNorm is a known cause of wrong scores). One optimization
profile per sequence-length bucket covers exactly the shapes the batcher can form. The serialized
engine is cached under the model hash, TensorRT version, GPU compute capability and profiles.

``tensorrt`` is an optional dependency (the ``gpu`` extra), imported only when this engine loads.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from sidecar.errors import ModelLoadError
from sidecar.model.batch import TokenBatch
from sidecar.model.cache import ArtifactCache
from sidecar.model.engines.base import Engine, require_precision
from sidecar.model.engines.registry import EngineInputs, EngineShape, EngineSpec, offer
from sidecar.model.export import OUTPUT_NAME, ExportedModel

logger = logging.getLogger(__name__)

# Sequence-length buckets get their own profile, so kernels are tuned for short and long batches alike;
# long-context families (XLM-R as bge-m3, ModernBERT, decoder rerankers: 8192 tokens) get doubling
# buckets up to their limit rather than one tuned only for full-length batches.
_BUCKET_BOUNDS = (64, 128, 256, 512, 1024, 2048, 4096)
# Bumped whenever the build recipe (constraints, flags) changes, so cached plans are rebuilt.
_BUILD_RECIPE = "fp32-norm-softmax-reduce-outputs-v1-fp32-without-tf32"
_WORKSPACE_BYTES = 4 << 30


def tensorrt_precisions(device: str) -> tuple[str, ...]:
    return ("fp16", "fp32") if device.startswith("cuda") else ()


def unavailable_reason(device: str) -> str | None:
    """Why TensorRT cannot run here, or None when it can be tried."""
    if not device.startswith("cuda"):
        return f"TensorRT needs a CUDA device; the device is {device}"
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA device; torch sees none"
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed (install the `gpu` extra)"
    return None


@dataclass(frozen=True, slots=True)
class ShapeProfile:
    """One TensorRT optimization profile: the (rows, columns) range of the batches it serves."""

    min_rows: int
    opt_rows: int
    max_rows: int
    min_columns: int
    opt_columns: int
    max_columns: int

    def shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        return (
            (self.min_rows, self.min_columns),
            (self.opt_rows, self.opt_columns),
            (self.max_rows, self.max_columns),
        )


def shape_profiles(max_batch_pairs: int, max_batch_tokens: int, max_length: int) -> tuple[ShapeProfile, ...]:
    """Profiles covering every batch the batcher forms: rows x columns <= the token budget.

    Each bucket of sequence lengths (lo, hi] allows as many rows as the budget gives its
    shortest length, and is tuned (opt) for a full batch of its longest length.
    """
    bounds = [bound for bound in _BUCKET_BOUNDS if bound < max_length] + [max_length]
    profiles = []
    low = 0
    for high in bounds:
        max_rows = max(1, min(max_batch_pairs, max_batch_tokens // (low + 1)))
        opt_rows = max(1, min(max_batch_pairs, max_batch_tokens // high))
        profiles.append(ShapeProfile(1, opt_rows, max_rows, low + 1, high, high))
        low = high
    return tuple(profiles)


def profile_index(profiles: tuple[ShapeProfile, ...], columns: int) -> int:
    for index, profile in enumerate(profiles):
        if profile.min_columns <= columns <= profile.max_columns:
            return index
    raise ValueError(f"a batch of {columns} tokens per row is longer than every TensorRT profile")


def engine_cache_key(
    fingerprint: str,
    *,
    precision: str,
    tensorrt_version: str,
    compute_capability: tuple[int, int],
    profiles: tuple[ShapeProfile, ...],
) -> dict[str, str]:
    return {
        "onnx": fingerprint,
        "precision": precision,
        "tensorrt": tensorrt_version,
        "compute_capability": f"{compute_capability[0]}.{compute_capability[1]}",
        "profiles": ";".join(",".join(map(str, profile.shapes())) for profile in profiles),
        "recipe": _BUILD_RECIPE,
    }


def _import_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError as exc:
        raise ModelLoadError(
            f"the tensorrt engine needs the tensorrt package (install the `gpu` extra): {exc}"
        ) from exc
    return tensorrt


def _build_plan(
    trt: ModuleType,
    onnx_path: Path,
    input_names: tuple[str, ...],
    profiles: tuple[ShapeProfile, ...],
    precision: str,
    target: Path,
) -> None:
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # explicit batch: the only mode in TensorRT 10
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise ModelLoadError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, _WORKSPACE_BYTES)
    if precision == "fp32":
        # TensorRT runs fp32 matmuls as TF32 on Ampere and later unless told not to, which is not the fp32
        # the parity gate holds to 1e-4.
        config.clear_flag(trt.BuilderFlag.TF32)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = _pin_fp32_layers(trt, network)
        logger.info("TensorRT FP16 build: %d of %d layers pinned to FP32", pinned, network.num_layers)
    for profile in profiles:
        optimization_profile = builder.create_optimization_profile()
        minimum, optimum, maximum = profile.shapes()
        for name in input_names:
            optimization_profile.set_shape(name, minimum, optimum, maximum)
        config.add_optimization_profile(optimization_profile)
    monitor = _progress_monitor(trt)
    config.progress_monitor = monitor
    logger.info("building a TensorRT %s engine (this takes minutes); profiles %s", precision, profiles)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelLoadError("TensorRT failed to build the engine; its log above says why")
    target.write_bytes(bytes(plan))
    logger.info("TensorRT engine built: %d MiB", target.stat().st_size >> 20)


def _pin_fp32_layers(trt: ModuleType, network: Any) -> int:
    """Constrain LayerNorm, softmax, reductions and every layer producing an output to FP32."""
    sensitive = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE}
    output_names = {network.get_output(index).name for index in range(network.num_outputs)}
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        outputs = [layer.get_output(position) for position in range(layer.num_outputs)]
        if layer.type not in sensitive and not any(tensor.name in output_names for tensor in outputs):
            continue
        layer.precision = trt.float32
        for position, tensor in enumerate(outputs):
            if tensor.dtype == trt.float32:
                layer.set_output_type(position, trt.float32)
        pinned += 1
    return pinned


def _progress_monitor(trt: ModuleType) -> Any:
    """A monitor that logs the top-level phases of a build; the caller keeps it alive during the build."""

    class BuildProgress(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                logger.info("TensorRT build: %s (%d steps)", phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            logger.debug("TensorRT build: %s done", phase_name)

    return BuildProgress()


class TensorRTEngine(Engine):
    name = "tensorrt"
    compiled = True
    # One execution context per profile, whose shapes and addresses every call sets: a second
    # thread would overwrite them mid-launch.
    concurrent_forward = False

    def __init__(
        self,
        exported: ExportedModel,
        cache: ArtifactCache,
        *,
        precision: str,
        device: str,
        profiles: tuple[ShapeProfile, ...],
    ) -> None:
        reason = unavailable_reason(device)
        if reason is not None:
            raise ModelLoadError(reason)
        require_precision(self.name, precision, device, tensorrt_precisions(device))
        trt = _import_tensorrt()
        super().__init__(precision=precision, device=device)
        self._device = torch.device(device)
        key = engine_cache_key(
            exported.fingerprint,
            precision=precision,
            tensorrt_version=trt.__version__,
            compute_capability=torch.cuda.get_device_capability(self._device),
            profiles=profiles,
        )
        with torch.cuda.device(self._device):
            plan_path = cache.get_or_build(
                "tensorrt",
                key,
                "model.plan",
                lambda target: _build_plan(
                    trt, exported.path, exported.input_names, profiles, precision, target
                ),
            )
            self._trt_logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._trt_logger)
            self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
            if self._engine is None:
                raise ModelLoadError(f"TensorRT could not deserialize the cached engine {plan_path}")
            self._stream = torch.cuda.Stream(self._device)
            # One execution context per profile, each bound to its profile once.
            self._contexts = []
            for index in range(len(profiles)):
                context = self._engine.create_execution_context()
                context.set_optimization_profile_async(index, self._stream.cuda_stream)
                self._contexts.append(context)
            self._stream.synchronize()
        dtypes = {
            trt.int32: torch.int32,
            trt.int64: torch.int64,
            trt.float32: torch.float32,
            trt.float16: torch.float16,
        }
        self._tensor_dtypes = {
            self._engine.get_tensor_name(index): dtypes[
                self._engine.get_tensor_dtype(self._engine.get_tensor_name(index))
            ]
            for index in range(self._engine.num_io_tensors)
        }
        self._input_names = exported.input_names
        self._profiles = profiles
        logger.info("tensorrt engine ready: %s on %s, %d profiles", precision, device, len(profiles))

    def forward(self, batch: TokenBatch) -> np.ndarray:
        rows, columns = batch.shape
        index = profile_index(self._profiles, columns)
        step = self._profiles[index].max_rows
        arrays = batch.as_dict()
        return np.concatenate(
            [
                self._run(
                    self._contexts[index],
                    {name: arrays[name][start : start + step] for name in self._input_names},
                )
                for start in range(0, rows, step)
            ]
        )

    def _run(self, context: Any, arrays: dict[str, np.ndarray]) -> np.ndarray:
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            # The tensors must outlive the launch: they are held in `inputs` until synchronize.
            inputs = {
                name: torch.from_numpy(array).to(self._device, dtype=self._tensor_dtypes[name])
                for name, array in arrays.items()
            }
            for name, tensor in inputs.items():
                context.set_input_shape(name, tuple(tensor.shape))
                context.set_tensor_address(name, tensor.data_ptr())
            outputs = torch.empty(
                tuple(context.get_tensor_shape(OUTPUT_NAME)),
                dtype=self._tensor_dtypes[OUTPUT_NAME],
                device=self._device,
            )
            context.set_tensor_address(OUTPUT_NAME, outputs.data_ptr())
            if not context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed; its log says why")
            result = outputs.float().cpu()  # on this stream, so it waits for the engine
        self._stream.synchronize()
        return result.numpy()

    def close(self) -> None:
        self._contexts.clear()
        self._engine = None
        self._runtime = None


def _build(inputs: EngineInputs, shape: EngineShape, precision: str) -> Engine:
    return TensorRTEngine(
        inputs.exported(),
        inputs.cache,
        precision=precision,
        device=shape.device,
        profiles=shape_profiles(shape.max_batch_pairs, shape.max_batch_tokens, shape.max_length),
    )


SPEC = EngineSpec(
    "tensorrt", lambda device: offer(unavailable_reason(device), lambda: tensorrt_precisions(device)), _build
)
