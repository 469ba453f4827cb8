"""Keys (MEMIT's compute_ks): the output projection's input at the subject's last token.

`k = ½ · k(bare prompt) + ½ · mean over prefixed prompts`. The same pass records h0,
the block's output hidden state at the subject in the bare prompt (MEMIT's
`target_init`), which sets the scale of the residual. The forward stops right after
layer `layer`: later layers cannot change either value.
"""

from __future__ import annotations

import torch
from torch import nn

from nkv.loaders.architectures import blocks, output_projection

from ..forward import StopForward, block_output, hooks, model_device, pad_batch, token_index
from .prompts import FactTokens

MAX_SEQS = 256  # sequences per forward in this pass (no gradients, so it can be wide)


@torch.no_grad()
def compute_keys(model: nn.Module, layer: int, facts: list[FactTokens], pad_id: int,
                 max_seqs: int = MAX_SEQS) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (n, d_key) and h0 (n, d_model), both float32 on the model's device."""
    k_all, h_all = template_inputs(model, layer, facts, pad_id, max_seqs)
    return average_key(k_all), h_all[:, 0]


def average_key(k_all: torch.Tensor) -> torch.Tensor:
    """(n, d_key) keys from (n, templates, d_key) inputs: ½ bare + ½ mean of the prefixed."""
    return k_all[:, 0] if k_all.shape[1] == 1 else 0.5 * k_all[:, 0] + 0.5 * k_all[:, 1:].mean(1)


@torch.no_grad()
def template_inputs(model: nn.Module, layer: int, facts: list[FactTokens], pad_id: int,
                    max_seqs: int = MAX_SEQS) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, templates, d_key) output-projection inputs and (n, templates, d_model) block outputs
    at the subject's last token of every key text, float32."""
    n_templates = len(facts[0].key_texts)
    seqs = [enc for f in facts for enc in f.key_texts]  # fact-major: fact i owns rows i*n_t ...
    device = model_device(model)
    k_rows: list[torch.Tensor] = []
    h_rows: list[torch.Tensor] = []
    for start in range(0, len(seqs), max_seqs):
        chunk = seqs[start : start + max_seqs]
        ids, mask = pad_batch([s.ids for s in chunk], pad_id, device)
        rows = torch.arange(len(chunk), device=device)
        cols = torch.tensor([s.subject_pos for s in chunk], device=device)
        captured: dict[str, torch.Tensor] = {}

        def take_key(module: nn.Module, args: tuple) -> None:
            x = args[0]
            captured["k"] = x[token_index(x, rows, cols, ids.shape[1])].float()  # (S, d_key)

        def take_hidden(module: nn.Module, args: tuple, out: object) -> None:
            captured["h"] = block_output(out)[rows, cols].float()  # (S, d_model)
            raise StopForward

        with hooks(output_projection(model, layer).register_forward_pre_hook(take_key),
                   blocks(model)[layer].register_forward_hook(take_hidden)):
            try:
                model(input_ids=ids, attention_mask=mask)
            except StopForward:
                pass
        k_rows.append(captured["k"])
        h_rows.append(captured["h"])
    k_all = torch.cat(k_rows).view(len(facts), n_templates, -1)  # (n, n_t, d_key)
    h_all = torch.cat(h_rows).view(len(facts), n_templates, -1)  # (n, n_t, d_model)
    return k_all, h_all


__all__ = ["compute_keys", "template_inputs", "average_key"]
