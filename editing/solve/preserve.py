"""The subject's other facts: probes whose answers a residual must leave as they were.

A fact's key is read at the subject's last token, before the relation, so its residual
reaches every prompt about the subject ("X was born in", "X speaks", ...). Optimised for
the edit alone (plus MEMIT's "{subject} is a"), it rewrites the subject's other facts
too: on the fact-world model they fall from 100% to 36% correct. So the objective also
holds the unedited model's answer after a few relation prompts about the subject (its
top next token, or with `preserve_loss="kl"` its whole next-token distribution, weighted
by `preserve_factor`), with no facts to supply: the model's own answers are the targets.
The prompts are the build's own most frequent prompt shapes with this subject ("The
capital of {} is", when the facts ask about capitals), then generic ones
(`PRESERVE_TEMPLATES`, or the user's own), kept where the answer is a confident fact
about this subject (below): generic person-centred prompts alone held nothing of a
country's capital or currency on SmolLM2.

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
from nkv.facts_io import FactInput

from ..scoring import next_token_top1

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
# most frequent prompt shapes ("The capital of {} is") are candidate probes, ahead of the generic ones.
MAX_DATA_TEMPLATES = 32
# Per subject, a candidate is held only where the unedited model's answer is a fact about
# this subject: given with some confidence (top next token at >= MIN_CONFIDENCE; "The
# capital of {}" asks about France, not about Paris), not the answer the template gets
# with a placeholder subject (NULL_SUBJECT: "{} was created by" -> " the" whoever {} is),
# and not a token of the subject itself ("The city of France is in the country of" ->
# " France"). The most confident MAX_PROBES with different answers are held (each costs
# one short sequence per step).
MIN_CONFIDENCE = 0.2
MAX_PROBES = 4
NULL_SUBJECT = "X"


def data_templates(facts: Sequence[Fact], limit: int = MAX_DATA_TEMPLATES) -> list[str]:
    """The `limit` most frequent prompts of `facts` with the subject as "{}" (most frequent first)."""
    shapes = Counter(f.prompt.replace(f.subject, "{}") for f in facts if f.prompt.count(f.subject) == 1)
    return [t for t, _ in shapes.most_common(limit)]


@torch.no_grad()
def choose_probes(model: nn.Module, tokenizer: Any, facts: Sequence[Fact | FactInput],
                  templates: Sequence[str] = PRESERVE_TEMPLATES, max_probes: int = MAX_PROBES,
                  min_confidence: float = MIN_CONFIDENCE) -> list[list[str]]:
    """Per fact, the probe texts to hold: the build's own prompt shapes, then `templates`,
    filled with its subject; those the unedited model answers with top-1 probability >=
    `min_confidence`, minus the edited questions (above; a fact's paraphrases, when given,
    are edited questions too), the `max_probes` most confident with different answers."""
    paraphrases = [x.paraphrases if isinstance(x, FactInput) else [] for x in facts]
    facts = [x.fact if isinstance(x, FactInput) else x for x in facts]
    own = data_templates(facts)
    templates = [*own, *(t for t in templates if t not in own)]
    subjects = sorted({f.subject for f in facts})
    probes = {s: [t.replace("{}", s) for t in templates] for s in subjects}
    asked = {s: set() for s in subjects}  # subject -> its edit prompts and paraphrases that name it
    for f, more in zip(facts, paraphrases):
        asked[f.subject].update(t for t in (f.prompt, *more) if f.subject in t)
    nulls = [t.replace("{}", NULL_SUBJECT) for t in templates]
    texts = sorted(set().union(*asked.values(), *probes.values(), nulls))
    top = dict(zip(texts, next_token_top1(model, tokenizer, texts)))  # text -> (token, probability)
    edited = {s: {top[t][0] for t in ts} for s, ts in asked.items()}  # subject -> unedited answers to its edits
    held = {}
    for s, ps in probes.items():
        own_tokens = {t for text in (s, " " + s) for t in tokenizer(text, add_special_tokens=False)["input_ids"]}
        keep = [p for p, null in zip(ps, nulls)
                if p not in asked[s] and top[p][1] >= min_confidence
                and top[p][0] not in edited[s] | own_tokens | {top[null][0]}]
        held[s] = _distinct_answers(sorted(keep, key=lambda p: -top[p][1]), top, max_probes)
    return [held[f.subject] for f in facts]


def _distinct_answers(probes: list[str], top: dict[str, tuple[int, float]], limit: int) -> list[str]:
    """The first `limit` probes whose answers differ: two prompts with the same answer
    ("{} speaks", "The native language of {} is") most likely ask the same relation, and
    one probe holds it as well as two."""
    held, answers = [], set()
    for p in probes:
        if top[p][0] not in answers and len(held) < limit:
            held.append(p)
            answers.add(top[p][0])
    return held


__all__ = ["PRESERVE_TEMPLATES", "MAX_DATA_TEMPLATES", "MIN_CONFIDENCE", "MAX_PROBES", "NULL_SUBJECT", "choose_probes",
           "data_templates"]
