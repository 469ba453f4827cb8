"""`nkv inspect | validate | rm | merge | diff | quantize`: look at and manage .nkv files.

These commands touch only the format package (no model, no transformers import), except
`rm --model` and `merge --model`, which build facts again on the base model.
Results go to stdout; a user error is one line `Error: ...` on stderr with exit code 1.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import click

from nkv import NKVAdapter, NKVError, NKVFormatError, read_header
from nkv.atomic import check_writable_target, locked, rewrite_adapter
from nkv.facts import Fact, decode_facts
from nkv.header import NKVHeader

from .params import gamma_callback

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_OUT = click.Path(dir_okay=False, writable=True, path_type=Path)
_DEFAULT_FACT_ROWS = 20  # facts shown by `inspect --facts` in the table for people


def _size(n_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1000 or unit == "GB":
            return f"{n_bytes} B" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    raise AssertionError("unreachable")


def _short(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 3] + "..."



def _read_facts(header: NKVHeader) -> list[Fact]:
    """Only the fact records (no K1/R1): cheap even for a multi-GB adapter."""
    begin, end = header.tensors["nkv.facts"].data_offsets
    with open(header.source, "rb") as fh:
        fh.seek(header.data_start + begin)
        data = fh.read(end - begin)
    facts, problems = decode_facts(data, header.n_facts, header.source)
    if problems:
        raise NKVFormatError(header.source, problems)
    return facts


def _header_json(header: NKVHeader, path: Path) -> dict[str, Any]:
    return {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "format_version": header.version,
        "n_facts": header.n_facts,
        "layer": header.layer,
        "gamma": header.gamma,
        "dtype": header.dtype,
        "target_module": header.target_module,
        "residual_site": header.residual_site,
        "base": asdict(header.base),
        "build": header.build,
        "eval": header.eval,
        "tensors": {name: {"dtype": t.dtype, "shape": list(t.shape)} for name, t in header.tensors.items()},
    }


@click.command()
@click.argument("file", type=_FILE)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")
@click.option("--facts", "with_facts", is_flag=True, help="Also list the facts.")
@click.option("--limit", type=click.IntRange(min=0), default=None,
              help=f"List at most N facts (0 = all; default {_DEFAULT_FACT_ROWS} in the table, all in --json).")
def inspect(file: Path, as_json: bool, with_facts: bool, limit: int | None) -> None:
    """Show FILE's settings, base model and build provenance (reads only the header
    unless --facts).

    \b
    Example:
      nkv inspect edits.nkv --facts --limit 5
    """
    header = read_header(file)
    facts = _read_facts(header) if with_facts else []
    if limit is None:
        limit = 0 if as_json else _DEFAULT_FACT_ROWS
    shown = facts[:limit] if limit else facts

    if as_json:
        out = _header_json(header, file)
        if with_facts:
            out["facts"] = [f.to_record() for f in shown]
        click.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return

    b = header.base
    rows = [
        ("file", f"{file} ({_size(file.stat().st_size)})"),
        ("format", f"nkv {header.version}"),
        ("facts", str(header.n_facts)),
        ("layer", f"{header.layer} ({header.target_module}"
                  + (", rows added after the FFN-output norm)" if header.residual_site == "out_norm" else ")")),
        ("gamma", f"{header.gamma:g}"),
        ("dtype", header.dtype + {"int8": " (int8 rows, one F32 scale per row)",
                                  "sign": " (sign rows: 1-bit keys with score weights, int4 residuals)"}.get(header.storage, "")),
        ("base model", b.name + (f" @ {b.revision}" if b.revision else "")),
        ("architecture", f"{b.architecture} ({b.model_type}, {b.n_layers} layers, "
                         f"d_model {b.d_model}, d_key {b.d_key})"),
        ("fingerprint", _short(b.fingerprint, 44)),
        ("build", json.dumps(header.build, sort_keys=True, ensure_ascii=False) if header.build else "-"),
    ]
    if header.eval:
        rows.append(("eval", json.dumps(header.eval, sort_keys=True, ensure_ascii=False)))
    for key, value in rows:
        click.echo(f"{key:<13} {value}")
    if with_facts:
        click.echo()
        _facts_table(shown)
        if len(shown) < len(facts):
            click.echo(f"... {len(facts) - len(shown)} more (--limit 0 shows all)")


def _facts_table(facts: list[Fact]) -> None:
    head = ("id", "subject", "target_new", "target_true", "prompt")
    cells = [(f.id, f.subject, f.target_new, f.target_true or "-", f.prompt) for f in facts]
    cells = [tuple(_short(c, 40) for c in row) for row in cells]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(head)]
    for row in [head, *cells]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


@click.command()
@click.argument("file", type=_FILE)
@click.option("--json", "as_json", is_flag=True, help="Print {valid, problems, ...} as JSON.")
def validate(file: Path, as_json: bool) -> None:
    """Check FILE against the spec (every rule, all tensor data); exit 1 if invalid.

    \b
    Example:
      nkv validate edits.nkv && echo fine
    """
    try:
        adapter = NKVAdapter.load(file)
    except NKVFormatError as exc:  # includes NKVVersionError
        if as_json:
            click.echo(json.dumps({"file": str(file), "valid": False, "problems": exc.problems}, indent=2))
        else:
            for problem in exc.problems:
                click.echo(f"  - {problem}")
        n = len(exc.problems)
        raise click.ClickException(f"{file} is not a valid NKV adapter ({n} problem{'s' * (n != 1)})") from None
    summary = (f"{adapter.n_facts} facts, layer {adapter.layer}, gamma {adapter.gamma:g}, "
               f"{read_header(file).dtype}, base {adapter.base.name}")
    if as_json:
        click.echo(json.dumps({"file": str(file), "valid": True, "problems": [], "summary": summary}, indent=2))
    else:
        click.echo(f"OK {file}: {summary}")


@click.command()
@click.argument("file", type=_FILE)
@click.option("--id", "ids", multiple=True, metavar="ID", help="Fact id to remove (repeatable).")
@click.option("--subject", "subjects", multiple=True, metavar="S",
              help="Remove every fact with exactly this subject (repeatable).")
@click.option("-o", "--output", type=_OUT, default=None, help="Write here instead of replacing FILE.")
@click.option("--missing-ok", is_flag=True, help="Ignore ids/subjects that match no fact.")
@click.option("--model", "model_name", default=None, metavar="M",
              help="The adapter's base model, to build again the facts that were solved together with a removed "
                   "one (a subject's facts share one residual, which still carries the removed edit); without it "
                   "such a removal is refused.")
def rm(file: Path, ids: tuple[str, ...], subjects: tuple[str, ...], output: Path | None, missing_ok: bool,
       model_name: str | None) -> None:
    """Remove facts from FILE by id or subject (in place, atomically, unless -o).

    \b
    Example:
      nkv rm edits.nkv --id cf-17 --subject "Eiffel Tower"
      nkv rm edits.nkv --id paris-capital --model smollm2-135m   # its subject's other edits are rebuilt
    """
    if not ids and not subjects:
        raise click.UsageError("give at least one --id or --subject")
    before: list[str] = []
    rebuilt: list[str] = []

    def remove(adapter: NKVAdapter) -> NKVAdapter:
        before.extend(adapter.ids)
        with warnings.catch_warnings():  # what remove warns about is handled right here
            warnings.simplefilter("ignore")
            kept = adapter.remove(ids=ids, subjects=subjects, missing_ok=missing_ok)
        partners = kept.solved_without_partners()
        if not partners:
            return kept
        if model_name is None:
            raise NKVError(f"{_short(', '.join(partners), 60)} were solved together with a fact being removed: one "
                           "residual carries their edits and the removed one's, so without them built again the "
                           "removed edit would stay. Pass --model (the adapter's base model) to rebuild them, or "
                           "remove them too")
        from nkv.editing.solve import rebuild_facts
        from nkv.loaders.models import load_model

        model, tokenizer = load_model(model_name, revision=adapter.base.revision)
        rebuilt.extend(partners)
        return rebuild_facts(model, tokenizer, kept, partners)

    target = output or file
    # locked, atomic, never through a symlink; a large file keeps (or gets) its sketch projection (spec §4.2)
    kept = rewrite_adapter(file, lambda adapter: remove(adapter).sketched_at_scale(), output=target)
    left = set(kept.ids)  # once, not per id: O(n) at 200k rows
    gone = [i for i in before if i not in left]
    note = f"; rebuilt {len(rebuilt)} solved with them ({_short(', '.join(rebuilt), 60)})" if rebuilt else ""
    click.echo(f"removed {len(gone)} fact{'s' * (len(gone) != 1)} ({_short(', '.join(gone), 60) or 'none'}); "
               f"{kept.n_facts} left in {target}{note}")


@click.command()
@click.argument("a", type=_FILE)
@click.argument("b", type=_FILE)
@click.option("-o", "--output", type=_OUT, required=True, help="Where to write the merged adapter.")
@click.option("--on-conflict", type=click.Choice(["error", "ours", "theirs"]), default="error", show_default=True,
              help="A fact id in both files with different content: fail, keep A's, or take B's.")
@click.option("--gamma", type=float, default=None, callback=gamma_callback,
              help="Threshold of the result, in [0, 1] (required when A and B differ).")
@click.option("--model", "model_name", default=None, metavar="M",
              help="The adapters' base model, to build the facts of a subject both A and B edit together, "
                   "with A's recorded build settings (built apart, the gate may not tell them apart and one "
                   "edit is lost).")
def merge(a: Path, b: Path, output: Path, on_conflict: str, gamma: float | None, model_name: str | None) -> None:
    """Merge adapters A and B (same base model and layer) into OUTPUT: A's facts, then B's.

    \b
    Example:
      nkv merge team1.nkv team2.nkv -o all.nkv --on-conflict theirs
      nkv merge a.nkv b.nkv -o all.nkv --model smollm2-135m   # subjects both edit: solved together
    """
    check_writable_target(output)
    with locked(output):  # `merge A B -o A` rewrites A: one writer at a time
        first, second = NKVAdapter.load(a), NKVAdapter.load(b)
        conflicts = first.diff(second).changed
        shared = first.subjects_built_apart(second, on_conflict, conflicts)  # type: ignore[arg-type]
        merged = first.merge(second, on_conflict=on_conflict, gamma=gamma)  # type: ignore[arg-type]
        if shared and model_name is not None:
            merged = _built_together(merged, shared, model_name)
        merged.sketched_at_scale().save(output)
    note = f"; {len(conflicts)} conflicting id(s) resolved as {on_conflict}" if conflicts else ""
    if model_name is not None:
        note += (f"; rebuilt the facts of {len(shared)} subject(s) both edit" if shared
                 else "; no subject edited by both, nothing rebuilt")
    click.echo(f"merged {first.n_facts} + {second.n_facts} facts -> {merged.n_facts} in {output}{note}")
    if shared and model_name is None:
        click.echo(f"note: {len(shared)} subject(s) are edited by both A and B with facts built apart "
                   f"({_short(', '.join(shared), 60)}); where the gate cannot tell them apart only one edit "
                   "holds. Merge with --model M to build them together.", err=True)


def _built_together(merged: NKVAdapter, subjects: list[str], model_name: str) -> NKVAdapter:
    """`merged` with every fact of `subjects` built again in one build on the base model."""
    from nkv.editing.solve import rebuild_facts
    from nkv.loaders.models import load_model

    model, tokenizer = load_model(model_name, revision=merged.base.revision)
    wanted = set(subjects)
    return rebuild_facts(model, tokenizer, merged, [f.id for f in merged.facts if f.subject in wanted])


@click.command()
@click.argument("a", type=_FILE)
@click.argument("b", type=_FILE)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")
def diff(a: Path, b: Path, as_json: bool) -> None:
    """Show facts added (+), removed (-) and changed (~) from A to B, and settings that
    differ. Exit code 0 whether or not they differ.

    \b
    Example:
      nkv diff old.nkv new.nkv --json
    """
    d = NKVAdapter.load(a).diff(NKVAdapter.load(b))
    if as_json:
        click.echo(json.dumps({
            "a": str(a), "b": str(b), "identical": d.empty, "added": d.added, "removed": d.removed,
            "changed": d.changed, "settings": {k: list(v) for k, v in d.settings.items()},
        }, indent=2, ensure_ascii=False))
        return
    for sign, ids in (("+", d.added), ("-", d.removed), ("~", d.changed)):
        for fact_id in ids:
            click.echo(f"{sign} {fact_id}")
    for key, (mine, theirs) in d.settings.items():
        click.echo(f"{key}: {mine} -> {theirs}")
    if d.empty:
        click.echo("no differences")
    else:
        click.echo(f"{len(d.added)} added, {len(d.removed)} removed, {len(d.changed)} changed, "
                   f"{len(d.settings)} setting(s) differ", err=True)


@click.command()
@click.argument("file", type=_FILE)
@click.option("-o", "--output", type=_OUT, default=None, help="Write here instead of replacing FILE.")
@click.option("--storage", type=click.Choice(["int8", "sign"]), default="int8", show_default=True,
              help="int8: one scale per row (format 1.3); sign: 1-bit keys with a score weight per row and "
                   "int4 residuals (format 2.2, about 1/9 of float16; it can change close decisions of the gate).")
@click.option("--exact", "dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Write float rows in this dtype instead (undo int8 storage).")
def quantize(file: Path, output: Path | None, storage: str, dtype: str | None) -> None:
    """Store FILE's keys and residuals as int8 with one scale per row (format 1.3, about half
    the bytes of float16), or with --storage sign as sign rows (format 2.2, spec §4.4), in
    place, atomically, unless -o. Readers before 1.3 (2.2) refuse the result.

    \b
    Example:
      nkv quantize edits.nkv -o edits-int8.nkv
      nkv quantize edits.nkv -o edits-sign.nkv --storage sign
      nkv quantize edits-int8.nkv -o edits-f16.nkv --exact float16
    """
    from nkv.dtypes import TORCH_DTYPES
    from nkv.quant import max_relative_error
    from nkv.codes import code_errors

    errors: dict[str, float] = {}
    already: list[bool] = []

    def store(adapter: NKVAdapter) -> NKVAdapter:
        if dtype is not None:
            return adapter.to(TORCH_DTYPES[dtype])
        already.append(adapter.storage == storage)
        if storage == "int8":
            errors.update(keys=max_relative_error(adapter.keys), residuals=max_relative_error(adapter.residuals))
        elif not already[0]:
            errors.update(code_errors(adapter.keys, adapter.residuals))
            # the build's self-check measured the float rows; sign rows can edit differently (nkv eval them)
            build = {k: v for k, v in adapter.build.items() if k != "self_check"}
            return replace(adapter, storage=storage, build=build)
        return replace(adapter, storage=storage)

    target = output or file
    before = file.stat().st_size
    stored = rewrite_adapter(file, lambda adapter: store(adapter).sketched_at_scale(), output=target)
    size = f"{_size(before)} -> {_size(target.stat().st_size)}"
    if dtype is not None:
        click.echo(f"wrote {target}: {stored.n_facts} facts, exact {dtype} rows, {size}")
    else:
        if already[0]:
            click.echo(f"wrote {target}: {stored.n_facts} facts; {file} already held {storage} rows, so they are "
                       f"unchanged ({size})")
        elif storage == "sign":
            click.echo(f"wrote {target}: {stored.n_facts} facts, sign rows, {size}; lowest cosine of a stored key "
                       f"with its float key {errors['key_cosine']:.3f} (its score weight restores 1), largest "
                       f"relative row error R1 {errors['residuals']:.2%}")
        else:
            click.echo(f"wrote {target}: {stored.n_facts} facts, int8 rows, {size}; largest relative row error "
                       f"K1 {errors['keys']:.2%}, R1 {errors['residuals']:.2%}")


__all__ = ["inspect", "validate", "rm", "merge", "diff", "quantize"]
