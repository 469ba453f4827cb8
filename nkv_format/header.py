"""Reading and checking an .nkv header without loading any tensor.

The safetensors container is parsed here by hand (it is 8 bytes + JSON) so that every
way a file can be wrong becomes an `NKVFormatError` naming the rule it breaks
(spec/nkv-format.md §7), before the safetensors library sees it.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import constants as C
from .errors import NKVFormatError, NKVVersionError
from .fingerprint import EMBED_PART, covered_layers, read_fingerprint

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]


@dataclass(frozen=True)
class BaseModelInfo:
    """Which checkpoint an adapter belongs to (the `nkv.base.*` keys)."""

    name: str
    architecture: str
    model_type: str
    n_layers: int
    d_model: int
    d_key: int
    fingerprint: str
    revision: str | None = None


@dataclass(frozen=True)
class NKVHeader:
    """Everything in an .nkv file except the tensor data. Built only by `parse_header`."""

    source: str
    version: str
    n_facts: int
    layer: int
    gamma: float
    target_module: str
    residual_site: str
    base: BaseModelInfo
    build: dict[str, Any]
    eval: dict[str, Any]
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_start: int  # byte offset of the data section in the file

    @property
    def dtype(self) -> str:
        """How K1/R1 are stored: "F32", "F16", "BF16", "I8" (with per-row scales, 1.3) or
        "U8" (sign keys and int4 residuals, 2.2)."""
        return self.tensors[C.T_KEYS].dtype

    @property
    def storage(self) -> str:
        """"int8" when K1/R1 are I8 with per-row scales (spec §4.3), "sign" when they are U8
        sign bits and int4 values (spec §4.4), else "exact"."""
        return {C.QUANT_DTYPE: "int8", C.SIGN_DTYPE: "sign"}.get(self.dtype, "exact")


def read_header(path: str | os.PathLike) -> NKVHeader:
    """Read and validate the header of an .nkv file; loads no tensor.

    Raises:
        NKVFormatError: the file breaks the spec (all problems listed).
        NKVVersionError: written by a newer major format version.

    >>> h = read_header("spec/examples/golden.nkv")
    >>> h.n_facts, h.layer, h.gamma
    (2, 1, 0.65)
    """
    path = Path(path)
    source = str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
            header_bytes = fh.read(min(n, C.MAX_HEADER_BYTES)) if len(prefix) == 8 else b""
    except IsADirectoryError:
        raise NKVFormatError(source, ["is a directory, expected an .nkv file"]) from None
    except OSError as exc:
        raise NKVFormatError(source, [f"cannot read file: {exc.strerror or exc}"]) from None
    return parse_header(prefix + header_bytes, size, source)


def parse_header(raw: bytes, file_size: int, source: str) -> NKVHeader:
    """Validate rules V1-V7 on the first bytes of a file of `file_size` bytes."""
    # V1: container framing
    if file_size < 8 or len(raw) < 8:
        raise NKVFormatError(source, [f"V1: file is {file_size} bytes, too short for a safetensors header"])
    (n,) = struct.unpack("<Q", raw[:8])
    if n > C.MAX_HEADER_BYTES:
        raise NKVFormatError(source, [f"V1: header length {n} exceeds the {C.MAX_HEADER_BYTES}-byte limit (not an "
                                      ".nkv file? an adapter starts with a safetensors header)"])
    if 8 + n > file_size or len(raw) < 8 + n:
        raise NKVFormatError(source, [f"V1: header claims {n} bytes but the file has {file_size - 8} after the "
                                      "length field (truncated download? fetch it again)"])
    # V2: JSON structure
    text = raw[8 : 8 + n]
    if not text.startswith(b"{"):
        # the safetensors rule; the Rust reader refuses such headers too
        raise NKVFormatError(source, ["V2: header must start with '{' (not a safetensors file?)"])
    try:
        doc = strict_json_loads(text.decode("utf-8"))
    except (UnicodeError, ValueError, RecursionError) as exc:
        raise NKVFormatError(source, [f"V2: header is not strict UTF-8 JSON ({str(exc)[:120]})"]) from None
    if not isinstance(doc, dict):
        raise NKVFormatError(source, [f"V2: header must be a JSON object, got {type(doc).__name__}"])
    meta = doc.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise NKVFormatError(source, ["V2: __metadata__ must map strings to strings"])

    tensors, problems = _parse_tensor_table(doc, file_size - 8 - n)
    if problems:
        raise NKVFormatError(source, problems)
    return _interpret(source, meta, tensors, data_start=8 + n)


def _parse_tensor_table(doc: dict, data_len: int) -> tuple[dict[str, TensorInfo], list[str]]:
    """V2/V3: every entry is a well-formed tensor and the data regions tile the data section."""
    tensors: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for name, entry in doc.items():
        if not isinstance(entry, dict):
            problems.append(f"V2: tensor {name!r}: entry must be an object")
            continue
        dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            problems.append(f"V2: tensor {name!r}: unknown dtype {dtype!r:.20}")
            continue
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**48 for d in shape)):
            problems.append(f"V2: tensor {name!r}: shape must be a list of non-negative integers")
            continue
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                and 0 <= offs[0] <= offs[1]):
            problems.append(f"V2: tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end")
            continue
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if offs[1] - offs[0] != nbytes:
            problems.append(f"V3: tensor {name!r}: {dtype} {shape} needs {nbytes} bytes, "
                            f"data_offsets cover {offs[1] - offs[0]}")
            continue
        tensors[name] = TensorInfo(dtype, tuple(shape), (offs[0], offs[1]))
    if problems:
        return tensors, problems
    cursor = 0
    for name, info in sorted(tensors.items(), key=lambda kv: kv[1].data_offsets):
        if info.data_offsets[0] != cursor:
            problems.append(f"V3: tensor {name!r} starts at byte {info.data_offsets[0]}, expected {cursor} "
                            "(regions must be contiguous and non-overlapping)")
            return tensors, problems
        cursor = info.data_offsets[1]
    if cursor != data_len:
        problems.append(f"V3: tensors cover {cursor} data bytes but the file holds {data_len} "
                        "(truncated or padded file; fetch it again)")
    return tensors, problems


def _interpret(source: str, meta: dict[str, str], tensors: dict[str, TensorInfo], data_start: int) -> NKVHeader:
    """V4-V7: the NKV layer on top of the container."""
    if meta.get(C.K_FORMAT) != C.FORMAT_MARKER:
        raise NKVFormatError(source, [f"V4: metadata {C.K_FORMAT!r} must be {C.FORMAT_MARKER!r}, got "
                                      f"{meta.get(C.K_FORMAT)!r:.40} (not an NKV adapter)"])
    version = meta.get(C.K_VERSION, "")
    major = _version_major(version)
    if major is None or major < 1:  # there is no format 0.x
        raise NKVFormatError(source, [f"V5: metadata {C.K_VERSION!r} must look like '1.0', got {version!r:.40}"])
    if major > C.SUPPORTED_MAJOR:
        raise NKVVersionError(source, [f"V5: written by NKV format {version}, this reader supports "
                                       f"{C.SUPPORTED_MAJOR}.x; upgrade with: pip install -U nkv"])
    problems = [f"V6: required metadata key {k!r} is missing" for k in C.REQUIRED_KEYS if k not in meta]
    if problems:
        raise NKVFormatError(source, problems)

    def as_int(key: str, low: int) -> int:
        # Canonical ASCII decimal only: int() alone would also take " 7", "+7", "7_0", "٧".
        text = meta[key]
        if _INT_RE.fullmatch(text) and len(text) < 16 and int(text) >= low:
            return int(text)
        problems.append(f"V6: metadata {key!r} must be a decimal integer >= {low}, got {text!r:.40}")
        return low

    n_facts = as_int(C.K_N_FACTS, 0)
    layer = as_int(C.K_LAYER, 0)
    n_layers = as_int(C.K_BASE_N_LAYERS, 1)
    d_model = as_int(C.K_BASE_D_MODEL, 1)
    d_key = as_int(C.K_BASE_D_KEY, 1)
    if layer >= n_layers and not problems:
        problems.append(f"V6: metadata {C.K_LAYER!r} = {layer} but the base model has {n_layers} layers")
    try:
        if not _NUMBER_RE.fullmatch(meta[C.K_GAMMA]):  # JSON number syntax; no "nan", " 0.5", "0_5"
            raise ValueError
        gamma = float(meta[C.K_GAMMA])
        if not 0.0 <= gamma <= 1.0:
            raise ValueError
    except ValueError:
        problems.append(f"V6: metadata {C.K_GAMMA!r} must be a number in [0, 1], got {meta[C.K_GAMMA]!r:.40}")
        gamma = C.DEFAULT_GAMMA
    try:
        fingerprint = read_fingerprint(meta[C.K_BASE_FINGERPRINT])
    except NKVFormatError as exc:
        problems.extend(f"V6: {p}" for p in exc.problems)
    else:
        want = [f"L{other}" for other in covered_layers(layer, n_layers)] + [EMBED_PART]
        if fingerprint.version == 2 and not problems and list(fingerprint.parts) != want:
            problems.append(f"V6: metadata {C.K_BASE_FINGERPRINT!r} covers {','.join(fingerprint.parts)}; an nkvfp2 "
                            f"fingerprint at layer {layer} of {n_layers} covers {','.join(want)}, in that order")
    residual_site = meta.get(C.K_RESIDUAL_SITE, C.DEFAULT_RESIDUAL_SITE)
    problems.extend(residual_site_problems(residual_site, major))
    json_fields = _json_fields(meta, problems)
    problems.extend(_tensor_problems(tensors, n_facts, d_key, d_model))
    if problems:
        raise NKVFormatError(source, problems)

    base = BaseModelInfo(
        name=meta[C.K_BASE_NAME],
        architecture=meta[C.K_BASE_ARCH],
        model_type=meta[C.K_BASE_MODEL_TYPE],
        n_layers=n_layers,
        d_model=d_model,
        d_key=d_key,
        fingerprint=meta[C.K_BASE_FINGERPRINT],
        revision=meta.get(C.K_BASE_REVISION),
    )
    return NKVHeader(
        source=source, version=version, n_facts=n_facts, layer=layer, gamma=gamma,
        target_module=meta[C.K_TARGET_MODULE], residual_site=residual_site, base=base,
        build=json_fields[C.K_BUILD], eval=json_fields[C.K_EVAL],
        metadata=dict(meta), tensors=tensors, data_start=data_start,
    )


def residual_site_problems(site: str, major: int) -> list[str]:
    """V13: `nkv.residual_site` is a known site; "out_norm" only in a 2.x file (a 1.x reader,
    which does not know the key, would add those rows before the norm)."""
    if site not in C.RESIDUAL_SITES:
        return [f"V13: metadata {C.K_RESIDUAL_SITE!r} must be one of {list(C.RESIDUAL_SITES)}, got {site!r:.40}"]
    if site != C.DEFAULT_RESIDUAL_SITE and major < 2:
        return [f"V13: metadata {C.K_RESIDUAL_SITE!r} = {site!r} needs format {C.RESIDUAL_SITE_VERSION} or later, "
                f"the file says {major}.x"]
    return []


def _json_fields(meta: dict[str, str], problems: list[str]) -> dict[str, dict]:
    """V10: nkv.build and nkv.eval as JSON objects ({} when absent); problems appended."""
    json_fields: dict[str, dict] = {}
    for key in (C.K_BUILD, C.K_EVAL):
        json_fields[key] = {}
        if key in meta:
            try:
                value = strict_json_loads(meta[key])
                if not isinstance(value, dict):
                    raise ValueError
                json_fields[key] = value
            except (ValueError, RecursionError):
                problems.append(f"V10: metadata {key!r} must be a JSON object")
    return json_fields


def _tensor_problems(tensors: dict[str, TensorInfo], n_facts: int, d_key: int, d_model: int) -> list[str]:
    """V7: the three tensors, their dtypes and shapes; V11: the optional sketch projection;
    V12: the per-row scales that int8 rows (1.3) need, and only they; V14: the weights and
    scales that sign rows (2.2) need, and only they."""
    problems: list[str] = []
    expected = {C.T_KEYS: (n_facts, d_key), C.T_RESIDUALS: (n_facts, d_model)}
    packed = {C.T_KEYS: (n_facts, (d_key + 7) // 8), C.T_RESIDUALS: (n_facts, (d_model + 1) // 2)}
    for name, shape in expected.items():
        info = tensors.get(name)
        if info is None:
            problems.append(f"V7: tensor {name!r} is missing")
        elif info.dtype not in C.ROW_DTYPES and info.dtype not in (C.QUANT_DTYPE, C.SIGN_DTYPE):
            problems.append(f"V7: tensor {name!r} has dtype {info.dtype}, expected one of {list(C.ROW_DTYPES)}, "
                            f"{C.QUANT_DTYPE} with per-row scales or {C.SIGN_DTYPE} sign rows")
        elif info.dtype == C.SIGN_DTYPE and info.shape != packed[name]:
            problems.append(f"V7: tensor {name!r} has shape {list(info.shape)}, expected {list(packed[name])} "
                            "(sign rows, §4.4: nkv.n_facts x ceil(d_key / 8) bytes of bits, or ceil(d_model / 2) "
                            "bytes of int4 values)")
        elif info.dtype != C.SIGN_DTYPE and info.shape != shape:
            problems.append(f"V7: tensor {name!r} has shape {list(info.shape)}, expected {list(shape)} "
                            "(nkv.n_facts x nkv.base.d_key / d_model)")
    if C.T_KEYS in tensors and C.T_RESIDUALS in tensors and tensors[C.T_KEYS].dtype != tensors[C.T_RESIDUALS].dtype:
        problems.append(f"V7: {C.T_KEYS} is {tensors[C.T_KEYS].dtype} but {C.T_RESIDUALS} is "
                        f"{tensors[C.T_RESIDUALS].dtype}; they must share one dtype")
    facts = tensors.get(C.T_FACTS)
    if facts is None:
        problems.append(f"V7: tensor {C.T_FACTS!r} is missing")
    elif facts.dtype != "U8" or len(facts.shape) != 1:
        problems.append(f"V7: tensor {C.T_FACTS!r} must be U8 with shape [n_bytes], got {facts.dtype} {list(facts.shape)}")
    proj = tensors.get(C.T_SKETCH_PROJ)
    if proj is not None and not (proj.dtype == "F32" and len(proj.shape) == 2 and proj.shape[0] == d_key
                                 and 1 <= proj.shape[1] <= d_key):
        problems.append(f"V11: tensor {C.T_SKETCH_PROJ!r} must be F32 [d_key = {d_key}, d_sketch] with "
                        f"1 <= d_sketch <= d_key, got {proj.dtype} {list(proj.shape)}; drop it or refit it "
                        "(NKVAdapter.with_sketch)")
    table = tensors.get(C.T_SKETCH_KEYS)
    if table is not None and proj is None:
        problems.append(f"V11: tensor {C.T_SKETCH_KEYS!r} is present without {C.T_SKETCH_PROJ!r}: the sketches are "
                        "only meaningful under their projection; drop it")
    elif table is not None and proj is not None:
        width = proj.shape[1] + 1 if len(proj.shape) == 2 else "d_sketch + 1"
        if not (table.dtype == "F32" and list(table.shape) == [n_facts, width]):
            problems.append(f"V11: tensor {C.T_SKETCH_KEYS!r} must be F32 [n_facts = {n_facts}, d_sketch + 1 = {width}], "
                            f"got {table.dtype} {list(table.shape)}; drop it or write the file again")
    # (rows, per-row tensor, the row dtypes it goes with, rule)
    for rows_name, scale_name, dtypes, rule in ((C.T_KEYS, C.T_KEYS_SCALE, (C.QUANT_DTYPE,), "V12"),
                                                (C.T_RESIDUALS, C.T_RESIDUALS_SCALE, (C.QUANT_DTYPE, C.SIGN_DTYPE), "V12"),
                                                (C.T_KEYS, C.T_KEYS_WEIGHT, (C.SIGN_DTYPE,), "V14")):
        rows, scale = tensors.get(rows_name), tensors.get(scale_name)
        if rows is None:
            continue
        if rows.dtype == C.SIGN_DTYPE and rule == "V12":
            rule = "V14"
        if rows.dtype in dtypes and scale is None:
            problems.append(f"{rule}: tensor {rows_name!r} is {rows.dtype} but {scale_name!r} is missing; "
                            "its rows are read only with their per-row F32 values")
        elif rows.dtype in dtypes and (scale.dtype != "F32" or scale.shape != (n_facts,)):
            problems.append(f"{rule}: tensor {scale_name!r} must be F32 [n_facts = {n_facts}], got "
                            f"{scale.dtype} {list(scale.shape)}")
        elif rows.dtype not in dtypes and scale is not None:
            problems.append(f"{rule}: tensor {scale_name!r} goes with {' or '.join(dtypes)} rows only, but "
                            f"{rows_name!r} is {rows.dtype}; drop it (an older reader would ignore it and read "
                            "other values)")
    return problems


def _version_major(version: str) -> int | None:
    parts = version.split(".")
    # isascii: str.isdigit() is also true for "²", which int() refuses
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) < 6 for p in parts):
        return None
    return int(parts[0])


_INT_RE = re.compile(r"0|[1-9][0-9]*")
_NUMBER_RE = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:40]!r}")
        out[key] = value
    return out


def strict_json_loads(text: str) -> Any:
    """RFC 8259 JSON as the Rust safetensors reader sees it: no NaN/Infinity, no duplicate
    keys, no lone surrogate escapes. Python's json accepts all three; other readers do not,
    and two readers must never see different content in one file.

    Raises ValueError (or RecursionError for absurd nesting).
    """
    doc = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    if "\\u" not in text:  # a str holds no surrogate: only a \u escape can make one
        return doc
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate \\u escape") from None
    return doc


__all__ = ["NKVHeader", "BaseModelInfo", "TensorInfo", "read_header", "parse_header", "strict_json_loads"]
