"""The sketch path's gate call (spec §5.1) as it was before session 8 and as it is now,
interleaved in one run on the same random keys: before, the shortlist scored the loader's
fact_chunk (8,192) facts per chunk and the rescoring gathered all `shortlist` candidate rows
of every token at once; now chunks reach RESCORE_GROUP * d_key facts and the rescoring takes
RESCORE_GROUP candidates at a time (`gate.shortlist_chunk`, `gate.RESCORE_GROUP`).

    python benchmarks/scale/sketch_gate_speed.py --facts 200000 --tokens 256 --reps 9
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
    p.add_argument("--tokens", type=int, default=256, help="rows per gate call")
    p.add_argument("--d-key", type=int, default=1536)
    p.add_argument("--reps", type=int, default=9)
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
    today = (gate.shortlist_chunk, gate.RESCORE_GROUP)
    variants = {"before": (lambda fact_chunk, c, d_key: max(fact_chunk, c), DEFAULT_SHORTLIST), "today": today}
    times: dict[str, list[float]] = {name: [] for name in variants}
    picks = {}
    for rep in range(args.reps + 1):  # interleaved; the first round warms up
        for name, (chunk_rule, group) in variants.items():
            gate.shortlist_chunk, gate.RESCORE_GROUP = chunk_rule, group
            t0 = time.perf_counter()
            picks[name] = nkv_gate(x, keys, inv, residuals, gamma, sketch=sketch).index
            if rep:
                times[name].append(time.perf_counter() - t0)
    gate.shortlist_chunk, gate.RESCORE_GROUP = today
    before, now = (statistics.median(t) for t in times.values())
    print(json.dumps({"facts": args.facts, "tokens": args.tokens, "d_key": args.d_key, "threads": args.threads,
                      "reps": args.reps, "before_s": round(before, 3), "today_s": round(now, 3),
                      "speedup": round(before / now, 2), "same_rows": bool(torch.equal(*picks.values()))}))


if __name__ == "__main__":
    main()
