"""Build checkpoints never let a wrong row into an adapter (issue 14): every rows file
records its build and one digest per row, checked on resume even when state.json was
deleted or belongs to another build."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nkv import NKVError
from nkv.editing.solve.checkpoint import Checkpoint

STATE = {"inputs": "digest-of-facts-and-options", "layer": 3, "layer_choice": {"mode": "default"},
         "prefixes": ["The", "A"], "n_facts": 4}


def rows(seed: int, n: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"keys": torch.randn(n, 8, generator=g), "residuals": torch.randn(n, 4, generator=g).bfloat16(),
            "loss": torch.rand(n, generator=g), "steps": torch.arange(n)}


@pytest.fixture
def ckpt(tmp_path) -> Checkpoint:
    c = Checkpoint(tmp_path / "edits.nkv.partial")
    c.write_state(STATE)
    c.save_rows([0, 1], rows(0))
    c.save_rows([3, 2], rows(1))
    return c


def test_rows_round_trip_with_their_digests(ckpt):
    got = dict((tuple(i), r) for i, r in ckpt.iter_rows())
    torch.testing.assert_close(got[(0, 1)]["residuals"], rows(0)["residuals"])
    assert set(got) == {(0, 1), (3, 2)}


def test_a_missing_state_still_needs_resume_and_rows_are_checked_against_the_new_one(ckpt):
    (ckpt.folder / "state.json").unlink()
    with pytest.raises(NKVError, match="interrupted build"):
        ckpt.require_resume(False)  # rows alone are an interrupted build too
    assert ckpt.resumed_state(STATE["inputs"]) == {}
    ckpt.write_state({**STATE, "prefixes": ["Other"]})  # the resumed build chose other prefixes
    with pytest.raises(NKVError, match="rows-000000000-000000001.*different build"):
        list(ckpt.iter_rows())
    ckpt.write_state(STATE)  # the same choices again: the rows are valid for it
    assert len(list(ckpt.iter_rows())) == 2


def test_rows_left_by_another_build_are_refused(ckpt):
    ckpt.write_state({**STATE, "inputs": "another build's facts"})  # a stale state, overwritten
    with pytest.raises(NKVError, match="different build"):
        list(ckpt.iter_rows())


def test_a_changed_row_is_caught_by_its_digest(ckpt):
    path = ckpt.folder / "rows-000000002-000000003.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["keys"][1, 0] += 1e-3  # one value in the row of fact 2
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(NKVError, match="1 row\\(s\\) do not match their digest \\(fact index \\[2\\]\\)"):
        list(ckpt.iter_rows())


def test_rows_without_digests_are_refused(ckpt):
    save_file({"index": torch.tensor([5]), **rows(2, 1)}, str(ckpt.folder / "rows-000000005-000000005.safetensors"))
    with pytest.raises(NKVError, match="older nkv without row digests"):
        list(ckpt.iter_rows())
