"""Quick edit-success measures used by `--layer auto`, the tests and the benchmark.

Not the evaluation protocol (that is `nkv eval`): teacher-forced top-1 accuracy of an
answer after a prompt, and how many next-token predictions an adapter leaves unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .hooks import model_device, pad_batch, pad_id_of

BATCH = 16  # full (batch, length, vocab) logits here: keep them small for 128k vocabularies


@dataclass(frozen=True)
class AnswerScore:
    """Teacher-forced result for one (prompt, answer): predicted vs answer tokens."""

    answer_ids: list[int]
    predicted_ids: list[int]
    logprob: float  # mean per answer token

    @property
    def first_token_hit(self) -> bool:
        return self.predicted_ids[0] == self.answer_ids[0]

    @property
    def accuracy(self) -> float:
        return sum(p == a for p, a in zip(self.predicted_ids, self.answer_ids)) / len(self.answer_ids)


def _split(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt + " " + answer, and where the answer starts."""
    head = list(tokenizer(prompt)["input_ids"])
    full = list(tokenizer(prompt + " " + answer)["input_ids"])
    if full[: len(head)] == head and len(full) > len(head):
        return full, len(head)
    return head + list(tokenizer(" " + answer, add_special_tokens=False)["input_ids"]), len(head)


@torch.no_grad()
def score_answers(model: nn.Module, tokenizer, pairs: list[tuple[str, str]]) -> list[AnswerScore]:
    """Teacher-forced argmax and mean log-prob of each answer after its prompt."""
    device = model_device(model)
    out: list[AnswerScore] = []
    for start in range(0, len(pairs), BATCH):
        encoded = [_split(tokenizer, p, a) for p, a in pairs[start : start + BATCH]]
        ids, mask = pad_batch([e[0][:-1] for e in encoded], pad_id_of(tokenizer), device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)  # (B, T, V)
        for row, (full, begin) in enumerate(encoded):
            positions = torch.arange(begin - 1, len(full) - 1, device=device)
            answer = torch.tensor(full[begin:], device=device)
            lp = logp[row, positions]  # (n_answer, V)
            out.append(AnswerScore(full[begin:], lp.argmax(-1).tolist(),
                                   float(lp.gather(1, answer.unsqueeze(1)).mean())))
    return out


@torch.no_grad()
def next_token_predictions(model: nn.Module, tokenizer, texts: list[str]) -> list[list[int]]:
    """Argmax next token at every position of each text."""
    device = model_device(model)
    out: list[list[int]] = []
    for start in range(0, len(texts), BATCH):
        seqs = [list(tokenizer(t)["input_ids"]) for t in texts[start : start + BATCH]]
        ids, mask = pad_batch(seqs, pad_id_of(tokenizer), device)
        pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)  # (B, T)
        out.extend(pred[row, : len(s)].tolist() for row, s in enumerate(seqs))
    return out


def unchanged_share(before: list[list[int]], after: list[list[int]]) -> float:
    """Share of positions whose argmax is the same in `before` and `after`."""
    total = sum(len(b) for b in before)
    same = sum(x == y for b, a in zip(before, after) for x, y in zip(b, a))
    return same / total if total else 1.0


__all__ = ["AnswerScore", "score_answers", "next_token_predictions", "unchanged_share"]
