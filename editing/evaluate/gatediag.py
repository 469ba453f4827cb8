"""Gate diagnostics: where the gate fires, on which fact, and with what cosine.

The forward stops right after the adapter's layer (later layers cannot change what the
gate saw), and the gate's own per-token results are read through `handle.record`, so
these numbers are exactly what the attached adapter does, not a re-implementation.
Subject positions are found with the build's own `nkv.editing.tokens.locate` (tokenizer-based, BOS- and
leading-space-safe), so the token checked here is the token the key was read at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from nkv.facts import Fact
from nkv.loaders.architectures import blocks

from ..forward import StopForward, hooks, model_device, pad_batch, pad_id_of
from ..scoring import DEFAULT_BATCH
from ..tokens import subject_position


@dataclass
class TokenGate:
    """The gate's per-token view of one text: best cosine, best row, fired."""

    ids: list[int]
    score: torch.Tensor  # (T,) float32
    index: torch.Tensor  # (T,) int64
    fired: torch.Tensor  # (T,) bool
    key: torch.Tensor | None = None  # (d_key,) the gate's input at the requested position


@torch.no_grad()
def gate_trace(model: nn.Module, tokenizer: Any, handle: Any, texts: Sequence[str] | Sequence[list[int]],
               batch_size: int = DEFAULT_BATCH, positions: Sequence[int | None] | None = None) -> list[TokenGate]:
    """Run `texts` (strings or token-id lists) up to the adapter's layer; the gate at every token.

    `positions[i]`, if given and not None, also keeps the gate's input (the key) at that
    token of text i (only there: keeping every token's key would not fit for big models).
    """
    device = model_device(model)
    pad = pad_id_of(tokenizer)
    seqs = [list(t) if not isinstance(t, str) else list(tokenizer(t)["input_ids"]) for t in texts]
    layer = handle.adapter.layer
    out: list[TokenGate] = []

    captured: dict[str, torch.Tensor] = {}

    def stop(module: nn.Module, args: tuple, output: object) -> None:
        raise StopForward

    def take_key(module: nn.Module, args: tuple) -> None:
        captured["k"] = args[0]

    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        ids, mask = pad_batch(chunk, pad, device)
        with handle.record(keep_results=True) as activity, hooks(
                blocks(model)[layer].register_forward_hook(stop),
                handle.module.register_forward_pre_hook(take_key)):
            try:
                model(input_ids=ids, attention_mask=mask)
            except StopForward:
                pass
        result = activity.results[-1]
        shape = ids.shape  # (B, T); some families (OPT) flatten tokens before the FFN
        index, score, fired = (t.reshape(shape) for t in result[1:])
        keys = captured["k"].reshape(*shape, -1)  # (B, T, d_key)
        for row, seq in enumerate(chunk):
            n = len(seq)
            pos = positions[start + row] if positions is not None else None
            key = keys[row, pos].detach().float().cpu() if pos is not None else None
            out.append(TokenGate(seq, score[row, :n].clone(), index[row, :n].clone(), fired[row, :n].clone(), key))
    return out


@dataclass
class GateDiagnostics:
    """Shares in [0, 1] and the cosines behind them (for the γ plot)."""

    gamma: float
    edit_right: float  # edit prompts whose subject token fired on the fact's own row
    edit_n: int
    edit_other_fires: float  # share of the edit prompts' other tokens that fired
    paraphrase_right: float  # paraphrases where the own row fired at the subject token
    paraphrase_n: int
    false_fire: float  # share of unrelated-text tokens that fired
    unrelated_tokens: int
    # The part of false_fire on tokens that are some edited subject's last token (a word
    # many subjects end in: the shared-last-token weak spot), as a share of all unrelated tokens.
    false_fire_shared: float = 0.0
    shared_tokens: int = 0  # unrelated tokens that are an edited subject's last token
    positives: list[float] = field(default_factory=list)  # max cosine at subject tokens
    negatives: list[float] = field(default_factory=list)  # max cosine at unrelated tokens
    own_cosine: list[float] = field(default_factory=list)  # cosine with the fact's own row (edit prompts)
    edit_right_flags: list[bool] = field(default_factory=list)  # per item: own row fired at the subject

    def to_dict(self) -> dict[str, Any]:
        def quantiles(values: list[float]) -> dict[str, float]:
            if not values:
                return {}
            t = torch.tensor(values)
            qs = torch.quantile(t, torch.tensor([0.01, 0.5, 0.99])).tolist()
            return {"min": round(float(t.min()), 4), "p01": round(qs[0], 4), "median": round(qs[1], 4),
                    "p99": round(qs[2], 4), "max": round(float(t.max()), 4)}

        return {"gamma": self.gamma, "edit_right": self.edit_right, "edit_n": self.edit_n,
                "edit_other_fires": self.edit_other_fires, "paraphrase_right": self.paraphrase_right,
                "paraphrase_n": self.paraphrase_n, "false_fire": self.false_fire,
                "unrelated_tokens": self.unrelated_tokens, "false_fire_shared": self.false_fire_shared,
                "shared_tokens": self.shared_tokens, "positives": quantiles(self.positives),
                "negatives": quantiles(self.negatives), "own_cosine": quantiles(self.own_cosine)}


def diagnose(model: nn.Module, tokenizer: Any, handle: Any, items: Sequence[tuple[Fact, int | None, list[str]]],
             unrelated: Sequence[list[int]], batch_size: int = DEFAULT_BATCH) -> GateDiagnostics:
    """Gate diagnostics for facts `(fact, adapter row or None, paraphrases)` and unrelated token lists.

    A fact whose row is None (not in the adapter) counts as a miss for "right fact".
    """
    prompts = [f.prompt for f, _, _ in items]
    where = [subject_position(tokenizer, f.prompt, f) for f, _, _ in items]
    edit = gate_trace(model, tokenizer, handle, prompts, batch_size, positions=where)
    positives, own, flags = [], [], []
    other_fired = other_total = 0
    keys = handle.adapter.keys.float()
    weights = handle.adapter.score_weights()  # sign rows score cos x weight (spec §4.4)
    last_tokens: set[int] = set()
    for (fact, row, _), trace, pos in zip(items, edit, where):
        if pos is None:
            flags.append(False)
            continue
        last_tokens.add(trace.ids[pos])
        positives.append(float(trace.score[pos]))
        flags.append(row is not None and bool(trace.fired[pos]) and int(trace.index[pos]) == row)
        mask = torch.ones_like(trace.fired)
        mask[pos] = False
        other_fired += int(trace.fired[mask].sum())
        other_total += int(mask.sum())
        if row is not None and trace.key is not None:
            own.append(float(torch.cosine_similarity(trace.key, keys[row], dim=0))
                       * (1.0 if weights is None else float(weights[row])))
    para_texts = [(fact, row, p) for fact, row, paras in items for p in paras]
    para = gate_trace(model, tokenizer, handle, [p for _, _, p in para_texts], batch_size)
    para_right = para_n = 0
    for (fact, row, text), trace in zip(para_texts, para):
        pos = subject_position(tokenizer, text, fact)
        para_n += 1
        if pos is None:  # subject not written out: the right row firing anywhere counts
            para_right += int(row is not None and bool((trace.fired & (trace.index == row)).any()))
            continue
        positives.append(float(trace.score[pos]))
        para_right += int(row is not None and bool(trace.fired[pos]) and int(trace.index[pos]) == row)
    neg = gate_trace(model, tokenizer, handle, unrelated, batch_size)
    negatives = [float(s) for t in neg for s in t.score.tolist()]
    fired = sum(int(t.fired.sum()) for t in neg)
    shared = [torch.tensor([i in last_tokens for i in t.ids], dtype=torch.bool) for t in neg]
    fired_shared = sum(int((t.fired & m).sum()) for t, m in zip(neg, shared))
    return GateDiagnostics(
        gamma=float(handle.adapter.gamma),
        edit_right=sum(flags) / len(items) if items else float("nan"), edit_n=len(items),
        edit_other_fires=other_fired / other_total if other_total else 0.0,
        paraphrase_right=para_right / para_n if para_n else float("nan"), paraphrase_n=para_n,
        false_fire=fired / len(negatives) if negatives else float("nan"), unrelated_tokens=len(negatives),
        false_fire_shared=fired_shared / len(negatives) if negatives else float("nan"),
        shared_tokens=sum(int(m.sum()) for m in shared),
        positives=positives, negatives=negatives, own_cosine=own, edit_right_flags=flags)


def unrelated_chunks(tokenizer: Any, lines: Sequence[str], max_tokens: int, chunk_tokens: int = 128) -> list[list[int]]:
    """Token lists of at most `chunk_tokens` from `lines`, `max_tokens` in all."""
    chunks: list[list[int]] = []
    total = 0
    for line in lines:
        if not line.strip():
            continue
        ids = list(tokenizer(line.strip())["input_ids"])[:chunk_tokens]
        ids = ids[: max_tokens - total]
        if not ids:
            break
        chunks.append(ids)
        total += len(ids)
    return chunks


__all__ = ["TokenGate", "GateDiagnostics", "gate_trace", "diagnose", "unrelated_chunks"]
