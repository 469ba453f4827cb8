"""pytest fixtures and small adapters shared by the Hub tests (test_hub*.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch

from hub_server import FakeHub, point_client_at
from nkv import BaseModelInfo, Fact, NKVAdapter, compute_fingerprint, empty_adapter

BASE = "tiny-org/tiny-llama"


def small_adapter(n_facts: int = 3, seed: int = 0, base_name: str = BASE, eval: dict | None = None) -> NKVAdapter:
    """A valid adapter with random rows (d_key 8, d_model 4); no model needed."""
    g = torch.Generator().manual_seed(seed)
    base = BaseModelInfo(name=base_name, architecture="LlamaForCausalLM", model_type="llama", n_layers=2,
                         d_model=4, d_key=8, fingerprint=compute_fingerprint(torch.randn(4, 8, generator=g)))
    facts = [Fact(id=f"f{i}", subject=f"Subject {i}", prompt=f"Subject {i} lives in", target_new=f"City{i}",
                  target_true=f"Old{i}") for i in range(n_facts)]
    adapter = empty_adapter(base, 1, "model.layers.1.mlp.down_proj")
    adapter = adapter.add(facts, torch.randn(n_facts, 8, generator=g), torch.randn(n_facts, 4, generator=g))
    if eval:
        adapter.eval = eval
    return adapter


def adapter_bytes(adapter: NKVAdapter, tmp_path: Path, name: str = "a.nkv") -> bytes:
    return adapter.save(tmp_path / name).read_bytes()


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A running fake Hub; the real client points at it, with a valid token in HF_TOKEN."""
    with FakeHub() as server:
        point_client_at(monkeypatch, server.url, str(tmp_path / "hf-cache"), server.token)
        yield server


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "hf-cache"
