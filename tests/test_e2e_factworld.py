"""End to end on a model that knows facts: build -> attach -> eval on the fact-world Llama.

This is the proof that edits work (random-weight models only prove plumbing): the
committed tiny Llama trained on examples/factworld/ knows its facts; 16 of them are
edited with `build_adapter`, attached, and evaluated with all 16 edits live. Thresholds
are the measured values minus a margin (see the comments), not the paper's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / "examples" / "factworld"
MODEL = WORLD / "models" / "llama"
N_EDITS = 16
LAYER = 0  # the layer examples/factworld/README.md's causal trace points to
GAMMA = 0.85  # 0.65 (the paper's) lets nearby subjects' keys through on this d_ff = 384 model (same README)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (MODEL / "config.json").exists(),
                                 reason="fact-world model not found (python examples/factworld/train.py)")]


@pytest.fixture(scope="module")
def report():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nkv.facts_io import read_facts
    from nkv.editing.solve import build_adapter, default_config
    from nkv.editing.evaluate import EvalOptions, evaluate_adapter, read_true_facts
    from nkv.loaders.transformers import attach

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread is 10x faster than two on shared CPU cores
    try:
        model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
        tok = AutoTokenizer.from_pretrained(MODEL)
        facts = read_facts(WORLD / "edits.jsonl")[:N_EDITS]
        adapter = build_adapter(model, tok, facts, layer=LAYER, gamma=GAMMA, progress=False,
                                config=default_config(model, batch_size=N_EDITS))
        generic = (WORLD / "generic.txt").read_text().splitlines()[:60]
        edited = {f.fact.subject for f in read_facts(WORLD / "edits.jsonl")}
        true_facts = [t for t in read_true_facts(WORLD / "true_facts.jsonl") if t.subject not in edited]
        handle = attach(model, adapter)
        try:
            return evaluate_adapter(model, tok, handle, facts, unrelated=generic, true_facts=true_facts,
                                    options=EvalOptions(true_facts_limit=200, fluency_prompts=4, fluency_tokens=16),
                                    data_name="edits.jsonl")
        finally:
            handle.detach()
    finally:
        torch.set_num_threads(threads)


# Measured here (torch 2.13 CPU, build defaults, layer 0, γ 0.85, 16 edits): E 93.75 (15/16; the miss is
# an instrument edit: that relation does not go through the subject token's MLP at layer 0 in this
# model, see benchmarks/compare/README.md), G 89.6, S 100, free-gen 93.75 / 89.6, unedited facts
# 100, gate right 100 / 100, false fires 0. Thresholds leave about one fact of margin.
def test_the_model_knows_its_facts_before_the_edit(report):
    m = report.metrics
    assert m["efficacy"]["pre"] == 0.0  # the new targets are counterfactual
    assert m["specificity"]["pre"] >= 99.0
    assert m["unedited_facts"]["pre"] >= 99.0


def test_edits_work(report):
    m = report.metrics
    print(json.dumps({"metrics": m, "gate": report.gate, "weak_spots": report.weak_spots}, indent=1))
    assert m["efficacy"]["post"] >= 87.0
    assert m["generalization"]["post"] >= 80.0
    assert m["free_gen_prompt"]["post"] >= 87.0  # greedy decoding says it, not only teacher forcing
    assert m["free_gen_paraphrase"]["post"] >= 80.0


def test_edits_leave_the_rest_alone(report):
    m = report.metrics
    assert m["specificity"]["post"] >= m["specificity"]["pre"] - 2.0
    assert m["unedited_facts"]["post"] >= m["unedited_facts"]["pre"] - 2.0
    assert abs(m["fluency"]["post"] - m["fluency"]["pre"]) <= 20.0  # x100 scale: generations stay fluent
    assert report.gate["false_fire"] <= 0.5  # % of unrelated tokens


def test_the_gate_picks_the_right_fact(report):
    assert report.gate["edit_right"] >= 95.0
    assert report.gate["paraphrase_right"] >= 95.0
