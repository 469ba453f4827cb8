"""The README.md model card `nkv push` publishes next to an adapter.

A pure function of the adapter (no Hub client needed), so it is tested without a server
and users can preview it. The YAML front matter is what the Hub indexes: `library_name`,
`base_model` + `base_model_relation: adapter` (the adapter shows up under its base
model), and tags. Everything else is prose and tables for people.
"""

from __future__ import annotations

import json
import re
from typing import Any

from . import constants as C
from .adapter import NKVAdapter
from .dtypes import row_dtype_name

TAGS = ("nkv", "neuraldb", "knowledge-editing", "model-editing")
SAMPLE_FACTS = 10  # rows of the fact table; the rest are counted, not listed
_CELL_CHARS = 80
_MAX_EVAL_ROWS = 40
# A Hub model id "org/name"; a local path (absolute, relative, 3+ parts) must not land
# in `base_model`, where the Hub would link it to a stranger's repo or reject the card.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def hub_base_model(adapter: NKVAdapter, override: str | None = None) -> str | None:
    """The `base_model` to declare: `override`, else `nkv.base.name` when it is an "org/name" id."""
    name = override if override is not None else adapter.base.name
    if _REPO_ID.match(name) and ".." not in name:
        return name
    return None


def render_model_card(
    adapter: NKVAdapter,
    repo_id: str,
    filename: str = "adapter.nkv",
    base_model: str | None = None,
) -> str:
    """Markdown model card (YAML front matter + body) for `adapter` published as `repo_id`.

    Args:
        adapter: the validated adapter being pushed.
        repo_id: where it is published ("user/name"); used in the loading snippets.
        filename: the adapter's file name in the repo.
        base_model: Hub id of the base model; defaults to `nkv.base.name` when that is an
            "org/name" id (a local path is left out of the metadata).

    >>> card = render_model_card(adapter, "alice/paris-edits")
    >>> card.startswith("---\\nlibrary_name: nkv\\n")
    True
    """
    base_id = hub_base_model(adapter, base_model)
    base_label = base_id or adapter.base.name
    parts = [
        _front_matter(base_id),
        f"# {repo_id.split('/')[-1]}\n",
        _intro(adapter, base_id, base_label),
        _facts_section(adapter),
        _details_section(adapter, filename, base_id),
        _eval_section(adapter.eval),
        _usage_section(repo_id, base_label, filename, hub_id=base_id is not None),
    ]
    return "\n".join(p for p in parts if p)


# ------------------------------------------------------------------------- sections
def _front_matter(base_id: str | None) -> str:
    # Scalars are written as JSON strings: valid YAML for any text, no YAML library needed.
    lines = ["---", "library_name: nkv"]
    if base_id:
        lines += [f"base_model: {json.dumps(base_id)}", "base_model_relation: adapter"]
    lines.append("tags:")
    lines += [f"- {t}" for t in TAGS]
    lines.append("---\n")
    return "\n".join(lines)


def _intro(adapter: NKVAdapter, base_id: str | None, base_label: str) -> str:
    n = adapter.n_facts
    base_ref = f"[`{base_label}`](/{base_id})" if base_id else f"`{_cell(base_label)}`"
    note = "" if base_id else (
        "\n\n(`nkv.base.name` is not a Hub model id, so this card declares no `base_model`; "
        "push with `--base-model org/name` to link it.)")
    return (
        f"An [NKV](https://arxiv.org/abs/2507.18028) knowledge-edit adapter (NeuralDB) for {base_ref}. "
        f"It changes what the model answers for **{n} fact{'s' if n != 1 else ''}**, without changing "
        "its weights: a gated key-value table at one layer adds a stored residual when the hidden "
        "state matches one of the edited facts, and leaves every other input untouched.\n\n"
        "It is not a model on its own: load it on top of the exact base checkpoint it was built on "
        f"(the loaders check the fingerprint below and refuse any other).{note}\n"
    )


def _facts_section(adapter: NKVAdapter) -> str:
    if adapter.n_facts == 0:
        return "## What it changes\n\nNothing yet: the adapter holds no facts.\n"
    rows = ["| subject | prompt | new target | old target |", "|---|---|---|---|"]
    for fact in adapter.facts[:SAMPLE_FACTS]:
        rows.append(f"| {_cell(fact.subject)} | {_cell(fact.prompt)} | {_cell(fact.target_new)} | "
                    f"{_cell(fact.target_true) if fact.target_true else '—'} |")
    shown = min(SAMPLE_FACTS, adapter.n_facts)
    more = adapter.n_facts - shown
    tail = (f"\n\n…and {more} more. List them all with `nkv inspect --facts adapter.nkv`."
            if more else "")
    noun = "fact" if adapter.n_facts == 1 else "facts"
    which = f"the first {shown}" if more else ("it" if shown == 1 else "all of them")
    return f"## What it changes\n\n{adapter.n_facts} {noun}; {which}:\n\n" + "\n".join(rows) + tail + "\n"


def _details_section(adapter: NKVAdapter, filename: str, base_id: str | None) -> str:
    b = adapter.base
    dtype = {"int8": "I8 (int8 rows, one scale per row)",
             "sign": "U8 (sign rows: 1-bit keys with score weights, int4 residuals; needs an nkv that reads format 2.2)",
             }.get(adapter.storage, row_dtype_name(adapter.keys.dtype))
    rows = [
        ("file", f"`{filename}`"),
        ("format", f"NKV {adapter.metadata()[C.K_VERSION]}"),  # the version the file is written as
        ("facts", str(adapter.n_facts)),
        ("base model", f"`{_cell(b.name)}` ({_cell(b.architecture)}, `{_cell(b.model_type)}`)"),
    ]
    if b.revision:
        rows.append(("base revision", f"`{_cell(b.revision)}`"))
    rows += [
        ("base fingerprint", f"`{_cell(b.fingerprint, limit=None)}`"),
        ("layer", f"{adapter.layer} of {b.n_layers} (`{_cell(adapter.target_module)}`"
                  + ("; rows added after the FFN-output norm: needs an nkv that reads format 2.0)"
                     if adapter.residual_site == "out_norm" else ")")),
        ("γ (gate threshold)", f"{adapter.gamma:g}"),
        ("dtype", dtype),
        ("d_key × d_model", f"{b.d_key} × {b.d_model}"),
    ]
    tool = adapter.build.get("tool") if isinstance(adapter.build, dict) else None
    if tool:
        rows.append(("built with", f"`{_cell(str(tool))}`"))
    check = adapter.build.get("self_check") if isinstance(adapter.build, dict) else None
    if isinstance(check, dict) and isinstance(check.get("efficacy"), (int, float)):
        rows.append(("build self-check", f"{check['efficacy']:.1%} of {check.get('n_checked', '?')} edit prompts "
                     "answer the new target with the adapter attached (teacher-forced top-1)"))
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    return f"## Adapter details\n\n{table}\n"


def _eval_section(results: dict[str, Any]) -> str:
    if not results:
        return ""
    flat = list(_flatten(results))
    rows = ["| metric | value |", "|---|---|"]
    rows += [f"| {_cell(k)} | {_cell(_fmt(v))} |" for k, v in flat[:_MAX_EVAL_ROWS]]
    if len(flat) > _MAX_EVAL_ROWS:
        rows.append(f"| … | {len(flat) - _MAX_EVAL_ROWS} more in `nkv.eval` |")
    return ("## Evaluation\n\nResults stored in the adapter (`nkv.eval`), as measured by whoever built it:\n\n"
            + "\n".join(rows) + "\n")


def _usage_section(repo_id: str, base_label: str, filename: str, hub_id: bool = True) -> str:
    base = json.dumps(base_label)
    repo = json.dumps(repo_id)
    if hub_id:
        load = f"from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained({base})"
        served = base
    else:  # a local folder, a .gguf file or a packaged model: NKV's loader reads all three
        load = f"from nkv.loaders.models import load_model\n\nmodel, tokenizer = load_model({base})"
        served = f"model_source({base})"
    vllm_import = "" if hub_id else "from nkv.loaders.gguf import model_source\n"
    return f"""## How to use

```bash
pip install "nkv[hub]"
```

transformers:

```python
from nkv import load_nkv_adapter
{load}
handle = load_nkv_adapter(model, {repo})   # downloads, validates, checks the fingerprint
# ... generate as usual; handle.detach() restores the original model
```

vLLM:

```python
from vllm import LLM
{vllm_import}
llm = LLM(model={served}, additional_config={{"nkv": {{"adapter": {repo}}}}})
```

Command line: `nkv pull {repo_id} -o ./edits` downloads `{filename}`; `nkv inspect ./edits/{filename}` lists its facts.
"""


# ------------------------------------------------------------------------- helpers
def _cell(text: Any, limit: int | None = _CELL_CHARS) -> str:
    """One Markdown table cell: no pipes, newlines or HTML from fact text; bounded length."""
    s = " ".join(str(text).split())
    if limit is not None and len(s) > limit:
        s = s[: limit - 1] + "…"
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _flatten(value: Any, prefix: str = ""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return json.dumps(value)[:_CELL_CHARS]
    return str(value)


__all__ = ["render_model_card", "hub_base_model", "TAGS"]
