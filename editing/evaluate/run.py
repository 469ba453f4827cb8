"""`evaluate`: every edit applied at once (one attached adapter), measured pre and post.

Protocols (method.md §6):

* "counterfact": efficacy = share of facts where target_new has a lower mean per-token
  NLL than target_true after the edit prompt; generalization = the same on paraphrases
  (mean over a fact's paraphrases, then over facts, as MEMIT's summary does);
  specificity = neighbourhood prompts where their true answer still has a lower NLL than
  target_new (mean per fact, then over facts).
* "zsre": token-by-token top-1 accuracy of the answer under teacher forcing: target_new
  on the prompt (efficacy) and paraphrases (generalization), the neighbour's answer on
  the neighbour prompt (specificity).

Auto-detection: ZsRE records (provenance source "zsre") and facts without target_true
use "zsre", everything else "counterfact". "pre" is the same model with the adapter
disabled (`handle.disabled()`), i.e. the unedited model.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from torch import nn

from nkv import __version__
from nkv.adapter import NKVAdapter
from nkv.errors import NKVError
from nkv.facts import Fact
from nkv.facts_io import FactInput
from nkv.loaders.transformers import attach

from .fluency import fluency
from ..generation import SEED_WORDS, free_generation_exact, sample_texts, seed_prompts
from ..scoring import DEFAULT_BATCH, score_pairs
from ..tokens import subject_position
from .gatediag import diagnose, unrelated_chunks
from .report import EvalReport, pct
from .truefacts import TrueFact, sample_facts

PROTOCOLS = ("counterfact", "zsre")
SHARED_TAG = "shared_last_token"


@dataclass(frozen=True)
class EvalOptions:
    """Knobs of `evaluate`; defaults keep a 1,000-fact run on a small model to minutes on CPU.

    protocol: "counterfact" | "zsre" | None (auto, see the module doc).
    fluency_prompts / fluency_tokens: edit prompts sampled from (top-k 5) and tokens generated.
    true_facts_limit: true facts sampled per group (unedited subjects; edited subjects' others).
    unrelated_tokens: tokens of unrelated text scored for false fires.
    generated_texts / generated_tokens: unrelated text made by the unedited model when none is given.
    free_generation: also run greedy exact match (off saves time on big sets).
    gate_diagnostics: measure where the gate fires (needs an NKV handle; off for other editors).
    measure_pre: also measure the unedited model (off when another run already did, e.g. benchmarks).
    """

    batch_size: int = DEFAULT_BATCH
    protocol: str | None = None
    fluency_prompts: int = 16
    fluency_tokens: int = 48
    true_facts_limit: int = 500
    unrelated_tokens: int = 20_000
    generated_texts: int = 40
    generated_tokens: int = 48
    free_generation: bool = True
    gate_diagnostics: bool = True
    measure_pre: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise NKVError(f"protocol must be one of {list(PROTOCOLS)} or None (auto), got {self.protocol!r}")
        if self.batch_size < 1:
            raise NKVError(f"batch_size must be >= 1, got {self.batch_size}")


def detect_protocol(facts: Sequence[FactInput]) -> str:
    """"zsre" for ZsRE records or facts without target_true, else "counterfact"."""
    if any(f.fact.provenance.get("source") == "zsre" for f in facts):
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


@dataclass
class _Cases:
    """Every prompt the evaluation scores, flattened, with back-references to facts."""

    facts: list[FactInput]
    paraphrases: list[tuple[int, str]]  # (fact index, prompt)
    neighbours: list[tuple[int, str, str]]  # (fact index, prompt, expected answer)


def _cases(facts: Sequence[FactInput]) -> _Cases:
    paras = [(i, p) for i, f in enumerate(facts) for p in f.paraphrases]
    nbs = [(i, p, t) for i, f in enumerate(facts) for p, t in f.neighborhood if t != f.fact.target_new]
    return _Cases(list(facts), paras, nbs)


def _measure(model: nn.Module, tokenizer: Any, cases: _Cases, protocol: str, unedited: list[TrueFact],
             others: list[TrueFact], options: EvalOptions) -> dict[str, Any]:
    """One state's raw results (per case), used for both pre and post."""
    bs = options.batch_size
    facts = [f.fact for f in cases.facts]
    edit_new = [(f.prompt, f.target_new) for f in facts]
    para_new = [(p, facts[i].target_new) for i, p in cases.paraphrases]
    nb_true = [(p, t) for _, p, t in cases.neighbours]
    nb_new = [(p, facts[i].target_new) for i, p, _ in cases.neighbours]
    out: dict[str, Any] = {}
    if protocol == "counterfact":
        edit_true = [(f.prompt, f.target_true or "") for f in facts]
        para_true = [(p, facts[i].target_true or "") for i, p in cases.paraphrases]
        s = score_pairs(model, tokenizer, edit_new + edit_true + para_new + para_true + nb_true + nb_new, bs)
        n_e, n_p, n_n = len(edit_new), len(para_new), len(nb_true)
        e_new, e_true = s[:n_e], s[n_e : 2 * n_e]
        p_new, p_true = s[2 * n_e : 2 * n_e + n_p], s[2 * n_e + n_p : 2 * n_e + 2 * n_p]
        n_true, n_new = s[2 * n_e + 2 * n_p : 2 * n_e + 2 * n_p + n_n], s[2 * n_e + 2 * n_p + n_n :]
        out["efficacy"] = [float(a.nll < b.nll) for a, b in zip(e_new, e_true)]
        out["generalization"] = [float(a.nll < b.nll) for a, b in zip(p_new, p_true)]
        out["specificity"] = [float(a.nll < b.nll) for a, b in zip(n_true, n_new)]
    else:
        s = score_pairs(model, tokenizer, edit_new + para_new + nb_true, bs)
        n_e, n_p = len(edit_new), len(para_new)
        out["efficacy"] = [x.token_accuracy for x in s[:n_e]]
        out["generalization"] = [x.token_accuracy for x in s[n_e : n_e + n_p]]
        out["specificity"] = [x.token_accuracy for x in s[n_e + n_p :]]
    if options.free_generation:
        hits = free_generation_exact(model, tokenizer, edit_new + para_new, bs)
        out["free_gen_prompt"] = [float(h) for h in hits[: len(edit_new)]]
        out["free_gen_paraphrase"] = [float(h) for h in hits[len(edit_new) :]]
    if options.fluency_prompts and options.fluency_tokens:
        prompts = [f.prompt for f in facts[: options.fluency_prompts]]
        texts = sample_texts(model, tokenizer, prompts, options.fluency_tokens, seed=options.seed, batch_size=bs)
        out["fluency"] = fluency(texts)
        out["fluency_samples"] = texts[:3]
    truth = score_pairs(model, tokenizer, [(t.prompt, t.target) for t in unedited + others], bs)
    out["unedited"] = [float(x.exact) for x in truth[: len(unedited)]]
    out["others"] = [float(x.exact) for x in truth[len(unedited) :]]
    return out


def _per_fact_mean(values: list[float | None], owners: list[int], n_facts: int) -> list[float | None]:
    sums, counts = [0.0] * n_facts, [0] * n_facts
    for v, i in zip(values, owners):
        if v is None:
            continue
        sums[i] += v
        counts[i] += 1
    return [s / c if c else None for s, c in zip(sums, counts)]


def _mean(values: Sequence[float | None]) -> tuple[float | None, int]:
    kept = [v for v in values if v is not None]
    return (sum(kept) / len(kept), len(kept)) if kept else (None, 0)


def _metric(pre: Sequence[float | None] | None, post: Sequence[float | None], scale=pct) -> dict[str, Any]:
    post_v, n = _mean(post)
    pre_v = _mean(pre)[0] if pre is not None else None
    return {"pre": scale(pre_v), "post": scale(post_v), "n": n}


def _select(values: Sequence[float | None], keep: Sequence[bool]) -> list[float | None]:
    return [v for v, k in zip(values, keep) if k]


def _last_token(tokenizer: Any, prompt: str, subject: str) -> int | None:
    fact = Fact(id="-", subject=subject, prompt=prompt, target_new="-")
    pos = subject_position(tokenizer, prompt, fact)
    return None if pos is None else list(tokenizer(prompt)["input_ids"])[pos]


def _edited_relations(item: FactInput) -> set[str]:
    rels = {t.split(":", 1)[1] for t in item.tags if t.startswith("relation:")}
    rel = item.fact.provenance.get("relation_id")
    return rels | ({rel} if isinstance(rel, str) else set())


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
    if not facts:
        raise NKVError(f"{data_name}: no facts to evaluate")
    protocol = options.protocol or detect_protocol(facts)
    if protocol == "counterfact" and not all(f.fact.target_true for f in facts):
        missing = next(f.fact.id for f in facts if not f.fact.target_true)
        raise NKVError(f"{data_name}: the counterfact protocol compares target_new with target_true, but fact "
                       f"{missing!r} has no target_true; add it or use the zsre protocol (--protocol zsre)")
    adapter: NKVAdapter = handle.adapter
    rows = adapter_rows(adapter, facts)
    cases = _cases(facts)
    was_training = model.training
    model.eval()

    # True facts: subjects never edited vs the edited subjects' other facts.
    edited = {f.fact.subject for f in facts}
    last_tokens = {t for t in (_last_token(tokenizer, f.fact.prompt, f.fact.subject) for f in facts) if t is not None}
    unedited, others = [], []
    if true_facts:
        unedited = sample_facts([t for t in true_facts if t.subject not in edited], options.true_facts_limit,
                                options.seed)
        taken: dict[str, tuple[set[str], set[str]]] = {}
        for f in facts:
            rels, prompts = taken.setdefault(f.fact.subject, (set(), set()))
            rels |= _edited_relations(f)
            prompts |= {f.fact.prompt, *f.paraphrases}
        others = sample_facts([t for t in true_facts if t.subject in edited
                               and t.relation not in taken[t.subject][0] and t.prompt not in taken[t.subject][1]],
                              options.true_facts_limit, options.seed)

    if not options.gate_diagnostics:
        unrelated, unrelated_name = [], "not measured"
    elif unrelated is None:
        with handle.disabled():
            prompts = seed_prompts(options.generated_texts)
            unrelated = sample_texts(model, tokenizer, prompts, options.generated_tokens, seed=options.seed + 1,
                                     batch_size=options.batch_size)
        unrelated_name = unrelated_name or (f"{options.generated_texts} texts sampled from the unedited model "
                                            f"after {', '.join(SEED_WORDS)}")
    chunks = unrelated_chunks(tokenizer, unrelated, options.unrelated_tokens)

    try:
        pre = None
        if options.measure_pre:
            with handle.disabled():
                pre = _measure(model, tokenizer, cases, protocol, unedited, others, options)
        post = _measure(model, tokenizer, cases, protocol, unedited, others, options)
        diag = diagnose(model, tokenizer, handle, [(f.fact, r, f.paraphrases) for f, r in zip(facts, rows)],
                        chunks, options.batch_size) if options.gate_diagnostics else None
    finally:
        model.train(was_training)

    n = len(facts)
    para_owner = [i for i, _ in cases.paraphrases]
    nb_owner = [i for i, _, _ in cases.neighbours]
    if pre is None:  # not measured: every pre value reads None
        pre = {k: ([None] * len(v) if isinstance(v, list) else None) for k, v in post.items()}
    per = {state: {"efficacy": r["efficacy"],
                   "generalization": _per_fact_mean(r["generalization"], para_owner, n),
                   "specificity": _per_fact_mean(r["specificity"], nb_owner, n)}
           for state, r in (("pre", pre), ("post", post))}
    metrics = {k: _metric(per["pre"][k], per["post"][k]) for k in ("efficacy", "generalization", "specificity")}
    if options.free_generation:
        metrics["free_gen_prompt"] = _metric(pre["free_gen_prompt"], post["free_gen_prompt"])
        metrics["free_gen_paraphrase"] = _metric(pre["free_gen_paraphrase"], post["free_gen_paraphrase"])
    if "fluency" in post:
        metrics["fluency"] = {"pre": None if pre["fluency"] is None else round(100 * pre["fluency"], 2),
                              "post": round(100 * post["fluency"], 2),
                              "n": min(options.fluency_prompts, n)}
    if unedited:
        metrics["unedited_facts"] = _metric(pre["unedited"], post["unedited"])

    # Weak spots.
    spots: dict[str, dict[str, Any]] = {}
    tagged = [SHARED_TAG in f.tags for f in facts]
    if any(tagged):
        spots["specificity_tagged_shared"] = _metric(_select(per["pre"]["specificity"], tagged),
                                                     _select(per["post"]["specificity"], tagged))
    nb_shared = [bool(last_tokens & set(tokenizer(p)["input_ids"])) for _, p, _ in cases.neighbours]
    if any(nb_shared):
        spots["specificity_nb_shares_last_token"] = _metric(_select(pre["specificity"], nb_shared),
                                                            _select(post["specificity"], nb_shared))
        rest = [not s for s in nb_shared]
        spots["specificity_nb_other"] = _metric(_select(pre["specificity"], rest), _select(post["specificity"], rest))
    if unedited:
        shares = [_last_token(tokenizer, t.prompt, t.subject) in last_tokens for t in unedited]
        if any(shares):
            spots["unedited_shares_last_token"] = _metric(_select(pre["unedited"], shares),
                                                          _select(post["unedited"], shares))
            rest = [not s for s in shares]
            spots["unedited_other"] = _metric(_select(pre["unedited"], rest), _select(post["unedited"], rest))
    if others:
        spots["same_subject_other_facts"] = _metric(pre["others"], post["others"])
    count: dict[str, int] = {}
    for f in facts:
        count[f.fact.subject] = count.get(f.fact.subject, 0) + 1
    multi = [count[f.fact.subject] > 1 for f in facts]
    if any(multi):
        for key in ("efficacy", "generalization"):
            spots[f"multi_fact_{key}"] = _metric(_select(per["pre"][key], multi), _select(per["post"][key], multi))
        if diag is not None:
            spots["multi_fact_gate_right"] = _metric(None, _select([float(x) for x in diag.edit_right_flags], multi))

    by_relation: dict[str, dict[str, Any]] = {}
    relations = [sorted(_edited_relations(f)) for f in facts]
    for rel in sorted({r for rs in relations for r in rs}):
        keep = [rel in rs for rs in relations]
        by_relation[rel] = {k: _metric(_select(per["pre"][k], keep), _select(per["post"][k], keep))
                            for k in ("efficacy", "generalization", "specificity")}

    gate: dict[str, Any] = {}
    if diag is not None:
        gate = diag.to_dict()
        for key in ("edit_right", "paraphrase_right", "edit_other_fires"):
            gate[key] = pct(gate[key])
        for key in ("false_fire", "false_fire_shared"):  # finer than pct: targets are ~0.1%
            gate[key] = None if math.isnan(gate[key]) else round(100 * gate[key], 4)
    report = EvalReport(
        data={"name": data_name, "n_facts": n, "protocol": protocol, "paraphrases": len(cases.paraphrases),
              "neighbours": len(cases.neighbours)},
        adapter={"n_facts": adapter.n_facts, "layer": adapter.layer, "gamma": adapter.gamma,
                 "matched": sum(r is not None for r in rows)},
        metrics=metrics, gate=gate, weak_spots=spots, by_relation=by_relation,
        settings={**asdict(options), "protocol": protocol, "tool": f"nkv {__version__}",
                  "unrelated_source": unrelated_name or "given lines",
                  "fluency_samples_post": post.get("fluency_samples", [])},
        cosines={} if diag is None else {"positives": diag.positives, "negatives": diag.negatives,
                                         "own": diag.own_cosine},
    )
    return report


@contextlib.contextmanager
def attached(model: nn.Module, adapter: NKVAdapter, strict: bool = True):
    """Attach `adapter` for the duration of the block (detached afterwards, whatever happens)."""
    handle = attach(model, adapter, strict=strict)
    try:
        yield handle
    finally:
        handle.detach()


def evaluate(model: nn.Module, tokenizer: Any, adapter: NKVAdapter, facts: Sequence[FactInput], **kwargs: Any
             ) -> EvalReport:
    """Attach `adapter`, `evaluate_adapter`, detach. Keyword arguments as `evaluate_adapter`."""
    with attached(model, adapter) as handle:
        return evaluate_adapter(model, tokenizer, handle, facts, **kwargs)


__all__ = ["EvalOptions", "evaluate", "evaluate_adapter", "detect_protocol", "adapter_rows", "attached", "PROTOCOLS"]
