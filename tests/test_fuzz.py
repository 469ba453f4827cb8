"""Fuzz the reader: every input ends as a valid adapter or an NKVError, never anything else.

Inputs are mutations of spec/examples/golden.nkv, golden-sketch.nkv (format 1.1, with
the optional sketch projection, and with the keys' sketches of 2.1 added), golden-int8.nkv (1.3, I8 rows with per-row scales)
and golden-sign.nkv (2.2, sign rows with per-row weights and int4 residuals with scales):
bit flips, truncations, splices, structured edits of the header JSON, of the fact records,
of the sketch tensor, of the int8 rows and scales and of the sign rows, weights and scales,
and random bytes. Each goes
to `NKVAdapter.from_bytes`, to `NKVAdapter.load` (through a file) and to `read_header`.
An input that loads must also be valid in the other readers, write back to the same
adapter, and say the same in both readers (a differential check of our JSON parser
against the Rust safetensors reader that `load` uses for tensor data).

Hangs: hypothesis' per-example deadline, plus a SIGALRM watchdog that turns a true hang
into a test failure instead of a stuck CI job. A crash (segfault) kills pytest, which CI
reports as a failure.

Cases per CI run: FUZZ_CASES below (11,400; about 65 s of CPU time, 3 minutes of wall time
on two CPU cores shared with other jobs). Each
test asserts how many inputs it ran and prints the count (`pytest -s` shows it).
Raise NKV_FUZZ_SCALE (e.g. 20) for a longer local run.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import struct
import tempfile
import threading
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from nkv import NKVAdapter, NKVError, read_header

EXAMPLES = Path(__file__).resolve().parent.parent / "spec" / "examples"
GOLDEN = (EXAMPLES / "golden.nkv").read_bytes()
GOLDEN_SKETCH = (EXAMPLES / "golden-sketch.nkv").read_bytes()  # format 1.1
GOLDEN_INT8 = (EXAMPLES / "golden-int8.nkv").read_bytes()  # format 1.3
GOLDEN_SIGN = (EXAMPLES / "golden-sign.nkv").read_bytes()  # format 2.2
_NG = struct.unpack("<Q", GOLDEN_SIGN[:8])[0]
HEADER_SIGN = json.loads(GOLDEN_SIGN[8 : 8 + _NG])
BODY_SIGN = GOLDEN_SIGN[8 + _NG :]
_NQ = struct.unpack("<Q", GOLDEN_INT8[:8])[0]
HEADER_INT8 = json.loads(GOLDEN_INT8[8 : 8 + _NQ])
BODY_INT8 = GOLDEN_INT8[8 + _NQ :]
_NS = struct.unpack("<Q", GOLDEN_SKETCH[:8])[0]
HEADER_SKETCH = json.loads(GOLDEN_SKETCH[8 : 8 + _NS])
BODY_SKETCH = GOLDEN_SKETCH[8 + _NS :]
goldens = st.sampled_from([GOLDEN, GOLDEN_SKETCH, GOLDEN_INT8, GOLDEN_SIGN])


def _with_key_sketches(header: dict, body: bytes) -> tuple[dict, bytes]:
    """golden-sketch plus `nkv.sketch.keys` (2.1), which the writer adds only from
    SKETCH_MIN_FACTS rows: the keys' sketches under the file's projection, appended."""
    import torch

    from nkv.gate import sketch_keys

    a = NKVAdapter.from_bytes(_frame(_dump(header), body))
    table = sketch_keys(a.keys, a.sketch_proj).contiguous()
    doc = json.loads(json.dumps(header))
    doc["nkv.sketch.keys"] = {"dtype": "F32", "shape": list(table.shape),
                              "data_offsets": [len(body), len(body) + 4 * table.numel()]}
    return doc, body + table.numpy().tobytes()
_N = struct.unpack("<Q", GOLDEN[:8])[0]
HEADER = json.loads(GOLDEN[8 : 8 + _N])
BODY = GOLDEN[8 + _N :]
_FACTS_AT = HEADER["nkv.facts"]["data_offsets"][0]  # the fact records are the last tensor

SCALE = int(os.environ.get("NKV_FUZZ_SCALE", "1"))
# examples per strategy; the sum is the number of cases per CI run
FUZZ_CASES = {"bitflips": 2000, "truncation": 1000, "splices": 1400, "header_json": 2400,
              "fact_records": 1000, "random_bytes": 800, "sketch": 800, "int8": 1000, "sign": 1000}
TOTAL_CASES = sum(FUZZ_CASES.values())  # 11,400

_TMP = Path(tempfile.mkdtemp(prefix="nkv-fuzz-"))
atexit.register(shutil.rmtree, _TMP, True)
_counts: dict[str, int] = {}


def _settings(name: str):
    return settings(
        max_examples=FUZZ_CASES[name] * SCALE,
        deadline=timedelta(seconds=5),  # one input takes milliseconds; seconds means a hang
        database=None,  # no .hypothesis/ folder in the tree; failures print their input
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@contextmanager
def _watchdog(seconds: int = 30) -> Iterator[None]:
    """Fail instead of hanging forever (the deadline only fires once an example returns)."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"reader hung for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check(data: bytes, name: str) -> None:
    """The property: valid adapter or NKVError, in every reader, consistently."""
    _counts[name] = _counts.get(name, 0) + 1
    path = _TMP / "case.nkv"
    path.write_bytes(data)
    with _watchdog():
        outcomes = []
        for read in (lambda: NKVAdapter.from_bytes(data, "fuzz"), lambda: NKVAdapter.load(path)):
            try:
                outcomes.append(read())
            except NKVError:
                outcomes.append(None)
        try:
            header = read_header(path)
        except NKVError:
            header = None
        from_bytes, loaded = outcomes
        assert (from_bytes is None) == (loaded is None), "from_bytes and load disagree"
        if from_bytes is not None:
            assert header is not None, "a loadable file must have a readable header"
            again = NKVAdapter.from_bytes(from_bytes.to_bytes())
            assert again.to_bytes() == from_bytes.to_bytes() == loaded.to_bytes()
            assert again.facts == from_bytes.facts


def _report(name: str, capsys: pytest.CaptureFixture, record_property: Any) -> None:
    n = _counts.get(name, 0)
    with capsys.disabled():
        print(f"\n[fuzz] {name}: {n} cases")
    record_property(f"fuzz_cases_{name}", n)
    assert n >= FUZZ_CASES[name] * SCALE * 0.9 or name == "truncation", f"only {n} cases ran"


# ------------------------------------------------------------------ strategies
def _dump(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _frame(header: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + body


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=10)
number_text = st.one_of(
    st.integers(-5, 2**64).map(str), st.floats().map(repr),
    st.sampled_from(["", " 1", "1 ", "+1", "01", "1_0", "٣", "²", "1e3", "0x10", "nan", "inf", "-0", "1.0",
                     "2.0", "0.9", "1.99", "99999.0", "9" * 30]),
)
digitish = st.one_of(st.integers(0, 12).map(str), st.sampled_from(["", "01", "²", "٣", "1 ", "+1", "x", "9" * 7]))
versions = st.builds(lambda a, b: f"{a}.{b}", digitish, digitish)
interesting_text = st.one_of(number_text, versions, st.text(max_size=30),
                             st.sampled_from(["nkv", "nkvfp1:", "{}", "[]", '{"a": NaN}', "\ud800", "output",
                                              "out_norm", "2.0"]))
# JSON tokens that Python's json module and other readers treat differently, or that
# break naive code (huge integers, lone surrogates, non-finite numbers, deep nesting)
NASTY_JSON = ["NaN", "Infinity", "-Infinity", '"\\ud800"', '"\\udfff\\ud800"', "9" * 5000, "1e999", "-0",
              "[]", "{}", "null", "true", '{"dtype":[1]}', '["F32"]', '"²"', '"1.²"', '"٣"', "[" * 50000,
              '{"a":1,"a":2}', '"nkv"', "18446744073709551616", "-1", "0.65", '""']
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null')


@st.composite
def token_swap(draw: st.DrawFn, text: bytes) -> bytes:
    """Replace one JSON token (key, string or number) of `text` with a nasty one."""
    tokens = list(_TOKEN.finditer(text))
    if not tokens:
        return text
    m = tokens[draw(st.integers(0, len(tokens) - 1))]
    return text[: m.start()] + draw(st.sampled_from(NASTY_JSON)).encode() + text[m.end() :]
meta_keys = st.sampled_from(sorted(HEADER["__metadata__"]) + ["nkv.residual_site", "nkv.other", "__metadata__"])
tensor_names = st.sampled_from(["nkv.keys", "nkv.residuals", "nkv.facts", "nkv.extra"])
dtypes = st.one_of(st.sampled_from(["F32", "F16", "BF16", "U8", "I32", "F64", "BOOL", "F8_E4M3", "X"]), json_value)
shapes = st.one_of(st.lists(st.integers(-2, 2**50), max_size=4), st.lists(st.integers(0, 8), max_size=3))
offsets = st.lists(st.integers(-2, 2**64), min_size=0, max_size=3)


@st.composite
def header_mutation(draw: st.DrawFn) -> bytes:
    doc = json.loads(json.dumps(HEADER))
    meta = doc["__metadata__"]
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["set_meta", "drop_meta", "meta_any", "tensor_field", "tensor_any",
                                       "drop_tensor", "add_tensor", "shape_consistent", "top_any"]))
        if action == "set_meta":
            meta[draw(meta_keys)] = draw(interesting_text)
        elif action == "drop_meta":
            meta.pop(draw(meta_keys), None)
        elif action == "meta_any":
            doc["__metadata__"] = meta = draw(st.dictionaries(st.text(max_size=5), json_value, max_size=3)) \
                if draw(st.booleans()) else meta | {draw(meta_keys): draw(json_value)}
        elif action == "tensor_field":
            entry = doc.setdefault(draw(tensor_names), {})
            if isinstance(entry, dict):
                field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "other"]))
                entry[field] = draw({"dtype": dtypes, "shape": shapes, "data_offsets": offsets}.get(field, json_value))
        elif action == "tensor_any":
            doc[draw(tensor_names)] = draw(json_value)
        elif action == "drop_tensor":
            doc.pop(draw(tensor_names), None)
        elif action == "add_tensor":
            size = draw(st.integers(0, 16))
            doc[draw(st.text(max_size=10))] = {"dtype": "U8", "shape": [size],
                                               "data_offsets": [len(BODY), len(BODY) + size]}
        elif action == "shape_consistent":  # n_facts/d_key/d_model moved together with the tensor table
            n, d = draw(st.integers(0, 3)), draw(st.integers(1, 3))
            meta["nkv.n_facts"], meta["nkv.base.d_key"] = str(n), str(d)
            doc["nkv.keys"] = {"dtype": "F32", "shape": [n, d], "data_offsets": [0, 4 * n * d]}
        else:
            doc = draw(json_value) if draw(st.booleans()) else doc
            if not isinstance(doc, dict):
                return _frame(_dump(doc), BODY)
            meta = doc.setdefault("__metadata__", {}) if isinstance(doc.get("__metadata__"), dict) else {}
    text = _dump(doc)
    if draw(st.integers(0, 2)) == 0:
        text = draw(token_swap(text))
    if draw(st.booleans()):
        text += b" " * draw(st.integers(0, 9))
    body = BODY + draw(st.binary(max_size=40)) if draw(st.integers(0, 3)) == 0 else BODY
    return _frame(text, body)


@st.composite
def fact_mutation(draw: st.DrawFn) -> bytes:
    """Valid container, valid metadata; the fact records are what varies."""
    lines = [json.loads(x) for x in BODY[_FACTS_AT:].decode().splitlines()]
    choice = draw(st.sampled_from(["edit", "raw_lines", "raw_bytes"]))
    if choice == "edit":
        for _ in range(draw(st.integers(1, 3))):
            rec = lines[draw(st.integers(0, 1))]
            field = draw(st.sampled_from(["id", "subject", "prompt", "target_new", "target_true",
                                          "provenance", "extra"]))
            if draw(st.booleans()):
                rec.pop(field, None)
            else:
                rec[field] = draw(st.one_of(json_value, st.text(max_size=10)))
        raw = b"".join(json.dumps(r, ensure_ascii=draw(st.booleans())).encode() + b"\n" for r in lines)
        if draw(st.booleans()):
            raw = draw(token_swap(raw))
    elif choice == "raw_lines":
        raw = "".join(x + "\n" for x in draw(st.lists(
            st.one_of(st.text(max_size=40), st.just('{"id":"x","subject":"s","prompt":"p","target_new":"t"}')),
            min_size=0, max_size=3))).encode("utf-8", "surrogatepass")
    else:
        raw = draw(st.binary(max_size=80))
    doc = json.loads(json.dumps(HEADER))
    doc["nkv.facts"] = {"dtype": "U8", "shape": [len(raw)], "data_offsets": [_FACTS_AT, _FACTS_AT + len(raw)]}
    return _frame(_dump(doc), BODY[:_FACTS_AT] + raw)


@st.composite
def splice(draw: st.DrawFn) -> bytes:
    golden = draw(goldens)
    data = bytearray(golden)
    for _ in range(draw(st.integers(1, 3))):
        a = draw(st.integers(0, len(data)))
        b = draw(st.integers(a, min(len(data), a + 64)))
        kind = draw(st.sampled_from(["delete", "insert", "replace", "duplicate"]))
        if kind == "delete":
            del data[a:b]
        elif kind == "insert":
            data[a:a] = draw(st.binary(min_size=1, max_size=32))
        elif kind == "replace":
            data[a:b] = draw(st.binary(max_size=32))
        else:
            c = draw(st.integers(0, len(data)))
            data[c:c] = data[a:b]
    if draw(st.booleans()) and len(data) >= 8:  # keep the length field consistent with a shifted header
        data[:8] = struct.pack("<Q", max(0, struct.unpack("<Q", golden[:8])[0] + len(data) - len(golden)))
    return bytes(data)


@st.composite
def bitflips(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(goldens))
    n = struct.unpack("<Q", data[:8])[0]
    region = draw(st.sampled_from(["anywhere", "length", "header", "data"]))
    lo, hi = {"anywhere": (0, len(data)), "length": (0, 8), "header": (8, 8 + n),
              "data": (8 + n, len(data))}[region]
    for _ in range(draw(st.integers(1, 6))):
        data[draw(st.integers(lo, hi - 1))] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


@st.composite
def sketch_mutation(draw: st.DrawFn) -> bytes:
    """golden-sketch.nkv, with or without `nkv.sketch.keys`, with either tensor's entry, values,
    the version or neighbours edited."""
    header, body = (HEADER_SKETCH, BODY_SKETCH) if draw(st.booleans()) else _with_key_sketches(HEADER_SKETCH, BODY_SKETCH)
    doc = json.loads(json.dumps(header))
    body = bytearray(body)
    names = [n for n in ("nkv.sketch.proj", "nkv.sketch.keys") if n in doc]
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["dtype", "shape", "offsets", "entry", "drop", "value", "version", "d_key"]))
        name = draw(st.sampled_from(names))
        entry = doc.get(name)
        begin, end = header[name]["data_offsets"]
        if action in ("dtype", "shape", "offsets") and isinstance(entry, dict):
            field = {"dtype": "dtype", "shape": "shape", "offsets": "data_offsets"}[action]
            entry[field] = draw({"dtype": dtypes, "shape": st.one_of(shapes, st.sampled_from(
                [[4, 1], [4, 4], [4, 5], [3, 2], [8, 1], [2, 4], [2, 3], [2, 2], [4], [4, 2, 1]])),
                "offsets": offsets}[action])
        elif action == "entry":
            doc[name] = draw(json_value)
        elif action == "drop":
            doc.pop(name, None)
        elif action == "value":  # a NaN, an Inf or any float in one cell of the projection or the sketches
            cell = draw(st.integers(0, (end - begin) // 4 - 1))
            value = draw(st.sampled_from([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff"])
                         | st.binary(min_size=4, max_size=4))
            body[begin + 4 * cell : begin + 4 * cell + 4] = value
        elif action == "version":
            doc["__metadata__"]["nkv.version"] = draw(st.one_of(versions, st.sampled_from(["1.0", "1.1", "1.9", "2.0"])))
        else:  # d_key moves, the projection's first dimension does not
            doc["__metadata__"]["nkv.base.d_key"] = draw(st.sampled_from(["1", "2", "3", "5"]))
    return _frame(_dump(doc), bytes(body))


INT8_TENSORS = ["nkv.keys", "nkv.residuals", "nkv.keys.scale", "nkv.residuals.scale"]
INT8_BYTES = st.sampled_from([b"\x80", b"\x7f", b"\x81", b"\x00", b"\x01", b"\xff"]) | st.binary(min_size=1, max_size=1)
SCALE_BYTES = st.sampled_from([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xbf", b"\x00\x00\x00\x00",
                               b"\x01\x00\x00\x00", b"\x00\x00\x80\x00", b"\xff\xff\x7f\x7f", b"\x00\x00\x00\x80"]) \
    | st.binary(min_size=4, max_size=4)


SIGN_TENSORS = ["nkv.keys", "nkv.residuals", "nkv.keys.weight", "nkv.residuals.scale"]
# weights near the V14 bounds of d_key 4 (1 and sqrt(4) = 2) and the golden value
WEIGHT_BYTES = st.sampled_from([struct.pack("<f", v) for v in (1.0, 0.9989, 2.0, 2.0021, 1.1456, 0.0, -1.0)])


@st.composite
def int8_mutation(draw: st.DrawFn) -> bytes:
    """golden-int8.nkv with its I8 rows, scales (values, entries, dtypes, shapes) or version edited."""
    return draw(_coded_mutation(HEADER_INT8, BODY_INT8, INT8_TENSORS, (INT8_BYTES, SCALE_BYTES)))


@st.composite
def sign_mutation(draw: st.DrawFn) -> bytes:
    """golden-sign.nkv with its sign bits, int4 values, weights, scales (values, entries, dtypes,
    shapes) or version edited."""
    return draw(_coded_mutation(HEADER_SIGN, BODY_SIGN, SIGN_TENSORS, (INT8_BYTES, SCALE_BYTES | WEIGHT_BYTES)))


@st.composite
def _coded_mutation(draw: st.DrawFn, header: dict, golden_body: bytes, tensors: list[str],
                    values: tuple[st.SearchStrategy, st.SearchStrategy]) -> bytes:
    """A golden file with coded rows (its two row tensors, then its two per-row F32 tensors) edited."""
    doc = json.loads(json.dumps(header))
    body = bytearray(golden_body)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["q", "scale", "dtype", "shape", "drop", "entry", "version", "rows_dtype"]))
        name = draw(st.sampled_from(tensors))
        entry = doc.get(name)
        if action in ("q", "scale") and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list):
            tensor = draw(st.sampled_from(tensors[:2] if action == "q" else tensors[2:]))
            begin, end = header[tensor]["data_offsets"]
            size = 1 if action == "q" else 4
            cell = draw(st.integers(0, (end - begin) // size - 1))
            body[begin + size * cell : begin + size * (cell + 1)] = draw(values[0] if action == "q" else values[1])
        elif action == "dtype" and isinstance(entry, dict):
            entry["dtype"] = draw(st.sampled_from(["I8", "U8", "F32", "F16", "BF16", "F8_E4M3", "I16"]) | dtypes)
        elif action == "shape" and isinstance(entry, dict):
            entry["shape"] = draw(st.one_of(shapes, st.sampled_from([[2], [1], [3], [2, 1], [1, 2], [2, 4], [8]])))
        elif action == "drop":
            doc.pop(name, None)
        elif action == "entry":
            doc[name] = draw(json_value)
        elif action == "version":
            doc["__metadata__"]["nkv.version"] = draw(st.sampled_from(["1.0", "1.2", "1.3", "1.9", "2.0", "2.2"])
                                                      | versions)
        else:  # both row tensors to one float dtype, scales kept: data no longer matches the sizes
            for rows in tensors[:2]:
                if isinstance(doc.get(rows), dict):
                    doc[rows]["dtype"] = draw(st.sampled_from(["F32", "F16", "BF16"]))
    return _frame(_dump(doc), bytes(body))


# ------------------------------------------------------------------ tests
def test_golden_is_valid() -> None:
    check(GOLDEN, "golden")
    check(GOLDEN_SKETCH, "golden")
    check(GOLDEN_INT8, "golden")
    check(GOLDEN_SIGN, "golden")


def test_fuzz_bitflips(capsys: pytest.CaptureFixture, record_property: Any) -> None:
    given(bitflips())(_settings("bitflips")(lambda data: check(data, "bitflips")))()
    _report("bitflips", capsys, record_property)


def test_fuzz_truncation(capsys: pytest.CaptureFixture, record_property: Any) -> None:
    # every cut point of both golden files: a finite space, hypothesis may stop early when exhausted
    cuts = st.tuples(goldens, st.integers(0, max(len(GOLDEN_SKETCH), len(GOLDEN_INT8))))
    given(cuts)(_settings("truncation")(lambda gn: check(gn[0][: gn[1]], "truncation")))()
    _report("truncation", capsys, record_property)


def test_fuzz_splices(capsys: pytest.CaptureFixture, record_property: Any) -> None:
    given(splice())(_settings("splices")(lambda data: check(data, "splices")))()
    _report("splices", capsys, record_property)


def test_fuzz_header_json(capsys: pytest.CaptureFixture, record_property: Any) -> None:
    given(header_mutation())(_settings("header_json")(lambda data: check(data, "header_json")))()
    _report("header_json", capsys, record_property)


def test_fuzz_fact_records(capsys: pytest.CaptureFixture, record_property: Any) -> None:
    given(fact_mutation())(_settings("fact_records")(lambda data: check(data, "fact_records")))()
    _report("fact_records", capsys, record_property)


def test_fuzz_random_bytes(capsys: pytest.CaptureFixture, record_property: Any) -> None:
    framed = st.builds(lambda h, b: _frame(h, b), st.binary(max_size=200), st.binary(max_size=64))
    given(st.one_of(st.binary(max_size=300), framed))(
        _settings("random_bytes")(lambda data: check(data, "random_bytes")))()
    _report("random_bytes", capsys, record_property)


def test_fuzz_sketch(capsys: pytest.CaptureFixture, record_property: Any) -> None:
    given(sketch_mutation())(_settings("sketch")(lambda data: check(data, "sketch")))()
    _report("sketch", capsys, record_property)


def test_fuzz_int8(capsys: pytest.CaptureFixture, record_property: Any) -> None:
    given(int8_mutation())(_settings("int8")(lambda data: check(data, "int8")))()
    _report("int8", capsys, record_property)


def test_fuzz_sign(capsys: pytest.CaptureFixture, record_property: Any) -> None:
    given(sign_mutation())(_settings("sign")(lambda data: check(data, "sign")))()
    _report("sign", capsys, record_property)
