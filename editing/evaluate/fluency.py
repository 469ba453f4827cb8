"""Fluency: weighted bigram/trigram entropy of generated text (ROME/MEMIT `n_gram_entropy`).

The NeuralDB paper's equation (16) prints `-2/3·H2 + 4/3·H3` with the signs of
`Σ g log g`; the reference code that produced the numbers every paper in this line
reports (e.g. ~6.2 bits, "622" in the tables) computes, per text,
`mean(2/3 · H2, 4/3 · H3)` with H_n the entropy in bits of the text's n-gram
frequency distribution, then averages over texts. We compute exactly that, so numbers
are comparable with the published ones. Repetitive text (an edit that makes the model
loop) has few distinct n-grams and a low score.

Words are split like NLTK's word_tokenize would for plain text (words and punctuation),
without needing NLTK.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

_WORDS = re.compile(r"\w+|[^\w\s]")
WEIGHTS = {2: 2 / 3, 3: 4 / 3}


def ngram_entropy(text: str, n: int) -> float:
    """Entropy in bits of the n-gram frequency distribution of `text`'s words (0 if none)."""
    words = _WORDS.findall(text)
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    if not total:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in grams.values())


def text_fluency(text: str) -> float:
    """ROME's compute_n_gram_entropy: mean of 2/3·H2 and 4/3·H3, in bits."""
    weighted = [w * ngram_entropy(text, n) for n, w in WEIGHTS.items()]
    return sum(weighted) / len(weighted)


def fluency(texts: Sequence[str]) -> float:
    """Mean `text_fluency` over texts (the number reported, ×100 in the paper's tables)."""
    return sum(text_fluency(t) for t in texts) / len(texts) if texts else float("nan")


__all__ = ["ngram_entropy", "text_fluency", "fluency", "WEIGHTS"]
