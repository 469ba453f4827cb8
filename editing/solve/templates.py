"""Context prefixes generated once by the unedited model (MEMIT's context templates).

Keys average the bare prompt with prompts behind short generated prefixes, and δ is
optimised under all of them, so an edit holds when the subject appears mid-text. Sampling
is top-k on the CPU with a seeded generator, so the same model and seed give the same
prefixes on any device.
"""

from __future__ import annotations

import torch
from torch import nn

from ..generation import SEED_WORDS, seed_prompts

TOP_K = 5


@torch.no_grad()
def generate_prefixes(model: nn.Module, tokenizer, n_prefixes: int = 5, length: int = 10,
                      seed: int = 0) -> list[str]:
    """Return `[""]` plus `n_prefixes` strings of the form "<generated text>. ".

    Each prefix starts from a seed word (The, Therefore, Because, I, You, cycled) and
    adds `length` tokens sampled top-k 5. Braces are removed so prefixes are safe in
    "{}" templates.

    >>> prefixes = generate_prefixes(model, tokenizer, n_prefixes=2, seed=0)
    >>> len(prefixes), prefixes[0], prefixes[1].endswith(". ")
    (3, '', True)
    """
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    prefixes = [""]
    for word in seed_prompts(n_prefixes):
        ids = list(tokenizer(word)["input_ids"])
        step, cache = ids, None  # after the first forward, only the new token runs, over the cache
        for _ in range(length):
            out = model(torch.tensor([step], device=device), past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[0, -1].float().cpu()  # (V,)
            top = torch.topk(logits, min(TOP_K, logits.shape[-1]))
            choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
            token = int(top.indices[choice])
            if token == eos:
                break
            ids.append(token)
            step = [token]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        text = " ".join(text.replace("{", " ").replace("}", " ").split())
        prefixes.append(text + ". ")
    return prefixes


def as_templates(prefixes: list[str]) -> list[str]:
    """The prefixes as MEMIT-style templates ("{}" marks the prompt), for the record."""
    return [p + "{}" for p in prefixes]


__all__ = ["generate_prefixes", "as_templates"]
