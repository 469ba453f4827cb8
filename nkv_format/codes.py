"""Sign storage (format 2.2, spec §4.4): K1 as 1 bit per value, R1 as 4 bits per value.

A key's direction is all the gate reads (§5), so a key is stored as the signs of its rotated
unit vector, d_key bits, plus one float32 *score weight* w. The reader's key is the unit
vector those signs give, rotated back, and the gate multiplies its cosine with that key by
w, which makes the score of the stored key's own direction exactly 1 (as RaBitQ corrects its
codes): the score estimates the exact cosine instead of shrinking it by ~0.8. A residual is
rotated, then stored as int4 with one float32 scale per row. At the shape of Llama-3-8B that
is 1,792 + 2,048 + 8 bytes per fact, from 36,864 in F16.

The rotation spreads a few large coordinates (real keys have them) over every value, which a
sign or a 4-bit step could not hold: random signs, orthonormal Walsh-Hadamard transforms over
blocks of b values (b the largest power of 2 dividing d), a stride permutation that gives
every block a share of every other, then signs and blocks again. Its signs come from the
spec's 32-bit hash, so every implementation rotates alike.

In memory the rows are floats (what a reader returns) and the adapter keeps each row's w and
residual scale beside them (`NKVAdapter.code_scales`): the signs and the int4 values come back
exactly from those floats, so a loaded file re-saves to its own bytes.
"""

from __future__ import annotations

import math

import torch

from . import constants as C

_MASK32 = 0xFFFFFFFF
_BLOCK_VALUES = 2**24  # values rotated at once: bounds the float32 temporaries at 1M x 14336 rows


def rotation_signs(d: int, t: int) -> torch.Tensor:
    """(d,) float32 of ±1: the diagonal D_t of the rotation (spec §4.4), s_t[j] = -1 exactly
    when h(2j + t) has its top bit set, h the fingerprint's 32-bit hash (spec §6)."""
    x = (torch.arange(d, dtype=torch.int64) * 2 + t) & _MASK32
    for _ in range(3):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = x ^ (x >> 16)
    return torch.where(x >= 2**31, -1.0, 1.0)


def _hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform over the last dimension (a power of 2)."""
    b, lead, h = x.shape[-1], x.shape[:-1], 1
    while h < b:
        y = x.reshape(*lead, b // (2 * h), 2, h)
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2).reshape(*lead, b)
        h *= 2
    return x / math.sqrt(b)


def rotate(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """R x (or R^T x) for each row of x (n, d), in float32 (spec §4.4):

        R x = H_b(D_1 · P(H_b(D_0 · x)))

    H_b: the orthonormal Walsh-Hadamard transform of each block of b consecutive values;
    P: value i·b + j (block i, place j) goes to place j·m + i, with m = d / b blocks.
    """
    n, d = x.shape
    b = d & -d if d else 1
    m = d // b
    s0, s1 = rotation_signs(d, 0).to(x.device), rotation_signs(d, 1).to(x.device)
    x = x.float()
    if not inverse:
        y = _hadamard((x * s0).reshape(n, m, b)).transpose(1, 2).reshape(n, d)
        return _hadamard((y * s1).reshape(n, m, b)).reshape(n, d)
    y = _hadamard(x.reshape(n, m, b)).reshape(n, d) * s1
    return _hadamard(y.reshape(n, b, m).transpose(1, 2).reshape(n, m, b)).reshape(n, d) * s0


def _blocks(n: int, d: int) -> list[slice]:
    """Row slices of at most _BLOCK_VALUES values."""
    step = max(1, _BLOCK_VALUES // max(1, d))
    return [slice(s, s + step) for s in range(0, n, step)]


def encode_keys(keys: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(bits U8 (n, ceil(d/8)), weights F32 (n,)): the signs of each rotated key, bit j of a
    row being byte j // 8, bit j % 8 (least significant first), 1 for a negative value; and
    w = 1 / (c · R unit(k)) with c the signs over sqrt(d), so the reader's key scores its own
    direction 1. An all-zero row gets bits 0 and weight 0 (inert).

    `weights` (n,): rows with a finite value keep it (rows read from a file, whose keys are
    already the code's directions); NaN rows get theirs computed."""
    n, d = keys.shape
    bits = torch.zeros(n, (d + 7) // 8, dtype=torch.uint8)
    out = torch.empty(n, dtype=torch.float32)
    place = 2 ** torch.arange(8, dtype=torch.int32)  # (8,) bit j % 8 of a byte
    for block in _blocks(n, d):
        x = keys[block].float()  # (b, d)
        y = rotate(x)  # (b, d)
        norms = x.norm(dim=-1)  # (b,)
        neg = (y < 0).to(torch.int32)
        neg = torch.nn.functional.pad(neg, (0, -d % 8)).reshape(x.shape[0], -1, 8)
        bits[block] = (neg * place).sum(-1).to(torch.uint8)
        l1 = y.abs().sum(-1) / norms.clamp_min(1e-30)  # ||R unit(k)||_1
        w = torch.where(norms > 0, math.sqrt(d) / l1.clamp_min(1e-30), torch.zeros_like(l1))
        if weights is not None:
            given = weights[block].float()
            w = torch.where(torch.isnan(given), w, given)
        out[block] = w
    return bits, out


def decode_keys(bits: torch.Tensor, weights: torch.Tensor, d: int) -> torch.Tensor:
    """(n, d) float32 unit keys R^T c, c_j = ±1/sqrt(d) from the bits (0 rows where the weight is 0)."""
    n = bits.shape[0]
    out = torch.empty(n, d, dtype=torch.float32)
    for block in _blocks(n, d):
        b = bits[block]
        c = 1.0 - 2.0 * _unpack_bits(b, d)  # (b, d) ±1
        x = rotate(c / math.sqrt(d), inverse=True)
        out[block] = x * (weights[block] > 0).unsqueeze(-1)
    return out


def _unpack_bits(bits: torch.Tensor, d: int) -> torch.Tensor:
    """(n, d) float32 of 0/1 from U8 (n, ceil(d/8)), least significant bit first."""
    place = 2 ** torch.arange(8, dtype=torch.int32)
    flat = ((bits.to(torch.int32).unsqueeze(-1) & place) > 0).reshape(bits.shape[0], -1)
    return flat[:, :d].float()


def encode_residuals(rows: torch.Tensor, scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q U8 (n, ceil(d/2)), scales F32 (n,)): each rotated row y as int4, q = round(y / s) in
    [-7, 7], s = max|y| / 7, two values a byte (value 2j in the low nibble), two's complement.
    An all-zero row gets scale 0. `scales`: rows with a finite value keep it (read from a
    file: their q comes back exactly); NaN rows get theirs computed."""
    n, d = rows.shape
    packed = torch.zeros(n, (d + 1) // 2, dtype=torch.uint8)
    out = torch.empty(n, dtype=torch.float32)
    for block in _blocks(n, d):
        y = rotate(rows[block])  # (b, d)
        scale = y.abs().amax(-1) / C.INT4_MAX if d else torch.zeros(y.shape[0])
        if scales is not None:
            given = scales[block].float()
            scale = torch.where(torch.isnan(given), scale, given)
        q = torch.round(y / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)).clamp(-C.INT4_MAX, C.INT4_MAX)
        q = torch.where((scale > 0).unsqueeze(-1), q, 0.0).to(torch.int32)
        q = torch.nn.functional.pad(q, (0, d % 2)).reshape(y.shape[0], -1, 2) & 0xF
        packed[block] = (q[..., 0] | (q[..., 1] << 4)).to(torch.uint8)
        out[block] = scale
    return packed, out


def decode_residuals(packed: torch.Tensor, scales: torch.Tensor, d: int) -> torch.Tensor:
    """(n, d) float32 rows R^T (q · s)."""
    n = packed.shape[0]
    out = torch.empty(n, d, dtype=torch.float32)
    for block in _blocks(n, d):
        q = _int4_values(packed[block], d)  # (b, d)
        out[block] = rotate(q * scales[block].float().unsqueeze(-1), inverse=True)
    return out


def _int4_values(packed: torch.Tensor, d: int) -> torch.Tensor:
    """(n, d) float32 values of two's complement nibbles, low nibble first."""
    p = packed.to(torch.int32)
    q = torch.stack((p & 0xF, p >> 4), dim=-1).reshape(p.shape[0], -1)[:, :d]
    return torch.where(q >= 8, q - 16, q).float()


def code_errors(keys: torch.Tensor, residuals: torch.Tensor) -> dict[str, float]:
    """What storing these float rows as sign rows costs: the lowest cosine of a read key with
    its float key ("key_cosine", 1.0 if no nonzero row) and the largest relative error of a
    read residual ("residuals"), over nonzero rows."""
    worst_cos, worst_res = 1.0, 0.0
    for block in _blocks(keys.shape[0], keys.shape[1] + residuals.shape[1]):
        k, r = keys[block].float(), residuals[block].float()
        bits, w = encode_keys(k)
        cos = torch.nn.functional.cosine_similarity(decode_keys(bits, w, k.shape[1]), k, dim=-1)
        if bool((w > 0).any()):
            worst_cos = min(worst_cos, float(cos[w > 0].min()))
        q, s = encode_residuals(r)
        norms = r.norm(dim=-1)
        rel = (decode_residuals(q, s, r.shape[1]) - r).norm(dim=-1) / norms.clamp_min(1e-30)
        if bool((norms > 0).any()):
            worst_res = max(worst_res, float(rel[norms > 0].max()))
    return {"key_cosine": worst_cos, "residuals": worst_res}


def sign_problems(n: int, d_key: int, d_model: int, bits: torch.Tensor, weights: torch.Tensor,
                  packed: torch.Tensor, scales: torch.Tensor) -> list[str]:
    """V14 on the data of sign rows (shapes were checked with the header)."""
    problems: list[str] = []
    w = weights.float()
    top = math.sqrt(d_key) * (1 + C.SIGN_WEIGHT_SLACK)
    bad = ~torch.isfinite(w) | ((w != 0) & ((w < 1 - C.SIGN_WEIGHT_SLACK) | (w > top)))
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        problems.append(f"V14: {C.T_KEYS_WEIGHT} holds {int(bad.sum())} invalid weight(s) (first row {r}: "
                        f"{float(w[r])!r}); a weight is 0 or in [1, sqrt(d_key) = {math.sqrt(d_key):.4g}]")
    if d_key % 8 and n:
        spare = bits[:, -1].to(torch.int32) >> (d_key % 8)
        if bool((spare != 0).any()):
            problems.append(f"V14: {C.T_KEYS} sets bits past d_key = {d_key} (first in row "
                            f"{int((spare != 0).nonzero()[0, 0])}); they must be 0")
    zero_keys = (w == 0) & (bits != 0).any(-1)
    if bool(zero_keys.any()):
        problems.append(f"V14: {int(zero_keys.sum())} row(s) of {C.T_KEYS} have weight 0 but set bits (first row "
                        f"{int(zero_keys.nonzero()[0, 0])}); an all-zero key has bits 0")
    s = scales.float()
    bad = ~torch.isfinite(s) | (s < 0) | ((s > 0) & (s < C.MIN_SCALE))
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        problems.append(f"V14: {C.T_RESIDUALS_SCALE} holds {int(bad.sum())} invalid scale(s) (first row {r}: "
                        f"{float(s[r])!r}); a scale is 0 or a finite float32 >= 2^-126")
        return problems
    if d_model % 2 and n:
        spare = packed[:, -1].to(torch.int32) >> 4
        if bool((spare != 0).any()):
            problems.append(f"V14: {C.T_RESIDUALS} sets the high nibble past d_model = {d_model} (first in row "
                            f"{int((spare != 0).nonzero()[0, 0])}); it must be 0")
    peak = torch.zeros(n, dtype=torch.float32)
    eight = torch.zeros(n, dtype=torch.bool)
    for block in _blocks(n, d_model):
        q = _int4_values(packed[block], d_model)
        peak[block] = q.abs().amax(-1) if d_model else 0
        eight[block] = (q == -8).any(-1)
    if bool(eight.any()):
        problems.append(f"V14: {C.T_RESIDUALS} holds -8 (first in row {int(eight.nonzero()[0, 0])}); int4 values "
                        f"use [-{C.INT4_MAX}, {C.INT4_MAX}]")
    for rows, what in ((((s == 0) & (peak != 0)), "has scale 0 but nonzero values"),
                       (((s > 0) & (peak != C.INT4_MAX)), f"has a scale > 0 but max |q| != {C.INT4_MAX}")):
        if bool(rows.any()):
            problems.append(f"V14: {int(rows.sum())} row(s) of {C.T_RESIDUALS} {what} (first row "
                            f"{int(rows.nonzero()[0, 0])}); write it again from the float rows")
    return problems


__all__ = ["code_errors", "rotate", "rotation_signs", "encode_keys", "decode_keys", "encode_residuals", "decode_residuals",
           "sign_problems"]
