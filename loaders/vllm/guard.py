"""Fail closed: an engine started with an `nkv` section serves with the adapter attached
on every rank, or refuses to start with one error.

Installed on vLLM's `EngineCore` (the process that schedules steps) by the plugin:

* `nkv_apply`: the utility method that applies a swap/add/remove/clear between steps
  (swap.apply_swap);
* a check that runs once the workers have loaded the model, before the KV cache is
  allocated and the model compiled: every rank must report a gated module
  (`nkv_info`), and all ranks the same rows (source, commit, digest, fingerprint). A
  load hook that could not be installed, or a model loader that bypassed it, therefore
  stops the engine instead of serving the base model silently. With named adapters,
  every rank's model runner must also route requests to them (router.py);
* request checks for named adapters: a request naming an adapter the engine does not
  hold is refused (never served by the base model), and its name is added to the
  request's prefix-cache salt, so KV blocks computed under one adapter are never reused
  by a request for another (as vLLM keys cached blocks by LoRA).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from nkv.errors import NKVError

from .config import REQUEST_KEY, client_resident, requested_adapter, section_of
from .swap import UTILITY, apply_swap, remember_resident

_MARK = "_nkv_checked"
# Fields every rank must agree on (tp_rank differs by design).
_SAME_ON_EVERY_RANK = ("module", "capacity", "n_facts", "gamma", "source", "revision", "digest", "fingerprint",
                       "max_adapters", "named", "routing", "sketch", "shortlist")


def install(hook_error: Callable[[], str | None]) -> None:
    """Add `nkv_apply` and the start-up check to EngineCore (idempotent).

    `hook_error()` returns why this process's load hook could not be installed, or None.
    """
    from vllm.v1.engine.core import EngineCore

    setattr(EngineCore, UTILITY, lambda self, request: apply_swap(self, request))
    original = EngineCore._initialize_kv_caches
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def initialize_kv_caches(self: Any, *args: Any, **kwargs: Any) -> Any:
        if section_of(self.vllm_config.additional_config) is not None:
            check_ranks(self, hook_error())
        return original(self, *args, **kwargs)

    setattr(initialize_kv_caches, _MARK, True)
    EngineCore._initialize_kv_caches = initialize_kv_caches
    _install_request_checks(EngineCore)
    _install_client_check()


def _install_client_check() -> None:
    """Refuse, in the caller's process, a request naming an adapter the engine does not hold:
    `llm.generate` raises vLLM's VLLMValidationError and the server answers 400, before the
    engine sees it."""
    from vllm.v1.engine.input_processor import InputProcessor

    validate = InputProcessor._validate_params

    @functools.wraps(validate)
    def _validate_params(self: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        result = validate(self, params, *args, **kwargs)
        name = requested_adapter(params)
        if name is not None:
            check_client_request(self.vllm_config, name)
        return result

    InputProcessor._validate_params = _validate_params


def check_client_request(vllm_config: Any, name: Any) -> None:
    """VLLMValidationError (HTTP 400) unless the engine of `vllm_config` holds named adapter `name`,
    as far as this process knows."""
    section = section_of(vllm_config.additional_config)
    named = isinstance(section, dict) and bool(section.get("max_adapters"))
    problem = adapter_problem(name, client_resident(vllm_config) if named else None)
    if problem is not None:
        raise _client_error(problem)


def _client_error(message: str) -> Exception:
    """vLLM's validation error (the server answers 400 with `message`); ValueError without vLLM."""
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:
        return ValueError(message)
    return VLLMValidationError(message, parameter="vllm_xargs")


def _install_request_checks(engine_core: type) -> None:
    """Refuse requests for adapters the engine does not hold; salt the prefix cache by adapter."""
    preprocess, add = engine_core.preprocess_add_request, engine_core.add_request

    @functools.wraps(preprocess)
    def preprocess_add_request(self: Any, request: Any) -> Any:
        name = requested_adapter(request.sampling_params)
        if name is not None:
            check_requested(self, name)
            # Cached KV blocks past the edit layer depend on the adapter: hash them apart.
            request.cache_salt = f"{request.cache_salt or ''}|{REQUEST_KEY}:{name}"
        return preprocess(self, request)

    @functools.wraps(add)
    def add_request(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        name = requested_adapter(request.sampling_params)
        if name is not None and adapter_problem(name, getattr(self, "_nkv_resident", None)) is not None:
            # Checked when it arrived, unloaded since (a change ran in between): finish it, never serve it unedited.
            refuse = getattr(self, "_send_error_outputs_to_client", None)
            if refuse is None:
                check_requested(self, name)
            refuse([request.request_id], request.client_index)
            return None
        return add(self, request, *args, **kwargs)

    setattr(preprocess_add_request, _MARK, True)
    setattr(add_request, _MARK, True)
    engine_core.preprocess_add_request = preprocess_add_request
    engine_core.add_request = add_request


def check_requested(core: Any, name: Any) -> None:
    """NKVError unless the engine core holds named adapter `name`."""
    problem = adapter_problem(name, getattr(core, "_nkv_resident", None))
    if problem is not None:
        raise NKVError(problem)


def adapter_problem(name: Any, resident: frozenset[str] | None) -> str | None:
    """Why a request naming adapter `name` cannot be served (None: it can). `resident` is the
    engine's named adapters, None when it was started without them."""
    if resident is None:
        return (f"the request names NKV adapter {name!r} (extra_args {{'{REQUEST_KEY}': ...}}), but this engine was "
                "not started with named adapters (additional_config={'nkv': {'max_adapters': N, ...}})")
    if name not in resident:
        return (f"unknown NKV adapter {name!r}: this engine holds {sorted(resident) or 'none'}; load it first "
                "(handle.load / POST /v1/nkv/load with a name)")
    return None


def check_ranks(core: Any, hook_error: str | None = None) -> list[dict[str, Any]]:
    """Every rank's SlotInfo dict, or NKVError when a rank has no gated module or ranks disagree."""
    refuse = ("additional_config has an 'nkv' section, but {why}; the engine refuses to start rather than "
              "serve the model without the edits")
    if hook_error is not None:
        raise NKVError(refuse.format(why=f"NKV could not install its vLLM load hook ({hook_error}); install an "
                                         "nkv release that supports this vLLM version"))
    try:
        ranks = core.collective_rpc("nkv_info")
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise NKVError(refuse.format(
            why=f"a worker has no gated module ({first}): its model loader did not run NKV's load hook (a loader "
                "that overrides load_model without calling BaseModelLoader.load_model, or the nkv plugin missing "
                "from that worker's environment; VLLM_PLUGINS must include 'nkv' if set)")) from None
    for field in _SAME_ON_EVERY_RANK:
        values = {str(rank.get(field)) for rank in ranks}
        if len(values) > 1:
            raise NKVError(refuse.format(why=f"the ranks disagree on the gated module's {field} ({sorted(values)})"))
    if ranks and ranks[0].get("max_adapters") and not ranks[0].get("routing"):
        raise NKVError(refuse.format(why="it asks for named adapters (max_adapters), and this vLLM's model runner "
                                         "cannot route requests to them (only the V1 runner is supported: set "
                                         "VLLM_USE_V2_MODEL_RUNNER=0)"))
    if ranks:
        remember_resident(core, ranks[0])
    return ranks


__all__ = ["install", "check_ranks", "check_requested", "check_client_request", "adapter_problem"]
