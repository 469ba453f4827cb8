"""Row operations on a 200k-row adapter: add, remove, select, merge, diff, save/load, and the
`nkv rm` / `nkv merge` commands end to end (seconds).

    python benchmarks/scale/bench_rowops.py --facts 200000 --d-key 1536 --d-model 576

Rows are random (row operations never look at values except to compare duplicates);
the widths default to SmolLM2-135M's. Prints one JSON line per operation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nkv import BaseModelInfo, Fact, NKVAdapter, compute_fingerprint, empty_adapter


def _adapter(n: int, d_key: int, d_model: int, start: int = 0, dtype=torch.float16) -> NKVAdapter:
    weight = torch.randn(d_model, d_key, generator=torch.Generator().manual_seed(0))
    base = BaseModelInfo(name="bench", architecture="LlamaForCausalLM", model_type="llama", n_layers=30,
                         d_model=d_model, d_key=d_key, fingerprint=compute_fingerprint(weight))
    facts = [Fact(id=f"f{i}", subject=f"Subject {i}", prompt=f"Subject {i} lives in", target_new=" Paris")
             for i in range(start, start + n)]
    a = empty_adapter(base, layer=6, target_module="model.layers.6.mlp.down_proj", dtype=dtype)
    return a.add(facts, torch.randn(n, d_key).to(dtype), torch.randn(n, d_model).to(dtype))


def _timed(name: str, fn):
    t0 = time.perf_counter()
    out = fn()
    print(json.dumps({"op": name, "seconds": round(time.perf_counter() - t0, 3)}), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--facts", type=int, default=200_000)
    p.add_argument("--d-key", type=int, default=1536)
    p.add_argument("--d-model", type=int, default=576)
    args = p.parse_args()
    torch.set_num_threads(1)
    n = args.facts
    a = _timed(f"add {n} rows to an empty adapter", lambda: _adapter(n, args.d_key, args.d_model))
    b = _adapter(n // 2, args.d_key, args.d_model, start=n // 2)  # half overlaps a
    ids = [f"f{i}" for i in range(0, n, 2)]
    _timed(f"select {len(ids)} ids", lambda: a.select(ids))
    _timed(f"remove {len(ids)} ids", lambda: a.remove(ids=ids))
    _timed(f"merge {n} + {n // 2} (half the ids shared, rows differ), theirs",
           lambda: a.merge(b, on_conflict="theirs"))
    _timed(f"merge {n} + copy of itself (every row compared)", lambda: a.merge(a))
    _timed(f"diff {n} vs {n // 2}", lambda: a.diff(b))
    with tempfile.TemporaryDirectory() as tmp:
        path, other, out = Path(tmp) / "a.nkv", Path(tmp) / "b.nkv", str(Path(tmp) / "out.nkv")
        _timed(f"save {n} rows", lambda: a.save(path))
        _timed(f"load {n} rows (validates)", lambda: NKVAdapter.load(path))
        print(json.dumps({"file_bytes_per_fact": round(path.stat().st_size / n)}))
        b.save(other)
        # the commands as a user runs them: a new process (imports included), load, operate, write
        _timed(f"nkv rm of 2 ids from {n} rows, end to end", lambda: _nkv("rm", str(path), "--id", "f0", "--id", "f2",
                                                                           "-o", out))
        _timed(f"nkv merge {n} + {n // 2} --on-conflict theirs, end to end",
               lambda: _nkv("merge", str(path), str(other), "--on-conflict", "theirs", "-o", out))
        # Files of SKETCH_MIN_FACTS facts and more get a sketch projection (and the keys' sketches)
        # when the CLI writes them, so the commands above also fitted one; a file the CLI wrote
        # carries it, and row operations keep it and the sketches of the rows they keep:
        sketched = Path(tmp) / "sketched.nkv"
        _timed(f"fit and store the sketch projection of {n} rows", lambda: a.sketched_at_scale().save(sketched))
        print(json.dumps({"file_bytes_per_fact_with_projection": round(sketched.stat().st_size / n)}))
        _timed(f"nkv rm of 2 ids from {n} rows with their projection, end to end",
               lambda: _nkv("rm", str(sketched), "--id", "f0", "--id", "f2", "-o", out))
        b.sketched_at_scale().save(other)
        _timed(f"nkv merge {n} + {n // 2} with their projections, end to end",
               lambda: _nkv("merge", str(sketched), str(other), "--on-conflict", "theirs", "-o", out))


def _nkv(*args: str) -> None:
    nkv = shutil.which("nkv", path=str(Path(sys.executable).parent)) or "nkv"  # this environment's command
    subprocess.run([nkv, *args], check=True, stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
