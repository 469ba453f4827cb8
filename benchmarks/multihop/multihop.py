"""Multi-hop questions after an edit (MQuAKE-style), NKV vs the fact in the prompt.

    python benchmarks/multihop/multihop.py --out benchmarks/multihop/results

`cases.json` holds 24 two-hop chains written for this benchmark from public knowledge
(landmark -> city -> country; company -> country -> capital; person -> country ->
language). Each case edits the first hop (s, r, o -> o*) and asks a question whose answer
goes through it: "The Eiffel Tower is located in the city of" Paris -> Rome, then "The
Eiffel Tower is located in the country of", now Italy. The second hop ("Rome is a city in
the country of" Italy) is a fact about o*, not about s: no edit touches it.

Steps: write `multihop.jsonl` (our facts schema: the edit, the two-hop question as a
`portability` item of kind "multi-hop", the second hop as a neighbour) so `nkv build` /
`nkv eval` run on it as they are; check what the unedited model knows (greedy: hop 1's old
answer, hop 2, the two-hop question's old answer); build the adapter with `nkv build`
defaults; then measure, for the unedited model, NKV, and the edit as text in the prompt
(`../retrieval/icl.py`, BM25 top-1 over the 24 edits, IKE's template):

* edit (greedy): the edit prompt generates o*;
* two-hop new / old (greedy): the question generates the new answer / still the old one;
* portability (teacher-forced): KnowEdit's token accuracy of the new two-hop answer;
* hop 2 kept (greedy): the second hop still generates its answer.

Everything on all cases, on the "known" ones (the unedited model generates hop 1's old
answer and hop 2's answer, MQuAKE's filter), and per kind of chain.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "retrieval"))

from icl import KeywordIndex, command_line, measure_in_context, with_context  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--cases", default=str(HERE / "cases.json"))
    p.add_argument("--adapter", help="an adapter already built from multihop.jsonl (default: build one)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "nkv-multihop"),
                   help="where the built adapter goes (not committed)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results"))
    return p.parse_args(argv)


def write_facts(cases: list[dict], path: Path) -> Path:
    """The cases in our facts schema (one edit, its two-hop question, its second hop)."""
    lines = []
    for c in cases:
        lines.append(json.dumps({
            "id": c["subject"].lower().replace(" ", "-"), "subject": c["subject"], "prompt": c["prompt"],
            "target_new": c["new"], "target_true": c["true"],
            "portability": [{"prompt": c["two_hop"], "target": c["two_hop_new"], "kind": "multi-hop"}],
            "neighborhood": [{"prompt": c["link"], "target": c["two_hop_new"]}]}, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def greedy(model, tok, pairs: list[tuple[str, str]]) -> list[float]:
    from nkv.editing.generation import free_generation_exact

    return [float(h) for h in free_generation_exact(model, tok, pairs, 8)]


def probes(cases: list[dict], prompts: dict[str, list[str]] | None = None) -> dict[str, list[tuple[str, str]]]:
    """The greedy checks, (prompt, answer) per case; `prompts` replaces the questions (in-context runs)."""
    q = prompts or {"edit": [c["prompt"] for c in cases], "two_hop": [c["two_hop"] for c in cases],
                    "link": [c["link"] for c in cases]}
    return {"hop1_old": [(p, c["true"]) for p, c in zip(q["edit"], cases)],
            "edit": [(p, c["new"]) for p, c in zip(q["edit"], cases)],
            "two_hop_new": [(p, c["two_hop_new"]) for p, c in zip(q["two_hop"], cases)],
            "two_hop_old": [(p, c["two_hop_true"]) for p, c in zip(q["two_hop"], cases)],
            "hop2_kept": [(p, c["two_hop_new"]) for p, c in zip(q["link"], cases)]}


def run_probes(model, tok, checks: dict[str, list[tuple[str, str]]]) -> dict[str, list[float]]:
    return {name: greedy(model, tok, pairs) for name, pairs in checks.items()}


def summarise(hits: dict[str, list[float]], keep: list[bool], portability: float | None) -> dict:
    out = {name: round(100 * statistics.mean([v for v, k in zip(vals, keep) if k]), 1) if any(keep) else None
           for name, vals in hits.items()}
    out["portability"] = portability
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from nkv import NKVAdapter
    from nkv.editing.evaluate import EvalOptions, evaluate
    from nkv.facts_io import read_facts
    from nkv.loaders.models import load_model
    from nkv.loaders.transformers import attach

    started = time.time()
    cases = json.loads(Path(args.cases).read_text(encoding="utf-8"))
    data = write_facts(cases, HERE / "multihop.jsonl")
    facts = read_facts(data)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    adapter_path = Path(args.adapter) if args.adapter else work / "multihop.nkv"
    build_s = None
    if not adapter_path.exists():
        t = time.time()
        nkv = Path(sys.executable).with_name("nkv")  # the CLI of this environment, as a user runs it
        subprocess.run([str(nkv), "build", str(data), "--model", args.model, "-o", str(adapter_path), "--quiet"],
                       check=True)
        build_s = round(time.time() - t, 1)
    model, tok = load_model(args.model, device="cpu")
    adapter = NKVAdapter.load(adapter_path)

    unedited = run_probes(model, tok, probes(cases))
    known = [a == 1.0 and b == 1.0 for a, b in zip(unedited["hop1_old"], unedited["hop2_kept"])]
    options = EvalOptions(gate_diagnostics=False, fluency_prompts=0, free_generation=False, protocol="counterfact")
    report = evaluate(model, tok, adapter, facts, options=options, data_name=data.name)
    per_case = report.knowedit["portability"]
    handle = attach(model, adapter)
    try:
        nkv = run_probes(model, tok, probes(cases))
    finally:
        handle.detach()
    got = with_context(facts, KeywordIndex([f.fact for f in facts]), k=1)
    prompts = {"edit": [g.fact.prompt for g in got.facts], "two_hop": [g.portability[0][1] for g in got.facts],
               "link": [g.neighborhood[0][0] for g in got.facts]}
    icl = run_probes(model, tok, probes(cases, prompts))
    icl_port = measure_in_context(model, tok, got.facts, "counterfact", options)["knowedit"]["portability"]

    result = {"model": args.model, "cases": len(cases), "n_known": sum(known), "adapter": {
        "n_facts": adapter.n_facts, "layer": adapter.layer, "gamma": adapter.gamma}, "build_s": build_s,
        "machine": f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "command": command_line("benchmarks/multihop/multihop.py", argv or sys.argv[1:])}
    groups = {"all": [True] * len(cases), "known": known}
    groups.update({chain: [c["chain"] == chain for c in cases] for chain in dict.fromkeys(c["chain"] for c in cases)})
    result["groups"] = {}
    for name, keep in groups.items():
        port = (per_case["pre"], per_case["post"], icl_port["post"]) if name == "all" else (None, None, None)
        result["groups"][name] = {"n": sum(keep), "unedited": summarise(unedited, keep, port[0]),
                                  "nkv": summarise(nkv, keep, port[1]), "in_context": summarise(icl, keep, port[2])}
    result["per_case"] = [{"subject": c["subject"], "chain": c["chain"], "known": k,
                           **{f"{who}.{n}": h[n][i] for who, h in
                              (("unedited", unedited), ("nkv", nkv), ("in_context", icl)) for n in h}}
                          for i, (c, k) in enumerate(zip(cases, known))]
    result["wall_s"] = round(time.time() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "multihop.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(table(result))


def table(result: dict) -> str:
    cols = ("hop1_old", "edit", "two_hop_new", "two_hop_old", "hop2_kept", "portability")
    lines = ["| cases | editor | hop 1 old (greedy) | edit (greedy) | two-hop new (greedy) | two-hop old (greedy) "
             "| hop 2 kept (greedy) | portability (teacher-forced) |", "|---|---|" + "---:|" * len(cols)]
    for name, group in result["groups"].items():
        n = group["n"]
        for who, label in (("unedited", "unedited model"), ("nkv", "NKV"), ("in_context", "edit in the prompt")):
            r = group[who]
            cells = " | ".join("–" if r[c] is None else f"{r[c]:.1f}" for c in cols)
            lines.append(f"| {name} ({n}) | {label} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
