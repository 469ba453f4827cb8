"""Attach the gated module while vLLM loads the model, before anything is compiled.

vLLM compiles the model on its first (warm-up) forward and drops all guards, so a module
swapped in after `LLM()` returns is never seen by the compiled graph. The one moment
every loader shares, in every worker, before that first forward, is
`BaseModelLoader.load_model`; `install()` wraps it (once per process, idempotently):

1. read `additional_config["nkv"]` (engines without it are left untouched);
2. around `load_weights`, fingerprint the model (nkvfp2, spec §6): the output projections
   of the target layer and its neighbours, and the input embedding. On CPU vLLM repacks
   the projections afterwards and leaves empty tensors, so this is the last moment they
   can be read. Under tensor parallelism each rank sums `fingerprint_partial` over its
   column slice of each projection and `embedding_partial` over its rows of the
   vocabulary (without vLLM's padding rows), and the sums are all-reduced;
3. after loading, replace the target projection by `NKVGatedProjection` (and, in families
   that normalise the FFN output, that norm by `NKVOutNorm`: spec §5, residual site) with
   `capacity` preallocated rows, load the start adapters if any, and make the
   `nkv_*` collective_rpc methods available on the worker (and, with named adapters,
   the per-request routing of router.py).
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any

import torch
from torch import nn

from nkv.errors import NKVCompatibilityError, NKVUnsupportedModelError
from nkv.fingerprint import covered_layers, embedding_partial, fingerprint_partial, model_fingerprint_finalize

from ..architectures import arch_spec, residual_site
from .config import NKVServeConfig, section_of
from . import router
from .layer import NKVGatedProjection, NKVOutNorm
from .slot import SlotInfo, check_adapter
from .swap import SwapRequest, pin_and_read
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
    read: list[tuple[SwapRequest, NKVAdapter]] = []  # the engine-wide adapter (name None) first, then the named ones
    if config.adapter:
        read.append(pin_and_read(config.adapter, config.revision, strict=config.strict, gamma=config.gamma))
    for named in config.adapters:
        read.append(pin_and_read(named.adapter, named.revision, strict=config.strict, gamma=named.gamma,
                                 name=named.name))
    starts = [start for start, _ in read]
    adapters = [adapter for _, adapter in read]
    layers = {a.layer for a in adapters} | ({config.layer} if config.layer is not None else set())
    if len(layers) > 1:
        raise NKVCompatibilityError(
            "additional_config['nkv'] gates one layer, but its adapters and 'layer' name layers "
            + ", ".join(f"{a.layer} ({s.source})" for a, s in zip(adapters, starts))
            + (f" and {config.layer} ('layer')" if config.layer is not None else "")
            + "; build them at one layer, or drop 'layer'")
    layer = layers.pop()
    capacity = sum(a.n_facts for a in adapters) if config.capacity is None else config.capacity
    model_type = model_config.hf_config.model_type
    path = arch_spec(model_type).module_path(layer)

    fingerprint: dict[str, str | None] = {}
    load_weights = loader.load_weights

    def load_weights_then_fingerprint(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        result = load_weights(model, *args, **kwargs)
        fingerprint["value"] = _fingerprint(model, layer, model_type)
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
        tp_rank=base.tp_rank, tp_size=base.tp_size, max_adapters=config.max_adapters,
        residual_site=residual_site(model_type),
    )
    module = NKVGatedProjection(base, slot, dtype=model_config.dtype, device=_device_of(base),
                                fact_chunk=config.fact_chunk, all_reduce=tensor_model_parallel_all_reduce,
                                max_tokens=_max_tokens_per_step(vllm_config), sketch=config.sketch,
                                shortlist=config.shortlist)
    _put(model, path, module)
    norm_path = arch_spec(model_type).out_norm_path(layer)
    if norm_path:  # site "out_norm": the rows are added after the block's FFN-output norm
        _put(model, norm_path, NKVOutNorm(_norm(model, norm_path, model_type), module))
    for adapter, start in zip(adapters, starts):
        check_adapter(adapter, module.slot, strict=config.strict, name=start.name)
        module.load(adapter, gamma=start.gamma, source=start.source, revision=start.revision, digest=start.digest,
                    name=start.name)
    _enable_worker_methods(vllm_config)
    if config.routed:
        router.install()
    logger.info("NKV: gated %s (capacity %d, tp %d/%d) with %s", path, capacity, slot.tp_rank, slot.tp_size,
                ", ".join(f"{a.n_facts} facts from {s.source}" + (f" as {s.name!r}" if s.name else "")
                          for a, s in zip(adapters, starts)) or "no facts yet")
    return model


def _max_tokens_per_step(vllm_config: Any) -> int:
    """Room for the per-token routing: the most tokens one forward can hold (padding included)."""
    scheduled = vllm_config.scheduler_config.max_num_batched_tokens
    captured = getattr(vllm_config.compilation_config, "max_cudagraph_capture_size", None) or 0
    return max(scheduled, captured)


def _put(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, module)


def _norm(model: nn.Module, path: str, model_type: str) -> nn.Module:
    """The FFN-output norm at `path`, or an error naming the layout vLLM has instead."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise NKVUnsupportedModelError(
            f"vLLM's {type(model).__name__} has no module {path!r}, where {model_type!r} blocks normalise the "
            "FFN output (NKV adds rows after it); this vLLM model class is laid out differently") from None


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
def _fingerprint(model: nn.Module, layer: int, model_type: str) -> str | None:
    """nkvfp2 fingerprint of the whole model from this rank's slices (spec §6), or None when the
    target projection's weight cannot be read (quantized or repacked: check_adapter says so).

    A neighbour projection or an embedding that cannot be read is left out of the string, so
    an adapter whose fingerprint covers it is refused with that part named, while an nkvfp1
    adapter (the target projection only) is still checked."""
    spec = arch_spec(model_type)
    n_layers = len(model.get_submodule(spec.layers))
    projections = {other: _target(model, spec.module_path(other), model_type)
                   for other in covered_layers(layer, n_layers)}
    sums, dims = {}, {}
    for other, projection in projections.items():
        weight = _readable(projection)
        if weight is not None:
            sums[other] = fingerprint_partial(weight, col_start=projection.tp_rank * projection.input_size_per_partition)
            dims[other] = (projection.output_size, projection.input_size)
    if layer not in sums:
        return None
    tp_rank, tp_size = projections[layer].tp_rank, projections[layer].tp_size
    embedding = _input_embedding(model)
    table = _readable(embedding) if embedding is not None else None
    if table is not None and embedding.tp_size not in (1, tp_size):
        table = None  # sharded over another group: the sums would not add up over this one
    if table is not None:
        # Rank-local rows 0..num_org_elements-1 are token ids org_vocab_start_index...; the rest are
        # padding (and LoRA's added vocabulary), which the checkpoint does not have. A replicated
        # embedding (disable_tp) is counted on rank 0 only.
        shard = embedding.shard_indices
        rows = table[: shard.num_org_elements] if embedding.tp_size == tp_size or tp_rank == 0 else table[:0]
        sums["emb"] = embedding_partial(rows, vocab=embedding.org_vocab_size, row_start=shard.org_vocab_start_index)
    names = list(sums)
    stacked = torch.stack([sums[name] for name in names])  # (parts, N_PROBES + 1), float64 on CPU
    if tp_size > 1:
        import torch.distributed as dist
        from vllm.distributed.parallel_state import get_tp_group

        # gloo on the CPU group: float64 sums, tiny, once per start-up. Every rank holds the same parts.
        dist.all_reduce(stacked, group=get_tp_group().cpu_group)
    total = dict(zip(names, stacked))
    emb = (total["emb"], table.shape[1], embedding.org_vocab_size) if table is not None else None
    return model_fingerprint_finalize(layer, {other: (total[other], *dims[other]) for other in dims}, emb)


def _readable(module: nn.Module) -> torch.Tensor | None:
    weight = getattr(module, "weight", None)
    if weight is None or not weight.is_floating_point() or weight.dim() != 2 or weight.numel() == 0:
        return None
    return weight.detach()


def _input_embedding(model: nn.Module) -> nn.Module | None:
    """The model's token embedding: its first VocabParallelEmbedding that is not the LM head."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding) and not isinstance(module, ParallelLMHead):
            return module
    return None


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
