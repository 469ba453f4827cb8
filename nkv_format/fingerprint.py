"""Base-model fingerprint: does this loaded model hold the checkpoint the adapter was built on?

A byte hash of the weights would break on every dtype change (a checkpoint saved in fp32
and loaded in bf16 is the same model), so the fingerprint is a handful of random
projections of weight matrices, compared with a tolerance far above rounding noise and
far below the difference between two checkpoints. One *part* per matrix M (d_model, cols):

    a_k, b_k fixed pseudo-random vectors in [-1, 1), k < 16: entry i of a_k is
             h(i*32 + 2k) and of b_k is h(i*32 + 2k + 1), h a 32-bit integer hash (§6 of the spec)
    z_k    = a_k^T M b_k / (||M||_F * rms(a_k) * rms(b_k))      # ~N(0, 1) for any M
    part   = "fro=<||M||_F %.6e>;z=<z_0 %.4f>,...,<z_15 %.4f>"

nkvfp1 has one part, M = the FFN output projection at the adapter's layer:
    "nkvfp1:" + part
nkvfp2 (written since format 1.2) also covers the output projections of the layers just
below and above, and a deterministic sample of the input embedding's rows (transposed, so
the vocabulary is the column dimension):
    "nkvfp2:L7:" + part + "|L6:" + part + "|L8:" + part + "|emb:vocab=<n>;" + part
Its first part is byte for byte the body of the nkvfp1 string of the same matrix.

bf16 rounding moves each z_k by about 2^-9; two different checkpoints give unrelated z.
Every a^T M b and ||M||^2 is a sum over columns, so a loader holding a column slice of a
projection (tensor parallel), or a row slice of the embedding, computes
`fingerprint_partial` / `embedding_partial` on its slice and all-reduces the sums.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import NKVFormatError

FINGERPRINT_PREFIX = "nkvfp1:"
FINGERPRINT2_PREFIX = "nkvfp2:"
N_PROBES = 16
Z_TOLERANCE = 0.02  # max |z - z'|; bf16 noise is ~0.002
FRO_RTOL = 0.01  # relative difference of ||W||_F
EMBED_PART = "emb"
EMBED_SAMPLE_ROWS = 8192  # nkvfp2 probes at most this many embedding rows: every s-th, s = ceil(vocab / this)

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class FingerprintPart:
    """The probes of one matrix: Frobenius norm, the 16 z values, and (embedding only) the vocabulary size."""

    fro: float
    z: tuple[float, ...]
    vocab: int | None = None


@dataclass(frozen=True)
class Fingerprint:
    """A parsed fingerprint string. `parts` maps part name to probes, in string order: nkvfp1 has
    the one part "target"; nkvfp2 has "L<layer>" (the adapter's layer first), then its
    neighbours, then "emb"."""

    version: int
    parts: dict[str, FingerprintPart]

    @property
    def target(self) -> FingerprintPart:
        """The part of the projection the adapter edits (the first one)."""
        return next(iter(self.parts.values()))


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
    weight = weight.detach()
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


def embedding_stride(vocab: int) -> int:
    """s: nkvfp2 probes embedding rows (token ids) 0, s, 2s, ... below `vocab`, at most EMBED_SAMPLE_ROWS."""
    return max(1, -(-vocab // EMBED_SAMPLE_ROWS))


def embedding_columns(vocab: int) -> int:
    """Number of sampled rows, i.e. columns of the embedding part's matrix M = E[::s]^T."""
    return -(-vocab // embedding_stride(vocab))


def embedding_partial(rows: torch.Tensor, vocab: int, row_start: int = 0) -> torch.Tensor:
    """Sums for the embedding part from a row slice of the (vocab, d_model) input embedding E.

    The part is the fingerprint of M = E[::s]^T (d_model, embedding_columns(vocab)), so a
    row slice of E is a column slice of M. Rows at or past `vocab` (a runtime's padding)
    are ignored: pass the real vocabulary size, not the padded one.

    Args:
        rows: (n, d_model) rows row_start .. row_start + n - 1 of E, any float dtype/device.
        vocab: the model's real vocabulary size (rows of the checkpoint's embedding).
        row_start: token id of the slice's first row.
    Returns:
        float64 (N_PROBES + 1,) sums as `fingerprint_partial`; zeros when no sampled row is here.
    """
    s = embedding_stride(vocab)
    end = min(row_start + rows.shape[0], vocab)
    first = -(-row_start // s) * s  # first sampled token id in the slice
    if first >= end:
        return torch.zeros(N_PROBES + 1, dtype=torch.float64)
    sample = rows[first - row_start : end - row_start : s]  # (n_sampled, d_model)
    return fingerprint_partial(sample.T, col_start=first // s)


def _part(sums: torch.Tensor, d_model: int, cols: int, vocab: int | None = None) -> FingerprintPart:
    proj, sq = sums[:N_PROBES].double(), float(sums[N_PROBES])
    fro = math.sqrt(sq)
    rms_a = _probe_vectors(d_model, side=0).pow(2).mean(0).sqrt()
    rms_b = _probe_vectors(cols, side=1).pow(2).mean(0).sqrt()
    z = proj / (max(fro, 1e-30) * rms_a * rms_b)
    return FingerprintPart(fro, tuple(z.tolist()), vocab)


def _format_part(part: FingerprintPart) -> str:
    vocab = "" if part.vocab is None else f"vocab={part.vocab};"
    return f"{vocab}fro={part.fro:.6e};z=" + ",".join(f"{v:.4f}" for v in part.z)


def fingerprint_finalize(sums: torch.Tensor, d_model: int, d_key: int) -> str:
    """Turn summed `fingerprint_partial` results for the whole W into the nkvfp1 string."""
    return FINGERPRINT_PREFIX + _format_part(_part(sums, d_model, d_key))


def compute_fingerprint(weight: torch.Tensor) -> str:
    """nkvfp1 fingerprint of one (d_model, d_key) output-projection weight.

    >>> w = torch.randn(8, 32)
    >>> fingerprints_match(compute_fingerprint(w), compute_fingerprint(w.bfloat16()))
    True
    """
    d_model, d_key = weight.shape
    return fingerprint_finalize(fingerprint_partial(weight), d_model, d_key)


def covered_layers(layer: int, n_layers: int) -> list[int]:
    """Layers whose output projection an nkvfp2 fingerprint at `layer` covers, in string order."""
    return [layer, *(other for other in (layer - 1, layer + 1) if 0 <= other < n_layers)]


def model_fingerprint_finalize(layer: int, layers: Mapping[int, tuple[torch.Tensor, int, int]],
                               embedding: tuple[torch.Tensor, int, int] | None) -> str:
    """nkvfp2 string from summed partial sums.

    Args:
        layer: the adapter's layer; `layers` must hold it.
        layers: layer -> (summed `fingerprint_partial`, d_model, d_key) of its output projection.
        embedding: (summed `embedding_partial`, d_model, vocab), or None when the runtime
            cannot read the embedding (the string then lacks the part, and an adapter that
            has it does not match).
    """
    order = [layer, *sorted(other for other in layers if other != layer)]
    parts = [f"L{other}:" + _format_part(_part(*layers[other])) for other in order]
    if embedding is not None:
        sums, d_model, vocab = embedding
        parts.append(f"{EMBED_PART}:" + _format_part(_part(sums, d_model, embedding_columns(vocab), vocab)))
    return FINGERPRINT2_PREFIX + "|".join(parts)


def compute_model_fingerprint(layer: int, projections: Mapping[int, torch.Tensor],
                              embedding: torch.Tensor | None) -> str:
    """nkvfp2 fingerprint from whole matrices.

    Args:
        layer: the adapter's layer.
        projections: layer -> (d_model, d_key) output projection, for `covered_layers(layer, n_layers)`.
        embedding: the (vocab, d_model) input embedding, real rows only.

    >>> w, e = {0: torch.randn(8, 32), 1: torch.randn(8, 32)}, torch.randn(50, 8)
    >>> fingerprints_match(compute_model_fingerprint(0, w, e), compute_model_fingerprint(0, w, e.half()))
    True
    """
    layers = {other: (fingerprint_partial(w), *w.shape) for other, w in projections.items()}
    emb = None if embedding is None else (embedding_partial(embedding, embedding.shape[0]), embedding.shape[1],
                                          embedding.shape[0])
    return model_fingerprint_finalize(layer, layers, emb)


def _parse_part(text: str) -> FingerprintPart:
    fields = text.split(";")
    vocab = None
    if fields[0].startswith("vocab="):
        digits = fields.pop(0)[6:]
        if not digits.isascii() or not digits.isdigit() or int(digits) < 1 or digits != str(int(digits)):
            raise ValueError(f"vocab must be a decimal integer >= 1, got {digits[:20]!r}")
        vocab = int(digits)
    if len(fields) != 2 or not fields[0].startswith("fro=") or not fields[1].startswith("z="):
        raise ValueError("expected 'fro=...;z=...'")
    fro = float(fields[0][4:])
    z = tuple(float(v) for v in fields[1][2:].split(","))
    if len(z) != N_PROBES:
        raise ValueError(f"expected {N_PROBES} z values, got {len(z)}")
    if not all(math.isfinite(v) for v in [fro, *z]) or fro < 0:
        raise ValueError("values must be finite and fro >= 0")
    return FingerprintPart(fro, z, vocab)


def read_fingerprint(text: str, where: str = "nkv.base.fingerprint") -> Fingerprint:
    """Parse an nkvfp1 or nkvfp2 string, or raise NKVFormatError naming `where`."""
    try:
        if text.startswith(FINGERPRINT_PREFIX):
            fp = Fingerprint(1, {"target": _parse_part(text[len(FINGERPRINT_PREFIX):])})
        elif text.startswith(FINGERPRINT2_PREFIX):
            parts: dict[str, FingerprintPart] = {}
            for item in text[len(FINGERPRINT2_PREFIX):].split("|"):
                name, sep, body = item.partition(":")
                layer = name[1:]
                if not sep or not (name == EMBED_PART or (name.startswith("L") and layer.isascii()
                                                          and layer.isdigit() and layer == str(int(layer)))):
                    raise ValueError(f"part {item[:20]!r} must start with 'L<layer>:' or '{EMBED_PART}:'")
                if name in parts:
                    raise ValueError(f"part {name!r} appears twice")
                part = _parse_part(body)
                if (part.vocab is not None) != (name == EMBED_PART):
                    raise ValueError(f"part {name!r}: 'vocab=' belongs to the {EMBED_PART!r} part, and only there")
                parts[name] = part
            if not next(iter(parts)).startswith("L"):
                raise ValueError("the first part must be the adapter's layer, 'L<layer>:'")
            fp = Fingerprint(2, parts)
        elif text.startswith("nkvfp"):
            raise ValueError(f"unknown fingerprint version {text.split(':')[0][:12]!r}: this nkv knows nkvfp1 and "
                             "nkvfp2 (upgrade with: pip install -U nkv)")
        else:
            raise ValueError(f"does not start with {FINGERPRINT_PREFIX!r} or {FINGERPRINT2_PREFIX!r}")
    except ValueError as exc:
        raise NKVFormatError(where, [f"invalid fingerprint {text[:60]!r}: {exc}"]) from None
    return fp


def parse_fingerprint(text: str, where: str = "nkv.base.fingerprint") -> tuple[float, list[float]]:
    """Return (fro, z) of the adapter's target projection or raise NKVFormatError naming `where`."""
    target = read_fingerprint(text, where).target
    return target.fro, list(target.z)


def part_label(name: str) -> str:
    """Words for a part name: 'L6' -> "layer 6's FFN output projection", 'emb' -> 'the input embedding'."""
    if name == EMBED_PART:
        return "the input embedding"
    if name == "target":
        return "the edited layer's FFN output projection"
    return f"layer {name[1:]}'s FFN output projection"


def _close(e: FingerprintPart, g: FingerprintPart) -> bool:
    if e.vocab != g.vocab or abs(e.fro - g.fro) > FRO_RTOL * max(e.fro, g.fro, 1e-30):
        return False
    return max(abs(x - y) for x, y in zip(e.z, g.z)) <= Z_TOLERANCE


def fingerprint_differences(expected: str, got: str) -> list[str]:
    """What differs between an adapter's fingerprint (`expected`) and a model's (`got`); [] when they match.

    When either is nkvfp1 only the target projections are compared (that is all nkvfp1
    holds). Between two nkvfp2 strings every part of `expected` must be in `got` and match;
    parts only `got` has are not compared.

    >>> fingerprint_differences(compute_fingerprint(torch.ones(2, 4)), compute_fingerprint(torch.eye(2, 4)))
    ["the edited layer's FFN output projection differs"]
    """
    e, g = read_fingerprint(expected), read_fingerprint(got)
    if e.version == 1 or g.version == 1:
        return [] if _close(e.target, g.target) else [f"{part_label('target')} differs"]
    out = []
    for name, part in e.parts.items():
        mine = g.parts.get(name)
        if mine is None:
            out.append(f"{part_label(name)} was not read from this model")
        elif part.vocab != mine.vocab:
            out.append(f"{part_label(name)} differs (vocabulary of {part.vocab} tokens, got {mine.vocab})")
        elif not _close(part, mine):
            out.append(f"{part_label(name)} differs")
    return out


def fingerprints_match(expected: str, got: str) -> bool:
    """True when two fingerprints describe the same weights up to dtype rounding."""
    return not fingerprint_differences(expected, got)


__all__ = [
    "Fingerprint",
    "FingerprintPart",
    "compute_fingerprint",
    "compute_model_fingerprint",
    "covered_layers",
    "embedding_columns",
    "embedding_partial",
    "embedding_stride",
    "fingerprint_differences",
    "fingerprint_partial",
    "fingerprint_finalize",
    "fingerprints_match",
    "model_fingerprint_finalize",
    "parse_fingerprint",
    "part_label",
    "read_fingerprint",
]
