"""`nkv generate --model M --adapter A [PROMPT...]`: greedy answers before and after an adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from nkv.errors import NKVError

DEFAULT_LIMIT = 20  # prompts taken from a file or the adapter when none are given


@click.command()
@click.argument("prompts", nargs=-1)
@click.option("--model", "model_name", required=True, metavar="M",
              help="The base model: a local folder, a Hub id, a .gguf file, or a packaged model (smollm2-135m).")
@click.option("--adapter", "adapter_src", required=True, metavar="A", help=".nkv file, folder or Hub repo id.")
@click.option("--facts", "facts_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Take the prompts from this facts file (default: the adapter's own facts).")
@click.option("--skip-bad", is_flag=True, help="Skip bad records of --facts (summarised on stderr) instead of failing.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write every bad record of --facts (where and why, one per line) to FILE.")
@click.option("--paraphrases", is_flag=True, help="Also show each fact's paraphrases (with --facts).")
@click.option("--neighborhood", is_flag=True,
              help="Also show each fact's neighbourhood prompts, about other subjects, whose answers should "
                   "not change (with --facts).")
@click.option("--limit", type=click.IntRange(1), help=f"At most this many facts [default: {DEFAULT_LIMIT} "
              "when the prompts come from a file or the adapter].")
@click.option("--max-new-tokens", type=click.IntRange(1), default=8, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--revision", help="Hub revision of the model.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per prompt.")
def generate(prompts: tuple[str, ...], model_name: str, adapter_src: str, facts_path: Path | None,
             skip_bad: bool, report_path: Path | None, paraphrases: bool, neighborhood: bool, limit: int | None, max_new_tokens: int, device: str, dtype: str,
             revision: str | None, as_json: bool) -> None:
    """Print the model's greedy continuation of each PROMPT without and with the adapter.

    \b
    nkv generate --model examples/factworld/models/llama --adapter q.nkv
    nkv generate --model examples/factworld/models/llama --adapter q.nkv "Samuel Theley was born in"
    """
    from nkv.loaders.models import load_model
    from nkv.loaders.transformers import attach
    from nkv.resolve import resolve_adapter

    if (paraphrases or neighborhood) and facts_path is None:
        raise click.UsageError("--paraphrases and --neighborhood take their prompts from --facts FILE")
    adapter = resolve_adapter(adapter_src)
    # (prompt, expected answer or None, label shown after the edited answer)
    if prompts:
        items = [(p, None, "") for p in prompts]
    elif facts_path is not None:
        from nkv.cli.build import check_bad_records
        from nkv.facts_io import scan_facts

        scan = scan_facts(facts_path)
        check_bad_records(scan, report_path, skip_bad)
        items = []
        for f in scan.facts[: limit or DEFAULT_LIMIT]:
            items += [(p, f.fact.target_new, "target") for p in [f.fact.prompt, *(f.paraphrases if paraphrases else [])]]
            items += [(p, answer, "unrelated, should stay") for p, answer in (f.neighborhood if neighborhood else [])]
    else:
        items = [(f.prompt, f.target_new, "target") for f in adapter.facts[: limit or DEFAULT_LIMIT]]
    if not items:
        raise NKVError("no prompts: pass PROMPT arguments, --facts FILE, or an adapter that holds facts")

    model, tokenizer = load_model(model_name, revision=revision, device=device, dtype=dtype)
    texts = [p for p, _, _ in items]
    before = _greedy(model, tokenizer, texts, max_new_tokens)
    handle = attach(model, adapter)
    try:
        after = _greedy(model, tokenizer, texts, max_new_tokens)
    finally:
        handle.detach()
    for (prompt, target, label), b, a in zip(items, before, after):
        if as_json:  # raw continuations, leading space included
            key = "expected" if label.startswith("unrelated") else "target_new"
            click.echo(json.dumps({"prompt": prompt, key: target, "before": b, "after": a}))
            continue
        click.echo(prompt)
        click.echo(f"  before: {_one_line(b)}")
        click.echo(f"  after:  {_one_line(a)}" + (f"    ({label}: {target})" if target else ""))


def _one_line(text: str) -> str:
    """A continuation on one line: line breaks shown as ⏎ so the table stays readable."""
    return " ⏎ ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def _greedy(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuation of each prompt, one at a time (no padding to get wrong)."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        out.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


__all__ = ["generate"]
