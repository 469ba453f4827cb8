"""`NKVGatedProjection`: vLLM's row-parallel FFN output projection plus the NKV gate.

Wrap, don't patch: the projection (a `RowParallelLinear`, already loaded and processed)
is kept as `base_layer`; forward returns what it returns, with `nkv_gate(...).delta`
added to the reduced output. The module is put in place while vLLM loads the model,
before compilation, so it is traced into the compiled graph.

Buffers have a fixed size (`capacity` rows) chosen at start-up. Loading an adapter
copies its rows into them in place (`copy_`), which a compiled graph (and a CUDA graph,
which holds buffer addresses) keeps seeing; unused rows are padding: zero key, zero
residual, inverse norm 0. A padding row scores 0: it can win the argmax (when no real
row scores above 0) but never fires, since 0 never exceeds γ >= 0, and its residual is zero.

Tensor parallel: rank r sees the key slice `x[:, r*d/tp:(r+1)*d/tp]` and a replicated,
already reduced output. Its keys buffer holds the same column slice of K1, the inverse
norms are those of the *full* rows, and `nkv_gate` all-reduces the partial dot products
and squared norms before the argmax, so every rank picks the same fact; every rank then
adds that residual to its (identical) reduced output.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from nkv.adapter import NKVAdapter
from nkv.gate import key_inverse_norms, nkv_gate

from .slot import SlotInfo, check_adapter


class NKVGatedProjection(nn.Module):
    """(num_tokens, d_key / tp) -> what `base_layer` returns, plus the gated residual."""

    def __init__(self, base_layer: nn.Module, slot: SlotInfo, *, dtype: torch.dtype, device: torch.device,
                 fact_chunk: int, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slot = slot
        self.fact_chunk = fact_chunk
        self.d_key_local = slot.d_key // slot.tp_size
        self.col_start = slot.tp_rank * self.d_key_local
        # Static Python facts, read while tracing; never branch on tensor values here.
        self._all_reduce = all_reduce if slot.tp_size > 1 else None
        self._return_bias = bool(getattr(base_layer, "return_bias", False))
        # An unreduced output (reduce_results=False) is summed over ranks later, so only
        # rank 0 may add the residual there; a reduced one is replicated, so every rank does.
        reduced = bool(getattr(base_layer, "reduce_results", True)) or slot.tp_size == 1
        self._add_delta = reduced or slot.tp_rank == 0
        cap = slot.capacity
        self.register_buffer("nkv_keys", torch.zeros(cap, self.d_key_local, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("nkv_key_inv_norms", torch.zeros(cap, dtype=torch.float32, device=device),
                             persistent=False)
        self.register_buffer("nkv_residuals", torch.zeros(cap, slot.d_model, dtype=dtype, device=device),
                             persistent=False)
        # gamma is a buffer, not a Python float: a float would be baked into the graph.
        self.register_buffer("nkv_gamma", torch.tensor(1.0, dtype=torch.float32, device=device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> Any:
        out = self.base_layer(x)
        y, bias = out if self._return_bias else (out, None)
        # Every rank runs the gate: its all-reduces are collective even where nothing is added.
        delta = nkv_gate(x, self.nkv_keys, self.nkv_key_inv_norms, self.nkv_residuals, self.nkv_gamma,
                         fact_chunk=self.fact_chunk, all_reduce=self._all_reduce).delta
        if self._add_delta:
            y = y + delta.to(y.dtype)
        return (y, bias) if self._return_bias else y

    @torch.no_grad()
    def load(self, adapter: NKVAdapter, gamma: float | None = None, source: str | None = None,
             revision: str | None = None) -> None:
        """Copy `adapter`'s rows (this rank's key slice) into the buffers; pad the rest.

        The caller checks compatibility (`slot.check_adapter`); here only the invariants
        that would corrupt memory are asserted.
        """
        n = adapter.n_facts
        assert n <= self.slot.capacity and adapter.keys.shape[1] == self.slot.d_key
        keys = adapter.keys[:, self.col_start:self.col_start + self.d_key_local]
        # Norms of the full stored rows, before any rounding to the serving dtype.
        self.nkv_keys[:n].copy_(keys)
        self.nkv_keys[n:].zero_()
        self.nkv_key_inv_norms[:n].copy_(key_inverse_norms(adapter.keys))
        self.nkv_key_inv_norms[n:].zero_()
        self.nkv_residuals[:n].copy_(adapter.residuals)
        self.nkv_residuals[n:].zero_()
        value = float(adapter.gamma if gamma is None else gamma)
        self.nkv_gamma.fill_(value)
        self.slot = _replace(self.slot, n_facts=n, gamma=value, source=source, revision=revision)

    @torch.no_grad()
    def clear(self) -> None:
        """All rows padding: the gate never fires and outputs equal the base model's."""
        self.nkv_keys.zero_()
        self.nkv_key_inv_norms.zero_()
        self.nkv_residuals.zero_()
        self.nkv_gamma.fill_(1.0)
        self.slot = _replace(self.slot, n_facts=0, gamma=None, source=None, revision=None)

    def extra_repr(self) -> str:
        s = self.slot
        return (f"layer={s.layer}, capacity={s.capacity}, n_facts={s.n_facts}, d_key={s.d_key}, "
                f"tp_rank={s.tp_rank}/{s.tp_size}")


def gated_module(model: nn.Module) -> NKVGatedProjection | None:
    """The engine's gated module, or None when it was started without the nkv config."""
    for module in model.modules():
        if isinstance(module, NKVGatedProjection):
            return module
    return None


def load_into(module: NKVGatedProjection, adapter: NKVAdapter, *, strict: bool, gamma: float | None,
              source: str | None, revision: str | None = None) -> None:
    """Check `adapter` against the module's slot (`check_adapter`), then copy its rows in."""
    check_adapter(adapter, module.slot, strict=strict)
    module.load(adapter, gamma=gamma, source=source, revision=revision)


def _replace(slot: SlotInfo, **changes: Any) -> SlotInfo:
    return SlotInfo.from_dict({**slot.to_dict(), **changes})


__all__ = ["NKVGatedProjection", "gated_module", "load_into"]
