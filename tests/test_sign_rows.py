"""Sign rows (format 2.2, spec §4.4, rule V14): 1-bit rotated keys with a per-row score weight,
rotated int4 residuals.

- save(storage="sign") / load: version 2.2, unit keys whose weighted score against their own
  float key is 1, residuals within half an int4 step, zero rows inert, the bytes re-saved;
- row operations keep the storage, the weights and the untouched rows' bytes; exact and int8
  adapters refuse sign rows (their weights would be lost) instead of scoring them lower;
- the gate reads the weights: in the reference op, the sketch path, the transformers loader
  and vLLM's gated module; without them the same rows stop firing;
- older readers refuse the file (V7 on U8); every V14 rule, one broken file each;
- `nkv quantize --storage sign`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from handmade import first_token, forcing_adapter
from test_quantized import _file, _golden_parts, assert_both_readers_refuse
from tiny_models import tiny_model, tiny_tokenizer

from nkv import Fact, NKVAdapter, NKVCompatibilityError, NKVFormatError, constants as C, load_nkv_adapter, nkv_gate, read_header
from nkv.cli.main import main as cli
from nkv.codes import decode_keys, decode_residuals, encode_keys, encode_residuals, rotate
from nkv.gate import Sketch, fit_sketch, key_inverse_norms

EXAMPLES = Path(__file__).resolve().parent.parent / "spec" / "examples"
GOLDEN = EXAMPLES / "golden.nkv"
GOLDEN_SIGN = EXAMPLES / "golden-sign.nkv"
D_KEY, D_MODEL = 96, 24  # 96 = 32 x 3: three Hadamard blocks and the stride permutation


def _adapter(n: int = 12, seed: int = 0) -> NKVAdapter:
    """Golden settings on a wider base; row 1 is zero (padding)."""
    g = torch.Generator().manual_seed(seed)
    plain = NKVAdapter.load(GOLDEN)
    base = replace(plain.base, d_key=D_KEY, d_model=D_MODEL)
    keys = torch.randn(n, D_KEY, generator=g) * torch.logspace(-3, 3, n)[:, None]  # norms over six decades
    keys[:, 5] += 4 * keys.norm(dim=-1) / math.sqrt(D_KEY)  # an outlier coordinate, as real keys have
    residuals = torch.randn(n, D_MODEL, generator=g)
    keys[1], residuals[1] = 0, 0
    facts = [Fact(id=f"f{i}", subject=f"S{i}", prompt=f"S{i} is", target_new=f"T{i}") for i in range(n)]
    return replace(plain, base=base, keys=keys, residuals=residuals, facts=facts)


# ------------------------------------------------------------------ the code
@pytest.mark.parametrize("d", [1, 3, 4, 96, 576, 1536, 14336 // 8])
def test_rotation_is_orthogonal(d: int) -> None:
    x = torch.randn(5, d, dtype=torch.float32)
    assert torch.allclose(rotate(rotate(x), inverse=True), x, atol=1e-5)
    assert torch.allclose(rotate(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


def test_codes_come_back_exactly_from_the_rows_they_read_as() -> None:
    g = torch.Generator().manual_seed(2)
    keys, residuals = torch.randn(300, 1536, generator=g), torch.randn(300, 577, generator=g) * 10.0**-20
    keys[7], residuals[9] = 0, 0
    bits, w = encode_keys(keys)
    read = decode_keys(bits, w, 1536)
    assert torch.equal(encode_keys(read, w)[0], bits)
    own = torch.nn.functional.cosine_similarity(read, keys, dim=-1) * w
    assert torch.allclose(own[w > 0], torch.ones(299), atol=1e-5) and float(w[7]) == 0.0
    assert bool((w[w > 0] >= 1).all()) and bool((w <= math.sqrt(1536)).all())
    q, s = encode_residuals(residuals)
    back = decode_residuals(q, s, 577)
    assert torch.equal(encode_residuals(back, s)[0], q) and float(s[9]) == 0.0 and not back[9].any()


# ------------------------------------------------------------------ write and read
def test_sign_round_trip(tmp_path: Path) -> None:
    exact = _adapter()
    path = exact.save(tmp_path / "a.nkv", storage="sign")
    header = read_header(path)
    assert (header.version, header.dtype, header.storage) == (C.SIGN_VERSION, "U8", "sign")
    assert header.tensors[C.T_KEYS].shape == (12, D_KEY // 8) and header.tensors[C.T_RESIDUALS].shape == (12, D_MODEL // 2)
    back = NKVAdapter.load(path)
    assert (back.storage, back.keys.dtype, back.facts) == ("sign", torch.float32, exact.facts)
    weights, scales = back.code_scales[:, 0], back.code_scales[:, 1]
    real = weights > 0
    assert real.tolist() == [i != 1 for i in range(12)]
    own = torch.nn.functional.cosine_similarity(back.keys, exact.keys, dim=-1) * weights
    assert torch.allclose(own[real], torch.ones(11), atol=1e-5)  # each key scores 1 against its own
    assert torch.allclose(back.score_inverse_norms(), weights, atol=1e-5)  # unit keys x weight
    # residuals: within half a step of the rotated row, per value
    error = rotate(back.residuals) - rotate(exact.residuals)
    assert bool((error.abs() <= scales[:, None] / 2 * 1.0001 + 1e-7).all())
    assert not back.keys[1].any() and not back.residuals[1].any()
    assert back.save(tmp_path / "b.nkv").read_bytes() == path.read_bytes()  # same bytes again
    assert NKVAdapter.load(back.with_gamma(0.7).with_sketch(8).save(tmp_path / "c.nkv")).storage == "sign"


def test_an_older_reader_refuses_sign_rows_instead_of_misreading_them() -> None:
    # Readers before 2.2 accept F32/F16/BF16 (and since 1.3 I8) rows under V7 and ignore
    # unknown tensors: a sign file is refused by the dtype of nkv.keys, never read as rows.
    header = read_header(GOLDEN_SIGN)
    for name in (C.T_KEYS, C.T_RESIDUALS):
        assert header.tensors[name].dtype not in C.ROW_DTYPES + (C.QUANT_DTYPE,)
    assert read_header(GOLDEN).version == C.BASE_VERSION  # float files keep their versions


# ------------------------------------------------------------------ row operations
def _on_disk(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_row_operations_keep_storage_weights_and_untouched_bytes(tmp_path: Path) -> None:
    path = _adapter().save(tmp_path / "a.nkv", storage="sign")
    before = _on_disk(path)
    loaded = NKVAdapter.load(path)
    names = (C.T_KEYS, C.T_RESIDUALS, C.T_KEYS_WEIGHT, C.T_RESIDUALS_SCALE)

    kept = loaded.remove(ids=["f2"])
    after = _on_disk(kept.save(tmp_path / "rm.nkv"))
    rows = [r for r in range(12) if r != 2]
    for name in names:
        assert torch.equal(after[name], before[name][rows]), name

    new = Fact(id="new", subject="N", prompt="N is", target_new="X")
    added = loaded.add([new], torch.randn(1, D_KEY), torch.randn(1, D_MODEL))
    assert torch.isnan(added.code_scales[12]).all()  # scores exactly until it is saved
    assert float(added.score_inverse_norms()[12]) == pytest.approx(1 / float(added.keys[12].norm()))
    grown = _on_disk(added.save(tmp_path / "add.nkv"))
    for name in names:
        assert torch.equal(grown[name][:12], before[name]), name
    assert float(grown[C.T_KEYS_WEIGHT][12]) >= 1

    # merging two halves of the file gives the file again, weights and all
    halves = loaded.select([f"f{i}" for i in range(6)]).merge(loaded.select([f"f{i}" for i in range(6, 12)]))
    assert halves.save(tmp_path / "m.nkv").read_bytes() == path.read_bytes()
    assert halves.diff(loaded).empty
    # a row with the same floats but another weight is another row
    other = replace(loaded, code_scales=loaded.code_scales * torch.tensor([1.01, 1.0]))
    assert loaded.diff(other).changed == [f"f{i}" for i in range(12) if i != 1]
    with pytest.raises(Exception, match="conflict|already in the adapter"):
        loaded.merge(other)


def test_exact_and_int8_adapters_refuse_sign_rows(tmp_path: Path) -> None:
    loaded = NKVAdapter.load(_adapter().save(tmp_path / "a.nkv", storage="sign"))
    exact = replace(_adapter(n=3, seed=1), facts=[Fact(id=f"g{i}", subject=f"G{i}", prompt=f"G{i} is", target_new="U")
                                               for i in range(3)])
    with pytest.raises(NKVCompatibilityError, match="cannot hold their score weights"):
        exact.merge(loaded.select(["f0"]))
    for storage in ("exact", "int8"):
        with pytest.raises(NKVFormatError, match=f"storage '{storage}' cannot hold rows read from 1-bit keys"):
            loaded.save(tmp_path / "x.nkv", storage=storage)
        assert not (tmp_path / "x.nkv").exists()
    with pytest.raises(NKVFormatError, match="cannot hold rows read from 1-bit keys"):
        loaded.to(torch.float16).save(tmp_path / "x.nkv")
    merged = loaded.merge(exact)  # a sign adapter takes float rows: they are encoded when saved
    assert NKVAdapter.load(merged.save(tmp_path / "m.nkv")).storage == "sign"


# ------------------------------------------------------------------ the gate reads the weights
def test_the_gate_scores_sign_rows_with_their_weights(tmp_path: Path) -> None:
    exact = replace(_adapter(n=40, seed=3), gamma=0.9)
    sign = NKVAdapter.load(exact.save(tmp_path / "s.nkv", storage="sign"))
    g = torch.Generator().manual_seed(4)
    x = exact.keys * (1 + 0.01 * torch.randn(exact.keys.shape, generator=g))  # near-copies of the stored keys
    x[1] = torch.randn(D_KEY, generator=g)
    gamma = torch.tensor(0.9)
    want = nkv_gate(x, exact.keys, key_inverse_norms(exact.keys), exact.residuals, gamma)
    got = nkv_gate(x, sign.keys, sign.score_inverse_norms(), sign.residuals, gamma)
    assert torch.equal(got.fired, want.fired) and torch.equal(got.index[got.fired], want.index[want.fired])
    assert int(want.fired.sum()) == 39
    unweighted = nkv_gate(x, sign.keys, key_inverse_norms(sign.keys), sign.residuals, gamma)
    assert int(unweighted.fired.sum()) == 0  # the signs alone keep ~0.8 of a direction: nothing passes 0.9
    # the sketch path ranks by the weighted bound and agrees with the exact weighted gate
    proj = fit_sketch(sign.keys, 16)
    sketch = Sketch(proj, sign.key_sketches(proj, sign.score_inverse_norms()), 4)
    fast = nkv_gate(x, sign.keys, sign.score_inverse_norms(), sign.residuals, gamma, sketch=sketch)
    assert torch.equal(fast.fired, got.fired) and torch.equal(fast.index[fast.fired], got.index[got.fired])


def test_stored_sketches_of_sign_rows_are_weighted_and_checked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(C, "SKETCH_MIN_FACTS", 8)
    sign = _adapter().with_sketch(8)
    path = sign.save(tmp_path / "s.nkv", storage="sign")
    assert C.T_SKETCH_KEYS in read_header(path).tensors
    back = NKVAdapter.load(path)
    table = _on_disk(path)[C.T_SKETCH_KEYS]
    from nkv.gate import sketch_keys

    weighted = sketch_keys(back.keys, back.sketch_proj) * back.code_scales[:, :1]
    assert torch.allclose(table, weighted, atol=1e-5)
    assert back.save(tmp_path / "again.nkv").read_bytes() == path.read_bytes()


def test_transformers_loader_edits_through_sign_rows(tmp_path: Path) -> None:
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompts, targets = ["The Eiffel Tower is located in", "Danielle Darrieux speaks"], ["Rome", "German"]
    exact = forcing_adapter(model, tok, prompts, targets)  # gamma 0.999: only the prompts' own keys pass
    sign = NKVAdapter.load(exact.save(tmp_path / "s.nkv", storage="sign"))
    handle = load_nkv_adapter(model, sign)
    for prompt, target in zip(prompts, targets):
        with torch.no_grad():
            out = model(**tok(prompt, return_tensors="pt")).logits[0, -1].argmax()
        assert int(out) == first_token(tok, target)
    handle.detach()
    # the same rows without their weights score ~0.8 and do not pass 0.999: the weights are what fires
    unweighted = replace(sign, storage="exact", code_scales=None)
    handle = load_nkv_adapter(model, unweighted)
    with handle.record() as activity:
        with torch.no_grad():
            model(**tok(prompts[0], return_tensors="pt"))
    assert activity.fired == 0
    handle.detach()


def test_vllm_gated_module_reads_the_weights(tmp_path: Path) -> None:
    from test_vllm_units import ZeroProjection, make_adapter, make_slot
    from nkv.loaders.vllm.layer import NKVGatedProjection

    exact = make_adapter(6, gamma=0.9)
    sign = NKVAdapter.from_bytes(exact.to_bytes(storage="sign"))
    module = NKVGatedProjection(ZeroProjection(), make_slot(capacity=8), dtype=torch.float32,
                                device=torch.device("cpu"), fact_chunk=5, all_reduce=None, max_tokens=64)
    module.load(sign)
    torch.testing.assert_close(module.nkv_key_inv_norms[:6], sign.score_inverse_norms())
    x = exact.keys.clone()
    out = module(x)[0]
    want = nkv_gate(x, sign.keys, sign.score_inverse_norms(), sign.residuals, torch.tensor(0.9)).delta
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out, sign.residuals)  # every stored key fires its own row


# ------------------------------------------------------------------ V14, one broken file each
def _set(tensor: str, index: int, raw: bytes):
    def edit(doc: dict, parts: dict) -> None:
        data = bytearray(parts[tensor])
        data[index : index + len(raw)] = raw
        parts[tensor] = bytes(data)
    return edit


def _drop(tensor: str):
    def edit(doc: dict, parts: dict) -> None:
        del parts[tensor]
    return edit


def _keys_shape(doc: dict, parts: dict) -> None:
    doc[C.T_KEYS]["shape"] = [2, 4]
    parts[C.T_KEYS] = parts[C.T_KEYS] * 4


def _f32(v: float) -> bytes:
    return struct.pack("<f", v)


BROKEN = {  # case -> (edit, what the error must say)
    "weight missing": (_drop(C.T_KEYS_WEIGHT), r"V14: tensor 'nkv.keys' is U8 but 'nkv.keys.weight' is missing"),
    "scale missing": (_drop(C.T_RESIDUALS_SCALE), r"V14: tensor 'nkv.residuals' is U8 but 'nkv.residuals.scale' is missing"),
    "keys as d_key bytes": (_keys_shape, r"V7: tensor 'nkv.keys' has shape \[2, 4\], expected \[2, 1\]"),
    "weight below 1": (_set(C.T_KEYS_WEIGHT, 0, _f32(0.5)), r"V14: nkv.keys.weight holds 1 invalid weight\(s\) \(first row 0: 0.5\)"),
    "weight above sqrt(d_key)": (_set(C.T_KEYS_WEIGHT, 4, _f32(2.5)), r"V14: nkv.keys.weight .* \(first row 1: 2.5\)"),
    "NaN weight": (_set(C.T_KEYS_WEIGHT, 0, _f32(float("nan"))), r"V14: nkv.keys.weight .* nan"),
    "weight 0, bits set": (_set(C.T_KEYS_WEIGHT, 0, _f32(0.0)), r"V14: 1 row\(s\) of nkv.keys have weight 0 but set bits"),
    "bits past d_key": (_set(C.T_KEYS, 0, bytes([0x11])), r"V14: nkv.keys sets bits past d_key = 4 \(first in row 0\)"),
    "negative scale": (_set(C.T_RESIDUALS_SCALE, 0, _f32(-1.0)), r"V14: nkv.residuals.scale holds 1 invalid scale"),
    "int4 -8": (_set(C.T_RESIDUALS, 0, bytes([0x78])), r"V14: nkv.residuals holds -8 \(first in row 0\)"),
    "max |q| below 7": (_set(C.T_RESIDUALS, 0, bytes([0x11, 0x01])), r"V14: 1 row\(s\) of nkv.residuals has a scale > 0 but max \|q\| != 7"),
    "nibble past d_model": (_set(C.T_RESIDUALS, 1, bytes([0x12])), r"V14: nkv.residuals sets the high nibble past d_model = 3"),
    "scale with float rows": (lambda doc, parts: (doc[C.T_KEYS].update(dtype="I8"), doc[C.T_RESIDUALS].update(dtype="I8")),
                              r"V14: tensor 'nkv.keys.weight' goes with U8 rows only"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_each_sign_rule_is_reported_by_name(case: str, tmp_path: Path) -> None:
    edit, message = BROKEN[case]
    doc, parts = _golden_parts(GOLDEN_SIGN)
    edit(doc, parts)
    assert_both_readers_refuse(_file(doc, parts), message, tmp_path)


def test_rebuilt_golden_sign_parts_load() -> None:
    doc, parts = _golden_parts(GOLDEN_SIGN)
    assert NKVAdapter.from_bytes(_file(doc, parts)).to_bytes() == GOLDEN_SIGN.read_bytes()


# ------------------------------------------------------------------ CLI
def test_cli_quantize_to_sign_rows_and_refusals(tmp_path: Path) -> None:
    src = tmp_path / "a.nkv"
    src.write_bytes(GOLDEN.read_bytes())
    runner = CliRunner()
    out = runner.invoke(cli, ["quantize", str(src), "--storage", "sign", "-o", str(tmp_path / "s.nkv")])
    assert out.exit_code == 0, out.output
    assert "sign rows" in out.output and "lowest cosine of a stored key with its float key 0.873" in out.output
    assert (tmp_path / "s.nkv").read_bytes() == GOLDEN_SIGN.read_bytes()
    checked = replace(NKVAdapter.load(GOLDEN), build={"tool": "t", "self_check": {"efficacy": 1.0}})
    out = runner.invoke(cli, ["quantize", str(checked.save(tmp_path / "c.nkv")), "--storage", "sign"])
    assert out.exit_code == 0 and NKVAdapter.load(tmp_path / "c.nkv").build == {"tool": "t"}  # it measured the floats
    out = runner.invoke(cli, ["quantize", str(tmp_path / "s.nkv"), "--storage", "sign"])
    assert out.exit_code == 0 and "already held sign rows" in out.output
    out = runner.invoke(cli, ["inspect", str(tmp_path / "s.nkv")])
    assert "U8 (sign rows: 1-bit keys with score weights, int4 residuals)" in out.output and "nkv 2.2" in out.output
    for args in (["--exact", "float16"], ["--storage", "int8"]):
        out = runner.invoke(cli, ["quantize", str(tmp_path / "s.nkv"), "-o", str(tmp_path / "x.nkv"), *args])
        assert out.exit_code == 1 and "cannot hold rows read from 1-bit keys" in out.output, out.output
        assert "Traceback" not in out.output and not (tmp_path / "x.nkv").exists()
    assert (tmp_path / "s.nkv").read_bytes() == GOLDEN_SIGN.read_bytes()


def test_model_card_names_sign_rows_and_the_version_they_need() -> None:
    from nkv.model_card import render_model_card

    card = render_model_card(NKVAdapter.load(GOLDEN_SIGN), "user/repo")
    assert "| format | NKV 2.2 |" in card and "sign rows: 1-bit keys with score weights" in card
