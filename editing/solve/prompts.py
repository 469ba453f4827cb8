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
    members: int = 1  # facts whose rewrites these are (member-major): >1 for one subject's facts solved jointly

    @property
    def n_templates(self) -> int:
        """Templates per member (the rewrites of member m are rewrites[m * n : (m + 1) * n])."""
        return len(self.rewrites) // self.members


def joined(facts: Sequence[FactTokens]) -> FactTokens:
    """One subject's facts as one item of the optimisation: every member's rewrites (each
    with its own target), the first member's keys and KL prompt (the same subject), and the
    probes of all, once each. Its δ is every member's residual (`compute_rows`)."""
    if len(facts) == 1:
        return facts[0]
    probes: dict[tuple[int, ...], Encoded] = {}
    for f in facts:
        for p in f.probes:
            probes.setdefault(tuple(p.ids), p)
    return FactTokens(facts[0].key_texts, [r for f in facts for r in f.rewrites], facts[0].kl,
                      tuple(probes.values()), members=len(facts))


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


__all__ = ["FactTokens", "KL_TEMPLATE", "encode_fact", "joined"]
