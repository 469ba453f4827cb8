"""The paper's tables on real pretrained LLMs: NKV vs the MEMIT and AlphaEdit closed forms.

    python benchmarks/real/real.py --model smollm2-135m --data counterfact --n 100
    python benchmarks/real/real.py --model gemma3-270m --data zsre --n 100 --layer 5
    python benchmarks/real/real.py --model smollm2-135m --data counterfact --n 100,1000   # ~3 h of build

A thin driver around benchmarks/compare/compare.py (imported, not copied): it prepares,
for a real model and a real data set, the inputs compare.py expects, then runs it with the
paper's γ (0.65) and the layer `build_adapter` picks when none is given (`default_layer`).
NKV rows are built once with today's `nkv build` defaults; MEMIT and AlphaEdit use the same
keys and residuals; every evaluation runs after all n edits are applied.

Inputs it makes (reproducible, no network):
* unrelated text (MEMIT/AlphaEdit's C0 and NKV's false fires): `--generated` texts sampled
  from the unedited model (top-k 5, fixed seed) after "The", "Therefore", "Because", "I",
  "You", then CounterFact *train* sentences ("prompt target_true") whose subjects are not
  in either edited file. Written once per model to results/unrelated-<model>.txt.
* true facts (unedited-fact accuracy): CounterFact train records (prompt -> target_true)
  about subjects not in the edited file, written to the cache folder.

Results: results/<model>-<data>/{nkv,memit,alphaedit}-<n>.json (compare.py's format),
gate-nkv-<n>.png (γ histogram), run-<n>-<methods>.json (machine, wall time, command, layer).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DATA = ROOT.parent / "shared" / "data"
DATASETS = {"counterfact": "counterfact-edit.json", "zsre": "zsre_mend_edit.json"}
UNRELATED_SOURCE = "counterfact-train.json"  # disjoint cases from counterfact-edit.json
CACHE = Path(tempfile.gettempdir()) / "nkv-bench-real"
sys.path.insert(0, str(ROOT / "benchmarks" / "compare"))

import compare  # noqa: E402  (benchmarks/compare/compare.py)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="packaged name, .gguf file or transformers folder")
    p.add_argument("--data", default="counterfact", help=f"{' | '.join(DATASETS)} or a facts file")
    p.add_argument("--data-dir", default=str(DATA), help="where counterfact-*.json and zsre_*.json live")
    p.add_argument("--n", default="100", help="comma-separated numbers of edits")
    p.add_argument("--methods", default="nkv,memit,alphaedit")
    p.add_argument("--layer", type=int, default=None, help="default: what build_adapter picks (default_layer)")
    p.add_argument("--gamma", type=float, default=0.65, help="the paper's γ")
    p.add_argument("--generated", type=int, default=100, help="unrelated texts sampled from the unedited model")
    p.add_argument("--generated-tokens", type=int, default=64)
    p.add_argument("--sentences", type=int, default=3000, help="CounterFact-train sentences after the generated text")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--cache", default=str(CACHE), help="built rows and true facts (not committed)")
    p.add_argument("--tag", default="")
    p.add_argument("--compare-args", default="", help="extra compare.py options, e.g. '--memit-lambda 350'")
    return p.parse_args(argv)


def model_name(model: str) -> str:
    from nkv.loaders.gguf import PACKAGED

    return model if model in PACKAGED else Path(model).stem


def facts_path(args: argparse.Namespace) -> Path:
    return Path(args.data_dir) / DATASETS[args.data] if args.data in DATASETS else Path(args.data)


def edited_subjects(data_dir: Path) -> set[str]:
    from nkv.facts_io import read_facts

    return {f.fact.subject for name in DATASETS.values() if (data_dir / name).exists()
            for f in read_facts(data_dir / name)}


def write_true_facts(data_dir: Path, avoid: set[str], path: Path) -> Path:
    """CounterFact-train records about subjects never edited, as true-facts JSONL."""
    records = json.loads((data_dir / UNRELATED_SOURCE).read_text())
    with path.open("w") as fh:
        for r in records:
            if r["subject"] not in avoid and r["subject"] in r["prompt"]:
                fh.write(json.dumps({"subject": r["subject"], "prompt": r["prompt"], "target": r["ground_truth"]}) + "\n")
    return path


def write_unrelated(model, tok, data_dir: Path, avoid: set[str], args: argparse.Namespace, path: Path) -> Path:
    """Generated text from the unedited model, then CounterFact-train sentences (one per line)."""
    from nkv.editing.generation import SEED_WORDS
    from nkv.editing.generation import sample_texts

    if path.exists():
        return path
    prompts = [SEED_WORDS[i % len(SEED_WORDS)] for i in range(args.generated)]
    texts = sample_texts(model, tok, prompts, args.generated_tokens, seed=1234)
    lines = [" ".join(t.split()) for t in texts]
    records = json.loads((data_dir / UNRELATED_SOURCE).read_text())
    lines += [f"{r['prompt']} {r['ground_truth']}." for r in records if r["subject"] not in avoid][: args.sentences]
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from nkv.facts_io import read_facts
    from nkv.editing.solve import default_layer
    from nkv.loaders.gguf import model_source

    start = time.time()
    folder = model_source(args.model)
    model, tok = compare.load_model(folder)
    layer = default_layer(model) if args.layer is None else args.layer
    data_dir = Path(args.data_dir)
    edits = facts_path(args)
    name = model_name(args.model)
    data = args.data if args.data in DATASETS else edits.stem
    out = Path(args.out) / f"{name}-{data}"
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) / f"{name}-{data}"  # compare.rows_for's checkpoint folder is per layer only
    cache.mkdir(parents=True, exist_ok=True)
    avoid = edited_subjects(data_dir) | {f.fact.subject for f in read_facts(edits)}  # same set for both data sets
    true_facts = write_true_facts(data_dir, avoid, cache / "true_facts.jsonl")
    unrelated = write_unrelated(model, tok, data_dir, avoid, args, Path(args.out) / f"unrelated-{name}.txt")
    print(f"{name}: layer {layer} ({'default_layer' if args.layer is None else 'given'}), γ {args.gamma}; "
          f"inputs ready in {time.time() - start:.0f} s", file=sys.stderr)

    compare.load_model = lambda path: (model, tok)  # already loaded: reuse it
    compare.main(["--model", folder, "--edits", str(edits), "--true-facts", str(true_facts),
                  "--generic", str(unrelated), "--sizes", args.n, "--methods", args.methods,
                  "--layer", str(layer), "--gamma", str(args.gamma), "--threads", str(args.threads),
                  "--out", str(out), "--cache", str(cache), "--tag", args.tag, *args.compare_args.split()])
    run = {"model": args.model, "model_folder": Path(folder).name, "data": edits.name, "n": args.n,
           "methods": args.methods, "layer": layer, "layer_mode": "default_layer" if args.layer is None else "given",
           "gamma": args.gamma, "wall_s": round(time.time() - start, 1), "threads": args.threads,
           "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
                      f"torch {torch.__version__}, Python {platform.python_version()}",
           "command": "python benchmarks/real/real.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    # one record per run: a later run of other methods on the same n must not replace it
    methods = args.methods.replace(",", "_")
    (out / f"run-{args.n.replace(',', '_')}-{methods}{args.tag}.json").write_text(json.dumps(run, indent=1))
    print(json.dumps(run), file=sys.stderr)


if __name__ == "__main__":
    main()
