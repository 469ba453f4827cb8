"""Token-level view of a fact: where the subject ends and which tokens are the target.

Positions come from the tokenizer, never from string search over tokens: the subject's
last token is the last token of `tokenize(text up to the end of the subject)`, checked
against the tokenization of the whole text (same special tokens, so a BOS token or a
leading-space convention shifts both alike). When a merge across the subject's end
breaks that check, character offsets of a fast tokenizer decide; failing both, the
fact is reported by id.
"""

from __future__ import annotations

from dataclasses import dataclass

from nkv.errors import NKVFactsError
from nkv.facts import Fact

KL_TEMPLATE = "{} is a"  # MEMIT/ROME: keeps what the model says about the subject


@dataclass(frozen=True)
class Encoded:
    """One token sequence: `ids`, the subject's last token, the first target token (or -1)."""

    ids: list[int]
    subject_pos: int
    target_start: int = -1


@dataclass(frozen=True)
class FactTokens:
    """All sequences one fact needs (templates[0] is the bare prompt)."""

    key_texts: list[Encoded]  # prefix + prompt up to the subject's end, one per template
    rewrites: list[Encoded]  # prefix + prompt + " " + target, one per template
    kl: Encoded  # "{subject} is a"


def subject_span(fact: Fact) -> tuple[int, int]:
    """Character span of the (first occurrence of the) subject in the prompt."""
    start = fact.prompt.find(fact.subject)
    if start < 0:
        raise NKVFactsError(f"fact {fact.id!r}: subject {fact.subject!r} is not in the prompt {fact.prompt!r}")
    return start, start + len(fact.subject)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def locate(tokenizer, text: str, subject_end: int, fact: Fact) -> Encoded:
    """Tokenize `text` and find the token that holds character `subject_end - 1`."""
    ids = _ids(tokenizer, text)
    head = _ids(tokenizer, text[:subject_end])
    if head and ids[: len(head)] == head:
        return Encoded(ids, len(head) - 1)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True)
        for i, (a, b) in enumerate(enc["offset_mapping"]):
            if a < b and a <= subject_end - 1 < b:
                return Encoded(list(enc["input_ids"]), i)
    raise NKVFactsError(
        f"fact {fact.id!r}: the tokenizer does not separate the subject {fact.subject!r} in {text!r}; "
        "end the subject at a word boundary or rephrase the prompt")


def with_target(tokenizer, prompt: Encoded, text: str, target: str, fact: Fact) -> Encoded:
    """`prompt` followed by " " + target, tokenized as the model will see it after generation."""
    full = _ids(tokenizer, text + " " + target)
    n = len(prompt.ids)
    if full[:n] == prompt.ids and len(full) > n:
        return Encoded(full, prompt.subject_pos, n)
    # A merge across the boundary (or an appended EOS): tokenize the target on its own.
    tail = list(tokenizer(" " + target, add_special_tokens=False)["input_ids"])
    if not tail:
        raise NKVFactsError(f"fact {fact.id!r}: target {target!r} tokenizes to nothing")
    return Encoded(prompt.ids + tail, prompt.subject_pos, n)


def encode_fact(tokenizer, fact: Fact, prefixes: list[str]) -> FactTokens:
    """Tokenize every sequence `fact` needs; `prefixes[0]` must be "" (the bare prompt)."""
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
    return FactTokens(keys, rewrites, kl)


__all__ = ["Encoded", "FactTokens", "KL_TEMPLATE", "subject_span", "locate", "with_target", "encode_fact"]
