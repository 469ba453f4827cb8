"""Adapters made by hand for loader tests, independent of `nkv build`.

Key: the output projection's input at the prompt's last token, read with a hook.
gamma defaults to 0.999: random-weight activations are so anisotropic that unrelated
text often passes 0.65 there (trained models are what the real gamma is chosen on).
Residual: at the *last* layer, a large multiple of the target token's unembedding row,
which makes that token the argmax after the final norm on any random model.
"""

from __future__ import annotations

import torch

from nkv import Fact, NKVAdapter
from nkv.loaders.architectures import blocks, empty_adapter_for, output_projection


@torch.no_grad()
def capture_keys(model, tokenizer, prompts: list[str], layer: int) -> torch.Tensor:
    """(len(prompts), d_key) output-projection input at each prompt's last token."""
    seen: list[torch.Tensor] = []
    # OPT flattens to (B*T, d_key) before its FFN; with batch size 1 the last row is the last token
    hook = output_projection(model, layer).register_forward_pre_hook(
        lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])[-1]))
    try:
        for prompt in prompts:
            model(**tokenizer(prompt, return_tensors="pt"))
    finally:
        hook.remove()
    return torch.stack(seen).float()


def forcing_adapter(model, tokenizer, prompts: list[str], targets: list[str], gamma: float = 0.999,
                    scale: float = 200.0) -> NKVAdapter:
    """An adapter at the last layer whose row i makes prompts[i] continue with targets[i]."""
    layer = len(blocks(model)) - 1
    keys = capture_keys(model, tokenizer, prompts, layer)
    unembed = model.get_output_embeddings().weight.detach().float()
    rows = []
    for target in targets:
        token = tokenizer(" " + target)["input_ids"][0]
        direction = unembed[token] - unembed.mean(0)
        rows.append(scale * direction / direction.norm())
    facts = [Fact(id=f"f{i}", subject=p.split()[0], prompt=p, target_new=t) for i, (p, t) in enumerate(zip(prompts, targets))]
    adapter = empty_adapter_for(model, layer, gamma, name="tiny")
    return adapter.add(facts, keys, torch.stack(rows))


def first_token(tokenizer, text: str) -> int:
    return tokenizer(" " + text)["input_ids"][0]
