"""Generated tokens/s and memory of a vLLM engine with an NKV adapter of 1k / 10k / 100k facts vs none.

Design, for a machine shared with other work (2 cores here, whose load changes by the
second): one engine per configuration, each in its own child process (its RSS is its
own), all with the same engine settings, all alive at once but only one generating at a
time. The driver runs rounds; in each round every engine runs the same batch once, in
rotating order. Slow drift of the machine's load then hits all configurations alike, and
the per-round ratio to the no-adapter engine (its median over rounds) is the figure to
read. The model is a randomly initialised Llama config (`load_format="dummy"`); adapters
hold random keys and residuals of the right shape, which is all throughput depends on:
the gate scores every preallocated row on every token whether it fires or not.

    python benchmarks/vllm/bench_throughput.py --out benchmarks/vllm/results-cpu.json

Named adapters chosen per request (issue 15): an engine spec `NxF` holds N named adapters of
F facts each (`max_adapters` N), and request i of every batch names adapter i mod N, so a
batch mixes all of them; `F` alone is one engine-wide adapter, `0` no nkv config at all:

    python benchmarks/vllm/bench_throughput.py --facts 0,10000,1x10000,4x10000,16x10000 \
        --out benchmarks/vllm/results-cpu-134m-named.json

Prints a Markdown table at the end (and writes all timings to --out; `--summarize FILE`
prints the table of a saved file again).
"""

from __future__ import annotations

import argparse
import json
import os
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
    p.add_argument("--facts", default="0,1000,10000,100000",
                   help="engines: F = one engine-wide adapter of F facts, NxF = N named adapters of F facts each "
                        "(requests spread evenly), 0 = no nkv config at all")
    p.add_argument("--batch", type=int, default=16, help="prompts per generate call")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=15, help="timed generate calls per engine, interleaved")
    p.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's compiled mode)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--summarize", type=Path, default=None, help="print the table of a saved --out file and exit")
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # internal: child engine
    return p.parse_args(argv)


# ------------------------------------------------------------------ one engine (child process)
def make_model_dir(args: argparse.Namespace, folder: Path) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                max_position_embeddings=4096, architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    return folder


def make_adapter(args: argparse.Namespace, n_facts: int, path: Path, seed: int = 0) -> Path:
    """Random rows of the right shape, built directly (row-op checks are O(n^2) in ids at 100k)."""
    import torch

    from nkv import Fact, NKVAdapter
    from nkv.header import BaseModelInfo

    torch.manual_seed(seed)
    dtype = getattr(torch, args.dtype)
    layer = args.layers // 2 if args.edit_layer is None else args.edit_layer
    base = BaseModelInfo(name="random-llama", architecture="LlamaForCausalLM", model_type="llama",
                         n_layers=args.layers, d_model=args.hidden, d_key=args.intermediate,
                         fingerprint="nkvfp1:fro=1.000000e+00;z=" + ",".join(["0.0000"] * 16))
    facts = [Fact(id=f"f{i}", subject=f"s{i}", prompt=f"s{i} is", target_new="x") for i in range(n_facts)]
    adapter = NKVAdapter(keys=_random_rows(n_facts, args.intermediate, dtype),
                         residuals=_random_rows(n_facts, args.hidden, dtype), facts=facts, layer=layer,
                         gamma=0.65, base=base, target_module=f"model.layers.{layer}.mlp.down_proj")
    # as the CLI writes it: from SKETCH_MIN_FACTS facts with a fitted projection and the keys' sketches
    return adapter.sketched_at_scale().save(path)


def _random_rows(n: int, width: int, dtype: Any) -> Any:
    """(n, width) standard normal rows in `dtype`, drawn 65,536 rows at a time: at 1M facts a
    float32 draw of the whole table would take 8 GB beside its cast."""
    import torch

    out = torch.empty(n, width, dtype=dtype)
    for start in range(0, n, 65536):
        rows = out[start : start + 65536]
        rows.copy_(torch.randn(rows.shape[0], width))
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def parse_spec(spec: str) -> tuple[int, int, bool | None, int | None, int | None]:
    """(named adapters, facts each, sketch, fact_chunk, shortlist): "4x10000" -> (4, 10000, None, None,
    None); "10000" -> (0, 10000, None, None, None), one engine-wide. Suffixes, each after a ':':
    "sketch" / "exact" force the gate's sketch path on / off (None: auto); "chunkN" sets
    additional_config fact_chunk N (the sketch path scores max(N, 8 d_key) sketches per top-k);
    "shortN" sets its shortlist N (None: the loader's default)."""
    spec, *suffixes = spec.split(":")
    sketch = fact_chunk = shortlist = None
    for suffix in suffixes:
        if suffix in ("sketch", "exact"):
            sketch = suffix == "sketch"
        elif suffix.startswith("chunk") and suffix[5:].isdigit():
            fact_chunk = int(suffix[5:])
        elif suffix.startswith("short") and suffix[5:].isdigit():
            shortlist = int(suffix[5:])
        else:
            raise SystemExit(f"engine spec {spec}:{suffix}: each suffix must be sketch, exact, chunkN or shortN")
    named, _, facts = spec.rpartition("x")
    return (int(named) if named else 0), int(facts), sketch, fact_chunk, shortlist


def serve(args: argparse.Namespace, spec: str) -> None:
    """Start one engine, report READY with memory figures, then time one batch per 'run' on stdin."""
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
    named, n_facts, sketch, fact_chunk, shortlist = parse_spec(spec)
    names: list[str | None] = [None]
    if n_facts and not named:
        path = make_adapter(args, n_facts, work / "adapter.nkv")
        kwargs["additional_config"] = {"nkv": {"adapter": str(path), "strict": False, "sketch": sketch}
                                       | ({"fact_chunk": fact_chunk} if fact_chunk else {})
                                       | ({"shortlist": shortlist} if shortlist else {})}
    elif n_facts:
        names = [f"a{i}" for i in range(named)]
        kwargs["additional_config"] = {"nkv": {
            "strict": False, "max_adapters": named, "sketch": sketch,
            "adapters": {name: str(make_adapter(args, n_facts, work / f"{name}.nkv", seed=i))
                         for i, name in enumerate(names)}}}
    if n_facts:
        itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
        adapter_bytes = max(named, 1) * n_facts * ((args.intermediate + args.hidden) * itemsize + 4)
    rss_before = rss_bytes()
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    start_s = time.perf_counter() - t0
    rss_started = rss_bytes()

    gen = torch.Generator().manual_seed(1)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(10, args.vocab, (args.prompt_len,), generator=gen).tolist())
               for _ in range(args.batch)]
    # request i names adapter i mod N: every batch mixes all resident adapters
    params = [SamplingParams(temperature=0.0, max_tokens=args.gen_len, ignore_eos=True, detokenize=False,
                             extra_args=None if names[i % len(names)] is None else {"nkv": names[i % len(names)]})
              for i in range(args.batch)]
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    ready = {"spec": spec, "named": named, "n_facts": n_facts, "sketch": sketch, "engine_start_s": round(start_s, 1),
             "adapter_buffer_mib": round(adapter_bytes / 2**20, 1),
             "rss_engine_mib": round((rss_started - rss_before) / 2**20, 1),
             "rss_after_start_mib": round(rss_started / 2**20, 1)}
    print("READY " + json.dumps(ready), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        llm.reset_prefix_cache()  # every round computes its prompts again
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t
        assert sum(len(o.outputs[0].token_ids) for o in outs) == args.batch * args.gen_len
        print(f"TIME {elapsed:.6f}", flush=True)


# ------------------------------------------------------------------ driver
def _machine() -> dict[str, Any]:
    import platform

    import torch
    import vllm

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg(), "torch": torch.__version__,
            "vllm": vllm.__version__, "python": platform.python_version()}



def _read(child: subprocess.Popen, prefix: str) -> str:
    for line in child.stdout:  # type: ignore[union-attr]
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    raise SystemExit(f"an engine exited before printing {prefix.strip()} (exit {child.wait()}); see its log")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.summarize is not None:
        print(summarize(json.loads(args.summarize.read_text())))
        return
    if args.serve is not None:
        serve(args, args.serve)
        return
    sizes = [s.strip() for s in args.facts.split(",") if s.strip()]
    for spec in sizes:
        parse_spec(spec)  # a bad spec fails here, before any engine starts
    child_args = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                  if k not in ("out", "serve", "summarize", "eager", "edit_layer", "facts")]
    child_args += ["--eager"] * args.eager
    if args.edit_layer is not None:
        child_args.append(f"--edit-layer={args.edit_layer}")
    logs = Path(tempfile.mkdtemp(prefix="nkv-bench-logs-"))
    children, ready = {}, {}
    try:
        for n in sizes:  # started one after another, so compilations do not compete with each other
            log = open(logs / f"engine-{n}.log", "w")
            children[n] = subprocess.Popen([sys.executable, __file__, *child_args, f"--serve={n}"], text=True,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
            ready[n] = json.loads(_read(children[n], "READY "))
            print(f"ready: {json.dumps(ready[n])}", file=sys.stderr, flush=True)
        times: dict[str, list[float]] = {n: [] for n in sizes}
        for r in range(args.rounds):
            order = sizes[r % len(sizes):] + sizes[:r % len(sizes)]  # rotate who goes first
            for n in order:
                children[n].stdin.write("run\n")  # type: ignore[union-attr]
                children[n].stdin.flush()  # type: ignore[union-attr]
                times[n].append(float(_read(children[n], "TIME ")))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n}: {times[n][-1]:.2f}s" for n in sizes),
                  file=sys.stderr, flush=True)
    finally:
        for child in children.values():
            if child.stdin:
                child.stdin.close()
        for child in children.values():
            child.wait(timeout=120)

    results = [{**ready[n], "times_s": [round(t, 4) for t in times[n]]} for n in sizes]
    report = {"args": {k: v for k, v in vars(args).items() if k not in ("out", "serve", "summarize")},
              "machine": _machine(), "results": results}
    print(summarize(report))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")


def summarize(report: dict[str, Any]) -> str:
    """Markdown table from a report (also: `--summarize results.json`).

    best: the fastest of the rounds, the one least disturbed by other load on a shared
    machine. paired: median over rounds of (baseline time / this time) in the same round.
    bytes: what a memory-bound decode step predicts, 1 / (1 + key bytes / weight bytes read).
    """
    a, results = report["args"], report["results"]
    generated = a["batch"] * a["gen_len"]
    base = results[0]
    h, f, n_layers, v = a["hidden"], a["intermediate"], a["layers"], a["vocab"]
    weights_read = n_layers * (4 * h * h + 3 * h * f) + v * h  # per decode step: blocks + lm_head
    rows = ["| facts | tok/s best | vs none | tok/s median | paired vs none (median) | predicted (bytes) | "
            "adapter buffers MiB | engine RSS MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        best, median = generated / min(r["times_s"]), generated / statistics.median(r["times_s"])
        base_best = generated / min(base["times_s"])
        paired = statistics.median(tb / tn for tn, tb in zip(r["times_s"], base["times_s"]))
        # each token scores its own adapter's rows (the sketch path: d_sketch + 1 values per row, not d_key)
        mode = r.get("sketch", False)  # runs from before the sketch path in vLLM: exact
        per_row = min(129, f) if mode is True or (mode is None and r["n_facts"] >= 16384) else f
        predicted = 1.0 / (1.0 + r["n_facts"] * per_row / weights_read)
        named = r.get("named", 0)
        label = f"{named} named x {r['n_facts']:,}" if named else f"{r['n_facts']:,}"
        label += {True: " sketch", False: " exact"}.get(r.get("sketch", "absent"), "")
        label += f", fact_chunk {parse_spec(r['spec'])[3]:,}" if parse_spec(r.get("spec", "0"))[3] else ""
        label += f", shortlist {parse_spec(r['spec'])[4]}" if parse_spec(r.get("spec", "0"))[4] else ""
        rows.append(f"| {label} | {best:.0f} | {100 * (best / base_best - 1):+.1f}% | {median:.0f} | "
                    f"{100 * (paired - 1):+.1f}% | {100 * (predicted - 1):+.1f}% | {r['adapter_buffer_mib']} | "
                    f"{r['rss_engine_mib']} |")
    return "\n".join(rows)

if __name__ == "__main__":
    main()
