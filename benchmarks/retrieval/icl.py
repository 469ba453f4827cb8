"""In-context editing with retrieval (IKE-like): the edited facts as text, the best match
prepended to each request, scored by the same code as `nkv eval`.

* Index: BM25 over each fact's text "prompt target_new" (words = lowercase \\w+ runs;
  k1 1.2, b 0.75). Keyword retrieval: no sentence-embedding model can be downloaded here.
* Request: the top-k facts, then the question, in EasyEdit's IKE template:
  "New Fact: {prompt} {target_new}\\nPrompt: {question}". Every request gets k facts (no
  score threshold), as IKE prepends its demonstrations to every query.
* Scoring: the prefixed prompts go through `nkv.editing.evaluate.measure` (the one
  teacher-forced scorer, free generation and aggregation of `nkv eval`), so E/G/S mean
  exactly what they mean for NKV.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from typing import Any, Sequence

from nkv.facts import Fact
from nkv.facts_io import FactInput

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def fact_text(fact: Fact) -> str:
    return f"{fact.prompt} {fact.target_new}"


class KeywordIndex:
    """BM25 over fact texts; `search(query, k)` returns the indices of the k best facts."""

    def __init__(self, facts: Sequence[Fact], k1: float = 1.2, b: float = 0.75):
        self.facts = list(facts)
        self.k1, self.b = k1, b
        docs = [Counter(words(fact_text(f))) for f in self.facts]
        self.lengths = [sum(d.values()) for d in docs]
        self.mean_length = sum(self.lengths) / max(len(docs), 1)
        self.postings: dict[str, list[tuple[int, int]]] = defaultdict(list)  # word -> [(fact, count)]
        for i, doc in enumerate(docs):
            for word, count in doc.items():
                self.postings[word].append((i, count))
        n = len(docs)
        self.idf = {w: math.log(1 + (n - len(p) + 0.5) / (len(p) + 0.5)) for w, p in self.postings.items()}

    def search(self, query: str, k: int = 1) -> list[int]:
        scores: dict[int, float] = defaultdict(float)
        for word in set(words(query)):
            idf = self.idf.get(word)
            if idf is None:
                continue
            for i, tf in self.postings[word]:
                norm = tf + self.k1 * (1 - self.b + self.b * self.lengths[i] / self.mean_length)
                scores[i] += idf * tf * (self.k1 + 1) / norm
        return sorted(scores, key=lambda i: -scores[i])[:k]


def in_context(index: KeywordIndex, question: str, k: int = 1) -> tuple[str, list[int]]:
    """(the request with its retrieved facts prepended, which facts were retrieved)."""
    hits = index.search(question, k)
    context = "".join(f"New Fact: {fact_text(index.facts[i])}\n" for i in hits)
    return f"{context}Prompt: {question}", hits


@dataclass
class Retrieved:
    """Facts rewritten so every prompt carries its retrieved context, plus what retrieval did."""

    facts: list[FactInput]
    right: dict[str, list[bool]]  # edit / paraphrase: the fact's own record was retrieved
    seconds: float  # retrieval time, all queries


def with_context(facts: Sequence[FactInput], index: KeywordIndex, k: int = 1) -> Retrieved:
    """Each fact's edit prompt, paraphrases, neighbours and portability questions, prefixed."""
    own = {id(f): i for i, f in enumerate(index.facts)}
    right: dict[str, list[bool]] = {"edit": [], "paraphrase": []}
    out = []
    start = time.perf_counter()
    for item in facts:
        mine = own.get(id(item.fact))

        def ask(question: str, kind: str | None = None) -> str:
            text, hits = in_context(index, question, k)
            if kind is not None:
                right[kind].append(mine in hits)
            return text

        fact = replace(item.fact, prompt=ask(item.fact.prompt, "edit"))
        out.append(FactInput(fact, paraphrases=[ask(p, "paraphrase") for p in item.paraphrases],
                             neighborhood=[(ask(p), t) for p, t in item.neighborhood], tags=item.tags,
                             portability=[(kind, ask(p), a) for kind, p, a in item.portability]))
    return Retrieved(out, right, time.perf_counter() - start)


def measure_in_context(model: Any, tokenizer: Any, facts: Sequence[FactInput], protocol: str,
                       options: Any) -> dict[str, Any]:
    """Post-edit metrics of already prefixed facts, through `nkv eval`'s own measure/aggregate."""
    from nkv.editing.evaluate.aggregate import headline, per_fact, unmeasured
    from nkv.editing.evaluate.knowedit import knowedit_metrics
    from nkv.editing.evaluate.measure import cases_of, measure

    cases = cases_of(facts)
    post = measure(model, tokenizer, cases, protocol, [], [], options)
    pre = unmeasured(post)
    metrics = headline(pre, post, {"pre": per_fact(pre, cases), "post": per_fact(post, cases)},
                       options.fluency_prompts)
    return {"metrics": metrics, "knowedit": knowedit_metrics(pre, post, cases, metrics.get("fluency"))}


def command_line(script: str, argv: Sequence[str]) -> str:
    """The command as run, with file arguments shortened to their names (no machine paths in results)."""
    from pathlib import Path

    return " ".join(["python", script, *(Path(a).name if "/" in a and Path(a).exists() else a for a in argv)])


__all__ = ["command_line", "KeywordIndex", "in_context", "with_context", "measure_in_context", "Retrieved", "words", "fact_text"]
