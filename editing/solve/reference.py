"""The one-fact-at-a-time reference: MEMIT's compute_z loop, same objective as the batch.

Each fact gets its own forward/backward per step and its own `torch.optim.Adam`. It is
the baseline of benchmarks/build and the check that batching changes nothing but speed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..forward import model_device
from .batch import FactBatch
from .config import BuildConfig
from .prompts import FactTokens
from .residuals import ResidualResult, fact_losses, finished, optimised_templates, step_templates, total_loss


def optimize_residual_one(model: nn.Module, layer: int, fact: FactTokens, h0: torch.Tensor,
                          config: BuildConfig, pad_id: int) -> tuple[torch.Tensor, float, int]:
    """δ (d_model,) for one fact; also its last loss and the number of Adam updates."""
    device = model_device(model)
    d_model = h0.shape[-1]
    h0_norm = h0.float().norm().clamp_min(1e-6).reshape(1)
    scale = h0_norm / math.sqrt(d_model)
    u = torch.zeros(1, d_model, device=device, requires_grad=True)
    opt = torch.optim.Adam([u], lr=config.lr)
    whole = FactBatch(optimised_templates([fact], config), pad_id, device, split=False)
    kl0 = None
    updates = 0
    loss = torch.zeros(1)
    for it in range(config.steps):
        opt.zero_grad()
        delta = scale * u
        sels = whole.select([0], step_templates(it, whole.n_templates, config), max_buckets=1)  # one forward, as MEMIT
        out = fact_losses(model, layer, sels, delta, kl0, preserve_loss=config.preserve_loss,
                          compute_dtype=config.compute_dtype)
        if kl0 is None:
            kl0 = out.kl_lp
        loss = total_loss(out, delta.norm(dim=-1), h0_norm, config)
        if it == config.steps - 1:
            break
        if bool(finished(loss.detach(), out.margin, config)[0]):
            if config.compute_dtype is None:
                break
            with torch.no_grad():  # under opt_dtype the stop must hold in the model's dtype too
                own = fact_losses(model, layer, sels, delta.detach(), kl0, preserve_loss=config.preserve_loss)
                if bool(finished(total_loss(own, delta.norm(dim=-1), h0_norm, config), own.margin, config)[0]):
                    break
        loss.sum().backward()
        opt.step()
        updates += 1
        max_u = config.clamp * math.sqrt(d_model)
        with torch.no_grad():
            if u.norm() > max_u:
                u.mul_(max_u / u.norm())
    return (scale * u).detach()[0], float(loss.detach()), updates


def optimize_residuals_reference(model: nn.Module, layer: int, facts: list[FactTokens], h0: torch.Tensor,
                                 config: BuildConfig, pad_id: int) -> ResidualResult:
    """`optimize_residuals`' contract, computed one fact at a time."""
    rows, losses, steps = [], [], []
    for i, fact in enumerate(facts):
        delta, loss, n = optimize_residual_one(model, layer, fact, h0[i], config, pad_id)
        rows.append(delta)
        losses.append(loss)
        steps.append(n)
    return ResidualResult(torch.stack(rows), torch.tensor(losses), torch.tensor(steps))


__all__ = ["optimize_residual_one", "optimize_residuals_reference"]
