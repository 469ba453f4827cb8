"""What `evaluate` runs the model on, and one pass of it (used for pre and post).

The cases are every prompt scored, flattened, with back-references to their facts; the
true facts split into subjects never edited and the edited subjects' other facts; the
unrelated text is given, or sampled from the unedited model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn

from nkv.facts_io import FactInput

from ..generation import SEED_WORDS, free_generation_exact, sample_texts, seed_prompts
from ..scoring import score_pairs
from .fluency import fluency
from .options import EvalOptions
from .truefacts import TrueFact, sample_facts

# Our facts schema names a fact's relation with a tag "relation:NAME" (CounterFact
# records carry it as provenance "relation_id"); see `relations_of`.
RELATION_TAG = "relation:"


@dataclass
class Cases:
    """Every prompt the evaluation scores, flattened, with back-references to facts."""

    facts: list[FactInput]
    paraphrases: list[tuple[int, str]]  # (fact index, prompt)
    neighbours: list[tuple[int, str, str]]  # (fact index, prompt, expected answer)
    portability: list[tuple[int, str, str, str]] = field(default_factory=list)  # (fact index, kind, prompt, answer)


def cases_of(facts: Sequence[FactInput]) -> Cases:
    """The cases of `facts`; neighbours whose answer is the new target are left out."""
    paras = [(i, p) for i, f in enumerate(facts) for p in f.paraphrases]
    nbs = [(i, p, t) for i, f in enumerate(facts) for p, t in f.neighborhood if t != f.fact.target_new]
    port = [(i, k, p, a) for i, f in enumerate(facts) for k, p, a in f.portability]
    return Cases(list(facts), paras, nbs, port)


def relations_of(item: FactInput) -> set[str]:
    """The relations a fact edits: its "relation:NAME" tags and CounterFact's relation_id."""
    rels = {t.split(":", 1)[1] for t in item.tags if t.startswith(RELATION_TAG)}
    rel = item.fact.provenance.get("relation_id")
    return rels | ({rel} if isinstance(rel, str) else set())


def true_fact_groups(facts: Sequence[FactInput], true_facts: Sequence[TrueFact] | None,
                     options: EvalOptions) -> tuple[list[TrueFact], list[TrueFact]]:
    """(facts of subjects never edited, the edited subjects' other facts), each sampled.

    An edited subject's true fact is "other" unless its relation is one the edits change
    or its prompt is one of the edit's prompts or paraphrases.
    """
    if not true_facts:
        return [], []
    edited = {f.fact.subject for f in facts}
    unedited = sample_facts([t for t in true_facts if t.subject not in edited], options.true_facts_limit,
                            options.seed)
    taken: dict[str, tuple[set[str], set[str]]] = {}
    for f in facts:
        rels, prompts = taken.setdefault(f.fact.subject, (set(), set()))
        rels |= relations_of(f)
        prompts |= {f.fact.prompt, *f.paraphrases}
    others = sample_facts([t for t in true_facts if t.subject in edited
                           and t.relation not in taken[t.subject][0] and t.prompt not in taken[t.subject][1]],
                          options.true_facts_limit, options.seed)
    return unedited, others


def unrelated_text(model: nn.Module, tokenizer: Any, handle: Any, unrelated: Sequence[str] | None,
                   name: str | None, options: EvalOptions) -> tuple[list[str], str | None]:
    """(lines of text unrelated to the edits, where they came from) for the false-fire count."""
    if not options.gate_diagnostics:
        return [], "not measured"
    if unrelated is not None:
        return list(unrelated), name
    with handle.disabled():
        texts = sample_texts(model, tokenizer, seed_prompts(options.generated_texts), options.generated_tokens,
                             seed=options.seed + 1, batch_size=options.batch_size)
    return texts, name or (f"{options.generated_texts} texts sampled from the unedited model "
                           f"after {', '.join(SEED_WORDS)}")


def measure(model: nn.Module, tokenizer: Any, cases: Cases, protocol: str, unedited: list[TrueFact],
             others: list[TrueFact], options: EvalOptions) -> dict[str, Any]:
    """One state's raw results (per case), used for both pre and post."""
    bs = options.batch_size
    facts = [f.fact for f in cases.facts]
    edit_new = [(f.prompt, f.target_new) for f in facts]
    para_new = [(p, facts[i].target_new) for i, p in cases.paraphrases]
    nb_true = [(p, t) for _, p, t in cases.neighbours]
    nb_new = [(p, facts[i].target_new) for i, p, _ in cases.neighbours]
    port = [(p, a) for _, _, p, a in cases.portability]
    out: dict[str, Any] = {}
    if protocol == "counterfact":
        edit_true = [(f.prompt, f.target_true or "") for f in facts]
        para_true = [(p, facts[i].target_true or "") for i, p in cases.paraphrases]
        e_new, e_true, p_new, p_true, n_true, n_new, s_port = _split(
            score_pairs(model, tokenizer, edit_new + edit_true + para_new + para_true + nb_true + nb_new + port, bs),
            edit_new, edit_true, para_new, para_true, nb_true, nb_new, port)
        out["efficacy"] = [float(a.nll < b.nll) for a, b in zip(e_new, e_true)]
        out["generalization"] = [float(a.nll < b.nll) for a, b in zip(p_new, p_true)]
        out["specificity"] = [float(a.nll < b.nll) for a, b in zip(n_true, n_new)]
    else:
        e_new, p_new, n_true, s_port = _split(score_pairs(model, tokenizer, edit_new + para_new + nb_true + port, bs),
                                              edit_new, para_new, nb_true, port)
        out["efficacy"] = [x.token_accuracy for x in e_new]
        out["generalization"] = [x.token_accuracy for x in p_new]
        out["specificity"] = [x.token_accuracy for x in n_true]
    # KnowEdit's measures (see knowedit.py) come from the same teacher-forced scores.
    out["edit_token_acc"] = [x.token_accuracy for x in e_new]
    out["portability"] = [x.token_accuracy for x in s_port]
    out["neighbour_predicted"] = [x.predicted_ids for x in n_true]
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


def _split(scored: list, *parts: list) -> list[list]:
    """Cut one list of results back into the lists of pairs it was scored from, in order."""
    out, start = [], 0
    for part in parts:
        out.append(scored[start : start + len(part)])
        start += len(part)
    return out


__all__ = ["Cases", "cases_of", "relations_of", "true_fact_groups", "unrelated_text", "measure",
           "RELATION_TAG"]
