"""`evaluate`: every edit applied at once (one attached adapter), measured pre and post.

Protocols (as ROME and MEMIT report them):

* "counterfact": efficacy = share of facts where target_new has a lower mean per-token
  NLL than target_true after the edit prompt; generalization = the same on paraphrases
  (mean over a fact's paraphrases, then over facts, as MEMIT's summary does);
  specificity = neighbourhood prompts where their true answer still has a lower NLL than
  target_new (mean per fact, then over facts).
* "zsre": token-by-token top-1 accuracy of the answer under teacher forcing: target_new
  on the prompt (efficacy) and paraphrases (generalization), the neighbour's answer on
  the neighbour prompt (specificity).

Auto-detection: ZsRE and KnowEdit records (provenance source "zsre" / "knowedit"; KnowEdit
scores token accuracy on every data set) and facts without target_true use "zsre",
everything else "counterfact". KnowEdit's own metric names are reported next to these
(`knowedit.py`). "pre" is the same model with the adapter
disabled (`handle.disabled()`), i.e. the unedited model.

The steps, one module each: measure (run the model, pre and post), aggregate (per-case
results into metrics), weak_spots (where edits are known to go wrong), report.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from typing import Any, Iterator, Sequence

from torch import nn

from nkv import __version__
from nkv.adapter import NKVAdapter
from nkv.constants import DEFAULT_SHORTLIST
from nkv.errors import NKVError
from nkv.facts_io import FactInput
from nkv.loaders.transformers import NKVHandle, attach

from .aggregate import gate_summary, headline, per_fact, unmeasured
from .gatediag import diagnose, unrelated_chunks
from .knowedit import knowedit_metrics
from .measure import cases_of, measure, true_fact_groups, unrelated_text
from .options import PROTOCOLS, EvalOptions
from .report import EvalReport
from .probes import probed_other_facts
from .truefacts import TrueFact, sample_facts
from .weak_spots import by_relation, by_tag, weak_spots


def detect_protocol(facts: Sequence[FactInput]) -> str:
    """"zsre" for ZsRE and KnowEdit records or facts without target_true, else "counterfact"."""
    if any(f.fact.provenance.get("source") in ("zsre", "knowedit") for f in facts):
        return "zsre"
    return "counterfact" if all(f.fact.target_true for f in facts) else "zsre"


def adapter_rows(adapter: NKVAdapter, facts: Sequence[FactInput]) -> list[int | None]:
    """Each fact's row in the adapter: by id when the record matches, else by (subject, prompt, target)."""
    by_id = {f.id: i for i, f in enumerate(adapter.facts)}
    by_content = {(f.subject, f.prompt, f.target_new): i for i, f in enumerate(adapter.facts)}
    rows: list[int | None] = []
    for item in facts:
        f = item.fact
        row = by_id.get(f.id)
        if row is None or (adapter.facts[row].subject, adapter.facts[row].prompt) != (f.subject, f.prompt):
            row = by_content.get((f.subject, f.prompt, f.target_new))
        rows.append(row)
    return rows


def other_targets(adapter: NKVAdapter, facts: Sequence[FactInput], rows: Sequence[int | None]) -> list[str]:
    """Ids of evaluated facts whose adapter row (same id, subject and prompt) was built for
    another target: the data is not what the adapter was built from, and they are scored
    against the data's target."""
    return [item.fact.id for item, row in zip(facts, rows)
            if row is not None and adapter.facts[row].target_new != item.fact.target_new]


def evaluate_adapter(model: nn.Module, tokenizer: Any, handle: Any, facts: Sequence[FactInput], *,
                     unrelated: Sequence[str] | None = None, true_facts: Sequence[TrueFact] | None = None,
                     options: EvalOptions | None = None, data_name: str = "<facts>",
                     unrelated_name: str | None = None) -> EvalReport:
    """Evaluate the adapter attached through `handle` on `facts`, pre-edit and post-edit.

    Args:
        model, tokenizer: the transformers model the handle is attached to.
        handle: `nkv.loaders.transformers.attach(model, adapter)`; all edits are live.
        facts: the facts to evaluate (usually the ones the adapter was built from).
        unrelated: lines of text unrelated to the edits, for false fires; None = text
            sampled from the unedited model after the seed words "The", "Therefore", ...
        true_facts: facts the model knows (`read_true_facts`); facts of subjects not
            edited give unedited-fact accuracy, edited subjects' other facts the
            same-subject weak spot. None = not measured.
        options: `EvalOptions`.
    Returns:
        `EvalReport` (`.table()`, `.to_dict()`, `.summary()`).

    >>> handle = attach(model, adapter)
    >>> report = evaluate_adapter(model, tokenizer, handle, read_facts("edits.jsonl"))
    >>> print(report.table())
    """
    options = options or EvalOptions()
    facts = list(facts)
    protocol = _protocol(facts, options, data_name)
    adapter: NKVAdapter = handle.adapter
    rows = adapter_rows(adapter, facts)
    other = other_targets(adapter, facts, rows)
    cases = cases_of(facts)
    unedited, others = true_fact_groups(facts, true_facts, options)
    was_training = model.training
    model.eval()
    try:
        others_source = "true facts" if others else "not measured"
        if true_facts is None and options.probe_other_facts:
            with handle.disabled():
                others = sample_facts(probed_other_facts(model, tokenizer, facts), options.true_facts_limit,
                                      options.seed)
            others_source = "the unedited model's answers to relation prompts"
        unrelated, unrelated_name = unrelated_text(model, tokenizer, handle, unrelated, unrelated_name, options)
        chunks = unrelated_chunks(tokenizer, unrelated, options.unrelated_tokens)
        pre = None
        if options.measure_pre:
            with handle.disabled():
                pre = measure(model, tokenizer, cases, protocol, unedited, others, options)
        post = measure(model, tokenizer, cases, protocol, unedited, others, options)
        diag = diagnose(model, tokenizer, handle, [(f.fact, r, f.paraphrases) for f, r in zip(facts, rows)],
                        chunks, options.batch_size) if options.gate_diagnostics else None
    finally:
        model.train(was_training)

    pre = pre if pre is not None else unmeasured(post)
    per = {"pre": per_fact(pre, cases), "post": per_fact(post, cases)}
    metrics = headline(pre, post, per, options.fluency_prompts)
    spots = weak_spots(tokenizer, cases, pre, post, per, unedited, diag)
    if "same_subject_other_facts" in spots:  # a headline number (issue 13): what an edit must leave alone
        metrics["other_facts"] = spots["same_subject_other_facts"]
    return EvalReport(
        data={"name": data_name, "n_facts": len(facts), "protocol": protocol, "paraphrases": len(cases.paraphrases),
              "neighbours": len(cases.neighbours), "portability": len(cases.portability)},
        adapter={"n_facts": adapter.n_facts, "layer": adapter.layer, "gamma": adapter.gamma,
                 "matched": sum(r is not None for r in rows), "other_target": len(other),
                 "other_target_ids": other[:5]},
        metrics=metrics, gate=gate_summary(diag),
        knowedit=knowedit_metrics(pre, post, cases, metrics.get("fluency")),
        weak_spots=spots,
        by_relation=by_relation(facts, per), by_tag=by_tag(facts, per),
        settings={**asdict(options), "protocol": protocol, "tool": f"nkv {__version__}",
                  "unrelated_source": unrelated_name or "given lines", "other_facts_source": others_source,
                  "fluency_samples_post": post.get("fluency_samples", [])},
        cosines={} if diag is None else {"positives": diag.positives, "negatives": diag.negatives,
                                         "own": diag.own_cosine},
    )


def _protocol(facts: list[FactInput], options: EvalOptions, data_name: str) -> str:
    """The protocol to use (given or detected), or an error when the data cannot support it."""
    if not facts:
        raise NKVError(f"{data_name}: no facts to evaluate")
    protocol = options.protocol or detect_protocol(facts)
    if protocol == "counterfact" and not all(f.fact.target_true for f in facts):
        missing = next(f.fact.id for f in facts if not f.fact.target_true)
        raise NKVError(f"{data_name}: the counterfact protocol compares target_new with target_true, but fact "
                       f"{missing!r} has no target_true; add it or use the zsre protocol (--protocol zsre)")
    return protocol


@contextlib.contextmanager
def attached(model: nn.Module, adapter: NKVAdapter, strict: bool = True, gate: str = "auto",
             shortlist: int = DEFAULT_SHORTLIST) -> Iterator[NKVHandle]:
    """Attach `adapter` for the duration of the block (detached afterwards, whatever happens).

    gate: "auto" = the loader's choice of path (the sketch path from SKETCH_MIN_FACTS facts
    up), "exact", or "sketch" at any size; `shortlist`: the candidates the sketch path
    rescores exactly (spec §5.1), as `load_nkv_adapter(shortlist=...)` sets it when serving.
    """
    handle = attach(model, adapter, strict=strict, shortlist=shortlist)
    if gate != "auto":
        handle.module.use_sketch(adapter, shortlist if gate == "sketch" else 0)
    try:
        yield handle
    finally:
        handle.detach()


def evaluate(model: nn.Module, tokenizer: Any, adapter: NKVAdapter, facts: Sequence[FactInput], *,
             gate: str = "auto", shortlist: int = DEFAULT_SHORTLIST, **kwargs: Any) -> EvalReport:
    """Attach `adapter` (gate path and shortlist as `attached`), `evaluate_adapter`, detach.
    Other keyword arguments as `evaluate_adapter`."""
    with attached(model, adapter, gate=gate, shortlist=shortlist) as handle:
        report = evaluate_adapter(model, tokenizer, handle, facts, **kwargs)
        chosen = handle.module.resident().shortlist
        report.settings["gate_path"] = f"sketch (shortlist {chosen})" if chosen else "exact"
        return report


__all__ = ["EvalOptions", "evaluate", "evaluate_adapter", "detect_protocol", "adapter_rows", "attached", "PROTOCOLS"]
