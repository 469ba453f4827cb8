"""`nkv eval`: efficacy, generalization, specificity (and more) of an adapter, pre and post edit.

The table (or `--json`) goes to stdout; progress and notes to stderr. Every fact of the
data file is evaluated with all of the adapter's edits live at once.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click

from nkv.atomic import check_writable_target, rewrite_adapter
from nkv.constants import DEFAULT_SHORTLIST, SKETCH_MIN_FACTS
from nkv.errors import NKVError


@click.command(name="eval")
@click.option("--model", "model_name", required=True, metavar="PATH|ORG/NAME",
              help="The base model: a folder saved with save_pretrained, a Hub id, a .gguf file, or a "
                   "packaged model (smollm2-135m, gemma3-270m).")
@click.option("--adapter", "adapter_src", required=True, metavar="FILE|ORG/NAME", help="The .nkv adapter.")
@click.option("--data", "data_path", required=True, metavar="FILE",
              help="Facts to evaluate: our JSONL, CounterFact (EasyEdit or ROME shape), ZsRE or KnowEdit records.")
@click.option("--skip-bad", is_flag=True, help="Skip bad records of DATA (summarised on stderr) instead of failing.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write every bad record of DATA (where and why, one per line) to FILE.")
@click.option("--unrelated", "unrelated_path", metavar="FILE",
              help="Text unrelated to the edits, one passage per line, for false fires "
                   "(default: text sampled from the unedited model).")
@click.option("--true-facts", "true_facts_path", metavar="FILE",
              help="JSONL of {subject, prompt, target} the model knows: unedited-fact accuracy and the "
                   "edited subjects' other facts (without it, those are measured on the model's own answers "
                   "to relation prompts about each edited subject).")
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="Evaluate only the first N facts.")
@click.option("--protocol", type=click.Choice(["counterfact", "zsre"]),
              help="Scoring protocol (default: zsre for ZsRE records or facts without target_true, "
                   "else counterfact).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--device", metavar="DEV", help="cpu, cuda, cuda:N (default: cuda if available, else cpu).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--revision", help="Hub revision (branch, tag or commit) of the model.")
@click.option("--no-free-gen", is_flag=True, help="Skip greedy free-generation exact match.")
@click.option("--fluency-prompts", type=click.IntRange(min=0), default=16, show_default=True,
              help="Edit prompts to sample text from for fluency (0: skip).")
@click.option("--gate", "gate_path", type=click.Choice(["auto", "exact", "sketch"]), default="auto", show_default=True,
              help=f"The gate's path: auto = the loader's choice (the sketch path from {SKETCH_MIN_FACTS:,} facts "
                   "up), exact, or sketch (shortlisted candidates rescored exactly, spec §5.1) at any size.")
@click.option("--shortlist", type=click.IntRange(min=1), metavar="N",
              help=f"Candidates per token the sketch path rescores exactly (default {DEFAULT_SHORTLIST}): the "
                   "value the server will use (load_nkv_adapter(shortlist=N), vLLM's \"shortlist\").")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON instead of the table.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), metavar="PNG",
              help="Write the gate's cosine histogram (positives vs unrelated tokens, γ marked).")
@click.option("--write-back", is_flag=True,
              help="Store the summary in the adapter file's nkv.eval metadata (atomic rewrite); model cards show it.")
def evaluate(model_name: str, adapter_src: str, data_path: str, skip_bad: bool, report_path: Path | None,
             unrelated_path: str | None,
             true_facts_path: str | None, limit: int | None, protocol: str | None, batch_size: int,
             device: str | None, dtype: str, revision: str | None, no_free_gen: bool, fluency_prompts: int,
             gate_path: str, shortlist: int | None, as_json: bool, plot_path: Path | None, write_back: bool) -> None:
    """Evaluate ADAPTER on the facts in DATA, with the adapter disabled (pre) and enabled (post).

    \b
    nkv eval --model examples/factworld/models/llama --adapter edits.nkv \\
             --data examples/factworld/edits.jsonl --true-facts examples/factworld/true_facts.jsonl \\
             --unrelated examples/factworld/generic.txt --plot gate.png
    nkv eval --model gpt2-xl --adapter cf.nkv --data counterfact-edit.json --limit 1000 --json
    """
    from nkv.cli.build import check_bad_records
    from nkv.facts_io import scan_facts
    from nkv.loaders.models import load_model
    from nkv.resolve import resolve_adapter

    # Cheap checks first: a typo in a path should not cost a model load.
    if gate_path == "exact" and shortlist is not None:
        raise NKVError("--shortlist sets the sketch path's candidates, and --gate exact scores every row; "
                       "drop one of them")
    if write_back and not Path(adapter_src).is_file():
        raise NKVError(f"--write-back rewrites a local .nkv file, but {adapter_src!r} is not one; "
                       "download it first (`nkv pull ... -o DIR`) and pass the file")
    if write_back:
        check_writable_target(adapter_src)  # a symlink into the Hub cache: refuse before the model loads
    scan = scan_facts(data_path)
    check_bad_records(scan, report_path, skip_bad)
    facts = scan.facts[:limit]
    unrelated = _read_lines(unrelated_path) if unrelated_path else None
    true_facts = None
    if true_facts_path:
        from nkv.editing.evaluate import read_true_facts

        true_facts = read_true_facts(true_facts_path)
    adapter = resolve_adapter(adapter_src)
    if write_back:
        from nkv.editing.evaluate import adapter_rows

        if not any(row is not None for row in adapter_rows(adapter, facts)):
            raise NKVError(f"--write-back: none of the {len(facts)} facts in {data_path} is in {adapter_src}, so "
                           "its numbers would describe facts the adapter was not built on; not storing them")
    model, tokenizer = load_model(model_name, revision=revision, device=device or "auto", dtype=dtype)
    click.echo(f"loaded {model_name} ({sum(p.numel() for p in model.parameters()):,} parameters) on "
               f"{next(model.parameters()).device}", err=True)

    from nkv.editing.evaluate import EvalOptions, evaluate as run_eval

    options = EvalOptions(batch_size=batch_size, protocol=protocol, free_generation=not no_free_gen,
                          fluency_prompts=fluency_prompts)
    click.echo(f"evaluating {len(facts)} facts from {data_path} with {adapter.n_facts} edits live ...", err=True)
    report = run_eval(model, tokenizer, adapter, facts, unrelated=unrelated, true_facts=true_facts, options=options,
                      data_name=Path(data_path).name, unrelated_name=unrelated_path, gate=gate_path,
                      shortlist=DEFAULT_SHORTLIST if shortlist is None else shortlist)
    if report.adapter["matched"] == 0:
        click.echo(f"note: none of the {len(facts)} facts in {data_path} is in the adapter; the numbers measure "
                   "facts it was not built on", err=True)
    if report.adapter["other_target"]:
        n, ids = report.adapter["other_target"], report.adapter["other_target_ids"]
        click.echo(f"note: {n} fact(s) of {data_path} have a row in the adapter built for another target "
                   f"({', '.join(ids)}{', ...' if n > len(ids) else ''}); they are scored against the data's "
                   "target", err=True)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.table())
    if plot_path is not None:
        from nkv.editing.evaluate import plot_cosines

        click.echo(f"wrote {plot_cosines(report, plot_path)}", err=True)
    if write_back:
        path = Path(adapter_src)
        # Re-read under the writers' lock: an `nkv rm` during the evaluation is kept, not overwritten.
        rewrite_adapter(path, lambda now: replace(now, eval={**now.eval, Path(data_path).name: report.summary()}))
        click.echo(f"stored the summary in {path} (nkv.eval[{Path(data_path).name!r}])", err=True)


def _read_lines(path: str) -> list[str]:
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise NKVError(f"{path}: no such file (--unrelated expects a text file, one passage per line)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NKVError(f"{path}: cannot read as UTF-8 text ({exc})") from None
    if not lines:
        raise NKVError(f"{path}: is empty; --unrelated needs some text (one passage per line)")
    return lines


__all__ = ["evaluate"]
