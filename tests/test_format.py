"""The .nkv reader and writer: round trips, every refusal with its message, atomic save,
row operations, header-only reads, and an import that stays light."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

import nkv
import nkv.adapter
import nkv.header
from nkv import (BaseModelInfo, Fact, NKVAdapter, NKVCompatibilityError, NKVConflictError, NKVFormatError,
                 NKVVersionError, compute_fingerprint, constants as C, empty_adapter, read_header)

D_KEY, D_MODEL = 4, 3
WEIGHT = torch.arange(12, dtype=torch.float32).reshape(D_MODEL, D_KEY) / 7 - 0.5


def base(weight: torch.Tensor = WEIGHT, **overrides) -> BaseModelInfo:
    fields = dict(name="tiny/base", architecture="GPT2LMHeadModel", model_type="gpt2", n_layers=2,
                  d_model=D_MODEL, d_key=D_KEY, fingerprint=compute_fingerprint(weight), revision="r1")
    return BaseModelInfo(**(fields | overrides))


def facts(ids: list[str], subject: str | None = None) -> list[Fact]:
    return [Fact(id=i, subject=subject or f"S{i}", prompt=f"About {subject or f'S{i}'}:", target_new=f"T{i}")
            for i in ids]


def rows(ids: list[str], salt: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and residuals that are a function of (id, salt), so alignment can be checked."""
    keys, res = [], []
    for i in ids:
        g = torch.Generator().manual_seed(zlib.crc32(f"{i}/{salt}".encode()))
        keys.append(torch.randn(D_KEY, generator=g))
        res.append(torch.randn(D_MODEL, generator=g))
    return torch.stack(keys) if ids else torch.zeros(0, D_KEY), torch.stack(res) if ids else torch.zeros(0, D_MODEL)


def make(ids: list[str], salt: int = 0, **kw) -> NKVAdapter:
    k, r = rows(ids, salt)
    return NKVAdapter(keys=k, residuals=r, facts=facts(ids), layer=kw.pop("layer", 1),
                      gamma=kw.pop("gamma", 0.65), base=kw.pop("base", base()),
                      target_module="transformer.h.1.mlp.c_proj", **kw)


def assert_aligned(adapter: NKVAdapter, salts: dict[str, int] | None = None) -> None:
    """Row i of K1/R1 is the row made for fact i's id (with its salt)."""
    assert adapter.keys.shape == (adapter.n_facts, D_KEY)
    assert adapter.residuals.shape == (adapter.n_facts, D_MODEL)
    for row, fact in enumerate(adapter.facts):
        k, r = rows([fact.id], (salts or {}).get(fact.id, 0))
        assert torch.equal(adapter.keys[row], k[0].to(adapter.keys.dtype)), fact.id
        assert torch.equal(adapter.residuals[row], r[0].to(adapter.residuals.dtype)), fact.id


# ------------------------------------------------------------------ file surgery helpers
def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(doc: dict, body: bytes) -> bytes:
    text = json.dumps(doc, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text + body


def set_facts(doc: dict, body: bytes, records: bytes) -> tuple[dict, bytes]:
    """Replace the nkv.facts bytes (the last tensor in canonical files)."""
    begin = doc[C.T_FACTS]["data_offsets"][0]
    doc[C.T_FACTS] = {"dtype": "U8", "shape": [len(records)], "data_offsets": [begin, begin + len(records)]}
    return doc, body[:begin] + records


def set_value(doc: dict, body: bytes, tensor: str, index: int, value: float) -> tuple[dict, bytes]:
    begin = doc[tensor]["data_offsets"][0] + 4 * index
    return doc, body[:begin] + struct.pack("<f", value) + body[begin + 4 :]


GOOD = make(["a", "b"], build={"seed": 1}).to_bytes()


def meta(**changes: str | None) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    def mutate(doc: dict, body: bytes) -> tuple[dict, bytes]:
        for key, value in changes.items():
            key = key.replace("__", ".")
            if value is None:
                doc["__metadata__"].pop(key)
            else:
                doc["__metadata__"][key] = value
        return doc, body
    return mutate


def tensor(name: str, **changes) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    def mutate(doc: dict, body: bytes) -> tuple[dict, bytes]:
        doc[name].update(changes)
        return doc, body
    return mutate


def records(*lines: str, raw: bytes | None = None) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    data = raw if raw is not None else "".join(line + "\n" for line in lines).encode()
    return lambda doc, body: set_facts(doc, body, data)


REC_A = '{"id":"a","subject":"Sa","prompt":"About Sa:","target_new":"Ta"}'
REC_B = '{"id":"b","subject":"Sb","prompt":"About Sb:","target_new":"Tb"}'

# name -> (mutation of the good file, error class, substrings the message must contain)
REFUSALS: dict[str, tuple[Callable, type, list[str]]] = {
    "newer major version": (meta(nkv__version="3.0"), NKVVersionError, ["V5", "3.0", "2.x", "pip install -U nkv"]),
    "unknown residual site": (meta(nkv__residual_site="after"), NKVFormatError, ["V13", "nkv.residual_site", "'after'"]),
    # a 1.x reader ignores the key and would add the rows before the norm: out_norm is 2.0
    "out_norm residual site in a 1.x file": (meta(nkv__residual_site="out_norm"), NKVFormatError,
                                             ["V13", "'out_norm'", "2.0", "1.x"]),
    "version not major.minor": (meta(nkv__version="one"), NKVFormatError, ["V5", "nkv.version", "'one'"]),
    "version major 0": (meta(nkv__version="0.9"), NKVFormatError, ["V5"]),
    "version superscript digit": (meta(nkv__version="1.²"), NKVFormatError, ["V5"]),
    "not an nkv file": (meta(nkv__format=None), NKVFormatError, ["V4", "nkv.format", "not an NKV adapter"]),
    "missing gamma": (meta(nkv__gamma=None), NKVFormatError, ["V6", "'nkv.gamma' is missing"]),
    "missing fingerprint": (meta(nkv__base__fingerprint=None), NKVFormatError, ["V6", "nkv.base.fingerprint"]),
    "n_facts not decimal": (meta(nkv__n_facts=" 2"), NKVFormatError, ["V6", "nkv.n_facts", "decimal integer"]),
    "n_facts with sign": (meta(nkv__n_facts="+2"), NKVFormatError, ["V6", "nkv.n_facts"]),
    "layer out of range": (meta(nkv__layer="2"), NKVFormatError, ["V6", "nkv.layer", "2 layers"]),
    "gamma not a number": (meta(nkv__gamma="nan"), NKVFormatError, ["V6", "nkv.gamma", "[0, 1]"]),
    "gamma above 1": (meta(nkv__gamma="1.5"), NKVFormatError, ["V6", "nkv.gamma"]),
    "bad fingerprint": (meta(nkv__base__fingerprint="sha256:abc"), NKVFormatError, ["V6", "fingerprint"]),
    "build not an object": (meta(nkv__build="[1]"), NKVFormatError, ["V10", "nkv.build"]),
    "build with NaN": (meta(nkv__build='{"x": NaN}'), NKVFormatError, ["V10"]),
    "keys wrong dtype": (tensor(C.T_KEYS, dtype="I32"), NKVFormatError, ["V7", "nkv.keys", "I32", "F32"]),
    "residual dtype differs": (tensor(C.T_RESIDUALS, dtype="F16", shape=[2, 6]), NKVFormatError,
                               ["V7", "share one dtype"]),
    "facts wrong dtype": (tensor(C.T_FACTS, dtype="I8"), NKVFormatError, ["V7", "nkv.facts", "U8"]),
    "n_facts disagrees with shapes": (meta(nkv__n_facts="3"), NKVFormatError,
                                      ["V7", "nkv.keys", "[2, 4]", "expected [3, 4]"]),
    "d_key disagrees": (meta(nkv__base__d_key="8"), NKVFormatError, ["V7", "expected [2, 8]"]),
    "shape does not match bytes": (tensor(C.T_KEYS, shape=[2, 5]), NKVFormatError, ["V3", "nkv.keys", "needs 40 bytes"]),
    "tensor missing": (lambda d, b: ({k: v for k, v in d.items() if k != C.T_RESIDUALS}, b), NKVFormatError,
                       ["V3"]),
    "unknown dtype": (tensor(C.T_KEYS, dtype="F128"), NKVFormatError, ["V2", "unknown dtype"]),
    "dtype is a list": (tensor(C.T_KEYS, dtype=["F32"]), NKVFormatError, ["V2", "unknown dtype"]),
    "negative shape": (tensor(C.T_KEYS, shape=[-2, 4]), NKVFormatError, ["V2", "shape"]),
    "metadata not strings": (lambda d, b: (d | {"__metadata__": d["__metadata__"] | {"nkv.layer": 1}}, b),
                             NKVFormatError, ["V2", "__metadata__"]),
    "NaN in keys": (lambda d, b: set_value(d, b, C.T_KEYS, 5, math.nan), NKVFormatError,
                    ["V8", "nkv.keys", "row 1", "'b'"]),
    "Inf in residuals": (lambda d, b: set_value(d, b, C.T_RESIDUALS, 0, math.inf), NKVFormatError,
                         ["V8", "nkv.residuals", "row 0", "'a'"]),
    "duplicate fact ids": (records(REC_A, REC_A), NKVFormatError, ["V9", "duplicate fact id 'a'"]),
    "facts not JSON": (records(REC_A, "{not json"), NKVFormatError, ["V9", "row 1", "invalid JSON"]),
    "facts NaN": (records(REC_A, REC_B[:-1] + ',"provenance":{"x":NaN}}'), NKVFormatError, ["V9", "row 1"]),
    "facts duplicate JSON key": (records(REC_A, REC_B[:-1] + ',"id":"c"}'), NKVFormatError,
                                 ["V9", "duplicate key 'id'"]),
    "facts huge integer": (records(REC_A, REC_B[:-1] + ',"provenance":{"x":' + "9" * 5000 + "}}"),
                           NKVFormatError, ["V9", "row 1"]),
    "facts lone surrogate": (records(REC_A, REC_B.replace("Tb", "\\ud800")), NKVFormatError, ["V9", "row 1"]),
    "facts missing field": (records(REC_A, REC_B.replace('"target_new":"Tb"', '"target_new":""')),
                            NKVFormatError, ["V9", "row 1", "'target_new'"]),
    "facts unknown field": (records(REC_A, REC_B[:-1] + ',"extra":1}'), NKVFormatError, ["V9", "unknown field"]),
    "facts wrong count": (records(REC_A), NKVFormatError, ["V9", "expected 2 records", "got 1"]),
    "facts no final newline": (records(raw=(REC_A + "\n" + REC_B).encode()), NKVFormatError, ["V9", "newline"]),
    "facts not UTF-8": (records(raw=b"\xff\xfe\n\n"), NKVFormatError, ["V9", "UTF-8"]),
    # Loading first parses all lines as one JSON array. Here "[" + ",".join(lines) + "]" is an
    # array of two valid records, but neither line is one: the lines must still be refused.
    "facts record split over two lines": (records(REC_A[:-1] + ',"provenance":{"l":[1', "2]}}," + REC_B),
                                          NKVFormatError, ["V9", "row 0", "invalid JSON"]),
    "facts big number to infinity": (records(REC_A, REC_B[:-1] + ',"provenance":{"x":1e999}}'), NKVFormatError,
                                     ["V9", "row 1", "UTF-8 JSON"]),
}


def _bytes_for(mutation: Callable) -> bytes:
    doc, body = split(GOOD)
    return join(*mutation(doc, body))


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusal(case: str, tmp_path: Path) -> None:
    mutation, error, needles = REFUSALS[case]
    data = _bytes_for(mutation)
    path = tmp_path / "bad.nkv"
    path.write_bytes(data)
    for read in (lambda: NKVAdapter.load(path), lambda: NKVAdapter.from_bytes(data, str(path))):
        with pytest.raises(error) as info:
            read()
        message = str(info.value)
        assert str(path) in message
        for needle in needles:
            assert needle in message, (case, message)



def test_a_serving_load_counts_the_records_and_checks_them_when_read(tmp_path: Path) -> None:
    a = make(["f0", "f1", "f2"])
    good, dup, merged = tmp_path / "good.nkv", tmp_path / "dup.nkv", tmp_path / "merged.nkv"
    a.save(good)
    data = good.read_bytes()
    dup.write_bytes(data.replace(b'"id":"f0"', b'"id":"f1"', 1))  # same length: only the records change
    merged.write_bytes(data.replace(b'}\n{"id":"f1"', b'},{"id":"f1"', 1))  # two records on one line
    with pytest.raises(NKVFormatError, match="V9.*duplicate fact id 'f1'"):
        NKVAdapter.load(dup)
    lazy = NKVAdapter.load(dup, lazy_facts=True)  # the rows are fine: a server may serve them
    assert lazy.n_facts == 3 and torch.equal(lazy.keys, a.keys) and torch.equal(lazy.residuals, a.residuals)
    with pytest.raises(NKVFormatError, match="V9.*duplicate fact id 'f1'"):
        lazy.ids  # noqa: B018 - reading the records checks them
    with pytest.raises(NKVFormatError, match="V9.*expected 3 records"):  # the count is checked at load
        NKVAdapter.load(merged, lazy_facts=True)
    back = NKVAdapter.load(good, lazy_facts=True)
    assert repr(back.facts) == "LazyFacts(3 records)" and back.facts == a.facts and back.ids == ["f0", "f1", "f2"]
    assert back.facts[1:] == a.facts[1:] and repr(back.facts) == "LazyFacts(3 records, read)"

def test_records_not_spelled_as_the_writer_spells_them_still_load() -> None:
    # spaces, escapes, key order and a null target_true: valid JSON, read by the per-line path
    spaced = '{ "subject": "Sa", "id": "a", "prompt": "About Sa:", "target_new": "T\\u0061", "target_true": null }'
    adapter = NKVAdapter.from_bytes(_bytes_for(records(spaced, REC_B)))
    assert [(f.id, f.subject, f.target_new, f.target_true) for f in adapter.facts] == [
        ("a", "Sa", "Ta", None), ("b", "Sb", "Tb", None)]


def test_all_problems_are_reported_at_once() -> None:
    data = _bytes_for(meta(nkv__gamma="2", nkv__layer="9", nkv__base__fingerprint="x"))
    with pytest.raises(NKVFormatError) as info:
        NKVAdapter.from_bytes(data)
    assert len(info.value.problems) == 3
    assert "3 problems" in str(info.value)


def test_missing_keys_each_named() -> None:
    for key in C.REQUIRED_KEYS:
        data = _bytes_for(meta(**{key.replace(".", "__"): None}))
        with pytest.raises(NKVFormatError, match=r"V[456]") as info:
            NKVAdapter.from_bytes(data)
        if key not in (C.K_FORMAT, C.K_VERSION):
            assert f"required metadata key {key!r} is missing" in str(info.value)


@pytest.mark.parametrize("text, needle", [
    (b'{"a":1,"a":2}', "duplicate key"),
    (b'{"__metadata__":{},"x":NaN}', "NaN is not JSON"),
    (b' {"__metadata__":{}}', "must start with '{'"),
    (b'{"__metadata__":{"k":"\\ud800"}}', "lone surrogate"),
    (b"[1]", "must start with '{'"),
    (b"{\xff}", "not strict UTF-8 JSON"),
    (b'{"__metadata__":{}', "not strict UTF-8 JSON"),
    (b"{" * 200_000, "not strict UTF-8 JSON"),
])
def test_header_json_refusals(text: bytes, needle: str) -> None:
    with pytest.raises(NKVFormatError, match="V2") as info:
        NKVAdapter.from_bytes(struct.pack("<Q", len(text)) + text)
    assert needle in str(info.value)


def test_oversized_header_refused_without_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "huge.nkv"
    path.write_bytes(struct.pack("<Q", C.MAX_HEADER_BYTES + 1) + b"{")
    for read in (lambda: read_header(path), lambda: NKVAdapter.from_bytes(path.read_bytes())):
        with pytest.raises(NKVFormatError, match="V1: header length 104857601 exceeds the 104857600-byte limit"):
            read()


@pytest.mark.parametrize("cut", [0, 3, 8, 40, "header", "data-1", "data/2"])
def test_truncated_file(cut: int | str, tmp_path: Path) -> None:
    n = struct.unpack("<Q", GOOD[:8])[0]
    at = {"header": 8 + n - 1, "data-1": len(GOOD) - 1, "data/2": 8 + n + (len(GOOD) - 8 - n) // 2}.get(cut, cut)
    data = GOOD[:at]
    path = tmp_path / "cut.nkv"
    path.write_bytes(data)
    expected = "V1" if at < 8 + n else "V3"
    for read in (lambda: NKVAdapter.load(path), lambda: read_header(path), lambda: NKVAdapter.from_bytes(data)):
        with pytest.raises(NKVFormatError, match=expected) as info:
            read()
        assert "truncated" in str(info.value) or "too short" in str(info.value)


def test_padded_file_refused() -> None:
    with pytest.raises(NKVFormatError, match="V3: tensors cover .* data bytes but the file holds"):
        NKVAdapter.from_bytes(GOOD + b"\0")


def test_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(NKVFormatError, match="is a directory"):
        read_header(tmp_path)
    with pytest.raises(NKVFormatError, match="cannot read file"):
        NKVAdapter.load(tmp_path / "missing.nkv")


def test_unknown_keys_tensors_and_newer_minor_are_accepted() -> None:
    doc, body = split(GOOD)
    doc["__metadata__"] |= {"nkv.version": "1.7", "nkv.some_future_key": "x", "other.tool": "y"}
    doc["nkv.future_tensor"] = {"dtype": "I64", "shape": [1], "data_offsets": [len(body), len(body) + 8]}
    data = join(doc, body + bytes(8))
    assert NKVAdapter.from_bytes(data).ids == ["a", "b"]
    assert nkv.header.parse_header(data, len(data), "x").version == "1.7"


# ------------------------------------------------------------------ round trip and header-only reads
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip(dtype: torch.dtype, tmp_path: Path) -> None:
    original = make(["x1", "x2", "x3"], build={"tool": "test", "seed": 3}, eval={"efficacy": 0.5}).to(dtype)
    original.facts[0] = Fact(id="x1", subject="Zoë", prompt="Zoë «lives» in", target_new="東京",
                             target_true="Paris", provenance={"source": "test", "n": [1, 2]})
    path = original.save(tmp_path / "sub" / "a.nkv")
    loaded = NKVAdapter.load(path)
    for other in (loaded, NKVAdapter.from_bytes(path.read_bytes())):
        assert other.keys.dtype == dtype and torch.equal(other.keys, original.keys)
        assert torch.equal(other.residuals, original.residuals)
        assert other.facts == original.facts
        assert (other.layer, other.gamma, other.base, other.target_module) == \
               (original.layer, original.gamma, original.base, original.target_module)
        assert (other.build, other.eval) == (original.build, original.eval)
    assert loaded.to_bytes() == path.read_bytes()
    header = read_header(path)
    assert (header.n_facts, header.layer, header.gamma, header.dtype) == (3, 1, 0.65, C.ROW_DTYPES[
        [torch.float32, torch.float16, torch.bfloat16].index(dtype)])


def test_out_norm_residual_site_is_format_2_and_round_trips(tmp_path: Path) -> None:
    """Rows added after the FFN-output norm (Gemma 2/3, OLMo 2/3) are a 2.0 file, which a 1.x
    reader refuses (V5) instead of adding them before the norm; "output" files keep their 1.x
    version and bytes (no key written)."""
    plain = make(["x1", "x2"])
    assert C.K_RESIDUAL_SITE not in plain.metadata() and plain.metadata()[C.K_VERSION].startswith("1.")
    normed = dataclasses.replace(plain, residual_site="out_norm")
    meta = normed.metadata()
    assert (meta[C.K_VERSION], meta[C.K_RESIDUAL_SITE]) == ("2.0", "out_norm")
    path = normed.save(tmp_path / "n.nkv")
    assert NKVAdapter.load(path).residual_site == "out_norm" == read_header(path).residual_site
    assert NKVAdapter.from_bytes(plain.to_bytes()).residual_site == "output"
    with pytest.raises(NKVCompatibilityError, match="residual site"):  # rows meant for different places
        plain.merge(normed)
    assert plain.diff(normed).settings == {"residual_site": ("output", "out_norm")}


def test_empty_adapter_round_trip() -> None:
    empty = empty_adapter(base(), layer=0, target_module="m")
    data = empty.to_bytes()
    again = NKVAdapter.from_bytes(data)
    assert again.n_facts == 0 and again.keys.shape == (0, D_KEY) and again.to_bytes() == data


def test_gamma_survives_exactly() -> None:
    for gamma in (0.0, 1.0, 0.65, 0.1 + 0.2, 1e-05):
        assert NKVAdapter.from_bytes(make(["a"], gamma=gamma).to_bytes()).gamma == gamma


def test_read_header_loads_no_tensor_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a valid header over a large sparse data section of garbage: read_header must not look at it
    n_facts = 1 << 20
    doc, _ = split(make(["a"]).to_bytes())
    doc["__metadata__"]["nkv.n_facts"] = str(n_facts)
    sizes = [n_facts * D_KEY * 4, n_facts * D_MODEL * 4, 1000]
    offset = 0
    for name, size in zip((C.T_KEYS, C.T_RESIDUALS, C.T_FACTS), sizes):
        doc[name]["data_offsets"] = [offset, offset + size]
        offset += size
    doc[C.T_KEYS]["shape"], doc[C.T_RESIDUALS]["shape"] = [n_facts, D_KEY], [n_facts, D_MODEL]
    doc[C.T_FACTS]["shape"] = [1000]
    head = join(doc, b"")
    path = tmp_path / "big.nkv"
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(len(head) + offset)  # sparse: no data written

    read = []
    real_open = open

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def read(self, size=-1):
            out = self.fh.read(size)
            read.append(len(out))
            return out

    monkeypatch.setattr(nkv.header, "open", lambda *a, **k: Counting(real_open(*a, **k)), raising=False)
    header = read_header(path)
    assert header.n_facts == n_facts
    assert sum(read) == len(head) < 2000  # the length field and the JSON, nothing else


# ------------------------------------------------------------------ atomic save
def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_interrupted_save_keeps_old_file(exc: BaseException, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = make(["a"]).save(tmp_path / "a.nkv")
    os.chmod(path, 0o640)
    before = path.read_bytes()

    def write_half_then_fail(fh, head, parts):
        fh.write(head[: len(head) // 2])
        fh.flush()
        raise exc

    monkeypatch.setattr(nkv.adapter, "_write_parts", write_half_then_fail)
    with pytest.raises(type(exc)):
        make(["a", "b", "c"]).save(path)
    assert path.read_bytes() == before
    assert _temp_files(tmp_path) == []
    monkeypatch.undo()
    make(["a", "b"]).save(path)  # a later save works and keeps the file's mode
    assert NKVAdapter.load(path).ids == ["a", "b"] and (path.stat().st_mode & 0o777) == 0o640


def test_invalid_adapter_is_never_written(tmp_path: Path) -> None:
    path = make(["a"]).save(tmp_path / "a.nkv")
    before = path.read_bytes()
    bad = make(["a", "b"])
    bad.keys[1, 0] = math.nan
    with pytest.raises(NKVFormatError, match="V8"):
        bad.save(path)
    bad_fp = make(["a"], base=base(fingerprint="nope"))
    with pytest.raises(NKVFormatError, match="V6.*fingerprint"):
        bad_fp.save(path)
    dup = make(["a"])
    dup.facts.append(dup.facts[0])
    dup.keys, dup.residuals = dup.keys.repeat(2, 1), dup.residuals.repeat(2, 1)
    with pytest.raises(NKVFormatError, match="V9: duplicate fact id 'a'"):
        dup.save(path)
    assert path.read_bytes() == before and _temp_files(tmp_path) == []


# ------------------------------------------------------------------ row operations
def test_add_and_conflict_policies() -> None:
    a = make(["a", "b"])
    grown = a.add(facts(["c"]), *rows(["c"]))
    assert grown.ids == ["a", "b", "c"] and a.ids == ["a", "b"]  # inputs never mutate
    assert_aligned(grown)

    changed_b = facts(["b", "d"])
    k, r = rows(["b", "d"], salt=1)
    with pytest.raises(NKVConflictError, match=r"1 fact id\(s\) already in the adapter.*'b'.*on_conflict"):
        a.add(changed_b, k, r)
    ours = a.add(changed_b, k, r, on_conflict="ours")
    assert ours.ids == ["a", "b", "d"]
    assert_aligned(ours, {"d": 1})
    theirs = a.add(changed_b, k, r, on_conflict="theirs")
    assert theirs.ids == ["a", "b", "d"]  # replaced in place
    assert_aligned(theirs, {"b": 1, "d": 1})

    assert a.add(facts(["a"]), *rows(["a"])).ids == ["a", "b"]  # exact duplicate: no conflict
    with pytest.raises(NKVConflictError, match="repeated in the new rows"):
        a.add(facts(["x", "x"]), *rows(["x", "x"]))
    with pytest.raises(NKVCompatibilityError, match=r"expected keys \[1, 4\]"):
        a.add(facts(["x"]), torch.zeros(1, 5), torch.zeros(1, 3))


def test_remove_by_id_and_subject() -> None:
    a = make(["a", "b", "c", "d"])
    a.facts[2:] = facts(["c", "d"], subject="Shared")
    kept = a.remove(ids=["a"], subjects=["Shared"])
    assert kept.ids == ["b"]
    assert_aligned(kept)
    assert a.remove(ids=["b"]).ids == ["a", "c", "d"]
    assert_aligned(a.remove(ids=["b"]))
    with pytest.raises(NKVConflictError, match=r"no fact with id 'zz', subject 'Nobody'.*nkv inspect --facts"):
        a.remove(ids=["zz"], subjects=["Nobody"])
    assert a.remove(ids=["zz"], missing_ok=True).ids == a.ids
    assert a.remove(ids=a.ids).n_facts == 0
    NKVAdapter.from_bytes(kept.to_bytes())  # still a valid file


def test_replace() -> None:
    a = make(["a", "b"])
    replaced = a.replace(facts(["b"]), *rows(["b"], salt=2))
    assert replaced.ids == ["a", "b"]
    assert_aligned(replaced, {"b": 2})
    with pytest.raises(NKVConflictError, match="not in the adapter.*use add"):
        a.replace(facts(["new"]), *rows(["new"]))


def test_merge_policies_and_compatibility() -> None:
    a, b = make(["a", "b"]), make(["b", "c"], salt=1)
    with pytest.raises(NKVConflictError, match="'b'"):
        a.merge(b)
    ours, theirs = a.merge(b, on_conflict="ours"), a.merge(b, on_conflict="theirs")
    assert ours.ids == theirs.ids == ["a", "b", "c"]
    assert_aligned(ours, {"c": 1})
    assert_aligned(theirs, {"b": 1, "c": 1})
    assert a.merge(a).ids == ["a", "b"]  # merging a copy of itself is a no-op
    assert a.merge(make(["z"], eval={"x": 1})).eval == {}

    with pytest.raises(NKVCompatibilityError, match="layer: 1 vs 0"):
        a.merge(make(["z"], layer=0))
    with pytest.raises(NKVCompatibilityError, match="fingerprint differs"):
        a.merge(make(["z"], base=base(WEIGHT.flip(0))))
    with pytest.raises(NKVCompatibilityError, match="base d_model"):
        a.merge(make(["z"], base=base(d_model=5)))
    with pytest.raises(NKVCompatibilityError, match=r"gamma differs \(0.65 vs 0.7\).*--gamma"):
        a.merge(make(["z"], gamma=0.7))
    assert a.merge(make(["z"], gamma=0.7), gamma=0.7).gamma == 0.7
    # bf16 rows are converted to the first adapter's dtype; fingerprints match across dtypes
    mixed = a.merge(make(["z"], base=base(WEIGHT.bfloat16())).to(torch.bfloat16))
    assert mixed.keys.dtype == torch.float32 and mixed.ids == ["a", "b", "z"]


def test_diff() -> None:
    a = make(["a", "b", "c"])
    b = a.remove(ids=["a"]).add(facts(["d"]), *rows(["d"])).replace(facts(["c"]), *rows(["c"], salt=5))
    d = a.diff(b)
    assert (d.added, d.removed, d.changed, d.settings) == (["d"], ["a"], ["c"], {})
    assert a.diff(a).empty
    other = make(["a", "b", "c"], gamma=0.5, layer=0, base=base(WEIGHT * 3, name="other"))
    assert set(a.diff(other).settings) == {"gamma", "layer", "base.name", "base.fingerprint"}
    assert a.diff(a.to(torch.float16)).settings == {"dtype": ("F32", "F16")}


def test_select_keeps_rows() -> None:
    a = make(["a", "b", "c"])
    assert_aligned(a.select(["c", "a"]))
    assert a.select(["c", "a"]).ids == ["c", "a"]


# ------------------------------------------------------------------ light import
def test_import_nkv_does_not_import_heavy_packages() -> None:
    code = ("import sys, nkv, nkv.adapter, nkv.header, nkv.facts, nkv.gate, nkv.fingerprint; "
            "heavy = [m for m in ('transformers', 'vllm', 'huggingface_hub') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_reads_the_exponent_bits_exactly(dtype):
    from nkv.adapter import all_finite

    t = torch.randn(300, 7).to(dtype)
    assert all_finite(t) and all_finite(t.T) and all_finite(t[:, 2]) and all_finite(t[:0])
    big = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max, torch.finfo(dtype).tiny, 0.0], dtype=dtype)
    assert all_finite(big)  # the largest finite values are not Inf
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[123, 4] = bad
        assert not all_finite(u) and not all_finite(u.T) and not all_finite(u, block=5)


_FIELD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=3), st.just(""),
                          st.dictionaries(st.text(max_size=2), st.integers(), max_size=2), st.lists(st.integers(), max_size=2))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "subject", "prompt", "target_new", "target_true", "provenance", "extra"]),
                       _FIELD_VALUES))
def test_the_quick_record_check_accepts_only_what_the_full_rule_accepts(rec: dict) -> None:
    # the one-array load path uses _plain_valid in place of fact_record_problems: never looser
    from nkv.facts import _plain_valid, fact_record_problems

    if _plain_valid(rec):
        assert fact_record_problems(rec, "row") == []


def test_from_bytes_can_share_the_callers_buffer_instead_of_copying_it():
    """vLLM ranks read a file into one buffer and hand it over (share=True): the tensors are
    views of it where their offset suits their dtype, and read the same values as a copy."""
    data = make(["a", "b", "c"]).with_sketch(2).to_bytes()
    buffer = bytearray(data)
    shared, copied = NKVAdapter.from_bytes(buffer, share=True), NKVAdapter.from_bytes(data)
    assert torch.equal(shared.keys, copied.keys) and torch.equal(shared.residuals, copied.residuals)
    assert torch.equal(shared.sketch_proj, copied.sketch_proj) and shared.ids == copied.ids
    start = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    assert start <= shared.keys.data_ptr() < start + len(buffer)  # a view, not a copy
    with pytest.raises(TypeError, match="needs a bytearray"):
        NKVAdapter.from_bytes(data, share=True)
