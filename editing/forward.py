"""Running a model on padded batches, with hooks, and putting it back as it was."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn


class StopForward(Exception):
    """Raised from a hook once the activations needed are captured: skips later layers."""


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to (B, T) ids and attention mask.

    Right padding keeps every real token at its unpadded position, so a causal model
    computes the same values for it as for the sequence alone.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


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


def pad_id_of(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0  # masked out anyway


@contextlib.contextmanager
def hooks(*handles: torch.utils.hooks.RemovableHandle) -> Iterator[None]:
    """Remove the given hook handles on exit, whatever happens."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients inside the block; the previous state after.

    Without this, backward would also compute (and store) gradients for every weight
    the residual flows through.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def token_index(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, width: int) -> tuple[torch.Tensor, ...]:
    """Index of tokens (row, position) in an activation that is (B, T, d) or flattened (B*T, d).

    OPT's decoder layers, for one, flatten the batch before their FFN.
    """
    return (rows, cols) if x.dim() == 3 else (rows * width + cols,)


def block_output(out: object) -> torch.Tensor:
    """The hidden states of a block's output (a tensor, or a tuple whose first item is)."""
    return out[0] if isinstance(out, tuple) else out  # type: ignore[index]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


__all__ = ["StopForward", "token_index", "pad_batch", "left_pad", "pad_id_of", "hooks", "frozen", "block_output",
           "model_device"]
