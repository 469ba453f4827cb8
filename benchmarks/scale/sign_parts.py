"""Which part of sign rows (format 2.2, spec §4.4) moves a real adapter's E/G/S: `nkv eval` on
an adapter made of one part of the code and the float rows of the rest.

    python benchmarks/scale/sign_parts.py keys      FLOAT.nkv SIGN.nkv eval --model smollm2-135m --data ... --json
    python benchmarks/scale/sign_parts.py residuals FLOAT.nkv SIGN.nkv eval ...
    python benchmarks/scale/sign_parts.py wide      FLOAT.nkv SIGN.nkv eval ...
    python benchmarks/scale/sign_parts.py clipped   FLOAT.nkv SIGN.nkv eval ...

SIGN.nkv is `nkv quantize FLOAT.nkv --storage sign -o SIGN.nkv`. Everything after the two
files is `nkv`'s own command line; its --adapter is replaced by the adapter made here.

- keys: the sign file's keys and score weights, the float file's residuals;
- residuals: the float file's keys, the sign file's int4 residuals (read back);
- wide: the sign file's residuals, and keys coded with as many sign bits as a Llama-3-8B
  key has (14,336): each unit key zero-padded to 14,336 values, rotated at that width and
  stored as signs with its weight. A token pads with zeros too, so its score is
  w * <x, the first d_key values of R^T c>: the loader's inverse norm for the row is w, the
  key the truncated read-back. It simulates the code's noise at Llama's key width on a model
  that knows facts; it is not a format;
- clipped: the float file's keys, and int4 residuals whose writer picks each row's scale
  to minimise the squared error (clipping the largest rotated values) instead of max|y| / 7:
  a reader reads them as spec §4.4 says; the format's writer does not do it.
Not part of NKV: benchmarks/scale/README.md, "Sign rows in the format".
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import torch

import nkv.resolve
from nkv import NKVAdapter
from nkv.cli.main import main
from nkv.codes import rotate

LLAMA_D_KEY = 14336


def wide_keys(keys: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(read-back keys (n, d_key), the gate's inverse norms (n,)) of keys coded with `width` signs."""
    k = keys.float()
    padded = torch.nn.functional.pad(k / k.norm(dim=-1, keepdim=True), (0, width - k.shape[1]))
    y = rotate(padded)
    c = torch.where(y < 0, -1.0, 1.0) / math.sqrt(width)
    weight = 1.0 / (y * c).sum(-1)
    return rotate(c, inverse=True)[:, : k.shape[1]], weight


def clipped_residuals(rows: torch.Tensor, steps: int = 71) -> torch.Tensor:
    """Rows read back from rotated int4 whose per-row scale minimises the squared error over
    scales max|y| / 7 x a for a in [0.3, 1] (`steps` values); values past 7 steps clip."""
    y = rotate(rows)
    top = y.abs().amax(-1, keepdim=True) / 7
    best, best_err = top, torch.full((rows.shape[0], 1), float("inf"))
    for a in torch.linspace(0.3, 1.0, steps):
        s = top * a
        err = ((torch.round(y / s.clamp_min(1e-30)).clamp(-7, 7) * s - y) ** 2).sum(-1, keepdim=True)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return rotate(torch.round(y / best.clamp_min(1e-30)).clamp(-7, 7) * best, inverse=True)


def part_adapter(part: str, exact: NKVAdapter, sign: NKVAdapter) -> NKVAdapter:
    if part == "clipped":
        return replace(exact, keys=exact.keys.float(), residuals=clipped_residuals(exact.residuals.float()))
    if part == "keys":
        return replace(sign, residuals=exact.residuals.float())
    if part == "residuals":
        return replace(exact, keys=exact.keys.float(), residuals=sign.residuals)
    back, weight = wide_keys(exact.keys, LLAMA_D_KEY)
    # score_inverse_norms = weight_stored / ||key||, so store weight * ||key|| to get `weight`
    scales = torch.stack([weight * back.norm(dim=-1), sign.code_scales[:, 1]], dim=-1)
    return replace(sign, keys=back, code_scales=scales)


if __name__ == "__main__":
    if len(sys.argv) < 5 or sys.argv[1] not in ("keys", "residuals", "wide", "clipped"):
        raise SystemExit(__doc__)
    adapter = part_adapter(sys.argv[1], NKVAdapter.load(sys.argv[2]), NKVAdapter.load(sys.argv[3]))
    nkv.resolve.resolve_adapter = lambda source, *args, **kwargs: adapter
    sys.argv = ["nkv", *sys.argv[4:], "--adapter", sys.argv[3]]
    main()
