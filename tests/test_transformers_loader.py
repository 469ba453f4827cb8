"""The transformers loader: attach, gate behaviour, detach, dtype, fingerprint, errors."""

from __future__ import annotations

import warnings

import pytest
import torch

from handmade import capture_keys, first_token, forcing_adapter
from tiny_models import MODEL_TYPES, tiny_model, tiny_tokenizer

import nkv
from nkv import NKVAdapter, NKVCompatibilityError, NKVFingerprintError, load_nkv_adapter, nkv_gate
from nkv.gate import key_inverse_norms
from nkv.loaders.architectures import residual_module
from nkv.loaders.transformers import NKVLinear, NKVOutNorm

EDITED = ["The Eiffel Tower is located in", "Danielle Darrieux speaks"]
TARGETS = ["Rome", "German"]
UNRELATED = "Toko Yasuda plays the guitar and works as"


def next_token(model, tok, prompt: str) -> int:
    with torch.no_grad():
        return int(model(**tok(prompt, return_tensors="pt")).logits[0, -1].argmax())


def logits(model, tok, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tok(prompt, return_tensors="pt")).logits


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_attach_edits_and_leaves_unrelated_text_alone(model_type):
    model, tok = tiny_model(model_type), tiny_tokenizer()
    adapter = forcing_adapter(model, tok, EDITED, TARGETS)
    before_unrelated = logits(model, tok, UNRELATED)

    handle = load_nkv_adapter(model, adapter)
    for prompt, target in zip(EDITED, TARGETS):
        assert next_token(model, tok, prompt) == first_token(tok, target)
    with handle.record() as activity:
        after_unrelated = logits(model, tok, UNRELATED)
    assert activity.fired == 0
    assert torch.equal(after_unrelated, before_unrelated)  # exactly: the gate did not fire

    handle.detach()
    assert not any(isinstance(m, (NKVLinear, NKVOutNorm)) for m in model.modules())
    assert torch.equal(logits(model, tok, UNRELATED), before_unrelated)


@pytest.mark.parametrize("site", ["out_norm", "output"])
def test_rows_are_added_at_the_adapters_residual_site(site):
    """Gemma 3 normalises the FFN output: a 2.0 adapter's row is added after that norm, a 1.x
    one's (site "output", built before 2.0) to the projection's output, as each was built."""
    import dataclasses

    model, tok = tiny_model("gemma3_text"), tiny_tokenizer()
    adapter = dataclasses.replace(forcing_adapter(model, tok, EDITED, TARGETS, scale=3.0), residual_site=site)
    assert forcing_adapter(model, tok, EDITED, TARGETS).residual_site == "out_norm"  # what a build writes here
    layer = adapter.layer
    where = residual_module(model, layer) if site == "out_norm" else model.model.layers[layer].mlp.down_proj
    ids = tok(EDITED[0], return_tensors="pt")

    def add_row(module, args, out):  # the reference: row 0 at the prompt's last token, nowhere else
        out = out.clone()
        out[0, -1] += adapter.residuals[0]
        return out

    hook = where.register_forward_hook(add_row)
    with torch.no_grad():
        expected = model(**ids).logits
    hook.remove()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = load_nkv_adapter(model, adapter)
    assert any("rebuild it" in str(w.message) for w in caught) == (site == "output")
    assert isinstance(residual_module(model, layer), NKVOutNorm) == (site == "out_norm")
    with handle.record() as activity, torch.no_grad():
        got = model(**ids).logits
    assert activity.fired == 1
    torch.testing.assert_close(got, expected)


def test_detach_restores_bit_identical_outputs_and_disabled_context():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    adapter = forcing_adapter(model, tok, EDITED, TARGETS)
    base = logits(model, tok, EDITED[0])
    handle = load_nkv_adapter(model, adapter)
    assert not torch.equal(logits(model, tok, EDITED[0]), base)
    with handle.disabled():
        assert torch.equal(logits(model, tok, EDITED[0]), base)
    assert not torch.equal(logits(model, tok, EDITED[0]), base)
    handle.detach()
    assert torch.equal(logits(model, tok, EDITED[0]), base)


def test_parity_with_reference_op_on_captured_activations():
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    adapter = forcing_adapter(model, tok, EDITED, TARGETS)
    handle = load_nkv_adapter(model, adapter)
    captured = {}
    base_layer = handle.module.base_layer
    h1 = base_layer.register_forward_pre_hook(lambda m, a: captured.__setitem__("k", a[0].detach().clone()))
    h2 = handle.module.register_forward_hook(lambda m, a, out: captured.__setitem__("out", out.detach().clone()))
    model(**tok(EDITED[0] + " and more words", return_tensors="pt"))
    h1.remove(), h2.remove()
    k = captured["k"]
    # reference: brute-force cosine, argmax, threshold, gather
    cos = torch.nn.functional.cosine_similarity(k.unsqueeze(-2), adapter.keys.unsqueeze(0).unsqueeze(0), dim=-1)
    best, idx = cos.max(-1)
    expected = base_layer(k) + adapter.residuals[idx] * (best > adapter.gamma).unsqueeze(-1)
    assert torch.allclose(captured["out"], expected, atol=1e-5)
    assert bool((best > adapter.gamma).any())


def test_generate_with_kv_cache_and_padded_batch_match_unbatched():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    tok.padding_side = "left"
    adapter = forcing_adapter(model, tok, EDITED, TARGETS)
    load_nkv_adapter(model, adapter)
    prompts = [EDITED[0], UNRELATED, EDITED[1]]
    singles = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        singles.append(until_eos(out[0, ids["input_ids"].shape[1]:].tolist(), tok))
    batch = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    batched = [until_eos(row, tok) for row in out[:, batch["input_ids"].shape[1]:].tolist()]
    assert batched == singles
    assert singles[0][0] == first_token(tok, TARGETS[0])


def until_eos(tokens: list[int], tok) -> list[int]:
    return tokens[: tokens.index(tok.eos_token_id) + 1] if tok.eos_token_id in tokens else tokens


def test_gate_runs_on_every_decoded_token():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    adapter = forcing_adapter(model, tok, EDITED, TARGETS)
    handle = load_nkv_adapter(model, adapter)
    ids = tok(EDITED[0], return_tensors="pt")
    with handle.record() as activity:
        out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    n_prompt = ids["input_ids"].shape[1]
    n_new = out.shape[1] - n_prompt
    assert n_new >= 2
    assert activity.tokens == n_prompt + n_new - 1  # prefill + one forward per further token (KV cache)
    assert activity.per_fact["f0"] >= 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_follows_model_and_fingerprint_survives_dtype(dtype):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    adapter = forcing_adapter(model, tok, EDITED, TARGETS)
    low = tiny_model("llama", dtype=dtype)  # same seed: same checkpoint, other dtype
    handle = load_nkv_adapter(low, adapter)
    assert handle.module.nkv_keys.dtype == dtype and handle.module.nkv_residuals.dtype == dtype
    assert next_token(low, tok, EDITED[0]) == first_token(tok, TARGETS[0])


def test_fingerprint_mismatch_raises_or_warns():
    model, tok = tiny_model("llama", seed=0), tiny_tokenizer()
    adapter = forcing_adapter(model, tok, EDITED, TARGETS)
    other = tiny_model("llama", seed=1)
    with pytest.raises(NKVFingerprintError, match="expected nkvfp2:.*got nkvfp2:.*the input embedding differs"):
        load_nkv_adapter(other, adapter)
    with pytest.warns(UserWarning, match="not the checkpoint"):
        handle = load_nkv_adapter(other, adapter, strict=False)
    handle.detach()


def test_wrong_model_shape_and_double_attach_are_clear_errors():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    adapter = forcing_adapter(model, tok, EDITED, TARGETS)
    with pytest.raises(NKVCompatibilityError, match="model_type 'llama'"):
        load_nkv_adapter(tiny_model("qwen2"), adapter)
    load_nkv_adapter(model, adapter)
    with pytest.raises(NKVCompatibilityError, match="already attached"):
        load_nkv_adapter(model, adapter)


def test_load_from_path_and_unknown_target(tmp_path):
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    path = forcing_adapter(model, tok, EDITED, TARGETS).save(tmp_path / "edits.nkv")
    handle = nkv.load_nkv_adapter(model, str(path))
    assert handle.info["n_facts"] == 2 and handle.facts[0].target_new == "Rome"
    with pytest.raises(nkv.NKVError, match="supported runtimes"):
        load_nkv_adapter(object(), path)


def test_row_chunking_matches_one_block(monkeypatch):
    import nkv.loaders.transformers as tl

    model, tok = tiny_model("llama"), tiny_tokenizer()
    adapter = forcing_adapter(model, tok, EDITED, TARGETS)
    handle = load_nkv_adapter(model, adapter)
    x = torch.randn(3, 7, handle.module.nkv_keys.shape[1])
    x[1, 2] = adapter.keys[0]
    whole = handle.module.gate(x)
    monkeypatch.setattr(tl, "SCORE_BUDGET", 2)  # one row per block
    blocked = handle.module.gate(x)
    assert torch.equal(whole.index, blocked.index) and torch.equal(whole.fired, blocked.fired)
    assert torch.allclose(whole.score, blocked.score, atol=1e-6)  # matmul blocking: last-ulp noise
    assert torch.allclose(whole.delta, blocked.delta)
    assert bool(whole.fired[1, 2])


# ------------------------------------------------------------------ quantized models and gamma (issue 14)
class Int8Linear(torch.nn.Module):
    """Looks like bitsandbytes' Linear8bitLt: an int8 `weight` (plus scales), no float weight."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight = torch.nn.Parameter(linear.weight.detach().mul(127).round().to(torch.int8), requires_grad=False)
        self.register_buffer("SCB", linear.weight.detach().abs().amax(1))


class PackedLinear(torch.nn.Module):
    """Looks like a GPTQ/AWQ QuantLinear: packed int32 `qweight`, scales, zeros; no `weight`."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        out_features, in_features = linear.weight.shape
        self.register_buffer("qweight", torch.zeros(in_features // 8, out_features, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(1, out_features, dtype=torch.float16))


@pytest.mark.parametrize("kind, method", [(Int8Linear, "bitsandbytes"), (PackedLinear, "gptq"), (PackedLinear, "awq")])
def test_quantized_projection_is_refused_by_name(kind, method):
    from nkv import NKVUnsupportedModelError
    from nkv.loaders.architectures import arch_spec

    model, tok = tiny_model("llama"), tiny_tokenizer()
    adapter = forcing_adapter(model, tok, EDITED, TARGETS)
    path = arch_spec("llama").module_path(adapter.layer)
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, kind(model.get_submodule(path)))
    model.config.quantization_config = {"quant_method": method, "bits": 8 if kind is Int8Linear else 4}
    with pytest.raises(NKVUnsupportedModelError, match=f"quantized \\({method}\\).*not supported"):
        load_nkv_adapter(model, adapter)


def test_quantized_checkpoint_is_refused_before_loading(tmp_path):
    import json

    from tiny_models import save_tiny

    from nkv import NKVUnsupportedModelError
    from nkv.loaders.models import load_model

    folder = save_tiny("llama", tmp_path / "gptq")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(NKVUnsupportedModelError, match="quantized \\(gptq\\)"):  # not an ImportError
        load_model(str(folder), device="cpu")


@pytest.mark.parametrize("gamma", [-1.0, 1.01, float("nan")])
def test_gamma_override_is_range_checked(gamma):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    adapter = forcing_adapter(model, tok, EDITED, TARGETS)
    with pytest.raises(nkv.NKVError, match="must be a number in \\[0, 1\\]"):
        load_nkv_adapter(model, adapter, gamma=gamma)
    handle = load_nkv_adapter(model, adapter, gamma=0.25)
    assert handle.info["gamma"] == 0.25 and float(handle.module.nkv_gamma) == 0.25


@pytest.mark.parametrize("shortlist", [0, -3, 2.5, True, "256"])
def test_shortlist_option_is_checked_before_the_model_is_touched(shortlist):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    adapter = forcing_adapter(model, tok, EDITED, TARGETS)
    with pytest.raises(nkv.NKVError, match="shortlist=...\\) must be an integer >= 1"):
        load_nkv_adapter(model, adapter, shortlist=shortlist)
    assert not any(isinstance(m, NKVLinear) for m in model.modules())


def test_shortlist_option_sets_how_many_candidates_the_sketch_path_rescores(monkeypatch):
    from nkv.loaders import transformers as tl

    model, tok = tiny_model("llama"), tiny_tokenizer()
    adapter = forcing_adapter(model, tok, EDITED, TARGETS)
    monkeypatch.setattr(tl, "SKETCH_MIN_FACTS", adapter.n_facts)  # this small adapter takes the sketch path
    seen = []
    real_gate = tl.nkv_gate
    monkeypatch.setattr(tl, "nkv_gate", lambda *a, sketch, **k: seen.append(sketch.shortlist) or real_gate(*a, sketch=sketch, **k))
    handle = load_nkv_adapter(model, adapter, shortlist=1)
    assert handle.module.shortlist == 1
    logits(model, tok, EDITED[0])
    assert seen and set(seen) == {1}
    handle.detach()
    assert load_nkv_adapter(model, adapter).module.shortlist == tl.DEFAULT_SHORTLIST
