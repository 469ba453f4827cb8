"""Cost of an attached NKV adapter in transformers: prefill and generate time, memory.

Same model, same inputs, one process: each configuration (no adapter, 1k, 10k, 100k
facts) is timed in interleaved rounds, and ratios are taken against the no-adapter
time of the same round. Keys/residuals are random rows of the right shape: the gate's
cost does not depend on their values.

    python benchmarks/attach/bench_attach.py --hidden 1024 --intermediate 4096 --layers 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import psutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nkv import Fact, empty_adapter, load_nkv_adapter
from nkv.loaders.architectures import base_model_info


def random_adapter(model, layer: int, n_facts: int, dtype: torch.dtype):
    base = base_model_info(model, layer, name="bench")
    g = torch.Generator().manual_seed(n_facts)
    keys = torch.randn(n_facts, base.d_key, generator=g).to(dtype)
    residuals = torch.randn(n_facts, base.d_model, generator=g).to(dtype) * 0.01
    facts = [Fact(id=str(i), subject=f"s{i}", prompt=f"s{i} is", target_new="x") for i in range(n_facts)]
    return empty_adapter(base, layer, "bench").add(facts, keys, residuals)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--facts", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, vocab_size=32000)
    model = LlamaForCausalLM(config).eval()
    n_params = sum(p.numel() for p in model.parameters())
    layer = args.layers // 2
    ids = torch.randint(0, 32000, (1, args.prompt_len))
    adapters = {n: random_adapter(model, layer, n, torch.float32) for n in args.facts}

    def prefill():
        with torch.no_grad():
            model(ids)

    def generate():
        model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    proc = psutil.Process()
    rows: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        base_prefill, base_gen = timed(prefill, args.repeats), timed(generate, args.repeats)
        rows.setdefault("none", {"prefill": [], "generate": [], "prefill_ratio": [], "generate_ratio": []})
        rows["none"]["prefill"].append(base_prefill)
        rows["none"]["generate"].append(base_gen)
        for n, adapter in adapters.items():
            rss0 = proc.memory_info().rss
            handle = load_nkv_adapter(model, adapter)
            buffers = sum(b.numel() * b.element_size() for b in handle.module.buffers())
            rss1 = proc.memory_info().rss
            p, g = timed(prefill, args.repeats), timed(generate, args.repeats)
            handle.detach()
            r = rows.setdefault(str(n), {"prefill": [], "generate": [], "prefill_ratio": [], "generate_ratio": []})
            r["prefill"].append(p)
            r["generate"].append(g)
            r["prefill_ratio"].append(p / base_prefill)
            r["generate_ratio"].append(g / base_gen)
            r["buffer_mb"] = buffers / 2**20
            r["rss_delta_mb"] = (rss1 - rss0) / 2**20

    gen_tok_s = args.new_tokens / statistics.median(rows["none"]["generate"])
    print(f"model: random Llama, {n_params / 1e6:.0f}M params, hidden {args.hidden}, d_ff {args.intermediate}, "
          f"{args.layers} layers, fp32, adapter at layer {layer}; prompt {args.prompt_len} tokens, "
          f"generate {args.new_tokens}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print(f"no adapter: prefill {statistics.median(rows['none']['prefill']) * 1e3:.1f} ms, "
          f"generate {gen_tok_s:.1f} tokens/s")
    print("| facts | prefill time ratio | generate time ratio | adapter buffers (MiB) | gate FLOPs / model FLOPs per token |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.facts:
        r = rows[str(n)]
        flop_ratio = (2 * n * args.intermediate) / (2 * n_params)
        print(f"| {n:,} | {statistics.median(r['prefill_ratio']):.3f} | {statistics.median(r['generate_ratio']):.3f} "
              f"| {r['buffer_mb']:.0f} | {flop_ratio:.3f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "n_params": n_params, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
