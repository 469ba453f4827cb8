"""The edited subjects' other facts without a true-facts file: the model's own answers
(editing/evaluate/probes.py), and the build's probes that keep them (editing/solve/preserve.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_models as tm

from nkv.editing.evaluate import EvalOptions
from nkv.editing.evaluate.probes import probed_other_facts
from nkv.editing.forward import frozen
from nkv.editing.generation import greedy_continuations
from nkv.facts import Fact
from nkv.facts_io import FactInput, read_facts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FW = Path(__file__).resolve().parents[1] / "examples" / "factworld"


def test_probes_are_the_models_answers_minus_the_edited_question():
    model, tok = tm.tiny_model("llama"), tm.tiny_tokenizer()
    facts = [FactInput(Fact("ty", "Toko Yasuda", "Toko Yasuda plays the", "piano"))]
    templates = ("{} plays the", "{} lives in", "{} was born in")
    with frozen(model):
        got = probed_other_facts(model, tok, facts, templates)
        prompts = [t.replace("{}", "Toko Yasuda") for t in templates]
        words = [tok.decode(ids, skip_special_tokens=True).split() for ids in
                 greedy_continuations(model, tok, prompts, [3] * len(prompts))]
    words = [w[0].strip(".,;:!?\"'()") if w else "" for w in words]
    want = [(p, w) for p, w in zip(prompts[1:], words[1:]) if w and w != words[0]]
    assert [(t.prompt, t.target) for t in got] == want
    assert all(t.subject == "Toko Yasuda" for t in got)
    assert "Toko Yasuda plays the" not in [t.prompt for t in got]  # the edit's own question


@pytest.mark.skipif(not (FW / "models" / "llama" / "config.json").is_file(), reason="fact-world model not trained")
def test_the_probes_keep_the_subjects_other_facts_and_eval_measures_it_without_true_facts():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nkv.editing.evaluate import evaluate
    from nkv.editing.solve import build_adapter, default_config

    model = AutoModelForCausalLM.from_pretrained(FW / "models" / "llama").eval()
    tok = AutoTokenizer.from_pretrained(FW / "models" / "llama")
    items = read_facts(FW / "edits.jsonl")[:12]
    options = EvalOptions(fluency_prompts=0, free_generation=False, gate_diagnostics=False)
    kept = {}
    for name, config in (("plain", default_config(model)), ("default", default_config(model, preserve_factor=1.0))):
        adapter = build_adapter(model, tok, items, layer=0, gamma=0.85, config=config, progress=False)
        report = evaluate(model, tok, adapter, items, unrelated=["The weather is fine today."], options=options)
        assert report.settings["other_facts_source"] == "the unedited model's answers to relation prompts"
        spot = report.weak_spots["same_subject_other_facts"]
        assert spot["n"] >= 24 and spot["pre"] >= 90.0  # the model knows its world
        kept[name] = spot["post"]
    # Measured: 37.1% kept without the probes, 82.9% with them (eval phrasings unlike the build's; generic probes).
    assert kept["default"] >= 75.0 and kept["default"] >= kept["plain"] + 30.0, kept


@pytest.mark.skipif(not (FW / "models" / "llama" / "config.json").is_file(), reason="fact-world model not trained")
def test_two_edits_of_one_subject_both_take_when_solved_jointly():
    """Two edited facts per subject (edits_same_subject.jsonl): solved alone, their rows' keys are
    nearly equal and the gate's argmax adds one fact's residual to both questions; solved jointly
    (the default), whichever row wins carries both edits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nkv.editing.evaluate import evaluate
    from nkv.editing.solve import build_adapter, default_config

    model = AutoModelForCausalLM.from_pretrained(FW / "models" / "llama").eval()
    tok = AutoTokenizer.from_pretrained(FW / "models" / "llama")
    items = [f for f in read_facts(FW / "edits_same_subject.jsonl")
             if "relation:instrument" not in f.tags][:16]  # instrument edits fail at layer 0 either way (benchmarks/compare)
    options = EvalOptions(fluency_prompts=0, free_generation=False, gate_diagnostics=False)
    efficacy = {}
    for joint in (False, True):
        config = default_config(model, joint_subjects=joint)
        adapter = build_adapter(model, tok, items, layer=0, gamma=0.85, config=config, progress=False)
        report = evaluate(model, tok, adapter, items, unrelated=["The weather is fine today."], options=options)
        efficacy[joint] = report.metrics["efficacy"]["post"]
    # Measured: 56.25 alone, 100.0 jointly.
    assert efficacy[True] >= 90.0 and efficacy[True] >= efficacy[False] + 20.0, efficacy
