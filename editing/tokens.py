"""Where things are in a token sequence: the subject's last token and the answer's tokens.

One implementation for the build, the evaluation and the layer sweep, so the token a key
is read at and the answer tokens a residual is optimised for are the ones later measured.

Positions come from the tokenizer, never from string search over tokens: the subject's
last token is the last token of `tokenize(text up to the end of the subject)`, checked
against the tokenization of the whole text (same special tokens, so a BOS token or a
leading-space convention shifts both alike). When a merge across the subject's end
breaks that check, character offsets of a fast tokenizer decide; failing both, the
fact is reported by id.

An answer follows its prompt as `prompt + " " + answer`, tokenized as one text when that
keeps the prompt's tokens as a prefix (what the model sees after generating it); else
(a merge across the boundary, or an EOS the tokenizer appends) the prompt's tokens are
followed by `" " + answer` tokenized on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nkv.errors import NKVFactsError
from nkv.facts import Fact


@dataclass(frozen=True)
class Encoded:
    """One token sequence: `ids`, the subject's last token, the first target token (or -1)."""

    ids: list[int]
    subject_pos: int
    target_start: int = -1


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """`text`'s token ids, with the tokenizer's special tokens (BOS) as the model sees them."""
    return list(tokenizer(text)["input_ids"])


def subject_span(fact: Fact) -> tuple[int, int]:
    """Character span of the (first occurrence of the) subject in the prompt."""
    start = fact.prompt.find(fact.subject)
    if start < 0:
        raise NKVFactsError(f"fact {fact.id!r}: subject {fact.subject!r} is not in the prompt {fact.prompt!r}")
    return start, start + len(fact.subject)


def locate(tokenizer: Any, text: str, subject_end: int, fact: Fact) -> Encoded:
    """Tokenize `text` and find the token that holds character `subject_end - 1`."""
    ids = token_ids(tokenizer, text)
    head = token_ids(tokenizer, text[:subject_end])
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


def encode_pair(tokenizer: Any, prompt: str, answer: str,
                prompt_ids: list[int] | None = None) -> tuple[list[int], int]:
    """Token ids of prompt + " " + answer, and the index of the first answer token.

    `prompt_ids` (the prompt's own tokenization) saves tokenizing the prompt again.
    The answer part is empty only when `" " + answer` tokenizes to nothing.
    """
    head = token_ids(tokenizer, prompt) if prompt_ids is None else prompt_ids
    full = token_ids(tokenizer, prompt + " " + answer)
    if full[: len(head)] == head and len(full) > len(head):
        return full, len(head)
    tail = list(tokenizer(" " + answer, add_special_tokens=False)["input_ids"])
    return head + tail, len(head)


def answer_ids(tokenizer: Any, prompt: str, answer: str) -> list[int]:
    """The answer's tokens as they follow `prompt` (what greedy decoding must produce)."""
    full, start = encode_pair(tokenizer, prompt, answer)
    return full[start:]


def with_target(tokenizer: Any, prompt: Encoded, text: str, target: str, fact: Fact) -> Encoded:
    """`prompt` (the encoding of `text`) followed by " " + target, as `encode_pair` tokenizes it."""
    full, start = encode_pair(tokenizer, text, target, prompt_ids=prompt.ids)
    if len(full) == start:
        raise NKVFactsError(f"fact {fact.id!r}: target {target!r} tokenizes to nothing")
    return Encoded(full, prompt.subject_pos, start)


def subject_position(tokenizer: Any, text: str, fact: Fact) -> int | None:
    """The subject's last token in `text` (its first occurrence), or None if absent or unseparable."""
    start = text.find(fact.subject)
    if start < 0:
        return None
    try:
        return locate(tokenizer, text, start + len(fact.subject), fact).subject_pos
    except NKVFactsError:
        return None


__all__ = ["Encoded", "token_ids", "subject_span", "locate", "encode_pair", "answer_ids", "with_target",
           "subject_position"]
