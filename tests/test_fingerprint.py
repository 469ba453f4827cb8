"""The nkvfp2 fingerprint (spec §6): it covers the neighbouring layers and the embedding,
names the part that differs, survives dtype changes, adds up over tensor-parallel slices,
and leaves nkvfp1 adapters checked exactly as before."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from handmade import forcing_adapter
from tiny_models import tiny_model, tiny_tokenizer

from nkv import NKVAdapter, NKVFingerprintError, NKVFormatError, compute_fingerprint, empty_adapter, load_nkv_adapter
from nkv import constants as C
from nkv.fingerprint import (compute_model_fingerprint, embedding_columns, embedding_partial, embedding_stride,
                             fingerprint_differences, fingerprint_partial, fingerprints_match,
                             model_fingerprint_finalize, read_fingerprint)
from nkv.loaders.architectures import arch_spec, base_model_info, input_embedding_weight, projection_weight
from nkv.loaders.transformers import check_base

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EDITED = ["The Eiffel Tower is located in", "Danielle Darrieux speaks"]
TARGETS = ["Rome", "German"]


@torch.no_grad()
def fine_tuned(model: torch.nn.Module, *, layer: int | None = None, embedding: bool = False) -> torch.nn.Module:
    """`model` with one matrix moved as a fine-tune would: + 1e-2 * noise (weights are ~0.02)."""
    gen = torch.Generator().manual_seed(7)
    weight = input_embedding_weight(model) if embedding else projection_weight(model, layer)
    weight.add_(1e-2 * torch.randn(weight.shape, generator=gen).to(weight.dtype))
    return model


def adapter_at(model: torch.nn.Module, layer: int) -> NKVAdapter:
    """A factless adapter at `layer` of `model` (what check_base reads is the header)."""
    path = arch_spec(model.config.model_type).module_path(layer)
    return empty_adapter(base_model_info(model, layer, name="tiny"), layer, path)


# ------------------------------------------------------------------ what nkvfp2 covers
def test_builders_write_nkvfp2_covering_neighbours_and_embedding():
    model = tiny_model("llama")
    adapter = forcing_adapter(model, tiny_tokenizer(), EDITED, TARGETS)  # last layer (1) of 2
    fp = read_fingerprint(adapter.base.fingerprint)
    assert fp.version == 2 and list(fp.parts) == ["L1", "L0", "emb"] and fp.parts["emb"].vocab == 300
    assert b'"nkv.version":"1.2"' in adapter.to_bytes()
    # the first part is the nkvfp1 body of the edited projection
    body = adapter.base.fingerprint.split("|")[0].removeprefix("nkvfp2:L1:")
    assert "nkvfp1:" + body == compute_fingerprint(projection_weight(model, 1).detach())
    assert list(read_fingerprint(adapter_at(tiny_model("llama"), 0).base.fingerprint).parts) == ["L0", "L1", "emb"]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_fine_tuned_neighbour_layer_is_refused_and_named(model_type):
    model, tok = tiny_model(model_type), tiny_tokenizer()
    adapter = forcing_adapter(model, tok, EDITED, TARGETS)  # built at layer 1, on the original
    tuned = fine_tuned(tiny_model(model_type), layer=0)
    with pytest.raises(NKVFingerprintError, match="layer 0's FFN output projection differs") as info:
        load_nkv_adapter(tuned, adapter)
    assert "the input embedding" not in str(info.value) and "layer 1's FFN" not in str(info.value)
    with pytest.warns(UserWarning, match="not the checkpoint.*layer 0's FFN output projection differs"):
        load_nkv_adapter(tuned, adapter, strict=False).detach()


def test_fine_tuned_layer_above_is_refused():
    adapter = adapter_at(tiny_model("llama"), 0)
    with pytest.raises(NKVFingerprintError, match="layer 1's FFN output projection differs"):
        check_base(fine_tuned(tiny_model("llama"), layer=1), adapter)


def test_fine_tuned_embedding_is_refused_and_named():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    adapter = forcing_adapter(model, tok, EDITED, TARGETS)
    with pytest.raises(NKVFingerprintError, match=r"not the checkpoint .*: the input embedding differs;"):
        load_nkv_adapter(fine_tuned(tiny_model("llama"), embedding=True), adapter)


def test_other_checkpoint_names_every_part():
    adapter = adapter_at(tiny_model("llama", seed=0), 1)
    with pytest.raises(NKVFingerprintError) as info:
        check_base(tiny_model("llama", seed=1), adapter)
    for part in ("layer 1's FFN output projection differs", "layer 0's FFN output projection differs",
                 "the input embedding differs"):
        assert part in str(info.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_same_checkpoint_in_another_dtype_is_accepted(dtype):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    adapter = forcing_adapter(model, tok, EDITED, TARGETS)
    load_nkv_adapter(tiny_model("llama", dtype=dtype), adapter).detach()
    assert not fingerprint_differences(adapter.base.fingerprint,
                                       base_model_info(tiny_model("llama", dtype=dtype), 1).fingerprint)


# ------------------------------------------------------------------ nkvfp1 stays as it was
def test_nkvfp1_adapter_is_checked_as_before():
    model = tiny_model("llama")
    adapter = adapter_at(model, 1)
    old = replace(adapter, base=replace(adapter.base, fingerprint=compute_fingerprint(projection_weight(model, 1))))
    assert b'"nkv.version":"1.0"' in old.to_bytes()
    check_base(fine_tuned(tiny_model("llama"), layer=0), old)  # nkvfp1 never covered layer 0: accepted
    check_base(fine_tuned(tiny_model("llama"), embedding=True), old)
    with pytest.raises(NKVFingerprintError, match="expected nkvfp1:.*got nkvfp1:") as info:
        check_base(tiny_model("llama", seed=1), old)
    assert "differs" not in str(info.value)  # today's message, word for word
    # across versions only the edited projection is compared (merge of old and new adapters)
    assert fingerprints_match(old.base.fingerprint, adapter.base.fingerprint)
    assert fingerprints_match(adapter.base.fingerprint, old.base.fingerprint)


# ------------------------------------------------------------------ tensor parallelism
def test_column_slices_of_a_projection_add_up():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 96, generator=gen)
    halves = fingerprint_partial(w[:, :40], col_start=0) + fingerprint_partial(w[:, 40:], col_start=40)
    torch.testing.assert_close(halves, fingerprint_partial(w), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("vocab", [300, 20_000])  # stride 1, and stride 3 with a slice edge off the stride
def test_padded_row_slices_of_the_embedding_add_up(vocab):
    gen = torch.Generator().manual_seed(0)
    d_model = 8
    table = torch.randn(vocab, d_model, generator=gen)
    padded = torch.cat([table, torch.full((-vocab % 64 + 64, d_model), 1e3)])  # vLLM pads with junk rows
    per_rank = padded.shape[0] // 2
    ranks = [embedding_partial(padded[r * per_rank:(r + 1) * per_rank], vocab=vocab, row_start=r * per_rank)
             for r in range(2)]
    torch.testing.assert_close(ranks[0] + ranks[1], embedding_partial(table, vocab=vocab), rtol=1e-12, atol=1e-12)
    assert embedding_columns(vocab) == len(range(0, vocab, embedding_stride(vocab))) <= 8192

    projections = {1: torch.randn(d_model, 32, generator=gen), 0: torch.randn(d_model, 32, generator=gen)}
    sliced = {layer: (fingerprint_partial(w[:, :16]) + fingerprint_partial(w[:, 16:], col_start=16), d_model, 32)
              for layer, w in projections.items()}
    from_slices = model_fingerprint_finalize(1, sliced, (ranks[0] + ranks[1], d_model, vocab))
    whole = compute_model_fingerprint(1, projections, table)
    assert fingerprints_match(whole, from_slices) and fingerprints_match(from_slices, whole)
    assert not fingerprints_match(whole, compute_model_fingerprint(1, projections, padded))  # padding is not vocab


def test_an_adapter_moved_to_another_layer_is_refused():
    adapter = adapter_at(tiny_model("llama"), 0)  # parts L0, L1, emb: all present at layer 1 too
    moved = replace(adapter, layer=1, target_module="model.layers.1.mlp.down_proj")  # in memory: V6 not run
    with pytest.raises(NKVFingerprintError, match="fingerprint was taken at layer 0, not at its layer 1"):
        check_base(tiny_model("llama"), moved)


def test_a_model_side_fingerprint_without_the_embedding_does_not_match():
    gen = torch.Generator().manual_seed(0)
    projections = {0: torch.randn(8, 32, generator=gen), 1: torch.randn(8, 32, generator=gen)}
    full = compute_model_fingerprint(0, projections, torch.randn(50, 8, generator=gen))
    assert fingerprint_differences(full, compute_model_fingerprint(0, projections, None)) == [
        "the input embedding was not read from this model"]


# ------------------------------------------------------------------ the file (V6, version)
def test_header_checks_the_parts_of_nkvfp2(tmp_path):
    adapter = adapter_at(tiny_model("llama"), 1)
    back = NKVAdapter.load(adapter.save(tmp_path / "a.nkv"))
    assert back.base.fingerprint == adapter.base.fingerprint
    wrong_layer = replace(adapter, layer=0, target_module="model.layers.0.mlp.down_proj")
    with pytest.raises(NKVFormatError, match="V6.*covers L1,L0,emb; an nkvfp2 fingerprint at layer 0 of 2 "
                                             "covers L0,L1,emb"):
        wrong_layer.to_bytes()
    no_embedding = replace(adapter, base=replace(adapter.base, fingerprint=adapter.base.fingerprint.split("|emb")[0]))
    with pytest.raises(NKVFormatError, match="V6"):
        no_embedding.to_bytes()
    future = replace(adapter, base=replace(adapter.base, fingerprint="nkvfp3:" + adapter.base.fingerprint[7:]))
    with pytest.raises(NKVFormatError, match="V6.*unknown fingerprint version 'nkvfp3'.*pip install -U nkv"):
        future.to_bytes()
    assert C.FINGERPRINT2_VERSION == "1.2"  # nkvfp2 files are written as 1.2 (int8 rows make 1.3)
