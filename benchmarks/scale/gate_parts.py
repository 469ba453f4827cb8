"""Where the sketch path's time goes: the whole `nkv_gate` call and its parts, one thread.

    python benchmarks/scale/gate_parts.py --keys keys30k.pt --facts 200000 --tokens 256

Keys: the real keys of read_keys.py tiled to --facts with noise (fp16, as files store them),
the sketch fitted as the loader fits it; queries: --tokens real-text tokens. Prints the
median of --reps (ms) for: the whole gate (with the static rescoring group, with the one the
transformers loader sizes for --tokens rows, and as that loader calls it: budget-long chunks,
the sized group, a kept score buffer), the shortlist, the exact rescoring
(both groups, and session 12's products alone), the sketch
product alone (float32 and bf16), the per-chunk top-k as the shortlist runs it, and one
top-k over all scores. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from nkv.gate import (DEFAULT_FACT_CHUNK, Sketch, _rescore, _shortlist, _top_columns, fit_sketch, key_inverse_norms, nkv_gate,
                      rescore_group, shortlist_chunk, shortlist_scores, sketch_keys, unit_rows)


def ms(f: Callable[[], object], reps: int) -> float:
    f()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1000, 1)


def rescore_session12(x_c: torch.Tensor, keys: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """The rescoring's products as session 12 computed them, for comparison: 8 slots at a time,
    each token's candidates as the left operand, (8, d_key) x (d_key, 1)."""
    T, c = cand.shape
    parts = []
    for s in range(0, c, 8):
        group = cand[:, s : s + 8]
        rows = keys.index_select(0, group.reshape(-1)).to(x_c.dtype).reshape(T, group.shape[1], keys.shape[-1])
        parts.append(torch.bmm(rows, x_c.unsqueeze(-1)).squeeze(-1))
    return torch.cat(parts, dim=-1)


def topk_per_chunk_session12(chunks: list[torch.Tensor], c: int) -> torch.Tensor:
    """The shortlist's top-k as session 12 ran it, for comparison: one top-k per chunk, merged."""
    top_v = top_i = None
    start = 0
    for scores in chunks:
        v, i = scores.topk(c, dim=-1)
        i = i + start
        start += scores.shape[1]
        if top_v is not None:
            v, pick = torch.cat([top_v, v], -1).topk(c, dim=-1)
            i = torch.cat([top_i, i], -1).gather(-1, pick)
        top_v, top_i = v, i
    return top_i


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=Path, required=True)
    p.add_argument("--facts", type=int, default=200_000)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--shortlist", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    data = torch.load(args.keys)
    real = data["keys"].float()
    g = torch.Generator().manual_seed(0)
    n = args.facts
    keys = (real[torch.randint(0, real.shape[0], (n,), generator=g)]
            + 0.3 * torch.randn(n, real.shape[1], generator=g)).half()  # (n, d_key)
    proj = fit_sketch(keys, 128)
    inv = key_inverse_norms(keys)
    table = sketch_keys(keys, proj, inv)  # (n, 129)
    sketch = Sketch(proj, table, args.shortlist, torch.float32)
    x = data["text"][: args.tokens].float()  # (T, d_key)
    x_unit = unit_rows(x, x.pow(2).sum(-1))
    residuals = torch.zeros(n, 576, dtype=torch.float16)
    cand = _shortlist(x_unit, sketch, DEFAULT_FACT_CHUNK, None)
    q = torch.cat([x_unit @ proj, torch.rand(x.shape[0], 1, generator=g)], -1)  # (T, 129)
    scores = q @ table.T  # (T, n)
    chunk = shortlist_chunk(DEFAULT_FACT_CHUNK, args.shortlist, keys.shape[1])
    q16, table16 = q.bfloat16(), table.bfloat16()
    chunks = [scores[:, s : s + chunk].contiguous() for s in range(0, n, chunk)]  # as the op's products make them
    group = rescore_group(x.shape[0], keys.shape[1], args.shortlist)  # what the transformers loader passes
    budget_chunk = min(n, 2**25 // x.shape[0])  # the chunk the transformers loader passes since session 12
    workspace = torch.empty(shortlist_scores(x.shape[0], n, budget_chunk, args.shortlist, keys.shape[1]))
    parts = {
        "whole_gate": lambda: nkv_gate(x, keys, inv, residuals, torch.tensor(0.65), sketch=sketch),
        "whole_gate_sized_group": lambda: nkv_gate(x, keys, inv, residuals, torch.tensor(0.65),
                                                   sketch=sketch._replace(group=group)),
        # as the transformers loader calls it: budget-long chunks, the sized group, a kept score buffer
        "whole_gate_as_loader": lambda: nkv_gate(x, keys, inv, residuals, torch.tensor(0.65), fact_chunk=budget_chunk,
                                                 sketch=sketch._replace(group=group), workspace=workspace),
        "shortlist": lambda: _shortlist(x_unit, sketch, DEFAULT_FACT_CHUNK, None),
        "shortlist_budget_chunk": lambda: _shortlist(x_unit, sketch, budget_chunk, None),
        "shortlist_budget_chunk_workspace": lambda: _shortlist(x_unit, sketch, budget_chunk, None, workspace),
        "rescore_products_session12": lambda: rescore_session12(x_unit, keys, cand),
        "rescore": lambda: _rescore(x_unit, keys, inv, cand, None),  # the static group (compiled callers)
        "rescore_sized_group": lambda: _rescore(x_unit, keys, inv, cand, None, group),
        "sketch_product_float32": lambda: [q @ table[s : s + chunk].T for s in range(0, n, chunk)],
        "sketch_product_bf16": lambda: [q16 @ table16[s : s + chunk].T for s in range(0, n, chunk)],
        "topk_per_chunk": lambda: topk_per_chunk_session12(chunks, args.shortlist),
        "topk_once": lambda: scores.topk(args.shortlist, dim=-1),
        "two_level_topk_chunks": lambda: _top_columns(zip(range(0, n, chunk), chunks), args.shortlist),
        "two_level_topk_once": lambda: _top_columns(iter([(0, scores)]), args.shortlist),
    }
    print(json.dumps({"facts": n, "tokens": x.shape[0], "chunk": chunk, "sized_group": group, "threads": 1,
                      **{f"{k}_ms": ms(f, args.reps) for k, f in parts.items()}}), flush=True)


if __name__ == "__main__":
    main()
