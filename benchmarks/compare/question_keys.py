"""Where should a row's key be read so that a subject's other facts stay untouched? (issue 13)

    python benchmarks/compare/question_keys.py --model smollm2-135m \
        --edits examples/smollm2/same_subject_edit1.jsonl \
        --true-facts examples/smollm2/same_subject_true.jsonl \
        --unrelated benchmarks/real/results/unrelated-smollm2-135m.txt --layers 3,6,9,12,15

No edit is made: this reads keys only (forward passes of the unedited model) and asks what
the gate would do with them. Two places to read a fact's key, at one layer:

* "subject": today's key, the output projection's input at the subject's last token. Every
  prompt about the subject meets it there, before the relation is read, so the row fires on
  the subject's *other* questions too.
* "question": the same input at the prompt's last token, after the relation. The row's
  residual would then be added where the answer is predicted (as GRACE does), and only where
  subject and relation both match.

Each key is the build's: ½ · bare prompt + ½ · mean over the build's generated prefixes. For
every row set (all edit facts at once) and every probe prompt, the gate's decision is
computed at every token of the probe (the exact gate: best cosine over rows, fires at ≥ γ):

* edit prompt / paraphrase: the fact's own row should fire (at the prompt's last token for
  "question"; anywhere for "subject");
* other relation of the subject (true-facts file, relations the fact does not edit): nothing
  should fire (else the subject's other facts are at risk);
* neighbourhood prompt (same relation, another subject): nothing should fire;
* unrelated text: share of tokens where some row fires.

Result: results/question_keys-<model>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@torch.no_grad()
def token_inputs(model, tok, texts: list[str], layers: list[int]) -> list[dict[int, torch.Tensor]]:
    """Per text: layer -> (n_tokens, d_key) output-projection inputs at every token (BOS dropped)."""
    from nkv.editing.forward import hooks
    from nkv.editing.tokens import token_ids
    from nkv.loaders.architectures import output_projection

    out = []
    for text in texts:
        ids = token_ids(tok, text)
        captured: dict[int, torch.Tensor] = {}

        def take(layer: int):
            def hook(module, args):
                captured[layer] = args[0][0].float()
            return hook

        with hooks(*[output_projection(model, L).register_forward_pre_hook(take(L)) for L in layers]):
            model(input_ids=torch.tensor([ids]))
        n_special = len(ids) - len(tok(text, add_special_tokens=False)["input_ids"])
        out.append({L: captured[L][n_special:] for L in layers})
    return out


def subject_last_token(tok, text: str, subject: str) -> int:
    """Index (among the text's tokens, no BOS) of the subject's last token."""
    end = text.index(subject) + len(subject)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return max(i for i, (a, b) in enumerate(offsets) if a < end)


def row_keys(model, tok, facts: list[dict], prefixes: list[str], layers: list[int], site: str) -> dict[int, torch.Tensor]:
    """layer -> (n_facts, d_key) keys read at `site`, averaged like the build's keys."""
    texts = [p + f["prompt"] for f in facts for p in prefixes]
    acts = token_inputs(model, tok, texts, layers)
    keys = {L: [] for L in layers}
    for i, f in enumerate(facts):
        for L in layers:
            per_prefix = []
            for j, p in enumerate(prefixes):
                text = texts[i * len(prefixes) + j]
                pos = subject_last_token(tok, text, f["subject"]) if site == "subject" else -1
                per_prefix.append(acts[i * len(prefixes) + j][L][pos])
            k = per_prefix[0] if len(per_prefix) == 1 else 0.5 * per_prefix[0] + 0.5 * torch.stack(per_prefix[1:]).mean(0)
            keys[L].append(k)
    return {L: torch.stack(v) for L, v in keys.items()}


def decisions(acts: torch.Tensor, keys: torch.Tensor, gamma: float,
              center: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: (best row, fired) of the exact gate; `center` is subtracted from both sides first."""
    if center is not None:
        acts, keys = acts - center, keys - center
    cos = torch.nn.functional.normalize(acts, dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).T
    best, row = cos.max(-1)
    return row, best >= gamma


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--edits", required=True)
    p.add_argument("--true-facts", required=True)
    p.add_argument("--unrelated", required=True)
    p.add_argument("--layers", default="3,6,9,12")
    p.add_argument("--gammas", default="0.65", help="comma-separated thresholds")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--unrelated-texts", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from nkv.editing.solve import generate_prefixes
    from nkv.loaders.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    model.eval()
    layers = [int(x) for x in args.layers.split(",")]
    facts = read_jsonl(args.edits)[: args.limit or None]
    true = read_jsonl(args.true_facts)
    relation_of = {f["id"]: next(t.split(":", 1)[1] for t in f.get("tags", []) if t.startswith("relation:"))
                   for f in facts}
    prefixes = generate_prefixes(model, tok, 5, 10, 0)

    probes: list[tuple[str, int, str]] = []  # (kind, fact index, text)
    for i, f in enumerate(facts):
        probes.append(("edit", i, f["prompt"]))
        probes += [("paraphrase", i, q) for q in f.get("paraphrases", [])]
        probes += [("neighbourhood", i, n["prompt"]) for n in f.get("neighborhood", [])]
        edited = {relation_of[g["id"]] for g in facts if g["subject"] == f["subject"]}
        others = {t["prompt"] for t in true if t["subject"] == f["subject"] and t["relation"] not in edited}
        probes += [("other relation", i, q) for q in sorted(others)]
    seen = set()
    probes = [pr for pr in probes if not (pr[0] == "other relation" and (pr[2] in seen or seen.add(pr[2])))]
    unrelated = [line for line in Path(args.unrelated).read_text().splitlines() if line.strip()][: args.unrelated_texts]

    print(f"{len(facts)} facts, {len(probes)} probe prompts, {len(unrelated)} unrelated texts; reading keys",
          file=sys.stderr)
    probe_acts = token_inputs(model, tok, [t for _, _, t in probes], layers)
    unrelated_acts = token_inputs(model, tok, unrelated, layers)
    # "centred": cosines after subtracting the mean input over the unrelated text's tokens, which
    # removes the direction every token shares (a raw cosine is dominated by it at some layers)
    means = {L: torch.cat([a[L] for a in unrelated_acts]).mean(0) for L in layers}
    results = {}
    for site in ("subject", "question"):
        keys = row_keys(model, tok, facts, prefixes, layers, site)
        gammas = [float(g) for g in args.gammas.split(",")]
        for L, centred, gamma in [(L, c, g) for L in layers for c in (False, True) for g in gammas]:
            center = means[L] if centred else None
            tally: dict[str, list[int]] = {}
            for (kind, i, _), acts in zip(probes, probe_acts):
                row, fired = decisions(acts[L], keys[L], gamma, center)
                if kind in ("edit", "paraphrase"):
                    # the fact's own row must fire where the answer is predicted: the last token for
                    # "question"; for "subject", at some token (its subject), with no other row winning
                    ok = bool(fired[-1] and row[-1] == i) if site == "question" else bool(
                        (fired & (row == i)).any() and not (fired & (row != i)).any())
                    tally.setdefault(kind, []).append(int(ok))
                else:  # nothing should fire anywhere in the prompt
                    tally.setdefault(kind, []).append(int(bool(fired.any())))
            fires = [decisions(a[L], keys[L], gamma, center)[1] for a in unrelated_acts]
            unrelated_rate = float(torch.cat(fires).float().mean())
            results[f"{site}-L{L}" + ("-centred" if centred else "") + f"-g{gamma:g}"] = {
                "site": site + (", centred" if centred else ""), "layer": L, "gamma": gamma,
                "own row fires on the edit prompt %": 100 * sum(tally["edit"]) / len(tally["edit"]),
                "own row fires on paraphrases %": 100 * sum(tally["paraphrase"]) / max(1, len(tally["paraphrase"])),
                "fires on the subject's other relations %": 100 * sum(tally.get("other relation", [])) / max(1, len(tally.get("other relation", []))),
                "fires on neighbourhood prompts %": 100 * sum(tally["neighbourhood"]) / max(1, len(tally["neighbourhood"])),
                "fires on unrelated tokens %": 100 * unrelated_rate,
                "n": {k: len(v) for k, v in tally.items()},
            }
    cols = list(next(iter(results.values())).keys())[3:-1]
    print("| key read at | layer | γ | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for r in results.values():
        print(f"| {r['site']} | {r['layer']} | {r['gamma']:g} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |")
    tag = "" if gammas == [0.65] else "-gammas"
    out = HERE / "results" / f"question_keys-{Path(args.model).stem}{tag}.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
