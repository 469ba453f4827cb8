"""Where a build's time goes, by torch operator, and the build's time per setting.

    python benchmarks/build/profile_build.py --n 16 --opt-dtypes none,bfloat16 --profile

Builds the first N CounterFact facts on SmolLM2-135M (one thread) once per `--opt-dtypes`
entry ("none" = the default float32 steps; "bfloat16" = `BuildConfig.opt_dtype`, whose
CPU steps take the math attention kernel; "bfloat16-fused" = the same under autocast with
PyTorch's own kernel choice, i.e. the fused CPU attention) and prints the wall time and
the self-check. With --profile it prints the top operators of each build by self CPU time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "counterfact-edit.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--opt-dtypes", default="none,bfloat16")
    p.add_argument("--rounds", type=int, default=1, help="builds per setting, interleaved")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    import contextlib

    from nkv.editing.solve import build_adapter, default_config
    from nkv.editing.solve import residuals
    from nkv.facts_io import read_facts
    from nkv.loaders.models import load_model

    model, tok = load_model(args.model)
    facts = read_facts(args.data)[: args.n]
    for _ in range(args.rounds):
        for name in args.opt_dtypes.split(","):
            dtype = None if name == "none" else name.removesuffix("-fused")
            config = default_config(model, opt_dtype=dtype)
            fused = mock.patch.object(residuals, "sdpa_kernel", lambda backends: contextlib.nullcontext())
            with fused if name.endswith("-fused") else contextlib.nullcontext():
                with profile(activities=[ProfilerActivity.CPU]) if args.profile else contextlib.nullcontext() as prof:
                    start = time.perf_counter()
                    adapter = build_adapter(model, tok, facts, layer=args.layer, config=config, progress=False)
                    seconds = time.perf_counter() - start
            print(f"{name}: {args.n} facts in {seconds:.1f} s, self-check {adapter.build['self_check']['efficacy']:.0%}",
                  flush=True)
            if args.profile:
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=48))


if __name__ == "__main__":
    main()
