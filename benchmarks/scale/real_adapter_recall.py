"""Sketch-path recall on a real built adapter (issue 12): on every token of the adapter's own
edit prompts and one paraphrase per fact, does the sketch path (spec §5.1) make the exact
gate's decision (same fired / not fired, and the same row where fired)?

    python benchmarks/scale/real_adapter_recall.py --nkv ROWS.nkv --data ../shared/data/counterfact-edit.json

The adapter is attached with the transformers loader; the exact gate's and the sketch
path's per-token decisions are recorded on the same forwards (`handle.record`). Prints one
JSON line per (prompt kind, shortlist).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def decisions(model, tok, handle, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(fired, row) of every token of every prompt, concatenated."""
    fired, index = [], []
    with torch.no_grad(), handle.record(keep_results=True) as activity:
        for prompt in prompts:
            model(**tok(prompt, return_tensors="pt"))
    for result in activity.results:
        fired.append(result.fired.reshape(-1))
        index.append(result.index.reshape(-1))
    return torch.cat(fired), torch.cat(index)


def main() -> None:
    from nkv import NKVAdapter, load_nkv_adapter
    from nkv.facts_io import read_facts
    from nkv.loaders.models import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nkv", required=True, help="a built adapter")
    p.add_argument("--data", required=True, help="the facts file it was built from (for the paraphrases)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--shortlists", default="128,32")
    p.add_argument("--kinds", default="edit,paraphrase", help="which prompts: edit, paraphrase")
    args = p.parse_args()
    torch.set_num_threads(1)

    model, tok = load_model(args.model, device="cpu")
    model.eval()
    adapter = NKVAdapter.load(args.nkv)
    inputs = {f.fact.id: f for f in read_facts(args.data)}
    prompts = {"edit": [f.prompt for f in adapter.facts],
               "paraphrase": [inputs[f.id].paraphrases[0] for f in adapter.facts
                              if f.id in inputs and inputs[f.id].paraphrases]}
    prompts = {kind: texts for kind, texts in prompts.items() if kind in args.kinds.split(",")}
    handle = load_nkv_adapter(model, adapter)
    handle.module.use_sketch(adapter, 0)  # the exact gate: the reference
    exact = {kind: decisions(model, tok, handle, texts) for kind, texts in prompts.items()}
    for shortlist in [int(s) for s in args.shortlists.split(",")]:
        handle.module.use_sketch(adapter, shortlist)
        for kind, texts in prompts.items():
            start = time.time()
            fired, index = decisions(model, tok, handle, texts)
            ref_fired, ref_index = exact[kind]
            same = (fired == ref_fired) & (~ref_fired | (index == ref_index))
            print(json.dumps({"kind": kind, "n_facts": adapter.n_facts, "prompts": len(texts),
                              "tokens": int(fired.numel()), "shortlist": shortlist,
                              "fired_exact": int(ref_fired.sum()), "fired_sketch": int(fired.sum()),
                              "same_decision_pct": round(100 * float(same.float().mean()), 3),
                              "fired_only_by_sketch": int((fired & ~ref_fired).sum()),
                              "seconds": round(time.time() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
