"""Padded token batches for the residual optimisation, with a reusable prefix cache.

Everything before a sequence's subject token is the same at every optimisation step: δ
is added at the subject's last token, and a causal model's earlier positions never see
it. So each sequence is split there. The part before (`pre`, left-padded) runs once
through the model and its attention keys/values are kept; each step runs only the part
from the subject on (`suf`, right-padded) on top of that cache. With context prefixes
of ~10 tokens in front of every prompt this cuts the tokens per step about 4x; the loss
is the same up to float rounding (tests compare it with the full-sequence reference).

The prefixes are mostly shared: every fact's prompt behind context prefix j starts with
the same generated text. So the prefill runs in two stages. First the tokens that all
of a batch's sequences of template j begin with (their longest common token prefix, so no
assumption about how the tokenizer joins prefix and prompt) run once per template; then
each sequence's own tokens up to the subject run on top of that shared cache. The
cached part of a row is [shared, left-padded | own, left-padded]; the masked holes in the
middle change nothing, as padding never does (the prefix-cache check in residuals.py
compares the result with whole sequences).

`split=False` keeps whole sequences (pre is empty): MEMIT's computation, used by the
one-fact-at-a-time reference and as the fallback for caches this code does not know.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from nkv.loaders.architectures import blocks

from ..forward import StopForward, block_output, hooks, left_pad
from .prompts import FactTokens


@dataclass
class Selection:
    """Model inputs and index maps for the active facts of a batch."""

    ids: torch.Tensor  # (S, W) suffix tokens
    mask: torch.Tensor  # (S, P + W) attention mask over cached prefix + suffix
    positions: torch.Tensor  # (S, W) position ids of the suffix tokens
    cache: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer (S, heads, P, d_head) keys, values
    delta_rows: torch.Tensor  # (D,) where δ is added: sequence row ...
    delta_cols: torch.Tensor  # (D,) ... and suffix position
    delta_fact: torch.Tensor  # (D,) which active fact's δ
    gather_rows: torch.Tensor  # (E + A,) positions whose logits are needed: targets, then KL
    gather_cols: torch.Tensor
    labels: torch.Tensor  # (E,) target token predicted at each gathered target position
    target_fact: torch.Tensor  # (E,) active fact of each target position
    target_weight: torch.Tensor  # (E,) 1 / (target length * templates): per-token and template mean
    kl_fact: torch.Tensor  # (K,) active fact of each KL row
    kl_slot: torch.Tensor  # (K,) the KL row's number in the whole batch (its unedited distribution)
    kl_probe_weight: torch.Tensor  # (K,) 0 for "{subject} is a"; 1 / the fact's probes for a probe
    layer_out: torch.Tensor | None = None  # (S, W, d_model) recorded output of the edited block
    layer_tuple: bool = False  # whether that block returns a tuple


KL_PROMPT, PROBE = -1, -2  # kinds of sequence that are not rewrites (whose kind is the template index)


class FactBatch:
    """The sequences of a group of facts: rewrites (one per template), the KL prompt, probes.

    A KL prompt's distribution is read at the subject (MEMIT's "{subject} is a"); a probe's
    (preserve.py) at its last token, where the answer about the subject's other relation
    comes next.
    """

    def __init__(self, facts: list[FactTokens], pad_id: int, device: torch.device, split: bool = True):
        self.facts = facts
        self.n_templates = facts[0].n_templates
        self.device = device
        pres, sufs = [], []
        self.kind: list[int] = []  # per sequence: template index, KL_PROMPT or PROBE
        self.seqs_of: list[range] = []  # fact -> its sequences
        self.delta_col: list[int] = []  # δ position in the suffix of each sequence
        self.kl_col: list[int] = []  # suffix position of the distribution a KL row reads, -1 none
        self.targets: list[list[tuple[int, int]]] = []  # (suffix position, label) per sequence
        for f in facts:
            first = len(sufs)
            kinds = [*[j % f.n_templates for j in range(len(f.rewrites))], KL_PROMPT, *[PROBE] * len(f.probes)]
            for kind, enc in zip(kinds, (*f.rewrites, f.kl, *f.probes)):
                ids = enc.ids[:-1] if enc.target_start >= 0 else enc.ids  # the last token predicts nothing
                cut = enc.subject_pos if split else 0
                pres.append(ids[:cut])
                sufs.append(ids[cut:])
                self.kind.append(kind)
                self.delta_col.append(enc.subject_pos - cut)
                self.kl_col.append({KL_PROMPT: enc.subject_pos - cut, PROBE: len(ids) - 1 - cut}.get(kind, -1))
                self.targets.append([(p - cut, enc.ids[p + 1]) for p in range(enc.target_start - 1, len(enc.ids) - 1)]
                                    if enc.target_start >= 0 else [])
            self.seqs_of.append(range(first, len(sufs)))
        self.owner = [i for i, r in enumerate(self.seqs_of) for _ in r]  # sequence -> its fact
        kl_seqs = [i for i, c in enumerate(self.kl_col) if c >= 0]
        self.kl_slot = {seq: k for k, seq in enumerate(kl_seqs)}  # sequence -> row of the unedited distributions
        self.pre_len = [len(p) for p in pres]
        self.suf_len = [len(s) for s in sufs]
        shared = _shared_starts(pres, self.kind)  # per kind: tokens all its rows begin with
        self.shared_ids = [s for s in shared.values() if s]  # the ones worth a stage of their own
        slot = {kind: self.shared_ids.index(s) for kind, s in shared.items() if s}
        self.shared_slot = [slot.get(kind, -1) for kind in self.kind]  # (n,) row -> its shared prefix, -1 none
        shared_len = [len(shared[kind]) for kind in self.kind]
        owns = [pre[k:] for pre, k in zip(pres, shared_len)]
        n, width_s = len(sufs), max(self.suf_len)
        dev = device
        # Stage a (shared) and stage b (own tokens) of the prefix, each left-padded.
        a_ids, a_mask = left_pad(self.shared_ids or [[]], pad_id, torch.device("cpu"))
        a_ids, a_mask = a_ids[: len(self.shared_ids)], a_mask[: len(self.shared_ids)]
        width_a = a_ids.shape[1]
        a_lens = torch.tensor([len(x) for x in self.shared_ids], dtype=torch.long).unsqueeze(1)
        self.shared_ids_t, self.shared_mask = a_ids.to(dev), a_mask.to(dev)
        self.shared_pos = (torch.arange(width_a).unsqueeze(0) - (width_a - a_lens)).clamp_min(0).to(dev)
        b_ids, b_mask = left_pad(owns, pad_id, torch.device("cpu"))
        width_b = b_ids.shape[1]
        row_a_mask = torch.zeros((n, width_a), dtype=torch.long)
        for row, k in enumerate(self.shared_slot):
            if k >= 0:
                row_a_mask[row] = a_mask[k]
        own_lens = torch.tensor([len(o) for o in owns]).unsqueeze(1)  # (n, 1)
        base = torch.tensor(shared_len).unsqueeze(1)  # (n, 1) positions taken by the shared part
        self.pre_ids = b_ids.to(dev)  # (n, B) the own part, run by stage b
        self.pre_mask = torch.cat([row_a_mask, b_mask], dim=1).to(dev)  # (n, A + B) over the whole cache
        self.pre_pos = (base + (torch.arange(width_b).unsqueeze(0) - (width_b - own_lens)).clamp_min(0)).to(dev)
        self.suf_ids = torch.full((n, width_s), pad_id, dtype=torch.long)
        self.suf_mask = torch.zeros((n, width_s), dtype=torch.long)
        for row, suf in enumerate(sufs):
            self.suf_ids[row, : len(suf)] = torch.tensor(suf)
            self.suf_mask[row, : len(suf)] = 1
        lens = torch.tensor(self.pre_len).unsqueeze(1)  # (n, 1)
        self.suf_pos = (lens + torch.arange(width_s).unsqueeze(0)).to(dev)  # (n, W)
        self.suf_ids, self.suf_mask = self.suf_ids.to(dev), self.suf_mask.to(dev)
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.layer_out: torch.Tensor | None = None
        self.layer_tuple = False

    @property
    def prefix_width(self) -> int:
        return self.pre_mask.shape[1]

    @torch.no_grad()
    def prefill(self, model: nn.Module) -> bool:
        """Run the prefixes once (shared parts, then each row's own) and keep their keys/values;
        False if this model's cache is unusable."""
        if self.prefix_width == 0:
            return True
        length = self.prefix_width + max(self.suf_len)
        past = {}
        if self.shared_ids:
            out = model(input_ids=self.shared_ids_t, attention_mask=self.shared_mask, position_ids=self.shared_pos,
                        use_cache=True)
            kv = cache_tensors(out.past_key_values, length)
            if kv is None:
                return False
            pick = torch.tensor([max(k, 0) for k in self.shared_slot], device=self.device)  # -1: masked anyway
            past = {"past_key_values": make_cache([(k.index_select(0, pick), v.index_select(0, pick)) for k, v in kv])}
        out = model(input_ids=self.pre_ids, attention_mask=self.pre_mask, position_ids=self.pre_pos, use_cache=True,
                    **past)
        kv = cache_tensors(out.past_key_values, length)
        if kv is None:
            return False
        self.kv = kv
        return True

    @torch.no_grad()
    def record_layer(self, model: nn.Module, layer: int) -> None:
        """Keep block `layer`'s output at every suffix position (δ = 0), for replay.py."""
        def take(module: nn.Module, args: tuple, out: object) -> None:
            self.layer_tuple = isinstance(out, tuple)
            self.layer_out = block_output(out).detach()
            raise StopForward

        cache = {"past_key_values": make_cache(self.kv), "use_cache": True} if self.kv is not None else {}
        mask = torch.cat([self.pre_mask, self.suf_mask], dim=1)
        with hooks(blocks(model)[layer].register_forward_hook(take)):
            try:
                model(input_ids=self.suf_ids, attention_mask=mask, position_ids=self.suf_pos, **cache)
            except StopForward:
                pass

    def select(self, active: list[int], templates: list[int] | None = None, max_buckets: int = 4) -> list[Selection]:
        """Model inputs for the facts `active` (indices into this batch), in length buckets;
        `templates`: only these rewrites (template indices; None = all), the target loss
        averaged over them.

        Rows are grouped by suffix length so that short rows (the KL prompt is one token
        from the subject on) are not padded to the longest: a few forwards of similar
        widths cost less than one padded forward.
        """
        rows = [(a, seq, self.kind[seq]) for a, i in enumerate(active) for seq in self.seqs_of[i]
                if templates is None or self.kind[seq] < 0 or self.kind[seq] in templates]
        n_templates = self.n_templates if templates is None else len(templates)
        rows.sort(key=lambda r: self.suf_len[r[1]])
        overhead = FORWARD_COST_IN_TOKENS["cuda" if self.device.type == "cuda" else "cpu"]
        groups = _buckets(rows, [self.suf_len[r[1]] for r in rows], overhead, max_buckets)
        return [self._selection(group, n_templates) for group in groups]

    def _selection(self, rows: list[tuple[int, int, int]], n_templates: int) -> Selection:
        """rows: (active fact index, sequence index, its kind); the target loss is the mean
        over `n_templates` templates."""
        seq_ids = [s for _, s, _ in rows]
        width = max(self.suf_len[s] for s in seq_ids)
        t_rows, t_cols, t_label, t_fact, t_weight = [], [], [], [], []
        kl_rows, kl_cols, kl_fact, kl_slot, kl_probe = [], [], [], [], []
        for row, (a, s, kind) in enumerate(rows):
            if kind >= 0:  # a rewrite: teacher-forced target tokens; members of a joint item share its loss
                weight = 1.0 / (len(self.targets[s]) * n_templates * self.facts[self.owner[s]].members)
                for col, label in self.targets[s]:
                    t_rows.append(row)
                    t_cols.append(col)
                    t_label.append(label)
                    t_fact.append(a)
                    t_weight.append(weight)
            else:  # a distribution held near the unedited one
                kl_rows.append(row)
                kl_cols.append(self.kl_col[s])
                kl_fact.append(a)
                kl_slot.append(self.kl_slot[s])
                kl_probe.append(1.0 / len(self.facts[self.owner[s]].probes) if kind == PROBE else 0.0)
        dev = self.device
        t = lambda xs, dt=torch.long: torch.tensor(xs, dtype=dt, device=dev)  # noqa: E731
        idx = t(seq_ids)
        cache = self.kv
        if cache is not None:
            cache = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in cache]
        mask = torch.cat([self.pre_mask[idx], self.suf_mask[idx, :width]], dim=1)
        return Selection(
            ids=self.suf_ids[idx, :width], mask=mask, positions=self.suf_pos[idx, :width], cache=cache,
            delta_rows=torch.arange(len(rows), device=dev), delta_cols=t([self.delta_col[s] for s in seq_ids]),
            delta_fact=t([a for a, _, _ in rows]),
            gather_rows=t(t_rows + kl_rows), gather_cols=t(t_cols + kl_cols),
            labels=t(t_label), target_fact=t(t_fact), target_weight=t(t_weight, torch.float32),
            kl_fact=t(kl_fact), kl_slot=t(kl_slot), kl_probe_weight=t(kl_probe, torch.float32),
            layer_out=None if self.layer_out is None else self.layer_out[idx, :width],
            layer_tuple=self.layer_tuple,
        )


# A shared start shorter than this is left in each row's own part: a stage of its own
# would cost more than it saves (the bare prompt and the KL prompt share a token or two).
MIN_SHARED = 4


def _shared_starts(pres: Sequence[Sequence[int]], kinds: Sequence[int]) -> dict[int, list[int]]:
    """Per kind of sequence, the tokens every row of it begins with, leaving each row >= 1 own
    token (an empty row in stage b would be all padding); [] when shorter than MIN_SHARED."""
    out = {}
    for kind in sorted(set(kinds)):
        rows = [p for p, k in zip(pres, kinds) if k == kind]
        common = min(len(p) for p in rows) - 1
        first = rows[0]
        for p in rows[1:]:
            common = next((i for i in range(common) if p[i] != first[i]), common)
        out[kind] = list(first[:common]) if common >= MIN_SHARED else []
    return out


# The fixed cost of one more forward/backward, in padded tokens: a few ms of Python and
# kernel launches on a CPU; on a GPU, launch latency buys tens of thousands of tokens.
FORWARD_COST_IN_TOKENS = {"cpu": 512, "cuda": 16384}


def _buckets(rows: list, widths: list[int], overhead: int, max_buckets: int) -> list[list]:
    """Split rows (sorted by width) into <= max_buckets contiguous groups, minimising
    padded tokens + `overhead` per forward (exact DP over the distinct widths)."""
    cuts = [k for k in range(1, len(widths)) if widths[k] != widths[k - 1]] + [len(widths)]
    # best[b][e]: cost of covering rows [0, cuts[e]) with b groups; groups end at cuts
    inf = float("inf")
    best = [[inf] * len(cuts) for _ in range(max_buckets + 1)]
    back = [[-1] * len(cuts) for _ in range(max_buckets + 1)]
    for e, end in enumerate(cuts):
        best[1][e] = end * widths[end - 1] + overhead
    for b in range(2, max_buckets + 1):
        for e, end in enumerate(cuts):
            for p in range(e):
                cost = best[b - 1][p] + (end - cuts[p]) * widths[end - 1] + overhead
                if cost < best[b][e]:
                    best[b][e], back[b][e] = cost, p
    b = min(range(1, max_buckets + 1), key=lambda k: best[k][-1])
    groups, e = [], len(cuts) - 1
    while b >= 1:
        p = back[b][e] if b > 1 else -1
        start = cuts[p] if p >= 0 else 0
        groups.append(rows[start : cuts[e]])
        e, b = p, b - 1
    return groups[::-1]


def cache_tensors(cache: object, length: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per-layer (keys, values) of a transformers DynamicCache, or None when not plain full attention.

    A sliding-window layer shorter than `length` would drop positions the full forward
    sees, so it is refused (the caller falls back to whole sequences).
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    out = []
    for layer in layers:
        kind = type(layer).__name__
        window = getattr(layer, "sliding_window", None)
        if kind not in ("DynamicLayer", "DynamicSlidingWindowLayer") or (window is not None and window < length):
            return None
        out.append((layer.keys, layer.values))
    return out


def make_cache(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> object:
    """A fresh DynamicCache over `kv`. The model's update concatenates into new tensors, so
    `kv` itself is never modified and serves every step."""
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=[(k[:, :, :0], v[:, :, :0]) for k, v in kv])  # cheap: empty copies
    for layer, (k, v) in zip(cache.layers, kv):
        layer.keys, layer.values = k, v
    return cache


__all__ = ["FactBatch", "Selection", "cache_tensors", "make_cache"]
