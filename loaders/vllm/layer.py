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
from nkv.compat import check_gamma
from nkv.gate import key_inverse_norms, nkv_gate

from .slot import SlotInfo


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
        self.begin()

    def forward(self, x: torch.Tensor) -> Any:
        out = self.base_layer(x)
        y, bias = out if self._return_bias else (out, None)
        # Every rank runs the gate: its all-reduces are collective even where nothing is added.
        delta = nkv_gate(x, self.nkv_keys, self.nkv_key_inv_norms, self.nkv_residuals, self.nkv_gamma,
                         fact_chunk=self.fact_chunk, all_reduce=self._all_reduce).delta
        if self._add_delta:
            y = y + delta.to(y.dtype)
        return (y, bias) if self._return_bias else y

    # ------------------------------------------------------------ changes
    # A change is staged, then committed: `apply_swap` stages on every rank first and
    # commits only when all succeeded, and can roll every rank back (see swap.py).
    _BUFFERS = ("nkv_keys", "nkv_key_inv_norms", "nkv_residuals", "nkv_gamma")

    def begin(self, change: str | None = None) -> None:
        """Start change `change` (an id): forget the previous change's staged and saved rows."""
        self._change = change
        self._staged: tuple[dict[str, torch.Tensor], SlotInfo] | None = None
        self._previous: tuple[dict[str, torch.Tensor], SlotInfo] | None = None

    @torch.no_grad()
    def stage(self, adapter: NKVAdapter | None, gamma: float | None = None, source: str | None = None,
              revision: str | None = None, digest: str | None = None) -> None:
        """Prepare `adapter`'s rows (this rank's key slice, padded to capacity) without touching
        the live buffers; None stages an empty table. The caller checks compatibility
        (`slot.check_adapter`) and calls `begin`; only invariants that would corrupt memory are asserted."""
        self._staged = None
        rows = {name: torch.zeros_like(getattr(self, name), device="cpu") for name in self._BUFFERS}
        if adapter is None:
            rows["nkv_gamma"].fill_(1.0)
            self._staged = rows, _replace(self.slot, n_facts=0, gamma=None, source=None, revision=None, digest=None)
            return
        n = adapter.n_facts
        assert n <= self.slot.capacity and adapter.keys.shape[1] == self.slot.d_key
        rows["nkv_keys"][:n] = adapter.keys[:, self.col_start:self.col_start + self.d_key_local]
        # Norms of the full stored rows, before any rounding to the serving dtype.
        rows["nkv_key_inv_norms"][:n] = key_inverse_norms(adapter.keys)
        rows["nkv_residuals"][:n] = adapter.residuals
        value = check_gamma(adapter.gamma if gamma is None else gamma)
        rows["nkv_gamma"].fill_(value)
        self._staged = rows, _replace(self.slot, n_facts=n, gamma=value, source=source, revision=revision,
                                      digest=digest)

    @torch.no_grad()
    def commit(self) -> None:
        """Copy the staged rows into the live buffers (in place: compiled graphs keep seeing them),
        keeping the old rows until `rollback` or the next change."""
        assert self._staged is not None, "commit() without stage()"
        self._previous = {name: getattr(self, name).detach().to("cpu", copy=True) for name in self._BUFFERS}, \
            self.slot
        self._write(*self._staged)
        self._staged = None

    @torch.no_grad()
    def rollback(self, change: str | None = None) -> None:
        """Undo change `change` on this rank: drop staged rows, put back the rows its commit
        replaced. A rank that failed before `begin(change)` holds another change: left as is."""
        if change != self._change:
            return
        previous = self._previous
        self.begin()
        if previous is not None:
            self._write(*previous)

    def _write(self, rows: dict[str, torch.Tensor], slot: SlotInfo) -> None:
        for name in self._BUFFERS:
            getattr(self, name).copy_(rows[name])
        self.slot = slot

    def load(self, adapter: NKVAdapter, gamma: float | None = None, source: str | None = None,
             revision: str | None = None, digest: str | None = None) -> None:
        """Stage and commit `adapter` on this rank alone (start-up, tests)."""
        self.begin()
        self.stage(adapter, gamma=gamma, source=source, revision=revision, digest=digest)
        self.commit()
        self.begin()

    def clear(self) -> None:
        """All rows padding: the gate never fires and outputs equal the base model's."""
        self.begin()
        self.stage(None)
        self.commit()
        self.begin()

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


def _replace(slot: SlotInfo, **changes: Any) -> SlotInfo:
    return SlotInfo.from_dict({**slot.to_dict(), **changes})


__all__ = ["NKVGatedProjection", "gated_module"]
