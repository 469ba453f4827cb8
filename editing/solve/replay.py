"""Skip the layers δ cannot change: replay the edited layer's recorded output instead.

δ is added to layer `l`'s FFN output at the subject, so the output of blocks 0..l is the
same at every step except for that one vector (layer l's attention reads the layer's
input, which δ does not touch). Each step therefore swaps blocks 0..l for stand-ins: the
lower ones pass their input through, block l returns its recorded output plus δ, and
only blocks l+1.. run. At layer 7 of 32 that is a quarter of the work per step.

The swap is checked once per batch against the hooked full forward (`optimize_residuals`)
and abandoned if a model's loop does anything the stand-ins do not reproduce.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from nkv.loaders.architectures import blocks


class _PassThrough(nn.Module):
    """A block below the edited layer: its output is overwritten later anyway."""

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, *args: object, **kwargs: object) -> object:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if self.as_tuple else hidden


class _Replay(nn.Module):
    """The edited block: its recorded output, plus δ where `edit` puts it."""

    def __init__(self, output: torch.Tensor, edit: Callable[[torch.Tensor], torch.Tensor], as_tuple: bool):
        super().__init__()
        self.output, self.edit, self.as_tuple = output, edit, as_tuple

    def forward(self, *args: object, **kwargs: object) -> object:
        hidden = self.edit(self.output)
        return (hidden,) if self.as_tuple else hidden


@contextlib.contextmanager
def replayed(model: nn.Module, layer: int, output: torch.Tensor, edit: Callable[[torch.Tensor], torch.Tensor],
             as_tuple: bool) -> Iterator[None]:
    """Inside the block, blocks 0..layer of `model` are stand-ins; the originals come back after."""
    stack = blocks(model)
    originals = [stack[i] for i in range(layer + 1)]
    try:
        for i in range(layer):
            stack[i] = _PassThrough(as_tuple)
        stack[layer] = _Replay(output, edit, as_tuple)
        yield
    finally:
        for i, module in enumerate(originals):
            stack[i] = module


__all__ = ["replayed"]
