"""Read real FFN keys from SmolLM2-135M at the build layer, for the scale benchmark.

    NKV_CACHE=<converted model cache> python benchmarks/scale/read_keys.py --n 100000 -o keys.pt
    NKV_CACHE=<converted model cache> python benchmarks/scale/read_keys.py --subjects datasets -o keys-datasets.pt

`--subjects generated` (the default) reads generated names, products and places
(subjects.py); many share their last token ("... Weber"), so their keys come in tight
groups. `--subjects datasets` reads every distinct subject of CounterFact and ZsRE in
shared/data instead (19,589 real, varied subjects), with each one's own dataset
prompt and paraphrase as its edit and paraphrase prompts.

Writes one torch file with:
- `keys` (n, d_key) fp16 (saved every `--save-every` subjects, so a cut run keeps a prefix): the input of layer `--layer`'s down_proj at each
  subject's last token, the subject read alone (after BOS when the tokenizer adds one);
- `text` (T, d_key) fp16: the same activation at every token of real text (the model's own
  unrelated generations in benchmarks/real/results, and for generated subjects also
  CounterFact prompts/paraphrases/neighbourhood prompts from shared/data), none of which
  names a subject of the table;
- `edit` / `paraphrase` (T, d_key) fp16 and `edit_subject` / `paraphrase_subject` (T,) int64:
  every token of edit-style and paraphrase-style prompts about the first `--n-prompts`
  subjects (the row of the subject each token's prompt is about).
Only the first `layer + 1` blocks run (the rest cannot change these activations).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from subjects import EDIT_TEMPLATES, PARAPHRASE_TEMPLATES, subjects  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
UNRELATED = ROOT / "benchmarks" / "real" / "results" / "unrelated-smollm2-135m.txt"
DATA = ROOT.parent / "shared" / "data"
COUNTERFACT = DATA / "counterfact-edit.json"


def dataset_subjects() -> tuple[list[str], list[str], list[str]]:
    """(subjects, edit prompts, paraphrases): every distinct subject of CounterFact (edit,
    train and test files) and ZsRE, in file order, with its first case's prompt and paraphrase."""
    cases: list[tuple[str, str, str]] = []
    for name in ("counterfact-edit.json", "counterfact-train.json"):
        cases += [(c["subject"], c["prompt"], c["rephrase_prompt"]) for c in json.loads((DATA / name).read_text())]
    for c in json.loads((DATA / "counterfact_azhx_test.json").read_text()):
        rw = c["requested_rewrite"]
        cases.append((rw["subject"], rw["prompt"].format(rw["subject"]), c["paraphrase_prompts"][0]))
    cases += [(c["subject"], c["src"], c["rephrase"]) for c in json.loads((DATA / "zsre_mend_edit.json").read_text())]
    first: dict[str, tuple[str, str]] = {}
    for subject, prompt, paraphrase in cases:
        if subject.strip() and subject not in first:
            first[subject] = (prompt, paraphrase)
    subj = list(first)
    return subj, [first[s][0] for s in subj], [first[s][1] for s in subj]


def templated(subj: list[str], templates: tuple[str, ...]) -> list[str]:
    """One prompt per generated subject, the templates taken in turn."""
    return [t.format(*[s] * t.count("{}")) for s, t in zip(subj, itertools.cycle(templates))]


class _Stop(Exception):
    pass


def _truncated(model, layer: int):
    """Keep blocks 0..layer; return (base model, down_proj at `layer`)."""
    base = model.model
    base.layers = base.layers[: layer + 1]
    return base, base.layers[layer].mlp.down_proj


def activations(base, down_proj, tok, texts: list[str], batch: int, last_only: bool) -> list[torch.Tensor]:
    """Per text, the down_proj input at its last token (last_only) or at every token: (T_i, d_key)."""
    out: list[torch.Tensor] = []
    seen: list[torch.Tensor] = []
    hook = down_proj.register_forward_pre_hook(lambda _m, args: (seen.append(args[0]), (_ for _ in ()).throw(_Stop()))[1])
    try:
        for start in range(0, len(texts), batch):
            enc = tok(texts[start : start + batch], return_tensors="pt", padding=True)
            seen.clear()
            try:
                with torch.no_grad():
                    base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            except _Stop:
                pass
            acts = seen[0]  # (B, L, d_key), right padding
            lengths = enc["attention_mask"].sum(-1)
            for b in range(acts.shape[0]):
                n = int(lengths[b])
                out.append(acts[b, n - 1 : n].half() if last_only else acts[b, :n].half())
    finally:
        hook.remove()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--subjects", choices=("generated", "datasets"), default="generated")
    p.add_argument("--n", type=int, default=100_000, help="generated subjects")
    p.add_argument("--n-prompts", type=int, default=1000)
    p.add_argument("--text-chars", type=int, default=40_000, help="characters of unrelated text")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--save-every", type=int, default=10_000)
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    from nkv.loaders.models import load_model

    model, tok = load_model(args.model, device="cpu")
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    base, down = _truncated(model.eval(), args.layer)
    if args.subjects == "datasets":
        subj, edit_prompts, paraphrases = dataset_subjects()
    else:
        subj = subjects(args.n)
        edit_prompts, paraphrases = (templated(subj[: args.n_prompts], t) for t in (EDIT_TEMPLATES, PARAPHRASE_TEMPLATES))
    saved: dict = {"subjects": subj, "layer": args.layer, "model": args.model, "subject_set": args.subjects}
    real = [UNRELATED.read_text()[i : i + 400] for i in range(0, args.text_chars, 400)]
    if args.subjects == "generated":  # dataset prompts name none of the generated subjects
        cases = json.loads(COUNTERFACT.read_text())[:300]
        real += [c[k] for c in cases for k in ("prompt", "rephrase_prompt", "locality_prompt")]
    saved["text"] = torch.cat(activations(base, down, tok, real, 64, last_only=False))
    n_prompts = min(args.n_prompts, len(subj))
    prompts = {kind: (texts[:n_prompts], list(range(n_prompts)))  # (prompts, the row each is about)
               for kind, texts in (("edit", edit_prompts), ("paraphrase", paraphrases))}
    for kind, (texts, rows) in prompts.items():
        acts = activations(base, down, tok, texts, 64, last_only=False)
        saved[kind] = torch.cat(acts)
        saved[f"{kind}_subject"] = torch.cat([torch.full((a.shape[0],), r) for a, r in zip(acts, rows)])
    # keys last, saved every `--save-every` subjects: a run cut short still leaves the keys read so far
    parts: list[torch.Tensor] = []
    t0 = time.perf_counter()
    for start in range(0, len(subj), args.save_every):
        parts += activations(base, down, tok, subj[start : start + args.save_every], args.batch, last_only=True)
        saved["keys"] = torch.cat(parts)
        saved["seconds_per_key"] = (time.perf_counter() - t0) / len(parts)
        torch.save(saved, args.output)
        print(f"keys: {len(parts)} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(json.dumps({k: list(v.shape) for k, v in saved.items() if isinstance(v, torch.Tensor)}))


if __name__ == "__main__":
    main()
