"""Batched build vs the one-fact-at-a-time reference: facts/s, ratio, edit success, peak memory.

Both modes run the same objective, hyperparameters, model, facts and context prefixes in
this one invocation; each runs in its own subprocess so its peak RSS is its own. The
reference computes keys and residuals one fact at a time (MEMIT's compute_z loop with
torch.optim.Adam); the batched build puts `--batch-size` facts in each forward/backward.

    python benchmarks/build/bench_build.py --model examples/factworld/models/llama \\
        --facts examples/factworld/edits.jsonl --n 64 --batch-size 64 --threads 1

`--model tiny:<model_type>` uses a random tiny model from tests/tiny_models.py;
`--random` initialises the model of `--model`'s config randomly (a real size without its
weights, e.g. a Llama-3-8B config folder on a GPU: `--random --device cuda --dtype bfloat16`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load(args: argparse.Namespace):
    import torch

    dtype = getattr(torch, args.dtype)
    if args.model.startswith("tiny:"):
        sys.path.insert(0, str(ROOT / "tests"))
        import tiny_models

        model, tok = tiny_models.tiny_model(args.model[5:], dtype=dtype), tiny_models.tiny_tokenizer()
    else:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        if args.random:
            torch.manual_seed(0)
            with torch.device(args.device):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model), dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    return model.to(args.device).eval(), tok


def run_mode(args: argparse.Namespace) -> dict:
    """One mode in this process: build, time, save the adapter, measure edit success."""
    import torch

    from nkv.adapter import empty_adapter
    from nkv.facts_io import read_facts
    from nkv.loaders.architectures import arch_spec, base_model_info, model_type_of
    from nkv.editing.solve import compute_rows, default_config, default_layer, encode_facts, generate_prefixes
    from nkv.editing.forward import frozen
    from nkv.editing.scoring import score_pairs
    from nkv.loaders.transformers import attach

    torch.set_num_threads(args.threads)
    model, tok = _load(args)
    items = read_facts(args.facts)[: args.n]
    overrides = {"batch_size": args.batch_size if args.mode == "batched" else 1}
    if args.steps:
        overrides["steps"] = args.steps
    config = default_config(model, **overrides)
    layer = default_layer(model) if args.layer is None else args.layer
    with frozen(model):
        prefixes = generate_prefixes(model, tok, config.n_prefixes, config.prefix_length, config.seed)
        tokens = encode_facts(tok, items, prefixes)
        started = time.perf_counter()
        rows = compute_rows(model, tok, tokens, layer, config, reference=args.mode == "reference")
        seconds = time.perf_counter() - started
    facts = [i.fact for i in items]
    adapter = empty_adapter(base_model_info(model, layer), layer,
                            arch_spec(model_type_of(model)).module_path(layer)).add(facts, rows["keys"], rows["residuals"])
    adapter.save(args.save)
    handle = attach(model, adapter)
    edit = score_pairs(model, tok, [(f.prompt, f.target_new) for f in facts])
    para = score_pairs(model, tok, [(p, i.fact.target_new) for i in items for p in i.paraphrases])
    handle.detach()
    return {
        "mode": args.mode, "n_facts": len(facts), "layer": layer, "steps": config.steps,
        "batch_size": config.batch_size, "seconds": round(seconds, 3), "facts_per_s": round(len(facts) / seconds, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mb": (round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None),
        "mean_updates": round(float(rows["steps"].float().mean()), 2),
        "edit_first_token": round(sum(s.first_token_hit for s in edit) / len(edit), 4),
        "edit_token_acc": round(sum(s.token_accuracy for s in edit) / len(edit), 4),
        "paraphrase_token_acc": round(sum(s.token_accuracy for s in para) / len(para), 4) if para else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--facts", required=True)
    parser.add_argument("--n", type=int, default=64, help="facts to build")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, help="default: the family's default")
    parser.add_argument("--layer", type=int, help="default: the family's default layer")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in both modes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--random", action="store_true", help="random weights of --model's config")
    parser.add_argument("--mode", choices=["batched", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return

    import torch

    from nkv.adapter import NKVAdapter

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("batched", "reference"):
            save = os.path.join(tmp, f"{mode}.nkv")
            cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode, "--save", save]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{mode} run failed:\n{out.stderr[-3000:]}")
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            results[mode]["adapter"] = NKVAdapter.load(save)
        a, b = results["batched"].pop("adapter"), results["reference"].pop("adapter")
    diff = (a.residuals - b.residuals).norm(dim=-1) / b.residuals.norm(dim=-1).clamp_min(1e-12)
    report = {
        "command": "python benchmarks/build/bench_build.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_avg_at_end": os.getloadavg()[0],
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "batched": results["batched"], "reference": results["reference"],
        "speedup": round(results["batched"]["facts_per_s"] / results["reference"]["facts_per_s"], 2),
        "residual_rel_diff_max": float(diff.max()),
        "keys_max_abs_diff": float((a.keys - b.keys).abs().max()),
    }
    print(json.dumps(report, indent=1))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
