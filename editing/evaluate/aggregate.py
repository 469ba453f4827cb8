"""Per-case results into the report's numbers: per-fact means, pre/post metrics, gate shares.

Generalization and specificity are averaged per fact first (a fact's paraphrases, its
neighbours), then over facts, as MEMIT's summary does; shares become percentages.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from .gatediag import GateDiagnostics
from .measure import Cases
from .report import pct

HEADLINE = ("efficacy", "generalization", "specificity")


def per_fact_mean(values: list[float | None], owners: list[int], n_facts: int) -> list[float | None]:
    """Mean of `values` per owning fact (None where a fact owns none)."""
    sums, counts = [0.0] * n_facts, [0] * n_facts
    for v, i in zip(values, owners):
        if v is None:
            continue
        sums[i] += v
        counts[i] += 1
    return [s / c if c else None for s, c in zip(sums, counts)]


def mean(values: Sequence[float | None]) -> tuple[float | None, int]:
    """(mean of the values that are not None, how many there were); (None, 0) for none."""
    kept = [v for v in values if v is not None]
    return (sum(kept) / len(kept), len(kept)) if kept else (None, 0)


def metric(pre: Sequence[float | None] | None, post: Sequence[float | None], scale=pct) -> dict[str, Any]:
    """One report row: {"pre", "post", "n"} (pre None when not measured)."""
    post_v, n = mean(post)
    pre_v = mean(pre)[0] if pre is not None else None
    return {"pre": scale(pre_v), "post": scale(post_v), "n": n}


def select(values: Sequence[float | None], keep: Sequence[bool]) -> list[float | None]:
    return [v for v, k in zip(values, keep) if k]


def unmeasured(post: dict[str, Any]) -> dict[str, Any]:
    """A "pre" that reads None everywhere, shaped like `post` (when pre was not measured)."""
    return {k: ([None] * len(v) if isinstance(v, list) else None) for k, v in post.items()}


def per_fact(state: dict[str, Any], cases: Cases) -> dict[str, list[float | None]]:
    """Efficacy, generalization and specificity of one state, one value per fact."""
    n = len(cases.facts)
    return {"efficacy": state["efficacy"],
            "generalization": per_fact_mean(state["generalization"], [i for i, _ in cases.paraphrases], n),
            "specificity": per_fact_mean(state["specificity"], [i for i, _, _ in cases.neighbours], n)}


def headline(pre: dict[str, Any], post: dict[str, Any], per: dict[str, dict[str, list]],
             fluency_prompts: int) -> dict[str, dict[str, Any]]:
    """The report's metrics table: E/G/S, free generation, fluency, unedited facts."""
    metrics = {k: metric(per["pre"][k], per["post"][k]) for k in HEADLINE}
    if "free_gen_prompt" in post:
        metrics["free_gen_prompt"] = metric(pre["free_gen_prompt"], post["free_gen_prompt"])
        metrics["free_gen_paraphrase"] = metric(pre["free_gen_paraphrase"], post["free_gen_paraphrase"])
    if "fluency" in post:
        metrics["fluency"] = {"pre": None if pre["fluency"] is None else round(100 * pre["fluency"], 2),
                              "post": round(100 * post["fluency"], 2),
                              "n": min(fluency_prompts, len(per["post"]["efficacy"]))}
    if post["unedited"]:
        metrics["unedited_facts"] = metric(pre["unedited"], post["unedited"])
    return metrics


def gate_summary(diag: GateDiagnostics | None) -> dict[str, Any]:
    """The gate diagnostics as report values (percentages; false fires to 4 decimals)."""
    if diag is None:
        return {}
    gate = diag.to_dict()
    for key in ("edit_right", "paraphrase_right", "edit_other_fires"):
        gate[key] = pct(gate[key])
    for key in ("false_fire", "false_fire_shared"):  # finer than pct: targets are ~0.1%
        gate[key] = None if math.isnan(gate[key]) else round(100 * gate[key], 4)
    return gate


__all__ = ["per_fact_mean", "mean", "metric", "select", "unmeasured", "per_fact", "headline", "gate_summary",
           "HEADLINE"]
