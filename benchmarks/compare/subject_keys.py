"""How alike are the keys of one subject's facts? (issue 13: when must they be solved together?)

    python benchmarks/compare/subject_keys.py --model smollm2-135m --layer 6 --limit 80 \
        --edits examples/smollm2/same_subject_edit2.jsonl
    python benchmarks/compare/subject_keys.py --model examples/factworld/models/llama --layer 0 --limit 80 \
        --edits examples/factworld/edits_same_subject.jsonl

Keys as `nkv build` reads them (the build's templates, `compute_keys`), no edit made. Per
subject with two or more facts: the cosine between its first two facts' keys; and for
every such fact, whether the gate, on the fact's own bare prompt (up to the subject),
scores another row of the file highest (then the rows compete, and one edit is lost
unless they are solved together); and the facts `nkv build` solves together (`joint_groups`).
"""

from __future__ import annotations

import argparse

import torch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--edits", required=True)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from dataclasses import replace

    from nkv.editing.forward import pad_id_of
    from nkv.editing.solve import encode_facts, generate_prefixes, joint_groups, subject_groups
    from nkv.editing.solve.keys import compute_keys
    from nkv.facts_io import read_facts
    from nkv.loaders.models import load_model

    model, tok = load_model(args.model)
    model.eval()
    facts = [f.fact for f in read_facts(args.edits)[: args.limit]]
    tokens = encode_facts(tok, facts, generate_prefixes(model, tok, 5, 10, 0))
    with torch.no_grad():
        keys, _ = compute_keys(model, args.layer, tokens, pad_id_of(tok))
        bare, _ = compute_keys(model, args.layer, [replace(t, key_texts=t.key_texts[:1]) for t in tokens],
                               pad_id_of(tok))
    unit = torch.nn.functional.normalize(keys, dim=-1)
    scores = torch.nn.functional.normalize(bare, dim=-1) @ unit.T  # (n, n): bare prompt i against row j
    pairs, wrong, checked = [], 0, 0
    for group in subject_groups(facts):
        if len(group) < 2:
            continue
        pairs.append(float(unit[group[0]] @ unit[group[1]]))
        for i in group:
            checked += 1
            wrong += int(int(scores[i].argmax()) != i)
    with torch.no_grad():
        joined = [g for g in joint_groups(model, tok, tokens, facts, args.layer) if len(g) > 1]
    cos = torch.tensor(pairs)
    print(f"| {args.model}, L{args.layer} | {len(pairs)} | {cos.mean():.3f} / {cos.min():.3f} / {cos.max():.3f} "
          f"| {wrong} of {checked} | {sum(map(len, joined))} facts in {len(joined)} groups |")


if __name__ == "__main__":
    main()
