"""Named adapters in one vLLM engine, chosen per request (issue 15), without starting an engine.

The gated module with several resident adapters under simulated tensor parallelism and
torch.compile, the changes that load and unload them on every rank, the engine core's
request checks (unknown names refused, prefix cache salted by adapter), and the server's
`model` field routing. The engines themselves run in test_vllm_engine.py.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from nkv import NKVCompatibilityError, NKVError, nkv_gate
from nkv.gate import key_inverse_norms
from nkv.loaders.vllm.config import NKVServeConfig, client_resident, remember_client_resident
from nkv.loaders.vllm.guard import check_client_request, check_ranks, check_requested
from nkv.loaders.vllm.layer import NKVGatedProjection
from nkv.loaders.vllm.slot import check_adapter
from nkv.loaders.vllm.swap import apply_swap, pin, unload

from test_vllm_failsafe import Core, Rank
from test_vllm_units import D_KEY, ZeroProjection, key_slice, make_adapter, make_slot, on_two_ranks

MAX_TOKENS = 64


def routed(capacity: int = 16, max_adapters: int = 2, tp_rank: int = 0, tp_size: int = 1,
           all_reduce=None) -> NKVGatedProjection:
    slot = dataclasses.replace(make_slot(capacity=capacity, tp_rank=tp_rank, tp_size=tp_size),
                               max_adapters=max_adapters)
    return NKVGatedProjection(ZeroProjection(), slot, dtype=torch.float32, device=torch.device("cpu"),
                              fact_chunk=3, all_reduce=all_reduce, max_tokens=MAX_TOKENS)


def alone(adapter, x: torch.Tensor) -> torch.Tensor:
    """What `adapter` alone adds to `x`: the reference for every routed token."""
    return nkv_gate(x, adapter.keys, key_inverse_norms(adapter.keys), adapter.residuals,
                    torch.tensor(adapter.gamma)).delta


def mixed_batch(a, b) -> tuple[torch.Tensor, list[str | None], np.ndarray]:
    """Three requests (A, none, B) of 4, 3 and 5 tokens; each has its own facts and the other's."""
    torch.manual_seed(3)
    x = torch.randn(12, D_KEY)
    x[0], x[1] = a.keys[0], b.keys[0]  # request A: its own fact, and B's (must not fire)
    x[4] = a.keys[1]  # request "none": A's fact (must not fire)
    x[7], x[8] = b.keys[2], a.keys[2]  # request B: its own fact, and A's (must not fire)
    return x, ["A", None, "B"], np.array([4, 3, 5])


def test_each_request_gets_only_its_own_adapter():
    a, b = make_adapter(5, seed=1, gamma=0.5), make_adapter(4, seed=2, gamma=0.6)
    module = routed()
    module.load(a, name="A")
    module.load(b, name="B")
    x, names, counts = mixed_batch(a, b)
    module.set_route(names, counts)
    assert module.nkv_route[:12].tolist() == [1] * 4 + [-1] * 3 + [2] * 5  # slot 0: the engine-wide adapter and module.nkv_route[12:].eq(-1).all()
    out = module(x)[0]
    torch.testing.assert_close(out[:4], alone(a, x[:4]))
    assert out[4:7].abs().sum() == 0  # no adapter named: the base model's output
    torch.testing.assert_close(out[7:], alone(b, x[7:]))
    assert torch.equal(out[0], a.residuals[0]) and out[1].abs().sum() == 0 and out[8].abs().sum() == 0
    assert [e["name"] for e in module.slot.named] == ["A", "B"] and module.slot.rows_in_use == 9


def test_replacing_and_unloading_one_adapter_leaves_the_other_as_it_was():
    a, b, a2 = make_adapter(5, seed=1), make_adapter(4, seed=2), make_adapter(6, seed=4)
    module = routed()
    module.load(a, name="A")
    module.load(b, name="B")
    x, names, counts = mixed_batch(a, b)
    module.load(a2, name="A")  # replaced: B's rows move down, A's new rows follow them
    module.set_route(names, counts)
    out = module(x)[0]
    torch.testing.assert_close(out[:4], alone(a2, x[:4]))
    torch.testing.assert_close(out[7:], alone(b, x[7:]))
    module.clear(name="A")
    assert [e["name"] for e in module.slot.named] == ["B"]
    with pytest.raises(NKVError, match="does not hold"):
        module.set_route(names, counts)  # the engine core aborts such requests before unloading
    module.set_route([None, None, "B"], counts)
    torch.testing.assert_close(module(x)[0][7:], alone(b, x[7:]))


def test_the_engine_wide_adapter_serves_requests_that_name_none():
    a, b = make_adapter(5, seed=1), make_adapter(4, seed=2)
    module = routed()
    module.load(a)  # engine-wide
    module.load(b, name="B")
    x, _, counts = mixed_batch(a, b)
    module.set_route([None, None, "B"], counts)
    out = module(x)[0]
    torch.testing.assert_close(out[:7], alone(a, x[:7]))
    torch.testing.assert_close(out[7:], alone(b, x[7:]))
    module.clear()
    module.set_route([None, None, "B"], counts)
    assert module(x)[0][:7].abs().sum() == 0


def test_room_and_count_are_checked_before_anything_changes():
    slot = dataclasses.replace(make_slot(capacity=10), max_adapters=2,
                               named=[{"name": "A", "n_facts": 6}, {"name": "B", "n_facts": 3}])
    check_adapter(make_adapter(7), slot, name="A")  # replacing A frees its 6 rows
    with pytest.raises(NKVCompatibilityError, match="6 rows are held by the other"):
        check_adapter(make_adapter(5), slot, name="B")
    with pytest.raises(NKVCompatibilityError, match="already holds 2 named adapters"):
        check_adapter(make_adapter(1), slot, name="C")
    with pytest.raises(NKVCompatibilityError, match="max_adapters"):
        check_adapter(make_adapter(1), make_slot(), name="C")


def test_tensor_parallel_ranks_route_alike_and_agree_with_one_device():
    a, b = make_adapter(5, seed=1), make_adapter(4, seed=2)
    x, names, counts = mixed_batch(a, b)

    def rank(r, all_reduce):
        module = routed(tp_rank=r, tp_size=2, all_reduce=all_reduce)
        module.load(a, name="A")
        module.load(b, name="B")
        module.set_route(names, counts)
        return module(key_slice(x, r))[0]

    outs = on_two_ranks(rank)
    single = routed()
    single.load(a, name="A")
    single.load(b, name="B")
    single.set_route(names, counts)
    want = single(x)[0]
    torch.testing.assert_close(outs[0], want)
    torch.testing.assert_close(outs[1], want)


def test_compiled_module_calls_the_routed_op_and_sees_new_routes_and_rows():
    a, b = make_adapter(5, seed=1), make_adapter(4, seed=2)
    module = routed()
    module.load(a, name="A")
    module.load(b, name="B")
    x, names, counts = mixed_batch(a, b)
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    module.set_route(names, counts)
    torch.testing.assert_close(compiled(x)[0], module(x)[0])
    module.set_route(["B", "A", None], counts)  # routes and rows change in place between steps
    module.load(make_adapter(3, seed=5), name="A")
    torch.testing.assert_close(compiled(x)[0], module(x)[0])
    assert compiled(x)[0][:4].abs().sum() > 0


# ------------------------------------------------------------------ changes on every rank, engine core checks
class RoutedRank(Rank):
    def __init__(self, fail: str | None = None) -> None:
        super().__init__(fail)
        self.module = routed(capacity=8)
        model = nn.Sequential(self.module)
        self.model_runner = types.SimpleNamespace(get_model=lambda: model)


class Scheduled(types.SimpleNamespace):
    pass


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return {"A": make_adapter(3, seed=1).save(tmp_path / "a.nkv"), "B": make_adapter(5, seed=2).save(tmp_path / "b.nkv")}


def test_named_loads_and_unloads_land_on_every_rank_and_abort_the_unloaded_adapters_requests(files):
    core = Core(RoutedRank(), RoutedRank())
    aborted: list[list[str]] = []
    core.abort_requests = aborted.append
    core.scheduler = types.SimpleNamespace(requests={
        rid: Scheduled(request_id=rid, client_index=0, sampling_params=types.SimpleNamespace(extra_args=extra))
        for rid, extra in [("r1", {"nkv": "A"}), ("r2", {"nkv": "B"}), ("r3", None)]})
    apply_swap(core, pin(files["A"], name="A")[0].to_dict())
    ranks = apply_swap(core, pin(files["B"], name="B")[0].to_dict())
    assert [[e["name"] for e in r["named"]] for r in ranks] == [["A", "B"]] * 2
    assert core._nkv_resident == {"A", "B"}
    check_requested(core, "A")
    ranks = apply_swap(core, unload("A").to_dict())
    assert aborted == [["r1"]] and core._nkv_resident == {"B"}
    assert [r.module.slot.rows_in_use for r in core.ranks] == [5, 5]
    with pytest.raises(NKVError, match="unknown NKV adapter 'A'"):
        check_requested(core, "A")
    with pytest.raises(NKVError, match="no rank changed"):  # 3 + 5 + 5 rows > capacity 8
        apply_swap(core, pin(files["B"], name="C")[0].to_dict())


def test_start_up_refuses_named_adapters_where_requests_cannot_be_routed():
    core = Core(RoutedRank())
    with pytest.raises(NKVError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        check_ranks(core)  # the simulated runner is not vLLM's V1 runner


def test_requests_naming_an_adapter_are_refused_unless_the_engine_holds_it():
    config = types.SimpleNamespace(additional_config={"nkv": {"capacity": 8, "layer": 1, "max_adapters": 2,
                                                              "adapters": {"A": "a.nkv"}}})
    check_client_request(config, "A")  # known from the start-up config
    with pytest.raises(Exception, match="unknown NKV adapter .B."):  # VLLMValidationError: HTTP 400
        check_client_request(config, "B")
    remember_client_resident(config, frozenset({"B"}))
    check_client_request(config, "B")
    assert client_resident(config) == {"B"}
    plain = types.SimpleNamespace(additional_config={"nkv": {"capacity": 8, "layer": 1}})
    with pytest.raises(Exception, match="not started with named adapters"):
        check_client_request(plain, "A")
    with pytest.raises(NKVError, match="not started with named adapters"):
        check_requested(types.SimpleNamespace(), "A")


def test_config_names_and_counts():
    cfg = NKVServeConfig.from_mapping({"max_adapters": 2, "adapters": {"A": "a.nkv", "B": {"adapter": "u/b",
                                                                                          "gamma": 0.7}}})
    assert cfg.routed and [a.name for a in cfg.adapters] == ["A", "B"] and cfg.adapters[1].gamma == 0.7
    with pytest.raises(NKVError) as info:
        NKVServeConfig.from_mapping({"max_adapters": 1, "adapters": {"A": "a", " b": "b"}, "capacity": 4})
    assert "not a valid adapter name" in str(info.value)
    with pytest.raises(NKVError, match="'max_adapters' is 1"):
        NKVServeConfig.from_mapping({"max_adapters": 1, "adapters": {"A": "a", "B": "b"}})


# ------------------------------------------------------------------ the server's `model` field
def test_server_routes_the_model_field_to_named_adapters_and_lists_them(files):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from fastapi.testclient import TestClient

    from nkv.loaders.vllm.routes import ModelFieldRouting, build_router
    from nkv.loaders.vllm.swap import SwapRequest

    core = Core(RoutedRank())
    apply_swap(core, pin(files["A"], name="A")[0].to_dict())
    seen: list[dict[str, Any]] = []

    class EngineCore:
        async def call_utility_async(self, method, request):
            return apply_swap(core, SwapRequest.from_dict(request).to_dict())

    class EngineClient:
        vllm_config = types.SimpleNamespace(additional_config={"nkv": {"capacity": 8, "layer": 1, "max_adapters": 2,
                                                                       "adapter_dirs": [str(files["A"].parent)]}})
        engine_core = EngineCore()

        async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            return core.collective_rpc(method, args=args)

    class Models:
        base_model_paths = [types.SimpleNamespace(name="base-model")]

        async def show_available_models(self):
            return types.SimpleNamespace(model_dump=lambda: {"object": "list", "data": [{"id": "base-model"}]})

    app = FastAPI()
    app.include_router(build_router())
    app.add_middleware(ModelFieldRouting)

    async def completions(request):  # stands in for vLLM's: records what it was given
        body = await request.json()
        seen.append(body)
        return JSONResponse({"model": body["model"], "choices": []})

    app.router.add_route("/v1/completions", completions, methods=["POST"])

    app.state.engine_client = EngineClient()
    app.state.openai_serving_models = Models()
    client = TestClient(app)

    reply = client.post("/v1/completions", json={"model": "A", "prompt": "x"})
    assert seen[-1]["model"] == "base-model" and seen[-1]["vllm_xargs"] == {"nkv": "A"}
    assert reply.json()["model"] == "A"  # the response names the adapter, as for a LoRA
    client.post("/v1/completions", json={"model": "base-model", "prompt": "x"})
    assert "vllm_xargs" not in seen[-1]  # the base model: no edits
    client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert seen[-1]["model"] == "nope"  # unknown: left to vLLM, which answers 404

    assert client.post("/v1/nkv/load", json={"adapter": str(files["B"]), "name": "B"}).status_code == 200
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed["A"]["parent"] == listed["B"]["parent"] == "base-model"
    client.post("/v1/completions", json={"model": "B", "prompt": "x"})
    assert seen[-1]["vllm_xargs"] == {"nkv": "B"}
    assert client.post("/v1/nkv/unload", json={"name": "A"}).json()["ranks"][0]["named"][0]["name"] == "B"
    assert client.post("/v1/nkv/unload", json={"name": "A"}).status_code == 400
    assert "A" not in {m["id"] for m in client.get("/v1/models").json()["data"]}


# ------------------------------------------------------------------ changes copy only the rows that change
def written_rows(module: NKVGatedProjection) -> tuple[int, int] | None:
    """(first row, rows) the staged change writes into the keys buffer, or None."""
    spans = [(at, len(values)) for buffer, at, values in module._staged.writes if buffer == "nkv_keys"]
    return (min(a for a, _ in spans), sum(n for _, n in spans)) if spans else None


def staged(module: NKVGatedProjection, adapter, name: str | None = None) -> tuple[int, int] | None:
    module.begin()
    module.stage(adapter, name=name)
    return written_rows(module)


def test_a_swap_copies_only_the_rows_that_changed():
    a = make_adapter(10, seed=1)
    module = routed(max_adapters=0, capacity=16)  # the engine-wide table
    module.load(a)
    assert module._digests is None and module._previous is None  # into empty buffers: no digests, no rollback copy
    extra = make_adapter(2, seed=9)
    grown = a.add([dataclasses.replace(f, id=f"x{i}", prompt=f"{f.prompt} (x{i})") for i, f in enumerate(extra.facts)],
                  extra.keys, extra.residuals)
    assert staged(module, grown) == (10, 2)  # rows 0-9 unchanged: not copied
    module.commit()
    assert staged(module, grown.remove(ids=["f9"])) == (9, 3)  # row 9 onwards shifts, row 11 becomes padding
    module.commit()
    x = torch.randn(5, D_KEY)
    x[0] = extra.keys[1]
    want = nkv_gate(x, grown.remove(ids=["f9"]).keys, key_inverse_norms(grown.remove(ids=["f9"]).keys),
                    grown.remove(ids=["f9"]).residuals, torch.tensor(0.5)).delta
    torch.testing.assert_close(module(x)[0], want)
    assert module.nkv_keys[11:].abs().sum() == 0  # padding stays inert
    assert staged(module, None) == (0, 11)  # clear: every used row back to padding


def test_named_adapters_go_into_free_rows_and_move_only_when_packing():
    a, b, c = make_adapter(5, seed=1), make_adapter(4, seed=2), make_adapter(6, seed=3)
    module = routed(capacity=16, max_adapters=3)
    module.load(a, name="A")
    module.load(b, name="B")  # rows 5-8
    assert staged(module, None, name="A") is None  # unloading writes nothing: A's rows are just unused
    module.commit()
    assert staged(module, make_adapter(3, seed=4), name="C") == (0, 3)  # into A's old rows, B stays
    module.commit()
    assert staged(module, c, name="C") == (9, 6)  # replaced by a larger C: the free tail, B stays
    module.commit()
    assert module.ranges["B"].start == 5
    assert staged(module, make_adapter(6, seed=5), name="A") == (0, 16)  # no gap of 6: B and C move down, A appended
    module.commit()
    x, names, counts = mixed_batch(a, b)
    module.set_route([None, None, "B"], counts)
    torch.testing.assert_close(module(x)[0][7:], alone(b, x[7:]))


def test_an_engine_without_named_adapters_says_so_after_a_swap_too(files):
    core = Core(Rank())  # max_adapters 0: the engine-wide adapter only
    apply_swap(core, pin(files["A"])[0].to_dict())
    with pytest.raises(NKVError, match="not started with named adapters"):
        check_requested(core, "A")
