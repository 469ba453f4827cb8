"""The sketch path's shortlist with the facts it scores per chunk chosen the old way (the
loader's fact_chunk, 8,192) and today's (`gate.shortlist_chunk`: up to shortlist * d_key),
interleaved in one run on the same random keys. Same candidates, less time in topk.

    python benchmarks/scale/shortlist_chunk.py --facts 200000 --tokens 170 --reps 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from nkv import gate
from nkv.constants import DEFAULT_SHORTLIST, DEFAULT_SKETCH_DIM
from nkv.gate import Sketch, fit_sketch, key_inverse_norms, nkv_gate, sketch_keys


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--facts", type=int, default=200_000)
    p.add_argument("--tokens", type=int, default=170, help="rows per gate call (the transformers loader's block at 200k)")
    p.add_argument("--d-key", type=int, default=1536)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    keys = torch.randn(args.facts, args.d_key)
    inv = key_inverse_norms(keys)
    residuals = torch.zeros(args.facts, 8)
    proj = fit_sketch(keys, DEFAULT_SKETCH_DIM)
    sketch = Sketch(proj, sketch_keys(keys, proj, inv), DEFAULT_SHORTLIST)
    x = torch.randn(args.tokens, args.d_key)
    gamma = torch.tensor(0.65)
    today = gate.shortlist_chunk
    rules = {"fact_chunk (old)": lambda fact_chunk, c, d_key: max(fact_chunk, c), "shortlist * d_key (today)": today}
    times: dict[str, list[float]] = {name: [] for name in rules}
    picks = {}
    for rep in range(args.reps + 1):  # interleaved; the first round warms up
        for name, rule in rules.items():
            gate.shortlist_chunk = rule
            t0 = time.perf_counter()
            picks[name] = nkv_gate(x, keys, inv, residuals, gamma, sketch=sketch).index
            if rep:
                times[name].append(time.perf_counter() - t0)
    gate.shortlist_chunk = today
    old, new = (statistics.median(t) for t in times.values())
    print(json.dumps({"facts": args.facts, "tokens": args.tokens, "d_key": args.d_key, "threads": args.threads,
                      "reps": args.reps, "old_s": round(old, 3), "today_s": round(new, 3),
                      "speedup": round(old / new, 2), "same_rows": bool(torch.equal(*picks.values()))}))


if __name__ == "__main__":
    main()
