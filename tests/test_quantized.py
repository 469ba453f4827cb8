"""Int8 rows with per-row scales (format 1.3, spec §4.3, rule V12).

- save(storage="int8") / load: float rows back within half a step, zero rows stay zero,
  version 1.3, and a loaded int8 adapter re-saves to its own bytes;
- row operations keep the storage and the bytes of the rows they did not touch;
- older readers refuse the file (V7 on the I8 dtype) rather than misread it;
- every V12 rule, one broken file each, reported by rule and tensor;
- `nkv quantize` in place, to another file, and back to exact rows.
"""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from nkv import Fact, NKVAdapter, NKVFormatError, constants as C, read_header
from nkv.cli.main import main as cli
from nkv.quant import dequantize_rows, quantize_rows

EXAMPLES = Path(__file__).resolve().parent.parent / "spec" / "examples"
GOLDEN = EXAMPLES / "golden.nkv"
GOLDEN_INT8 = EXAMPLES / "golden-int8.nkv"


def _adapter(n: int = 6, seed: int = 0) -> NKVAdapter:
    """The golden adapter's settings with n random facts of d_key 4, d_model 3; row 1 is zero (padding)."""
    g = torch.Generator().manual_seed(seed)
    plain = NKVAdapter.load(GOLDEN)
    keys = torch.randn(n, 4, generator=g) * torch.logspace(-3, 3, n)[:, None]  # norms over six decades
    residuals = torch.randn(n, 3, generator=g)
    keys[1], residuals[1] = 0, 0
    facts = [Fact(id=f"f{i}", subject=f"S{i}", prompt=f"S{i} is", target_new=f"T{i}") for i in range(n)]
    return replace(plain, keys=keys, residuals=residuals, facts=facts)


def _rows_on_disk(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ------------------------------------------------------------------ write and read
def test_int8_round_trip(tmp_path: Path) -> None:
    exact = _adapter()
    path = exact.save(tmp_path / "a.nkv", storage="int8")
    header = read_header(path)
    assert (header.version, header.dtype, header.storage) == (C.INT8_VERSION, "I8", "int8")
    assert header.tensors[C.T_KEYS_SCALE].shape == (6,)
    back = NKVAdapter.load(path)
    assert (back.storage, back.keys.dtype, back.residuals.dtype) == ("int8", torch.float32, torch.float32)
    assert back.facts == exact.facts and back.gamma == exact.gamma
    for mine, rows in ((back.keys, exact.keys), (back.residuals, exact.residuals)):
        step = rows.abs().amax(-1, keepdim=True) / 127
        assert bool(((mine - rows).abs() <= step * 0.5001).all())  # half a step per value
    assert torch.equal(back.keys[1], torch.zeros(4)) and torch.equal(back.residuals[1], torch.zeros(3))
    disk = _rows_on_disk(path)
    assert disk[C.T_KEYS].dtype == torch.int8 and float(disk[C.T_KEYS_SCALE][1]) == 0.0
    assert int(disk[C.T_KEYS].abs().amax(-1)[0]) == 127
    assert back.save(tmp_path / "b.nkv").read_bytes() == path.read_bytes()  # keeps int8, same bytes
    assert back.to_bytes() == NKVAdapter.from_bytes(path.read_bytes()).to_bytes() == path.read_bytes()
    # storage="exact" writes the float rows it holds, as 1.0 when nothing else is newer
    exact_again = NKVAdapter.from_bytes(back.to_bytes(storage="exact"))
    assert exact_again.storage == "exact" and torch.equal(exact_again.keys, back.keys)
    assert read_header(back.to(torch.float16).save(tmp_path / "c.nkv")).version == C.BASE_VERSION


def test_an_older_reader_refuses_int8_rows_instead_of_misreading_them() -> None:
    # Readers of 1.0, 1.1 and 1.2 accept only F32/F16/BF16 rows (V7) and ignore unknown
    # tensors: an int8 file is refused by the dtype of nkv.keys, never read as rows q.
    # (Checked by hand with those versions' nkv_format packages from git: both rows tensors
    # are reported, "V7: tensor 'nkv.keys' has dtype I8, expected one of ['F32', 'F16', 'BF16']".)
    header = read_header(GOLDEN_INT8)
    assert C.ROW_DTYPES == ("F32", "F16", "BF16")  # what 1.0-1.2 readers accept, unchanged
    assert header.tensors[C.T_KEYS].dtype not in C.ROW_DTYPES
    assert header.tensors[C.T_RESIDUALS].dtype not in C.ROW_DTYPES
    # and every file with float rows is still written with a version those readers read
    assert read_header(GOLDEN).version == C.BASE_VERSION


def test_quantize_is_a_fixed_point_of_its_own_output() -> None:
    g = torch.Generator().manual_seed(1)
    for exponent in (-100, -20, 0, 20, 100):  # scales across the float32 range
        x = torch.randn(4000, 33, generator=g) * 2.0**exponent
        x[::9] = 0
        q, scale, problems = quantize_rows(x, "k")
        assert not problems
        q2, scale2, _ = quantize_rows(dequantize_rows(q, scale), "k")
        assert torch.equal(q, q2) and torch.equal(scale, scale2)


def test_the_writer_refuses_rows_int8_cannot_hold(tmp_path: Path) -> None:
    tiny = _adapter()
    tiny.keys[3] = torch.tensor([1e-37, 0.0, 0.0, 0.0])
    with pytest.raises(NKVFormatError, match=r"V12: row 3 of nkv.keys .* save this adapter exact"):
        tiny.save(tmp_path / "t.nkv", storage="int8")
    assert not (tmp_path / "t.nkv").exists()
    tiny.save(tmp_path / "t.nkv")  # exact storage holds it


# ------------------------------------------------------------------ row operations
def test_row_operations_keep_storage_and_untouched_bytes(tmp_path: Path) -> None:
    path = _adapter().save(tmp_path / "a.nkv", storage="int8")
    before = _rows_on_disk(path)
    loaded = NKVAdapter.load(path)

    kept = loaded.remove(ids=["f2"])
    assert kept.storage == "int8"
    after = _rows_on_disk(kept.save(tmp_path / "rm.nkv"))
    rows = [0, 1, 3, 4, 5]
    for name in (C.T_KEYS, C.T_RESIDUALS, C.T_KEYS_SCALE, C.T_RESIDUALS_SCALE):
        assert torch.equal(after[name], before[name][rows]), name

    new = Fact(id="new", subject="N", prompt="N is", target_new="X")
    added = loaded.add([new], torch.tensor([[0.1, -0.2, 0.3, 0.4]]), torch.tensor([[1.0, 2.0, -3.0]]))
    grown = _rows_on_disk(added.save(tmp_path / "add.nkv"))
    assert torch.equal(grown[C.T_KEYS][:6], before[C.T_KEYS])
    assert grown[C.T_KEYS][6].tolist() == [32, -64, 95, 127]  # the new float row, quantized

    other = NKVAdapter.load(GOLDEN).select(["cf-1"])  # exact rows, same base and layer
    merged = loaded.merge(other)
    assert merged.storage == "int8" and read_header(merged.save(tmp_path / "m.nkv")).storage == "int8"
    assert other.merge(loaded).storage == "exact"  # A's storage, as A's dtype
    assert loaded.diff(loaded.to(torch.float32)).settings == {"storage": ("int8", "exact")}
    assert loaded.with_sketch(2).storage == "int8"


# ------------------------------------------------------------------ V12, one broken file each
def _golden_parts(path: Path = GOLDEN_INT8) -> tuple[dict, dict[str, bytes]]:
    """(header, tensor name -> bytes) of a golden file, to edit and rebuild with `_file`."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    doc = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    parts = {name: body[e["data_offsets"][0] : e["data_offsets"][1]] for name, e in doc.items() if name != "__metadata__"}
    return doc, parts


def _file(doc: dict, parts: dict[str, bytes]) -> bytes:
    out, offset, body = {"__metadata__": doc["__metadata__"]}, 0, b""
    for name, raw in parts.items():
        out[name] = {"dtype": doc[name]["dtype"], "shape": doc[name]["shape"], "data_offsets": [offset, offset + len(raw)]}
        offset, body = offset + len(raw), body + raw
    head = json.dumps(out, separators=(",", ":")).encode()
    return struct.pack("<Q", len(head)) + head + body


def _f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def _drop_scale(doc: dict, parts: dict) -> None:
    del parts[C.T_KEYS_SCALE]


def _scale_f16(doc: dict, parts: dict) -> None:
    doc[C.T_KEYS_SCALE]["dtype"] = "F16"
    parts[C.T_KEYS_SCALE] = parts[C.T_KEYS_SCALE][:4]


def _scale_shape(doc: dict, parts: dict) -> None:
    doc[C.T_KEYS_SCALE]["shape"] = [1, 2]


def _scale_with_float_rows(doc: dict, parts: dict) -> None:
    exact = json.loads(GOLDEN.read_bytes()[8 : 8 + struct.unpack("<Q", GOLDEN.read_bytes()[:8])[0]])
    body = GOLDEN.read_bytes()[8 + struct.unpack("<Q", GOLDEN.read_bytes()[:8])[0]:]
    for name in (C.T_KEYS, C.T_RESIDUALS):
        doc[name] = exact[name]
        parts[name] = body[exact[name]["data_offsets"][0] : exact[name]["data_offsets"][1]]
    doc["__metadata__"]["nkv.version"] = "1.0"
    del parts[C.T_RESIDUALS_SCALE]


def _residuals_f32(doc: dict, parts: dict) -> None:
    doc[C.T_RESIDUALS]["dtype"] = "F32"
    parts[C.T_RESIDUALS] = _f32(*[0.5] * 6)


def _scale_value(value: float, row: int = 0):
    def edit(doc: dict, parts: dict) -> None:
        raw = bytearray(parts[C.T_KEYS_SCALE])
        raw[4 * row : 4 * row + 4] = _f32(value)
        parts[C.T_KEYS_SCALE] = bytes(raw)
    return edit


def _q_value(index: int, value: int, tensor: str = C.T_KEYS):
    def edit(doc: dict, parts: dict) -> None:
        raw = bytearray(parts[tensor])
        raw[index] = value & 0xFF
        parts[tensor] = bytes(raw)
    return edit


BROKEN = {  # case -> (edit, what the error must say)
    "scale missing": (_drop_scale, r"V12: tensor 'nkv.keys' is I8 but 'nkv.keys.scale' is missing"),
    "scale F16": (_scale_f16, r"V12: tensor 'nkv.keys.scale' must be F32 \[n_facts = 2\], got F16 \[2\]"),
    "scale shape": (_scale_shape, r"V12: tensor 'nkv.keys.scale' must be F32 \[n_facts = 2\], got F32 \[1, 2\]"),
    "scale with float rows": (_scale_with_float_rows, r"V12: tensor 'nkv.keys.scale' goes with I8 rows only"),
    "I8 keys, F32 residuals": (_residuals_f32, r"V7: nkv.keys is I8 but nkv.residuals is F32"),
    "negative scale": (_scale_value(-0.01), r"V12: nkv.keys.scale holds 1 invalid scale\(s\) \(first row 0"),
    "NaN scale": (_scale_value(float("nan"), 1), r"V12: nkv.keys.scale .* \(first row 1: nan\)"),
    "subnormal scale": (_scale_value(1e-40), r"V12: nkv.keys.scale .* >= 2\^-126"),
    "huge scale": (_scale_value(3e38), r"V8: nkv.keys holds NaN/Inf"),  # 127 x scale overflows
    "q = -128": (_q_value(1, -128), r"V12: nkv.keys holds -128 \(first in row 0\)"),
    "scale 0, row not zero": (_scale_value(0.0), r"V12: 1 row\(s\) of nkv.keys has scale 0 but nonzero values"),
    "max |q| below 127": (_q_value(0, 100), r"V12: 1 row\(s\) of nkv.keys has a scale > 0 but max \|q\| != 127"),
    "residual row": (_q_value(5, 3, C.T_RESIDUALS), r"V12: 1 row\(s\) of nkv.residuals has a scale > 0"),
}


def assert_both_readers_refuse(data: bytes, message: str, tmp_path: Path) -> None:
    """from_bytes and load (through a file) both refuse `data` with an error matching `message`."""
    with pytest.raises(NKVFormatError, match=message):
        NKVAdapter.from_bytes(data, "broken.nkv")
    (tmp_path / "broken.nkv").write_bytes(data)
    with pytest.raises(NKVFormatError, match=message):
        NKVAdapter.load(tmp_path / "broken.nkv")


@pytest.mark.parametrize("case", list(BROKEN))
def test_each_int8_rule_is_reported_by_name(case: str, tmp_path: Path) -> None:
    edit, message = BROKEN[case]
    doc, parts = _golden_parts()
    edit(doc, parts)
    assert_both_readers_refuse(_file(doc, parts), message, tmp_path)


def test_rebuilt_golden_parts_load() -> None:
    doc, parts = _golden_parts()
    assert NKVAdapter.from_bytes(_file(doc, parts)).to_bytes() == GOLDEN_INT8.read_bytes()


# ------------------------------------------------------------------ CLI
def test_cli_quantize_in_place_to_a_file_and_back(tmp_path: Path) -> None:
    src = tmp_path / "a.nkv"
    src.write_bytes(GOLDEN.read_bytes())
    runner = CliRunner()
    out = runner.invoke(cli, ["quantize", str(src), "-o", str(tmp_path / "b.nkv")])
    assert out.exit_code == 0, out.output
    assert "int8 rows" in out.output and "largest relative row error K1 0.38%, R1 0.38%" in out.output
    assert (tmp_path / "b.nkv").read_bytes() == GOLDEN_INT8.read_bytes()
    assert src.read_bytes() == GOLDEN.read_bytes()  # -o leaves the input alone
    out = runner.invoke(cli, ["quantize", str(src)])  # in place
    assert out.exit_code == 0 and src.read_bytes() == GOLDEN_INT8.read_bytes()
    out = runner.invoke(cli, ["quantize", str(src)])  # again: int8 rows stay as they are
    assert out.exit_code == 0 and "already held int8 rows" in out.output
    assert src.read_bytes() == GOLDEN_INT8.read_bytes()
    out = runner.invoke(cli, ["inspect", str(src)])
    assert "I8 (int8 rows, one F32 scale per row)" in out.output and "nkv 1.3" in out.output
    out = runner.invoke(cli, ["quantize", str(src), "--exact", "float16"])
    assert out.exit_code == 0, out.output
    back = read_header(src)
    assert (back.dtype, back.version) == ("F16", C.BASE_VERSION)
    tiny = _adapter()
    tiny.keys[3] = torch.tensor([1e-37, 0.0, 0.0, 0.0])
    tiny.save(src)
    out = runner.invoke(cli, ["quantize", str(src)])
    assert out.exit_code == 1 and "V12: row 3 of nkv.keys" in out.output
