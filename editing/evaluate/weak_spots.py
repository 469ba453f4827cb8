"""Where edits are known to go wrong, measured separately from the averages.

All of it is read off the data and the tokenizer, nothing about a particular data set:

* shared last tokens: a neighbour prompt, or an unedited subject, that holds an edited
  subject's last token (where keys are read) can fire that fact's row;
* the edited subjects' other (unedited) facts: the key is read before the relation;
* subjects with two or more edited facts: one argmax picks one row per token;
* breakdowns by relation and by tag, for data that labels its facts (`relations_of`).
"""

from __future__ import annotations

from typing import Any, Sequence

from nkv.facts import Fact
from nkv.facts_io import FactInput

from ..tokens import subject_position, token_ids
from .aggregate import HEADLINE, metric, select
from .gatediag import GateDiagnostics
from .measure import RELATION_TAG, Cases, relations_of
from .truefacts import TrueFact


def last_token(tokenizer: Any, prompt: str, subject: str) -> int | None:
    """The token id of `subject`'s last token in `prompt` (where a key is read), or None."""
    fact = Fact(id="-", subject=subject, prompt=prompt, target_new="-")
    pos = subject_position(tokenizer, prompt, fact)
    return None if pos is None else token_ids(tokenizer, prompt)[pos]


def weak_spots(tokenizer: Any, cases: Cases, pre: dict[str, Any], post: dict[str, Any],
               per: dict[str, dict[str, list]], unedited: Sequence[TrueFact],
               diag: GateDiagnostics | None) -> dict[str, dict[str, Any]]:
    """The report's weak-spot rows (only those the data has cases for)."""
    facts = cases.facts
    edited_last = {t for t in (last_token(tokenizer, f.fact.prompt, f.fact.subject) for f in facts) if t is not None}
    spots: dict[str, dict[str, Any]] = {}
    nb_shared = [bool(edited_last & set(token_ids(tokenizer, p))) for _, p, _ in cases.neighbours]
    if any(nb_shared):
        rest = [not s for s in nb_shared]
        spots["specificity_nb_shares_last_token"] = metric(select(pre["specificity"], nb_shared),
                                                           select(post["specificity"], nb_shared))
        spots["specificity_nb_other"] = metric(select(pre["specificity"], rest), select(post["specificity"], rest))
    if unedited:
        shares = [last_token(tokenizer, t.prompt, t.subject) in edited_last for t in unedited]
        if any(shares):
            rest = [not s for s in shares]
            spots["unedited_shares_last_token"] = metric(select(pre["unedited"], shares),
                                                         select(post["unedited"], shares))
            spots["unedited_other"] = metric(select(pre["unedited"], rest), select(post["unedited"], rest))
    if post["others"]:
        spots["same_subject_other_facts"] = metric(pre["others"], post["others"])
    count: dict[str, int] = {}
    for f in facts:
        count[f.fact.subject] = count.get(f.fact.subject, 0) + 1
    multi = [count[f.fact.subject] > 1 for f in facts]
    if any(multi):
        for key in ("efficacy", "generalization"):
            spots[f"multi_fact_{key}"] = metric(select(per["pre"][key], multi), select(per["post"][key], multi))
        if diag is not None:
            spots["multi_fact_gate_right"] = metric(None, select([float(x) for x in diag.edit_right_flags], multi))
    return spots


def breakdown(labels: list[set[str]], per: dict[str, dict[str, list]]) -> dict[str, dict[str, Any]]:
    """E/G/S per label, over the facts that carry it (`labels[i]` are fact i's)."""
    out: dict[str, dict[str, Any]] = {}
    for label in sorted({x for xs in labels for x in xs}):
        keep = [label in xs for xs in labels]
        out[label] = {k: metric(select(per["pre"][k], keep), select(per["post"][k], keep)) for k in HEADLINE}
    return out


def by_relation(facts: Sequence[FactInput], per: dict[str, dict[str, list]]) -> dict[str, dict[str, Any]]:
    """E/G/S per relation (`relations_of`)."""
    return breakdown([relations_of(f) for f in facts], per)


def by_tag(facts: Sequence[FactInput], per: dict[str, dict[str, list]]) -> dict[str, dict[str, Any]]:
    """E/G/S per tag of the facts (relation tags are reported by relation instead)."""
    return breakdown([{t for t in f.tags if not t.startswith(RELATION_TAG)} for f in facts], per)




__all__ = ["weak_spots", "by_relation", "by_tag", "breakdown", "last_token"]
