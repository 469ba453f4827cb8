"""Attach the gated module while vLLM loads the model, before anything is compiled.

vLLM compiles the model on its first (warm-up) forward and drops all guards, so a module
swapped in after `LLM()` returns is never seen by the compiled graph. The one moment
every loader shares, in every worker, before that first forward, is
`BaseModelLoader.load_model`; `install()` wraps it (once per process, idempotently):

1. read `additional_config["nkv"]` (engines without it are left untouched);
2. around `load_weights`, fingerprint the target projection's weight: on CPU vLLM
   repacks it afterwards and leaves an empty tensor, so this is the last moment it can
   be read. Under tensor parallelism each rank sums `fingerprint_partial` over its
   column slice and the sums are all-reduced;
3. after loading, replace the target projection by `NKVGatedProjection` with
   `capacity` preallocated rows, load the start adapter if any, and make the
   `nkv_*` collective_rpc methods available on the worker.
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any

import torch
from torch import nn

from nkv.errors import NKVCompatibilityError, NKVUnsupportedModelError
from nkv.fingerprint import fingerprint_finalize, fingerprint_partial

from ..architectures import arch_spec
from .config import NKVServeConfig, section_of
from .layer import NKVGatedProjection
from .slot import SlotInfo, check_adapter
from .swap import pin, read_pinned
from .worker import NKVWorkerExtension

# Under "vllm." so messages go through vLLM's own handlers and format, in every process.
logger = logging.getLogger("vllm.nkv")

_MARK = "_nkv_wrapped"
_ACTIVE = "_nkv_loading"  # set on a loader while NKV attaches during its load_model


def install() -> None:
    """Wrap `BaseModelLoader.load_model`, and every loader class that overrides it, once;
    calling again is a no-op. (A loader defined later that overrides it without calling
    the base method is caught by guard.py's start-up check.)"""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    for cls in [BaseModelLoader, *_subclasses(BaseModelLoader)]:
        original = cls.__dict__.get("load_model")
        if original is not None and not getattr(original, _MARK, False):
            cls.load_model = _wrapped(original)


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def _wrapped(original: Any) -> Any:
    @functools.wraps(original)
    def load_model(self: Any, vllm_config: Any, model_config: Any, prefix: str = "") -> nn.Module:
        section = section_of(vllm_config.additional_config)
        # Drafter models (speculative decoding) come through here too: only the served model is gated.
        # An overriding loader that calls super().load_model reaches a second wrapper: attach once.
        if section is None or model_config is not vllm_config.model_config or getattr(self, _ACTIVE, False):
            return original(self, vllm_config, model_config, prefix)
        setattr(self, _ACTIVE, True)
        try:
            return _load_with_nkv(original, self, vllm_config, model_config, prefix,
                                  NKVServeConfig.from_mapping(section))
        finally:
            delattr(self, _ACTIVE)

    setattr(load_model, _MARK, True)
    return load_model


def _load_with_nkv(original: Any, loader: Any, vllm_config: Any, model_config: Any, prefix: str,
                   config: NKVServeConfig) -> nn.Module:
    quantization = getattr(model_config, "quantization", None)
    if quantization:
        raise NKVUnsupportedModelError(
            f"this model is quantized ({quantization}); NKV reads and fingerprints the float weight of the FFN "
            "output projection, which quantized layers do not hold. Serve the unquantized checkpoint "
            "(dtype bfloat16 or float16) with NKV")
    pp = vllm_config.parallel_config.pipeline_parallel_size
    if pp > 1:
        # The gated layer would live on one stage only; swaps and checks assume every rank has it.
        raise NKVUnsupportedModelError("NKV in vLLM supports tensor parallelism, not pipeline parallelism "
                                       f"(pipeline_parallel_size={pp}); use tensor_parallel_size instead")
    # Each rank pins the start adapter to a commit and a digest; the engine's start-up check
    # (guard.py) refuses to start unless every rank loaded the same bytes.
    start = pin(config.adapter, config.revision, strict=config.strict, gamma=config.gamma)[0] if config.adapter \
        else None
    adapter = read_pinned(start) if start is not None else None
    if adapter is not None and config.layer is not None and config.layer != adapter.layer:
        raise NKVCompatibilityError(f"additional_config['nkv'] says layer {config.layer}, but the adapter "
                                    f"{config.adapter} edits layer {adapter.layer}; drop 'layer' or make them "
                                    "agree")
    layer = adapter.layer if config.layer is None else config.layer
    capacity = adapter.n_facts if config.capacity is None else config.capacity
    model_type = model_config.hf_config.model_type
    path = arch_spec(model_type).module_path(layer)

    fingerprint: dict[str, str | None] = {}
    load_weights = loader.load_weights

    def load_weights_then_fingerprint(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        result = load_weights(model, *args, **kwargs)
        fingerprint["value"] = _fingerprint(_target(model, path, model_type))
        return result

    loader.load_weights = load_weights_then_fingerprint  # instance attribute: this load only
    try:
        model = original(loader, vllm_config, model_config, prefix)
    finally:
        del loader.load_weights

    base = _target(model, path, model_type)
    from vllm.distributed import tensor_model_parallel_all_reduce

    slot = SlotInfo(
        module=path, layer=layer, capacity=capacity, model_type=model_type,
        n_layers=len(model.get_submodule(arch_spec(model_type).layers)),
        d_model=base.output_size, d_key=base.input_size, fingerprint=fingerprint.get("value"),
        tp_rank=base.tp_rank, tp_size=base.tp_size,
    )
    module = NKVGatedProjection(base, slot, dtype=model_config.dtype, device=_device_of(base),
                                fact_chunk=config.fact_chunk, all_reduce=tensor_model_parallel_all_reduce)
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, module)
    if adapter is not None:
        assert start is not None
        check_adapter(adapter, module.slot, strict=config.strict)
        module.load(adapter, gamma=config.gamma, source=start.source, revision=start.revision, digest=start.digest)
    _enable_worker_methods(vllm_config)
    logger.info("NKV: gated %s (capacity %d, tp %d/%d) with %s", path, capacity, slot.tp_rank, slot.tp_size,
                f"{adapter.n_facts} facts from {config.adapter}" if adapter is not None else "no facts yet")
    return model


def _target(model: nn.Module, path: str, model_type: str) -> nn.Module:
    """The row-parallel projection at `path`, or an error naming what is there instead."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise NKVUnsupportedModelError(
            f"vLLM's {type(model).__name__} has no module {path!r} (architecture table row for "
            f"{model_type!r}); this vLLM model class is laid out differently from transformers'") from None
    if not isinstance(module, RowParallelLinear):
        raise NKVUnsupportedModelError(
            f"{path} in vLLM's {type(model).__name__} is a {type(module).__name__}, expected a RowParallelLinear "
            "(the FFN output projection); NKV cannot gate this model in vLLM yet")
    if not getattr(module, "input_is_parallel", True):
        raise NKVUnsupportedModelError(f"{path} splits its own input (input_is_parallel=False); not supported")
    return module


@torch.no_grad()
def _fingerprint(projection: nn.Module) -> str | None:
    """Fingerprint of the full (d_model, d_key) weight from this rank's column slice."""
    weight = getattr(projection, "weight", None)
    if weight is None or not weight.is_floating_point() or weight.dim() != 2 or weight.numel() == 0:
        return None  # quantized or already repacked: cannot be compared, check_adapter says so
    sums = fingerprint_partial(weight.detach(), col_start=projection.tp_rank * projection.input_size_per_partition)
    if projection.tp_size > 1:
        import torch.distributed as dist
        from vllm.distributed.parallel_state import get_tp_group

        # gloo on the CPU group: float64 sums, tiny, once per start-up.
        dist.all_reduce(sums, group=get_tp_group().cpu_group)
    return fingerprint_finalize(sums, d_model=projection.output_size, d_key=projection.input_size)


def _device_of(module: nn.Module) -> torch.device:
    for tensor in [*module.parameters(), *module.buffers()]:
        return tensor.device
    return torch.device("cpu")


def _enable_worker_methods(vllm_config: Any) -> None:
    """Add `NKVWorkerExtension` to the worker class, as vLLM does for `worker_extension_cls`.

    This lets `llm.collective_rpc("nkv_info")` (and the nkv_apply swaps) work without the user passing
    `worker_extension_cls`; an engine started with it already set is left as is.
    """
    worker_cls = vllm_config.parallel_config.worker_cls
    if not isinstance(worker_cls, str):
        return
    module_name, _, class_name = worker_cls.rpartition(".")
    worker_class = getattr(importlib.import_module(module_name), class_name)
    if not issubclass(worker_class, NKVWorkerExtension):
        worker_class.__bases__ = worker_class.__bases__ + (NKVWorkerExtension,)


__all__ = ["install"]
