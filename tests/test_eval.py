"""Metrics of `nkv.editing.evaluate` on tiny random models with hand-made adapters.

Editing quality itself is shown on the trained fact-world model (test_e2e_factworld.py);
here each measure is checked against a hand computation or a case whose answer is known.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from handmade import capture_keys, forcing_adapter
from nkv import Fact
from nkv.facts_io import FactInput
from nkv.editing.evaluate import (EvalOptions, adapter_rows, detect_protocol, evaluate, evaluate_adapter, fluency,
                              gate_trace, ngram_entropy, plot_cosines, read_true_facts, score_pairs, text_fluency)
from nkv.editing.generation import free_generation_exact, greedy_continuations
from nkv.editing.tokens import encode_pair
from nkv.loaders.transformers import attach
from nkv.errors import NKVError, NKVFactsError
from tiny_models import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The subject ends at the prompt's last token, where `forcing_adapter` reads its key,
# so the gate's "right fact at the subject" is meaningful for these hand-made rows.
PROMPT = "The Eiffel Tower is located in"
SUBJECT = "Eiffel Tower is located in"
NEW, TRUE = "Paris", "Rome"  # " Paris" is one token of the tiny tokenizer; the forcing row can force it




@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _fact_input(**extra) -> FactInput:
    fact = Fact(id="f0", subject=SUBJECT, prompt=PROMPT, target_new=NEW, target_true=TRUE, **extra)
    return FactInput(fact, paraphrases=[f"Today the {SUBJECT}"],
                     neighborhood=[("Toko Yasuda plays the", "guitar")], tags=["shared_last_token"])


def _adapter(model, tok, gamma=0.999):
    adapter = forcing_adapter(model, tok, [PROMPT], [NEW], gamma=gamma)
    return replace(adapter, facts=[_fact_input().fact])


# ---------------------------------------------------------------- fluency
def test_ngram_entropy_by_hand():
    # "a b a b": bigrams (a,b) x2, (b,a) x1 -> H = -(2/3 log2 2/3 + 1/3 log2 1/3)
    expected = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b", 2) == pytest.approx(expected)
    assert ngram_entropy("a b a b", 3) == pytest.approx(1.0)  # (a,b,a), (b,a,b): uniform over 2
    assert text_fluency("a b a b") == pytest.approx((2 / 3 * expected + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("one", 2) == 0.0


def test_fluency_drops_for_repetitive_text():
    varied = "The old city has narrow streets, a market by the river and a museum of music."
    looping = "Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris."
    assert fluency([varied]) > 3 * fluency([looping])
    assert math.isnan(fluency([]))


# ---------------------------------------------------------------- scoring
def test_encode_pair_keeps_the_prompt_tokens(tok):
    ids, start = encode_pair(tok, PROMPT, NEW)
    assert ids[:start] == list(tok(PROMPT)["input_ids"])
    assert tok.decode(ids[start:]).strip() == NEW


def test_score_pairs_batched_equals_one_by_one(model, tok):
    pairs = [(PROMPT, NEW), (PROMPT, TRUE), ("Toko Yasuda plays the", "guitar"), (PROMPT, NEW)]
    batched = score_pairs(model, tok, pairs, batch_size=3)
    for pair, got in zip(pairs, batched):
        ids, start = encode_pair(tok, *pair)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        target = torch.tensor(ids[start:])
        rows = logp[start - 1 : len(ids) - 1]
        assert got.nll == pytest.approx(float(-rows.gather(1, target[:, None]).mean()), abs=1e-4)
        assert got.token_accuracy == pytest.approx(float((rows.argmax(-1) == target).float().mean()))
        assert got.n_tokens == len(target)
    assert batched[0] == batched[3]


def test_left_padded_greedy_equals_one_prompt_at_a_time(model, tok):
    prompts = [PROMPT, "Berlin, Rome, Madrid", "Which language does Carl Bosch speak?"]
    together = greedy_continuations(model, tok, prompts, [4, 2, 3], batch_size=8)
    alone = [greedy_continuations(model, tok, [p], [n])[0] for p, n in zip(prompts, [4, 2, 3])]
    assert together == alone
    assert [len(x) for x in together] == [4, 2, 3]


def test_free_generation_exact_follows_the_edit(model, tok):
    handle = attach(model, _adapter(model, tok))
    try:
        assert free_generation_exact(model, tok, [(PROMPT, NEW)]) == [True]
        with handle.disabled():
            assert free_generation_exact(model, tok, [(PROMPT, NEW)]) == [False]
    finally:
        handle.detach()


# ---------------------------------------------------------------- gate diagnostics
def test_gate_trace_matches_a_direct_cosine(model, tok):
    adapter = _adapter(model, tok, gamma=0.5)
    handle = attach(model, adapter)
    try:
        texts = [PROMPT, "Toko Yasuda plays the guitar and works as an engineer in Tokyo."]
        traces = gate_trace(model, tok, handle, texts)
    finally:
        handle.detach()
    for text, trace in zip(texts, traces):
        layer = adapter.layer
        keys = torch.stack([capture_keys(model, tok, [tok.decode(trace.ids[: i + 1])], layer)[0]
                            for i in range(len(trace.ids))])  # (T, d_key): the key at every prefix's end
        cos = torch.cosine_similarity(keys, adapter.keys.float(), dim=-1)  # one fact: (T,)
        assert torch.allclose(trace.score, cos, atol=1e-4)
        assert torch.equal(trace.fired, cos > 0.5)
    assert bool(traces[0].fired[-1]) and float(traces[0].score[-1]) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- the whole evaluation
def test_evaluate_counterfact_protocol(model, tok, tmp_path):
    item = _fact_input()
    unrelated = ["Berlin, Rome, Madrid, London and Vienna are capitals in Europe."] * 3
    report = evaluate(model, tok, _adapter(model, tok), [item], unrelated=unrelated,
                      options=EvalOptions(fluency_prompts=1, fluency_tokens=8), data_name="hand.jsonl")
    m = report.metrics
    assert report.data["protocol"] == "counterfact" and report.adapter["matched"] == 1
    assert (m["efficacy"]["pre"], m["efficacy"]["post"]) == (0.0, 100.0)
    assert m["free_gen_prompt"]["post"] == 100.0 and m["free_gen_prompt"]["pre"] == 0.0
    assert m["specificity"]["post"] == m["specificity"]["pre"]  # the neighbour never fires at 0.999
    assert report.gate["edit_right"] == 100.0 and report.gate["false_fire"] == 0.0
    assert report.gate["unrelated_tokens"] == 3 * len(tok(unrelated[0])["input_ids"])
    assert report.by_tag["shared_last_token"]["specificity"]["n"] == 1  # a generic per-tag breakdown
    assert "by tag" in report.table() and "specificity_tagged_shared" not in report.weak_spots
    assert m["fluency"]["pre"] > 0
    text = report.table()
    assert "efficacy" in text and "gate: false fires" in text
    json.dumps(report.to_dict(), allow_nan=False)  # the --json report is strict JSON
    summary = report.summary()
    stored = replace(_adapter(model, tok), eval={"hand.jsonl": summary})
    stored.save(tmp_path / "a.nkv")  # write-back output passes the format's validation
    assert plot_cosines(report, tmp_path / "gate.png").stat().st_size > 1000


def test_evaluate_zsre_protocol_scores_token_accuracy(model, tok):
    item = _fact_input(provenance={"source": "zsre"})
    assert detect_protocol([item]) == "zsre"
    report = evaluate(model, tok, _adapter(model, tok), [item], unrelated=["Paris is a city."],
                      options=EvalOptions(fluency_prompts=0, free_generation=False))
    assert report.data["protocol"] == "zsre"
    assert report.metrics["efficacy"]["post"] == 100.0  # the single target token is forced
    assert "free_gen_prompt" not in report.metrics and "fluency" not in report.metrics


def test_protocol_choice_and_rows(model, tok):
    bare = FactInput(Fact(id="x", subject="Toko", prompt="Toko plays the", target_new="piano"))
    assert detect_protocol([bare]) == "zsre"  # no target_true: nothing to compare against
    assert detect_protocol([_fact_input()]) == "counterfact"
    adapter = _adapter(model, tok)
    renamed = FactInput(replace(_fact_input().fact, id="other-id"))
    assert adapter_rows(adapter, [_fact_input(), renamed, bare]) == [0, 0, None]
    with pytest.raises(NKVError, match="has no target_true"):
        evaluate(model, tok, adapter, [bare], unrelated=["x"], options=EvalOptions(protocol="counterfact"))
    with pytest.raises(NKVError, match="protocol must be one of"):
        EvalOptions(protocol="rome")


def test_unedited_and_same_subject_facts(model, tok, tmp_path):
    path = tmp_path / "true.jsonl"
    rows = [{"subject": SUBJECT, "relation": "city", "prompt": PROMPT, "target": "Paris"},
            {"subject": SUBJECT, "relation": "other", "prompt": f"Of all places the {SUBJECT}", "target": "Paris"},
            {"subject": "Toko Yasuda", "relation": "instrument", "prompt": "Toko Yasuda plays the", "target": "guitar"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    true_facts = read_true_facts(path)
    item = FactInput(_fact_input().fact, tags=["relation:city"])
    report = evaluate(model, tok, _adapter(model, tok), [item], unrelated=["Paris is a city."], true_facts=true_facts,
                      options=EvalOptions(fluency_prompts=0, free_generation=False))
    assert report.metrics["unedited_facts"]["n"] == 1  # Toko Yasuda's fact only
    assert report.weak_spots["same_subject_other_facts"]["n"] == 1  # the edited subject's "other" relation
    assert report.metrics["other_facts"] == report.weak_spots["same_subject_other_facts"]  # a headline metric
    assert "edited subjects' other facts" in report.table() and "other_facts" in report.summary()["post"]


def test_read_true_facts_errors(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"subject": "A", "prompt": "B is", "target": "C"}\n')
    with pytest.raises(NKVFactsError, match="line 1: subject 'A' is not in the prompt"):
        read_true_facts(bad)
    bad.write_text('{"subject": "A"}\n')
    with pytest.raises(NKVFactsError, match=r"line 1: expected"):
        read_true_facts(bad)
    with pytest.raises(NKVFactsError, match="no such file"):
        read_true_facts(tmp_path / "missing.jsonl")


def test_evaluation_happens_with_every_edit_live(model, tok):
    """Two facts in one adapter: both are measured while both rows are attached."""
    prompts = [PROMPT, "Toko Yasuda plays the"]
    adapter = forcing_adapter(model, tok, prompts, [NEW, NEW])
    facts = [FactInput(Fact(id=f.id, subject=p.split(" ", 1)[1], prompt=p, target_new=NEW, target_true=TRUE))
             for f, p in zip(adapter.facts, prompts)]
    adapter = replace(adapter, facts=[f.fact for f in facts])
    handle = attach(model, adapter)
    try:
        with handle.record() as activity:
            report = evaluate_adapter(model, tok, handle, facts, unrelated=["Paris is a city."],
                                      options=EvalOptions(fluency_prompts=0, free_generation=False))
    finally:
        handle.detach()
    assert report.metrics["efficacy"]["post"] == 100.0
    assert set(activity.per_fact) == {"f0", "f1"}
