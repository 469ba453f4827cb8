"""Base-model fingerprint: does this loaded model hold the checkpoint the adapter was built on?

A byte hash of the weights would break on every dtype change (a checkpoint saved in fp32
and loaded in bf16 is the same model), so the fingerprint is a handful of random
projections of the adapter's target weight, compared with a tolerance far above
rounding noise and far below the difference between two checkpoints:

    W        the output projection at the adapter's layer, as a (d_model, d_key) matrix
    a_k, b_k fixed pseudo-random vectors in [-1, 1), k < 16: entry i of a_k is
             h(i*32 + 2k) and of b_k is h(i*32 + 2k + 1), h a 32-bit integer hash (§6 of the spec)
    z_k    = a_k^T W b_k / (||W||_F * rms(a_k) * rms(b_k))      # ~N(0, 1) for any W
    string = "nkvfp1:fro=<||W||_F %.6e>;z=<z_0 %.4f>,...,<z_15 %.4f>"

bf16 rounding moves each z_k by about 2^-9; two different checkpoints give unrelated z.
Because a^T W b is a sum over columns, a loader that holds only a column slice of W
(tensor parallel) computes `fingerprint_partial` on its slice and all-reduces the sums.
"""

from __future__ import annotations

import math

import torch

from .errors import NKVFormatError

FINGERPRINT_PREFIX = "nkvfp1:"
N_PROBES = 16
Z_TOLERANCE = 0.02  # max |z - z'|; bf16 noise is ~0.002
FRO_RTOL = 0.01  # relative difference of ||W||_F

_MASK32 = 0xFFFFFFFF


def _probe_vectors(length: int, side: int, start: int = 0, count: int | None = None) -> torch.Tensor:
    """(count, N_PROBES) float64 matrix of pseudo-random values in [-1, 1).

    Entry (i, k) depends only on (start + i, k, side), so any slice of a vector can be
    generated without the rest: that is what makes tensor-parallel partial sums possible.
    """
    count = length - start if count is None else count
    i = torch.arange(start, start + count, dtype=torch.int64).unsqueeze(1)  # (count, 1)
    k = torch.arange(N_PROBES, dtype=torch.int64).unsqueeze(0)  # (1, K)
    x = (i * (2 * N_PROBES) + k * 2 + side) & _MASK32
    for _ in range(3):  # a well-mixing 32-bit integer hash; int64 math never overflows here
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = x ^ (x >> 16)
    return x.to(torch.float64) / 2**32 * 2.0 - 1.0


def fingerprint_partial(weight: torch.Tensor, col_start: int = 0, chunk_rows: int = 1024) -> torch.Tensor:
    """Sums for the fingerprint from a column slice of W (all of W when col_start=0).

    Args:
        weight: (d_model, cols) slice of the output projection, any float dtype/device.
        col_start: index in the full d_key of the slice's first column.
    Returns:
        float64 tensor (N_PROBES + 1,): [a_k^T W_slice b_k for each k..., ||W_slice||_F^2].
        Sum these over slices (all-reduce), then call `fingerprint_finalize`.
    """
    d_model, cols = weight.shape
    a = _probe_vectors(d_model, side=0)  # (d_model, K)
    b = _probe_vectors(0, side=1, start=col_start, count=cols).to(weight.device)  # (cols, K)
    proj = torch.zeros(N_PROBES, dtype=torch.float64)
    sq = torch.zeros((), dtype=torch.float64)
    for r0 in range(0, d_model, chunk_rows):  # bounded fp64 copies for 8B-size layers
        w = weight[r0 : r0 + chunk_rows].to(torch.float64)  # (rows, cols)
        wb = (w @ b).cpu()  # (rows, K)
        proj += (a[r0 : r0 + chunk_rows] * wb).sum(0)
        sq += w.pow(2).sum().cpu()
    return torch.cat([proj, sq.unsqueeze(0)])


def fingerprint_finalize(sums: torch.Tensor, d_model: int, d_key: int) -> str:
    """Turn summed `fingerprint_partial` results for the whole W into the fingerprint string."""
    proj, sq = sums[:N_PROBES].double(), float(sums[N_PROBES])
    fro = math.sqrt(sq)
    a = _probe_vectors(d_model, side=0)
    b = _probe_vectors(d_key, side=1)
    rms_a = a.pow(2).mean(0).sqrt()
    rms_b = b.pow(2).mean(0).sqrt()
    z = proj / (max(fro, 1e-30) * rms_a * rms_b)
    return f"{FINGERPRINT_PREFIX}fro={fro:.6e};z=" + ",".join(f"{v:.4f}" for v in z.tolist())


def compute_fingerprint(weight: torch.Tensor) -> str:
    """Fingerprint of a (d_model, d_key) output-projection weight.

    >>> w = torch.randn(8, 32)
    >>> fingerprints_match(compute_fingerprint(w), compute_fingerprint(w.bfloat16()))
    True
    """
    d_model, d_key = weight.shape
    return fingerprint_finalize(fingerprint_partial(weight), d_model, d_key)


def parse_fingerprint(text: str, where: str = "nkv.base.fingerprint") -> tuple[float, list[float]]:
    """Return (fro, z) or raise NKVFormatError naming `where`."""
    try:
        if not text.startswith(FINGERPRINT_PREFIX):
            raise ValueError(f"does not start with {FINGERPRINT_PREFIX!r}")
        fro_part, z_part = text[len(FINGERPRINT_PREFIX) :].split(";")
        if not fro_part.startswith("fro=") or not z_part.startswith("z="):
            raise ValueError("expected 'fro=...;z=...'")
        fro = float(fro_part[4:])
        z = [float(v) for v in z_part[2:].split(",")]
        if len(z) != N_PROBES:
            raise ValueError(f"expected {N_PROBES} z values, got {len(z)}")
        if not all(math.isfinite(v) for v in [fro, *z]) or fro < 0:
            raise ValueError("values must be finite and fro >= 0")
    except ValueError as exc:
        raise NKVFormatError(where, [f"invalid fingerprint {text[:60]!r}: {exc}"]) from None
    return fro, z


def fingerprints_match(expected: str, got: str) -> bool:
    """True when two fingerprints describe the same weights up to dtype rounding."""
    fro_e, z_e = parse_fingerprint(expected)
    fro_g, z_g = parse_fingerprint(got)
    if abs(fro_e - fro_g) > FRO_RTOL * max(fro_e, fro_g, 1e-30):
        return False
    return max(abs(x - y) for x, y in zip(z_e, z_g)) <= Z_TOLERANCE


__all__ = [
    "compute_fingerprint",
    "fingerprint_partial",
    "fingerprint_finalize",
    "fingerprints_match",
    "parse_fingerprint",
]
