"""The build's self-check: does the adapter just built answer its own edit prompts?

A build can finish without error and still edit nothing: the layer does not carry the
facts on this model, the clamp is too tight, or γ is above the keys' own cosines. So once
the rows exist, the adapter is attached with its gate (exactly as a user would load it),
and every fact's edit prompt is scored teacher-forced: a fact counts as edited when every
token of its new target is the model's top-1 prediction. The result is recorded in the
adapter's build provenance (`build["self_check"]`), printed by `nkv build` and shown on the
Hub model card. It measures efficacy on the edit prompts only (no paraphrases, no
specificity): a floor, not an evaluation (`nkv eval` is that).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from nkv.adapter import NKVAdapter
from nkv.loaders.transformers import attach

from ..scoring import score_pairs

LOW_EFFICACY = 0.8  # below this share of edited facts, `nkv build` warns loudly
SAMPLE = 2000  # facts scored at most (evenly spread), so a 100k-fact build checks in minutes


def self_check(model: nn.Module, tokenizer: Any, adapter: NKVAdapter) -> dict[str, Any]:
    """Efficacy of `adapter` on its own edit prompts, with the gate applied.

    Returns {"efficacy": share of checked facts whose whole new target is top-1,
    "first_token": share whose first target token is top-1, "n_checked", "failed": up to
    10 ids that did not take, "protocol"}.
    """
    n, k = adapter.n_facts, min(adapter.n_facts, SAMPLE)
    facts = [adapter.facts[i * n // k] for i in range(k)]  # evenly spread over the whole adapter
    handle = attach(model, adapter)
    try:
        scores = score_pairs(model, tokenizer, [(f.prompt, f.target_new) for f in facts])
    finally:
        handle.detach()
    whole = [s.exact for s in scores]
    n = max(len(scores), 1)
    return {
        "efficacy": round(sum(whole) / n, 4),
        "first_token": round(sum(s.first_token_hit for s in scores) / n, 4),
        "n_checked": len(scores),
        "failed": [f.id for f, ok in zip(facts, whole) if not ok][:10],
        "protocol": "teacher-forced top-1 of every target token on the edit prompt, adapter attached with its gate",
    }


def is_low(check: dict[str, Any]) -> bool:
    return check.get("efficacy", 1.0) < LOW_EFFICACY


__all__ = ["self_check", "is_low", "LOW_EFFICACY"]
