"""The gated retrieval: the whole inference-time method, in one pure function.

Every loader (transformers, vLLM) calls `nkv_gate`; spec/nkv-format.md §5 gives the
same computation as reference pseudocode. It works on the last dimension only, so it
serves `(B, T, d_key)` activations from transformers and `(num_tokens, d_key)` from vLLM.

It is written to be traced by torch.compile: no `.item()`, no Python branch on tensor
values, loops only over static sizes (the number of facts), gamma a tensor.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

DEFAULT_FACT_CHUNK = 8192


class GateResult(NamedTuple):
    delta: torch.Tensor  # (..., d_model) residual to add: R1[j] where fired, else 0
    index: torch.Tensor  # (...,) int64, best fact j (meaningful where fired)
    score: torch.Tensor  # (...,) float32, cosine of the best fact
    fired: torch.Tensor  # (...,) bool, score > gamma


def key_inverse_norms(keys: torch.Tensor) -> torch.Tensor:
    """1 / ||K_i|| per row, in float32; 0 for all-zero (padding) rows.

    A padding row then scores exactly 0. It can still win the argmax (when every real row
    scores below 0, or there is none), but a score of 0 never exceeds gamma >= 0, so it
    never fires; its residual is zero as well.
    """
    norms = keys.float().pow(2).sum(-1).sqrt()  # (n_facts,)
    return torch.where(norms > 0, 1.0 / norms.clamp_min(1e-30), torch.zeros_like(norms))


def unit_rows(x: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """x / ||x|| per row, in float32; 0 for all-zero rows. `sq_norm` (T,) is the full-width
    squared norm (all-reduced under tensor parallelism, so a rank scales its slice by it).

    Normalising *before* the product in the keys' dtype keeps every dot product within
    ||K_i||, whatever the activation's scale: real models' "massive activations" (x400)
    overflowed fp16 products to inf and fired the gate on unrelated tokens.
    """
    return x.float() * torch.rsqrt(sq_norm.clamp_min(1e-24)).unsqueeze(-1)  # (T, d_key)


def nkv_gate(
    k: torch.Tensor,
    keys: torch.Tensor,
    key_inv_norms: torch.Tensor,
    residuals: torch.Tensor,
    gamma: torch.Tensor,
    *,
    fact_chunk: int = DEFAULT_FACT_CHUNK,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> GateResult:
    """Cosine-gated nearest-fact residual for every row of `k`.

    Args:
        k: (..., d_key) input of the output projection (the FFN key) per token.
        keys: (n_facts, d_key) K1 in the activation dtype; under tensor parallelism the
            rank's column slice (n_facts, d_key / tp).
        key_inv_norms: (n_facts,) float32 1/||K1_i|| over the *full* d_key (0 = padding).
        residuals: (n_facts, d_model) R1 in the output dtype.
        gamma: () float tensor, the threshold; the gate fires when cos > gamma.
        fact_chunk: facts scored at once; memory is bounded by rows(k) * fact_chunk.
        all_reduce: sums a tensor over tensor-parallel ranks (in place or returned);
            None on a single device. Partial dot products and squared norms are reduced
            before the argmax so every rank picks the same fact.
    Returns:
        GateResult(delta, index, score, fired); add `delta` to the projection's output.

    Example:
        >>> out = down_proj(k)
        >>> out = out + nkv_gate(k, K, key_inverse_norms(K), R, torch.tensor(0.65)).delta
    """
    lead = k.shape[:-1]
    x = k.reshape(-1, k.shape[-1])  # (T, d_key)
    n_facts = keys.shape[0]
    if n_facts == 0:  # static shape, safe under tracing
        zeros = torch.zeros(x.shape[0], dtype=torch.float32, device=k.device)
        return GateResult(
            torch.zeros(*lead, residuals.shape[-1], dtype=residuals.dtype, device=k.device),
            torch.zeros(lead, dtype=torch.int64, device=k.device),
            zeros.reshape(lead),
            torch.zeros(lead, dtype=torch.bool, device=k.device),
        )

    sq_norm = x.float().pow(2).sum(-1)  # (T,)
    if all_reduce is not None:
        sq_norm = _reduced(all_reduce, sq_norm)

    best = torch.full((x.shape[0],), float("-inf"), dtype=torch.float32, device=k.device)
    best_idx = torch.zeros(x.shape[0], dtype=torch.int64, device=k.device)
    x_c = unit_rows(x, sq_norm).to(keys.dtype)  # (T, d_key) unit rows: no fp16 overflow
    for start in range(0, n_facts, fact_chunk):
        dots = (x_c @ keys[start : start + fact_chunk].T).float()  # (T, chunk)
        if all_reduce is not None:
            dots = _reduced(all_reduce, dots)
        scaled = dots * key_inv_norms[start : start + fact_chunk]  # (T, chunk) cosines
        chunk_best, chunk_idx = scaled.max(dim=-1)  # (T,), first index on ties
        better = chunk_best > best  # strict: earlier chunks win ties, like one argmax
        best = torch.where(better, chunk_best, best)
        best_idx = torch.where(better, chunk_idx + start, best_idx)

    score = best.clamp(-1.0, 1.0)  # (T,) rounding may leave |cos| a hair above 1
    fired = score > gamma
    rows = residuals.index_select(0, best_idx)  # (T, d_model)
    delta = rows * fired.unsqueeze(-1).to(rows.dtype)
    return GateResult(
        delta.reshape(*lead, residuals.shape[-1]),
        best_idx.reshape(lead),
        score.reshape(lead),
        fired.reshape(lead),
    )


def _reduced(all_reduce: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    out = all_reduce(t)
    return t if out is None else out


__all__ = ["GateResult", "nkv_gate", "key_inverse_norms", "DEFAULT_FACT_CHUNK"]
