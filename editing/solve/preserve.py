"""The subject's other facts: probes whose answers a residual must leave as they were.

A fact's key is read at the subject's last token, before the relation, so its residual
reaches every prompt about the subject ("X was born in", "X speaks", ...). Optimised for
the edit alone (plus MEMIT's "{subject} is a"), it rewrites the subject's other facts
too: on the fact-world model they fall from 100% to 36% correct. So the objective also
holds the next-token distribution after a few generic relation prompts about the
subject at the unedited model's (KL, weighted by `preserve_factor`), with no facts to
supply: the model's own answers are the targets. The prompts are the build's own most
frequent prompt shapes with this subject ("The capital of {} is", when the facts ask
about capitals), then generic ones (`PRESERVE_TEMPLATES`, or the user's own): generic
person-centred prompts alone held nothing of a country's capital or currency on SmolLM2.

A probe that asks what an edit changes must not be held. Which relation a prompt asks
for is not written anywhere, so the model decides: a probe whose unedited greedy answer
equals the unedited greedy answer of one of the subject's edit prompts in this build is
taken to be the same question and is left out ("X plays the" when "X's favourite
instrument is the" is edited). Two different relations that happen to share an answer
lose their probe too; that costs preservation, never the edit.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import torch
from torch import nn

from nkv.facts import Fact

from ..scoring import next_token_predictions

# Generic relation prompts: people (birthplace, occupation, language, instrument,
# residence), places and organisations (location), works and products (creator). The
# first five are also how the fact-world's relations are first phrased (its other three
# phrasings per relation are what its evaluation asks).
PRESERVE_TEMPLATES: tuple[str, ...] = (
    "{} was born in",
    "{} works as a",
    "{} speaks",
    "{} plays the",
    "{} lives in",
    "{} is located in",
    "{} was created by",
)


# The relations a knowledge base is about are the ones its own prompts ask: the build's
# most frequent prompt shapes ("The capital of {} is") are probes too, ahead of the generic ones.
MAX_DATA_TEMPLATES = 6


def data_templates(facts: Sequence[Fact], limit: int = MAX_DATA_TEMPLATES) -> list[str]:
    """The `limit` most frequent prompts of `facts` with the subject as "{}" (most frequent first)."""
    shapes = Counter(f.prompt.replace(f.subject, "{}") for f in facts if f.prompt.count(f.subject) == 1)
    return [t for t, _ in shapes.most_common(limit)]


@torch.no_grad()
def choose_probes(model: nn.Module, tokenizer: Any, facts: Sequence[Fact],
                  templates: Sequence[str] = PRESERVE_TEMPLATES) -> list[list[str]]:
    """Per fact, the probe texts (the build's own prompt shapes, then `templates`, filled with
    its subject) to hold, as above."""
    own = data_templates(facts)
    templates = [*own, *(t for t in templates if t not in own)]
    subjects = sorted({f.subject for f in facts})
    probes = {s: [t.replace("{}", s) for t in templates] for s in subjects}
    texts = sorted({f.prompt for f in facts} | {p for ps in probes.values() for p in ps})
    answer = {t: pred[-1] for t, pred in zip(texts, next_token_predictions(model, tokenizer, texts))}
    edited: dict[str, set[int]] = {}  # subject -> unedited answers of its edit prompts
    for f in facts:
        edited.setdefault(f.subject, set()).add(answer[f.prompt])
    return [[p for p in probes[f.subject] if answer[p] not in edited[f.subject]] for f in facts]


__all__ = ["PRESERVE_TEMPLATES", "MAX_DATA_TEMPLATES", "choose_probes", "data_templates"]
