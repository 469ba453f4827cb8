"""Every token sequence one fact's optimisation needs (positions from `nkv.editing.tokens`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from nkv.facts import Fact

from ..tokens import Encoded, locate, subject_span, with_target

KL_TEMPLATE = "{} is a"  # MEMIT/ROME: keeps what the model says about the subject


@dataclass(frozen=True)
class FactTokens:
    """All sequences one fact needs (templates[0] is the bare prompt)."""

    key_texts: list[Encoded]  # prefix + prompt up to the subject's end, one per template
    rewrites: list[Encoded]  # prefix + prompt + " " + target, one per template
    kl: Encoded  # "{subject} is a"
    probes: tuple[Encoded, ...] = ()  # the subject's other relations, held where they were (preserve.py)


def encode_fact(tokenizer: Any, fact: Fact, prefixes: list[str], probes: Sequence[str] = ()) -> FactTokens:
    """Tokenize every sequence `fact` needs; `prefixes[0]` must be "" (the bare prompt).

    probes: texts about the subject ("{subject} was born in", from `preserve.choose_probes`)
    whose next-token distribution the residual must not change.
    """
    start, end = subject_span(fact)
    keys, rewrites = [], []
    for prefix in prefixes:
        text = prefix + fact.prompt
        shift = len(prefix)
        prompt = locate(tokenizer, text, shift + end, fact)
        keys.append(locate(tokenizer, text[: shift + end], shift + end, fact))
        rewrites.append(with_target(tokenizer, prompt, text, fact.target_new, fact))
    kl_text = KL_TEMPLATE.replace("{}", fact.subject)
    kl = locate(tokenizer, kl_text, len(fact.subject), fact)
    held = tuple(locate(tokenizer, text, text.index(fact.subject) + len(fact.subject), fact) for text in probes)
    return FactTokens(keys, rewrites, kl, held)


__all__ = ["FactTokens", "KL_TEMPLATE", "encode_fact"]
