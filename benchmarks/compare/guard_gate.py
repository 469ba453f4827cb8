"""What guard rows do to the gate alone (issue 13; `same_subject.py --variants guards`).

    python benchmarks/compare/guard_gate.py --model smollm2-135m --layer 6 --limit 40 \
        --edits examples/smollm2/same_subject_edit1.jsonl --true-facts examples/smollm2/same_subject_true.jsonl

Builds the facts with today's defaults, adds the guard rows (`same_subject.with_guard_rows`:
zero-residual rows keyed at the subject's other relations that the build finds itself), and
runs the exact gate, with and without the guards, at every token of: the subject's other
relations (true-facts file, relations the subject's edits do not touch: the gate should not
add a residual there) and the facts' paraphrases (the fact's own row should). Prints each
paraphrase a guard takes, with both cosines. No residual is applied: this is the gate only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from question_keys import token_inputs
from same_subject import with_guard_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--edits", required=True)
    p.add_argument("--true-facts", required=True)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--gamma", type=float, default=0.65)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--guard-margins", default="0",
                   help="comma list m: a guard takes a token only when its cosine beats the best edit row's by m")
    args = p.parse_args()
    torch.set_num_threads(1)
    from nkv.editing.solve import build_adapter, default_config
    from nkv.facts_io import read_facts
    from nkv.loaders.models import load_model

    model, tok = load_model(args.model)
    facts = read_facts(args.edits)[: args.limit]
    plain = build_adapter(model, tok, facts, layer=args.layer, gamma=args.gamma, progress=False)
    guarded = with_guard_rows(model, tok, plain, facts, default_config(model))
    n = plain.n_facts
    unit = lambda x: x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    rows = unit(guarded.keys.float())  # (n + guards, d_key); rows n.. are the guards

    def scores(text: str) -> torch.Tensor:  # (T, rows) cosine of every token (BOS dropped) with every row
        return unit(token_inputs(model, tok, [text], [args.layer])[0][args.layer]) @ rows.T

    def fired_rows(s: torch.Tensor, guards: bool, margin: float = 0.0) -> set[int]:  # edit rows whose residual is added
        s = torch.cat([s[:, :n], s[:, n:] - margin], dim=1) if guards else s[:, :n]
        best, idx = s.max(-1)
        return {int(i) for i, b in zip(idx, best) if b >= args.gamma and i < n}

    edited = {}
    for f in facts:
        edited.setdefault(f.fact.subject, set()).add(f.fact.relation)
    true = [json.loads(line) for line in Path(args.true_facts).read_text().splitlines() if line.strip()]
    others = [t["prompt"] for t in true if t["subject"] in edited and t["relation"] not in edited[t["subject"]]]
    paraphrases = [(i, q) for i, f in enumerate(facts) for q in f.paraphrases]
    other_s = [scores(q) for q in others]
    para_s = [scores(q) for _, q in paraphrases]
    margins = [float(m) for m in args.guard_margins.split(",")]
    for guards, margin in [(False, 0.0), *((True, m) for m in margins)]:
        fired = sum(bool(fired_rows(s, guards, margin)) for s in other_s)
        right = sum(i in fired_rows(s, guards, margin) for (i, _), s in zip(paraphrases, para_s))
        print(f"{'with' if guards else 'without'} {guarded.n_facts - n} guard rows (margin {margin}): a residual "
              f"added on {fired}/{len(others)} other-relation prompts; own row on {right}/{len(paraphrases)} paraphrases")
    for (i, q), s in zip(paraphrases, para_s):
        if i in fired_rows(s, False) and i not in fired_rows(s, True):
            t = int(s[:, i].argmax())
            g = n + int(s[t, n:].argmax())
            print(f"  {q!r} (edit {facts[i].fact.prompt!r}): own row {s[t, i]:.3f}, "
                  f"guard {guarded.facts[g].prompt!r} {s[t, g]:.3f}")


if __name__ == "__main__":
    main()
