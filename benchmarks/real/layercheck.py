"""Does a layer edit a real model at all? Build a few CounterFact facts per layer, measure them.

    python benchmarks/real/layercheck.py --model gemma3-270m --n 8                 # default layer only
    python benchmarks/real/layercheck.py --model gemma3-270m --n 8 --layers 3,5,7,9

For each layer: the first n facts of the data file are built with today's `nkv build`
defaults (rows cached like benchmarks/real/real.py's), attached with the gate at γ, and
scored teacher-forced (CounterFact protocol: target_new beats target_true after the edit
prompt = efficacy; the same on paraphrases = generalization; neighbourhood prompts keep
their true answer = specificity). Writes results/layercheck-<model>-<data>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from real import CACHE, DATA, DATASETS, HERE, compare, model_name


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--data", default="counterfact")
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--layers", default="", help="comma-separated; empty = the default layer only")
    p.add_argument("--gamma", type=float, default=0.65)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--cache", default=str(CACHE))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from nkv.facts_io import read_facts
    from nkv.editing.solve import default_layer
    from nkv.editing.evaluate import EvalOptions, evaluate
    from nkv.loaders.gguf import model_source

    model, tok = compare.load_model(model_source(args.model))
    name = model_name(args.model)
    edits = Path(args.data_dir) / DATASETS.get(args.data, args.data)
    facts = read_facts(edits)[: args.n]
    default = default_layer(model)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else [default]
    path = Path(args.out) / f"layercheck-{name}-{Path(edits).stem}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    options = EvalOptions(free_generation=False, fluency_prompts=0, gate_diagnostics=False)
    for layer in layers:
        start = time.time()
        adapter, build_s = compare.rows_for(model, tok, facts, layer, args.gamma, Path(args.cache) / f"{name}-layercheck",
                                              edits.stem)
        report = evaluate(model, tok, adapter, facts, options=options, data_name=edits.name)
        m = report.metrics
        results[str(layer)] = {"default": layer == default, "n": len(facts), "gamma": args.gamma,
                               "build_s": round(build_s, 1), "wall_s": round(time.time() - start, 1),
                               **{k: m[k] for k in ("efficacy", "generalization", "specificity")}}
        print(f"layer {layer}{' (default)' if layer == default else ''}: E {m['efficacy']} G {m['generalization']} "
              f"S {m['specificity']} build {build_s:.0f} s", file=sys.stderr)
        path.write_text(json.dumps(dict(sorted(results.items(), key=lambda kv: int(kv[0]))), indent=1))


if __name__ == "__main__":
    main()
