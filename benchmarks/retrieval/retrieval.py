"""NKV vs in-context editing with retrieval (IKE-like), same facts, same model, one run.

    python benchmarks/retrieval/retrieval.py --adapter cf100.nkv --data cf100.json \\
        --sizes 100,1000,10000 --out benchmarks/retrieval/results

`--data` holds the edited facts and `--adapter` an NKV adapter built from exactly them
(`nkv build cf100.json --model smollm2-135m -o cf100.nkv`). What runs:

1. NKV: `nkv eval`'s `evaluate` (pre and post; no gate diagnostics, no fluency).
2. Retrieval (`icl.py`): the edited facts as text in a BM25 index, the top-1 fact
   prepended to every request in IKE's template, scored by the same `measure`. At size N
   the index holds the edited facts plus N - n real CounterFact-train records
   (`--distractors`, disjoint from the edited file), so retrieval must find the right one.
3. Serving cost per request at each size (batch 1, greedy, `--new-tokens` tokens, one
   thread; median over `--requests` edit prompts, the three requests of each prompt run
   back to back so they share the machine's load): the base model; NKV with an adapter of
   N rows (the built rows, then padding rows: keys drawn from a normal distribution with
   the built keys' per-dimension mean and std, residuals the built residuals repeated;
   the padded adapter is timed only, never scored); retrieval (search + the longer prompt).

Writes results/retrieval-<n>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from icl import KeywordIndex, command_line, in_context, measure_in_context, with_context  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", required=True, help="NKV adapter built from --data")
    p.add_argument("--data", required=True, help="the edited facts (any shape nkv reads)")
    p.add_argument("--distractors", default=str(ROOT.parent / "shared" / "data" / "counterfact-train.json"))
    p.add_argument("--sizes", default="100,1000,10000")
    p.add_argument("--quality-sizes", default="", help="sizes to score retrieval at (default: all --sizes)")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--k", type=int, default=1, help="facts retrieved per request")
    p.add_argument("--latency-only", action="store_true",
                   help="keep the quality numbers of the existing result file, measure serving cost again")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results"))
    return p.parse_args(argv)


def padded(adapter, n: int, seed: int = 0):
    """`adapter` grown to n rows with real-shaped padding (see the module doc); for timing only."""
    from nkv.facts import Fact

    extra = n - adapter.n_facts
    if extra <= 0:
        return adapter
    g = torch.Generator().manual_seed(seed)
    keys = adapter.keys.float()
    pad_keys = keys.mean(0) + keys.std(0) * torch.randn(extra, keys.shape[1], generator=g)
    pad_res = adapter.residuals[torch.arange(extra) % adapter.n_facts]
    facts = [Fact(id=f"pad-{i}", subject="Padding", prompt="Padding row", target_new="x") for i in range(extra)]
    return replace(adapter, keys=torch.cat([adapter.keys, pad_keys.to(adapter.keys.dtype)]),
                   residuals=torch.cat([adapter.residuals, pad_res]), facts=[*adapter.facts, *facts])


@torch.no_grad()
def request_ms(model, tok, prompts: list[str], new_tokens: int, before=lambda p: p) -> list[float]:
    """Wall time of one request each: `before(prompt)` (e.g. retrieval), then greedy decoding."""
    times = []
    for prompt in prompts:
        start = time.perf_counter()
        text = before(prompt)
        ids = tok(text, return_tensors="pt")
        model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tok.eos_token_id)
        times.append(1000 * (time.perf_counter() - start))
    return times


def interleaved(model, tok, handle, index: KeywordIndex, prompts: list[str], args: argparse.Namespace) -> dict:
    """Per request, back to back: base model, retrieval (adapter disabled), NKV (enabled).

    Interleaving puts the three under the same load; the ratios to the base request of the
    same prompt are what the comparison rests on (the machine is shared)."""
    rows = []
    for prompt in prompts:
        with handle.disabled():
            base = request_ms(model, tok, [prompt], args.new_tokens)[0]
            search = 1000 * _timed(lambda: index.search(prompt, args.k))
            rag = request_ms(model, tok, [prompt], args.new_tokens, before=lambda p: in_context(index, p, args.k)[0])[0]
        nkv = request_ms(model, tok, [prompt], args.new_tokens)[0]
        rows.append((base, rag, nkv, search))
    med = statistics.median
    return {"base_ms": med(r[0] for r in rows), "retrieval_ms": med(r[1] for r in rows),
            "nkv_ms": med(r[2] for r in rows), "search_ms": med(r[3] for r in rows),
            "retrieval_vs_base": med(r[1] / r[0] for r in rows), "nkv_vs_base": med(r[2] / r[0] for r in rows)}


def tokens_added(tok, pairs: list[tuple[str, str]]) -> float:
    """Mean extra prompt tokens: (original, with context)."""
    return statistics.mean(len(tok(b)["input_ids"]) - len(tok(a)["input_ids"]) for a, b in pairs)


def row(metrics: dict, knowedit: dict) -> dict:
    keys = ("efficacy", "generalization", "specificity", "free_gen_prompt", "free_gen_paraphrase")
    out = {k: metrics[k]["post"] for k in keys if k in metrics}
    out["pre"] = {k: metrics[k]["pre"] for k in keys if k in metrics}
    out["edit_succ"] = knowedit["edit_succ"]["post"]
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
    sizes = [int(s) for s in args.sizes.split(",")]
    quality_sizes = [int(s) for s in args.quality_sizes.split(",")] if args.quality_sizes else sizes
    model, tok = load_model(args.model, device="cpu")
    adapter = NKVAdapter.load(args.adapter)
    facts = read_facts(args.data)
    distractors = [f.fact for f in read_facts(args.distractors)]
    options = EvalOptions(gate_diagnostics=False, fluency_prompts=0, protocol="counterfact")
    result: dict = {"model": args.model, "data": Path(args.data).name, "n_edits": len(facts), "k": args.k,
                    "adapter": {"n_facts": adapter.n_facts, "layer": adapter.layer, "gamma": adapter.gamma},
                    "machine": f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
                    "command": command_line("benchmarks/retrieval/retrieval.py", argv or sys.argv[1:])}

    path = Path(args.out) / f"retrieval-{len(facts)}.json"
    if args.latency_only:
        kept = json.loads(path.read_text())
        result.update({k: kept[k] for k in ("nkv", "retrieval")})
        result["quality_command"] = kept.get("quality_command", kept["command"])
        quality_sizes = []
    t = time.time()
    report = None if args.latency_only else evaluate(model, tok, adapter, facts, options=options,
                                                     data_name=Path(args.data).name)
    if report is not None:
        result["nkv"] = row(report.metrics, report.knowedit)
        result["retrieval"] = {}
        print(f"nkv eval: {time.time() - t:.0f} s {result['nkv']}", file=sys.stderr)

    for n in quality_sizes:
        t = time.time()
        index = KeywordIndex([f.fact for f in facts] + distractors[: max(0, n - len(facts))])
        got = with_context(facts, index, args.k)
        measured = measure_in_context(model, tok, got.facts, "counterfact", options)
        queries = [(f.fact.prompt, g.fact.prompt) for f, g in zip(facts, got.facts)]
        queries += [(p, q) for f, g in zip(facts, got.facts) for p, q in zip(f.paraphrases, g.paraphrases)]
        result["retrieval"][n] = {**row(measured["metrics"], measured["knowedit"]),
                                  "index_facts": len(index.facts),
                                  "retrieved_own_fact_edit": _share(got.right["edit"]),
                                  "retrieved_own_fact_paraphrase": _share(got.right["paraphrase"]),
                                  "tokens_added": tokens_added(tok, queries)}
        print(f"retrieval n={n}: {time.time() - t:.0f} s {result['retrieval'][n]}", file=sys.stderr)

    prompts = [f.fact.prompt for f in facts[: args.requests]]
    latency = {}
    for n in sizes:
        index = KeywordIndex([f.fact for f in facts] + distractors[: max(0, n - len(facts))])
        handle = attach(model, padded(adapter, n))
        try:
            latency[n] = interleaved(model, tok, handle, index, prompts, args)
        finally:
            handle.detach()
        print(f"latency n={n}: {latency[n]}", file=sys.stderr)
    result["latency_ms"] = latency
    result["new_tokens"], result["requests"] = args.new_tokens, len(prompts)
    result["wall_s"] = round(time.time() - started, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {path}", file=sys.stderr)


def _share(hits: list[bool]) -> float | None:
    return 100 * statistics.mean(hits) if hits else None


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def table(result: dict) -> str:
    """The two markdown tables of the README from a result file."""
    cols = ("efficacy", "generalization", "specificity", "free_gen_prompt", "free_gen_paraphrase", "edit_succ")
    lines = ["| editor | index | E | G | S | free-gen E | free-gen G | Edit Succ. | own fact retrieved (edit / para) "
             "| tokens added |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    pre = result["nkv"]["pre"]
    lines.append("| unedited model | | " + " | ".join(_f(pre.get(c)) for c in cols[:5]) + " | | | 0 |")
    lines.append("| NKV | | " + " | ".join(_f(result["nkv"].get(c)) for c in cols) + " | | 0 |")
    for n, r in result["retrieval"].items():
        lines.append(f"| retrieval (BM25, top-{result['k']}) | {int(n):,} | " + " | ".join(_f(r.get(c)) for c in cols)
                     + f" | {_f(r['retrieved_own_fact_edit'])} / {_f(r['retrieved_own_fact_paraphrase'])} "
                     f"| {r['tokens_added']:.1f} |")
    lines += ["", "| facts | base model | NKV | retrieval | NKV / base | retrieval / base | BM25 search |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for n, v in result["latency_ms"].items():
        lines.append(f"| {int(n):,} | {v['base_ms']:.0f} ms | {v['nkv_ms']:.0f} ms | {v['retrieval_ms']:.0f} ms "
                     f"| {v['nkv_vs_base']:.2f} | {v['retrieval_vs_base']:.2f} | {v['search_ms']:.2f} ms |")
    return "\n".join(lines)


def _f(value) -> str:
    return "–" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    main()
