"""Teacher-forced scoring and greedy free generation, batched.

Both tokenize an answer the way the build does: `prompt + " " + answer` as one text when
that keeps the prompt's tokens as a prefix, else the prompt's tokens followed by
`" " + answer` tokenized on its own (a merge across the boundary, or an EOS the
tokenizer appends). Right padding for scoring (every real token keeps its unpadded
position), left padding for generation (every row's next token is the last column).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..build.hooks import model_device, pad_batch, pad_id_of

DEFAULT_BATCH = 32


@dataclass(frozen=True)
class Scored:
    """One (prompt, answer) under teacher forcing."""

    nll: float  # mean negative log-likelihood per answer token (nats)
    token_accuracy: float  # share of answer tokens that are the argmax given the true prefix
    n_tokens: int

    @property
    def exact(self) -> bool:
        """Every answer token is the top-1 prediction (teacher forced)."""
        return self.token_accuracy == 1.0


def encode_pair(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt + " " + answer, and the index of the first answer token."""
    head = list(tokenizer(prompt)["input_ids"])
    full = list(tokenizer(prompt + " " + answer)["input_ids"])
    if full[: len(head)] == head and len(full) > len(head):
        return full, len(head)
    tail = list(tokenizer(" " + answer, add_special_tokens=False)["input_ids"])
    return head + tail, len(head)


def answer_ids(tokenizer: Any, prompt: str, answer: str) -> list[int]:
    """The answer's tokens as they follow `prompt` (what greedy decoding must produce)."""
    full, start = encode_pair(tokenizer, prompt, answer)
    return full[start:]


@torch.no_grad()
def score_pairs(model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]],
                batch_size: int = DEFAULT_BATCH) -> list[Scored]:
    """Mean NLL and token accuracy of each answer after its prompt, in input order.

    Identical pairs are computed once (CounterFact repeats prompts across cases).
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
            hits = (logp.argmax(-1) == target).float()
            results[unique[i]] = Scored(float(nll.mean()), float(hits.mean()), len(target))
    return [results[p] for p in pairs]


@torch.no_grad()
def greedy_continuations(model: nn.Module, tokenizer: Any, prompts: Sequence[str], n_tokens: Sequence[int],
                         batch_size: int = DEFAULT_BATCH) -> list[list[int]]:
    """Greedy decode `n_tokens[i]` new tokens after `prompts[i]` (no stop token)."""
    device = model_device(model)
    pad = pad_id_of(tokenizer)
    prompt_ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (len(prompt_ids[i]), n_tokens[i]))
    out: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = left_pad([prompt_ids[i] for i in idx], pad, device)
        width = ids.shape[1]
        new = max(n_tokens[i] for i in idx)
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, pad_token_id=pad, num_beams=1)
        for row, i in enumerate(idx):
            out[i] = generated[row, width : width + n_tokens[i]].tolist()
    return [out[i] for i in range(len(prompts))]


@torch.no_grad()
def free_generation_exact(model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]],
                          batch_size: int = DEFAULT_BATCH) -> list[bool]:
    """Whether greedy decoding after each prompt reproduces the answer.

    The model generates exactly as many tokens as the answer has (so decoding stops at
    the end of the target); a hit is the same token ids, or the same text once decoded
    and stripped (another tokenization of the same string counts).
    """
    targets = [answer_ids(tokenizer, p, a) for p, a in pairs]
    generated = greedy_continuations(model, tokenizer, [p for p, _ in pairs], [len(t) for t in targets], batch_size)
    hits = []
    for (_, answer), target, got in zip(pairs, targets, generated):
        same = got == target or tokenizer.decode(got, skip_special_tokens=True).strip() == answer.strip()
        hits.append(bool(same))
    return hits


@torch.no_grad()
def sample_texts(model: nn.Module, tokenizer: Any, prompts: Sequence[str], n_new: int, *, seed: int = 0,
                 top_k: int = 5, batch_size: int = DEFAULT_BATCH) -> list[str]:
    """Top-k sampled continuations (ROME's fluency setting: top-k 5), seeded per batch.

    The same seed gives the same random draws before and after an edit, so the two
    generations differ only where the edit changed the model's distribution.
    """
    device = model_device(model)
    pad = pad_id_of(tokenizer)
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids, mask = left_pad([list(tokenizer(p)["input_ids"]) for p in chunk], pad, device)
        torch.manual_seed(seed + start)
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                                   do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0, pad_token_id=pad)
        for row, prompt in enumerate(chunk):
            texts.append(prompt + tokenizer.decode(generated[row, ids.shape[1]:], skip_special_tokens=True))
    return texts


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on the left so generation appends to every row."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


__all__ = ["Scored", "encode_pair", "answer_ids", "score_pairs", "greedy_continuations", "free_generation_exact",
           "sample_texts", "left_pad", "DEFAULT_BATCH"]
