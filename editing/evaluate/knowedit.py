"""KnowEdit's metrics (EasyEdit), computed from the same teacher-forced scores as ours.

The KnowEdit paper's table (Zhang et al. 2024, "A Comprehensive Study of Knowledge
Editing for Large Language Models") reports Edit Succ., Portability, Locality and
Fluency. EasyEdit computes them as follows, and so do we:

* Edit Succ.: teacher-forced token accuracy of target_new after the edit prompt: the
  share of the answer's tokens that are the argmax given the true prefix
  (`test_prediction_acc`). Per fact, then the mean over facts.
* Portability: the same token accuracy on each portability question with its answer
  (reasoning / multi-hop, subject aliases, logical generalization); a fact's questions
  are pooled across kinds and averaged, then facts are averaged (EasyEdit's summary).
  Facts without portability questions are not counted.
* Locality: for each locality prompt, the answer is teacher-forced through the model
  before and after the edit; locality is the share of answer positions whose argmax
  token is the same both times (EasyEdit compares the pre and post argmax tokens, not the
  answer). Pooled per fact, then averaged. Needs the pre-edit pass.
* Fluency: generated text, n-gram entropy; the same number as our fluency row.

Every number here except fluency is teacher-forced; none is generated text.
"""

from __future__ import annotations

from typing import Any

from .aggregate import metric, per_fact_mean, select
from .measure import Cases


def knowedit_metrics(pre: dict[str, Any], post: dict[str, Any], cases: Cases,
                     fluency: dict[str, Any] | None) -> dict[str, Any]:
    """{"edit_succ", "portability", "portability_by_kind", "locality", "fluency"} as report rows."""
    n = len(cases.facts)
    owners = [i for i, _, _, _ in cases.portability]
    out: dict[str, Any] = {
        "edit_succ": metric(pre["edit_token_acc"], post["edit_token_acc"]),
        "portability": metric(_per_fact(pre["portability"], owners, n), per_fact_mean(post["portability"], owners, n)),
        "portability_by_kind": {},
        "locality": {"pre": None, "post": None, "n": 0},
    }
    for kind in dict.fromkeys(k for _, k, _, _ in cases.portability):
        keep = [k == kind for _, k, _, _ in cases.portability]
        kind_owners = select(owners, keep)
        out["portability_by_kind"][kind] = metric(
            _per_fact(select(pre["portability"], keep), kind_owners, n),
            per_fact_mean(select(post["portability"], keep), kind_owners, n))
    if pre["neighbour_predicted"] is not None and None not in pre["neighbour_predicted"]:
        unchanged = [_same_share(a, b) for a, b in zip(pre["neighbour_predicted"], post["neighbour_predicted"])]
        out["locality"] = metric(None, per_fact_mean(unchanged, [i for i, _, _ in cases.neighbours], n))
    if fluency is not None:
        out["fluency"] = dict(fluency)
    return out


def _per_fact(values: list[float | None] | None, owners: list[int], n: int) -> list[float | None] | None:
    """Per-fact means of a pre-edit list, or None when the pre-edit pass did not run."""
    if values is None or any(v is None for v in values):
        return None
    return per_fact_mean(values, owners, n)


def _same_share(before: list[int], after: list[int]) -> float | None:
    """Share of positions with the same argmax token before and after (None for an empty answer)."""
    if not before:
        return None
    return sum(a == b for a, b in zip(before, after)) / len(before)


__all__ = ["knowedit_metrics"]
