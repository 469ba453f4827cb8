"""Int8 storage of K1 and R1 with one float32 scale per row (format 1.3, spec §4.3).

A row x is stored as q = round(x / s), s = max|x| / 127, and read back as float32(q) * s.
The gate's cosine does not depend on s, so a key loses only the rounding of q (at most
s/2 per value); a residual loses the same in absolute terms.

The writer picks s so that quantizing rows read back from a file gives that file's q and s
again, bit for bit: a loaded int8 adapter re-saves unchanged, whatever row operation came
in between, and only rows that were added as floats are rounded.
"""

from __future__ import annotations

import torch

from . import constants as C

_BLOCK_VALUES = 2**24  # values per block: bounds the float32 temporaries at 1M x 14336 rows


def quantize_rows(rows: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Symmetric per-row int8: (q int8 (n, d), scale float32 (n,), problems).

    An all-zero row gets scale 0 and q 0 (padding stays inert). A row whose largest value
    is below 127 * 2^-126 would need a subnormal scale (or, near the float32 maximum, an
    infinite one); it is listed in `problems` (V12) rather than rounded to zero, since its
    direction still fires the gate.
    Rows must be finite (the writer checks V8 first).

    >>> q, s, _ = quantize_rows(torch.tensor([[0.5, -1.0], [0.0, 0.0]]), "nkv.keys")
    >>> q.tolist(), s.tolist()
    ([[64, -127], [0, 0]], [0.007874015718698502, 0.0])
    """
    n, d = rows.shape
    q = torch.empty(n, d, dtype=torch.int8)
    scale = torch.empty(n, dtype=torch.float32)
    problems: list[str] = []
    block = max(1, _BLOCK_VALUES // max(1, d))
    for start in range(0, n, block):
        x = rows[start : start + block].to("cpu", torch.float32)  # (b, d)
        amax = x.abs().amax(-1)  # (b,)
        s = _scale_for(amax)
        odd = ((amax > 0) & ((s < C.MIN_SCALE) | ~torch.isfinite(s))).nonzero().flatten().tolist()
        problems.extend(f"V12: row {start + r} of {name} has max |value| {float(amax[r]):.3g}, outside what "
                        f"int8 storage holds (a scale in [2^-126, 2^128 / 127]); save this adapter exact"
                        for r in odd[:3])
        safe = torch.where(s > 0, s, torch.ones_like(s))
        qb = torch.round(x / safe[:, None]).clamp_(-C.QUANT_MAX, C.QUANT_MAX)  # (b, d)
        qb[s == 0] = 0
        q[start : start + block] = qb.to(torch.int8)
        scale[start : start + block] = s
    return q, scale, problems


def _scale_for(amax: torch.Tensor) -> torch.Tensor:
    """g(max|x| / 127), with g(s) = float32(float32(127 * s) / 127).

    A row read back from a file has max|x| = float32(127 * s), and float32(max|x| / 127) is
    g(s), which misses s by one ulp for about 1 float32 mantissa in 130. g is idempotent
    (checked on every float32 mantissa), so a scale the writer chose, s = g(...), satisfies
    g(s) = s and comes back unchanged from its own rows."""
    s = amax / C.QUANT_MAX
    return (s * C.QUANT_MAX) / C.QUANT_MAX


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32(q) * scale, row by row (spec §4.3): (n, d) float32."""
    return q.to(torch.float32) * scale.to(torch.float32)[:, None]


def max_relative_error(rows: torch.Tensor) -> float:
    """The largest ||dequantize(quantize(x)) - x|| / ||x|| over the nonzero rows x (0.0 if none),
    in blocks: what storing `rows` as int8 costs, before writing them."""
    worst = 0.0
    block = max(1, _BLOCK_VALUES // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], block):
        x = rows[start : start + block].to("cpu", torch.float32)  # (b, d)
        q, scale, _ = quantize_rows(x, "rows")
        norms = x.norm(dim=-1)
        rel = (dequantize_rows(q, scale) - x).norm(dim=-1) / norms.clamp_min(1e-30)
        if bool((norms > 0).any()):
            worst = max(worst, float(rel[norms > 0].max()))
    return worst


def int8_problems(name: str, q: torch.Tensor, scale: torch.Tensor) -> list[str]:
    """V12 on the data of one int8 row tensor and its scales (shapes were checked by the header).

    Scales are 0 or finite normal float32 >= 2^-126; q is in [-127, 127]; a row with scale 0
    is all zero and a row with a scale > 0 reaches |q| = 127 (the writer's form, so every
    valid file re-saves to its own bytes).
    """
    problems: list[str] = []
    s = scale.to(torch.float32)
    bad = (~torch.isfinite(s)) | (s < 0) | ((s > 0) & (s < C.MIN_SCALE))
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        problems.append(f"V12: {name}.scale holds {int(bad.sum())} invalid scale(s) (first row {r}: "
                        f"{float(s[r])!r}); a scale is 0 or a finite float32 >= 2^-126")
        return problems
    n = q.shape[0]
    qmin, qmax = torch.empty(n, dtype=torch.int16), torch.empty(n, dtype=torch.int16)
    block = max(1, _BLOCK_VALUES // max(1, q.shape[1]))
    for start in range(0, n, block):
        qb = q[start : start + block]
        qmin[start : start + block] = qb.amin(-1).to(torch.int16)
        qmax[start : start + block] = qb.amax(-1).to(torch.int16)
    if bool((qmin < -C.QUANT_MAX).any()):
        r = int((qmin < -C.QUANT_MAX).nonzero()[0, 0])
        problems.append(f"V12: {name} holds -128 (first in row {r}); int8 rows use [-127, 127]")
    peak = torch.maximum(qmax, -qmin)  # max |q| per row, (n,)
    for rows, what in ((((s == 0) & (peak != 0)), "has scale 0 but nonzero values"),
                       (((s > 0) & (peak != C.QUANT_MAX)), f"has a scale > 0 but max |q| != {C.QUANT_MAX}")):
        if bool(rows.any()):
            r = int(rows.nonzero()[0, 0])
            problems.append(f"V12: {int(rows.sum())} row(s) of {name} {what} (first row {r}); "
                            "write it again from the float rows")
    return problems


__all__ = ["quantize_rows", "dequantize_rows", "max_relative_error", "int8_problems"]
