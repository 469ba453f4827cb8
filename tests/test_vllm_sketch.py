"""The sketch path (spec §5.1) in vLLM's gated module (issue 12), without starting an engine:
the engine-wide and the named adapters' paths against the reference gate, under simulated
tensor parallelism, compiled, and across in-place swaps.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import nkv.gate
from nkv import nkv_gate
from nkv.gate import Sketch, fit_sketch, key_inverse_norms, sketch_keys
from nkv.loaders.vllm.layer import NKVGatedProjection

from test_vllm_units import D_KEY, ZeroProjection, key_slice, make_adapter, make_slot, on_two_ranks

SHORTLIST = 4  # fewer candidates than facts, so the shortlist really decides something


def sketched(capacity: int = 32, max_adapters: int = 0, tp_rank: int = 0, tp_size: int = 1,
             all_reduce=None) -> NKVGatedProjection:
    slot = dataclasses.replace(make_slot(capacity=capacity, tp_rank=tp_rank, tp_size=tp_size),
                               max_adapters=max_adapters)
    module = NKVGatedProjection(ZeroProjection(), slot, dtype=torch.float32, device=torch.device("cpu"),
                                fact_chunk=5, all_reduce=all_reduce, max_tokens=64, sketch=True, shortlist=SHORTLIST)
    assert module.shortlist == SHORTLIST  # the engine's "shortlist" setting
    return module


def reference(adapter, x: torch.Tensor) -> torch.Tensor:
    """The sketch path of `nkv_gate` on the adapter alone, with the projection the module fits."""
    proj = fit_sketch(adapter.keys, min(128, D_KEY))
    sketch = Sketch(proj, sketch_keys(adapter.keys, proj), SHORTLIST)
    return nkv_gate(x, adapter.keys, key_inverse_norms(adapter.keys), adapter.residuals,
                    torch.tensor(adapter.gamma), sketch=sketch).delta


@pytest.fixture
def shortlists(monkeypatch) -> list[int]:
    """Rows scored by each sketch shortlist the gate computes: proof the sketch path ran."""
    calls, original = [], nkv.gate._shortlist

    def counted(x_unit, sketch, fact_chunk, all_reduce, workspace=None):
        calls.append(sketch.keys.shape[0])
        return original(x_unit, sketch, fact_chunk, all_reduce, workspace)

    monkeypatch.setattr(nkv.gate, "_shortlist", counted)
    return calls


def tokens(adapter, seed: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.cat([adapter.keys[:6] + 0.2 * torch.randn(6, D_KEY), torch.randn(6, D_KEY)])


def test_engine_wide_adapter_takes_the_sketch_path_and_agrees_with_the_reference(shortlists):
    adapter = make_adapter(20, seed=1)
    module = sketched()
    module.load(adapter)
    x = tokens(adapter)
    out = module(x)[0]
    assert shortlists == [32]  # every preallocated row's sketch, once
    torch.testing.assert_close(out, reference(adapter, x))
    exact = nkv_gate(x, adapter.keys, key_inverse_norms(adapter.keys), adapter.residuals, torch.tensor(0.5)).delta
    torch.testing.assert_close(out[:6], exact[:6])  # near-copies of stored keys: the shortlist finds them
    assert module.nkv_sketch_keys[20:].abs().sum() == 0  # padding sketches stay zero


def test_named_adapters_each_use_their_own_projection(shortlists):
    a, b = make_adapter(20, seed=1), make_adapter(12, seed=2)
    module = sketched(max_adapters=2)
    module.load(a, name="A")
    module.load(b, name="B")
    xa, xb = tokens(a, 4), tokens(b, 5)
    module.set_route(["A", "B", None], np.array([12, 12, 3]))
    out = module(torch.cat([xa, xb, torch.randn(3, D_KEY)]))[0]
    assert shortlists == [20, 12]  # each adapter's own sketches only
    torch.testing.assert_close(out[:12], reference(a, xa))
    torch.testing.assert_close(out[12:24], reference(b, xb))
    assert out[24:].abs().sum() == 0
    module.load(make_adapter(9, seed=6), name="A")  # B's rows and projection survive A's replacement
    module.set_route(["B"], np.array([12]))
    torch.testing.assert_close(module(xb)[0], reference(b, xb))


def test_tensor_parallel_sketch_path_agrees_with_one_device():
    adapter = make_adapter(20, seed=1)
    x = tokens(adapter)
    capacity, reduced = 256, [[], []]  # the shapes each rank all-reduces

    def rank(r, all_reduce):
        def recorded(t):
            reduced[r].append(tuple(t.shape))
            return all_reduce(t)
        module = sketched(capacity=capacity, tp_rank=r, tp_size=2, all_reduce=recorded)
        module.load(adapter)
        return module(key_slice(x, r))[0]

    outs = on_two_ranks(rank)
    want = reference(adapter, x)
    torch.testing.assert_close(outs[0], want)
    torch.testing.assert_close(outs[1], want)
    # the layer's all-reduces carry the token norms, sketches and shortlist scores (spec §5.1),
    # O(tokens x k) -- never a (tokens x capacity) score block
    T, d_sketch = x.shape[0], min(128, D_KEY)
    assert reduced[0] == reduced[1] == [(T,), (T, d_sketch), (T, SHORTLIST)]
    assert sum(math.prod(shape) for shape in reduced[0]) < T * capacity


def test_compiled_sketch_path_sees_rows_swapped_in_place():
    first, second = make_adapter(20, seed=1), make_adapter(16, seed=7)
    module = sketched()
    module.load(first)
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    x = torch.cat([tokens(first), tokens(second)])
    torch.testing.assert_close(compiled(x)[0], reference(first, x))
    module.load(second)  # in-place copies: the compiled graph must see the new keys, sketches and projection
    torch.testing.assert_close(compiled(x)[0], reference(second, x))
