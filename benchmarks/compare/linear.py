"""The linear editors NKV is compared with: MEMIT and AlphaEdit closed forms at one layer.

Both take the NKV adapter's own rows, so the three methods see the same facts, the same
keys and the same optimized residuals:

* K (d_key, n): the adapter's keys (method.md §3, the build's key computation);
* R (d_model, n): the adapter's residuals δ. MEMIT's target is z = h + δ at the layer's
  output; with a single edited layer the residual it distributes is z - h = δ, and the
  new FFN output it asks for is W k + δ (method.md §4: v̂ = W k + δ);
* C0 (d_key, d_key): mean of k kᵀ over the tokens of generic text at the same layer
  (MEMIT's `mom2`, there from 100k Wikipedia samples).

MEMIT:     Δ = R Kᵀ (λ C0 + K Kᵀ)⁻¹                      (λ: mom2_update_weight)
AlphaEdit: Δ = R Kᵀ P (K Kᵀ P + L·I)⁻¹, P = U Uᵀ over C0's eigenvectors with eigenvalue < τ

The original MEMIT/AlphaEdit spread the update over 5 (GPT-J: 3-8) layers; here it is one
layer, the adapter's, so that the keys and residuals are exactly the NKV ones.

Families that normalise the FFN output (Gemma 2/3, OLMo 2/3: residual site "out_norm",
spec §5) get NKV's rows after that norm N, but a weight edit changes N's input. There the
target is the change of W k that makes N's output point along N(W k) + δ
(`projection_targets`): N fixes the size of its output, so no edit of W can add more
than that direction; NKV's row can.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from nkv.adapter import NKVAdapter
from nkv.loaders.architectures import output_projection, projection_weight, residual_module
from nkv.editing.forward import model_device, pad_batch, pad_id_of

MEMIT_LAMBDA = 15_000.0  # MEMIT GPT-J / Llama mom2_update_weight
ALPHAEDIT_L2 = 10.0  # AlphaEdit's L2 for Llama-3
ALPHAEDIT_TAU = 2e-2  # method.md §6: null space = eigenvalues below this


@torch.no_grad()
def key_second_moment(model: nn.Module, tokenizer: Any, layer: int, lines: Sequence[str], max_tokens: int = 100_000,
                      chunk_tokens: int = 128, batch_size: int = 32) -> tuple[torch.Tensor, int]:
    """C0 = mean over tokens of k kᵀ at `layer` (float64), and how many tokens it averaged."""
    seqs, total = [], 0
    for line in lines:
        ids = list(tokenizer(line.strip())["input_ids"])[:chunk_tokens]
        if not line.strip() or not ids:
            continue
        ids = ids[: max_tokens - total]
        seqs.append(ids)
        total += len(ids)
        if total >= max_tokens:
            break
    device = model_device(model)
    module = output_projection(model, layer)
    d_key = projection_weight(model, layer).shape[1]
    c0 = torch.zeros(d_key, d_key, dtype=torch.float64, device=device)
    count = 0
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        ids, mask = pad_batch(chunk, pad_id_of(tokenizer), device)
        seen: dict[str, torch.Tensor] = {}
        handle = module.register_forward_pre_hook(lambda m, args: seen.__setitem__("k", args[0]))
        try:
            model(input_ids=ids, attention_mask=mask)
        finally:
            handle.remove()
        k = seen["k"].reshape(*ids.shape, -1)[mask.bool()].double()  # (real tokens, d_key)
        c0 += k.T @ k
        count += k.shape[0]
    return c0 / count, count


@torch.no_grad()
def projection_targets(model: nn.Module, adapter: NKVAdapter) -> torch.Tensor:
    """(n, d_model): the change of the output projection's output each fact asks for.

    The adapter's residuals where they are added to that output; for rows added after the
    FFN-output norm N (x ↦ g·x/rms(x)), the change d' − d of d = W k with N(d') along
    N(d) + δ and rms(d') = rms(d) (any positive multiple of d' gives the same N(d')).
    """
    residuals = adapter.residuals.float()
    if adapter.residual_site == "output":
        return residuals
    norm = residual_module(model, adapter.layer)
    weight = projection_weight(model, adapter.layer).float()
    device = weight.device
    d = adapter.keys.float().to(device) @ weight.T  # (n, d_model)
    gain = norm(torch.ones(1, d.shape[1], dtype=norm_dtype(norm), device=device)).float()[0]  # g (eps aside)
    rms = lambda x: x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)  # noqa: E731
    # A channel whose gain is ~0 (Gemma's (1 + w) with w = -1) passes nothing whatever W does:
    # it keeps d's own value instead of an unbounded 1/g.
    live = gain.abs() > 1e-2 * gain.abs().median()
    wanted = torch.where(live, (norm(d.to(norm_dtype(norm))).float() + residuals.to(device)) / gain.where(live, 1.0),
                         d / rms(d))  # ∝ d'
    return (wanted * rms(d) / rms(wanted) - d).cpu()


def norm_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters()), torch.float32)


def memit_delta(keys: torch.Tensor, residuals: torch.Tensor, c0: torch.Tensor, lam: float = MEMIT_LAMBDA
                ) -> torch.Tensor:
    """Δ (d_model, d_key) = R Kᵀ (λ C0 + K Kᵀ)⁻¹ with K = keysᵀ, R = residualsᵀ."""
    K = keys.double().T  # (d_key, n)
    R = residuals.double().T  # (d_model, n)
    A = lam * c0 + K @ K.T  # (d_key, d_key), symmetric positive definite
    return torch.linalg.solve(A, K @ R.T).T  # Δ = R Kᵀ A⁻¹ = (A⁻¹ K Rᵀ)ᵀ


def null_space_projector(c0: torch.Tensor, tau: float = ALPHAEDIT_TAU) -> tuple[torch.Tensor, int]:
    """P = U Uᵀ over the eigenvectors of C0 with eigenvalue < tau, and their number."""
    eigenvalues, vectors = torch.linalg.eigh(c0)
    small = vectors[:, eigenvalues < tau]  # (d_key, r)
    return small @ small.T, small.shape[1]


def alphaedit_delta(keys: torch.Tensor, residuals: torch.Tensor, projector: torch.Tensor, l2: float = ALPHAEDIT_L2
                    ) -> torch.Tensor:
    """Δ (d_model, d_key) = R Kᵀ P (K Kᵀ P + L·I)⁻¹ (AlphaEdit, one batch, no earlier edits)."""
    K = keys.double().T
    R = residuals.double().T
    eye = torch.eye(K.shape[0], dtype=torch.float64, device=K.device)
    # AlphaEdit solves (P K Kᵀ + L I) X = P K Rᵀ and takes Δ = Xᵀ; the same equation.
    X = torch.linalg.solve(projector @ K @ K.T + l2 * eye, projector @ K @ R.T)
    return X.T


@dataclass
class WeightEditHandle:
    """Quacks like an NKV handle for `evaluate_adapter`: `adapter`, and `disabled()` = original weights.

    The output projection's weight is replaced by W + Δ while attached; `detach()` puts the
    original tensor back bit for bit.
    """

    model: nn.Module
    adapter: NKVAdapter
    delta: torch.Tensor  # (d_model, d_key)

    def __post_init__(self) -> None:
        self.weight = projection_weight(self.model, self.adapter.layer)  # a view (transposed for Conv1D)
        self.original = self.weight.detach().clone()
        self.edited = (self.original.double() + self.delta.to(self.original.device)).to(self.original.dtype)
        self._set(self.edited)

    def _set(self, value: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight.copy_(value)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        self._set(self.original)
        try:
            yield
        finally:
            self._set(self.edited)

    def detach(self) -> None:
        self._set(self.original)


__all__ = ["key_second_moment", "projection_targets", "memit_delta", "null_space_projector", "alphaedit_delta", "WeightEditHandle",
           "MEMIT_LAMBDA", "ALPHAEDIT_L2", "ALPHAEDIT_TAU"]
