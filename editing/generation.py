"""Text the model writes itself: greedy answers, sampled continuations, and the seed words
both the build's context prefixes and the evaluation's unrelated text start from.

Left padding: every row's next token is the last column, so `generate` appends to all.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .forward import left_pad, model_device, pad_id_of
from .scoring import DEFAULT_BATCH
from .tokens import answer_ids, token_ids

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")  # MEMIT's context-template seeds


def seed_prompts(n: int) -> list[str]:
    """`n` prompts cycling through SEED_WORDS."""
    return [SEED_WORDS[i % len(SEED_WORDS)] for i in range(n)]


@torch.no_grad()
def greedy_continuations(model: nn.Module, tokenizer: Any, prompts: Sequence[str], n_tokens: Sequence[int],
                         batch_size: int = DEFAULT_BATCH) -> list[list[int]]:
    """Greedy decode `n_tokens[i]` new tokens after `prompts[i]` (no stop token)."""
    device = model_device(model)
    pad = pad_id_of(tokenizer)
    prompt_ids = [token_ids(tokenizer, p) for p in prompts]
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
        ids, mask = left_pad([token_ids(tokenizer, p) for p in chunk], pad, device)
        torch.manual_seed(seed + start)
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                                   do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0, pad_token_id=pad)
        for row, prompt in enumerate(chunk):
            texts.append(prompt + tokenizer.decode(generated[row, ids.shape[1]:], skip_special_tokens=True))
    return texts


__all__ = ["SEED_WORDS", "seed_prompts", "greedy_continuations", "free_generation_exact", "sample_texts"]
