"""The gated op against brute force, including 100,000 facts with bounded memory."""

from __future__ import annotations

import torch

from nkv.gate import RowRange, key_inverse_norms, nkv_gate, nkv_gate_routed


def brute_force(k, keys, residuals, gamma):
    cos = torch.nn.functional.cosine_similarity(k.unsqueeze(1), keys.unsqueeze(0), dim=-1)  # (T, n)
    best, idx = cos.max(-1)
    fired = best > gamma
    return residuals[idx] * fired.unsqueeze(-1), idx, best, fired


def test_matches_brute_force_at_100k_facts_with_small_chunks():
    g = torch.Generator().manual_seed(0)
    n, d_key, d_model, T = 100_000, 16, 8, 64
    keys = torch.randn(n, d_key, generator=g)
    residuals = torch.randn(n, d_model, generator=g)
    k = torch.randn(T, d_key, generator=g)
    k[::4] = keys[torch.randint(0, n, (T // 4,), generator=g)] * 3 + 0.01 * torch.randn(T // 4, d_key, generator=g)
    gamma = torch.tensor(0.65)
    res = nkv_gate(k, keys, key_inverse_norms(keys), residuals, gamma, fact_chunk=4096)
    delta, idx, best, fired = brute_force(k, keys, residuals, 0.65)
    assert torch.equal(res.fired, fired) and fired[::4].all()
    assert torch.equal(res.index[fired], idx[fired])
    assert torch.allclose(res.score, best, atol=1e-5)
    assert torch.allclose(res.delta, delta)


def test_chunk_size_does_not_change_argmax_on_ties():
    keys = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # rows 0 and 1 tie on cosine
    residuals = torch.arange(6.0).reshape(3, 2)
    k = torch.tensor([[5.0, 0.0]])
    for chunk in (1, 2, 3):
        res = nkv_gate(k, keys, key_inverse_norms(keys), residuals, torch.tensor(0.5), fact_chunk=chunk)
        assert int(res.index[0]) == 0  # first index wins, whatever the chunking


def test_padding_rows_and_zero_queries_never_fire():
    keys = torch.zeros(4, 3)
    keys[0] = torch.tensor([1.0, 0.0, 0.0])
    residuals = torch.ones(4, 2)
    k = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    res = nkv_gate(k, keys, key_inverse_norms(keys), residuals, torch.tensor(0.0))
    assert res.fired.tolist() == [False, False, True]
    assert torch.equal(res.delta[:2], torch.zeros(2, 2))


def test_empty_adapter_and_leading_dims():
    k = torch.randn(2, 5, 3)
    res = nkv_gate(k, torch.zeros(0, 3), torch.zeros(0), torch.zeros(0, 4), torch.tensor(0.65))
    assert res.delta.shape == (2, 5, 4) and not res.fired.any()


def test_all_reduce_over_column_slices_equals_full_computation():
    g = torch.Generator().manual_seed(1)
    keys, residuals = torch.randn(50, 12, generator=g), torch.randn(50, 4, generator=g)
    k = torch.randn(9, 12, generator=g)
    k[3] = keys[7]
    inv = key_inverse_norms(keys)
    full = nkv_gate(k, keys, inv, residuals, torch.tensor(0.65))
    # two "ranks" each holding half of d_key; the all-reduce sums both ranks' partials
    halves = [slice(0, 6), slice(6, 12)]

    def run_rank(r):
        other = halves[1 - r]
        unit = k / k.norm(dim=-1, keepdim=True)  # the other rank scales its slice by the reduced norm

        def all_reduce(t):  # simulate: add the other rank's identical partial computation
            return t + (k[:, other].float().pow(2).sum(-1) if t.dim() == 1 else (unit[:, other] @ keys[:, other].T).float())
        return nkv_gate(k[:, halves[r]], keys[:, halves[r]], inv, residuals, torch.tensor(0.65), all_reduce=all_reduce)

    for r in (0, 1):
        res = run_rank(r)
        assert torch.equal(res.index, full.index) and torch.equal(res.fired, full.fired)
        assert torch.allclose(res.score, full.score, atol=1e-6)


def test_massive_activation_in_fp16_does_not_overflow_the_gate():
    # Issue 14: a key at cosine 0.3 to its token must not fire at gamma 0.65. Scaled x400
    # (real models' "massive activations"), the fp16 dot product used to overflow to inf
    # and fire. Every score must stay in [-1, 1] whatever the activation's scale and dtype.
    d = 64
    g = torch.Generator().manual_seed(3)
    key = torch.randn(d, generator=g)
    key = key / key.norm() * 40.0
    ortho = torch.randn(d, generator=g)
    ortho = ortho - (ortho @ key) / (key @ key) * key
    k = 0.3 * key / key.norm() + (1 - 0.3**2) ** 0.5 * ortho / ortho.norm()  # cos(k, key) = 0.3
    keys, residuals = key.unsqueeze(0), torch.ones(1, 8)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for scale in (1.0, 400.0, 1000.0):
            x = (k * scale * 40).to(dtype).unsqueeze(0)  # |x| up to 40,000; elements stay finite in fp16
            assert torch.isfinite(x).all()
            res = nkv_gate(x, keys.to(dtype), key_inverse_norms(keys), residuals.to(dtype), torch.tensor(0.65))
            assert not res.fired.any(), (dtype, scale)
            assert torch.isfinite(res.score).all() and res.score.abs().max() <= 1.0, (dtype, scale, res.score)
            assert abs(float(res.score[0]) - 0.3) < 0.02, (dtype, scale, res.score)


def test_routed_gate_scores_each_token_against_its_own_adapter_only():
    g = torch.Generator().manual_seed(2)
    keys, residuals = torch.randn(30, 12, generator=g), torch.randn(30, 4, generator=g)
    ranges = [RowRange(0, 10, 0.65), RowRange(10, 15, 0.5), RowRange(25, 0, 0.65)]  # A, B, an empty one
    k = torch.randn(8, 12, generator=g)
    k[0], k[1], k[2] = keys[3], keys[12], keys[12]  # token 1 asks A for B's fact: must not fire
    route = torch.tensor([0, 0, 1, -1, 1, 2, 0, -1, 7, 7])  # a padded routing buffer: 8..9 ignored
    inv = key_inverse_norms(keys)
    res = nkv_gate_routed(k, route, ranges, keys, inv, residuals)
    for t, a in enumerate(route[:8].tolist()):
        if a < 0:  # no adapter: untouched
            assert not res.fired[t] and torch.count_nonzero(res.delta[t]) == 0
            continue
        r = ranges[a]
        alone = nkv_gate(k[t:t + 1], keys[r.start:r.start + r.n_facts], inv[r.start:r.start + r.n_facts],
                         residuals[r.start:r.start + r.n_facts], torch.tensor(r.gamma))
        assert bool(res.fired[t]) == bool(alone.fired[0])
        assert torch.equal(res.delta[t], alone.delta[0])
        if alone.fired[0]:
            assert int(res.index[t]) == int(alone.index[0]) + r.start
    assert res.fired[0] and not res.fired[1] and res.fired[2] and int(res.index[2]) == 12


def test_routed_gate_keeps_leading_dims_and_refuses_an_unknown_adapter():
    keys = torch.randn(4, 3)
    res = nkv_gate_routed(torch.randn(2, 5, 3), torch.zeros(2, 5, dtype=torch.int64), [RowRange(0, 4, 0.65)],
                          keys, key_inverse_norms(keys), torch.randn(4, 6))
    assert res.delta.shape == (2, 5, 6) and res.index.shape == (2, 5)
    try:
        nkv_gate_routed(torch.randn(2, 3), torch.tensor([0, 1]), [RowRange(0, 4, 0.65)], keys,
                        key_inverse_norms(keys), torch.randn(4, 6))
    except IndexError as exc:
        assert "only 1 are resident" in str(exc)
    else:
        raise AssertionError("a token routed past the resident adapters must fail, not pass unedited")
