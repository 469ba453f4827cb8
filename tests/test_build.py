"""`nkv.editing.solve` on tiny random models of every architecture in the table.

Random weights give nearly flat next-token distributions, so these builds use prompts
that end at the subject (δ then acts directly on the next token) and a larger clamp:
the point is that the optimisation can force the edit through the real gate on every
architecture, not what a trained model needs (see examples/factworld for that).
"""

from __future__ import annotations

import copy
from dataclasses import replace
import functools
import warnings

import pytest
import torch
import tiny_models as tm

from nkv.adapter import NKVAdapter
from nkv.errors import NKVError, NKVFactsError, NKVUnsupportedModelError
from nkv.facts import Fact
from nkv.facts_io import FactInput
from nkv.loaders.architectures import ARCHITECTURES
from nkv.editing.solve import (BuildConfig, build_adapter, default_config, default_layer, encode_facts,
                               generate_prefixes, optimize_residuals, optimize_residuals_reference)
from nkv.editing.forward import frozen
from nkv.editing.scoring import score_pairs
from nkv.editing.solve.keys import compute_keys
from nkv.loaders.transformers import attach

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FACTS = [
    Fact("dd", "Danielle Darrieux", "The mother tongue of Danielle Darrieux", "English", "French"),
    Fact("ty", "Toko Yasuda", "The guitar of Toko Yasuda", "piano", "guitar"),
    Fact("cb", "Carl Bosch", "Which language does Carl Bosch", "Tokyo"),
]




@functools.lru_cache(maxsize=None)
def _config(model_type: str, **extra) -> BuildConfig:
    return default_config(model_type, steps=12, lr=0.2, clamp=2.0, n_prefixes=2, prefix_length=4, **extra)


def _first_token_hits(model, tok, facts) -> list[bool]:
    return [s.first_token_hit for s in score_pairs(model, tok, [(f.prompt, f.target_new) for f in facts])]


def test_every_architecture_in_the_table_is_covered():
    assert set(ARCHITECTURES) == set(tm.MODEL_TYPES)  # every row of the table is built and edited


@pytest.mark.parametrize("model_type", tm.MODEL_TYPES)
def test_build_and_the_edit_takes_through_the_gate(model_type):
    model, tok = tm.tiny_model(model_type), tm.tiny_tokenizer()
    assert not any(_first_token_hits(model, tok, FACTS))
    adapter = build_adapter(model, tok, FACTS, config=_config(model_type), progress=False)

    assert adapter.n_facts == 3 and adapter.ids == ["dd", "ty", "cb"]
    # No layer is verified for these 64-wide models, so the build chose one by a sweep.
    assert adapter.build["layer_choice"]["mode"] == "auto" and adapter.base.model_type == model_type
    assert adapter.build["layer_choice"]["why"] == "no verified default for this depth and width"
    assert adapter.build["self_check"]["n_checked"] == 3
    assert adapter.target_module == ARCHITECTURES[model_type].module_path(adapter.layer)
    assert adapter.keys.dtype == torch.float32 and torch.isfinite(adapter.residuals).all()
    assert adapter.build["config"]["steps"] == 12 and adapter.build["seed"] == 0
    assert adapter.build["config"]["batch_size"] == 16  # left open: the CPU default, recorded resolved
    assert len(adapter.build["templates"]) == 3 and adapter.build["templates"][0] == "{}"
    assert all(p.requires_grad for p in model.parameters())  # build left the model as it was

    pairs = [(f.prompt, f.target_new) for f in FACTS]
    before = [-s.nll for s in score_pairs(model, tok, pairs)]
    handle = attach(model, adapter)
    try:
        if model_type in {"olmo2", "olmo3"}:
            after = [-s.nll for s in score_pairs(model, tok, pairs)]
            assert all(a > b + 0.05 for a, b in zip(after, before)), (before, after)
        else:
            assert _first_token_hits(model, tok, FACTS) == [True, True, True]
    finally:
        handle.detach()


# OLMo 2/3 and Gemma 2/3 normalise the FFN output before adding it to the residual stream.
# On OLMo that lets one layer's residual move a random model's flat logits only a little
# (measured: loss 5.69 -> 5.50 at most, not enough to flip every argmax), so there the test
# asks that the edit raises every target's log-prob through the gate.
POST_NORM_FFN = {"olmo2", "olmo3", "gemma2", "gemma3", "gemma3_text"}


def _tokens_and_h0(model, tok, facts, layer=0):
    prefixes = generate_prefixes(model, tok, 2, 4, seed=0)
    tokens = encode_facts(tok, facts, prefixes)
    _, h0 = compute_keys(model, layer, tokens, pad_id=0)
    return tokens, h0


def test_batched_equals_one_fact_at_a_time_reference():
    model, tok = tm.tiny_model("llama"), tm.tiny_tokenizer()
    facts = FACTS + [Fact("et", "Eiffel Tower", "The Eiffel Tower is in", "Rome")]
    # An early-stop threshold some facts reach and others do not: stopped rows must not
    # disturb the rows still optimising.
    config = _config("llama", early_stop_loss=5.55)
    with frozen(model):
        tokens, h0 = _tokens_and_h0(model, tok, facts)
        batched = optimize_residuals(model, 0, tokens, h0, config, pad_id=0)
        reference = optimize_residuals_reference(model, 0, tokens, h0, config, pad_id=0)
    assert batched.steps.tolist() == reference.steps.tolist()
    assert len(set(batched.steps.tolist())) > 1  # some stopped early, some did not
    torch.testing.assert_close(batched.residuals, reference.residuals, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched.loss, reference.loss.to(batched.loss.dtype), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("model_type", tm.MODEL_TYPES)
def test_prefix_cache_buckets_and_replay_match_whole_sequences(model_type, layer, monkeypatch):
    """The batched path runs only the tokens from the subject on, over a cache of the rest
    (built in two stages: the prefixes' shared starts, then each row's own tokens), in
    length buckets, replaying blocks 0..layer; the reference runs whole sequences
    through every block. Same numbers on every family."""
    from nkv.editing.solve import batch

    monkeypatch.setitem(batch.FORWARD_COST_IN_TOKENS, "cpu", 0)  # force several buckets
    model, tok = tm.tiny_model(model_type), tm.tiny_tokenizer()
    facts = FACTS + [Fact("t1", "The", "The guitar is made of", "wood"),  # one-token subject first: no prefix
                     Fact("lg", "Berlin", "In Europe, Berlin, Rome, Madrid, London and Vienna are", "towns")]
    config = default_config(model_type, steps=4, lr=0.2, clamp=2.0, n_prefixes=2, prefix_length=4)
    with frozen(model), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens, h0 = _tokens_and_h0(model, tok, facts, layer)
        split = batch.FactBatch(tokens, 0, torch.device("cpu"))
        assert min(split.pre_len) == 0 and len(split.select(list(range(len(facts))))) > 1
        assert len(split.shared_ids) == 2  # each context prefix's common start runs once, shared
        batched = optimize_residuals(model, layer, tokens, h0, config, pad_id=0)
        reference = optimize_residuals_reference(model, layer, tokens, h0, config, pad_id=0)
    fell_back = any("replaying layer" in str(w.message) for w in caught)
    # Replay adds δ to the block's output. Families with a post-FFN norm get their rows
    # after it (residual site "out_norm"), so replay holds on every family and is used.
    assert not fell_back, [str(w.message) for w in caught]
    if model_type in FLAT_GRADIENT_AT_LAST_LAYER and layer == 1:
        # Adam's first step is lr·sign(g): where a norm makes a gradient component ~0, float
        # rounding picks its sign, so single coordinates differ by one step while the
        # objective agrees. Compare the loss and each residual's direction, except "lg":
        # at the last layer δ reaches only its own position, so a fact whose answer does
        # not follow the subject has no NLL gradient at all and its update is rounding noise.
        torch.testing.assert_close(batched.loss, reference.loss.to(batched.loss.dtype), atol=1e-4, rtol=1e-4)
        cos = torch.nn.functional.cosine_similarity(batched.residuals, reference.residuals, dim=-1)
        assert bool((cos[:4] > 0.99).all()), cos
        return
    torch.testing.assert_close(batched.loss, reference.loss.to(batched.loss.dtype), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(batched.residuals, reference.residuals, atol=1e-5, rtol=1e-4)


FLAT_GRADIENT_AT_LAST_LAYER = {"olmo2", "olmo3", "gemma3", "gemma3_text", "granite"}


def test_a_replay_that_disagrees_falls_back_to_all_layers(monkeypatch):
    from nkv.editing.solve import batch

    real = batch.FactBatch.record_layer

    def corrupted(self, model, layer):
        real(self, model, layer)
        self.layer_out = self.layer_out + 1.0  # as if a model's loop did something the stand-ins miss

    monkeypatch.setattr(batch.FactBatch, "record_layer", corrupted)
    model, tok = tm.tiny_model("llama"), tm.tiny_tokenizer()
    config = default_config("llama", steps=3, lr=0.2, n_prefixes=1, prefix_length=3)
    with frozen(model):
        tokens, h0 = _tokens_and_h0(model, tok, FACTS)
        with pytest.warns(UserWarning, match="running all layers"):
            batched = optimize_residuals(model, 0, tokens, h0, config, pad_id=0)
        reference = optimize_residuals_reference(model, 0, tokens, h0, config, pad_id=0)
    torch.testing.assert_close(batched.residuals, reference.residuals, atol=1e-5, rtol=1e-4)


def test_clamp_bounds_every_residual():
    model, tok = tm.tiny_model("gpt2"), tm.tiny_tokenizer()
    config = default_config("gpt2", steps=15, lr=0.5, clamp=0.3, n_prefixes=1, prefix_length=3)
    with frozen(model):
        tokens, h0 = _tokens_and_h0(model, tok, FACTS, layer=1)
        result = optimize_residuals(model, 1, tokens, h0, config, pad_id=0)
    ratio = result.residuals.norm(dim=-1) / h0.norm(dim=-1)
    assert (ratio <= 0.3 + 1e-5).all() and (ratio > 0.29).any()


def test_same_inputs_and_seed_give_the_same_file(tmp_path):
    tok = tm.tiny_tokenizer()
    a = build_adapter(tm.tiny_model("qwen2"), tok, FACTS, config=_config("qwen2"), progress=False)
    b = build_adapter(tm.tiny_model("qwen2"), tok, FACTS, config=_config("qwen2"), progress=False)
    assert a.to_bytes() == b.to_bytes()
    c = build_adapter(tm.tiny_model("qwen2"), tok, FACTS, config=_config("qwen2", seed=1), progress=False)
    assert c.build["templates"] != a.build["templates"]


def test_bfloat16_build():
    model, tok = tm.tiny_model("llama"), tm.tiny_tokenizer()
    adapter = build_adapter(model, tok, FACTS[:2], config=_config("llama", dtype="bfloat16"), progress=False)
    assert model.dtype == torch.bfloat16  # cast in place, as documented
    assert adapter.keys.dtype == adapter.residuals.dtype == torch.bfloat16
    assert adapter.build["config"]["dtype"] == "bfloat16"
    NKVAdapter.from_bytes(adapter.to_bytes())  # valid file


def test_resume_after_an_interrupt_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    from nkv.editing.solve import rows

    model, tok = tm.tiny_model("gpt2"), tm.tiny_tokenizer()
    config = _config("gpt2", batch_size=2)
    full = build_adapter(model, tok, FACTS, config=config, layer=0, progress=False)

    calls = {"n": 0}
    real = rows.optimize_residuals

    def dies_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rows, "optimize_residuals", dies_on_second_batch)
    ckpt = tmp_path / "edits.nkv.partial"
    with pytest.raises(KeyboardInterrupt):
        build_adapter(model, tok, FACTS, config=config, layer=0, progress=False, checkpoint_dir=ckpt)
    assert len(list(ckpt.glob("rows-*.safetensors"))) == 1  # the first batch survived

    with pytest.raises(NKVError, match="interrupted build"):
        build_adapter(model, tok, FACTS, config=config, layer=0, progress=False, checkpoint_dir=ckpt)
    with pytest.raises(NKVError, match="different build"):
        build_adapter(model, tok, FACTS[:2], config=config, layer=0, progress=False, checkpoint_dir=ckpt, resume=True)

    resumed = build_adapter(model, tok, FACTS, config=config, layer=0, progress=False, checkpoint_dir=ckpt, resume=True)
    assert calls["n"] == 3  # only the missing batch was computed
    assert resumed.to_bytes() == full.to_bytes()


def test_layer_auto_sweeps_and_records_the_scores():
    model, tok = tm.tiny_model("gpt_neox"), tm.tiny_tokenizer()
    adapter = build_adapter(model, tok, FACTS[:2], layer="auto", config=_config("gpt_neox"), progress=False)
    choice = adapter.build["layer_choice"]
    assert choice["mode"] == "auto" and set(choice["scores"]) == {"0", "1"}
    assert adapter.layer == max((0, 1), key=lambda l: (choice["scores"][str(l)]["score"], -abs(l - default_layer(model))))
    assert all(0 <= s[k] <= 1 for s in choice["scores"].values() for k in ("E", "G", "S"))


def test_layer_given_and_invalid():
    model, tok = tm.tiny_model("opt"), tm.tiny_tokenizer()
    assert build_adapter(model, tok, FACTS[:1], layer=1, config=_config("opt"), progress=False).layer == 1
    with pytest.raises(NKVError, match="layer 5 does not exist: the model has 2 layers"):
        build_adapter(model, tok, FACTS[:1], layer=5, config=_config("opt"), progress=False)


def test_bad_fact_lists_fail_before_any_work():
    model, tok = tm.tiny_model("llama"), tm.tiny_tokenizer()
    with pytest.raises(NKVFactsError, match="duplicate fact id 'dd'"):
        build_adapter(model, tok, [FACTS[0], FACTS[0]], progress=False)
    with pytest.raises(NKVFactsError, match="no facts"):
        build_adapter(model, tok, [], progress=False)
    with pytest.raises(NKVError, match=r"gamma must be a number in \[0, 1\].*nan"):
        build_adapter(model, tok, [FACTS[0]], gamma=float("nan"), progress=False)
    with pytest.raises(NKVError, match="BuildConfig.device 'tpu': not a device"):
        build_adapter(model, tok, [FACTS[0]], config=BuildConfig(device="tpu"), progress=False)


def test_config_validation_and_defaults():
    with pytest.raises(NKVError, match="steps must be >= 1"):
        BuildConfig(steps=0)
    with pytest.raises(NKVError, match="dtype must be one of"):
        BuildConfig(dtype="float8")
    for name, value in [("lr", float("nan")), ("clamp", float("inf")), ("kl_factor", float("nan")),
                        ("weight_decay", float("inf"))]:  # NaN passes a plain `< 0` check
        with pytest.raises(NKVError, match=f"{name} must be a finite number"):
            BuildConfig(**{name: value})
    with pytest.raises(NKVError, match="unknown build option"):
        default_config("llama", stepz=3)
    with pytest.raises(NKVUnsupportedModelError, match="supported: .*gpt2.*llama"):
        default_config("t5")
    previous = {m: default_config(m, preset="previous").steps for m in ("gpt2", "llama")}
    assert previous == {"gpt2": 20, "llama": 25}  # the build before issue 11 (tests/test_build_speed.py)
    assert default_config("llama").clamp == 0.75  # MEMIT's value for full-size models
    toy = default_config(tm.tiny_model("gpt2"), steps=3)  # d_model 64: the toy-size defaults
    assert (toy.clamp, toy.lr, toy.steps) == (2.0, 0.3, 3)
    big = copy.deepcopy(tm._configs()["llama"])
    big.num_hidden_layers = 32
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        assert default_layer(AutoModelForCausalLM.from_config(big)) == 7  # the paper's Llama-3-8B layer


@pytest.mark.parametrize("model_type", ["qwen3_moe", "olmoe", "gpt_oss", "mixtral"])
def test_mixture_of_experts_families_are_refused_with_the_reason(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    from nkv.errors import NKVUnsupportedModelError

    config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                                  num_experts=4, num_local_experts=4, num_experts_per_tok=2, vocab_size=300,
                                  max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(NKVUnsupportedModelError, match="mixture-of-experts.*wrap the whole MoE block"):
        build_adapter(model, tm.tiny_tokenizer(), FACTS, config=default_config("llama", steps=1), progress=False)


def test_a_verified_layer_is_used_without_a_sweep(monkeypatch):
    from nkv.editing.solve import api, config as solve_config

    model, tok = tm.tiny_model("llama"), tm.tiny_tokenizer()
    monkeypatch.setitem(solve_config.VERIFIED_LAYERS, ("llama", 2, 64), (1, "a test"))
    monkeypatch.setattr(api, "choose_layer", lambda *a, **k: pytest.fail("no sweep for a verified layer"))
    adapter = build_adapter(model, tok, FACTS[:1], config=_config("llama"), progress=False)
    assert adapter.layer == 1 and adapter.build["layer_choice"] == {"mode": "default", "verified_on": "a test"}
    # Row operations change what the self-check measured, so they drop it.
    assert "self_check" in adapter.build and "self_check" not in adapter.remove(ids=["dd"]).build


def test_probes_leave_out_what_an_edit_asks_and_batched_equals_reference():
    """The subject's other relations (preserve.py): a probe that asks the edited question (its
    prompt, a paraphrase, or the same unedited answer), whose answer does not depend on the
    subject, or that the model answers without confidence is dropped; the most confident
    rest with different answers are held by a KL term, batched exactly as one fact at a time."""
    from nkv.editing.scoring import next_token_top1
    from nkv.editing.solve import choose_probes
    from nkv.editing.solve.preserve import NULL_SUBJECT, data_templates

    model, tok = tm.tiny_model("llama"), tm.tiny_tokenizer()
    facts = [FactInput(Fact("ty", "Toko Yasuda", "Toko Yasuda plays the", "piano", "guitar"),
                       paraphrases=["Toko Yasuda works as a"]),  # a paraphrase is an edited question too
             Fact("ty2", "Toko Yasuda", "Toko Yasuda lives in", "Peru"),  # a second edit of one subject
             Fact("cb", "Carl Bosch", "The mother tongue of Carl Bosch is", "Tokyo")]
    plain = [f.fact if isinstance(f, FactInput) else f for f in facts]
    templates = ("{} plays the", "{} lives in", "{} was born in", "{} works as a", "{} speaks")
    shapes = ["{} plays the", "{} lives in", "The mother tongue of {} is"]  # the facts' own prompts first
    assert data_templates(plain) == shapes
    everything = shapes + [t for t in templates if t not in shapes]
    with frozen(model):
        texts = [t.replace("{}", s) for s in ("Toko Yasuda", "Carl Bosch", NULL_SUBJECT) for t in everything]
        texts += [f.prompt for f in plain] + ["Toko Yasuda works as a"]
        top = dict(zip(texts, next_token_top1(model, tok, texts)))
        for min_confidence in (0.0, sorted(p for _, p in top.values())[len(top) // 2]):  # none, and half of them
            probes = choose_probes(model, tok, facts, templates, max_probes=3, min_confidence=min_confidence)
            asked = {"Toko Yasuda": {plain[0].prompt, plain[1].prompt, "Toko Yasuda works as a"},
                     "Carl Bosch": {plain[2].prompt}}
            for f, held in zip(plain, probes):
                edited = {top[t][0] for t in asked[f.subject]}
                own = set(tok(f.subject, add_special_tokens=False)["input_ids"]) | set(
                    tok(" " + f.subject, add_special_tokens=False)["input_ids"])
                want = [t.replace("{}", f.subject) for t in everything]
                want = [p for p, t in zip(want, everything) if p not in asked[f.subject]
                        and top[p][1] >= min_confidence
                        and top[p][0] not in edited | own | {top[t.replace("{}", NULL_SUBJECT)][0]}]
                ranked, answers = sorted(want, key=lambda p: -top[p][1]), set()
                want = [p for p in ranked if not (top[p][0] in answers or answers.add(top[p][0]))][:3]
                assert held == want
            assert not {"Toko Yasuda plays the", "Toko Yasuda works as a"} & set(probes[0] + probes[1])
            assert probes[0] == probes[1]  # per subject
        assert len(probes[0]) <= 3
    probes = choose_probes(model, tok, facts, templates, min_confidence=0.0)
    assert probes[2]  # something is held for Carl Bosch

    config = _config("llama", early_stop_loss=5.4, preserve_factor=1.0)
    with frozen(model):
        tokens = encode_facts(tok, plain, generate_prefixes(model, tok, 2, 4, seed=0), probes)
        _, h0 = compute_keys(model, 0, tokens, pad_id=0)
        batched = optimize_residuals(model, 0, tokens, h0, config, pad_id=0)
        reference = optimize_residuals_reference(model, 0, tokens, h0, config, pad_id=0)
        unheld = optimize_residuals(model, 0, tokens, h0, replace(config, preserve_factor=0.0), pad_id=0)
    assert batched.steps.tolist() == reference.steps.tolist()
    torch.testing.assert_close(batched.residuals, reference.residuals, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched.loss, reference.loss.to(batched.loss.dtype), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched.residuals, unheld.residuals)  # the probes are in the objective
    assert config.preserve_loss == "answer"  # the default: only the probes' unedited top answers are held
    whole = replace(config, preserve_loss="kl")  # the whole next-token distribution
    with frozen(model):
        batched_k = optimize_residuals(model, 0, tokens, h0, whole, pad_id=0)
        reference_k = optimize_residuals_reference(model, 0, tokens, h0, whole, pad_id=0)
    torch.testing.assert_close(batched_k.residuals, reference_k.residuals, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batched_k.residuals, batched.residuals)  # a different objective
    with pytest.raises(NKVError, match="preserve_loss must be one of"):
        replace(config, preserve_loss="l2")


def test_facts_of_one_subject_share_one_residual_solved_jointly_batched_as_the_reference():
    """A subject's facts get nearly equal keys (read at the subject, before the relation), so the
    build solves them together: each keeps its own key, one δ over all their prompts is every
    one's residual, and their records say with whom. Batched = one item at a time."""
    from nkv.editing.solve import compute_rows
    from nkv.editing.solve.prompts import joined
    from nkv.editing.solve.rows import subject_groups

    model, tok = tm.tiny_model("llama"), tm.tiny_tokenizer()
    # Prompts that start with the subject: the key texts, and so the keys, are the same
    facts = [Fact("a", "Toko Yasuda", "Toko Yasuda plays the", "piano"),
             Fact("cb", "Carl Bosch", "Which language does Carl Bosch", "Tokyo"),
             Fact("b", "Toko Yasuda", "Toko Yasuda lives in", "Peru")]
    assert subject_groups(facts) == [[0, 2], [1]]
    adapter = build_adapter(model, tok, facts, layer=0, config=_config("llama"), progress=False)
    assert adapter.ids == ["a", "cb", "b"]
    assert adapter.facts[0].provenance["solved_with"] == ["b"] and adapter.facts[2].provenance["solved_with"] == ["a"]
    assert "solved_with" not in adapter.facts[1].provenance
    torch.testing.assert_close(adapter.residuals[0], adapter.residuals[2])  # one δ in both rows
    torch.testing.assert_close(adapter.keys[0], adapter.keys[2])  # the gate cannot tell them apart
    assert not torch.equal(adapter.residuals[0], adapter.residuals[1])
    alone = build_adapter(model, tok, facts, layer=0, config=_config("llama", joint_subjects=False), progress=False)
    assert "solved_with" not in alone.facts[0].provenance
    assert not torch.allclose(alone.residuals[0], alone.residuals[2])
    torch.testing.assert_close(alone.keys, adapter.keys)  # keys do not depend on the grouping

    config = _config("llama", early_stop_loss=5.5)
    with frozen(model):
        tokens, h0 = _tokens_and_h0(model, tok, facts)
        items = [joined([tokens[0], tokens[2]]), tokens[1]]
        assert items[0].members == 2 and items[0].n_templates == 3 and len(items[0].rewrites) == 6
        norms = h0.norm(dim=-1)  # a group's δ is scaled by the mean of its members' ||h0||
        item_h0 = torch.stack([h0[0] * (norms[0] + norms[2]) / 2 / norms[0], h0[1]])
        batched = optimize_residuals(model, 0, items, item_h0, config, pad_id=0)
        reference = optimize_residuals_reference(model, 0, items, item_h0, config, pad_id=0)
        rows = compute_rows(model, tok, tokens, 0, config, groups=[[0, 2], [1]])
    assert batched.steps.tolist() == reference.steps.tolist()
    torch.testing.assert_close(batched.residuals, reference.residuals, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rows["residuals"][[0, 1, 2]], batched.residuals[[0, 1, 0]])
    # A group's loss is the mean of its members' (each a template mean), so one fact alone is
    # the same item whether or not others are grouped.
    with frozen(model):
        single = optimize_residuals(model, 0, [tokens[1]], h0[[1]], config, pad_id=0)
    torch.testing.assert_close(single.residuals[0], batched.residuals[1], atol=1e-5, rtol=1e-4)


def test_joint_groups_join_only_rows_the_gate_cannot_tell_apart(monkeypatch):
    """Facts of one subject are solved together when, on a key text of one, the other's key
    scores at least as high as its own; apart when their keys are told apart (two rewordings
    of one question with different answers stay two rows)."""
    from nkv.editing.solve import rows

    facts = [Fact("a", "S", "S one", "x"), Fact("b", "S", "S two", "y"), Fact("c", "T", "T one", "z"),
             Fact("d", "T", "T two", "w"), Fact("e", "T", "T three", "v"), Fact("f", "U", "U one", "u")]
    e = torch.eye(8)
    # per fact: its key texts' inputs (2 templates); the key is their average (½ bare + ½ the other)
    inputs = {"a": [e[0], e[0]], "b": [e[1], e[1]],  # S: orthogonal keys, apart
              "c": [e[2], e[2]], "d": [e[3], e[3]],  # T: c and d apart, but ...
              "e": [e[4], e[3] + 0.5 * e[4]]}  # ... e's prefixed text is closer to d's key than to its own
    tokens = [f.id for f in facts]

    def fake_inputs(model, layer, facts_tokens, pad_id, max_seqs=256):
        k = torch.stack([torch.stack(inputs[t]) for t in facts_tokens])
        return k, torch.zeros(len(facts_tokens), 2, 4)

    monkeypatch.setattr(rows, "template_inputs", fake_inputs)
    monkeypatch.setattr(rows, "pad_id_of", lambda tok: 0)
    assert rows.joint_groups(None, None, tokens, facts, 0) == [[0], [1], [2], [3, 4], [5]]
    inputs["b"] = [e[0], e[0]]  # S's two keys equal: together
    assert rows.joint_groups(None, None, tokens, facts, 0) == [[0, 1], [2], [3, 4], [5]]


def test_the_batch_size_left_open_is_the_devices_default() -> None:
    from nkv.editing.solve.config import ACCELERATOR_BATCH, CPU_BATCH, batch_size_on

    config = default_config("llama")
    assert config.batch_size is None
    assert batch_size_on(config, torch.device("cpu")) == CPU_BATCH == 16
    assert batch_size_on(config, torch.device("cuda", 0)) == ACCELERATOR_BATCH == 64
    assert batch_size_on(replace(config, batch_size=5), torch.device("cpu")) == 5
    with pytest.raises(NKVError, match="batch_size must be >= 1"):
        replace(config, batch_size=0)

