"""Teacher-forced scoring: how a model rates given answers after given prompts, batched.

One implementation for the evaluation (`nkv eval`), the layer sweep (`--layer auto`), the
tests and the benchmarks. Answers are tokenized by `nkv.editing.tokens.encode_pair`, the
way the build optimises them. Right padding: every real token keeps its unpadded
position, so a causal model gives it the same logits as alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .forward import model_device, pad_batch, pad_id_of
from .tokens import encode_pair, token_ids

DEFAULT_BATCH = 32


@dataclass(frozen=True)
class Scored:
    """One (prompt, answer) under teacher forcing."""

    answer_ids: list[int]  # the answer's tokens after the prompt
    predicted_ids: list[int]  # the argmax at each answer position, given the true prefix
    nll: float  # mean negative log-likelihood per answer token (nats)

    @property
    def n_tokens(self) -> int:
        return len(self.answer_ids)

    @property
    def token_accuracy(self) -> float:
        """Share of answer tokens that are the argmax given the true prefix (NaN for no tokens)."""
        hits = sum(p == a for p, a in zip(self.predicted_ids, self.answer_ids))
        return hits / self.n_tokens if self.n_tokens else float("nan")

    @property
    def exact(self) -> bool:
        """Every answer token is the top-1 prediction (teacher forced)."""
        return self.token_accuracy == 1.0

    @property
    def first_token_hit(self) -> bool:
        return bool(self.answer_ids) and self.predicted_ids[0] == self.answer_ids[0]


@torch.no_grad()
def score_pairs(model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]],
                batch_size: int = DEFAULT_BATCH) -> list[Scored]:
    """Each answer's mean NLL and teacher-forced argmax after its prompt, in input order.

    Identical pairs are computed once (CounterFact repeats prompts across cases).

    >>> scored = score_pairs(model, tokenizer, [("The Eiffel Tower is in", "Paris")])
    >>> scored[0].nll, scored[0].exact
    """
    unique = list(dict.fromkeys(pairs))
    device = model_device(model)
    pad = pad_id_of(tokenizer)
    encoded = [encode_pair(tokenizer, p, a) for p, a in unique]
    # Sort by length so a batch holds similar lengths (less padding, same results).
    order = sorted(range(len(unique)), key=lambda i: len(encoded[i][0]))
    results: dict[tuple[str, str], Scored] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs = [encoded[i][0][:-1] for i in idx]  # the last answer token is only a label
        ids, mask = pad_batch(seqs, pad, device)
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        for row, i in enumerate(idx):
            full, begin = encoded[i]
            positions = torch.arange(begin - 1, len(full) - 1, device=device)
            target = torch.tensor(full[begin:], device=device)
            logp = torch.log_softmax(logits[row, positions].float(), -1)  # (n_answer, V)
            nll = -logp.gather(1, target.unsqueeze(1)).squeeze(1)  # (n_answer,)
            results[unique[i]] = Scored(full[begin:], logp.argmax(-1).tolist(), float(nll.mean()))
    return [results[p] for p in pairs]


@torch.no_grad()
def next_token_predictions(model: nn.Module, tokenizer: Any, texts: Sequence[str],
                           batch_size: int = DEFAULT_BATCH) -> list[list[int]]:
    """Argmax next token at every position of each text."""
    device = model_device(model)
    out: list[list[int]] = []
    for start in range(0, len(texts), batch_size):
        seqs = [token_ids(tokenizer, t) for t in texts[start : start + batch_size]]
        ids, mask = pad_batch(seqs, pad_id_of(tokenizer), device)
        pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)  # (B, T)
        out.extend(pred[row, : len(s)].tolist() for row, s in enumerate(seqs))
    return out


@torch.no_grad()
def next_token_top1(model: nn.Module, tokenizer: Any, texts: Sequence[str],
                    batch_size: int = DEFAULT_BATCH) -> list[tuple[int, float]]:
    """(argmax next token, its probability) after the last token of each text."""
    device = model_device(model)
    out: list[tuple[int, float]] = []
    for start in range(0, len(texts), batch_size):
        seqs = [token_ids(tokenizer, t) for t in texts[start : start + batch_size]]
        ids, mask = pad_batch(seqs, pad_id_of(tokenizer), device)
        last = torch.tensor([len(s) - 1 for s in seqs], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(seqs), device=device), last]
        prob, token = torch.softmax(logits.float(), dim=-1).max(dim=-1)  # (B,)
        out.extend(zip(token.tolist(), prob.tolist()))
    return out


def unchanged_share(before: list[list[int]], after: list[list[int]]) -> float:
    """Share of positions whose argmax is the same in `before` and `after`."""
    total = sum(len(b) for b in before)
    same = sum(x == y for b, a in zip(before, after) for x, y in zip(b, a))
    return same / total if total else 1.0


__all__ = ["Scored", "score_pairs", "next_token_predictions", "next_token_top1", "unchanged_share", "DEFAULT_BATCH"]
