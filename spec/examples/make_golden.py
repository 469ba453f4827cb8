"""Write the golden examples `golden.nkv` (format 1.0), `golden-sketch.nkv` (1.1, with
the optional sketch projection), `golden-int8.nkv` (1.3, the same rows stored as I8 with
per-row scales) and `golden-sign.nkv` (2.2, the same rows as sign bits with score weights and
rotated int4 residuals) and their human-readable dumps `golden.txt`, `golden-sketch.txt`,
`golden-int8.txt`, `golden-sign.txt`.

Every value is fixed here (no randomness, no model), and all numbers are exact binary
fractions, so the file is the same on every machine. tests/test_spec_golden.py checks that
the reader turns golden.nkv into exactly what golden.txt says and that the writer
reproduces golden.nkv byte for byte.

    python spec/examples/make_golden.py        # rewrites the files next to this script

The dump is made from the bytes of the file with `struct` and `json` only, not with the
nkv reader, so it shows what the spec says is in the file rather than what the reader
believes; the sign rows are read back with `spec_rotate`, written from spec §4.4's text.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# The base model's output projection at layer 1, as the (d_model, d_key) matrix W of
# out = W k; only its fingerprint goes into the file.
WEIGHT = [[(4 * i + j - 5) / 8 for j in range(4)] for i in range(3)]

KEYS = [  # K1, [n_facts = 2, d_key = 4]
    [1.0, 0.0, 0.5, -0.25],
    [0.0, 1.0, -0.5, 0.25],
]
RESIDUALS = [  # R1, [n_facts = 2, d_model = 3]
    [0.5, -1.0, 0.25],
    [-0.125, 0.75, 2.0],
]
FACTS = [
    dict(id="cf-0", subject="Danielle Darrieux", prompt="The mother tongue of Danielle Darrieux is",
         target_new="English", target_true="French", provenance={"source": "counterfact", "case_id": 0}),
    dict(id="cf-1", subject="Eiffel Tower", prompt="The Eiffel Tower is located in",
         target_new="Zürich", target_true="Paris"),
]
BASE = dict(name="nkv-spec/golden-tiny", architecture="GPT2LMHeadModel", model_type="gpt2",
            n_layers=2, d_model=3, d_key=4, revision="v1")
LAYER = 1
GAMMA = 0.65
TARGET_MODULE = "transformer.h.1.mlp.c_proj"
BUILD = {"tool": "spec/examples/make_golden.py", "seed": 0}
SKETCH_PROJ = [  # nkv.sketch.proj (format 1.1), [d_key = 4, d_sketch = 2]; golden-sketch.nkv only
    [0.75, 0.0],
    [0.0, 0.75],
    [0.5, -0.5],
    [-0.25, 0.25],
]


def golden_adapter():  # -> nkv.NKVAdapter
    """The golden adapter, built from the constants above with the public API."""
    from nkv import BaseModelInfo, Fact, NKVAdapter, compute_fingerprint

    base = BaseModelInfo(fingerprint=compute_fingerprint(torch.tensor(WEIGHT)), **BASE)
    return NKVAdapter(
        keys=torch.tensor(KEYS, dtype=torch.float32),
        residuals=torch.tensor(RESIDUALS, dtype=torch.float32),
        facts=[Fact(**f) for f in FACTS],
        layer=LAYER, gamma=GAMMA, base=base, target_module=TARGET_MODULE, build=BUILD,
    )


def golden_sketch_adapter():  # -> nkv.NKVAdapter
    """The golden adapter plus a sketch projection: the 1.1 example."""
    from dataclasses import replace

    return replace(golden_adapter(), sketch_proj=torch.tensor(SKETCH_PROJ, dtype=torch.float32))


def golden_int8_adapter():  # -> nkv.NKVAdapter
    """The golden adapter with its rows stored as int8 (spec §4.3): the 1.3 example."""
    from dataclasses import replace

    return replace(golden_adapter(), storage="int8")


def golden_sign_adapter():  # -> nkv.NKVAdapter
    """The golden adapter with its rows stored as sign bits and int4 (spec §4.4): the 2.2 example."""
    from dataclasses import replace

    return replace(golden_adapter(), storage="sign")


def _h(x: int) -> int:  # spec §6
    for _ in range(3):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) % 2**32
    return x ^ (x >> 16)


def spec_rotate(x: list[float], transpose: bool = False) -> list[float]:
    """R x or R^T x of spec §4.4, in float64, from the spec's text alone."""
    d = len(x)
    b = d & -d
    m = d // b
    signs = [[-1.0 if _h((2 * j + t) % 2**32) >= 2**31 else 1.0 for j in range(d)] for t in (0, 1)]

    def hadamard_blocks(v: list[float]) -> list[float]:
        out = []
        for start in range(0, d, b):
            block = v[start:start + b]
            h = 1
            while h < b:
                block = [block[i] + block[i + h] if (i // h) % 2 == 0 else block[i - h] - block[i]
                         for i in range(b)]
                h *= 2
            out += [v_ / b**0.5 for v_ in block]
        return out

    def permute(v: list[float]) -> list[float]:  # place j*m + i gets value i*b + j
        return [v[(p % m) * b + p // m] for p in range(d)]

    def unpermute(v: list[float]) -> list[float]:
        out = [0.0] * d
        for p in range(d):
            out[(p % m) * b + p // m] = v[p]
        return out

    if not transpose:
        y = permute(hadamard_blocks([a * s for a, s in zip(x, signs[0])]))
        return hadamard_blocks([a * s for a, s in zip(y, signs[1])])
    y = [a * s for a, s in zip(hadamard_blocks(x), signs[1])]
    return [a * s for a, s in zip(hadamard_blocks(unpermute(y)), signs[0])]


def dump(data: bytes, name: str = "golden.nkv") -> str:
    """A human-readable description of an .nkv file's bytes (struct + json only)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__")
    start = 8 + n
    lines = [
        f"{name}: NKV format {meta['nkv.version']} example (spec/nkv-format.md).",
        "Regenerate with: python spec/examples/make_golden.py",
        "",
        f"file size: {len(data)} bytes",
        f"header length (u64 little-endian at offset 0): {n} bytes of JSON, space-padded to a multiple of 8",
        f"data section: file offsets [{start}, {len(data)})",
        "",
        "metadata:",
        *(f"  {key} = {value}" for key, value in meta.items()),
        "",
        "tensors:",
        f"  {'name':<15} {'dtype':<5} {'shape':<8} {'data_offsets':<13} file offsets",
    ]
    for tname, info in header.items():
        b, e = info["data_offsets"]
        lines.append(f"  {tname:<15} {info['dtype']:<5} {json.dumps(info['shape']):<8} "
                     f"{json.dumps([b, e]):<13} [{start + b}, {start + e})")
    lines.append("")
    for tname, info in header.items():
        b, e = (start + o for o in info["data_offsets"])
        raw = data[b:e]
        if info["dtype"] in ("F32", "I8") or (info["dtype"] == "U8" and tname != "nkv.facts"):
            values = _values(data, start, info)
            cols = info["shape"][1] if len(info["shape"]) == 2 else 1
            lines.append(f"{tname} values (row-major{', one per row' if cols == 1 else ''}):")
            lines += [f"  {json.dumps(list(values[r * cols:(r + 1) * cols]))}" for r in range(info["shape"][0])]
        else:  # nkv.facts
            lines.append(f"{tname} (UTF-8 JSON Lines, one record per row):")
            lines += [f"  {line}" for line in raw.decode("utf-8").splitlines()]
        lines.append("")
    for tname, info in header.items():  # int8 rows (1.3): what a reader returns (spec §4.3)
        if info["dtype"] == "I8" and f"{tname}.scale" in header:
            q, scale = _values(data, start, info), _values(data, start, header[f"{tname}.scale"])
            cols = info["shape"][1]
            lines.append(f"dequantized {tname} = float32(q) * scale, what a reader returns (spec §4.3):")
            for r in range(info["shape"][0]):
                row = [_f32(v * scale[r]) for v in q[r * cols:(r + 1) * cols]]  # exact in float64, then rounded
                lines.append(f"  {json.dumps(row)}")
            lines.append("")
    if header["nkv.keys"]["dtype"] == "U8":  # sign rows (2.2): what a reader returns (spec §4.4)
        lines += _sign_rows(data, start, header)
    lines.append("fingerprint weight W at layer 1, (d_model, d_key), not stored in the file:")
    lines += [f"  {json.dumps(row)}" for row in WEIGHT]
    return "\n".join(lines) + "\n"


def sign_rows(data: bytes) -> tuple[list[list[float]], list[float], list[list[float]]]:
    """(unit keys, score weights, residuals) a reader returns from a sign file (spec §4.4),
    in float64, from the bytes with struct, json and spec_rotate only."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta, start = header.pop("__metadata__"), 8 + n
    d_key, d_model = int(meta["nkv.base.d_key"]), int(meta["nkv.base.d_model"])
    bits, packed = _values(data, start, header["nkv.keys"]), _values(data, start, header["nkv.residuals"])
    weights, scales = _values(data, start, header["nkv.keys.weight"]), _values(data, start, header["nkv.residuals.scale"])
    kb, rb = header["nkv.keys"]["shape"][1], header["nkv.residuals"]["shape"][1]
    keys, residuals = [], []
    for r in range(len(weights)):
        row = bits[r * kb:(r + 1) * kb]
        c = [(-1.0 if row[j // 8] >> (j % 8) & 1 else 1.0) / d_key**0.5 for j in range(d_key)]
        keys.append(spec_rotate(c, transpose=True) if weights[r] > 0 else [0.0] * d_key)
        nib = [v for byte in packed[r * rb:(r + 1) * rb] for v in (byte & 0xF, byte >> 4)][:d_model]
        q = [v - 16 if v >= 8 else v for v in nib]
        residuals.append(spec_rotate([v * scales[r] for v in q], transpose=True))
    return keys, list(weights), residuals


def _sign_rows(data: bytes, start: int, header: dict) -> list[str]:
    keys, weights, residuals = sign_rows(data)
    lines = ["read nkv.keys: R^T of the signs over sqrt(d_key), a unit vector per row (spec §4.4, float64, "
             "6 decimals); the gate scores cos x nkv.keys.weight:"]
    lines += [f"  {json.dumps([round(v, 6) + 0.0 for v in row])}" for row in keys]
    lines.append("read nkv.residuals: R^T (q * scale), q the int4 values, two a byte, low nibble first:")
    lines += [f"  {json.dumps([round(v, 6) + 0.0 for v in row])}" for row in residuals]
    return lines + [""]


def _values(data: bytes, start: int, info: dict) -> tuple:
    b, e = (start + o for o in info["data_offsets"])
    size, code = {"F32": (4, "f"), "I8": (1, "b"), "U8": (1, "B")}[info["dtype"]]
    return struct.unpack(f"<{(e - b) // size}{code}", data[b:e])


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def main() -> None:
    for stem, adapter in (("golden", golden_adapter()), ("golden-sketch", golden_sketch_adapter()),
                          ("golden-int8", golden_int8_adapter()), ("golden-sign", golden_sign_adapter())):
        data = adapter.to_bytes()
        (HERE / f"{stem}.nkv").write_bytes(data)
        (HERE / f"{stem}.txt").write_text(dump(data, f"{stem}.nkv"), encoding="utf-8")
        print(f"wrote {HERE / stem}.nkv ({len(data)} bytes) and {stem}.txt")


if __name__ == "__main__":
    main()
