"""The edited subjects' other facts, when no true-facts file is given: the model's own answers.

An edit must leave what the model says about the rest of its subject alone. Without a
file of the subject's true facts, the unedited model's own greedy answers to a few
relation prompts about each edited subject are the reference: the share still answered
after the edits is the "edited subjects' other facts" metric. The prompts are phrased
unlike the build's probes (`nkv.editing.solve.preserve.PRESERVE_TEMPLATES`), so the
evaluation does not score the very prompts the build held. A prompt whose unedited answer
is the unedited answer of one of the subject's edit prompts asks the edited question, and
is left out (the build's rule).
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from nkv.facts_io import FactInput

from ..generation import greedy_continuations
from .truefacts import TrueFact

EVAL_PROBE_TEMPLATES: tuple[str, ...] = (
    "The birthplace of {} is",
    "By profession, {} is a",
    "The native language of {} is",
    "The instrument played by {} is the",
    "The country where {} lives is",
    "The location of {} is",
    "The creator of {} is",
)
ANSWER_TOKENS = 3  # greedy tokens read; the answer is their first word


def probed_other_facts(model: nn.Module, tokenizer: Any, facts: Sequence[FactInput],
                       templates: Sequence[str] = EVAL_PROBE_TEMPLATES) -> list[TrueFact]:
    """(subject, prompt, the model's greedy first word) per probe kept; call on the unedited model."""
    subjects = sorted({f.fact.subject for f in facts})
    probes = [(s, t.replace("{}", s)) for s in subjects for t in templates]
    prompts = [f.fact.prompt for f in facts] + [p for _, p in probes]
    words = [_first_word(tokenizer.decode(ids, skip_special_tokens=True))
             for ids in greedy_continuations(model, tokenizer, prompts, [ANSWER_TOKENS] * len(prompts))]
    edited: dict[str, set[str]] = {}
    for f, word in zip(facts, words):
        edited.setdefault(f.fact.subject, set()).add(word)
    return [TrueFact(s, p, word, relation="probe") for (s, p), word in zip(probes, words[len(facts):])
            if word and word not in edited[s]]


def _first_word(text: str) -> str:
    """The first word of a continuation, without trailing punctuation ("Paris, France" -> "Paris")."""
    parts = text.split()
    return parts[0].strip(".,;:!?\"'()") if parts else ""


__all__ = ["EVAL_PROBE_TEMPLATES", "probed_other_facts"]
