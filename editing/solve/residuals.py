"""Residuals (MEMIT's compute_z): one δ row per fact, many facts per forward/backward.

Per fact i, with h0_i its unedited hidden state at the subject and δ_i = s_i · u_i,
s_i = ||h0_i|| / sqrt(d_model) (see config.py for why):

    loss_i = mean over templates of the per-token NLL of target_new (teacher forced)
           + kl_factor · KL(P_δ || P_0) at the subject of "{subject} is a"
           + weight_decay · ||δ_i|| / ||h0_i||   (MEMIT divides by ||h0||²; see config.py)

δ_i is added to the output projection's output at the subject's last token of each of
fact i's prompts. The batch loss is the *sum* of the per-fact losses, so row i's gradient
is exactly fact i's gradient. Adam runs per row (its own step count and moments), a fact
whose loss falls below `early_stop_loss` is frozen and leaves the batch, and the clamp is
per row: every row follows the trajectory it would have alone (`reference.py` checks).
Like MEMIT, the loss is evaluated `steps` times and the last evaluation takes no step.

Speed without changing the numbers (batch.py): each step runs only the tokens from the
subject on, over a cache of everything before it, in a few length buckets; only the
positions the loss reads go through the LM head.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from nkv.loaders.architectures import output_projection

from ..forward import hooks, model_device, token_index
from .batch import FactBatch, Selection, make_cache
from .config import BuildConfig
from .prompts import FactTokens
from .replay import replayed

BETAS = (0.9, 0.999)  # torch.optim.Adam defaults, as in MEMIT
EPS = 1e-8


@dataclass
class ResidualResult:
    """Optimised residuals (n, d_model) float32, each fact's last loss and updates taken."""

    residuals: torch.Tensor
    loss: torch.Tensor  # (n,)
    steps: torch.Tensor  # (n,) int64, Adam updates applied to the row


def fact_losses(model: nn.Module, layer: int, sels: list[Selection], delta: torch.Tensor,
                kl_reference: torch.Tensor | None, replay: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forwards with `delta` (A, d_model) added; returns (nll, kl, KL-prompt log-probs), per fact.

    Only the gathered positions go through the LM head (a pre-hook on it selects them),
    so a 128k vocabulary costs (targets x vocab), not (batch x length x vocab).
    `replay` skips blocks 0..layer using their recorded outputs (replay.py).
    """
    n_active = delta.shape[0]
    nll = torch.zeros(n_active, device=delta.device)
    kl_parts, kl_owner = [], []
    for sel in sels:
        logp = _log_probs(model, layer, sel, delta, replay and sel.layer_out is not None)  # (E + K, V)
        n_targets = sel.labels.shape[0]
        token_lp = logp[:n_targets].gather(1, sel.labels.unsqueeze(1)).squeeze(1)  # (E,)
        nll = nll.index_add(0, sel.target_fact, -token_lp * sel.target_weight)
        kl_parts.append(logp[n_targets:])
        kl_owner.append(sel.kl_fact)
    order = torch.cat(kl_owner).argsort()
    kl_lp = torch.cat(kl_parts)[order]  # (A, V), row a = active fact a
    ref = kl_lp.detach() if kl_reference is None else kl_reference
    kl = (kl_lp.exp() * (kl_lp - ref)).sum(-1)  # KL(P_δ || P_0), (A,)
    return nll, kl, kl_lp.detach()


def _log_probs(model: nn.Module, layer: int, sel: Selection, delta: torch.Tensor, replay: bool) -> torch.Tensor:
    def with_delta(out: torch.Tensor) -> torch.Tensor:
        add = delta.index_select(0, sel.delta_fact).to(out.dtype)  # (D, d_model)
        where = token_index(out, sel.delta_rows, sel.delta_cols, sel.ids.shape[1])
        return out.index_put(where, add, accumulate=True)

    def gather(module: nn.Module, args: tuple) -> tuple:
        return (args[0][sel.gather_rows, sel.gather_cols].unsqueeze(0), *args[1:])  # (1, E + K, d)

    head = model.get_output_embeddings()
    cache = {"past_key_values": make_cache(sel.cache), "use_cache": True} if sel.cache is not None else {}
    if replay:  # blocks 0..layer replaced by their recorded output + δ
        edit = replayed(model, layer, sel.layer_out, with_delta, sel.layer_tuple)
    else:  # δ added to the output projection's output by a hook
        edit = hooks(output_projection(model, layer).register_forward_hook(lambda m, a, out: with_delta(out)))
    with edit, hooks(head.register_forward_pre_hook(gather)):
        logits = model(input_ids=sel.ids, attention_mask=sel.mask, position_ids=sel.positions,
                       **cache).logits[0]  # (E + K, V)
    return torch.log_softmax(logits.float(), dim=-1)


def total_loss(nll: torch.Tensor, kl: torch.Tensor, delta_norm: torch.Tensor, h0_norm: torch.Tensor,
               config: BuildConfig) -> torch.Tensor:
    """Per-fact loss: NLL + kl_factor · KL + weight_decay · ||δ|| / ||h0||."""
    return nll + config.kl_factor * kl + config.weight_decay * delta_norm / h0_norm


def optimize_residuals(model: nn.Module, layer: int, facts: list[FactTokens], h0: torch.Tensor,
                       config: BuildConfig, pad_id: int) -> ResidualResult:
    """Optimise δ for all `facts` together (one batch; the caller splits into batches).

    Args:
        h0: (n, d_model) unedited hidden states at each fact's subject (from compute_keys).
    """
    device = model_device(model)
    n, d_model = h0.shape
    batch = _prefix_cached_batch(model, layer, facts, pad_id, device, d_model)
    batch.record_layer(model, layer)
    replay = True
    h0_norm = h0.float().norm(dim=-1).clamp_min(1e-6)  # (n,)
    scale = (h0_norm / math.sqrt(d_model)).unsqueeze(1)  # (n, 1): δ = scale · u
    u = torch.zeros(n, d_model, device=device, requires_grad=True)
    m, v = torch.zeros_like(u), torch.zeros_like(u)
    t = torch.zeros(n, dtype=torch.long, device=device)
    kl0 = torch.zeros(0)
    final_loss = torch.zeros(n, device=device)
    max_u = config.clamp * math.sqrt(d_model)  # ||δ|| <= clamp·||h0||  <=>  ||u|| <= clamp·sqrt(d)
    active = list(range(n))
    for it in range(config.steps):
        sel = batch.select(active)
        a = torch.tensor(active, device=device)
        u_a = u.index_select(0, a)  # (A, d) differentiable view of the active rows
        delta = scale[a] * u_a
        if it == 0:  # first evaluation: δ = 0 gives P_0, and the replay is checked
            probe = scale[a] * torch.randn(delta.shape, generator=torch.Generator().manual_seed(0)).to(device) / 2
            nll, kl, kl_lp = _first_losses(model, layer, sel, delta, probe)
            replay = kl_lp is not None
            if not replay:
                nll, kl, kl_lp = fact_losses(model, layer, sel, delta, None)
            kl0 = kl_lp
        else:
            nll, kl, _ = fact_losses(model, layer, sel, delta, kl0[a], replay)
        loss = total_loss(nll, kl, delta.norm(dim=-1), h0_norm[a], config)  # (A,)
        final_loss[a] = loss.detach()
        keep = loss.detach() >= config.early_stop_loss
        if it == config.steps - 1 or not bool(keep.any()):
            break
        (grad,) = torch.autograd.grad(loss[keep].sum(), u)
        rows = a[keep]
        _adam_rows(u, grad, m, v, t, rows, config.lr)
        with torch.no_grad():
            norms = u[rows].norm(dim=-1, keepdim=True)
            u[rows] = u[rows] * torch.clamp(max_u / norms.clamp_min(1e-30), max=1.0)
        active = [i for i, k in zip(active, keep.tolist()) if k]
    residuals = (scale * u).detach()
    return ResidualResult(residuals, final_loss, t.clone())


def _prefix_cached_batch(model: nn.Module, layer: int, facts: list[FactTokens], pad_id: int,
                         device: torch.device, d_model: int) -> FactBatch:
    """The batch with its prefixes run once and cached, if that reproduces whole sequences on
    this model (checked at δ = 0); else whole sequences, with a warning.

    The check costs one forward without gradients per batch. It exists because some
    families' attention masks or caches (sliding-window layers, Gemma 2/3, OLMo 2/3 in
    transformers 5.19) do not give the same numbers over a left-padded cached prefix.
    """
    split = FactBatch(facts, pad_id, device, split=True)
    whole = FactBatch(facts, pad_id, device, split=False)
    if split.prefix_width == 0:
        return split
    if not split.prefill(model):  # a cache layout this code does not know
        return whole
    everyone = list(range(len(facts)))
    zero = torch.zeros(len(facts), d_model, device=device)
    with torch.no_grad():
        nll, _, lp = fact_losses(model, layer, split.select(everyone), zero, None, replay=False)
        ref_nll, _, ref_lp = fact_losses(model, layer, whole.select(everyone), zero, None, replay=False)
    if torch.allclose(nll, ref_nll, rtol=1e-3, atol=1e-3) and torch.allclose(lp, ref_lp, rtol=1e-3, atol=1e-3):
        return split
    warnings.warn(f"nkv build: a cached prefix does not reproduce {type(model).__name__}'s whole-sequence "
                  "forward; running whole sequences (slower, same result)", stacklevel=3)
    return whole


def _first_losses(model: nn.Module, layer: int, sels: list[Selection], delta: torch.Tensor, probe: torch.Tensor):
    """Losses through the replay path, if it reproduces the hooked full forward on this model;
    else (None, None, None) and a warning.

    Checked at δ = 0 and at a random `probe` δ of about half ||h0||: replay adds δ to the
    block's output, which is right only where the FFN output reaches the residual stream
    unchanged. Families that normalise or scale it first (Gemma 2/3 and OLMo 2/3's
    post-FFN norm, Granite's residual multiplier) agree at δ = 0 and differ at any other δ.
    """
    try:
        nll, kl, kl_lp = fact_losses(model, layer, sels, delta, None, replay=True)
        with torch.no_grad():
            ref_nll, _, ref_lp = fact_losses(model, layer, sels, delta, None, replay=False)
            probe_nll, _, _ = fact_losses(model, layer, sels, probe, None, replay=True)
            probe_ref, _, _ = fact_losses(model, layer, sels, probe, None, replay=False)
        ok = (torch.allclose(nll.detach(), ref_nll, rtol=1e-3, atol=1e-3)
              and torch.allclose(kl_lp, ref_lp, rtol=1e-3, atol=1e-3)
              and torch.allclose(probe_nll, probe_ref, rtol=1e-3, atol=1e-3))
    except Exception:  # a model loop the stand-ins do not fit
        ok = False
    if ok:
        return nll, kl, kl_lp
    warnings.warn(f"nkv build: replaying layer {layer} does not reproduce {type(model).__name__}'s forward; "
                  "running all layers (slower, same result)", stacklevel=3)
    return None, None, None


@torch.no_grad()
def _adam_rows(u: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: torch.Tensor,
               rows: torch.Tensor, lr: float) -> None:
    """torch.optim.Adam's update (no weight decay), applied to `rows` only, per-row step counts."""
    b1, b2 = BETAS
    g = grad[rows]
    t[rows] += 1
    step = t[rows].unsqueeze(1).float()
    m[rows] = b1 * m[rows] + (1 - b1) * g
    v[rows] = b2 * v[rows] + (1 - b2) * g * g
    bias1 = 1 - b1**step
    bias2 = 1 - b2**step
    denom = v[rows].sqrt() / bias2.sqrt() + EPS
    u[rows] = u[rows] - (lr / bias1) * m[rows] / denom


__all__ = ["optimize_residuals", "fact_losses", "total_loss", "ResidualResult"]
