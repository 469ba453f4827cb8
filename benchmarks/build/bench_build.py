"""`nkv build`'s default against other build paths, interleaved in one run: facts/s, quality, memory.

Each mode is its own worker process (so its peak RSS is its own) with the model loaded
once. The facts are split into chunks and the workers take turns, chunk by chunk (A1 B1
A2 B2 ...), so a machine shared with other jobs slows every mode alike and the facts/s
ratio stays honest. After the last chunk each worker puts all its rows into one adapter
and evaluates it with `evaluate_adapter` (`nkv eval`'s measurement) after all edits:
efficacy, generalization, specificity, free-generation exact match.

Modes (a preset name, optionally with settings: `default@opt_prefixes=2`):
- `default`: today's `default_config(model)`;
- `fast`: `default_config(model, preset="fast")`, the default optimised under the bare
  prompt and one context prefix;
- `previous`: `default_config(model, preset="previous")`, the build as it was before the
  fast defaults (same batching, prefix cache, replay; Adam to a loss threshold under all
  context prefixes);
- `one-at-a-time`: the previous settings, one fact per forward/backward, whole sequences
  through every block, `torch.optim.Adam` per fact (MEMIT's compute_z loop).

    python benchmarks/build/bench_build.py --model smollm2-135m --data counterfact --n 64
    python benchmarks/build/bench_build.py --model examples/factworld/models/llama \\
        --data examples/factworld/edits.jsonl --n 64

`--model` takes what `nkv build` takes (a folder, a packaged name such as smollm2-135m) or
`tiny:<model_type>` (a random tiny model from tests/tiny_models.py); `--random` initialises
a folder's config randomly (a real size without its weights, e.g. a Llama-3-8B config on a
GPU: `--random --device cuda --dtype bfloat16 --no-eval`; `--tokenizer` names another folder
when the config's has none: benchmarks/device).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
DATASETS = {"counterfact": "counterfact-edit.json", "zsre": "zsre_mend_edit.json"}
MODES = ("default", "fast", "previous", "one-at-a-time")


def _load(args: argparse.Namespace):
    import torch

    dtype = getattr(torch, args.dtype)
    if args.model.startswith("tiny:"):
        sys.path.insert(0, str(ROOT / "tests"))
        import tiny_models

        return tiny_models.tiny_model(args.model[5:], dtype=dtype).eval(), tiny_models.tiny_tokenizer()
    if args.random:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model), dtype=dtype)
        return model.eval(), AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    from nkv.loaders.models import load_model

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    return model.eval(), tok


def _facts_path(data: str) -> Path:
    return DATA / DATASETS[data] if data in DATASETS else Path(data)


def worker(args: argparse.Namespace) -> None:
    """One mode: load, then build the chunks the parent names on stdin; `finish` evaluates."""
    import torch

    from nkv.editing.evaluate import EvalOptions, evaluate_adapter
    from nkv.editing.forward import frozen
    from nkv.editing.solve import (compute_rows, default_config, default_layer, generate_prefixes, joint_groups,
                                   tokenize_for_build)
    from nkv.facts_io import read_facts
    from nkv.loaders.architectures import empty_adapter_for
    from nkv.loaders.transformers import attach

    torch.set_num_threads(args.threads)
    model, tok = _load(args)
    items = read_facts(_facts_path(args.data))[: args.n]
    name, settings = _mode_settings(args.mode)
    preset = "previous" if name == "one-at-a-time" else name
    overrides = {"batch_size": 1 if name == "one-at-a-time" else args.batch_size, **json.loads(args.config), **settings}
    config = default_config(model, preset=preset, **overrides)
    layer = default_layer(model) if args.layer is None else args.layer
    with frozen(model):
        prefixes = generate_prefixes(model, tok, config.n_prefixes, config.prefix_length, config.seed)
        tokens = tokenize_for_build(model, tok, items, prefixes, config)
        # the facts nkv build solves together; a group is built in the turn of its first fact
        groups = (joint_groups(model, tok, tokens, [i.fact for i in items], layer) if config.joint_subjects
                  else [[i] for i in range(len(items))])
    parts, seconds = [], 0.0
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "chunk":
            start, end = int(cmd[1]), int(cmd[2])
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            began = time.perf_counter()
            turn = [g for g in groups if start <= g[0] < end]
            idx = [i for g in turn for i in g]
            local = {i: k for k, i in enumerate(idx)}
            with frozen(model):
                rows = compute_rows(model, tok, [tokens[i] for i in idx], layer, config,
                                    groups=[[local[i] for i in g] for g in turn], reference=name == "one-at-a-time")
            rows["index"] = torch.tensor(idx, dtype=torch.long)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            took = time.perf_counter() - began
            seconds += took
            parts.append(rows)
            print(json.dumps({"seconds": took}), flush=True)
        elif cmd[0] == "finish":
            break
    rows = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    order = torch.argsort(rows.pop("index"))  # back to the facts' order
    rows = {name: t[order] for name, t in rows.items()}
    n = rows["keys"].shape[0]
    facts = [i.fact for i in items[:n]]
    adapter = empty_adapter_for(model, layer, args.gamma).add(facts, rows["keys"], rows["residuals"])
    result = {"mode": args.mode, "n_facts": n, "layer": layer, "config": config.to_dict(),
              "seconds": round(seconds, 2), "facts_per_s": round(n / seconds, 4),
              "mean_updates": round(float(rows["steps"].float().mean()), 2),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "peak_gpu_mb": (round(torch.cuda.max_memory_allocated() / 2**20, 1)
                              if torch.cuda.is_available() else None)}
    if not args.no_eval:
        handle = attach(model, adapter)
        try:
            report = evaluate_adapter(model, tok, handle, items[:n], options=EvalOptions(measure_pre=False),
                                      data_name=str(args.data))
        finally:
            handle.detach()
        result["metrics"] = {k: m.get("post") for k, m in report.metrics.items()}
        result["gate"] = {k: report.gate.get(k) for k in ("edit_right", "paraphrase_right", "false_fire")}
    print(json.dumps(result), flush=True)


def _mode_settings(mode: str) -> tuple[str, dict]:
    """"default@opt_prefixes=2@steps=8" -> ("default", {"opt_prefixes": 2, "steps": 8})."""
    name, *pairs = mode.split("@")
    if name not in MODES:
        sys.exit(f"unknown mode {name!r}; known: {', '.join(MODES)}")
    return name, {k: json.loads(v) for k, v in (pair.split("=", 1) for pair in pairs)}


def _start(mode: str) -> subprocess.Popen:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    _reply(proc, mode)
    return proc


def _reply(proc: subprocess.Popen, mode: str) -> dict:
    while True:  # libraries may write stray lines to stdout; the worker's replies are JSON objects
        line = proc.stdout.readline()
        if not line:
            sys.exit(f"{mode} worker died (its stderr is above)")
        if line.startswith("{"):
            return json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default="counterfact", help=f"{' | '.join(DATASETS)} or a facts file")
    parser.add_argument("--n", type=int, default=64, help="facts to build")
    parser.add_argument("--modes", default="default,previous", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--chunk", type=int, default=16, help="facts per turn; the modes alternate chunk by chunk")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--layer", type=int, help="default: the model's default layer")
    parser.add_argument("--gamma", type=float, default=0.65)
    parser.add_argument("--config", default="{}", help='build settings for every mode, JSON, e.g. \'{"steps": 10}\'')
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every mode")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--random", action="store_true", help="random weights of --model's config")
    parser.add_argument("--tokenizer", help="with --random: a folder or name to load the tokenizer from (default: --model)")
    parser.add_argument("--no-eval", action="store_true", help="speed and memory only")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        worker(args)
        return

    import torch

    modes = args.modes.split(",")
    for mode in modes:
        _mode_settings(mode)  # a typo fails here, not after the first chunk
    started = time.perf_counter()
    workers = {mode: _start(mode) for mode in modes}
    for start in range(0, args.n, args.chunk):
        for mode, proc in workers.items():
            proc.stdin.write(f"chunk {start} {min(start + args.chunk, args.n)}\n")
            proc.stdin.flush()
            took = _reply(proc, mode)["seconds"]
            print(f"{mode}: facts {start}..{min(start + args.chunk, args.n)} in {took:.1f} s", file=sys.stderr)
    results = {}
    for mode, proc in workers.items():  # evaluations run one after another, not timed
        proc.stdin.write("finish\n")
        proc.stdin.flush()
        results[mode] = _reply(proc, mode)
        proc.wait()
    base = results[modes[-1]]["facts_per_s"]
    report = {
        "command": "python benchmarks/build/bench_build.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_avg_at_end": os.getloadavg()[0],
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "wall_s": round(time.perf_counter() - started, 1),
        "modes": results,
        "speedup_vs_" + modes[-1]: {m: round(r["facts_per_s"] / base, 2) for m, r in results.items()},
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
