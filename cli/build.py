"""`nkv build FACTS --model M -o OUT`: compute an adapter's keys and residuals from facts.

Progress goes to stderr, the summary to stdout. Finished batches are checkpointed in
`OUT.partial/`; after a crash or Ctrl-C, the same command with `--resume` continues
there. The output file is written once, atomically, at the end.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from nkv.constants import DEFAULT_GAMMA
from nkv.errors import NKVError

from .params import FiniteFloatRange, gamma_callback

_FACTS = click.Path(exists=True, dir_okay=False, path_type=Path)
_OUT = click.Path(dir_okay=False, path_type=Path)


def _layer(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected a layer number or 'auto', got {value!r}") from None


@click.command()
@click.argument("facts", type=_FACTS)
@click.option("--model", "model_name", required=True, metavar="M",
              help="A folder saved with save_pretrained, a Hub id, a .gguf file, or a packaged model "
                   "(smollm2-135m, gemma3-270m).")
@click.option("-o", "--output", required=True, type=_OUT, help="The .nkv file to write.")
@click.option("--layer", default=None, metavar="N|auto",
              help="Layer to edit; default: the layer verified for this model's depth and width, else 'auto': "
                   "a short sweep on a sample of the facts.")
@click.option("--gamma", default=DEFAULT_GAMMA, show_default=True, type=float, callback=gamma_callback,
              help="Gate threshold stored in the adapter (cosine), in [0, 1].")
@click.option("--steps", type=click.IntRange(1),
              help="Optimisation steps per fact at most [default: 25, stopping each fact once its target "
                   "is top-1 by a margin; 40 for models with d_model <= 256; --preset previous: 25, GPT-2 20].")
@click.option("--lr", type=FiniteFloatRange(0, min_open=True),
              help="Adam step relative to ||h0|| [default: 0.5; 0.3 for d_model <= 256; --preset previous: 0.2].")
@click.option("--kl-factor", type=FiniteFloatRange(0), help="Weight of the KL term [default: 0.0625].")
@click.option("--weight-decay", type=FiniteFloatRange(0), help="Weight of ||δ||/||h0|| [default: 0.01].")
@click.option("--preserve-factor", type=FiniteFloatRange(0),
              help="Weight of the term that holds each edited subject's other relations at the model's own "
                   "answers (probes from the facts' own prompt shapes and generic ones) [default: 0, off; "
                   "1 kept ~95% of them on the fact-world model, 72.6% (from 40%) on SmolLM2 at some cost "
                   "in generalization and ~2.7x build time: see benchmarks/compare].")
@click.option("--joint-subjects/--separate-subjects", default=None,
              help="Facts of one subject whose keys the gate cannot tell apart on their own prompts are solved "
                   "together: each keeps its own key, and one residual carrying all their edits is every one's "
                   "row [default: joint].")
@click.option("--clamp", type=FiniteFloatRange(0, min_open=True),
              help="Max ||δ|| / ||h0|| [default: 0.75; 2 for d_model <= 256].")
@click.option("--prefixes", "n_prefixes", type=click.IntRange(0), help="Generated context prefixes [default: 5].")
@click.option("--batch-size", type=click.IntRange(1),
              help="Facts per forward/backward [default: 16 on a CPU (64 was no faster there, at 2.2x the "
                   "memory), 64 on a GPU].")
@click.option("--preset", type=click.Choice(["default", "fast", "previous"]), default="default", show_default=True,
              help="'fast': optimise under 2 of the 6 templates, ~2x faster, fewer paraphrases generate the new "
                   "answer (benchmarks/build); 'previous': the build before the fast defaults (25 steps, "
                   "loss-threshold stop), the reference the build benchmark compares against.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--opt-dtype", type=click.Choice(["bfloat16", "float16"]),
              help="Run the optimisation steps under autocast to this dtype (keys and checks stay in --dtype): "
                   "1.3-1.4x faster on a CPU with bf16 instructions, but fewer paraphrases may take the edit "
                   "(benchmarks/build) [default: off].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the context prefixes.")
@click.option("--revision", help="Hub revision (branch, tag or commit) of the model.")
@click.option("--name", help="Base-model name recorded in the adapter [default: --model as given].")
@click.option("--skip-bad", is_flag=True, help="Skip bad fact records (summarised on stderr) instead of failing.")
@click.option("--report", "report_path", type=_OUT, metavar="FILE",
              help="Write every bad fact record (where and why, one per line) to FILE.")
@click.option("--resume", is_flag=True, help="Continue an interrupted build from OUTPUT.partial/.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def build(facts: Path, model_name: str, output: Path, layer: str | None, gamma: float, device: str, dtype: str,
          preset: str, seed: int, revision: str | None, name: str | None, skip_bad: bool, report_path: Path | None,
          resume: bool, quiet: bool, as_json: bool, **options: Any) -> None:
    """Build an adapter for the facts in FACTS (.jsonl or .json; our schema, CounterFact, ZsRE or KnowEdit).

    \b
    nkv build examples/factworld/quickstart.jsonl --model examples/factworld/models/llama -o q.nkv
    nkv build counterfact-edit.json --model gpt2-xl --layer 17 --device cuda -o cf.nkv
    """
    from nkv.editing.solve import Checkpoint, build_adapter, default_config
    from nkv.facts_io import scan_facts
    from nkv.editing.solve.selfcheck import is_low
    from nkv.loaders.models import load_model

    layer_arg = _layer(layer)
    scan = scan_facts(facts, edited_together=True)
    check_bad_records(scan, report_path, skip_bad)
    partial = Checkpoint(output.with_name(output.name + ".partial"))
    partial.require_resume(resume)  # before the model load it would waste

    model, tokenizer = load_model(model_name, revision=revision, device=device, dtype=dtype)

    overrides = {k: v for k, v in options.items() if v is not None}
    config = default_config(model, preset=preset, seed=seed, **overrides)
    started = time.perf_counter()
    try:
        adapter = build_adapter(model, tokenizer, scan.facts, layer=layer_arg, gamma=gamma, config=config,
                                name=name or model_name, revision=revision, progress=not quiet,
                                checkpoint_dir=partial.folder, resume=resume)
    except KeyboardInterrupt:
        done = partial.n_done()
        click.echo(f"\nInterrupted: {done} of {len(scan.facts)} facts are saved in {partial.folder}; "
                   f"{output} was not touched. Rerun the same command with --resume to continue.", err=True)
        sys.exit(130)
    adapter = adapter.sketched_at_scale()  # a large file attaches without fitting (spec §4.2)
    adapter.save(output)
    partial.remove()
    seconds = time.perf_counter() - started
    check = adapter.build["self_check"]
    summary = {"output": str(output), "n_facts": adapter.n_facts, "skipped": len(scan.problems),
               "layer": adapter.layer, "layer_choice": adapter.build["layer_choice"], "gamma": adapter.gamma,
               "seconds": round(seconds, 2), "loss": adapter.build["loss"], "self_check": check}
    if is_low(check):
        click.echo(low_efficacy_warning(check, adapter.layer, adapter.build["layer_choice"]["mode"]), err=True)
    if as_json:
        click.echo(json.dumps(summary))
        return
    loss = adapter.build["loss"]
    click.echo(f"wrote {output}: {adapter.n_facts} facts, layer {adapter.layer} "
               f"({adapter.build['layer_choice']['mode']}), gamma {adapter.gamma}, {seconds:.1f} s "
               f"({_rate(adapter.n_facts, seconds)}); final loss mean {loss['mean']:.3f}, "
               f"{loss['n_above_early_stop']} fact(s) above the early-stop loss")
    click.echo(f"self-check: {check['efficacy']:.0%} of {check['n_checked']} edit prompts answer their new target "
               "with the adapter attached (teacher-forced, every target token top-1)")


@click.command()
@click.argument("file", type=_FACTS)
@click.argument("facts", type=_FACTS)
@click.option("--model", "model_name", required=True, metavar="M",
              help="The adapter's base model (local folder, Hub id, .gguf file or packaged name).")
@click.option("-o", "--output", type=_OUT, default=None, help="Write here instead of replacing FILE.")
@click.option("--skip-bad", is_flag=True, help="Skip bad fact records (summarised on stderr) instead of failing.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def add(file: Path, facts: Path, model_name: str, output: Path | None, skip_bad: bool, quiet: bool) -> None:
    """Add the facts in FACTS to the adapter FILE (in place, atomically, unless -o).

    The new facts are built at FILE's layer and gamma with the settings its build recorded.
    A new fact about a subject FILE already edits is built together with that subject's
    facts, whose rows are rebuilt (those the gate cannot tell apart share one residual);
    no other row changes.

    \b
    nkv add edits.nkv more.jsonl --model smollm2-135m
    """
    from nkv import NKVAdapter
    from nkv.atomic import rewrite_adapter
    from nkv.editing.solve import add_facts
    from nkv.facts_io import scan_facts
    from nkv.loaders.models import load_model

    scan = scan_facts(facts, edited_together=True)
    check_bad_records(scan, None, skip_bad)
    before: list[str] = []

    def extend(adapter: NKVAdapter) -> NKVAdapter:
        before.extend(adapter.ids)
        model, tokenizer = load_model(model_name, revision=adapter.base.revision)
        return add_facts(model, tokenizer, adapter, scan.facts, progress=not quiet).sketched_at_scale()

    started = time.perf_counter()
    target = output or file
    result = rewrite_adapter(file, extend, output=target)
    old = set(before)
    rebuilt = [f.id for f in result.facts if f.id in old and f.provenance.get("solved_with")
               and any(p not in old for p in f.provenance["solved_with"])]
    note = f"; rebuilt {len(rebuilt)} about the same subjects" if rebuilt else ""
    click.echo(f"added {result.n_facts - len(old)} facts to {target} ({result.n_facts} in all{note}), "
               f"{time.perf_counter() - started:.1f} s")


def check_bad_records(scan: Any, report_path: Path | None, skip_bad: bool) -> None:
    """Summarise a facts file's bad records on stderr (a few lines however many), write them all to
    `report_path`, and stop unless `skip_bad` (or when no good record is left)."""
    if report_path is not None:
        scan.write_report(report_path)
        if scan.bad:
            click.echo(f"wrote {report_path}: {len(scan.bad)} bad record(s)", err=True)
    if scan.bad:
        click.echo(("skipped: " if skip_bad else "") + scan.summary(), err=True)
    if scan.bad and not skip_bad:
        where = f"all listed in {report_path}" if report_path else "all of them: --report FILE"
        raise NKVError(f"{scan.source}: {len(scan.bad)} bad record(s) (summary above; {where}); "
                       "fix them or pass --skip-bad")
    if not scan.facts:
        raise NKVError(f"{scan.source}: no usable fact records")


def _rate(n: int, seconds: float) -> str:
    per_second = n / max(seconds, 1e-9)
    return f"{per_second:.1f} facts/s" if per_second >= 1 else f"{seconds / max(n, 1):.1f} s/fact"


def low_efficacy_warning(check: dict[str, Any], layer: int, mode: str) -> str:
    """The loud message for an adapter whose own edits did not take, with the fix to try."""
    fix = ("rebuild with --layer auto (a sweep picks the layer that edits this model), or give the layer a "
           "causal trace points to" if mode != "auto" else
           "try more --steps, a larger --clamp, or a lower --gamma if the keys of similar facts are close")
    failed = ", ".join(check["failed"][:5])
    return (f"\nWARNING: only {check['efficacy']:.0%} of {check['n_checked']} edits answer their new target with this "
            f"adapter attached (layer {layer}, {mode}); the model is mostly NOT edited. Fix: {fix}. "
            f"Not taken, e.g.: {failed}.\n")


__all__ = ["build", "low_efficacy_warning", "check_bad_records"]
