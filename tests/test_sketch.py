"""The sketch path of the gate (spec §5.1) and the optional `nkv.sketch.proj` tensor (V11).

The exact path is the reference: the sketch path must equal it when the shortlist holds
every row, never fire where it does not, report exact cosines, agree across two
tensor-parallel ranks, trace without graph breaks and follow in-place hot swaps.
"""

from __future__ import annotations

import re
import struct
import threading
from dataclasses import replace

import pytest
import torch

from nkv import NKVAdapter, NKVFormatError
from nkv import constants as C
from nkv.gate import (RESCORE_VALUES, Sketch, _top_columns, fit_sketch, key_inverse_norms, nkv_gate, rescore_group,
                      shortlist_scores, sketch_keys)
from test_format import make


def clustered(n: int, d: int, rank: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys that share a low-rank structure (as real FFN keys do), and queries: half near a key."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=g)
    keys = torch.randn(n, rank, generator=g) @ basis + 0.4 * torch.randn(n, d, generator=g)
    q = torch.randn(64, rank, generator=g) @ basis + 0.4 * torch.randn(64, d, generator=g)
    near = keys[torch.randint(0, n, (32,), generator=g)]
    q[:32] = near + 0.15 * near.norm(dim=-1, keepdim=True) / d**0.5 * torch.randn(32, d, generator=g)
    return keys, q


def _sketch(keys: torch.Tensor, dim: int, shortlist: int) -> Sketch:
    proj = fit_sketch(keys, dim)
    return Sketch(proj, sketch_keys(keys, proj), shortlist)


def test_full_shortlist_equals_the_exact_path_including_ties_and_padding() -> None:
    keys = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # 0, 1 tie; 3 pads
    residuals = torch.arange(12.0).reshape(4, 3)
    k = torch.tensor([[5.0, 0.0, 0.1], [0.0, -1.0, 0.0], [0.0, 0.0, 0.0], [0.1, 1.0, 0.0]])
    inv, gamma = key_inverse_norms(keys), torch.tensor(0.5)
    exact = nkv_gate(k, keys, inv, residuals, gamma)
    for chunk in (1, 2, 4):
        fast = nkv_gate(k, keys, inv, residuals, gamma, fact_chunk=chunk, sketch=_sketch(keys, 2, 4))
        assert torch.equal(fast.index, exact.index) and torch.equal(fast.fired, exact.fired)
        assert torch.allclose(fast.score, exact.score) and torch.equal(fast.delta, exact.delta)
    assert int(exact.index[0]) == 0  # the first of two tied rows, on both paths


def test_never_fires_where_exact_does_not_and_scores_are_exact() -> None:
    keys, q = clustered(3000, 48)
    residuals = torch.randn(3000, 8)
    inv = key_inverse_norms(keys)
    for gamma in (0.3, 0.65, 0.9):
        exact = nkv_gate(q, keys, inv, residuals, torch.tensor(gamma))
        fast = nkv_gate(q, keys, inv, residuals, torch.tensor(gamma), fact_chunk=512, sketch=_sketch(keys, 4, 2))
        assert not (fast.fired & ~exact.fired).any()
        cos = torch.nn.functional.cosine_similarity(q, keys[fast.index], dim=-1)
        assert torch.allclose(fast.score, cos, atol=1e-5)
        assert (fast.score <= exact.score + 1e-6).all()


def test_recall_of_the_exact_decision_on_clustered_keys() -> None:
    keys, q = clustered(20000, 96, seed=1)
    residuals = torch.randn(20000, 8)
    inv, gamma = key_inverse_norms(keys), torch.tensor(0.65)
    exact = nkv_gate(q, keys, inv, residuals, gamma)
    fast = nkv_gate(q, keys, inv, residuals, gamma, sketch=_sketch(keys, 32, 32))
    same = (fast.fired == exact.fired) & (~exact.fired | (fast.index == exact.index))
    assert exact.fired.sum() >= 30 and bool(same.all())
    # a one-dimensional sketch with one candidate is too coarse: the test can tell
    coarse = nkv_gate(q, keys, inv, residuals, gamma, sketch=_sketch(keys, 1, 1))
    assert not bool(((coarse.fired == exact.fired) & (coarse.index == exact.index)).all())


def test_tensor_parallel_ranks_pick_the_same_rows_as_one_device() -> None:
    keys, q = clustered(500, 16, seed=2)
    residuals, inv, gamma = torch.randn(500, 4), key_inverse_norms(keys), torch.tensor(0.65)
    sk = _sketch(keys, 6, 4)
    want = nkv_gate(q, keys, inv, residuals, gamma, fact_chunk=128, sketch=sk)
    barrier, slots, outs, sizes = threading.Barrier(2), [None, None], [None, None], []

    def rank(r: int) -> None:
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            sizes.append(t.numel())
            slots[r] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        cols = slice(8 * r, 8 * (r + 1))
        outs[r] = nkv_gate(q[:, cols], keys[:, cols], inv, residuals, gamma, fact_chunk=128, all_reduce=all_reduce,
                           sketch=Sketch(sk.proj[cols], sk.keys, sk.shortlist))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for out in outs:
        assert torch.equal(out.index[want.fired], want.index[want.fired]) and torch.equal(out.fired, want.fired)
        assert torch.allclose(out.score, want.score, atol=1e-5)
    # all-reduce traffic: (T,) norms, (T, d_sketch), (T, shortlist) -- never (T, n_facts)
    assert max(sizes) == q.shape[0] * 6 < q.shape[0] * 500


def test_compiles_without_graph_breaks_and_follows_in_place_swaps() -> None:
    keys, q = clustered(400, 16, seed=3)
    residuals, gamma = torch.randn(400, 4), torch.tensor(0.65)
    capacity = 512
    buf = {"keys": torch.zeros(capacity, 16), "inv": torch.zeros(capacity), "res": torch.zeros(capacity, 4),
           "proj": torch.zeros(16, 6), "sk": torch.zeros(capacity, 6 + 1)}  # sketch, rest norm

    def load(k: torch.Tensor, r: torch.Tensor) -> None:  # a hot swap: in-place copies, padding after
        proj = fit_sketch(k, 6)
        for name, rows in (("keys", k), ("inv", key_inverse_norms(k)), ("res", r), ("sk", sketch_keys(k, proj))):
            buf[name].zero_()
            buf[name][: rows.shape[0]].copy_(rows)
        buf["proj"].copy_(proj)

    def step(x: torch.Tensor) -> torch.Tensor:
        return nkv_gate(x, buf["keys"], buf["inv"], buf["res"], gamma, fact_chunk=128,
                        sketch=Sketch(buf["proj"], buf["sk"], 8)).delta

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    for k, r in ((keys, residuals), (keys[:200] * 2, -residuals[:200]), (keys[:0], residuals[:0])):
        load(k, r)
        assert torch.equal(compiled(q), step(q))
        if k.shape[0]:  # the padded buffers decide as the unpadded rows do
            proj = fit_sketch(k, 6)
            want = nkv_gate(q, k, key_inverse_norms(k), r, gamma, sketch=Sketch(proj, sketch_keys(k, proj), 8))
            assert want.fired.any() and torch.allclose(compiled(q), want.delta)
        else:
            assert not compiled(q).any()


def test_the_rescoring_group_changes_only_the_speed() -> None:
    keys, q = clustered(3000, 48, seed=2)
    residuals, inv, gamma = torch.randn(3000, 8), key_inverse_norms(keys), torch.tensor(0.65)
    sketch = _sketch(keys, 8, 24)  # 24 slots: groups of 5 and 16 leave a short last group
    base = nkv_gate(q, keys, inv, residuals, gamma, sketch=sketch._replace(group=1))
    for group in (5, 16, 24):
        out = nkv_gate(q, keys, inv, residuals, gamma, sketch=sketch._replace(group=group))
        assert torch.equal(out.index, base.index) and torch.equal(out.fired, base.fired)
        assert torch.allclose(out.score, base.score, atol=1e-6)
    assert base.fired.sum() >= 16


@pytest.mark.parametrize("widths, c", [
    ([64 * 600], 16),  # one chunk
    ([64 * 40 + 37, 64 * 40 + 37, 999], 16),  # partial last blocks in every chunk
    ([100, 5000, 64 * 7], 128),  # a first chunk of fewer than c blocks
    ([12288] * 3 + [1696], 128),  # the op's chunks at 38,560 facts
])
def test_two_level_top_columns_are_the_top_k(widths: list[int], c: int) -> None:
    g = torch.Generator().manual_seed(sum(widths))
    scores = torch.randn(9, sum(widths), generator=g)
    scores[0] = scores[0].round(decimals=1)  # many ties
    scores[1, -5:] = 50.0  # the best in the partial last block
    scores[2, :64] = 40.0 + torch.arange(64.0)  # a whole block of the best
    scores[3, 1::64] = 30.0  # the best spread one per block
    starts = [sum(widths[:i]) for i in range(len(widths))]
    cols = _top_columns(((s, scores[:, s : s + w].contiguous()) for s, w in zip(starts, widths)), c)
    want, _ = scores.topk(c, dim=-1)
    got = scores.gather(-1, cols).sort(dim=-1, descending=True).values
    assert torch.equal(got, want)  # the same scores, whatever the order of ties
    assert all(len(set(r.tolist())) == c for r in cols) and int(cols.max()) < scores.shape[1]


def test_a_score_workspace_changes_nothing_and_too_small_a_one_is_not_used() -> None:
    keys, q = clustered(20000, 48, seed=3)
    residuals, inv, gamma = torch.randn(20000, 8), key_inverse_norms(keys), torch.tensor(0.65)
    sketch = _sketch(keys, 8, 16)
    base = nkv_gate(q, keys, inv, residuals, gamma, fact_chunk=4096, sketch=sketch)
    need = shortlist_scores(q.shape[0], 20000, 4096, 16, 48)
    for ws in (torch.full((need,), float("nan")), torch.full((q.shape[0],), float("nan"))):
        out = nkv_gate(q, keys, inv, residuals, gamma, fact_chunk=4096, sketch=sketch, workspace=ws)
        assert torch.equal(out.index, base.index) and torch.equal(out.score, base.score)
        assert torch.isnan(ws).all() != (ws.numel() == need)  # written only where a chunk fits
    assert base.fired.sum() >= 16


@pytest.mark.parametrize("rows, d_key, shortlist, group", [
    (1, 1536, 128, 128),  # one token: every slot in one call (per-call overhead dominates)
    (16, 1536, 128, 8),  # 16 * 8 * 1536 <= RESCORE_VALUES < 16 * 16 * 1536
    (256, 1536, 128, 1),  # a prefill block: one slot at a time
    (10**6, 14336, 128, 1),  # never below 1
    (1, 8, 32, 32),  # never above the shortlist
])
def test_rescoring_group_keeps_gathered_rows_within_the_budget(rows: int, d_key: int, shortlist: int,
                                                               group: int) -> None:
    got = rescore_group(rows, d_key, shortlist)
    assert got == group
    assert got == 1 or rows * got * d_key <= RESCORE_VALUES


def test_transformers_loader_takes_the_sketch_path_from_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    from nkv.loaders import transformers as tl

    adapter = replace(make([f"f{i}" for i in range(300)]), keys=clustered(300, 4, rank=2, seed=4)[0])
    base = torch.nn.Linear(4, 3)
    exact = tl.NKVLinear(base, adapter, torch.float32, torch.device("cpu"))
    assert exact.shortlist == 0 and exact.nkv_sketch_keys is None
    monkeypatch.setattr(tl, "SKETCH_MIN_FACTS", 300)
    fast = tl.NKVLinear(base, adapter.with_sketch(3), torch.float32, torch.device("cpu"))
    assert fast.shortlist == tl.DEFAULT_SHORTLIST and fast.nkv_sketch_keys.shape == (300, 3 + 1)  # sketch, rest norm
    x = adapter.keys[:50] + 0.01 * torch.randn(50, 4)
    a, b = exact.gate(x), fast.gate(x)
    assert not (b.fired & ~a.fired).any()
    assert (a.fired == b.fired).float().mean() >= 0.9
    groups = []  # the loader sizes the rescoring group for the rows of each call
    real_gate = tl.nkv_gate
    monkeypatch.setattr(tl, "nkv_gate", lambda *a, sketch, **k: groups.append(sketch.group) or real_gate(*a, sketch=sketch, **k))
    fast.gate(x[:1]), fast.gate(x.repeat(40, 1))
    assert groups == [128, 32] == [rescore_group(1, 4, 128), rescore_group(2000, 4, 128)]
    # the score buffer is kept between calls, one per thread
    mine = fast._score_workspace(1000, torch.device("cpu"))
    assert fast._score_workspace(10, torch.device("cpu")) is mine
    other = []
    worker = threading.Thread(target=lambda: other.append(fast._score_workspace(10, torch.device("cpu"))))
    worker.start(), worker.join()
    assert other[0] is not mine
    grown = fast._score_workspace(mine.numel() + 1, torch.device("cpu"))  # grows; the ended thread's is dropped
    assert grown.numel() == mine.numel() + 1 and list(fast._score_workspaces.values()) == [grown]


def test_bfloat16_sketch_tables_only_rank_the_shortlist_so_nothing_fires_that_exact_leaves_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from nkv.loaders import transformers as tl

    cpu = torch.device("cpu")
    monkeypatch.setattr(tl, "SKETCH_MIN_FACTS", 300)
    keys, q = clustered(3000, 48, seed=2)
    adapter = replace(make([f"f{i}" for i in range(3000)]), keys=keys).with_sketch(8)
    base = torch.nn.Linear(48, 3)
    full = tl.NKVLinear(base, adapter, torch.float32, cpu)
    assert full.nkv_sketch_keys.dtype == torch.float32  # the default: the activations' dtype
    half = tl.NKVLinear(base, adapter, torch.float32, cpu)
    half.use_sketch(adapter, tl.DEFAULT_SHORTLIST, table_dtype=torch.bfloat16)
    assert half.nkv_sketch_keys.dtype == torch.bfloat16 and half.nkv_keys.dtype == torch.float32
    exact = tl.NKVLinear(base, adapter, torch.float32, cpu)
    exact.use_sketch(adapter, 0)
    a, b, c = exact.gate(q), full.gate(q), half.gate(q)
    assert int(a.fired.sum()) >= 16 and not (c.fired & ~a.fired).any()  # rescored exactly: bf16 ranks, never scores
    assert torch.allclose(c.score[c.fired], torch.nn.functional.cosine_similarity(q, keys[c.index], dim=-1)[c.fired])
    assert torch.equal(b.index[a.fired], c.index[a.fired])  # the same rows as the float32 shortlist here


def test_a_nan_token_fires_nothing_on_either_path() -> None:
    keys, q = clustered(500, 32, seed=6)
    inv, residuals, gamma = key_inverse_norms(keys), torch.randn(500, 3), torch.tensor(0.65)
    q[5] = float("nan")
    for sketch in (None, _sketch(keys, 8, 16)):
        r = nkv_gate(q, keys, inv, residuals, gamma, sketch=sketch)  # used to raise IndexError on the sketch path
        assert not r.fired[5] and torch.equal(r.delta[5], torch.zeros(3)) and 0 <= int(r.index[5]) < 500
        assert r.fired.sum() >= 16  # the other tokens are gated as before


def test_sketch_path_keeps_a_narrower_file_table_uncopied_and_decides_as_the_cast_table(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from nkv.loaders import transformers as tl

    cpu = torch.device("cpu")
    monkeypatch.setattr(tl, "SKETCH_MIN_FACTS", 300)
    keys, q = clustered(3000, 48, seed=3)
    half = replace(make([f"f{i}" for i in range(3000)]), keys=keys.half(),
                   residuals=torch.randn(3000, 3, generator=torch.Generator().manual_seed(4)).half()).with_sketch(8)
    as_float = replace(half, keys=half.keys.float(), residuals=half.residuals.float())
    base = torch.nn.Linear(48, 3)
    kept = tl.NKVLinear(base, half, torch.float32, cpu)
    cast = tl.NKVLinear(base, as_float, torch.float32, cpu)
    assert kept.nkv_keys.dtype == torch.float16 and kept.nkv_keys.data_ptr() == half.keys.data_ptr()  # no copy
    assert kept.nkv_sketch_keys.dtype == torch.float32  # the shortlist ranks as before
    a, b = kept.gate(q), cast.gate(q)
    assert int(a.fired.sum()) >= 16 and torch.equal(a.fired, b.fired) and torch.equal(a.index, b.index)
    assert torch.equal(a.score, b.score) and torch.equal(a.delta.float(), b.delta)
    assert torch.equal(kept(q), cast(q))  # the module's output, delta cast to float32
    kept.use_sketch(half, 0)  # the exact path multiplies the whole table: cast once, in the activations' dtype
    assert kept.nkv_keys.dtype == torch.float32 and torch.equal(kept.gate(q).index[a.fired], a.index[a.fired])
    kept2 = tl.NKVLinear(base, half, torch.float32, cpu)
    kept2.add(replace(as_float, keys=keys, facts=[replace(f, id=f"g{f.id}") for f in as_float.facts]), "other")
    assert kept2.nkv_keys.dtype == torch.float32  # float32 rows are never rounded to the fp16 table's dtype
    assert torch.equal(kept2.nkv_keys[3000:], keys)


# ------------------------------------------------------------------ the file part (V11)
def test_sketch_round_trips_and_survives_row_operations(tmp_path) -> None:
    a = make([f"f{i}" for i in range(6)]).with_sketch(2)
    assert a.sketch_proj.shape == (4, 2) and torch.equal(a.with_sketch(2).sketch_proj, a.sketch_proj)
    back = NKVAdapter.load(a.save(tmp_path / "a.nkv"))
    assert torch.equal(back.sketch_proj, a.sketch_proj) and back.to_bytes() == a.to_bytes()
    assert b'"nkv.version":"1.1"' in a.to_bytes() and b'"nkv.version":"1.0"' in a.with_sketch(0).to_bytes()
    for out in (a.remove(ids=["f1"]), a.select(["f2", "f0"]), a.merge(make(["z"])), a.to(torch.float16)):
        assert torch.equal(out.sketch_proj, a.sketch_proj)
        NKVAdapter.from_bytes(out.to_bytes())
    assert a.diff(a.with_sketch(0)).settings == {"sketch": (2, 0)}


@pytest.mark.parametrize("proj, needle", [
    (torch.zeros(4, 2, dtype=torch.float64), "V11"),
    (torch.zeros(3, 2), "V11"),
    (torch.zeros(4, 5), "V11"),
    (torch.full((4, 2), float("nan")), "V11"),
])
def test_bad_sketch_is_refused_by_writer_and_reader(proj: torch.Tensor, needle: str) -> None:
    a = replace(make(["a", "b"]), sketch_proj=proj)
    with pytest.raises(NKVFormatError, match=needle):
        a.to_bytes()
    good = make(["a", "b"]).with_sketch(2).to_bytes()
    bad = good.replace(b'"nkv.sketch.proj":{"dtype":"F32","shape":[4,2]',
                       b'"nkv.sketch.proj":{"dtype":"I32","shape":[4,2]')
    assert bad != good
    with pytest.raises(NKVFormatError, match=r"V11: tensor 'nkv.sketch.proj' must be F32"):
        NKVAdapter.from_bytes(bad)


def _table_bytes(data: bytes) -> tuple[int, int]:
    """[begin, end) of nkv.sketch.keys in a file's bytes."""
    from nkv.header import parse_header

    h = parse_header(data[: 8 + C.MAX_HEADER_BYTES], len(data), "<test>")
    begin, end = h.tensors[C.T_SKETCH_KEYS].data_offsets
    return h.data_start + begin, h.data_start + end


@pytest.mark.parametrize("storage", ["exact", "int8"])
def test_key_sketches_are_stored_from_sketch_min_facts_and_attach_reads_them(
        storage: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nkv import adapter as adapter_module
    from nkv.loaders import transformers as tl

    monkeypatch.setattr(C, "SKETCH_MIN_FACTS", 40)
    monkeypatch.setattr(tl, "SKETCH_MIN_FACTS", 40)
    keys, _ = clustered(60, 4, rank=2, seed=5)
    small = replace(make([f"f{i}" for i in range(39)]), storage=storage).with_sketch(2)
    assert C.T_SKETCH_KEYS.encode() not in small.to_bytes()  # the exact path below SKETCH_MIN_FACTS: not written
    a = replace(make([f"f{i}" for i in range(60)]), keys=keys, storage=storage).with_sketch(2)
    data = a.to_bytes()
    back = NKVAdapter.from_bytes(data)
    begin, end = _table_bytes(data)
    table = torch.frombuffer(bytearray(data[begin:end]), dtype=torch.float32).reshape(60, 3)
    assert torch.equal(table, sketch_keys(back.keys, back.sketch_proj))  # of the rows as stored (int8: dequantized)
    assert b'"nkv.version":"1.1"' in data or storage == "int8"  # a cache raises no version
    assert back.to_bytes() == data
    calls = []
    monkeypatch.setattr(adapter_module, "sketch_keys", lambda *a, **k: calls.append(1) or sketch_keys(*a, **k))
    module = tl.NKVLinear(torch.nn.Linear(4, 3), back, torch.float32, torch.device("cpu"))
    assert torch.equal(module.nkv_sketch_keys, table) and calls == []  # read, not computed
    served = back.with_gamma(0.8)  # load_nkv_adapter(gamma=...): the same rows, the stored sketches
    assert served.gamma == 0.8 and torch.equal(served.key_sketches(served.sketch_proj), table) and calls == []
    assert torch.equal(replace(back, keys=back.keys.clone()).key_sketches(back.sketch_proj), table)
    assert calls == [1]  # another adapter (a row operation, replace): computed again
    for out in (back.remove(ids=["f1"]), back.select([f"f{i}" for i in range(50, 0, -1)])):
        calls.clear()
        carried = out.key_sketches(out.sketch_proj)
        assert calls == [] and torch.equal(carried, sketch_keys(out.keys, out.sketch_proj))  # carried, no product
        NKVAdapter.from_bytes(out.to_bytes())  # and valid (V11 recomputes a sample)
    calls.clear()
    grown = back.add([replace(back.facts[0], id="new", subject="New", prompt="About New:")], back.keys[:1], back.residuals[:1])
    torch.testing.assert_close(grown.key_sketches(back.sketch_proj)[-1], table[0])
    assert calls == [1]  # add: computed again


@pytest.mark.parametrize("change, needle", [
    ("stale", "is not the sketches of 'nkv.keys' under 'nkv.sketch.proj' (row 0"),
    ("nan", "holds NaN/Inf"),
    ("dtype", "must be F32 [n_facts = 60, d_sketch + 1 = 3]"),
    ("alone", "is present without 'nkv.sketch.proj'"),
])
def test_a_bad_key_sketch_table_is_refused(change: str, needle: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(C, "SKETCH_MIN_FACTS", 40)
    data = bytearray(make([f"f{i}" for i in range(60)]).with_sketch(2).to_bytes())
    begin, _ = _table_bytes(bytes(data))
    if change in ("stale", "nan"):
        data[begin : begin + 4] = struct.pack("<f", 0.5 if change == "stale" else float("nan"))
    elif change == "dtype":
        data = data.replace(b'"nkv.sketch.keys":{"dtype":"F32"', b'"nkv.sketch.keys":{"dtype":"I32"')
    else:  # the projection's entry renamed: an unknown tensor, ignored
        data = data.replace(b'"nkv.sketch.proj":', b'"nkv.sketch.xxxx":')
    with pytest.raises(NKVFormatError, match=re.escape(needle)):
        NKVAdapter.from_bytes(bytes(data))


def test_sketch_projection_is_the_files_when_its_width_fits_else_fitted():
    adapter = make([f"f{i}" for i in range(40)]).with_sketch(2)
    assert adapter.sketch_projection() is adapter.sketch_proj  # any width will do
    assert adapter.sketch_projection(2) is adapter.sketch_proj
    narrow = adapter.sketch_projection(3)  # a loader with 3-wide buffers: fitted again
    assert narrow.shape == (adapter.keys.shape[1], 3)
    torch.testing.assert_close(narrow, fit_sketch(adapter.keys, 3))
    assert replace(adapter, sketch_proj=None).sketch_projection(3).shape[1] == 3


def test_the_shortlist_counts_the_rests_so_a_key_outside_the_sketch_is_found() -> None:
    """Spec §5.1: the best key lies outside the 1-dim projection (sketch 0, rest 1) and decoys
    have the larger sketch product; ranked by the sketch product alone a shortlist of 1 would
    hold a decoy and miss the fire, ranked with the rests' share it holds the best key."""
    proj = torch.tensor([[1.0], [0.0], [0.0], [0.0]])  # orthonormal, spans e1 only
    best = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    decoys = torch.tensor([[1.0, 0.0, 0.1 * i, 0.0] for i in range(1, 6)])
    keys = torch.cat([decoys, best])
    sk = sketch_keys(keys, proj)
    unit = keys / keys.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(sk[:, 1], (1 - (unit @ proj).squeeze(1).pow(2)).sqrt())  # the rest's norm
    assert torch.equal(sketch_keys(torch.zeros(2, 4), proj), torch.zeros(2, 2))  # padding: all zero
    x = torch.tensor([[0.1, 1.0, 0.0, 0.0]])
    inv, residuals, gamma = key_inverse_norms(keys), torch.eye(6), torch.tensor(0.65)
    exact = nkv_gate(x, keys, inv, residuals, gamma)
    assert exact.fired.item() and exact.index.item() == 5
    fast = nkv_gate(x, keys, inv, residuals, gamma, sketch=Sketch(proj, sk, 1))
    assert fast.fired.item() and fast.index.item() == 5
    plain = torch.cat([sk[:, :1], torch.zeros(6, 1)], dim=1)  # the sketch product alone
    assert not nkv_gate(x, keys, inv, residuals, gamma, sketch=Sketch(proj, plain, 1)).fired.item()


def test_the_shortlist_weighs_the_rests_bound_so_an_unaligned_large_rest_does_not_crowd_out_the_best() -> None:
    """The whole bound (weight 1) ranks a decoy whose rest is large but points elsewhere
    above the best key; SKETCH_REST_WEIGHT of it (spec §5.1) does not."""
    from nkv.constants import SKETCH_REST_WEIGHT

    proj = torch.tensor([[1.0], [0.0], [0.0]])  # spans e1; the token's rest is e2, the decoy's e3
    keys = torch.tensor([[0.1, 0.0, 0.995], [0.6, 0.8, 0.0]])  # decoy, best
    x = torch.tensor([[0.3, 0.954, 0.0]])
    inv, residuals, gamma = key_inverse_norms(keys), torch.eye(2), torch.tensor(0.65)
    exact = nkv_gate(x, keys, inv, residuals, gamma)
    assert exact.fired.item() and exact.index.item() == 1
    sk = sketch_keys(keys, proj)
    fast = nkv_gate(x, keys, inv, residuals, gamma, sketch=Sketch(proj, sk, 1))
    assert fast.fired.item() and fast.index.item() == 1
    whole_bound = torch.cat([sk[:, :1], sk[:, 1:] / SKETCH_REST_WEIGHT], dim=1)  # the op weighs the token's rest
    assert not nkv_gate(x, keys, inv, residuals, gamma, sketch=Sketch(proj, whole_bound, 1)).fired.item()
