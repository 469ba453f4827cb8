"""Several named adapters in one transformers model, chosen per batch row (issue #15).

The two adapters edit the *same* prompt to different targets, so a row routed to the
wrong adapter (or to none, or to both) gives a visibly different next token.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from handmade import first_token, forcing_adapter
from tiny_models import tiny_model, tiny_tokenizer

import nkv.loaders.transformers as tl
from nkv import NKVCompatibilityError, NKVError, load_nkv_adapter
from nkv.loaders.transformers import NKVLinear

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHARED = "The Eiffel Tower is located in"  # edited by both adapters, to different targets
ONLY_A = "Danielle Darrieux speaks"
ONLY_B = "Toko Yasuda plays the guitar and works as"
UNRELATED = "Berlin, Rome, Madrid, London and Vienna are"


def adapters(model, tok):
    """A: SHARED -> Paris, ONLY_A -> English. B: ONLY_B -> Tokyo, SHARED -> Vienna (B's row f1).

    The targets' first tokens differ (many words here start with a lone space token)."""
    a = forcing_adapter(model, tok, [SHARED, ONLY_A], ["Paris", "English"])
    b = forcing_adapter(model, tok, [ONLY_B, SHARED], ["Tokyo", "Vienna"])
    return a, b


def setup(model_type: str = "llama"):
    model, tok = tiny_model(model_type), tiny_tokenizer()
    a, b = adapters(model, tok)
    ha = load_nkv_adapter(model, a, name="a")
    hb = load_nkv_adapter(model, b, name="b")
    return model, tok, ha, hb


def batch_logits(model, tok, prompts: list[str]) -> torch.Tensor:
    """(B, vocab) next-token logits of a right-padded batch: every real token sits where it
    sits unbatched, whatever the family's position ids, so the adapters' keys match."""
    tok.padding_side = "right"
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits  # (B, T, vocab)
    last = batch["attention_mask"].sum(1) - 1  # (B,)
    return logits[torch.arange(len(prompts)), last]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])  # OPT flattens (B, T) before the FFN
def test_mixed_batch_rows_match_each_adapter_alone(model_type):
    prompts = [SHARED, SHARED, SHARED, ONLY_A, ONLY_B, UNRELATED]
    names = ["a", "b", None, "a", "b", "a"]
    model, tok, ha, hb = setup(model_type)
    with ha.using(names):
        mixed = batch_logits(model, tok, prompts)

    # references: the same batch through models that hold only one adapter (attached without a
    # name: the one-adapter path) or none
    alone = {None: tiny_model(model_type)}
    for name, adapter in (("a", ha.adapter), ("b", hb.adapter)):
        alone[name] = tiny_model(model_type)
        load_nkv_adapter(alone[name], adapter)
    refs = {name: batch_logits(m, tok, prompts) for name, m in alone.items()}
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], refs[name][row], rtol=0, atol=1e-5)

    # the routing is visible: the shared prompt continues three different ways
    expected = [first_token(tok, "Paris"), first_token(tok, "Vienna"), int(refs[None][2].argmax()),
                first_token(tok, "English"), first_token(tok, "Tokyo")]
    assert len(set(expected[:3])) == 3
    assert mixed[:5].argmax(-1).tolist() == expected
    # and each row alone in its own batch of one, under a one-name choice
    for row, (prompt, name) in enumerate(zip(prompts, names)):
        with ha.using(name):
            single = batch_logits(model, tok, [prompt])[0]
        torch.testing.assert_close(single, mixed[row], rtol=0, atol=1e-4)


def test_one_name_for_every_row_and_none_is_the_base_model():
    model, tok, ha, hb = setup()
    base = batch_logits(tiny_model("llama"), tok, [SHARED, ONLY_B])
    with ha.using(None):
        assert torch.equal(batch_logits(model, tok, [SHARED, ONLY_B]), base)
    with hb.using("b"):
        assert batch_logits(model, tok, [SHARED, ONLY_B]).argmax(-1).tolist() == [
            first_token(tok, "Vienna"), first_token(tok, "Tokyo")]


def test_several_adapters_without_a_choice_is_an_error_that_says_how_to_choose():
    model, tok, ha, hb = setup()
    with pytest.raises(NKVError, match=r"2 NKV adapters are attached at layer 1 \(a, b\) and none was chosen.*"
                                       r"handle\.using"):
        batch_logits(model, tok, [SHARED])
    with ha.disabled():  # the layer off: the base model, no choice needed
        assert torch.equal(batch_logits(model, tok, [SHARED]), batch_logits(tiny_model("llama"), tok, [SHARED]))


def test_unknown_name_lists_the_attached_ones():
    model, tok, ha, hb = setup()
    with pytest.raises(NKVError, match=r"no NKV adapter named 'zz' is attached.*attached: 'a', 'b'"):
        with ha.using(["a", "zz"]):
            pass
    with pytest.raises(NKVError, match="one name \\(or None\\) per batch row"):
        with ha.using([]):
            pass


@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_row_count_must_match_the_batch(model_type):
    model, tok, ha, hb = setup(model_type)
    with ha.using(["a", "b"]):
        with pytest.raises(NKVError, match="given 2 adapter names, one per batch row, but the batch has 3 rows"):
            batch_logits(model, tok, [SHARED, ONLY_A, ONLY_B])
        with pytest.raises(NKVError, match="batch has 1 rows"):
            batch_logits(model, tok, [SHARED])
        x = torch.randn(3, 4, ha.module.nkv_keys.shape[1])  # the layer alone checks (B, T, d_key) too
        with pytest.raises(NKVError, match="batch has 3 rows"):
            ha.module(x)


def test_generate_with_beams_needs_one_name_per_expanded_row():
    model, tok, ha, hb = setup()
    batch = tok([SHARED, SHARED], return_tensors="pt")  # no padding
    n_prompt = batch["input_ids"].shape[1]
    options = dict(max_new_tokens=2, num_beams=2, num_return_sequences=2, do_sample=False,
                   pad_token_id=tok.pad_token_id)
    with ha.using(["a", "b"]):
        with pytest.raises(NKVError, match=r"num_beams=2 or num_return_sequences=2.*for _ in range\(2\)"):
            model.generate(**batch, **options)
    names = [n for n in ["a", "b"] for _ in range(2)]
    with ha.using(names):
        out = model.generate(**batch, **options)  # (2 prompts * 2 sequences, ...)
    assert out[:, n_prompt].tolist() == [first_token(tok, t) for t in ["Paris", "Paris", "Vienna", "Vienna"]]


def test_same_name_twice_and_unnamed_at_a_held_layer_are_refused():
    model, tok, ha, hb = setup()
    a = ha.adapter
    with pytest.raises(NKVCompatibilityError, match="named 'a' is already attached \\(layer 1\\).*unload"):
        load_nkv_adapter(model, a, name="a")
    with pytest.raises(NKVCompatibilityError, match="already attached.*merge the two first.*name="):
        load_nkv_adapter(model, a)
    assert list(ha.adapters) == ["a", "b"]


def test_unnamed_adapter_is_called_default_and_can_share_its_layer_with_named_ones():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    a, b = adapters(model, tok)
    h = load_nkv_adapter(model, a)
    assert h.name == "default" and h.info["name"] == "default"
    load_nkv_adapter(model, b, name="b")
    with h.using(["default", "b"]):
        got = batch_logits(model, tok, [SHARED, SHARED]).argmax(-1).tolist()
    assert got == [first_token(tok, "Paris"), first_token(tok, "Vienna")]


def test_unload_one_name_leaves_the_other_working_and_the_last_restores_the_projection():
    model, tok, ha, hb = setup()
    base = batch_logits(tiny_model("llama"), tok, [SHARED, ONLY_B])
    module = ha.module
    ha.unload("a")
    assert ha.adapters == {"b": {"n_facts": 2, "gamma": 0.999, "layer": 1}}
    assert not ha.info["attached"] and hb.info["attached"]
    assert module.names == ["b"] and module.nkv_keys.shape[0] == 2 and module.resident("b").start == 0
    # b alone again: no choice needed, every row edited, exactly as a model holding only b
    alone = tiny_model("llama")
    load_nkv_adapter(alone, hb.adapter)
    assert torch.equal(batch_logits(model, tok, [SHARED, ONLY_B]), batch_logits(alone, tok, [SHARED, ONLY_B]))
    with pytest.raises(NKVError, match="cannot unload 'a'.*attached: 'b'"):
        hb.unload("a")
    with pytest.raises(NKVError, match="no NKV adapter named 'a'"):
        with hb.using("a"):
            pass
    hb.detach()
    assert not any(isinstance(m, NKVLinear) for m in model.modules())
    assert torch.equal(batch_logits(model, tok, [SHARED, ONLY_B]), base)
    assert ha.adapters == {}


def test_record_counts_each_adapters_own_facts():
    model, tok, ha, hb = setup()
    prompts = [SHARED, SHARED, SHARED, ONLY_B]
    with ha.record() as ra, hb.record() as rb, ha.using(["a", "b", None, "b"]):
        batch_logits(model, tok, prompts)
    n_tokens = tok(prompts, return_tensors="pt", padding=True)["input_ids"].shape[1]  # rows padded alike
    assert ra.tokens == n_tokens and rb.tokens == 2 * n_tokens
    assert ra.per_fact == Counter({"f0": 1})  # a's SHARED row
    assert rb.per_fact == Counter({"f1": 1, "f0": 1})  # b's SHARED row is its second (table row 3)
    assert ra.fired == 1 and rb.fired == 2


def test_each_adapter_keeps_its_own_sketch_and_gamma(monkeypatch):
    monkeypatch.setattr(tl, "SKETCH_MIN_FACTS", 2)  # a (2 facts) takes the sketch path, c (1 fact) stays exact
    model, tok = tiny_model("llama"), tiny_tokenizer()
    a, _ = adapters(model, tok)
    c = forcing_adapter(model, tok, [SHARED], ["Vienna"], gamma=0.99)
    ha = load_nkv_adapter(model, a, name="a")
    load_nkv_adapter(model, c, name="c", gamma=0.5)
    module = ha.module
    assert module.resident("a").shortlist == tl.DEFAULT_SHORTLIST and module.resident("c").shortlist == 0
    assert module.resident("c").sketch_keys is None and module.resident("a").sketch_keys.shape[0] == 2
    assert ha.adapters["c"]["gamma"] == 0.5 and float(module.resident("c").gamma) == 0.5
    with ha.using(["a", "c"]):
        got = batch_logits(model, tok, [SHARED, SHARED]).argmax(-1).tolist()
    assert got == [first_token(tok, "Paris"), first_token(tok, "Vienna")]


def test_adapters_at_different_layers_follow_the_same_choice():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    a, _ = adapters(model, tok)
    # layer 0: an adapter whose residual is zero but whose key fires; only its fires are seen
    from handmade import capture_keys
    from nkv import Fact, empty_adapter
    from nkv.loaders.architectures import base_model_info

    keys = capture_keys(model, tok, [SHARED], 0)
    early = empty_adapter(base_model_info(model, 0, name="tiny"), 0, "layer 0", gamma=0.999).add(
        [Fact(id="e0", subject="The", prompt=SHARED, target_new="x")], keys, torch.zeros(1, 64))
    ha = load_nkv_adapter(model, a, name="a")
    he = load_nkv_adapter(model, early, name="early")
    assert he.module is not ha.module and ha.adapters["early"]["layer"] == 0
    with ha.record() as ra, he.record() as re, ha.using(["early", "a"]):
        got = batch_logits(model, tok, [SHARED, SHARED]).argmax(-1).tolist()
    assert re.per_fact == Counter({"e0": 1}) and ra.per_fact == Counter({"f0": 1})
    assert got[1] == first_token(tok, "Paris") and got[0] != first_token(tok, "Paris")
