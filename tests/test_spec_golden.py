"""The spec, the golden example and the code agree.

- the reader turns spec/examples/golden.nkv into exactly what golden.txt says;
- the writer reproduces golden.nkv byte for byte (from the file, and from the constants);
- the key, tensor and fact-field tables of spec/nkv-format.md equal nkv.constants;
- every rule number V1..V14 the code reports is defined in the spec;
- golden-sketch.nkv (1.1) and golden-int8.nkv (1.3) read as their dumps say and rewrite
  byte for byte; the int8 file's rows are those of golden.nkv within one rounding step;
- golden-sign.nkv (2.2) reads as spec §4.4's rotation, implemented in make_golden.py from the
  text alone, says, rewrites byte for byte, and a row read from it scores its own key 1;
- the fingerprint of spec §6, implemented here from the text alone, gives the golden value
  (nkvfp1) and agrees with the code (nkvfp2).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import struct
from pathlib import Path

import pytest
import torch

import nkv
from nkv import NKVAdapter, constants as C, read_header
from nkv.header import NKVHeader

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "spec" / "nkv-format.md"
GOLDEN = ROOT / "spec" / "examples" / "golden.nkv"
DUMP = ROOT / "spec" / "examples" / "golden.txt"


def _make_golden_module():
    spec = importlib.util.spec_from_file_location("make_golden", ROOT / "spec" / "examples" / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse_dump(text: str) -> dict:
    """golden.txt -> {'size', 'header_len', 'metadata', 'tensors', 'values', 'facts', 'weight'}."""
    out: dict = {"metadata": {}, "tensors": {}, "values": {}, "facts": [], "weight": []}
    section = None
    for line in text.splitlines():
        if m := re.fullmatch(r"file size: (\d+) bytes", line):
            out["size"] = int(m[1])
        elif m := re.match(r"header length \(u64 little-endian at offset 0\): (\d+) bytes", line):
            out["header_len"] = int(m[1])
        elif not line.startswith("  "):
            section = line.rstrip(":").split(" ")[0] if line.endswith(":") else None
            if line.startswith("fingerprint weight"):
                section = "weight"
        elif section == "metadata":
            key, value = line.strip().split(" = ", 1)
            out["metadata"][key] = value
        elif section == "tensors" and not line.strip().startswith("name"):
            m = re.fullmatch(r"\s+(\S+)\s+(\S+)\s+(\[[\d, ]*\])\s+(\[\d+, \d+\])\s+\[(\d+), (\d+)\)", line)
            assert m, line
            out["tensors"][m[1]] = (m[2], json.loads(m[3]), json.loads(m[4]), (int(m[5]), int(m[6])))
        elif section in (C.T_KEYS, C.T_RESIDUALS):
            out["values"].setdefault(section, []).append(json.loads(line))
        elif section == C.T_FACTS:
            out["facts"].append(json.loads(line))
        elif section == "weight":
            out["weight"].append(json.loads(line))
    return out


@pytest.fixture(scope="module")
def dump() -> dict:
    return _parse_dump(DUMP.read_text(encoding="utf-8"))


def test_reader_reads_exactly_the_dump(dump: dict) -> None:
    data = GOLDEN.read_bytes()
    assert len(data) == dump["size"]
    assert struct.unpack("<Q", data[:8])[0] == dump["header_len"]

    header = read_header(GOLDEN)
    assert header.metadata == dump["metadata"]
    assert header.data_start == 8 + dump["header_len"]
    for name, (dtype, shape, offsets, file_range) in dump["tensors"].items():
        info = header.tensors[name]
        assert (info.dtype, list(info.shape), list(info.data_offsets)) == (dtype, shape, offsets)
        assert tuple(header.data_start + o for o in info.data_offsets) == file_range

    adapter = NKVAdapter.load(GOLDEN)
    assert adapter.keys.dtype == torch.float32
    assert adapter.keys.tolist() == dump["values"][C.T_KEYS]
    assert adapter.residuals.tolist() == dump["values"][C.T_RESIDUALS]
    assert [f.to_record() for f in adapter.facts] == dump["facts"]
    assert (adapter.n_facts, adapter.layer, adapter.gamma) == (2, 1, 0.65)
    assert (adapter.base.d_key, adapter.base.d_model, adapter.base.n_layers) == (4, 3, 2)
    assert adapter.base.fingerprint == dump["metadata"][C.K_BASE_FINGERPRINT]
    assert NKVAdapter.from_bytes(data).to_bytes() == data


def test_writer_reproduces_golden_bytes(tmp_path: Path) -> None:
    data = GOLDEN.read_bytes()
    assert NKVAdapter.load(GOLDEN).save(tmp_path / "again.nkv").read_bytes() == data
    assert _make_golden_module().golden_adapter().to_bytes() == data


def test_dump_is_up_to_date() -> None:
    assert _make_golden_module().dump(GOLDEN.read_bytes()) == DUMP.read_text(encoding="utf-8")


def _table(section: str) -> list[list[str]]:
    """Rows (cells without backticks) of the first table under the heading `section`."""
    text = SPEC.read_text(encoding="utf-8")
    start = re.search(rf"^#+ {re.escape(section)}\b.*$", text, re.M)
    assert start, f"no heading {section!r} in the spec"
    rows = []
    for line in text[start.end():].splitlines():
        if line.startswith("|"):
            rows.append([c.strip().strip("`") for c in line.strip("|").split("|")])
        elif rows:
            break
    return [r for r in rows[2:]]  # skip the head and the --- line


def test_spec_key_table_matches_constants() -> None:
    rows = _table("3. Metadata keys")
    required = [r[0] for r in rows if r[1] == "yes"]
    optional = [r[0] for r in rows if r[1] == "no"]
    assert len(required) + len(optional) == len(rows)
    assert sorted(required) == sorted(C.REQUIRED_KEYS)
    assert sorted(optional) == sorted(C.OPTIONAL_KEYS)


def test_spec_tensor_table_matches_constants() -> None:
    rows = {r[0]: r for r in _table("4. Tensors")}
    assert set(rows) == {C.T_KEYS, C.T_RESIDUALS, C.T_FACTS}
    assert re.findall(r"`?(F32|F16|BF16)`?", rows[C.T_KEYS][1]) == list(C.ROW_DTYPES)
    assert rows[C.T_KEYS][2] == "[n_facts, d_key]"
    assert rows[C.T_RESIDUALS][2] == "[n_facts, d_model]"
    assert (rows[C.T_FACTS][1], rows[C.T_FACTS][2]) == ("U8", "[n_bytes]")
    optional = {r[0]: r for r in _table("4.2 Optional tensors")}
    assert tuple(optional) == C.OPTIONAL_TENSORS
    assert optional[C.T_SKETCH_PROJ][1:3] == ["F32", "[d_key, d_sketch]"]
    scales = {r[0]: r for r in _table("4.3 Int8 rows")}
    assert tuple(scales) == C.SCALE_TENSORS
    assert all(r[1:3] == ["F32", "[n_facts]"] for r in scales.values())
    signs = {r[0]: r for r in _table("4.4 Sign rows")}
    assert tuple(signs) == (C.T_RESIDUALS_SCALE, C.T_KEYS_WEIGHT)
    assert all(r[1:3] == ["F32", "[n_facts]"] for r in signs.values())
    assert "(or `I8`, §4.3)" in rows[C.T_KEYS][1] or "(or I8, §4.3)" in rows[C.T_KEYS][1]


def test_spec_fact_fields_match_constants() -> None:
    rows = _table("4.1 Fact records")
    assert [r[0] for r in rows if r[1] == "yes"] == list(C.FACT_REQUIRED_FIELDS)
    assert [r[0] for r in rows if r[1] == "no"] == list(C.FACT_OPTIONAL_FIELDS)


def test_every_rule_number_in_the_code_is_in_the_spec() -> None:
    code = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "nkv_format").glob("*.py"))
    used = set(re.findall(r"\bV(\d+):", code))
    defined = set(re.findall(r"^- \*\*V(\d+)\*\*", SPEC.read_text(encoding="utf-8"), re.M))
    assert used, "no rule numbers found in nkv_format/"
    assert used <= defined, f"rules used in code but not in the spec: {sorted(used - defined, key=int)}"
    assert defined == {str(i) for i in range(1, 15)}


def _spec_part(weight: list[list[float]]) -> str:
    """part(M) of spec §6, transcribed literally in plain Python (no torch)."""

    def h(x: int) -> int:
        for _ in range(3):
            x = ((x ^ (x >> 16)) * 0x45D9F3B) % 2**32
        return x ^ (x >> 16)

    def u(i: int, k: int, side: int) -> float:
        return h((i * 32 + 2 * k + side) % 2**32) / 2**32 * 2 - 1

    rows, cols = len(weight), len(weight[0])
    fro = math.sqrt(sum(w * w for row in weight for w in row))
    z = []
    for k in range(16):
        a = [u(i, k, 0) for i in range(rows)]
        b = [u(j, k, 1) for j in range(cols)]
        p = sum(a[i] * weight[i][j] * b[j] for i in range(rows) for j in range(cols))
        rms_a = math.sqrt(sum(x * x for x in a) / rows)
        rms_b = math.sqrt(sum(x * x for x in b) / cols)
        z.append(p / (max(fro, 1e-30) * rms_a * rms_b))
    return "fro=" + format(fro, ".6e") + ";z=" + ",".join(format(v, ".4f") for v in z)


def _spec_fingerprint(weight: list[list[float]]) -> str:
    return "nkvfp1:" + _spec_part(weight)


def _spec_fingerprint2(layers: dict[int, list[list[float]]], embedding: list[list[float]], layer: int,
                       n_layers: int) -> str:
    """nkvfp2 of spec §6, transcribed literally."""
    vocab = len(embedding)
    s = math.ceil(vocab / 8192)
    m_emb = [list(col) for col in zip(*embedding[0:vocab:s])]  # transpose: [d_model, ceil(vocab / s)]
    return "nkvfp2:" + "|".join(["L%d:" % l + _spec_part(layers[l]) for l in (layer, layer - 1, layer + 1)
                                 if 0 <= l < n_layers] + ["emb:vocab=%d;" % vocab + _spec_part(m_emb)])


def test_fingerprint_from_the_spec_text(dump: dict) -> None:
    expected = dump["metadata"][C.K_BASE_FINGERPRINT]
    assert _spec_fingerprint(dump["weight"]) == expected
    assert nkv.compute_fingerprint(torch.tensor(dump["weight"])) == expected
    # a bigger, non-exact weight: the spec text and the implementation agree within tolerance
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=gen, dtype=torch.float64)
    other = w + 0.3 * torch.randn(24, 40, generator=gen, dtype=torch.float64)
    assert nkv.fingerprints_match(_spec_fingerprint(w.tolist()), nkv.compute_fingerprint(w))
    assert nkv.fingerprints_match(nkv.compute_fingerprint(w), nkv.compute_fingerprint(w.bfloat16()))
    assert not nkv.fingerprints_match(nkv.compute_fingerprint(w), nkv.compute_fingerprint(other))


def test_nkvfp2_from_the_spec_text() -> None:
    from nkv.fingerprint import compute_model_fingerprint, read_fingerprint

    gen = torch.Generator().manual_seed(0)
    layers = {l: torch.randn(3, 5, generator=gen, dtype=torch.float64) for l in range(3)}
    embedding = torch.randn(8200, 3, generator=gen, dtype=torch.float64)  # > 8192 rows: every 2nd is probed
    for layer in range(3):
        spec = _spec_fingerprint2({l: w.tolist() for l, w in layers.items()}, embedding.tolist(), layer, 3)
        code = compute_model_fingerprint(layer, {l: layers[l] for l in (layer - 1, layer, layer + 1) if 0 <= l < 3},
                                         embedding)
        mine, theirs = read_fingerprint(spec), read_fingerprint(code)
        assert list(mine.parts) == list(theirs.parts) and mine.parts["emb"].vocab == 8200
        for name, part in mine.parts.items():
            assert abs(part.fro - theirs.parts[name].fro) <= 1e-6 * part.fro
            assert max(abs(x - y) for x, y in zip(part.z, theirs.parts[name].z)) <= 1e-4
        assert nkv.fingerprints_match(spec, code)
        # the first part is the nkvfp1 body of the edited projection
        assert "nkvfp1:" + spec.split("|")[0].split(":", 2)[2] == _spec_fingerprint(layers[layer].tolist())


def test_spec_numbers_match_the_code() -> None:
    from nkv import fingerprint as fp
    from nkv.header import DTYPE_SIZES

    text = SPEC.read_text(encoding="utf-8")
    assert f"{C.MAX_HEADER_BYTES:,}" in text
    v2 = re.search(r"^- \*\*V2\*\*.*?(?=^- \*\*V3)", text, re.M | re.S)[0]
    listed = re.search(r"known dtype \(`([^`]*)`", v2.replace("\n  ", " "))[1].split()
    assert sorted(listed) == sorted(DTYPE_SIZES)
    assert fp.FINGERPRINT_PREFIX == "nkvfp1:" and fp.N_PROBES == 16
    assert fp.FINGERPRINT2_PREFIX == "nkvfp2:" and f"s = ceil(vocab / {fp.EMBED_SAMPLE_ROWS})" in text
    assert f"≤ {fp.FRO_RTOL} ·" in text and f"≤ {fp.Z_TOLERANCE}`" in text
    assert text.splitlines()[0] == f"# The NKV file format, version {C.FORMAT_VERSION}"
    assert f"writers of this spec write `{C.SIGN_VERSION}` when K₁/R₁ are sign rows (§4.4), else `{C.RESIDUAL_SITE_VERSION}`" in text  # 2.1 adds a cache, no file says 2.1
    assert f"`SKETCH_KEYS_TOLERANCE` (10⁻⁴)" in text and C.SKETCH_KEYS_TOLERANCE == 1e-4
    assert f"`SKETCH_KEYS_CHECKED` ({C.SKETCH_KEYS_CHECKED})" in text


GOLDEN_SKETCH = ROOT / "spec" / "examples" / "golden-sketch.nkv"


def test_golden_sketch_reads_its_dump_and_rewrites_byte_for_byte(tmp_path: Path) -> None:
    data = GOLDEN_SKETCH.read_bytes()
    dump = _parse_dump((ROOT / "spec" / "examples" / "golden-sketch.txt").read_text(encoding="utf-8"))
    assert len(data) == dump["size"] and dump["metadata"][C.K_VERSION] == C.SKETCH_VERSION
    assert read_header(GOLDEN_SKETCH).metadata == dump["metadata"]
    adapter = NKVAdapter.load(GOLDEN_SKETCH)
    module = _make_golden_module()
    assert adapter.sketch_proj.tolist() == module.SKETCH_PROJ
    # the exact rows are those of the 1.0 golden file: a reader that ignores the sketch reads them
    plain = NKVAdapter.load(GOLDEN)
    assert torch.equal(adapter.keys, plain.keys) and torch.equal(adapter.residuals, plain.residuals)
    assert adapter.with_sketch(0).to_bytes() == GOLDEN.read_bytes()  # dropping it gives the 1.0 bytes
    assert module.golden_sketch_adapter().to_bytes() == data
    assert NKVAdapter.from_bytes(data).save(tmp_path / "again.nkv").read_bytes() == data
    assert module.dump(data, "golden-sketch.nkv") == (ROOT / "spec" / "examples" / "golden-sketch.txt").read_text(
        encoding="utf-8")


GOLDEN_INT8 = ROOT / "spec" / "examples" / "golden-int8.nkv"


def _golden_matching_its_dump(path: Path, version: str) -> tuple[bytes, str, NKVHeader]:
    """(bytes, dump text, header) of a golden file whose size, version and tensor table (dtype,
    shape, offsets) are what its .txt dump says."""
    data = path.read_bytes()
    text = path.with_suffix(".txt").read_text(encoding="utf-8")
    dump = _parse_dump(text)
    assert len(data) == dump["size"] and dump["metadata"][C.K_VERSION] == version
    header = read_header(path)
    assert header.metadata == dump["metadata"]
    for name, (dtype, shape, offsets, _) in dump["tensors"].items():
        info = header.tensors[name]
        assert (info.dtype, list(info.shape), list(info.data_offsets)) == (dtype, shape, offsets)
    return data, text, header


def test_golden_int8_reads_its_dump_and_rewrites_byte_for_byte(tmp_path: Path) -> None:
    data, text, header = _golden_matching_its_dump(GOLDEN_INT8, C.INT8_VERSION)
    assert (header.dtype, header.storage) == ("I8", "int8")
    # the reader returns float32(q) * scale, as the dump computes it from the bytes alone
    dequantized: dict[str, list] = {}
    for block in re.findall(r"^dequantized (\S+) = .*:\n((?:  .*\n)+)", text, re.M):
        dequantized[block[0]] = [json.loads(line) for line in block[1].splitlines()]
    adapter = NKVAdapter.load(GOLDEN_INT8)
    assert (adapter.storage, adapter.keys.dtype) == ("int8", torch.float32)
    assert adapter.keys.tolist() == dequantized[C.T_KEYS]
    assert adapter.residuals.tolist() == dequantized[C.T_RESIDUALS]
    # the same facts and settings as golden.nkv, rows within half a step (scale / 2) of its exact rows
    plain = NKVAdapter.load(GOLDEN)
    assert adapter.facts == plain.facts and adapter.base == plain.base
    for mine, exact in ((adapter.keys, plain.keys), (adapter.residuals, plain.residuals)):
        step = exact.abs().amax(-1, keepdim=True) / 127
        assert bool(((mine - exact).abs() <= step / 2 + 1e-7).all())
    module = _make_golden_module()
    assert module.golden_int8_adapter().to_bytes() == data
    assert plain.to_bytes(storage="int8") == data
    assert NKVAdapter.from_bytes(data).save(tmp_path / "again.nkv").read_bytes() == data
    assert module.dump(data, "golden-int8.nkv") == text


GOLDEN_SIGN = ROOT / "spec" / "examples" / "golden-sign.nkv"


def test_golden_sign_reads_as_the_spec_text_says_and_rewrites_byte_for_byte(tmp_path: Path) -> None:
    data, text, header = _golden_matching_its_dump(GOLDEN_SIGN, C.SIGN_VERSION)
    assert (header.dtype, header.storage) == ("U8", "sign")
    module = _make_golden_module()
    keys, weights, residuals = module.sign_rows(data)  # spec §4.4 from its text, in float64
    adapter = NKVAdapter.load(GOLDEN_SIGN)
    assert (adapter.storage, adapter.keys.dtype) == ("sign", torch.float32)
    assert torch.allclose(adapter.keys, torch.tensor(keys, dtype=torch.float32), atol=1e-6)
    assert torch.allclose(adapter.residuals, torch.tensor(residuals, dtype=torch.float32), atol=1e-6)
    assert adapter.code_scales[:, 0].tolist() == list(weights)
    # the residuals within half a step of the exact rows, in the rotated basis (spec §4.4)
    plain = NKVAdapter.load(GOLDEN)
    assert adapter.facts == plain.facts and adapter.base == plain.base
    step = adapter.code_scales[:, 1:]
    assert bool(((adapter.residuals - plain.residuals).norm(dim=-1, keepdim=True)
                 <= step / 2 * math.sqrt(plain.base.d_model) + 1e-6).all())
    # the weight makes each stored key score exactly 1 against the exact key it came from
    own = torch.nn.functional.cosine_similarity(adapter.keys, plain.keys, dim=-1) * adapter.code_scales[:, 0]
    assert torch.allclose(own, torch.ones(2), atol=1e-6)
    assert torch.allclose(adapter.score_inverse_norms(), adapter.code_scales[:, 0], atol=1e-6)
    assert module.golden_sign_adapter().to_bytes() == data
    assert plain.to_bytes(storage="sign") == data
    assert NKVAdapter.from_bytes(data).save(tmp_path / "again.nkv").read_bytes() == data
    assert module.dump(data, "golden-sign.nkv") == text
