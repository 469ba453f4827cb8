"""γ x layer sweep for NKV at a fixed number of edits (the knobs behind the 1,000-edit targets).

    python benchmarks/compare/sweep.py --n 1000 --layers 0,1,2,3 --gammas 0.5,0.65,0.75,0.85

Rows are built once per layer (cached in --cache as rows-*.nkv, shared with compare.py);
γ only changes the gate, so each γ reuses them. Free generation and fluency are skipped
here (compare.py reports them at the chosen point). Writes sweep-n{N}.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare import CACHE, WORLD, load_model, rows_for  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(WORLD / "models" / "llama"))
    p.add_argument("--edits", default=str(WORLD / "edits.jsonl"))
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--layers", default="0,1,2,3")
    p.add_argument("--gammas", default="0.5,0.65,0.75,0.85")
    p.add_argument("--build", default="{}", help='build options as JSON, e.g. \'{"steps": 50}\'')
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--cache", default=str(CACHE), help="built rows (.nkv) are kept here between runs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from nkv.facts_io import read_facts
    from nkv.editing.evaluate import EvalOptions, evaluate, read_true_facts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model)
    all_facts = read_facts(args.edits)
    facts = all_facts[: args.n]
    edited = {f.fact.subject for f in all_facts}
    true_facts = [t for t in read_true_facts(WORLD / "true_facts.jsonl") if t.subject not in edited]
    generic = [line for line in (WORLD / "generic.txt").read_text().splitlines() if line.strip()]
    options = EvalOptions(free_generation=False, fluency_prompts=0)
    label = "".join(f"-{k}{v}" for k, v in sorted(json.loads(args.build).items()))
    path = out / f"sweep-n{args.n}{label}.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    done = {(r["layer"], r["gamma"]) for r in rows}
    for layer in [int(x) for x in args.layers.split(",")]:
        gammas = [float(g) for g in args.gammas.split(",") if (layer, float(g)) not in done]
        if not gammas:
            continue
        adapter, build_s = rows_for(model, tok, facts, layer, gammas[0], Path(args.cache), Path(args.edits).stem, args.build)
        for gamma in gammas:
            start = time.time()
            report = evaluate(model, tok, replace(adapter, gamma=gamma), facts, unrelated=generic,
                              true_facts=true_facts, options=options, data_name=Path(args.edits).name)
            m, g = report.metrics, report.gate
            row = {"layer": layer, "gamma": gamma, "build_s": round(build_s, 1), "eval_s": round(time.time() - start, 1),
                   **{k: m[k]["post"] for k in ("efficacy", "generalization", "specificity", "unedited_facts")},
                   "specificity_pre": m["specificity"]["pre"], "unedited_pre": m["unedited_facts"]["pre"],
                   "gate_right": g["edit_right"], "paraphrase_right": g["paraphrase_right"],
                   "false_fire": g["false_fire"], "false_fire_shared": g["false_fire_shared"],
                   "weak_spots": report.weak_spots,
                   "by_relation": {r: v["efficacy"]["post"] for r, v in report.by_relation.items()}}
            rows.append(row)
            path.write_text(json.dumps(rows, indent=1))
            print(json.dumps({k: v for k, v in row.items() if k != "weak_spots"}), file=sys.stderr)
    lines = ["| layer | γ | E | G | S (pre) | unedited acc. (pre) | gate right | paraphrase right | false fires % "
             "(on shared last tokens) | E by relation |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["layer"], r["gamma"])):
        lines.append(f"| {r['layer']} | {r['gamma']} | {r['efficacy']} | {r['generalization']} | {r['specificity']} "
                     f"({r['specificity_pre']}) | {r['unedited_facts']} ({r['unedited_pre']}) | {r['gate_right']} | "
                     f"{r['paraphrase_right']} | {r['false_fire']} ({r.get('false_fire_shared', '-')}) | "
                     + ", ".join(f"{k}: {v}" for k, v in r.get("by_relation", {}).items()) + " |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
