"""Int8 rows (format 1.3, spec §4.3): bytes per fact, and how often the gate's decision changes.

    python benchmarks/scale/bench_int8.py bytes
    python benchmarks/scale/bench_int8.py agreement --keys keys.pt --facts 20000 --max-tokens 2000
    python benchmarks/scale/bench_int8.py adapter --keys keys.pt --nkv rows-counterfact-edit-L6-n100.nkv
    python benchmarks/scale/bench_int8.py agreement --keys keys.pt --facts 20000 --bits 8,sign,pq
    python benchmarks/scale/bench_int8.py adapter --keys keys.pt --nkv cf1000.nkv --bits pq --write-coded out/

`bytes` writes adapters at Llama-3-8B and SmolLM2-135M shapes (random fp16 rows, CounterFact-
sized fact records) exact, int8 and as sign rows (format 2.2), and reports the file bytes each
extra fact costs: as written below SKETCH_MIN_FACTS facts, and as written from there up with a
sketch projection, where the file also caches each key's sketch (spec §4.2, `nkv.sketch.keys`).
`agreement` compares the exact gate over the real SmolLM2 keys of read_keys.py (stored fp16)
with the same gate over those keys stored int8 or as sign rows (format 2.2; and, for
comparison only, codes the format does not define: per-row int4, product quantization),
on real-text, edit-prompt and paraphrase-prompt tokens.
`adapter` does the same for a built adapter (its rows coded by the format's writer) and
also reports the residuals' error; without --keys its queries are the adapter's own keys. A decision is the same when fired / not fired agree and,
where fired, the row agrees. Each command prints JSON lines; README.md holds the results.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from unittest.mock import patch
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import GAMMA, decisions  # noqa: E402

from nkv import BaseModelInfo, Fact, NKVAdapter  # noqa: E402
from nkv import constants as C  # noqa: E402
from nkv.constants import DEFAULT_SKETCH_DIM  # noqa: E402
from nkv.codes import rotate  # noqa: E402
from nkv.quant import dequantize_rows, quantize_rows  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[2] / "spec" / "examples" / "golden.nkv"  # settings for sign_rows
SHAPES = {"llama-3-8b": (14336, 4096), "smollm2-135m": (1536, 576)}
STORAGES = ("exact", "int8", "sign")
ROW_BYTES = {"exact": lambda k, m: 2 * (k + m), "int8": lambda k, m: k + m + 8,
             "sign": lambda k, m: (k + 7) // 8 + (m + 1) // 2 + 8}


def _emit(**row) -> None:
    print(json.dumps(row), flush=True)


def stored(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 rows a reader gets back: int8 through the format's writer and reader;
    other widths simulated with the same per-row symmetric code (not in the format)."""
    if bits == 8:
        q, scale, problems = quantize_rows(rows, "rows")
        assert not problems, problems
        return dequantize_rows(q, scale)
    top = 2 ** (bits - 1) - 1
    x = rows.float()
    s = x.abs().amax(-1, keepdim=True) / top
    return torch.round(x / s.clamp_min(1e-30)).clamp(-top, top) * s


def sign_rows(rows: torch.Tensor, residuals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The format's sign rows (2.2, spec §4.4) through its writer and reader: (unit keys, the
    gate's inverse norms (score weights), residuals) a reader returns."""
    n, d_key = rows.shape
    plain = NKVAdapter.load(GOLDEN)
    base = replace(plain.base, d_key=d_key, d_model=residuals.shape[1])
    facts = [Fact(id=f"f{i}", subject=f"S{i}", prompt=f"S{i} is", target_new="T") for i in range(n)]
    back = NKVAdapter.from_bytes(replace(plain, base=base, keys=rows.float(), residuals=residuals.float(), facts=facts,
                                         storage="sign").to_bytes())
    return back.keys, back.score_inverse_norms(), back.residuals


def _nearest(pieces: torch.Tensor, books: torch.Tensor, block: int = 8) -> torch.Tensor:
    """(P, n) index of each piece's nearest centre, a few pieces at a time (the distance
    table of all of them at once would be P x n x C floats)."""
    return torch.cat([torch.cdist(pieces[i : i + block], books[i : i + block]).argmin(-1)
                      for i in range(0, pieces.shape[0], block)])


def pq_codebooks(train: torch.Tensor, sub: int = 8, centroids: int = 256, rounds: int = 12,
                 max_rows: int = 50_000, seed: int = 0) -> torch.Tensor:
    """Product-quantization codebooks (not in the format): the unit rows, rotated, cut into
    `sub`-value pieces; per piece, `centroids` centres by k-means (Lloyd, `rounds` rounds)
    over at most `max_rows` training rows. One byte a piece: d / sub bytes a row.
    Returns (pieces, centroids, sub)."""
    g = torch.Generator().manual_seed(seed)
    train = train[torch.randperm(train.shape[0], generator=g)[:max_rows]]
    x = rotate(train.float() / train.float().norm(dim=-1, keepdim=True).clamp_min(1e-30))
    n, d = x.shape
    pieces = x.reshape(n, d // sub, sub).transpose(0, 1).contiguous()  # (P, n, sub)
    books = pieces[:, torch.randperm(n, generator=g)[:centroids]].clone()  # (P, C, sub)
    for _ in range(rounds):
        assign = _nearest(pieces, books)
        sums = torch.zeros_like(books).scatter_add_(1, assign[..., None].expand(-1, -1, sub), pieces)
        counts = torch.zeros(books.shape[:2]).scatter_add_(1, assign, torch.ones(assign.shape))
        books = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], books)
    return books


def pq_rows(rows: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """The rows a PQ code reads back: each unit row's nearest centre per piece, rotated back
    (unit direction only; the gate's cosine ignores a key's norm)."""
    x = rotate(rows.float() / rows.float().norm(dim=-1, keepdim=True).clamp_min(1e-30))
    p, _, sub = books.shape
    pieces = x.reshape(x.shape[0], p, sub).transpose(0, 1).contiguous()
    codes = _nearest(pieces, books)  # (P, n)
    back = torch.gather(books, 1, codes[..., None].expand(-1, -1, sub)).transpose(0, 1).reshape(x.shape)
    return rotate(back, inverse=True)


def relative_errors(rows: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
    x = rows.float()
    norms = x.norm(dim=-1)
    return ((back - x).norm(dim=-1) / norms.clamp_min(1e-30))[norms > 0]


def cmd_bytes() -> None:
    g = torch.Generator().manual_seed(0)
    record = dict(subject="Danielle Darrieux", prompt="The mother tongue of Danielle Darrieux is",
                  target_new="English", target_true="French", provenance={"source": "counterfact", "case_id": 0})
    with tempfile.TemporaryDirectory() as tmp:
        for model, (d_key, d_model) in SHAPES.items():
            sizes = {}
            for n in (32, 64):
                base = BaseModelInfo(name=model, architecture="LlamaForCausalLM", model_type="llama", n_layers=2,
                                     d_model=d_model, d_key=d_key, fingerprint="nkvfp1:fro=1.0e+00;z=" + ",".join(["0.0000"] * 16))
                adapter = NKVAdapter(keys=torch.randn(n, d_key, generator=g).half(),
                                     residuals=torch.randn(n, d_model, generator=g).half(),
                                     facts=[Fact(id=f"cf-{i}", **record) for i in range(n)], layer=1, gamma=GAMMA,
                                     base=base, target_module="model.layers.1.mlp.down_proj")
                # the same rows with a sketch projection, written as from SKETCH_MIN_FACTS facts up: the
                # file then caches every key's sketch (nkv.sketch.keys, d_sketch + 1 F32 a row)
                projected = replace(adapter, sketch_proj=torch.linalg.qr(
                    torch.randn(d_key, DEFAULT_SKETCH_DIM, generator=g)).Q.contiguous())
                for storage in STORAGES:
                    sizes[storage, n] = adapter.save(Path(tmp) / f"{storage}.nkv", storage=storage).stat().st_size
                    with patch.object(C, "SKETCH_MIN_FACTS", 0):
                        sizes[storage, n, "cache"] = projected.save(Path(tmp) / f"{storage}-p.nkv",
                                                                    storage=storage).stat().st_size
            for storage in STORAGES:
                per_fact = (sizes[storage, 64] - sizes[storage, 32]) / 32
                cached = (sizes[storage, 64, "cache"] - sizes[storage, 32, "cache"]) / 32
                _emit(cmd="bytes", model=model, storage="fp16" if storage == "exact" else storage,
                      bytes_per_fact=per_fact, row_bytes=ROW_BYTES[storage](d_key, d_model),
                      bytes_per_fact_with_sketch_cache=cached)
            _emit(cmd="bytes", model=model, storage="int4 (not in the format)", row_bytes=(d_key + d_model) / 2 + 8)


def _agreement(name: str, q: torch.Tensor, exact_keys: torch.Tensor, keys: torch.Tensor,
               inverse_norms: torch.Tensor | None = None, **extra) -> None:
    e_fired, e_idx, e_score = decisions(q, exact_keys, None)
    fired, idx, score = decisions(q, keys, None, inverse_norms=inverse_norms)
    same = (fired == e_fired) & (~e_fired | (idx == e_idx))
    row_changed = fired & e_fired & (idx != e_idx)
    _emit(queries=name, tokens=q.shape[0], exact_fired=int(e_fired.sum()), agreement=round(float(same.float().mean()), 6),
          lost_fires=int((e_fired & ~fired).sum()), new_fires=int((fired & ~e_fired).sum()),
          row_changed=int(row_changed.sum()), max_score_change=round(float((score - e_score).abs().max()), 5),
          closest_exact_margin_of_a_change=(round(float((e_score[~same] - GAMMA).abs().min()), 5)
                                            if bool((~same).any()) else None), **extra)


def _queries(data: dict, max_tokens: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name in ("text", "edit", "paraphrase"):
        q = data[name]
        out[name] = q[torch.randperm(q.shape[0], generator=g)[:max_tokens]] if q.shape[0] > max_tokens else q
    return out


def _train_rows(data: dict | None, skip: int) -> torch.Tensor:
    """PQ training keys: real keys of other subjects than those coded (the keys file from row
    `skip` on), since a code fitted to its own few rows would flatter it."""
    if data is None:
        raise SystemExit("the pq code needs --keys (its codebooks are trained on those keys)")
    rows = data["keys"][skip:]
    if rows.shape[0] < 1000:
        raise SystemExit(f"the pq code needs at least 1,000 training keys after row {skip}; the keys file has {rows.shape[0]}")
    return rows


def coded_keys(code: str, exact: torch.Tensor, train: torch.Tensor | None):
    """(float rows read back, the gate's inverse norms for them or None) of one key code."""
    if code == "sign":
        keys, inv, _ = sign_rows(exact, torch.zeros(exact.shape[0], 2))
        return keys, inv
    if code == "pq":
        return pq_rows(exact, pq_codebooks(train)), None
    return stored(exact, int(code)), None


UNIT_CODES = ("sign", "pq")  # codes that read a key back as a direction only: a relative error would measure its norm


def coded_residuals(code: str, rows: torch.Tensor) -> torch.Tensor:
    """Residuals beside a key code: int8 / int4 rows for those codes; the codes aiming at
    <= 4 KB per fact (sign, PQ keys) take the format's rotated int4 residuals (spec §4.4)."""
    if code in UNIT_CODES:
        return sign_rows(torch.ones(rows.shape[0], 8), rows)[2]
    return stored(rows, int(code))


def cmd_agreement(data: dict, facts: int, max_tokens: int, codes: list[str]) -> None:
    exact = data["keys"][:facts]  # fp16, as read_keys.py stored them
    queries = _queries(data, max_tokens)
    for code in codes:
        keys, inv = coded_keys(code, exact, _train_rows(data, facts) if code == "pq" else None)
        err = relative_errors(exact, keys) if code not in UNIT_CODES else None
        _emit(cmd="agreement", bits=code, facts=facts, **({} if err is None else {
            "key_rel_error_max": round(float(err.max()), 5), "key_rel_error_median": round(float(err.median()), 5)}))
        for name, q in queries.items():
            _agreement(name, q, exact, keys, inv, bits=code, facts=facts)


def cmd_adapter(data: dict | None, path: Path, max_tokens: int, codes: list[str], out: Path | None) -> None:
    adapter = NKVAdapter.load(path)
    queries = {"own keys": adapter.keys} | (_queries(data, max_tokens) if data is not None else {})
    for code in codes:
        keys, inv = coded_keys(code, adapter.keys, _train_rows(data, 0) if code == "pq" else None)
        residuals = coded_residuals(code, adapter.residuals)
        k_err, r_err = relative_errors(adapter.keys, keys), relative_errors(adapter.residuals, residuals)
        _emit(cmd="adapter", file=path.name, bits=code, facts=adapter.n_facts, dtype=str(adapter.keys.dtype),
              key_rel_error_max=round(float(k_err.max()), 5) if code not in UNIT_CODES else None,
              key_rel_error_median=round(float(k_err.median()), 5) if code not in UNIT_CODES else None,
              residual_rel_error_max=round(float(r_err.max()), 5),
              residual_rel_error_median=round(float(r_err.median()), 5))
        for name, q in queries.items():
            _agreement(name, q, adapter.keys, keys, inv, bits=code, file=path.name)
        if out is not None and code != "sign":  # the rows a reader of this code would return, for `nkv eval`
            out.mkdir(parents=True, exist_ok=True)  # (sign rows are in the format: nkv quantize --storage sign)
            target = out / f"{path.stem}-{code}.nkv"
            replace(adapter, keys=keys.to(adapter.keys.dtype), residuals=residuals.to(adapter.residuals.dtype)).save(target)
            _emit(cmd="adapter", wrote=str(target), bits=code)
    if "8" in codes:  # the format's own round trip: save int8, load, compare with stored()
        back = NKVAdapter.from_bytes(replace(adapter, storage="int8").to_bytes())
        assert torch.equal(back.keys, stored(adapter.keys, 8)) and torch.equal(back.residuals, stored(adapter.residuals, 8))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["bytes", "agreement", "adapter"])
    p.add_argument("--keys", type=Path, help="keys.pt of read_keys.py")
    p.add_argument("--nkv", type=Path, help="an adapter built on the same model and layer as the keys")
    p.add_argument("--facts", type=int, default=20000)
    p.add_argument("--max-tokens", type=int, default=2000, help="query tokens per kind (sampled)")
    p.add_argument("--bits", default="8,4", help="8 and sign are the format's (int8 rows, 1.3; sign rows, 2.2: "
                   "signs of rotated keys with a per-row score weight and rotated int4 residuals, 1,792 + 2,048 + 8 "
                   "bytes at Llama-3-8B shape); others are simulated for comparison: 4 = per-row int4 rows; "
                   "pq = product-quantized rotated unit keys, one byte per 8 values, codebooks trained on the "
                   "--keys file's other subjects, with the format's int4 residuals (1,792 + 2,048 + 4 bytes)")
    p.add_argument("--write-coded", type=Path, default=None,
                   help="adapter: also write each simulated code's read-back rows as a float adapter here, for "
                        "`nkv eval` (sign rows need none: `nkv quantize --storage sign`)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    codes = args.bits.split(",")
    unknown = [c for c in codes if c not in ("8", "4", "sign", "pq")]
    if unknown:
        raise SystemExit(f"--bits: unknown code(s) {unknown}; known: 8, 4, sign, pq")
    if args.cmd == "bytes":
        return cmd_bytes()
    data = torch.load(args.keys) if args.keys else None
    if args.cmd == "agreement":
        cmd_agreement(data, args.facts, args.max_tokens, codes)
    else:
        cmd_adapter(data, args.nkv, args.max_tokens, codes, args.write_coded)


if __name__ == "__main__":
    main()
