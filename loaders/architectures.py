"""The architecture table: where the gated FFN output projection lives in each model.

One row per family; `model_type` (from the transformers config) picks the row. Adding an
architecture means adding a row here, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nkv.adapter import NKVAdapter, empty_adapter
from nkv.errors import NKVUnsupportedModelError
from nkv.fingerprint import compute_model_fingerprint, covered_layers
from nkv.header import BaseModelInfo


@dataclass(frozen=True)
class ArchSpec:
    """How to find layer `l`'s FFN output projection (its input is the NKV key)."""

    layers: str  # attribute path of the ModuleList of blocks
    out_proj: str  # path of the output projection inside one block
    conv1d: bool = False  # GPT-2 style Conv1D: weight is (d_key, d_model), transposed
    # A norm the block applies to the FFN's output before adding it to the residual stream
    # (Gemma 2/3, OLMo 2/3: post_feedforward_layernorm). It fixes the size of whatever it
    # is given, so a row added before it is rescaled away; adapters for these families
    # add their rows to this norm's output instead (spec §5, "residual site").
    out_norm: str | None = None

    def module_path(self, layer: int) -> str:
        return f"{self.layers}.{layer}.{self.out_proj}"

    def out_norm_path(self, layer: int) -> str | None:
        return f"{self.layers}.{layer}.{self.out_norm}" if self.out_norm else None


_LLAMA_LIKE = ArchSpec("model.layers", "mlp.down_proj")
_POST_NORMED = ArchSpec("model.layers", "mlp.down_proj", out_norm="post_feedforward_layernorm")

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec("transformer.h", "mlp.c_proj", conv1d=True),
    "gptj": ArchSpec("transformer.h", "mlp.fc_out"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _POST_NORMED,
    "phi3": _LLAMA_LIKE,
    "gemma3_text": _POST_NORMED,
    # Gemma 3 4B/12B/27B load as Gemma3ForConditionalGeneration: the language model's
    # blocks sit under model.language_model; the vision tower is left alone.
    "gemma3": ArchSpec("model.language_model.layers", "mlp.down_proj", out_norm="post_feedforward_layernorm"),
    "olmo2": _POST_NORMED,
    "olmo3": _POST_NORMED,
    "smollm3": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "cohere": _LLAMA_LIKE,
    "cohere2": _LLAMA_LIKE,
    "stablelm": _LLAMA_LIKE,
    "starcoder2": ArchSpec("model.layers", "mlp.c_proj"),  # an nn.Linear despite the GPT-2 name
    "phi": ArchSpec("model.layers", "mlp.fc2"),
    "gpt_neox": ArchSpec("gpt_neox.layers", "mlp.dense_4h_to_h"),
    "falcon": ArchSpec("transformer.h", "mlp.dense_4h_to_h"),
    "opt": ArchSpec("model.decoder.layers", "fc2"),
}

# Mixture-of-experts families are refused, with this reason. Their FFN output projection
# is not one module: each token's FFN output is a router-weighted sum over the k experts it
# was routed to (transformers fuses the experts' down-projections into one 3-D tensor), so
# "the down_proj input at the subject's last token" lives in a different expert's space
# from one prompt to the next, and no single key space exists to compare cosines in.
# Where the gate should go: around the whole sparse-MoE block (`model.layers.{l}.mlp`),
# keyed on the block's input (the post-attention-normed hidden state, d_model wide), which
# every token passes through whatever the routing; the residual is added to the block's
# output exactly as to a dense FFN's. That needs a d_model-wide key, a fingerprint taken
# from the router and vLLM's FusedMoE layer instead of RowParallelLinear, so it is not done.
_MOE_REASON = ("it is a mixture-of-experts model: each token's FFN output is a routed sum over experts, so there "
               "is no single output projection whose input is the key; NKV would have to wrap the whole MoE "
               "block and key on its input, which is not implemented (see loaders/architectures.py)")
MOE_MODEL_TYPES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "gpt_oss", "granitemoe",
                             "granitemoehybrid", "deepseek_v2", "deepseek_v3", "llama4", "dbrx", "jamba",
                             "phimoe", "minimax", "ernie4_5_moe", "glm4_moe", "hunyuan_v1_moe", "flex_olmo"})


def arch_spec(model_type: str) -> ArchSpec:
    """The table row for `model_type`, or an error that lists what is supported."""
    if model_type in MOE_MODEL_TYPES:
        raise NKVUnsupportedModelError(f"model_type {model_type!r} is not supported: {_MOE_REASON}")
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


def residual_site(model_type: str) -> str:
    """Where a row is added in this family's blocks (spec §5): "out_norm" (to the output of
    the norm applied to the FFN's output) where the table names one, else "output" (to the
    output projection's output)."""
    return "out_norm" if arch_spec(model_type).out_norm else "output"


def residual_module(model: nn.Module, layer: int) -> nn.Module:
    """The module at `layer` whose output a row is added to: the FFN-output norm where the
    family has one (`ArchSpec.out_norm`), else the output projection."""
    projection = output_projection(model, layer)  # also the layer range check
    path = arch_spec(model_type_of(model)).out_norm_path(layer)
    if path is None:
        return projection
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise NKVUnsupportedModelError(
            f"{type(model).__name__} has no module {path!r}, where {model_type_of(model)!r} blocks normalise the FFN "
            "output (NKV adds rows after it); this model class is laid out differently from the table's row") from None


def projection_weight(model: nn.Module, layer: int) -> torch.Tensor:
    """Layer `layer`'s output projection weight as a (d_model, d_key) matrix."""
    spec = arch_spec(model_type_of(model))
    module = output_projection(model, layer)
    module = getattr(module, "base_layer", module)  # an attached NKV wrapper keeps the original
    return module.weight.T if spec.conv1d else module.weight


def input_embedding_weight(model: nn.Module) -> torch.Tensor:
    """The (vocab, d_model) input embedding matrix (`get_input_embeddings()`), with its real rows only."""
    module = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise NKVUnsupportedModelError(
            f"{type(model).__name__}'s input embedding ({type(module).__name__}) has no float (vocab, d_model) "
            "weight; NKV fingerprints it to check the base model (quantized embeddings are not supported)")
    return weight


def model_fingerprint(model: nn.Module, layer: int) -> str:
    """nkvfp2 fingerprint of `model` for an adapter at `layer` (spec §6): the output projections
    of `layer` and its neighbours, and a sample of the input embedding's rows."""
    n_layers = len(blocks(model))
    projections = {}
    for other in covered_layers(layer, n_layers):
        weight = projection_weight(model, other).detach()
        if not weight.is_floating_point():
            raise NKVUnsupportedModelError(
                f"layer {other}'s output projection has no float weight (quantized?); NKV fingerprints the "
                f"projections of layers {covered_layers(layer, n_layers)} to check the base model")
        projections[other] = weight
    return compute_model_fingerprint(layer, projections, input_embedding_weight(model).detach())


def base_model_info(model: nn.Module, layer: int, name: str | None = None,
                    revision: str | None = None) -> BaseModelInfo:
    """Identity of `model` as an adapter at `layer` records it (nkv.base.*), with an nkvfp2 fingerprint."""
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
        fingerprint=model_fingerprint(model, layer),
        revision=revision,
    )


def empty_adapter_for(model: nn.Module, layer: int, gamma: float, dtype: torch.dtype = torch.float32,
                      name: str | None = None, revision: str | None = None) -> NKVAdapter:
    """An adapter with no rows yet for `model` at `layer`: its base model, gated module and
    residual site, as a build records them."""
    spec = arch_spec(model_type_of(model))
    return empty_adapter(base_model_info(model, layer, name=name, revision=revision), layer, spec.module_path(layer),
                         gamma=gamma, dtype=dtype, residual_site=residual_site(model_type_of(model)))


__all__ = ["ArchSpec", "ARCHITECTURES", "MOE_MODEL_TYPES", "arch_spec", "model_type_of", "blocks", "output_projection",
           "residual_site", "residual_module", "empty_adapter_for",
           "projection_weight", "input_embedding_weight", "model_fingerprint", "base_model_info"]
