"""The same-subject weak spot, and a prototype that fixes it without changing the file format.

    python benchmarks/compare/same_subject.py [--layer 0] [--gamma 0.65]

Plain NKV (method.md §5): two facts about one subject get almost the same key (read at
the subject's last token, before the relation), so the gate's argmax picks one row and
the other fact's edit is lost (or, worse, the wrong residual is added).

Prototype "joint residual": keep one row per fact with its own key (format unchanged),
but optimize ONE δ per subject over the rewriting prompts of all its facts together
(each with its own target) and store that δ in every row of the subject. Whichever row
wins the argmax then adds a residual that carries all of the subject's edits, the way
the subject's hidden state carries all its facts. The price: rows of one subject are no
longer independent (removing or changing one fact re-optimizes that subject's δ).

Prototype "joint + preserve": the same, plus preservation prompts in the δ objective:
for each relation of the world the subject is NOT being edited on, its first template
("X was born in") with the unedited model's own greedy answer as a teacher-forced
target. MEMIT's KL prompt ("X is a") says nothing about the subject's other relations
on this model, so without it an edit at the subject token wipes them out. (This needs
prompts for the other relations; here they come from the world's templates.)

All are evaluated on examples/factworld/edits_same_subject.jsonl (100 subjects x 2
facts; `--edits` for another file), all edits live, with the edited subjects' other
(unedited) facts measured from true_facts.jsonl.
Variants: "plain" is `nkv build` with every fact solved alone (`--separate-subjects`, the
build before session 7), "build" is today's `nkv build` (a subject's facts solved together,
the "joint" prototype in the build), "probes" is `nkv build` holding the subject's other
relations (`preserve_factor=1.0`, editing/solve/preserve.py), "guards" is today's build
plus zero-residual guard rows at those relations (`with_guard_rows`), "joint" and
"preserve" are the prototypes above.
Results: results/same_subject-{variant}-L{layer}[-<edits stem>][-<model>][-n<limit>].json.
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
WORLD = HERE.parents[1] / "examples" / "factworld"


def preservation_rewrites(model, tok, subject: str, edited_relations: set[str], prompt_for: dict[str, str]):
    """Encoded "<other relation prompt> <the unedited model's greedy answer>" for the subject."""
    from nkv.facts import Fact
    from nkv.editing.tokens import locate, with_target

    out = []
    for relation, template in prompt_for.items():
        if relation in edited_relations:
            continue
        text = template.replace("{}", subject)
        fact = Fact(id="preserve", subject=subject, prompt=text, target_new="-")
        prompt = locate(tok, text, text.index(subject) + len(subject), fact)
        with torch.no_grad():
            ids = torch.tensor([prompt.ids])
            answer = tok.decode(model(input_ids=ids).logits[0, -1].argmax()).strip()
        out.append(with_target(tok, prompt, text, answer, fact))
    return out


def joint_adapter(model, tok, facts, layer: int, gamma: float, preserve: bool = False,
                  relation_prompts: dict[str, dict[str, str]] | None = None):
    """Per-fact keys; one δ per subject, optimized over all of the subject's facts, in each of its rows.

    preserve: also hold the subject's other relations at the unedited model's answers.
    relation_prompts: subject -> {relation: prompt template} to hold (from a true-facts file
        with "relation" fields); None = the fact-world's templates.
    """
    from nkv.loaders.architectures import empty_adapter_for
    from nkv.editing.solve import default_config, encode_facts, generate_prefixes
    from nkv.editing.solve.config import batch_size_on
    from nkv.editing.forward import frozen, pad_id_of
    from nkv.editing.solve.keys import compute_keys
    from nkv.editing.solve.prompts import FactTokens
    from nkv.editing.solve.residuals import optimize_residuals

    config = default_config(model)
    plain = [f.fact for f in facts]
    with frozen(model):
        prefixes = generate_prefixes(model, tok, config.n_prefixes, config.prefix_length, config.seed)
        tokens = encode_facts(tok, plain, prefixes)
        pad = pad_id_of(tok)
        keys, h0 = compute_keys(model, layer, tokens, pad)
        groups: dict[str, list[int]] = {}
        for i, f in enumerate(plain):
            groups.setdefault(f.subject, []).append(i)
        extra: dict[str, list] = {}
        if preserve:
            if relation_prompts is None:
                sys.path.insert(0, str(WORLD))
                import world

                world_prompts = {rel: templates[0] for rel, templates in world.TEMPLATES.items()}
            for subject, rows in groups.items():
                edited = {t.split(":", 1)[1] for i in rows for t in facts[i].tags if t.startswith("relation:")}
                prompt_for = world_prompts if relation_prompts is None else relation_prompts.get(subject, {})
                extra[subject] = preservation_rewrites(model, tok, subject, edited, prompt_for)
        # FactBatch needs the same number of rewrites per item: group subjects by that number.
        by_shape: dict[int, list[list[int]]] = {}
        for subject, rows in groups.items():
            n_rewrites = sum(len(tokens[i].rewrites) for i in rows) + len(extra.get(subject, []))
            by_shape.setdefault(n_rewrites, []).append(rows)
        residuals = torch.zeros(len(plain), h0.shape[1])
        for members in by_shape.values():
            batch = batch_size_on(config, next(model.parameters()).device)
            for start in range(0, len(members), batch):
                chunk = members[start : start + batch]
                joint = [FactTokens(tokens[rows[0]].key_texts,
                                    [r for i in rows for r in tokens[i].rewrites] + extra.get(plain[rows[0]].subject, []),
                                    tokens[rows[0]].kl) for rows in chunk]
                result = optimize_residuals(model, layer, joint, h0[[rows[0] for rows in chunk]], config, pad)
                for rows, delta in zip(chunk, result.residuals):
                    for i in rows:
                        residuals[i] = delta.float().cpu()
    adapter = empty_adapter_for(model, layer, gamma).add(plain, keys.float().cpu(), residuals)
    method = "prototype: per-fact keys, one joint δ per subject" + (", other relations preserved" if preserve else "")
    return replace(adapter, build={"method": method})


def with_guard_rows(model, tok, adapter, facts, config):
    """`adapter` plus one zero-residual "guard" row per probe of each edited subject
    (`preserve.choose_probes`: the subject's other relations, found by the build itself),
    keyed like a fact's row (½ bare + ½ mean over the build's context prefixes). The gate
    takes the argmax row, so where a prompt about the subject's other relation is closer
    to its guard than to the edit's row, the gate adds nothing. A gate-level experiment:
    no new mechanism, only rows with residual 0 (their fires count as fires in the
    false-fire rate, so that number is an upper bound here)."""
    from nkv.facts import Fact
    from nkv.editing.forward import pad_id_of
    from nkv.editing.solve.keys import compute_keys
    from nkv.editing.solve.preserve import choose_probes
    from nkv.editing.solve.rows import encode_facts
    from nkv.editing.solve.templates import generate_prefixes

    probes = choose_probes(model, tok, facts, config.preserve_templates)
    seen, guards = set(), []
    for f, texts in zip(facts, probes):
        for text in texts:
            if (f.fact.subject, text) not in seen:
                seen.add((f.fact.subject, text))
                guards.append(Fact(id=f"guard-{len(guards)}", subject=f.fact.subject, prompt=text,
                                   target_new="(guard)"))
    if not guards:
        return adapter
    prefixes = generate_prefixes(model, tok, config.n_prefixes, config.prefix_length, config.seed)
    keys, _ = compute_keys(model, adapter.layer, encode_facts(tok, guards, prefixes), pad_id_of(tok))
    zeros = torch.zeros(len(guards), adapter.base.d_model)
    return adapter.add(guards, keys.to(adapter.keys.dtype), zeros.to(adapter.residuals.dtype))


def subject_relation_prompts(path: str) -> dict[str, dict[str, str]] | None:
    """subject -> {relation: its first prompt, subject as "{}"} from a true-facts file whose
    records name their relation (examples/smollm2/same_subject_true.jsonl); None otherwise."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not records or "relation" not in records[0]:
        return None
    prompts: dict[str, dict[str, str]] = {}
    for r in records:
        prompts.setdefault(r["subject"], {}).setdefault(r["relation"], r["prompt"].replace(r["subject"], "{}"))
    return prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(WORLD / "models" / "llama"))
    p.add_argument("--edits", default=str(WORLD / "edits_same_subject.jsonl"))
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--gamma", type=float, default=0.65)
    p.add_argument("--variants", default="plain,probes,joint,preserve")
    p.add_argument("--true-facts", default=str(WORLD / "true_facts.jsonl"), help="the subjects' facts, to measure the other ones")
    p.add_argument("--unrelated", default=str(WORLD / "generic.txt"), help="unrelated text, one per line")
    p.add_argument("--limit", type=int, default=None, help="only the first N edits")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--preserve-factor", type=float, default=1.0, help="the 'probes' variant's preserve_factor")
    p.add_argument("--preserve-loss", default="kl", help="the 'probes' variant's preserve_loss: kl | answer")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from nkv.facts_io import read_facts
    from nkv.editing.solve import build_adapter, default_config
    from nkv.editing.evaluate import EvalOptions, evaluate, read_true_facts
    from nkv.loaders.models import load_model

    model, tok = load_model(args.model)
    model.eval()
    facts = read_facts(args.edits)[: args.limit]
    true_facts = read_true_facts(args.true_facts)
    generic = [line for line in Path(args.unrelated).read_text().splitlines() if line.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    probes = default_config(model, preserve_factor=args.preserve_factor, preserve_loss=args.preserve_loss)
    alone = default_config(model, joint_subjects=False)
    cache: dict[str, object] = {}

    def built():  # the default build, once, for "build" and "guards"
        if "build" not in cache:
            cache["build"] = build_adapter(model, tok, facts, layer=args.layer, gamma=args.gamma, progress=False)
        return cache["build"]

    variants = {"plain": lambda: build_adapter(model, tok, facts, layer=args.layer, gamma=args.gamma, config=alone,
                                               progress=False),
                "build": built,
                "probes": lambda: build_adapter(model, tok, facts, layer=args.layer, gamma=args.gamma, config=probes,
                                                progress=False),
                "guards": lambda: with_guard_rows(model, tok, built(), facts, default_config(model)),
                "joint": lambda: joint_adapter(model, tok, facts, args.layer, args.gamma),
                "preserve": lambda: joint_adapter(model, tok, facts, args.layer, args.gamma, preserve=True,
                                                  relation_prompts=subject_relation_prompts(args.true_facts))}
    suffix = "" if Path(args.edits).name == "edits_same_subject.jsonl" else f"-{Path(args.edits).stem}"
    if Path(args.model).name != "llama":
        suffix += f"-{Path(args.model).name}"
    if args.limit:
        suffix += f"-n{args.limit}"
    if args.preserve_factor != 1.0:
        suffix += f"-pf{args.preserve_factor:g}"
    if args.preserve_loss != "kl":
        suffix += f"-{args.preserve_loss}"
    for name in args.variants.split(","):
        make = variants[name]
        start = time.time()
        adapter = make()
        build_s = time.time() - start
        report = evaluate(model, tok, adapter, facts, unrelated=generic, true_facts=true_facts,
                          options=EvalOptions(), data_name=Path(args.edits).name)
        doc = {**report.to_dict(), "bench": {"method": name, "layer": args.layer, "gamma": args.gamma,
                                             "build_s": round(build_s, 1)}}
        (out / f"same_subject-{name}-L{args.layer}{suffix}.json").write_text(json.dumps(doc, indent=1))
        m, w = report.metrics, report.weak_spots
        print(f"{name}: E {m['efficacy']['post']} G {m['generalization']['post']} S {m['specificity']['post']} "
              f"other facts of edited subjects {w.get('same_subject_other_facts')} gate right "
              f"{report.gate['edit_right']} ({build_s:.0f} s build)", file=sys.stderr)
        print(report.table())


if __name__ == "__main__":
    main()
