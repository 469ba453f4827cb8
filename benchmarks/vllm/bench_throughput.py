"""Generated tokens/s and memory of a vLLM engine with an NKV adapter of 1k / 10k / 100k facts vs none.

Every configuration runs in its own child process (so its peak RSS is its own) with the
same engine settings, one after the other in one invocation; the no-adapter baseline
runs first and again last, so drift of a shared machine shows. The model is a randomly
initialised Llama config (`load_format="dummy"`: weights drawn by vLLM, no checkpoint);
adapters hold random keys and residuals of the right shape, which is all throughput
depends on: the gate scores every preallocated row on every token whether it fires or not.

    python benchmarks/vllm/bench_throughput.py --out benchmarks/vllm/results-cpu.json

Prints one JSON line per configuration and a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--edit-layer", type=int, default=None, help="default: layers // 2")
    p.add_argument("--facts", default="1000,10000,100000", help="adapter sizes; 0 (no nkv) runs first and last")
    p.add_argument("--batch", type=int, default=16, help="prompts per generate call")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7, help="timed generate calls; best and median are reported")
    p.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's compiled mode)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)  # internal: one config, in a child
    return p.parse_args(argv)


# ------------------------------------------------------------------ one configuration (child process)
def make_model_dir(args: argparse.Namespace, folder: Path) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                max_position_embeddings=4096, architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    return folder


def make_adapter(args: argparse.Namespace, n_facts: int, path: Path) -> Path:
    """Random rows of the right shape, built directly (row-op checks are O(n^2) in ids at 100k)."""
    import torch

    from nkv import Fact, NKVAdapter
    from nkv.header import BaseModelInfo

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    layer = args.layers // 2 if args.edit_layer is None else args.edit_layer
    base = BaseModelInfo(name="random-llama", architecture="LlamaForCausalLM", model_type="llama",
                         n_layers=args.layers, d_model=args.hidden, d_key=args.intermediate,
                         fingerprint="nkvfp1:fro=1.000000e+00;z=" + ",".join(["0.0000"] * 16))
    facts = [Fact(id=f"f{i}", subject=f"s{i}", prompt=f"s{i} is", target_new="x") for i in range(n_facts)]
    adapter = NKVAdapter(keys=torch.randn(n_facts, args.intermediate).to(dtype),
                         residuals=torch.randn(n_facts, args.hidden).to(dtype), facts=facts, layer=layer,
                         gamma=0.65, base=base, target_module=f"model.layers.{layer}.mlp.down_proj")
    return adapter.save(path)


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_single(args: argparse.Namespace, n_facts: int) -> dict[str, Any]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: its RSS is ours
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    work = Path(tempfile.mkdtemp(prefix="nkv-bench-"))
    os.environ.setdefault("VLLM_CACHE_ROOT", str(work / "vllm-cache"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor-cache"))
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model = make_model_dir(args, work / "model")
    kwargs: dict[str, Any] = dict(model=str(model), load_format="dummy", skip_tokenizer_init=True, dtype=args.dtype,
                                  max_model_len=args.prompt_len + args.gen_len, max_num_seqs=args.batch,
                                  gpu_memory_utilization=0.3, enforce_eager=args.eager, seed=0)
    adapter_bytes = 0
    if n_facts:
        path = make_adapter(args, n_facts, work / "adapter.nkv")
        kwargs["additional_config"] = {"nkv": {"adapter": str(path), "strict": False}}
        itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
        adapter_bytes = n_facts * ((args.intermediate + args.hidden) * itemsize + 4)  # keys, residuals, 1/||k||
    rss_before = rss_bytes()
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    start_s = time.perf_counter() - t0
    rss_started = rss_bytes()

    gen = torch.Generator().manual_seed(1)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(10, args.vocab, (args.prompt_len,), generator=gen).tolist())
               for _ in range(args.batch)]
    params = SamplingParams(temperature=0.0, max_tokens=args.gen_len, ignore_eos=True, detokenize=False)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(args.repeats):
        llm.reset_prefix_cache()  # every repeat computes its prompts again
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t)
        assert sum(len(o.outputs[0].token_ids) for o in outs) == args.batch * args.gen_len
    generated = args.batch * args.gen_len
    return {
        "n_facts": n_facts,
        "gen_tok_s_median": generated / statistics.median(times),
        "gen_tok_s_best": generated / min(times),
        "times_s": [round(t, 3) for t in times],
        "engine_start_s": round(start_s, 1),
        "adapter_buffer_mib": round(adapter_bytes / 2**20, 1),
        "rss_after_start_mib": round(rss_started / 2**20, 1),
        "rss_engine_mib": round((rss_started - rss_before) / 2**20, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


# ------------------------------------------------------------------ driver
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.single is not None:
        print("RESULT " + json.dumps(run_single(args, int(args.single))), flush=True)
        return
    sizes = [0] + [int(s) for s in args.facts.split(",") if s] + [0]
    child_args = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                  if k not in ("out", "single", "eager", "edit_layer")]
    child_args += ["--eager"] * args.eager + ([f"--edit-layer={args.edit_layer}"] if args.edit_layer is not None else [])
    results = []
    for n in sizes:
        child = subprocess.run([sys.executable, __file__, *child_args, "--single", str(n)],
                               capture_output=True, text=True)
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode != 0 or not lines:
            sys.stderr.write(child.stderr[-4000:])
            raise SystemExit(f"configuration with {n} facts failed (exit {child.returncode})")
        results.append(json.loads(lines[-1][len("RESULT "):]))
        print(json.dumps(results[-1]), flush=True)
    # On a shared machine the best of N repeats is the least disturbed by other load; the
    # median is reported too. Both baselines (first and last run) are averaged.
    base_best = statistics.mean(r["gen_tok_s_best"] for r in results if r["n_facts"] == 0)
    base_median = statistics.mean(r["gen_tok_s_median"] for r in results if r["n_facts"] == 0)
    rows = ["| facts | tok/s best | vs none | tok/s median | vs none | adapter buffers MiB | engine RSS MiB | peak RSS MiB |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        best = 100.0 * (r["gen_tok_s_best"] / base_best - 1.0)
        median = 100.0 * (r["gen_tok_s_median"] / base_median - 1.0)
        rows.append(f"| {r['n_facts']:,} | {r['gen_tok_s_best']:.1f} | {best:+.1f}% | {r['gen_tok_s_median']:.1f} | "
                    f"{median:+.1f}% | {r['adapter_buffer_mib']} | {r['rss_engine_mib']} | {r['peak_rss_mib']} |")
    print("\n".join(rows))
    if args.out is not None:
        args.out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("out", "single")},
                                        "baseline_tok_s_best": base_best, "baseline_tok_s_median": base_median,
                                        "table": rows, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
