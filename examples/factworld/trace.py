"""Where do the fact-world models store facts?  Causal trace + key cosines per layer.

Run from anywhere:  python examples/factworld/trace.py [--model llama|gpt2] [--facts 200]

1. Causal trace (ROME, Meng et al. 2022): add Gaussian noise (3x the std of subject
   token embeddings) to the subject's token embeddings, then restore one clean activation
   -- the residual stream after block l, or only block l's MLP output, or only its
   attention output -- at one position, and measure how much of the correct answer's
   probability comes back.  Averaged over facts the model gets right.
2. Key cosines: the key is the input of the MLP output projection (Llama
   `mlp.down_proj`, GPT-2 `mlp.c_proj`) at the subject's last token.  The method gates
   on cos(key, stored key) > 0.65, so a usable layer has low cosine between different
   subjects and high cosine for one subject across phrasings.

Writes trace_<model>.json and trace_<model>.png (if matplotlib is installed) next to
this file, and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train.py: shared cores

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import world  # noqa: E402

TRACE_SEED = 7
N_NOISE = 5  # noise samples per fact (ROME uses 10; 5 keeps this a few CPU minutes)
NOISE_SCALE = 3.0
GATE = 0.65
# Positions reported, after ROME's grouping of prompt tokens.
POSITIONS = ["subject_first", "subject_last", "after_subject", "prompt_last"]


# ---------------------------------------------------------------- model access
def blocks(model) -> list[torch.nn.Module]:
    return list(model.model.layers if model.config.model_type == "llama" else model.transformer.h)


def embedding(model) -> torch.nn.Module:
    return model.get_input_embeddings()


def out_proj(block: torch.nn.Module, model_type: str) -> torch.nn.Module:
    """The MLP output projection whose input is the key (README: How it works)."""
    return block.mlp.down_proj if model_type == "llama" else block.mlp.c_proj


def attention(block: torch.nn.Module, model_type: str) -> torch.nn.Module:
    return block.self_attn if model_type == "llama" else block.attn


def _first(out):
    """Blocks and attention modules return a tensor or a tuple led by one."""
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, new: torch.Tensor):
    return (new, *out[1:]) if isinstance(out, tuple) else new


# ---------------------------------------------------------------- token positions
def subject_span(tok, template: str, subject: str) -> tuple[list[int], int, int]:
    """(prompt ids, first subject token index, last subject token index).

    Found by tokenizing the text before the subject and prefix + subject, not by string
    search over tokens. A trailing space of the prefix belongs to the subject's first
    token with a GPT-2-style tokenizer, hence rstrip.
    """
    prefix = template[: template.index("{}")]
    ids = tok(template.format(subject))["input_ids"]
    first = len(tok(prefix.rstrip())["input_ids"]) if prefix.strip() else len(tok("")["input_ids"])
    last = len(tok(prefix + subject)["input_ids"]) - 1
    return ids, first, last


# ---------------------------------------------------------------- causal trace
def pick_facts(model, tok, n: int) -> list[dict]:
    """n random (subject, relation, template) prompts that the model answers correctly."""
    rng = random.Random(TRACE_SEED)
    subjects = world.build_world()
    out: list[dict] = []
    for _attempt in range(50 * n):  # bounded: an untrained model knows nothing
        if len(out) == n:
            break
        s = rng.choice(subjects)
        rel = rng.choice(world.RELATIONS)
        template = rng.choice(world.TEMPLATES[rel])
        ids, first, last = subject_span(tok, template, s.name)
        target = tok(" " + s.facts[rel], add_special_tokens=False)["input_ids"][0]
        with torch.no_grad():
            probs = model(input_ids=torch.tensor([ids])).logits[0, -1].softmax(-1)
        if int(probs.argmax()) == target:
            out.append({"ids": ids, "first": first, "last": last, "target": target,
                        "subject": s.name, "relation": rel})
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} of {n} sampled facts are answered correctly; "
                           "is the model trained? (python examples/factworld/train.py)")
    return out


def noise_std(model, facts: list[dict]) -> float:
    emb = embedding(model).weight.detach()
    toks = sorted({t for f in facts for t in f["ids"][f["first"]: f["last"] + 1]})
    return float(emb[toks].std())


@torch.no_grad()
def trace_fact(model, fact: dict, std: float, gen: torch.Generator) -> dict:
    """Probabilities of the answer: clean, corrupted, and restored per (kind, layer, pos)."""
    mt = model.config.model_type
    ids = torch.tensor([fact["ids"]])
    T, (a, b) = ids.shape[1], (fact["first"], fact["last"])
    layers = blocks(model)
    sites = {"hidden": layers,
             "mlp": [blk.mlp for blk in layers],
             "attn": [attention(blk, mt) for blk in layers]}

    # Clean run: record every activation we may restore.
    clean: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for kind, mods in sites.items():
        for l, mod in enumerate(mods):
            handles.append(mod.register_forward_hook(
                lambda m, i, o, key=(kind, l): clean.__setitem__(key, _first(o)[0].clone())))
    p_clean = float(model(input_ids=ids).logits[0, -1].softmax(-1)[fact["target"]])
    for h in handles:
        h.remove()

    d = clean[("hidden", 0)].shape[-1]
    noise = torch.randn((N_NOISE, b - a + 1, d), generator=gen) * NOISE_SCALE * std

    def corrupt(m, i, o):  # o: (rows, T, d); same noise pattern for every restored position
        o = o.clone()
        o[:, a: b + 1] += noise.repeat(o.shape[0] // N_NOISE, 1, 1)
        return o

    def run(rows: int, hook=None, mod=None) -> torch.Tensor:
        hs = [embedding(model).register_forward_hook(corrupt)]
        if hook is not None:
            hs.append(mod.register_forward_hook(hook))
        try:
            logits = model(input_ids=ids.repeat(rows, 1)).logits[:, -1]
        finally:
            for h in hs:
                h.remove()
        return logits.softmax(-1)[:, fact["target"]]  # (rows,)

    p_corrupt = float(run(N_NOISE).mean())
    restored = {kind: torch.zeros(len(layers), T) for kind in sites}
    for kind, mods in sites.items():
        for l, mod in enumerate(mods):
            # Row block t (N_NOISE rows) restores the clean activation at position t only.
            def restore(m, i, o, key=(kind, l)):
                h = _first(o).clone()
                for t in range(T):
                    h[t * N_NOISE:(t + 1) * N_NOISE, t] = clean[key][t]
                return _replace_first(o, h)

            p = run(T * N_NOISE, restore, mod).view(T, N_NOISE).mean(-1)
            restored[kind][l] = p
    return {"p_clean": p_clean, "p_corrupt": p_corrupt, "restored": restored,
            "positions": {"subject_first": a, "subject_last": b,
                          "after_subject": min(b + 1, T - 1), "prompt_last": T - 1}}


def causal_trace(model, tok, n_facts: int) -> dict:
    facts = pick_facts(model, tok, n_facts)
    std = noise_std(model, facts)
    gen = torch.Generator().manual_seed(TRACE_SEED)
    L = len(blocks(model))
    sums = {kind: {pos: torch.zeros(L) for pos in POSITIONS} for kind in ("hidden", "mlp", "attn")}
    p_clean = p_corrupt = 0.0
    for i, fact in enumerate(facts):
        r = trace_fact(model, fact, std, gen)
        p_clean += r["p_clean"] / len(facts)
        p_corrupt += r["p_corrupt"] / len(facts)
        for kind in sums:
            for pos, t in r["positions"].items():
                sums[kind][pos] += r["restored"][kind][:, t] / len(facts)
        if (i + 1) % 50 == 0:
            print(f"  traced {i + 1}/{len(facts)}", file=sys.stderr, flush=True)
    return {
        "n_facts": len(facts), "noise_std": std, "noise_scale": NOISE_SCALE,
        "n_noise_samples": N_NOISE, "p_clean": p_clean, "p_corrupt": p_corrupt,
        # mean probability of the correct answer after restoring one site
        "restored_p": {k: {pos: v.tolist() for pos, v in d.items()} for k, d in sums.items()},
    }


# ---------------------------------------------------------------- key cosines
def contexts() -> list[str]:
    """Distinct text before the subject across all templates ("" = subject first)."""
    return sorted({t[: t.index("{}")] for ts in world.TEMPLATES.values() for t in ts})


@torch.no_grad()
def subject_keys(model, tok, names: list[str], context: str) -> torch.Tensor:
    """Keys at the subject's last token, every layer: (layers, subjects, d_ff)."""
    mt = model.config.model_type
    layers = blocks(model)
    keys = [[] for _ in layers]
    for start in range(0, len(names), 256):
        chunk = names[start:start + 256]
        enc = [tok(context + n)["input_ids"] for n in chunk]  # subject is the text's end
        width = max(len(e) for e in enc)
        # Left padding keeps the subject's last token in the last column.
        ids = torch.full((len(enc), width), tok.pad_token_id)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for r, e in enumerate(enc):
            ids[r, width - len(e):], mask[r, width - len(e):] = torch.tensor(e), 1
        captured: list[torch.Tensor] = []
        hs = [out_proj(blk, mt).register_forward_pre_hook(
            lambda m, args: captured.append(args[0][:, -1].clone())) for blk in layers]
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        for h in hs:
            h.remove()
        for l, k in enumerate(captured):
            keys[l].append(k)
    return torch.stack([torch.cat(k) for k in keys])


def _offdiag_stats(a: torch.Tensor, b: torch.Tensor | None = None) -> dict:
    """Cosine stats between rows of a and rows of b (pairs i != j)."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = a if b is None else torch.nn.functional.normalize(b.float(), dim=-1)
    cos = a @ b.T
    off = ~torch.eye(len(a), dtype=torch.bool)
    vals = cos[off]
    nn_max = cos.masked_fill(~off, -2).max(-1).values
    return {"mean": float(vals.mean()), "p99": float(vals.quantile(0.99)) if len(vals) < 16e6
            else float(vals[torch.randperm(len(vals))[:1_000_000]].quantile(0.99)),
            "frac_above_gate": float((vals > GATE).float().mean()),
            "nearest_other_mean": float(nn_max.mean()),
            "frac_nearest_other_above_gate": float((nn_max > GATE).float().mean())}


def facts_in_common(subjects: list[world.Subject]) -> torch.Tensor:
    """(S, S) number of relations on which two subjects have the same object."""
    objs = torch.tensor([[world.OBJECTS[r].index(s.facts[r]) for r in world.RELATIONS]
                         for s in subjects])
    return (objs[:, None, :] == objs[None, :, :]).sum(-1)


def _mean_by_group(keys: torch.Tensor, groups: torch.Tensor) -> dict[str, float]:
    k = torch.nn.functional.normalize(keys.float(), dim=-1)
    cos = k @ k.T
    off = ~torch.eye(len(k), dtype=torch.bool)
    return {str(g): float(cos[(groups == g) & off].mean())
            for g in sorted(set(groups[off].tolist()))}


def _nearest_other(queries: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Per query row i: max cosine to stored rows j != i (another subject's stored key)."""
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    s = torch.nn.functional.normalize(stored.float(), dim=-1)
    cos = (q @ s.T).fill_diagonal_(-2.0)
    return cos.max(-1).values


def _gate_sweep(same: torch.Tensor, nearest_other: torch.Tensor) -> list[dict]:
    """For candidate gates: how often a paraphrase of the same subject passes (wanted) and
    how often another subject's nearest stored key passes (a false fire, if all subjects
    were stored)."""
    return [{"gate": g, "same_subject_pass": float((same > g).float().mean()),
             "other_subject_nearest_pass": float((nearest_other > g).float().mean())}
            for g in (0.65, 0.75, 0.85, 0.9, 0.95)]


def key_cosines(model, tok) -> dict:
    subjects = world.build_world()
    names = [s.name for s in subjects]
    ctxs = contexts()
    keys = {c: subject_keys(model, tok, names, c) for c in ctxs}  # each (L, S, d_ff)
    shared = {suf: [i for i, s in enumerate(subjects) if s.name.endswith(" " + suf)]
              for suf in world.SHARED_SUFFIXES}
    plain = [i for i, s in enumerate(subjects) if "shared_last_token" not in s.tags]
    n_common = facts_in_common([subjects[i] for i in plain])
    L = keys[""].shape[0]
    out = []
    for l in range(L):
        bare = keys[""][l]
        # Same subject, other phrasing: stored key from the bare prompt, query in context c.
        same = torch.cat([torch.nn.functional.cosine_similarity(bare, keys[c][l], dim=-1)
                          for c in ctxs if c])
        # Different subjects, query in another phrasing (what a neighbour prompt looks like).
        other_ctx = [c for c in ctxs if c][l % (len(ctxs) - 1)]
        row = {
            "layer": l,
            "cross_subject_same_context": _offdiag_stats(bare[plain]),
            "cross_subject_other_context": _offdiag_stats(bare[plain], keys[other_ctx][l][plain]),
            "same_subject_other_context": {
                "mean": float(same.mean()), "p01": float(same.quantile(0.01)),
                "frac_above_gate": float((same > GATE).float().mean())},
            "shared_last_token_group": {suf: _offdiag_stats(bare[idx]) for suf, idx in shared.items()},
            # Keys encode the subject's attributes: pairs with more facts in common are closer.
            "cross_subject_mean_by_facts_in_common": _mean_by_group(bare[plain], n_common),
            "gate_sweep": _gate_sweep(same, _nearest_other(keys[other_ctx][l][plain], bare[plain])),
        }
        out.append(row)
    return {"gate": GATE, "n_subjects": len(names), "contexts": ctxs, "per_layer": out}


# ---------------------------------------------------------------- report
def print_tables(name: str, trace: dict, cos: dict) -> None:
    tr = trace["restored_p"]
    print(f"\n== {name}: causal trace over {trace['n_facts']} known facts "
          f"(p clean {trace['p_clean']:.3f}, corrupted {trace['p_corrupt']:.3f}) ==")
    print("mean p(answer) after restoring one site; rows = layer")
    head = "layer | hidden@subj_last hidden@prompt_last | mlp@subj_last mlp@prompt_last | attn@subj_last attn@prompt_last"
    print(head)
    for l in range(len(tr["hidden"]["subject_last"])):
        print(f"{l:5d} | {tr['hidden']['subject_last'][l]:15.3f} {tr['hidden']['prompt_last'][l]:18.3f} | "
              f"{tr['mlp']['subject_last'][l]:13.3f} {tr['mlp']['prompt_last'][l]:15.3f} | "
              f"{tr['attn']['subject_last'][l]:14.3f} {tr['attn']['prompt_last'][l]:16.3f}")
    print(f"\n== {name}: key cosines at the subject's last token (gate {cos['gate']}) ==")
    print("layer | cross-subj mean p99 >gate NN>gate | cross-subj other-ctx mean p99 | same-subj other-ctx mean p01 >gate | shared-suffix mean p99 >gate")
    for row in cos["per_layer"]:
        c, o, s = row["cross_subject_same_context"], row["cross_subject_other_context"], row["same_subject_other_context"]
        g = row["shared_last_token_group"]
        gm = sum(v["mean"] for v in g.values()) / len(g)
        gp = max(v["p99"] for v in g.values())
        gf = sum(v["frac_above_gate"] for v in g.values()) / len(g)
        print(f"{row['layer']:5d} | {c['mean']:.3f} {c['p99']:.3f} {c['frac_above_gate']:.4f} {c['frac_nearest_other_above_gate']:.3f} | "
              f"{o['mean']:.3f} {o['p99']:.3f} | {s['mean']:.3f} {s['p01']:.3f} {s['frac_above_gate']:.3f} | "
              f"{gm:.3f} {gp:.3f} {gf:.3f}")
    print("gate sweep: share of same-subject paraphrase keys above the gate / share of subjects "
          "whose nearest OTHER subject's key (other phrasing) is above it")
    for row in cos["per_layer"]:
        print(f"{row['layer']:5d} | " + "  ".join(
            f"{s['gate']}: {s['same_subject_pass']:.3f}/{s['other_subject_nearest_pass']:.3f}"
            for s in row["gate_sweep"]))
    print("cross-subject mean cosine by number of facts (of 5) the two subjects share:")
    for row in cos["per_layer"]:
        by = row["cross_subject_mean_by_facts_in_common"]
        print(f"{row['layer']:5d} | " + "  ".join(f"{g}: {v:.3f}" for g, v in by.items()))


def plot(name: str, trace: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot", file=sys.stderr)
        return
    kinds = ["hidden", "mlp", "attn"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), sharey=True)
    for ax, kind in zip(axes, kinds):
        grid = torch.tensor([trace["restored_p"][kind][p] for p in POSITIONS])  # (pos, L)
        im = ax.imshow(grid, cmap="Purples", vmin=0, vmax=trace["p_clean"], aspect="auto")
        ax.set_title(f"restore {kind}")
        ax.set_xlabel("layer")
        ax.set_xticks(range(grid.shape[1]))
        ax.set_yticks(range(len(POSITIONS)), POSITIONS)
    fig.colorbar(im, ax=axes, label="p(correct answer)")
    fig.suptitle(f"{name}: causal trace, {trace['n_facts']} facts "
                 f"(clean {trace['p_clean']:.2f}, corrupted {trace['p_corrupt']:.2f})", y=1.06)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path.relative_to(HERE)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["llama", "gpt2"], action="append",
                        help="model(s) to trace; default both")
    parser.add_argument("--facts", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(TRACE_SEED)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in args.model or ["llama", "gpt2"]:
        path = HERE / "models" / name
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tok = AutoTokenizer.from_pretrained(path)
        trace = causal_trace(model, tok, args.facts)
        cos = key_cosines(model, tok)
        print_tables(name, trace, cos)
        result = {"model": name, "command": "python examples/factworld/trace.py",
                  "causal_trace": trace, "key_cosines": cos}
        (HERE / f"trace_{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        plot(name, trace, HERE / f"trace_{name}.png")


if __name__ == "__main__":
    main()
