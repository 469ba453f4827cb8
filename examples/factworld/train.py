"""Train two tiny causal LMs (Llama, GPT-2) from scratch on the fact world, on a CPU.

Run from anywhere:  python examples/factworld/train.py  [--only llama|gpt2] [--epochs N]

Writes, next to this file:
  models/llama/, models/gpt2/   model + tokenizer (save_pretrained) + train_report.json
  edits.jsonl, edits_same_subject.jsonl, quickstart.jsonl, true_facts.jsonl, generic.txt

Everything is seeded (world, tokenizer corpus, init, batch order), so a rerun on the same
torch version reproduces the same weights up to CPU floating-point nondeterminism.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

# Spinning OpenMP workers stall when the 2 cores are shared with other processes: 2-thread
# steps ran ~5x slower than 1-thread ones here. Must be set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # so `world` imports when run from the repo root

import world  # noqa: E402
from datafiles import write_data_files  # noqa: E402

TRAIN_SEED = 0
TOKENIZER_SEED = 0  # seed of the biography pass the tokenizer is trained on
N_FILLER_PER_EPOCH = 2000  # non-fact sentences mixed into training, ~5% of tokens
SPECIALS = ["<|endoftext|>", "<|begin_of_text|>", "<|pad|>"]
MAX_POSITIONS = 256

# Both models: 4 layers, d_model 128, 2 heads of 64 (vLLM on CPU needs head_dim >= 64).
MODEL_SETTINGS: dict[str, dict] = {
    "llama": {"layers": 4, "d_ff": 384, "epochs": 14, "lr": 3e-3, "batch": 64,
              "keep_other": 0.25, "bf16": True},
    "gpt2": {"layers": 4, "d_ff": 512, "epochs": 14, "lr": 3e-3, "batch": 64,
             "keep_other": 0.25, "bf16": True},
}


# ---------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str]):
    """Byte-level BPE (GPT-2 style leading-space tokens) trained on the world's text.

    The vocabulary is made large enough that every word of the world, each invented
    surname included, becomes one token: the subject's last token is then unique to it
    (except the labelled " Junior"/" Senior" group), which is what keys rely on.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8000,  # an upper bound: training stops once every word is merged
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def wrap_tokenizer(tok, kind: str):
    """PreTrainedTokenizerFast for one model kind: Llama adds BOS, GPT-2 adds nothing."""
    import copy

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = copy.deepcopy(tok)
    if kind == "llama":
        bos_id = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos_id)],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|endoftext|>",
            pad_token="<|pad|>", model_max_length=MAX_POSITIONS,
        )
    # GPT-2 convention: one <|endoftext|> serving as bos/eos/unk, never added implicitly.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|pad|>", model_max_length=MAX_POSITIONS,
    )


# ---------------------------------------------------------------- model
def make_model(kind: str, hf_tok, settings: dict):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    common = {"vocab_size": len(hf_tok), "pad_token_id": hf_tok.pad_token_id,
              "bos_token_id": hf_tok.bos_token_id, "eos_token_id": hf_tok.eos_token_id}
    if kind == "llama":
        cfg = LlamaConfig(
            hidden_size=128, num_attention_heads=2, num_key_value_heads=2, head_dim=64,
            intermediate_size=settings["d_ff"], num_hidden_layers=settings["layers"],
            max_position_embeddings=MAX_POSITIONS, rope_theta=10000.0,
            tie_word_embeddings=True, **common,
        )
        return LlamaForCausalLM(cfg)
    cfg = GPT2Config(
        n_embd=128, n_head=2, n_layer=settings["layers"], n_inner=settings["d_ff"],
        n_positions=MAX_POSITIONS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        **common,
    )
    return GPT2LMHeadModel(cfg)


# ---------------------------------------------------------------- data
def epoch_texts(subjects: list[world.Subject], epoch: int) -> list[str]:
    """Fresh sentence orders / template offsets every epoch; the facts never change."""
    bios = world.biographies(subjects, seed=10_000 + epoch)
    filler = world.filler_sentences(N_FILLER_PER_EPOCH, seed=20_000 + epoch)
    # Filler goes in groups of 4 sentences so rows have biography-like lengths.
    filler_docs = [" ".join(filler[i:i + 4]) for i in range(0, len(filler), 4)]
    docs = bios + filler_docs
    random.Random(30_000 + epoch).shuffle(docs)
    return docs


def encode_docs(hf_tok, docs: list[str]) -> list[list[int]]:
    """Token ids of each document plus EOS (BOS comes from the Llama post-processor)."""
    enc = hf_tok(docs, add_special_tokens=True)["input_ids"]
    return [ids + [hf_tok.eos_token_id] for ids in enc]


def batches(seqs: list[list[int]], batch_size: int, pad_id: int):
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for r, s in enumerate(chunk):
            ids[r, :len(s)] = torch.tensor(s)
            labels[r, :len(s)] = torch.tensor(s)
        yield ids, labels


# ---------------------------------------------------------------- evaluation
def fact_queries(hf_tok, subjects: list[world.Subject]) -> list[tuple[list[int], int, str, int]]:
    """(prompt ids, first token id of " <object>", relation, template index) per fact prompt."""
    keys = [(s, rel, t) for s in subjects for rel in world.RELATIONS
            for t in range(len(world.TEMPLATES[rel]))]
    prompts = hf_tok([world.prompt(rel, t, s.name) for s, rel, t in keys])["input_ids"]
    first = object_token_ids(hf_tok)
    return [(ids, first[s.facts[rel]], rel, t) for ids, (s, rel, t) in zip(prompts, keys)]


def object_token_ids(hf_tok) -> dict[str, int]:
    """First token of " <object>" for every object of the world."""
    objs = [o for objs in world.OBJECTS.values() for o in objs]
    enc = hf_tok([" " + o for o in objs], add_special_tokens=False)["input_ids"]
    return {o: ids[0] for o, ids in zip(objs, enc)}


@torch.no_grad()
def fact_accuracy(model, queries, pad_id: int, batch_size: int = 512) -> dict:
    """Top-1 next-token accuracy on the first object token, overall and per template."""
    model.eval()
    hits: dict[str, list[int]] = {}
    for i in range(0, len(queries), batch_size):
        chunk = queries[i:i + batch_size]
        width = max(len(q[0]) for q in chunk)
        # Left padding, so the next-token logits of every row sit at the last position.
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (p, *_rest) in enumerate(chunk):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        pred = logits.argmax(-1)
        for r, (_p, target, rel, t) in enumerate(chunk):
            hits.setdefault(f"{rel}/{t}", []).append(int(pred[r] == target))
    model.train()
    per_template = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    total = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return {"overall": total, "per_template": per_template, "n_prompts": len(queries)}


# ---------------------------------------------------------------- training
def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def lm_loss(model, ids: torch.Tensor, labels: torch.Tensor, object_ids: torch.Tensor,
            keep_other: float, gen: torch.Generator) -> torch.Tensor:
    """Next-token loss, scored at every object token and a random share of other tokens.

    The LM head (vocab ~4.9k x 128) costs about as much as the 4 layers below it; facts
    live in the object positions, so those are always scored while the easy template
    tokens are subsampled. On CPU this cuts a training step by roughly a third.
    """
    hidden = model.base_model(input_ids=ids).last_hidden_state[:, :-1]  # (B, T-1, d)
    target = labels[:, 1:]  # (B, T-1)
    is_object = torch.isin(target, object_ids)
    keep = (target != -100) & (is_object | (torch.rand(target.shape, generator=gen) < keep_other))
    logits = model.lm_head(hidden[keep])  # (n_kept, vocab)
    return F.cross_entropy(logits.float(), target[keep])


def train_one(kind: str, tok, subjects: list[world.Subject], epochs: int | None) -> dict:
    settings = dict(MODEL_SETTINGS[kind])
    if epochs is not None:
        settings["epochs"] = epochs
    torch.manual_seed(TRAIN_SEED)
    gen = torch.Generator().manual_seed(TRAIN_SEED)
    hf_tok = wrap_tokenizer(tok, kind)
    model = make_model(kind, hf_tok, settings)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{kind}] {n_params:,} parameters, vocab {len(hf_tok)}", flush=True)

    queries = fact_queries(hf_tok, subjects)
    probe = random.Random(1).sample(queries, 2000)  # cheap progress check each epoch
    object_ids = torch.tensor(sorted(set(object_token_ids(hf_tok).values())))
    n_docs = len(epoch_texts(subjects, 0))
    steps_per_epoch = math.ceil(n_docs / settings["batch"])
    total_steps = steps_per_epoch * settings["epochs"]
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], betas=(0.9, 0.98),
                            weight_decay=0.01)
    step, t0, history = 0, time.time(), []
    model.train()
    for epoch in range(settings["epochs"]):
        seqs = encode_docs(hf_tok, epoch_texts(subjects, epoch))
        loss_sum, n = 0.0, 0
        for ids, labels in batches(seqs, settings["batch"], hf_tok.pad_token_id):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total_steps, settings["lr"], warmup=steps_per_epoch)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings["bf16"]):
                loss = lm_loss(model, ids, labels, object_ids, settings["keep_other"], gen)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_sum, n, step = loss_sum + loss.item(), n + 1, step + 1
            if step % 50 == 0:
                print(f"[{kind}] step {step}/{total_steps} loss {loss_sum / n:.3f} "
                      f"{time.time() - t0:.0f}s", flush=True)
        acc = fact_accuracy(model, probe, hf_tok.pad_token_id)["overall"]
        history.append({"epoch": epoch + 1, "loss": round(loss_sum / n, 4),
                        "probe_acc": round(acc, 4), "elapsed_s": round(time.time() - t0, 1)})
        print(f"[{kind}] {history[-1]}", flush=True)
    train_time = time.time() - t0
    final = fact_accuracy(model, queries, hf_tok.pad_token_id)
    print(f"[{kind}] final fact accuracy {final['overall']:.4f} over {final['n_prompts']} prompts")
    return {"model": model, "tokenizer": hf_tok, "settings": settings, "n_params": n_params,
            "history": history, "train_time_s": round(train_time, 1), "accuracy": final}


def save(kind: str, result: dict) -> Path:
    out = HERE / "models" / kind
    out.mkdir(parents=True, exist_ok=True)
    result["model"].save_pretrained(out, safe_serialization=True)
    result["tokenizer"].save_pretrained(out)
    _portable_tokenizer_config(out)
    report = {
        "model_type": result["model"].config.model_type,
        "n_params": result["n_params"],
        "settings": result["settings"],
        "seeds": {"world": world.WORLD_SEED, "train": TRAIN_SEED, "tokenizer_corpus": TOKENIZER_SEED,
                  "epoch_text": "10000+epoch (biographies), 20000+epoch (filler), 30000+epoch (order)"},
        "optimizer": "AdamW(betas=(0.9, 0.98), weight_decay=0.01), grad clip 1.0, "
                     "1 epoch linear warmup then cosine to 5% of peak lr",
        "n_subjects": len(world.build_world()),
        "train_time_s": result["train_time_s"],
        "torch": torch.__version__, "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "fact_accuracy": result["accuracy"],
        "history": result["history"],
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return out


def _portable_tokenizer_config(out: Path) -> None:
    """Name the generic fast-tokenizer class, which transformers 4.x and 5.x both load."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(MODEL_SETTINGS), help="train one model")
    parser.add_argument("--epochs", type=int, help="override the recorded epoch count")
    parser.add_argument("--no-save", action="store_true", help="train and report only")
    parser.add_argument("--skip-data", action="store_true",
                        help="do not rewrite the data files (e.g. for a second, parallel run)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 was fastest on 2 cores shared with other work")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    subjects = world.build_world()
    if not args.skip_data:
        write_data_files(HERE, subjects)
    tok = train_tokenizer(epoch_texts(subjects, TOKENIZER_SEED))
    for kind in [args.only] if args.only else list(MODEL_SETTINGS):
        result = train_one(kind, tok, subjects, args.epochs)
        if not args.no_save:
            print(f"[{kind}] saved to {save(kind, result).relative_to(HERE)}")
        if result["accuracy"]["overall"] < 0.95:
            print(f"[{kind}] WARNING: fact accuracy below 95%", flush=True)


if __name__ == "__main__":
    main()
