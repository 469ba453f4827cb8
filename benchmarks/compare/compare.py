"""NKV vs the MEMIT and AlphaEdit closed forms on the fact-world model, 100 -> 2,000 edits.

    python benchmarks/compare/compare.py                      # defaults below, ~1 h on 2 busy CPU cores
    python benchmarks/compare/compare.py --sizes 100 --methods nkv --layer 1 --gamma 0.75

One build computes keys and residuals for the largest size (rows are independent, so the
first n rows of it are exactly what building n facts gives); every method and size then
uses those rows (see linear.py). Every evaluation runs after all n edits are applied.
Results: one JSON per (method, n) under --out, plus results.md and compare.png (plots.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORLD = ROOT / "examples" / "factworld"
CACHE = Path(tempfile.gettempdir()) / "nkv-bench-compare"  # built rows: MBs, not worth committing
sys.path.insert(0, str(HERE))

from linear import (ALPHAEDIT_L2, ALPHAEDIT_TAU, MEMIT_LAMBDA, WeightEditHandle, alphaedit_delta,  # noqa: E402
                    key_second_moment, memit_delta, null_space_projector, projection_targets)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(WORLD / "models" / "llama"))
    p.add_argument("--edits", default=str(WORLD / "edits.jsonl"))
    p.add_argument("--true-facts", default=str(WORLD / "true_facts.jsonl"))
    p.add_argument("--generic", default=str(WORLD / "generic.txt"), help="unrelated text: C0 and false fires")
    p.add_argument("--sizes", default="100,1000,2000", help="comma-separated numbers of edits")
    p.add_argument("--methods", default="nkv,memit,alphaedit")
    p.add_argument("--layer", type=int, default=None, help="default: the fact-world README's layer (0)")
    p.add_argument("--gamma", type=float, default=0.85, help="0.85: best of sweep.py at 1,000 edits (paper: 0.65)")
    p.add_argument("--build", default="{}", help='build options as JSON, e.g. \'{"steps": 50}\'')
    p.add_argument("--memit-lambda", type=float, default=MEMIT_LAMBDA)
    p.add_argument("--alphaedit-l2", type=float, default=ALPHAEDIT_L2)
    p.add_argument("--alphaedit-tau", type=float, default=ALPHAEDIT_TAU)
    p.add_argument("--alphaedit-null-frac", type=float, default=None,
                   help="instead of --alphaedit-tau: put this share of C0's eigen-directions in the null space")
    p.add_argument("--true-facts-limit", type=int, default=500)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on shared cores)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--cache", default=str(CACHE), help="built rows (.nkv) are kept here between runs")
    p.add_argument("--tag", default="", help="suffix of result file names (e.g. a sweep point)")
    return p.parse_args(argv)


def load_model(path: str):
    """Model and tokenizer through the library's one loader (folders, Hub ids, .gguf, packaged)."""
    from nkv.loaders.models import load_model as load

    return load(path, device="cpu")


def rows_for(model, tokenizer, facts, layer: int, gamma: float, out: Path, stem: str, build: str = "{}"):
    """The NKV adapter for `facts` at `layer` (build options: a JSON object), built once and cached in `out`."""
    from dataclasses import replace

    from nkv.adapter import NKVAdapter
    from nkv.editing.solve import build_adapter, default_config

    from nkv.loaders.architectures import residual_site

    out.mkdir(parents=True, exist_ok=True)
    site = residual_site(model.config.model_type)
    overrides = json.loads(build)
    label = "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
    path = out / f"rows-{stem}-L{layer}-n{len(facts)}{label}.nkv"
    ids = [f.fact.id for f in facts]
    for bigger in sorted(out.glob(f"rows-{stem}-L{layer}-n*{label}.nkv")):
        # Rows are independent: a cached build of more facts holds these rows exactly.
        n_cached = int(bigger.stem.removeprefix(f"rows-{stem}-L{layer}-n").split("-")[0])
        if n_cached > len(facts) and bigger.stem == f"rows-{stem}-L{layer}-n{n_cached}{label}":
            cached = NKVAdapter.load(bigger)
            if cached.ids[: len(ids)] == ids and cached.residual_site == site:
                print(f"rows: the first {len(ids)} rows of {bigger.name}", file=sys.stderr)
                build_s = json.loads(bigger.with_suffix(".json").read_text())["build_s"] * len(ids) / n_cached
                return replace(cached.select(ids), gamma=gamma), build_s
    if path.exists() and NKVAdapter.load(path).residual_site == site:  # rows from before format 2.0 are rebuilt
        adapter = NKVAdapter.load(path)
        print(f"rows: reusing {path.name}", file=sys.stderr)
        return replace(adapter, gamma=gamma), json.loads(path.with_suffix(".json").read_text())["build_s"]
    start = time.time()
    ckpt = out / f"ckpt-L{layer}{label}"
    adapter = build_adapter(model, tokenizer, facts, layer=layer, gamma=gamma, checkpoint_dir=ckpt,
                            resume=ckpt.exists(), config=default_config(model, **overrides))
    build_s = time.time() - start
    adapter.save(path)
    path.with_suffix(".json").write_text(json.dumps({"build_s": build_s, "n": len(facts)}))
    from nkv.editing.solve import Checkpoint

    Checkpoint(ckpt).remove()
    return adapter, build_s


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from nkv.facts_io import read_facts
    from nkv.editing.evaluate import EvalOptions, evaluate_adapter, plot_cosines, read_true_facts
    from nkv.loaders.transformers import attach

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    methods = args.methods.split(",")
    model, tok = load_model(args.model)
    all_facts = read_facts(args.edits)
    if max(sizes) > len(all_facts):
        raise SystemExit(f"{args.edits} has {len(all_facts)} edits; --sizes asks for {max(sizes)}")
    facts = all_facts[: max(sizes)]
    layer = 0 if args.layer is None else args.layer
    edited_anywhere = {f.fact.subject for f in all_facts}
    known = read_true_facts(args.true_facts)
    generic = [line for line in Path(args.generic).read_text().splitlines() if line.strip()]

    adapter, build_s = rows_for(model, tok, facts, layer, args.gamma, Path(args.cache), Path(args.edits).stem, args.build)
    c0, c0_tokens = key_second_moment(model, tok, layer, generic)
    eig = torch.linalg.eigvalsh(c0)  # ascending
    if args.alphaedit_null_frac is not None:  # a τ just above the k-th smallest eigenvalue
        k = max(1, round(args.alphaedit_null_frac * len(eig)))
        args.alphaedit_tau = float(eig[k - 1]) * (1 + 1e-9) if k < len(eig) else float(eig[-1]) * 2
    projector, null_dims = null_space_projector(c0, args.alphaedit_tau)
    print(f"layer {layer}: C0 from {c0_tokens} tokens, eigenvalues {float(eig.min()):.3g}..{float(eig.max()):.3g}, "
          f"null space (< {args.alphaedit_tau:g}): {null_dims} of {c0.shape[0]} dims", file=sys.stderr)
    base = {"layer": layer, "gamma": args.gamma, "c0_tokens": c0_tokens, "null_dims": null_dims,
            "memit_lambda": args.memit_lambda, "alphaedit_l2": args.alphaedit_l2, "alphaedit_tau": args.alphaedit_tau,
            "build_s_all": build_s, "n_built": len(facts), "model": Path(args.model).name,
            "build_options": json.loads(args.build)}

    for n in sizes:
        subset = facts[:n]
        rows = adapter.select([f.fact.id for f in subset])
        # Unedited facts: subjects never edited at any size (the same sample at every size);
        # plus the edited subjects' other facts (the same-subject weak spot).
        edited_now = {f.fact.subject for f in subset}
        true_facts = [t for t in known if t.subject not in edited_anywhere or t.subject in edited_now]
        for method in methods:
            start = time.time()
            if method == "nkv":
                handle = attach(model, rows)
                options = EvalOptions(true_facts_limit=args.true_facts_limit)
            else:
                targets = projection_targets(model, rows)  # the residuals, mapped before an FFN-output norm
                if method == "memit":
                    delta = memit_delta(rows.keys, targets, c0, args.memit_lambda)
                else:
                    delta = alphaedit_delta(rows.keys, targets, projector, args.alphaedit_l2)
                handle = WeightEditHandle(model, rows, delta.float())
                # The unedited model is the same for every method: measured once, in the NKV run.
                options = EvalOptions(true_facts_limit=args.true_facts_limit, gate_diagnostics=False,
                                      measure_pre=False)
            try:
                report = evaluate_adapter(model, tok, handle, subset, unrelated=generic, true_facts=true_facts,
                                          options=options, data_name=Path(args.edits).name,
                                          unrelated_name=Path(args.generic).name)
            finally:
                handle.detach()
            name = f"{method}-{n}{args.tag}"
            extra = {"method": method, "n_edits": n, "eval_s": round(time.time() - start, 1), **base}
            if method != "nkv":
                extra["delta_norm"] = float(delta.norm())
            (out / f"{name}.json").write_text(json.dumps({**report.to_dict(), "bench": extra}, indent=1))
            if method == "nkv":
                plot_cosines(report, out / f"gate-{name}.png")
            m = report.metrics
            print(f"{name}: E {m['efficacy']['post']} G {m['generalization']['post']} S {m['specificity']['post']} "
                  f"U {m.get('unedited_facts', {}).get('post')} false-fire {report.gate.get('false_fire')} "
                  f"({extra['eval_s']} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
