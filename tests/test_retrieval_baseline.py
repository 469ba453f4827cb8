"""The retrieval baseline of benchmarks/retrieval (in-context editing): index and request text."""

from __future__ import annotations

import sys
from pathlib import Path

from nkv.facts import Fact
from nkv.facts_io import FactInput

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "retrieval"))

from icl import KeywordIndex, in_context, with_context  # noqa: E402

FACTS = [Fact(id="a", subject="Danielle Darrieux", prompt="The mother tongue of Danielle Darrieux is", target_new="English"),
         Fact(id="b", subject="Toko Yasuda", prompt="Toko Yasuda plays the", target_new="piano"),
         Fact(id="c", subject="Apple A5", prompt="Apple A5 was created by", target_new="Google")]


def test_bm25_finds_the_fact_that_shares_the_rare_words():
    index = KeywordIndex(FACTS)
    assert index.search("Where Danielle Darrieux is from, people speak", 1) == [0]
    assert index.search("The instrument Toko Yasuda is known for is the", 2)[0] == 1
    assert index.search("completely unrelated words", 1) == []  # nothing shared, nothing retrieved


def test_requests_use_ikes_template_and_record_what_was_retrieved():
    index = KeywordIndex(FACTS)
    text, hits = in_context(index, "Toko Yasuda is a musician who plays the")
    assert hits == [1]
    assert text == "New Fact: Toko Yasuda plays the piano\nPrompt: Toko Yasuda is a musician who plays the"
    item = FactInput(FACTS[2], paraphrases=["Danielle Darrieux speaks"], neighborhood=[("Apple A5 chips are", "fast")])
    got = with_context([item], index)
    assert got.right == {"edit": [True], "paraphrase": [False]}  # the paraphrase retrieved another fact
    assert got.facts[0].fact.prompt.startswith("New Fact: Apple A5 was created by Google\nPrompt: ")
    assert got.facts[0].neighborhood[0][1] == "fast"
