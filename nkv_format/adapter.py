"""`NKVAdapter`: the in-memory adapter, its file I/O, and row operations.

Rows are independent (keys and residuals are computed on the unedited model), so adding,
removing, replacing and merging facts are pure row operations with no re-solve. Every
operation returns a new adapter; none mutates its input.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace as dc_replace
from pathlib import Path
from typing import Any, Iterable, Literal, cast

import torch

from . import constants as C
from .atomic import atomic_file
from .codes import decode_keys, decode_residuals, encode_keys, encode_residuals, sign_problems
from .dtypes import ROW_DTYPE_NAMES as _DTYPE_NAMES, TENSOR_DTYPES as _TORCH_DTYPES
from .errors import NKVCompatibilityError, NKVConflictError, NKVFormatError
from .facts import Fact, LazyFacts, count_problems, decode_facts, encode_facts, fact_record_problems
from .fingerprint import FINGERPRINT2_PREFIX, fingerprints_match
from .gate import ROW_BLOCK, fit_sketch, key_inverse_norms, sketch_keys
from .header import BaseModelInfo, NKVHeader, parse_header, read_header
from .quant import dequantize_rows, int8_problems, quantize_rows


ConflictPolicy = Literal["error", "ours", "theirs"]
Storage = Literal["exact", "int8", "sign"]


@dataclass
class NKVAdapter:
    """A NeuralDB edit database for one base model and one layer.

    Attributes:
        keys: K1, (n_facts, d_key); row i is fact i's key.
        residuals: R1, (n_facts, d_model); row i is added when row i's key wins the gate.
        facts: n_facts records, in row order.
        layer: index of the transformer block whose FFN output projection is gated.
        gamma: cosine threshold; the gate fires when cos > gamma.
        base: identity and fingerprint of the checkpoint the rows were computed on.
        target_module: the module path at `layer`, e.g. "model.layers.7.mlp.down_proj".
        residual_site: where a firing row is added (spec §5): "output" (the output
            projection's output) or "out_norm" (the output of the norm the block applies to
            the FFN's output, in Gemma 2/3 and OLMo 2/3; format 2.0).
        build: build provenance (tool version, hyperparameters, seed); informative only.
        eval: evaluation results, if any; informative only.
        sketch_proj: optional (d_key, d_sketch) float32 projection fitted to the keys, for
            the gate's sketch path (spec §5.1); None when the file has none.
        storage: how `save` writes K1/R1: "exact" (in their dtype) or "int8" (I8 with one
            float32 scale per row, format 1.3, spec §4.3; about half the bytes of F16).
            In memory the rows are always floats: an int8 file loads dequantized to
            float32 with storage "int8", and row operations keep the storage, so editing
            an int8 adapter writes int8 again (its untouched rows to the same bytes).
            "sign" (format 2.2, spec §4.4): K1 as the signs of the rotated keys with one
            score weight per row, R1 as rotated int4 with one scale per row; about 1/9 of
            the bytes of F16. A sign file loads as the rows a reader returns (unit keys) and
            `code_scales`; save writes the same bytes again.
        code_scales: with storage "sign", (n_facts, 2) float32: each row's score weight w
            (the gate multiplies its cosine with the key by w, spec §4.4) and its residual's
            int4 scale, as read from the file; NaN for rows added as floats since, which
            score exactly (w = 1) until saved. None otherwise.
    """

    keys: torch.Tensor
    residuals: torch.Tensor
    facts: list[Fact] | LazyFacts
    layer: int
    gamma: float
    base: BaseModelInfo
    target_module: str
    residual_site: str = C.DEFAULT_RESIDUAL_SITE
    build: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    sketch_proj: torch.Tensor | None = None
    storage: Storage = "exact"
    code_scales: torch.Tensor | None = None

    # ---------------------------------------------------------------- basic views
    @property
    def n_facts(self) -> int:
        return len(self.facts)

    @property
    def ids(self) -> list[str]:
        return [f.id for f in self.facts]

    def index_of(self, fact_id: str) -> int:
        for i, f in enumerate(self.facts):
            if f.id == fact_id:
                return i
        raise KeyError(fact_id)

    def __repr__(self) -> str:
        return (f"NKVAdapter(n_facts={self.n_facts}, layer={self.layer}, gamma={self.gamma}, "
                f"base={self.base.name!r}, dtype={_DTYPE_NAMES.get(self.keys.dtype, self.keys.dtype)}"
                + (f", storage={self.storage!r})" if self.storage != "exact" else ")"))

    # ---------------------------------------------------------------- validation
    def problems(self, check_facts: bool = True) -> list[str]:
        """Every way this adapter breaks the spec (V6-V9), without raising. `check_facts=False`
        skips the fact records (V9), for records `decode_facts` has just checked."""
        out: list[str] = []
        n, b = self.n_facts, self.base
        if self.keys.dtype not in _DTYPE_NAMES or self.residuals.dtype not in _DTYPE_NAMES:
            out.append(f"V7: keys/residuals dtype must be one of {list(_DTYPE_NAMES)}, got "
                       f"{self.keys.dtype}/{self.residuals.dtype}")
        elif self.keys.dtype != self.residuals.dtype:
            out.append(f"V7: keys are {self.keys.dtype} but residuals are {self.residuals.dtype}")
        if tuple(self.keys.shape) != (n, b.d_key):
            out.append(f"V7: {C.T_KEYS} has shape {list(self.keys.shape)}, expected [{n}, {b.d_key}]")
        if tuple(self.residuals.shape) != (n, b.d_model):
            out.append(f"V7: {C.T_RESIDUALS} has shape {list(self.residuals.shape)}, expected [{n}, {b.d_model}]")
        if not out:
            for name, t in ((C.T_KEYS, self.keys), (C.T_RESIDUALS, self.residuals)):
                if t.numel() and not all_finite(t):
                    bad = int((~torch.isfinite(t)).any(-1).nonzero()[0, 0])
                    out.append(f"V8: {name} holds NaN/Inf values (first in row {bad}, fact "
                               f"{self.facts[bad].id!r}); rebuild that fact")
        p = self.sketch_proj
        if p is not None and not (p.dtype == torch.float32 and p.dim() == 2 and p.shape[0] == b.d_key
                                  and 1 <= p.shape[1] <= b.d_key and bool(torch.isfinite(p).all())):
            out.append(f"V11: {C.T_SKETCH_PROJ} must be finite float32 [{b.d_key}, d_sketch] with 1 <= d_sketch "
                       f"<= {b.d_key}, got {p.dtype} {list(p.shape)}; refit it with with_sketch()")
        if self.residual_site not in C.RESIDUAL_SITES:
            out.append(f"V13: residual_site must be one of {list(C.RESIDUAL_SITES)}, got {self.residual_site!r}")
        if self.storage not in C.STORAGES:
            out.append(f"storage must be one of {list(C.STORAGES)}, got {self.storage!r}")
        out.extend(self._code_problems())
        if not 0 <= self.layer < b.n_layers:
            out.append(f"V6: layer {self.layer} outside the base model's {b.n_layers} layers")
        if not 0.0 <= self.gamma <= 1.0:
            out.append(f"V6: gamma must be in [0, 1], got {self.gamma}")
        for key, value in ((C.K_BUILD, self.build), (C.K_EVAL, self.eval)):
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError, RecursionError) as exc:
                out.append(f"V10: {key} must be a JSON object of JSON values ({str(exc)[:80]})")
        seen: set[str] = set()
        for row, fact in enumerate(self.facts if check_facts else ()):
            out.extend(fact_record_problems(fact.to_record(), f"V9: fact row {row}"))
            if fact.id in seen:
                out.append(f"V9: duplicate fact id {fact.id!r} at row {row}")
            seen.add(fact.id)
        return out

    def _code_problems(self) -> list[str]:
        cs = self.code_scales
        if cs is None:
            return []
        if not (cs.dtype == torch.float32 and tuple(cs.shape) == (self.n_facts, 2)):
            return [f"code_scales must be float32 [{self.n_facts}, 2], got {cs.dtype} {list(cs.shape)}"]
        if self.storage != "sign" and bool((~torch.isnan(cs[:, 0])).any()):
            return [f"storage {self.storage!r} cannot hold rows read from 1-bit keys: their score weights "
                    "(spec §4.4) have no place there, and without them the gate would score those rows lower; "
                    "keep storage 'sign', or build the facts again for exact rows"]
        return []

    def score_weights(self) -> torch.Tensor | None:
        """(n_facts,) float32 the gate multiplies each row's cosine by (spec §4.4): the stored
        weights of sign rows, 1 for every other row; None when every row is exact."""
        cs = self.code_scales
        if cs is None or bool(torch.isnan(cs[:, 0]).all()):
            return None
        return torch.where(torch.isnan(cs[:, 0]), 1.0, cs[:, 0])

    def score_inverse_norms(self) -> torch.Tensor:
        """(n_facts,) float32 what loaders give the gated op as the keys' inverse norms (§5):
        1 / ||K1_i||, times the row's score weight for sign rows (§4.4)."""
        inv = key_inverse_norms(self.keys)
        weights = self.score_weights()
        return inv if weights is None else inv * weights.to(inv.device)

    def validate(self, source: str = "<adapter>") -> None:
        """Raise one NKVFormatError listing every problem, or return None."""
        problems = self.problems()
        if problems:
            raise NKVFormatError(source, problems)

    # ---------------------------------------------------------------- file I/O
    def metadata(self) -> dict[str, str]:
        """The safetensors `__metadata__` for this adapter (all strings)."""
        b = self.base
        meta = {
            C.K_FORMAT: C.FORMAT_MARKER,
            C.K_VERSION: _version_for(self),
            C.K_N_FACTS: str(self.n_facts),
            C.K_LAYER: str(self.layer),
            C.K_GAMMA: repr(float(self.gamma)),
            C.K_BASE_NAME: b.name,
            C.K_BASE_ARCH: b.architecture,
            C.K_BASE_MODEL_TYPE: b.model_type,
            C.K_BASE_N_LAYERS: str(b.n_layers),
            C.K_BASE_D_MODEL: str(b.d_model),
            C.K_BASE_D_KEY: str(b.d_key),
            C.K_BASE_FINGERPRINT: b.fingerprint,
            C.K_TARGET_MODULE: self.target_module,
        }
        if b.revision:
            meta[C.K_BASE_REVISION] = b.revision
        if self.residual_site != C.DEFAULT_RESIDUAL_SITE:  # 1.x files stay byte for byte as before
            meta[C.K_RESIDUAL_SITE] = self.residual_site
        if self.build:
            meta[C.K_BUILD] = json.dumps(self.build, sort_keys=True)
        if self.eval:
            meta[C.K_EVAL] = json.dumps(self.eval, sort_keys=True)
        return meta

    def _encode(self, source: str, storage: Storage | None = None) -> tuple[bytes, list[tuple[str, memoryview]]]:
        """Validate, then return (length field + header, [(tensor, data bytes)]) in file order.

        The bytes are canonical (spec §2): the safetensors library writes metadata in
        hash order, so it cannot give byte-identical files for identical adapters.
        """
        if storage is not None and storage != self.storage:
            return dc_replace(self, storage=storage)._encode(source)
        self.validate(source)
        records = encode_facts(self.facts)
        scales: list[tuple[str, str, list[int], memoryview]] = []
        if self.storage == "sign":
            given = self.code_scales
            kb, kw = encode_keys(self.keys, None if given is None else given[:, 0])
            rq, rs = encode_residuals(self.residuals, None if given is None else given[:, 1])
            rows = [(C.T_KEYS, C.SIGN_DTYPE, list(kb.shape), _raw_bytes(kb)),
                    (C.T_RESIDUALS, C.SIGN_DTYPE, list(rq.shape), _raw_bytes(rq))]
            scales = [(C.T_RESIDUALS_SCALE, "F32", [self.n_facts], _raw_bytes(rs)),
                      (C.T_KEYS_WEIGHT, "F32", [self.n_facts], _raw_bytes(kw))]
        elif self.storage == "int8":
            kq, ks, problems = quantize_rows(self.keys, C.T_KEYS)
            rq, rs, more = quantize_rows(self.residuals, C.T_RESIDUALS)
            if problems or more:
                raise NKVFormatError(source, problems + more)
            rows = [(C.T_KEYS, C.QUANT_DTYPE, list(kq.shape), _raw_bytes(kq)),
                    (C.T_RESIDUALS, C.QUANT_DTYPE, list(rq.shape), _raw_bytes(rq))]
            scales = [(C.T_KEYS_SCALE, "F32", [self.n_facts], _raw_bytes(ks)),
                      (C.T_RESIDUALS_SCALE, "F32", [self.n_facts], _raw_bytes(rs))]
        else:
            rows = [(C.T_KEYS, _DTYPE_NAMES[self.keys.dtype], list(self.keys.shape), _raw_bytes(self.keys)),
                    (C.T_RESIDUALS, _DTYPE_NAMES[self.residuals.dtype], list(self.residuals.shape),
                     _raw_bytes(self.residuals))]
        parts = [*rows, (C.T_FACTS, "U8", [len(records)], memoryview(records))]
        if self.sketch_proj is not None:
            parts.append((C.T_SKETCH_PROJ, "F32", list(self.sketch_proj.shape), _raw_bytes(self.sketch_proj)))
            if self.n_facts >= C.SKETCH_MIN_FACTS:  # where loaders take the sketch path: save them the product
                if self.storage == "int8":
                    table = _sketches_of_int8(kq, ks, self.sketch_proj)
                elif self.storage == "sign":
                    table = _sketches_of_sign(kb, kw, self.sketch_proj, self.base.d_key)
                else:
                    table = self.key_sketches(self.sketch_proj)
                parts.append((C.T_SKETCH_KEYS, "F32", list(table.shape), _raw_bytes(table)))
        parts += scales  # the optional tensors in the order of spec §4.2, §4.3, §4.4
        doc: dict[str, Any] = {"__metadata__": dict(sorted(self.metadata().items()))}
        offset = 0
        for name, dtype, shape, data in parts:
            doc[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + data.nbytes]}
            offset += data.nbytes
        text = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)  # pad so tensor data starts 8-byte aligned
        head = struct.pack("<Q", len(text)) + text
        parse_header(head, len(head) + offset, source)  # never write what the reader refuses
        return head, [(name, data) for name, _, _, data in parts]

    def to_bytes(self, storage: Storage | None = None) -> bytes:
        """The canonical .nkv file as bytes (what `save` writes; `from_bytes` reads it)."""
        head, parts = self._encode("<bytes>", storage)
        return head + b"".join(data for _, data in parts)

    def save(self, path: str | os.PathLike, storage: Storage | None = None) -> Path:
        """Validate, then write atomically: a temp file in the same folder, fsync, rename.

        An interrupted save (crash, Ctrl-C, full disk) leaves any existing file at
        `path` untouched and no partial file behind.

        Args:
            storage: "exact" writes K1/R1 in their dtype; "int8" writes I8 rows with one
                float32 scale per row (format 1.3, spec §4.3), which readers before 1.3
                refuse (V7); "sign" writes 1-bit keys with per-row score weights and int4
                residuals (format 2.2, spec §4.4), which readers before 2.2 refuse (V7).
                Default: this adapter's `storage`.

        >>> NKVAdapter.load("edits.nkv").save("edits-int8.nkv", storage="int8")
        """
        path = Path(path)
        head, parts = self._encode(str(path), storage)
        with atomic_file(path) as fh:
            _write_parts(fh, head, parts)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", *,
             lazy_facts: bool = False) -> "NKVAdapter":
        """Read and fully validate an .nkv file. Never unpickles.

        `lazy_facts`: check only the records' count now and parse them (V9) when `facts` is
        first read, as a serving loader may (spec §7): they do not change what the model computes.

        Raises:
            NKVFormatError / NKVVersionError naming the file and every problem.

        >>> adapter = NKVAdapter.load("spec/examples/golden.nkv")
        >>> adapter.n_facts
        2
        """
        header = read_header(path)
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device=str(device)) as fh:
                tensors = {name: fh.get_tensor(name) for name in _known_tensors(header)}
        except Exception as exc:  # the Rust reader's errors: we already validated, so this is I/O
            raise NKVFormatError(header.source, [f"cannot read tensor data: {exc}"]) from None
        return cls._from_parts(header, tensors, lazy_facts)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray, source: str = "<bytes>", *, lazy_facts: bool = False,
                   share: bool = False) -> "NKVAdapter":
        """Parse a whole .nkv file held in memory (used for downloads, vLLM ranks and fuzzing);
        `lazy_facts` as in `load`. The tensors get their own copy of their bytes, unless `share`:
        then `data` must be a bytearray the caller hands over, and the tensors are views of it
        (a 1M-fact file: 4.9 GB not copied again; the copy took 7.7 s here, most of it page faults)."""
        if share and not isinstance(data, bytearray):
            raise TypeError("from_bytes(share=True) needs a bytearray: the tensors become writable views of it")
        header = parse_header(data[: 8 + C.MAX_HEADER_BYTES], len(data), source)
        tensors = {}
        view = memoryview(data)  # slices of a view are not copies
        for name in _known_tensors(header):
            info = header.tensors[name]
            begin, end = (header.data_start + o for o in info.data_offsets)
            dtype = _TORCH_DTYPES[info.dtype]
            if end == begin:
                flat = torch.zeros(0, dtype=dtype)
            elif share and begin % dtype.itemsize == 0:  # aligned to its dtype: used where it lies
                flat = torch.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin)
            else:
                flat = torch.frombuffer(bytearray(view[begin:end]), dtype=dtype)
            tensors[name] = flat.reshape(info.shape)
        return cls._from_parts(header, tensors, lazy_facts)

    @classmethod
    def _from_parts(cls, header: NKVHeader, tensors: dict[str, torch.Tensor],
                    lazy_facts: bool = False) -> "NKVAdapter":
        records = tensors[C.T_FACTS].numpy().tobytes()
        facts: list[Fact] | LazyFacts
        if lazy_facts and not count_problems(records, header.n_facts):
            facts, problems = LazyFacts(records, header.n_facts, header.source), []
        else:  # a wrong count takes the full check, which names every problem
            facts, problems = decode_facts(records, header.n_facts, header.source)
        keys, residuals = tensors[C.T_KEYS], tensors[C.T_RESIDUALS]
        if header.storage == "int8":  # V12 on the data, then the float rows every loader uses
            problems += int8_problems(C.T_KEYS, keys, tensors[C.T_KEYS_SCALE])
            problems += int8_problems(C.T_RESIDUALS, residuals, tensors[C.T_RESIDUALS_SCALE])
            if problems:
                raise NKVFormatError(header.source, problems)
            keys = dequantize_rows(keys, tensors[C.T_KEYS_SCALE])
            residuals = dequantize_rows(residuals, tensors[C.T_RESIDUALS_SCALE])
        code_scales = None
        if header.storage == "sign":  # V14 on the data, then the rows a reader returns
            b = header.base
            weights, res_scales = tensors[C.T_KEYS_WEIGHT], tensors[C.T_RESIDUALS_SCALE]
            problems += sign_problems(header.n_facts, b.d_key, b.d_model, keys, weights, residuals, res_scales)
            if problems:
                raise NKVFormatError(header.source, problems)
            keys = decode_keys(keys, weights, b.d_key)
            residuals = decode_residuals(residuals, res_scales, b.d_model)
            code_scales = torch.stack([weights.float(), res_scales.float()], dim=-1)
        adapter = cls(
            keys=keys, residuals=residuals, facts=facts if not problems else [],
            layer=header.layer, gamma=header.gamma, base=header.base,
            target_module=header.target_module, residual_site=header.residual_site,
            build=header.build, eval=header.eval,
            sketch_proj=tensors.get(C.T_SKETCH_PROJ), storage=cast(Storage, header.storage),
            code_scales=code_scales,
        )
        if not problems:
            problems = adapter.problems(check_facts=False)  # decode_facts checked (or LazyFacts will check) V9
        table = tensors.get(C.T_SKETCH_KEYS)
        if not problems and table is not None and adapter.sketch_proj is not None:  # alone: refused with the header
            problems = _sketch_table_problems(adapter, table)
            adapter._file_sketches = (adapter.keys, adapter.sketch_proj, table)
        if problems:
            raise NKVFormatError(header.source, problems)
        return adapter

    # ---------------------------------------------------------------- row operations
    def _with_rows(self, facts: list[Fact], keys: torch.Tensor, residuals: torch.Tensor,
                   picked: torch.Tensor | None = None, code_scales: torch.Tensor | None = None) -> "NKVAdapter":
        """`picked`: when the rows are this adapter's rows `picked` (select, remove), the
        file's stored key sketches and the rows' code scales follow them, so saving a 1M-row
        result needs no new product. Otherwise `code_scales` are the new rows' (spec §4.4)."""
        if picked is not None and self.code_scales is not None:
            code_scales = self.code_scales.index_select(0, picked)
        # The build's self-check measured the rows it built; once rows change it describes
        # another adapter, so it is dropped (nkv eval measures the new one).
        build = {k: v for k, v in self.build.items() if k != "self_check"} if isinstance(self.build, dict) else self.build
        out = dc_replace(self, facts=list(facts), keys=keys, residuals=residuals, build=build, code_scales=code_scales)
        cached = getattr(self, "_file_sketches", None)
        if picked is not None and cached is not None and cached[0] is self.keys and cached[1] is self.sketch_proj:
            out._file_sketches = (out.keys, out.sketch_proj, cached[2].index_select(0, picked))
        return out

    def positions(self) -> dict[str, int]:
        """fact id -> row, built in one pass (row operations look ids up here, never by scan)."""
        return {f.id: r for r, f in enumerate(self.facts)}

    def solved_without_partners(self) -> list[str]:
        """Ids of facts built jointly with facts no longer here (spec §9, `provenance.solved_with`):
        their shared residual still carries the missing facts' edits until they are built again."""
        here = self.positions()
        return [f.id for f in self.facts
                if any(p not in here for p in f.provenance.get("solved_with", ()))]

    def subjects_built_apart(self, other: "NKVAdapter", on_conflict: ConflictPolicy = "error",
                             changed: Iterable[str] | None = None) -> list[str]:
        """Subjects whose rows in `self.merge(other, on_conflict)` come from both adapters: some
        row only this one had (or kept under "ours"), some only `other` had (or taken under
        "theirs"); rows both hold alike count for neither. Those rows were built apart: where the
        gate cannot tell a subject's facts apart, one residual wins and the other edits are lost
        until they are built together (spec §9, `nkv merge --model`). In this adapter's order.
        `changed`: `self.diff(other).changed` when the caller has it (a diff reads every shared row)."""
        theirs = other.positions()
        if on_conflict == "error":  # merge refuses changed ids: every shared id is the same row
            changed = ()
        changed = set(self.diff(other).changed if changed is None else changed)
        from_self = {f.subject for f in self.facts
                     if f.id not in theirs or (f.id in changed and on_conflict == "ours")}
        here = self.positions()
        from_other = {f.subject for f in other.facts
                      if f.id not in here or (f.id in changed and on_conflict == "theirs")}
        both = from_self & from_other
        return list(dict.fromkeys(f.subject for f in self.facts if f.subject in both))

    def select(self, ids: Iterable[str]) -> "NKVAdapter":
        """A new adapter with only the facts `ids`, in the given order (KeyError for an unknown id)."""
        position = self.positions()
        rows = [position[i] for i in ids]
        idx = torch.tensor(rows, dtype=torch.long)
        return self._with_rows([self.facts[r] for r in rows], self.keys[idx], self.residuals[idx], idx)

    def add(
        self,
        facts: list[Fact],
        keys: torch.Tensor,
        residuals: torch.Tensor,
        on_conflict: ConflictPolicy = "error",
        code_scales: torch.Tensor | None = None,
    ) -> "NKVAdapter":
        """Append rows. A fact whose id is already present with a different record or
        different rows is a conflict: "error" raises, "ours" keeps the existing row,
        "theirs" replaces it in place. An exact duplicate (same record, same rows) is
        skipped under every policy, so merging an adapter with a copy of itself is a no-op.
        A new id that edits a question (subject and prompt, or subject and named relation:
        `Fact.questions`) a row here already edits is a conflict too: "ours" skips it,
        "theirs" puts it in that row's place.

        O(n + m) for n rows here and m new ones: ids are looked up in a dict and the rows
        of the ids present in both are compared in one vectorised pass.

        `code_scales` (m, 2): the new rows' score weights and residual scales when they were
        read from sign storage (another adapter's `code_scales`, spec §4.4); only an adapter
        with storage "sign" takes such rows. None: the rows are floats (added exactly).
        """
        if keys.shape != (len(facts), self.base.d_key) or residuals.shape != (len(facts), self.base.d_model):
            raise NKVCompatibilityError(
                f"add: expected keys [{len(facts)}, {self.base.d_key}] and residuals "
                f"[{len(facts)}, {self.base.d_model}], got {list(keys.shape)} and {list(residuals.shape)}")
        counts = Counter(f.id for f in facts)
        dup_in_new = [i for i, c in counts.items() if c > 1]
        if dup_in_new:
            raise NKVConflictError(f"add: fact ids repeated in the new rows: {sorted(dup_in_new)[:5]}")
        questions = Counter(q for f in facts for q in f.questions)
        asked_twice = [f"{q[2]!r} about {q[1]!r}" for q, c in questions.items() if c > 1]
        if asked_twice:
            raise NKVConflictError(f"add: the new rows edit {len(asked_twice)} question(s) twice (same subject and "
                                   f"prompt or named relation), e.g. {asked_twice[:2]}; the model can give one "
                                   "answer: keep one")
        coded = code_scales is not None and bool((~torch.isnan(code_scales[:, 0])).any())
        if coded and self.storage != "sign":
            raise NKVCompatibilityError(
                f"add: the new rows were read from 1-bit keys (storage 'sign', spec §4.4), and this adapter's "
                f"storage is {self.storage!r}, which cannot hold their score weights; add them to a sign adapter "
                "(`nkv quantize --storage sign` this one first), or build the facts again")
        position = self.positions()
        keys = keys.to(self.keys.dtype)
        residuals = residuals.to(self.residuals.dtype)
        my_codes, new_codes = _code_rows(self.code_scales, self.n_facts), _code_rows(code_scales, len(facts))
        shared = [r for r, f in enumerate(facts) if f.id in position]  # rows of `facts` already present
        mine = [position[facts[r].id] for r in shared]  # their rows here
        same = _same_rows(self.keys, self.residuals, mine, keys, residuals, shared,
                          (my_codes, new_codes))  # (len(shared),) bool
        clashes = [facts[r].id for r, ok in zip(shared, same) if not (ok and self.facts[position[facts[r].id]] == facts[r])]
        if clashes and on_conflict == "error":
            raise NKVConflictError(
                f"add: {len(clashes)} fact id(s) already in the adapter, e.g. {clashes[:3]}; "
                "use replace, or on_conflict='ours'/'theirs' (CLI: --on-conflict)")
        out_facts = list(self.facts)
        out_keys, out_res, out_codes = self.keys, self.residuals, my_codes
        if on_conflict == "theirs" and shared:
            # overwriting an exact duplicate changes nothing, so every shared row is copied
            dst, src = torch.tensor(mine, dtype=torch.long), torch.tensor(shared, dtype=torch.long)
            out_keys, out_res, out_codes = self.keys.clone(), self.residuals.clone(), my_codes.clone()
            out_keys[dst] = keys[src]
            out_res[dst] = residuals[src]
            out_codes[dst] = new_codes[src]
            for p, r in zip(mine, shared):
                out_facts[p] = facts[r]
        append = [r for r, f in enumerate(facts) if f.id not in position]
        asked = {q: p for p, f in enumerate(out_facts) for q in f.questions}
        answered = [(r, p) for r in append  # (new, existing)
                    for p in [next((asked[q] for q in facts[r].questions if q in asked), None)] if p is not None]
        if answered and on_conflict == "error":
            r, p = answered[0]
            raise NKVConflictError(
                f"add: {len(answered)} new fact(s) edit a question a fact here already edits, e.g. {facts[r].id!r} "
                f"and {out_facts[p].id!r} ({facts[r].prompt!r} about {facts[r].subject!r}"
                + (f", relation {facts[r].relation!r}" if facts[r].relation else "") + "); the model can give "
                "one answer: remove the old fact first, or on_conflict='ours'/'theirs' (CLI: --on-conflict)")
        if answered:
            taken = {r for r, _ in answered}
            append = [r for r in append if r not in taken]
            if on_conflict == "theirs":  # the new fact takes the old one's row
                dst, src = torch.tensor([p for _, p in answered]), torch.tensor([r for r, _ in answered])
                out_keys, out_res, out_codes = out_keys.clone(), out_res.clone(), out_codes.clone()
                out_keys[dst], out_res[dst], out_codes[dst] = keys[src], residuals[src], new_codes[src]
                for r, p in answered:
                    out_facts[p] = facts[r]
        idx = torch.tensor(append, dtype=torch.long)
        return self._with_rows(
            out_facts + [facts[r] for r in append],
            torch.cat([out_keys, keys[idx]]),
            torch.cat([out_res, residuals[idx]]),
            code_scales=_kept_codes(torch.cat([out_codes, new_codes[idx]]), self.storage),
        )

    def replace(self, facts: list[Fact], keys: torch.Tensor, residuals: torch.Tensor) -> "NKVAdapter":
        """Overwrite existing facts (matched by id) with new rows; every id must exist."""
        position = self.positions()
        missing = [f.id for f in facts if f.id not in position]
        if missing:
            raise NKVConflictError(f"replace: fact id(s) not in the adapter: {missing[:5]}; use add for new facts")
        return self.add(facts, keys, residuals, on_conflict="theirs")

    def remove(
        self, ids: Iterable[str] = (), subjects: Iterable[str] = (), missing_ok: bool = False
    ) -> "NKVAdapter":
        """Drop facts by id and/or by subject (exact match). Unknown ids raise unless missing_ok."""
        ids, subjects = set(ids), set(subjects)
        unknown = ids - self.positions().keys()
        unknown_subjects = subjects - {f.subject for f in self.facts}
        if (unknown or unknown_subjects) and not missing_ok:
            what = [f"id {i!r}" for i in sorted(unknown)[:5]] + [f"subject {s!r}" for s in sorted(unknown_subjects)[:5]]
            raise NKVConflictError(f"remove: no fact with {', '.join(what)}; "
                                   "list facts with `nkv inspect --facts`")
        keep = [r for r, f in enumerate(self.facts) if f.id not in ids and f.subject not in subjects]
        idx = torch.tensor(keep, dtype=torch.long)
        kept = self._with_rows([self.facts[r] for r in keep], self.keys[idx], self.residuals[idx], idx)
        stale = kept.solved_without_partners()
        if stale and len(stale) > len(self.solved_without_partners()):
            warnings.warn(f"remove: {stale[:5]} were solved together with a removed fact and still carry its edit; "
                          "build them again (nkv.editing.solve.rebuild_facts, or `nkv rm --model`)", stacklevel=2)
        return kept

    def check_compatible(self, other: "NKVAdapter", what: str = "merge") -> None:
        """Raise NKVCompatibilityError unless `other` targets the same model and layer."""
        a, b = self.base, other.base
        problems = []
        for name in ("model_type", "n_layers", "d_model", "d_key"):
            if getattr(a, name) != getattr(b, name):
                problems.append(f"base {name}: {getattr(a, name)!r} vs {getattr(b, name)!r}")
        if not problems and not fingerprints_match(a.fingerprint, b.fingerprint):
            problems.append("base fingerprint differs (built on different checkpoints)")
        if self.layer != other.layer:
            problems.append(f"layer: {self.layer} vs {other.layer}")
        if self.residual_site != other.residual_site:  # rows meant for different places in the block
            problems.append(f"residual site: {self.residual_site!r} vs {other.residual_site!r}")
        if problems:
            raise NKVCompatibilityError(f"{what}: adapters do not belong to the same model and layer: "
                                        + "; ".join(problems) + ". Rebuild one of them on the other's base/layer.")

    def merge(self, other: "NKVAdapter", on_conflict: ConflictPolicy = "error",
              gamma: float | None = None) -> "NKVAdapter":
        """Union of two adapters built on the same base model and layer.

        A fact id present in both is a conflict: "error" (default) raises and lists them,
        "ours" keeps this adapter's row, "theirs" takes `other`'s. When the two gammas
        differ, pass `gamma` explicitly. Rows keep this adapter's order, then `other`'s.
        """
        self.check_compatible(other)
        if gamma is None:
            if self.gamma != other.gamma:
                raise NKVCompatibilityError(
                    f"merge: gamma differs ({self.gamma} vs {other.gamma}); choose one (CLI: --gamma)")
            gamma = self.gamma
        merged = self.add(other.facts, other.keys, other.residuals, on_conflict=on_conflict,
                          code_scales=other.code_scales)
        return dc_replace(merged, gamma=gamma, eval={})

    def diff(self, other: "NKVAdapter") -> "AdapterDiff":
        """Facts added, removed and changed going from this adapter to `other` (by id).

        A fact is changed when its record or its K1/R1 rows differ (compared in float32).
        `settings` maps each differing setting to (ours, theirs); the base fingerprint
        counts as differing only when it does not match within tolerance.
        """
        mine, theirs = self.positions(), other.positions()
        common = [fid for fid in mine if fid in theirs]  # in this adapter's row order
        a_rows, b_rows = [mine[i] for i in common], [theirs[i] for i in common]
        if self.keys.shape[1:] == other.keys.shape[1:]:
            same = _same_rows(self.keys, self.residuals, a_rows, other.keys, other.residuals, b_rows,
                              (_code_rows(self.code_scales, self.n_facts), _code_rows(other.code_scales, other.n_facts)))
        else:
            same = [False] * len(common)
        changed = [fid for fid, a, b, ok in zip(common, a_rows, b_rows, same)
                   if not ok or self.facts[a] != other.facts[b]]
        return AdapterDiff(
            added=[f.id for f in other.facts if f.id not in mine],
            removed=[f.id for f in self.facts if f.id not in theirs],
            changed=changed,
            settings={k: (v1, v2) for k, v1, v2 in (
                ("layer", self.layer, other.layer), ("gamma", self.gamma, other.gamma),
                ("base.name", self.base.name, other.base.name),
                ("base.revision", self.base.revision, other.base.revision),
                ("target_module", self.target_module, other.target_module),
                ("residual_site", self.residual_site, other.residual_site),
                ("dtype", _DTYPE_NAMES.get(self.keys.dtype), _DTYPE_NAMES.get(other.keys.dtype)),
                ("storage", self.storage, other.storage),
                ("sketch", _sketch_dim(self), _sketch_dim(other)),
            ) if v1 != v2} | ({} if fingerprints_match(self.base.fingerprint, other.base.fingerprint)
                               else {"base.fingerprint": (self.base.fingerprint, other.base.fingerprint)}),
        )

    def sketch_projection(self, dim: int | None = None) -> torch.Tensor:
        """The (d_key, d_sketch) float32 projection the gate's sketch path uses (spec §5.1): the
        file's `nkv.sketch.proj` when it has `dim` columns (any number when dim is None), else
        one fitted to the keys with `dim` (default DEFAULT_SKETCH_DIM) columns."""
        stored = self.sketch_proj
        if stored is not None and (dim is None or stored.shape[1] == dim):
            return stored
        return fit_sketch(self.keys, C.DEFAULT_SKETCH_DIM if dim is None else dim)

    def key_sketches(self, proj: torch.Tensor, inverse_norms: torch.Tensor | None = None) -> torch.Tensor:
        """(n_facts, d_sketch + 1) float32 sketches of the keys under `proj` (gate.sketch_keys),
        each sign row's times its score weight (spec §4.4; `inverse_norms`: `score_inverse_norms()`
        when the caller has them):
        the file's `nkv.sketch.keys` when this adapter was loaded with them and is still those
        keys and that projection (attaching 1M facts skips a 5 s product), else computed.
        `select` and `remove` carry them to their rows; any other row operation or
        `dataclasses.replace` makes a new adapter, which computes them."""
        cached = getattr(self, "_file_sketches", None)
        if cached is not None and cached[0] is self.keys and cached[1] is proj is self.sketch_proj:
            return cached[2]
        return _weighted_sketches(self.keys, proj, self.score_weights(), inverse_norms)

    def with_gamma(self, gamma: float) -> "NKVAdapter":
        """Same rows with threshold `gamma` (a serving override, checked by the caller); the
        rows and projection are the same objects, so the file's stored sketches still apply."""
        out = dc_replace(self, gamma=gamma)
        if hasattr(self, "_file_sketches"):
            out._file_sketches = self._file_sketches
        return out

    def with_sketch(self, dim: int = C.DEFAULT_SKETCH_DIM) -> "NKVAdapter":
        """Same adapter with a sketch projection fitted to its keys (spec §5.1); dim 0 drops it.

        Row operations keep the projection: it stays valid (the sketch path rescoring is
        exact), and a refit after large changes only tunes the shortlist.

        >>> NKVAdapter.load("big.nkv").with_sketch(64).save("big.nkv")
        """
        if dim == 0 or self.n_facts == 0:
            return dc_replace(self, sketch_proj=None)
        return dc_replace(self, sketch_proj=fit_sketch(self.keys, dim))

    def sketched_at_scale(self) -> "NKVAdapter":
        """This adapter with a sketch projection fitted to its keys when it has SKETCH_MIN_FACTS
        facts or more and stores none, else itself: the form the CLI writes. Loaders take the
        sketch path from that size; with the projection in the file (and so the keys' sketches,
        spec §4.2) they read both instead of fitting and computing them at every attach
        (1,000,000 facts at SmolLM2's shape: 0.96 s instead of 6.4; benchmarks/scale).

        >>> big.sketched_at_scale().save("big.nkv")
        """
        if self.sketch_proj is not None or self.n_facts < C.SKETCH_MIN_FACTS:
            return self
        return self.with_sketch()

    def to(self, dtype: torch.dtype) -> "NKVAdapter":
        """Same adapter with keys and residuals stored in `dtype` (F32, F16 or BF16), exact.

        From an int8 adapter this writes the dequantized rows in `dtype` (storage "exact").
        A sign adapter's rows need their score weights (spec §4.4), which exact storage has
        no place for: the result keeps them and refuses to validate or save.
        """
        return dc_replace(self, keys=self.keys.to(dtype), residuals=self.residuals.to(dtype), storage="exact")


def _same_rows(keys_a: torch.Tensor, res_a: torch.Tensor, rows_a: list[int],
               keys_b: torch.Tensor, res_b: torch.Tensor, rows_b: list[int],
               codes: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[bool]:
    """Per pair (rows_a[i], rows_b[i]): are the K1 and R1 rows equal, compared in float32,
    and (`codes`: both sides' `_code_rows`) their code scales, NaN equal to NaN?
    One vectorised pass, in blocks of at most ~16M values (values are finite: V8)."""
    out: list[bool] = []
    block = max(1, 2**24 // max(1, keys_a.shape[1] + res_a.shape[1]))
    for start in range(0, len(rows_a), block):
        ia = torch.tensor(rows_a[start:start + block], dtype=torch.long)
        ib = torch.tensor(rows_b[start:start + block], dtype=torch.long)
        eq = ((keys_a[ia].float() == keys_b[ib].float()).all(-1)
              & (res_a[ia].float() == res_b[ib].float()).all(-1))  # (block,)
        if codes is not None:
            ca, cb = codes[0][ia], codes[1][ib]  # (block, 2)
            eq &= ((ca == cb) | (torch.isnan(ca) & torch.isnan(cb))).all(-1)
        out.extend(eq.tolist())
    return out


def _code_rows(code_scales: torch.Tensor | None, n: int) -> torch.Tensor:
    """(n, 2) float32 code scales, NaN for rows that have none (floats, spec §4.4)."""
    return code_scales if code_scales is not None else torch.full((n, 2), float("nan"))


def _kept_codes(code_scales: torch.Tensor, storage: str) -> torch.Tensor | None:
    """What an adapter of `storage` keeps of its rows' code scales: all of them for "sign"
    (NaN rows are encoded when saved), none when no row has any."""
    return code_scales if storage == "sign" or not bool(torch.isnan(code_scales).all()) else None


def _weighted_sketches(keys: torch.Tensor, proj: torch.Tensor, weights: torch.Tensor | None,
                       inverse_norms: torch.Tensor | None = None) -> torch.Tensor:
    """gate.sketch_keys of the keys, each row times its score weight: with P orthonormal, the
    sketch and rest of w · unit(k) bound w · cos, the score the gate gives a sign row (§4.4)."""
    if weights is None:
        return sketch_keys(keys, proj, inverse_norms)
    return sketch_keys(keys, proj) * weights.to(keys.device).unsqueeze(-1)


def _sketch_dim(adapter: NKVAdapter) -> int:
    return 0 if adapter.sketch_proj is None else int(adapter.sketch_proj.shape[1])


def _sketch_table_problems(adapter: NKVAdapter, table: torch.Tensor) -> list[str]:
    """V11 on the data of `nkv.sketch.keys` (its shape and its projection were checked with
    the header): finite, and SKETCH_KEYS_CHECKED evenly spaced rows equal the sketches
    computed from K1 and P. A stale table would not fire a wrong row (candidates are
    rescored exactly) but would silently miss right ones."""
    where = f"V11: tensor {C.T_SKETCH_KEYS!r}"
    if not all_finite(table):
        return [f"{where} holds NaN/Inf values; drop it or write the file again"]
    n = table.shape[0]
    rows = torch.linspace(0, n - 1, min(n, C.SKETCH_KEYS_CHECKED)).round().long().unique()
    keys, proj, weights = adapter.keys, adapter.sketch_proj, adapter.score_weights()
    assert proj is not None
    diff = (_weighted_sketches(keys.index_select(0, rows), proj, None if weights is None else weights[rows])
            - table.index_select(0, rows)).abs()
    if rows.numel() and float(diff.max()) > C.SKETCH_KEYS_TOLERANCE:
        bad = int(rows[int(diff.amax(-1).argmax())])
        return [f"{where} is not the sketches of {C.T_KEYS!r} under {C.T_SKETCH_PROJ!r} (row {bad} differs by "
                f"{float(diff.max()):.3g} > {C.SKETCH_KEYS_TOLERANCE}); drop it or write the file again"]
    return []


def _sketches_of_int8(q: torch.Tensor, scale: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """The key sketches of int8 rows as a reader dequantizes them, in the blocks sketch_keys
    uses (so the same products), without a float32 copy of the whole table."""
    parts = [sketch_keys(dequantize_rows(q[s : s + ROW_BLOCK], scale[s : s + ROW_BLOCK]), proj)
             for s in range(0, q.shape[0], ROW_BLOCK)]
    return torch.cat(parts) if parts else torch.zeros(0, proj.shape[1] + 1)


def _sketches_of_sign(bits: torch.Tensor, weights: torch.Tensor, proj: torch.Tensor, d_key: int) -> torch.Tensor:
    """The weighted key sketches of sign rows as a reader decodes them (spec §4.4), in blocks,
    without a float32 copy of the whole table."""
    parts = [_weighted_sketches(decode_keys(bits[s : s + ROW_BLOCK], weights[s : s + ROW_BLOCK], d_key), proj,
                                weights[s : s + ROW_BLOCK])
             for s in range(0, bits.shape[0], ROW_BLOCK)]
    return torch.cat(parts) if parts else torch.zeros(0, proj.shape[1] + 1)


def _version_for(adapter: NKVAdapter) -> str:
    """The lowest format version holding every part the file uses (spec §8), so older readers
    read what they can: sign rows are 2.2, rows after the FFN-output norm 2.0, int8 rows 1.3,
    nkvfp2 1.2, the sketch projection 1.1."""
    if adapter.storage == "sign":
        return C.SIGN_VERSION
    if adapter.residual_site != C.DEFAULT_RESIDUAL_SITE:
        return C.RESIDUAL_SITE_VERSION
    if adapter.storage == "int8":
        return C.INT8_VERSION
    if adapter.base.fingerprint.startswith(FINGERPRINT2_PREFIX):
        return C.FINGERPRINT2_VERSION
    return C.SKETCH_VERSION if adapter.sketch_proj is not None else C.BASE_VERSION


# A float is NaN or ±Inf exactly when its exponent bits are all ones: reading the bits as
# integers is exact, ~2x faster than torch.isfinite on a CPU, in blocks so no full-size
# temporary is made.
_EXPONENT_BITS = {torch.float16: (torch.int16, 0x7C00), torch.bfloat16: (torch.int16, 0x7F80),
                  torch.float32: (torch.int32, 0x7F800000)}


def all_finite(t: torch.Tensor, block: int = 1 << 22) -> bool:
    """Whether every value of the float tensor `t` is finite (no NaN, no ±Inf).

    A block's float32 sum is finite when all its values are and NaN/Inf when one is not: one
    pass with no temporary (V8 on 1M fp16 rows of SmolLM2's width: 2.2 s by exponent bits,
    0.55 s by sums; benchmarks/scale/attach_file.py --top). fp16 blocks cannot overflow it
    (2^22 x 65504 < 2^38); a bf16/float32 block whose finite values overflow it is rechecked
    bit by bit.
    """
    if t.dtype not in _EXPONENT_BITS:
        return bool(torch.isfinite(t).all())
    flat = t.contiguous().view(-1)
    return all(bool(torch.isfinite(flat[s : s + block].sum(dtype=torch.float32))) or _bits_finite(flat[s : s + block])
               for s in range(0, flat.numel(), block))


def _bits_finite(flat: torch.Tensor) -> bool:
    as_int, mask = _EXPONENT_BITS[flat.dtype]
    return not bool(((flat.view(as_int) & mask) == mask).any())


def _known_tensors(header: NKVHeader) -> list[str]:
    """The tensors this reader uses that the file holds (unknown ones are ignored, §8)."""
    return [C.T_KEYS, C.T_RESIDUALS, C.T_FACTS] + [t for t in C.OPTIONAL_TENSORS + C.SCALE_TENSORS
                                                   + (C.T_KEYS_WEIGHT,) if t in header.tensors]


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's little-endian bytes without a copy (bf16 has no numpy dtype, uint8 does)."""
    assert sys.byteorder == "little", "the .nkv writer assumes a little-endian host"
    flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # 1-D: cast() refuses 0-size N-D
    return memoryview(flat.numpy())


def _write_parts(fh: Any, head: bytes, parts: list[tuple[str, memoryview]]) -> None:
    """Write header then tensor data (a function of its own so tests can interrupt it)."""
    fh.write(head)
    for _, data in parts:
        fh.write(data)


@dataclass
class AdapterDiff:
    added: list[str]
    removed: list[str]
    changed: list[str]
    settings: dict[str, tuple[Any, Any]]

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.settings)


def empty_adapter(base: BaseModelInfo, layer: int, target_module: str,
                  gamma: float = C.DEFAULT_GAMMA, dtype: torch.dtype = torch.float32,
                  residual_site: str = C.DEFAULT_RESIDUAL_SITE) -> NKVAdapter:
    """An adapter with no facts yet, to `add` rows to."""
    return NKVAdapter(
        keys=torch.zeros(0, base.d_key, dtype=dtype), residuals=torch.zeros(0, base.d_model, dtype=dtype),
        facts=[], layer=layer, gamma=gamma, base=base, target_module=target_module, residual_site=residual_site,
    )


__all__ = ["NKVAdapter", "AdapterDiff", "empty_adapter"]
