"""Residuals (MEMIT's compute_z): one δ row per fact, many facts per forward/backward.

Per fact i, with h0_i its unedited hidden state at the subject and δ_i = s_i · u_i,
s_i = ||h0_i|| / sqrt(d_model) (see config.py for why):

    loss_i = mean over templates of the per-token NLL of target_new (teacher forced)
           + kl_factor · KL(P_δ || P_0) at the subject of "{subject} is a"
           + preserve_factor · mean over the subject's probes of KL(P_δ || P_0) at the
             probe's end ("{subject} was born in", ...: its other facts; preserve.py), or of
             the drop in log-probability of the probe's unedited answer (`preserve_loss`)
           + weight_decay · ||δ_i|| / ||h0_i||   (MEMIT divides by ||h0||²; see config.py)

δ_i is added where the gate adds rows (the output projection's output; in families that
normalise the FFN output, that norm's output: `residual_module`) at the subject's last
token of each of fact i's prompts. The batch loss is the *sum* of the per-fact losses, so row i's gradient
is exactly fact i's gradient. Adam runs per row (its own step count and moments), a fact
whose loss falls below `early_stop_loss`, or (with `stop_margin`) whose every target token
is ranked first by that many nats on every template, is frozen and leaves the batch, and
the clamp is per row: every row follows the trajectory it would have alone (`reference.py`
checks). `opt_prefixes` optimises under the first templates only (keys use all of them).
Like MEMIT, the loss is evaluated `steps` times and the last evaluation takes no step.

Speed without changing the numbers (batch.py): each step runs only the tokens from the
subject on, over a cache of everything before it, in a few length buckets; only the
positions the loss reads go through the LM head.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import replace as dc_replace

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from nkv.loaders.architectures import residual_module

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


@dataclass
class Losses:
    """Per active fact: the loss terms, the KL prompt's log-probs and the success margin."""

    nll: torch.Tensor  # (A,) template-mean per-token NLL of target_new
    kl: torch.Tensor  # (A,) KL(P_δ || P_0) on the KL prompt
    preserve: torch.Tensor  # (A,) mean KL(P_δ || P_0) over the fact's probes (0 without probes)
    kl_lp: torch.Tensor  # (K, V) log-probs of the KL rows (KL prompts and probes), ascending slot, detached
    margin: torch.Tensor  # (A,) min over target tokens and templates of log p(label) - max other log p


def fact_losses(model: nn.Module, layer: int, sels: list[Selection], delta: torch.Tensor,
                kl_reference: torch.Tensor | None, replay: bool = False, preserve_loss: str = "answer",
                compute_dtype: torch.dtype | None = None) -> Losses:
    """Forwards with `delta` (A, d_model) added; the loss terms per fact (`Losses`).

    `kl_reference` holds the unedited log-probs of every KL row of the batch by slot (the
    `kl_lp` of the δ = 0 call, which covers all of them); None = this call is that one.

    Only the gathered positions go through the LM head (a pre-hook on it selects them),
    so a 128k vocabulary costs (targets x vocab), not (batch x length x vocab).
    `replay` skips blocks 0..layer using their recorded outputs (replay.py).
    `preserve_loss`: a probe's term, "kl" = KL(P_δ || P_0) after it, "answer" = how much
    less likely its unedited top answer became, max(0, log P_0(a) - log P_δ(a)), a = argmax P_0.
    `compute_dtype`: run the forwards (and so their backward) under autocast to this dtype
    (`BuildConfig.opt_dtype`); None = the model's own dtype.
    """
    n_active = delta.shape[0]
    nll = torch.zeros(n_active, device=delta.device)
    margin = torch.full((n_active,), math.inf, device=delta.device)
    kl_parts, kl_owner, kl_slots, probe_weights = [], [], [], []
    for sel in sels:
        with _autocast(model, compute_dtype):
            logp = _log_probs(model, layer, sel, delta, replay and sel.layer_out is not None)  # (E + K, V)
        n_targets = sel.labels.shape[0]
        token_lp = logp[:n_targets].gather(1, sel.labels.unsqueeze(1)).squeeze(1)  # (E,)
        nll = nll.index_add(0, sel.target_fact, -token_lp * sel.target_weight)
        if n_targets:
            margin = margin.scatter_reduce(0, sel.target_fact, _margins(logp[:n_targets].detach(), sel.labels),
                                           "amin")
        kl_parts.append(logp[n_targets:])
        kl_owner.append(sel.kl_fact)
        kl_slots.append(sel.kl_slot)
        probe_weights.append(sel.kl_probe_weight)
    slot = torch.cat(kl_slots)
    order = slot.argsort()
    slot, owner, probe_weight = slot[order], torch.cat(kl_owner)[order], torch.cat(probe_weights)[order]
    kl_lp = torch.cat(kl_parts)[order]  # (K, V)
    ref = kl_lp.detach() if kl_reference is None else kl_reference.index_select(0, slot)
    kl_row = (kl_lp.exp() * (kl_lp - ref)).sum(-1)  # KL(P_δ || P_0), (K,)
    on_prompt = probe_weight == 0
    kl = torch.zeros(n_active, device=delta.device).index_add(0, owner[on_prompt], kl_row[on_prompt])
    held = kl_row
    if preserve_loss == "answer":
        answer = ref.argmax(-1, keepdim=True)  # (K, 1) the unedited top answer
        held = (ref.gather(1, answer) - kl_lp.gather(1, answer)).squeeze(1).clamp_min(0.0)  # (K,)
    preserve = torch.zeros(n_active, device=delta.device).index_add(0, owner, held * probe_weight)
    return Losses(nll, kl, preserve, kl_lp.detach(), margin)


def _autocast(model: nn.Module, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on the model's device type; a no-op context for None.

    On a CPU the attention also takes PyTorch's math kernel: the fused CPU kernel's backward
    in bfloat16 took a quarter of a SmolLM2 build (10.4 of 41.2 s for 16 facts), so bf16
    gained nothing with it; with the math kernel 16 facts took 32.2 s against float32's
    43.0 (benchmarks/build/profile_build.py).
    """
    if dtype is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    device_type = model_device(model).type
    stack.enter_context(torch.autocast(device_type, dtype=dtype))
    if device_type == "cpu":
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    return stack


def _margins(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) - the best other token's log p, per row of `logp` (E, V): > 0 iff ranked first."""
    top = logp.topk(2, dim=-1)  # (E, 2)
    own = logp.gather(1, labels.unsqueeze(1)).squeeze(1)
    best_other = torch.where(top.indices[:, 0] == labels, top.values[:, 1], top.values[:, 0])
    return own - best_other


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
    else:  # δ added by a hook where the gate adds rows: the output projection's (or its norm's) output
        edit = hooks(residual_module(model, layer).register_forward_hook(lambda m, a, out: with_delta(out)))
    with edit, hooks(head.register_forward_pre_hook(gather)), _head_outside_autocast(head):
        logits = model(input_ids=sel.ids, attention_mask=sel.mask, position_ids=sel.positions,
                       **cache).logits[0]  # (E + K, V)
    return torch.log_softmax(logits.float(), dim=-1)


@contextlib.contextmanager
def _head_outside_autocast(head: nn.Module) -> Iterator[None]:
    """Under autocast (`opt_dtype`), the LM head still runs in its own dtype.

    The loss, the margin rule and their gradients are read off the logits: rounded to
    bfloat16 (8 bits of mantissa, ~0.1 nat at logits of 20) they move which facts stop and
    where δ goes. The head sees only the gathered target positions, so this is a small part
    of a step's work. A pre-hook leaves autocast for the head's forward, a hook re-enters it.
    """
    device_type = head.weight.device.type
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    left: list[contextlib.AbstractContextManager] = []

    def leave(module: nn.Module, args: tuple) -> tuple:
        ctx = torch.autocast(device_type, enabled=False)
        ctx.__enter__()
        left.append(ctx)
        return (args[0].to(head.weight.dtype), *args[1:])

    def back(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        left.pop().__exit__(None, None, None)

    try:
        with hooks(head.register_forward_pre_hook(leave), head.register_forward_hook(back)):
            yield
    finally:
        while left:  # the forward raised inside the head
            left.pop().__exit__(None, None, None)


def total_loss(out: Losses, delta_norm: torch.Tensor, h0_norm: torch.Tensor, config: BuildConfig) -> torch.Tensor:
    """Per-fact loss: NLL + kl_factor · KL + preserve_factor · probes' KL + weight_decay · ||δ|| / ||h0||."""
    return (out.nll + config.kl_factor * out.kl + config.preserve_factor * out.preserve
            + config.weight_decay * delta_norm / h0_norm)


def optimize_residuals(model: nn.Module, layer: int, facts: list[FactTokens], h0: torch.Tensor,
                       config: BuildConfig, pad_id: int) -> ResidualResult:
    """Optimise δ for all `facts` together (one batch; the caller splits into batches).

    Args:
        h0: (n, d_model) unedited hidden states at each fact's subject (from compute_keys).
    """
    device = model_device(model)
    n, d_model = h0.shape
    facts = optimised_templates(facts, config)
    batch = _prefix_cached_batch(model, layer, facts, pad_id, device, d_model)
    batch.record_layer(model, layer)
    h0_norm = h0.float().norm(dim=-1).clamp_min(1e-6)  # (n,)
    scale = (h0_norm / math.sqrt(d_model)).unsqueeze(1)  # (n, 1): δ = scale · u
    replay = _replay_reproduces(model, layer, batch, scale)
    u = torch.zeros(n, d_model, device=device, requires_grad=True)
    m, v = torch.zeros_like(u), torch.zeros_like(u)
    t = torch.zeros(n, dtype=torch.long, device=device)
    kl0 = torch.zeros(0)
    final_loss = torch.zeros(n, device=device)
    max_u = config.clamp * math.sqrt(d_model)  # ||δ|| <= clamp·||h0||  <=>  ||u|| <= clamp·sqrt(d)
    active = list(range(n))
    for it in range(config.steps):
        sel = batch.select(active, step_templates(it, batch.n_templates, config))
        a = torch.tensor(active, device=device)
        u_a = u.index_select(0, a)  # (A, d) differentiable view of the active rows
        delta = scale[a] * u_a
        out = fact_losses(model, layer, sel, delta, kl0 if it else None, replay, config.preserve_loss,
                          config.compute_dtype)
        if it == 0:  # δ = 0: the unedited distributions of every KL row, by slot
            kl0 = out.kl_lp
        loss = total_loss(out, delta.norm(dim=-1), h0_norm[a], config)  # (A,)
        final_loss[a] = loss.detach()
        keep = ~finished(loss.detach(), out.margin, config)
        if config.compute_dtype is not None and it < config.steps - 1:
            keep = keep | ~_stops_confirmed(model, layer, batch, active, it, ~keep, delta.detach(), kl0,
                                            h0_norm[a], replay, config)
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


@torch.no_grad()
def _stops_confirmed(model: nn.Module, layer: int, batch: FactBatch, active: list[int], step: int,
                     stopping: torch.Tensor, delta: torch.Tensor, kl0: torch.Tensor, h0_norm: torch.Tensor,
                     replay: bool, config: BuildConfig) -> torch.Tensor:
    """(A,) bool: `stopping` where the stop rule also holds in the model's own dtype.

    Under `opt_dtype` the steps' losses and margins are rounded to bfloat16, so a fact can
    pass the margin rule there and not in the dtype its row is served in. A fact stops only
    when a forward of it in the model's dtype (no backward) agrees; otherwise it takes its
    step. Only the stopping facts run, so this costs about one forward per fact in a build.
    """
    where = stopping.nonzero().squeeze(1)  # (S,) positions in `active`
    if where.numel() == 0:
        return stopping
    sels = batch.select([active[i] for i in where.tolist()], step_templates(step, batch.n_templates, config))
    out = fact_losses(model, layer, sels, delta[where], kl0, replay, config.preserve_loss, None)
    loss = total_loss(out, delta[where].norm(dim=-1), h0_norm[where], config)
    confirmed = torch.zeros_like(stopping)
    confirmed[where] = finished(loss, out.margin, config)
    return confirmed


def optimised_templates(facts: list[FactTokens], config: BuildConfig) -> list[FactTokens]:
    """The facts with only the templates δ is optimised under: the bare prompt and the first
    `config.opt_prefixes` prefixed ones (keys always average over all of them); all of them
    with `rotate_prefixes`, whose steps each take their own (`step_templates`)."""
    if config.opt_prefixes is None or config.rotate_prefixes:
        return facts
    keep = config.opt_prefixes + 1
    return [dc_replace(f, rewrites=[r for m in range(f.members)
                                    for r in f.rewrites[m * f.n_templates : m * f.n_templates + keep]])
            for f in facts]


def step_templates(step: int, n_templates: int, config: BuildConfig) -> list[int] | None:
    """The templates step `step` optimises under with `rotate_prefixes`: the bare prompt (0)
    and the next `opt_prefixes` prefixed ones in turn; None = every template of the batch."""
    if not config.rotate_prefixes or config.opt_prefixes is None or n_templates <= 1:
        return None
    n_prefixes = n_templates - 1
    k = min(config.opt_prefixes, n_prefixes)
    return [0, *sorted({1 + (step * k + j) % n_prefixes for j in range(k)})]


def finished(loss: torch.Tensor, margin: torch.Tensor, config: BuildConfig) -> torch.Tensor:
    """Which facts stop: loss below `early_stop_loss`, or (with `stop_margin`) every target
    token ranked first by `stop_margin` nats on every optimised template."""
    done = loss < config.early_stop_loss
    if config.stop_margin is not None:
        done = done | (margin >= config.stop_margin)
    return done


# Facts of a batch on which the prefix cache and the replay are checked against whole
# sequences through every block: whether they reproduce the model is a property of its
# code, so a few rows with the longest and shortest prefix and suffix (padding on both
# sides) show it as well as the whole batch, at a fraction of the cost.
CHECK_ROWS = 4


def _check_rows(facts: list[FactTokens]) -> list[int]:
    pre = [f.rewrites[-1].subject_pos for f in facts]
    suf = [len(f.rewrites[0].ids) - f.rewrites[0].subject_pos for f in facts]
    idx = range(len(facts))
    picks = [max(idx, key=pre.__getitem__), min(idx, key=pre.__getitem__), max(idx, key=suf.__getitem__),
             min(idx, key=suf.__getitem__)]
    return sorted(set(picks))[:CHECK_ROWS]


def _prefix_cached_batch(model: nn.Module, layer: int, facts: list[FactTokens], pad_id: int,
                         device: torch.device, d_model: int) -> FactBatch:
    """The batch with its prefixes run once and cached, if that reproduces whole sequences on
    this model (checked at δ = 0 on a few rows); else whole sequences, with a warning.

    The check costs two forwards without gradients (cached and whole) over a few facts per
    batch. It exists because some families' attention masks or caches (sliding-window layers, Gemma 2/3,
    OLMo 2/3 in transformers 5.19) do not give the same numbers over a left-padded cached
    prefix.
    """
    split = FactBatch(facts, pad_id, device, split=True)
    if split.prefix_width == 0:
        return split
    # The prefill only needs the cache: keep the LM head to one position (at 49k-152k
    # vocabularies the logits of every prefix token cost more than the blocks do).
    head = model.get_output_embeddings()
    with hooks(head.register_forward_pre_hook(lambda m, args: (args[0][:, -1:], *args[1:]))):
        cached = split.prefill(model)
    if not cached:  # a cache layout this code does not know
        return FactBatch(facts, pad_id, device, split=False)
    rows = _check_rows(facts)
    whole = FactBatch([facts[i] for i in rows], pad_id, device, split=False)
    zero = torch.zeros(len(rows), d_model, device=device)
    with torch.no_grad():
        got = fact_losses(model, layer, split.select(rows), zero, None, replay=False)
        ref = fact_losses(model, layer, whole.select(list(range(len(rows)))), zero, None, replay=False)
    if (torch.allclose(got.nll, ref.nll, rtol=1e-3, atol=1e-3)
            and torch.allclose(got.kl_lp, ref.kl_lp, rtol=1e-3, atol=1e-3)):
        return split
    warnings.warn(f"nkv build: a cached prefix does not reproduce {type(model).__name__}'s whole-sequence "
                  "forward; running whole sequences (slower, same result)", stacklevel=3)
    return FactBatch(facts, pad_id, device, split=False)


@torch.no_grad()
def _replay_reproduces(model: nn.Module, layer: int, batch: FactBatch, scale: torch.Tensor) -> bool:
    """Whether the replay path reproduces the hooked full forward on this model (checked on a
    few rows); if not, a warning, and the caller runs all layers.

    Checked at δ = 0 and at a random probe δ of about half ||h0||: replay adds δ to the
    block's output, which is right only where the row reaches the residual stream
    unchanged. Families that scale the FFN output first (Granite's residual multiplier)
    agree at δ = 0 and differ at any other δ; those that normalise it (Gemma 2/3, OLMo 2/3)
    get their rows after the norm, so replay holds for them.
    """
    rows = _check_rows(batch.facts)
    sel = batch.select(rows)
    zero = torch.zeros(len(rows), scale.shape[1], device=scale.device)
    probe = scale[rows] * torch.randn(zero.shape, generator=torch.Generator().manual_seed(0)).to(scale.device) / 2
    try:
        same = []
        for delta in (zero, probe):
            got = fact_losses(model, layer, sel, delta, None, replay=True)
            ref = fact_losses(model, layer, sel, delta, None, replay=False)
            same.append(torch.allclose(got.nll, ref.nll, rtol=1e-3, atol=1e-3)
                        and torch.allclose(got.kl_lp, ref.kl_lp, rtol=1e-3, atol=1e-3))
        ok = all(same)
    except Exception:  # a model loop the stand-ins do not fit
        ok = False
    if not ok:
        warnings.warn(f"nkv build: replaying layer {layer} does not reproduce {type(model).__name__}'s forward; "
                      "running all layers (slower, same result)", stacklevel=3)
    return ok


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
