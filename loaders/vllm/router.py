"""Per-request adapters: before every step, tell the gated module which adapter each token uses.

vLLM's model runner lays a step's tokens out request by request (`input_batch.req_ids`,
`num_scheduled_tokens`), the layout vLLM's LoRA support turns into its per-token LoRA
mapping in `_prepare_inputs`. `install()` wraps that method (once per process) so that,
on an engine with named adapters, it also writes each token's adapter index into the
gated module's `nkv_route` buffer: the adapter named by the request's
`SamplingParams.extra_args["nkv"]`, the engine-wide adapter (if any) when it names none.

Only vLLM's V1 model runner (`GPUModelRunner`, which the CPU runner extends) is wrapped.
A worker whose runner is another class reports `routing: False`, and the start-up guard
refuses an engine with named adapters there rather than serve every request unedited.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from .config import requested_adapter
from .layer import NKVGatedProjection, gated_module

_MARK = "_nkv_routes"
_MISSING = object()


def install() -> None:
    """Wrap `GPUModelRunner._prepare_inputs` (idempotent)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._prepare_inputs
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def _prepare_inputs(self: Any, scheduler_output: Any, num_scheduled_tokens: np.ndarray, *args: Any,
                        **kwargs: Any) -> Any:
        result = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        module = _routed_module(self)
        if module is not None:
            batch = self.input_batch
            names = [requested_adapter(self.requests[rid].sampling_params) for rid in batch.req_ids[: batch.num_reqs]]
            module.set_route(names, num_scheduled_tokens)
        return result

    setattr(_prepare_inputs, _MARK, True)
    GPUModelRunner._prepare_inputs = _prepare_inputs


def routes(model_runner: Any) -> bool:
    """Whether this worker's model runner writes the per-token routing before each step."""
    return bool(getattr(getattr(type(model_runner), "_prepare_inputs", None), _MARK, False))


def _routed_module(runner: Any) -> NKVGatedProjection | None:
    module = runner.__dict__.get("_nkv_routed", _MISSING)
    if module is _MISSING:
        found = gated_module(runner.get_model())
        module = found if found is not None and found.routed else None
        runner._nkv_routed = module
    return module


__all__ = ["install", "routes"]
