"""Attach an NKV adapter to a transformers causal LM.

Wrap, don't patch: the output projection at the adapter's layer is replaced in its
parent by `NKVLinear`, which keeps the original as `base_layer` and returns
`base_layer(x) + nkv_gate(x, ...).delta`. Detaching puts the original module back, so
outputs are bit-identical to before. No global state is touched.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import torch
from torch import nn

from nkv.adapter import NKVAdapter
from nkv.compat import check_fingerprint, check_gamma, check_shape
from nkv.errors import NKVCompatibilityError, NKVUnsupportedModelError
from nkv.facts import Fact
from nkv.fingerprint import compute_fingerprint
from nkv.constants import DEFAULT_SHORTLIST, DEFAULT_SKETCH_DIM, SKETCH_MIN_FACTS
from nkv.gate import DEFAULT_FACT_CHUNK, GateResult, Sketch, fit_sketch, key_inverse_norms, nkv_gate, sketch_keys
from nkv.resolve import AdapterSource, resolve_adapter

from .architectures import arch_spec, blocks, model_type_of, output_projection, projection_weight

# Upper bound on the (tokens x facts) score matrix held at once: 2^25 float32 = 128 MiB.
SCORE_BUDGET = 2**25


@dataclass
class GateActivity:
    """What the gate did while recording: token counts, fires per fact, optional details."""

    fact_ids: list[str]
    tokens: int = 0
    fired: int = 0
    per_fact: Counter = field(default_factory=Counter)  # fact id -> tokens it fired on
    keep_results: bool = False
    results: list[GateResult] = field(default_factory=list)  # one per forward, if kept

    def update(self, result: GateResult) -> None:
        fired = result.fired
        self.tokens += fired.numel()
        n_fired = int(fired.sum())
        self.fired += n_fired
        if n_fired:
            for idx, count in zip(*torch.unique(result.index[fired], return_counts=True)):
                self.per_fact[self.fact_ids[int(idx)]] += int(count)
        if self.keep_results:
            self.results.append(GateResult(*(t.detach().cpu() for t in result)))

    @property
    def fire_rate(self) -> float:
        return self.fired / self.tokens if self.tokens else 0.0


class NKVLinear(nn.Module):
    """The output projection plus the NKV gate; shapes (..., d_key) -> (..., d_model)."""

    def __init__(self, base_layer: nn.Module, adapter: NKVAdapter, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base_layer = base_layer
        # Cast once here, never per call. Norms from the stored keys, before any rounding.
        self.register_buffer("nkv_keys", adapter.keys.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("nkv_key_inv_norms", key_inverse_norms(adapter.keys).to(device), persistent=False)
        self.register_buffer("nkv_residuals", adapter.residuals.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("nkv_gamma", torch.tensor(float(adapter.gamma), device=device), persistent=False)
        self.fact_ids = adapter.ids
        self.use_sketch(adapter, DEFAULT_SHORTLIST if adapter.n_facts >= SKETCH_MIN_FACTS else 0)
        self.enabled = True
        self.recorders: list[GateActivity] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.enabled:
            return out
        result = self.gate(x)
        for recorder in self.recorders:  # empty on the normal path: no host sync
            recorder.update(result)
        return out + result.delta.to(out.dtype)

    @torch.no_grad()
    def use_sketch(self, adapter: NKVAdapter, shortlist: int) -> None:
        """Gate by the sketch path (spec §5.1) with `shortlist` candidates per token, or exactly (0).

        Attach picks it from SKETCH_MIN_FACTS facts up; the projection is the file's
        `nkv.sketch.proj`, else fitted to the keys here.
        """
        self.shortlist = shortlist
        if not shortlist:
            self.register_buffer("nkv_sketch_proj", None, persistent=False)
            self.register_buffer("nkv_sketch_keys", None, persistent=False)
            return
        proj = adapter.sketch_proj if adapter.sketch_proj is not None else fit_sketch(adapter.keys, DEFAULT_SKETCH_DIM)
        device = self.nkv_keys.device
        self.register_buffer("nkv_sketch_proj", proj.to(device), persistent=False)  # (d_key, d_sketch) float32
        self.register_buffer("nkv_sketch_keys", sketch_keys(adapter.keys, proj).to(device, self.nkv_keys.dtype),
                             persistent=False)  # (n_facts, d_sketch)

    def gate(self, x: torch.Tensor) -> GateResult:
        """nkv_gate over x, in row blocks so (rows x facts) scores and the sketch path's
        (rows x shortlist x d_key) candidate rows stay under SCORE_BUDGET."""
        n_facts, d_key = self.nkv_keys.shape
        fact_chunk = min(DEFAULT_FACT_CHUNK, max(n_facts, 1))
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])  # (N, d_key)
        row_chunk = max(1, SCORE_BUDGET // max(fact_chunk, self.shortlist * d_key))
        sketch = Sketch(self.nkv_sketch_proj, self.nkv_sketch_keys, self.shortlist) if self.shortlist else None
        parts = [
            nkv_gate(rows[i : i + row_chunk], self.nkv_keys, self.nkv_key_inv_norms, self.nkv_residuals,
                     self.nkv_gamma, fact_chunk=fact_chunk, sketch=sketch)
            for i in range(0, max(rows.shape[0], 1), row_chunk)
        ]
        if len(parts) == 1:
            merged = parts[0]
        else:
            merged = GateResult(*(torch.cat(ts) for ts in zip(*parts)))
        return GateResult(merged.delta.reshape(*lead, -1), *(t.reshape(lead) for t in merged[1:]))


class NKVHandle:
    """What `load_nkv_adapter` returns for a transformers model.

    >>> handle = load_nkv_adapter(model, "edits.nkv")
    >>> with handle.disabled(): base_out = model(**inputs)   # adapter off temporarily
    >>> with handle.record() as activity: model(**inputs)    # which facts fired
    >>> handle.detach()                                      # original module restored
    """

    def __init__(self, model: nn.Module, adapter: NKVAdapter, module: NKVLinear, path: str):
        self.model = model
        self.adapter = adapter
        self.module = module
        self.path = path
        self._attached = True

    @property
    def facts(self) -> list[Fact]:
        return self.adapter.facts

    @property
    def info(self) -> dict[str, Any]:
        a = self.adapter
        return {"n_facts": a.n_facts, "layer": a.layer, "gamma": a.gamma, "module": self.path,
                "base": a.base.name, "attached": self._attached, "enabled": self.module.enabled}

    def detach(self) -> nn.Module:
        """Put the original output projection back; returns the model."""
        if self._attached:
            _set_submodule(self.model, self.path, self.module.base_layer)
            self._attached = False
        return self.model

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the model without the adapter inside the block (outputs equal the base model)."""
        previous = self.module.enabled
        self.module.enabled = False
        try:
            yield
        finally:
            self.module.enabled = previous

    @contextlib.contextmanager
    def record(self, keep_results: bool = False) -> Iterator[GateActivity]:
        """Count gate fires (and keep per-token index/score/fired if asked) inside the block."""
        activity = GateActivity(self.adapter.ids, keep_results=keep_results)
        self.module.recorders.append(activity)
        try:
            yield activity
        finally:
            self.module.recorders.remove(activity)

    def __repr__(self) -> str:
        return f"NKVHandle({self.info})"


def attach(model: nn.Module, adapter: AdapterSource, *, revision: str | None = None,
           strict: bool = True, gamma: float | None = None) -> NKVHandle:
    """Attach an adapter to a transformers causal LM (see `nkv.load_nkv_adapter`).

    `gamma` overrides the adapter's threshold (a number in [0, 1]).

    Raises:
        NKVUnsupportedModelError: the architecture is not in the table.
        NKVCompatibilityError: layer count or widths differ from the adapter's base model,
            or an adapter is already attached at that layer.
        NKVFingerprintError: different checkpoint (a warning instead when strict=False).
    """
    if gamma is not None:
        gamma = check_gamma(gamma, "load_nkv_adapter(gamma=...)")
    adapter = resolve_adapter(adapter, revision=revision)
    if gamma is not None:
        adapter = replace(adapter, gamma=gamma)
    spec = arch_spec(model_type_of(model))
    check_base(model, adapter, strict=strict)
    path = spec.module_path(adapter.layer)
    target = output_projection(model, adapter.layer)
    if isinstance(target, NKVLinear):
        # One adapter per layer keeps the gate's meaning simple (one argmax over one table);
        # adapters at different layers are independent and may be attached together.
        raise NKVCompatibilityError(
            f"an NKV adapter is already attached at {path}; merge the two first "
            "(`nkv merge A B -o AB.nkv` or NKVAdapter.merge) or detach the first handle")
    weight = target.weight
    dtype = weight.dtype if weight.is_floating_point() else getattr(model, "dtype", torch.float32)
    module = NKVLinear(target, adapter, dtype=dtype, device=weight.device)
    _set_submodule(model, path, module)
    return NKVHandle(model, adapter, module, path)


def check_base(model: nn.Module, adapter: NKVAdapter, strict: bool = True) -> None:
    """Compare the model with the adapter's recorded base model (the rules live in nkv.compat)."""
    expected, layer = adapter.base, adapter.layer
    model_type, n_layers = model_type_of(model), len(blocks(model))
    same_layout = model_type == expected.model_type and n_layers == expected.n_layers
    if same_layout:
        refuse_quantized(model, layer)
    weight = projection_weight(model, layer).detach() if same_layout else None
    d_model, d_key = weight.shape if weight is not None else (0, 0)
    check_shape(expected, layer, model_type=model_type, n_layers=n_layers, d_model=d_model, d_key=d_key)
    check_fingerprint(expected, layer, compute_fingerprint(weight), strict=strict, stacklevel=3)


def quantization_method(model_or_config: Any) -> str | None:
    """The `quant_method` of a model's (or config's) `quantization_config`, or None."""
    config = getattr(model_or_config, "config", model_or_config)
    qc = getattr(config, "quantization_config", None)
    if not qc:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method) or "unknown method")


def refuse_quantized(model: nn.Module, layer: int) -> None:
    """NKVUnsupportedModelError unless layer `layer`'s output projection holds a float weight.

    bitsandbytes int8/4-bit layers hold integer weights, GPTQ and AWQ layers packed `qweight`s
    and no `weight`: the gate's fingerprint and dtype come from the float weight, so such a
    layer is refused by name instead of failing as "wrong checkpoint" or AttributeError.
    (A dequantized model, such as a .gguf file transformers loaded, has float weights: fine.)
    """
    module = output_projection(model, layer)
    module = getattr(module, "base_layer", module)
    weight = getattr(module, "weight", None)
    packed = hasattr(module, "qweight") or not isinstance(weight, torch.Tensor) or not weight.is_floating_point()
    if packed:
        method = quantization_method(model) or type(module).__name__
        raise NKVUnsupportedModelError(
            f"the model is quantized ({method}): layer {layer}'s output projection is a {type(module).__name__} "
            "without a float weight, which NKV needs to check the base model and to gate; bitsandbytes, GPTQ "
            "and AWQ layers are not supported. Load the unquantized checkpoint (e.g. dtype=torch.bfloat16) "
            "to attach or build adapters")


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


__all__ = ["attach", "check_base", "refuse_quantized", "quantization_method", "NKVHandle", "NKVLinear",
           "GateActivity"]
