"""The architecture table: where the gated FFN output projection lives in each model.

One row per family; `model_type` (from the transformers config) picks the row. Adding an
architecture means adding a row here, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nkv.errors import NKVUnsupportedModelError
from nkv.fingerprint import compute_fingerprint
from nkv.header import BaseModelInfo


@dataclass(frozen=True)
class ArchSpec:
    """How to find layer `l`'s FFN output projection (its input is the NKV key)."""

    layers: str  # attribute path of the ModuleList of blocks
    out_proj: str  # path of the output projection inside one block
    conv1d: bool = False  # GPT-2 style Conv1D: weight is (d_key, d_model), transposed

    def module_path(self, layer: int) -> str:
        return f"{self.layers}.{layer}.{self.out_proj}"


_LLAMA_LIKE = ArchSpec("model.layers", "mlp.down_proj")

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec("transformer.h", "mlp.c_proj", conv1d=True),
    "gptj": ArchSpec("transformer.h", "mlp.fc_out"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gpt_neox": ArchSpec("gpt_neox.layers", "mlp.dense_4h_to_h"),
    "falcon": ArchSpec("transformer.h", "mlp.dense_4h_to_h"),
    "opt": ArchSpec("model.decoder.layers", "fc2"),
}


def arch_spec(model_type: str) -> ArchSpec:
    """The table row for `model_type`, or an error that lists what is supported."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise NKVUnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}. "
            "Add a row to loaders/architectures.py (layers path, output projection path)."
        ) from None


def model_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        raise NKVUnsupportedModelError(
            f"{type(model).__name__} has no config.model_type; expected a transformers PreTrainedModel")
    return model_type


def blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks."""
    return model.get_submodule(arch_spec(model_type_of(model)).layers)


def output_projection(model: nn.Module, layer: int) -> nn.Module:
    """Layer `layer`'s FFN output projection module (whose input is the key)."""
    spec = arch_spec(model_type_of(model))
    n_layers = len(model.get_submodule(spec.layers))
    if not 0 <= layer < n_layers:
        raise NKVUnsupportedModelError(f"layer {layer} does not exist: the model has {n_layers} layers (0..{n_layers - 1})")
    return model.get_submodule(spec.module_path(layer))


def projection_weight(model: nn.Module, layer: int) -> torch.Tensor:
    """Layer `layer`'s output projection weight as a (d_model, d_key) matrix."""
    spec = arch_spec(model_type_of(model))
    module = output_projection(model, layer)
    module = getattr(module, "base_layer", module)  # an attached NKV wrapper keeps the original
    return module.weight.T if spec.conv1d else module.weight


def base_model_info(model: nn.Module, layer: int, name: str | None = None,
                    revision: str | None = None) -> BaseModelInfo:
    """Identity of `model` as an adapter at `layer` records it (nkv.base.*)."""
    spec = arch_spec(model_type_of(model))
    weight = projection_weight(model, layer).detach()
    d_model, d_key = weight.shape
    config = model.config
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    return BaseModelInfo(
        name=name or getattr(config, "_name_or_path", "") or type(model).__name__,
        architecture=architectures[0],
        model_type=config.model_type,
        n_layers=len(model.get_submodule(spec.layers)),
        d_model=d_model,
        d_key=d_key,
        fingerprint=compute_fingerprint(weight),
        revision=revision,
    )


__all__ = ["ArchSpec", "ARCHITECTURES", "arch_spec", "model_type_of", "blocks", "output_projection",
           "projection_weight", "base_model_info"]
