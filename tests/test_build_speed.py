"""The fast build settings (issue 11): stop on a success margin, fewer optimised templates,
presets. Speed itself is measured by benchmarks/build, never asserted here."""

from __future__ import annotations

from dataclasses import replace as dc_replace
from pathlib import Path

import pytest
import torch
import tiny_models as tm

from nkv.editing.forward import frozen, pad_id_of
from nkv.editing.scoring import score_pairs
from nkv.editing.solve import (build_adapter, default_config, encode_facts, generate_prefixes, optimize_residuals,
                               optimize_residuals_reference)
from nkv.editing.solve.keys import compute_keys
from nkv.editing.solve.residuals import _margins, finished, optimised_templates, step_templates
from nkv.errors import NKVError
from nkv.facts import Fact
from nkv.facts_io import read_facts
from nkv.loaders.transformers import attach

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FACTS = [
    Fact("dd", "Danielle Darrieux", "The mother tongue of Danielle Darrieux", "English", "French"),
    Fact("ty", "Toko Yasuda", "The guitar of Toko Yasuda", "piano", "guitar"),
    Fact("cb", "Carl Bosch", "Which language does Carl Bosch", "Tokyo"),
    Fact("et", "Eiffel Tower", "The Eiffel Tower is in", "Rome"),
]


def _setup(model_type="llama", n_prefixes=2):
    model, tok = tm.tiny_model(model_type), tm.tiny_tokenizer()
    prefixes = generate_prefixes(model, tok, n_prefixes, 4, seed=0)
    tokens = encode_facts(tok, FACTS, prefixes)
    _, h0 = compute_keys(model, 0, tokens, pad_id=0)
    return model, tok, tokens, h0


def test_margin_is_label_minus_best_other():
    logp = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 2.5]]), -1)
    got = _margins(logp, torch.tensor([0, 1]))
    want = torch.tensor([logp[0, 0] - logp[0, 1], logp[1, 1] - logp[1, 2]])
    torch.testing.assert_close(got, want)
    assert got[0] > 0 > got[1]  # ranked first, and not


def test_finished_is_loss_or_margin():
    base = default_config("llama", preset="previous")
    loss, margin = torch.tensor([0.01, 1.0, 1.0]), torch.tensor([-1.0, 5.0, 1.0])
    assert finished(loss, margin, base).tolist() == [True, False, False]  # no margin rule
    assert finished(loss, margin, default_config("llama", stop_margin=3.0)).tolist() == [True, True, False]


FW = Path(__file__).resolve().parents[1] / "examples" / "factworld"


@pytest.mark.skipif(not (FW / "models" / "llama" / "config.json").is_file(), reason="fact-world model not trained")
def test_stop_margin_batched_equals_one_at_a_time_and_the_edits_take():
    # A trained model: random tiny ones cannot rank a multi-token target first at all.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(FW / "models" / "llama").eval()
    tok = AutoTokenizer.from_pretrained(FW / "models" / "llama")
    items = read_facts(FW / "quickstart.jsonl")
    config = default_config(model, n_prefixes=2, stop_margin=1.0, early_stop_loss=0.0)
    with frozen(model):
        tokens = encode_facts(tok, items, generate_prefixes(model, tok, 2, config.prefix_length, seed=0))
        _, h0 = compute_keys(model, 0, tokens, pad_id=pad_id_of(tok))
        batched = optimize_residuals(model, 0, tokens, h0, config, pad_id=pad_id_of(tok))
        reference = optimize_residuals_reference(model, 0, tokens, h0, config, pad_id=pad_id_of(tok))
    assert batched.steps.tolist() == reference.steps.tolist()
    stopped = [n < config.steps - 1 for n in batched.steps.tolist()]
    assert sum(stopped) >= 3  # on its margin, before the last step (the others hit the clamp)
    torch.testing.assert_close(batched.residuals, reference.residuals, atol=1e-4, rtol=1e-3)

    adapter = build_adapter(model, tok, items, layer=0, config=config, progress=False)
    handle = attach(model, adapter)
    try:  # stopped on success: every target token is top-1 on the edit prompt through the gate
        scores = score_pairs(model, tok, [(i.fact.prompt, i.fact.target_new) for i in items])
    finally:
        handle.detach()
    assert all(s.token_accuracy == 1.0 for s, done in zip(scores, stopped) if done)


def test_opt_prefixes_optimises_under_the_first_templates_only():
    model, tok, tokens, h0 = _setup(n_prefixes=3)
    config = default_config("llama", steps=6, lr=0.3, clamp=2.0, n_prefixes=3, prefix_length=4, opt_prefixes=1)
    cut = optimised_templates(tokens, config)
    assert [len(f.rewrites) for f in cut] == [2] * len(FACTS) and cut[0].rewrites == tokens[0].rewrites[:2]
    assert cut[0].key_texts == tokens[0].key_texts  # keys still average over every template
    with frozen(model):
        batched = optimize_residuals(model, 0, tokens, h0, config, pad_id=0)
        reference = optimize_residuals_reference(model, 0, tokens, h0, config, pad_id=0)
        every = optimize_residuals(model, 0, tokens, h0, default_config("llama", steps=6, lr=0.3, clamp=2.0,
                                                                         n_prefixes=3, prefix_length=4), pad_id=0)
    torch.testing.assert_close(batched.residuals, reference.residuals, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batched.residuals, every.residuals)  # a different objective


def test_rotate_prefixes_takes_the_next_prefixes_each_step():
    model, tok, tokens, h0 = _setup(n_prefixes=3)
    config = default_config("llama", steps=6, lr=0.3, clamp=2.0, n_prefixes=3, prefix_length=4, opt_prefixes=1,
                            rotate_prefixes=True)
    assert [step_templates(t, 4, config) for t in range(4)] == [[0, 1], [0, 2], [0, 3], [0, 1]]
    assert step_templates(0, 4, default_config("llama", opt_prefixes=1)) is None  # fixed: the batch is cut instead
    with frozen(model):
        batched = optimize_residuals(model, 0, tokens, h0, config, pad_id=0)
        reference = optimize_residuals_reference(model, 0, tokens, h0, config, pad_id=0)
        fixed = optimize_residuals(model, 0, tokens, h0, dc_replace(config, rotate_prefixes=False), pad_id=0)
    torch.testing.assert_close(batched.residuals, reference.residuals, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batched.residuals, fixed.residuals)  # later steps see other prefixes


def test_opt_dtype_runs_the_steps_in_bfloat16_and_batched_still_equals_one_at_a_time():
    model, tok, tokens, h0 = _setup()
    config = default_config("llama", steps=6, lr=0.3, clamp=2.0, n_prefixes=2, prefix_length=4, opt_dtype="bfloat16")
    seen: list[torch.dtype | None] = []
    fused: list[bool] = []  # whether the fused attention kernel was allowed in that forward

    def look(module, args):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        fused.append(torch.backends.cuda.flash_sdp_enabled())

    logits: list[torch.dtype] = []
    probe = model.get_output_embeddings().register_forward_pre_hook(look)
    out_probe = model.get_output_embeddings().register_forward_hook(lambda m, a, out: logits.append(out.dtype))
    with frozen(model):
        batched = optimize_residuals(model, 0, tokens, h0, config, pad_id=0)
        reference = optimize_residuals_reference(model, 0, tokens, h0, config, pad_id=0)
        full = optimize_residuals(model, 0, tokens, h0, dc_replace(config, opt_dtype=None), pad_id=0)
    probe.remove()
    out_probe.remove()
    assert torch.bfloat16 in seen and None in seen  # the steps under autocast; the checks (replay, prefix cache) not
    assert set(logits) == {torch.float32}  # the LM head stays in the model's dtype even under autocast
    assert not torch.is_autocast_enabled("cpu")  # and autocast is left as it was
    assert all(not f for d, f in zip(seen, fused) if d is not None)  # bf16 steps: the math attention kernel
    assert torch.backends.cuda.flash_sdp_enabled()  # and only inside them
    assert batched.residuals.dtype == torch.float32 and bool(torch.isfinite(batched.residuals).all())
    torch.testing.assert_close(batched.residuals, reference.residuals, atol=2e-2, rtol=2e-2)  # bf16 sums differ by batch
    assert not torch.equal(batched.residuals, full.residuals)  # it does change the arithmetic
    assert next(model.parameters()).dtype == torch.float32  # the model itself is not cast
    assert "opt_dtype" not in default_config("llama").objective  # older checkpoints resume
    assert config.objective["opt_dtype"] == "bfloat16"
    with pytest.raises(NKVError, match="opt_dtype must be one of"):
        default_config("llama", opt_dtype="int4")


def test_under_opt_dtype_a_fact_stops_only_when_its_own_dtype_agrees(monkeypatch):
    """bf16 rounding can pass the margin rule where float32 does not: the stop is confirmed
    in the model's dtype (one forward of the stopping facts), batched and one at a time."""
    from nkv.editing.solve import reference, residuals

    real = residuals.fact_losses

    def optimistic_in_bf16(*args, **kwargs):  # bf16 claims every fact done; float32 tells the truth
        out = real(*args, **kwargs)
        if kwargs.get("compute_dtype", args[7] if len(args) > 7 else None) is not None:
            out.margin = torch.full_like(out.margin, float("inf"))
        return out

    monkeypatch.setattr(residuals, "fact_losses", optimistic_in_bf16)
    monkeypatch.setattr(reference, "fact_losses", optimistic_in_bf16)
    model, tok, tokens, h0 = _setup()
    config = default_config("llama", steps=6, lr=0.3, clamp=2.0, n_prefixes=2, prefix_length=4,
                            opt_dtype="bfloat16", stop_margin=3.0)
    with frozen(model):
        batched = optimize_residuals(model, 0, tokens, h0, config, pad_id=0)
        one = reference.optimize_residuals_reference(model, 0, tokens, h0, config, pad_id=0)
    assert bool((batched.steps > 0).all())  # without the check every fact would stop at δ = 0
    assert batched.steps.tolist() == one.steps.tolist()
    torch.testing.assert_close(batched.residuals, one.residuals, atol=2e-2, rtol=2e-2)


def test_settings_added_later_leave_the_checkpoint_objective_alone_at_their_defaults():
    base = default_config("llama")  # preserve_loss has no effect without probes
    assert "rotate_prefixes" not in base.objective and "preserve_loss" not in base.objective
    assert default_config("llama", rotate_prefixes=True).objective["rotate_prefixes"] is True
    assert default_config("llama", preserve_factor=1.0).objective["preserve_loss"] == "answer"


def test_presets():
    previous, default = default_config("llama", preset="previous"), default_config("llama")
    assert (previous.steps, previous.lr, previous.stop_margin, previous.opt_prefixes) == (25, 0.2, None, None)
    assert (default.steps, default.lr, default.stop_margin, default.opt_prefixes) == (25, 0.5, 3.0, None)
    fast = default_config("llama", preset="fast")  # the default under the bare prompt and one prefix
    assert fast == default_config("llama", opt_prefixes=1)
    assert (previous.preserve_factor, default.preserve_factor, fast.preserve_factor) == (0.0, 0.0, 0.0)  # opt-in
    toy = tm.tiny_model("llama")  # toy-sized models keep their previous optimiser settings
    assert default_config(toy) == default_config(toy, preset="previous")
    assert default_config(toy, preset="fast").opt_prefixes == 1
    with pytest.raises(NKVError, match="unknown build preset"):
        default_config("llama", preset="turbo")
    with pytest.raises(NKVError, match="stop_margin must be None or >= 0"):
        default_config("llama", stop_margin=-1.0)
