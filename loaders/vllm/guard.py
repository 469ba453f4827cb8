"""Fail closed: an engine started with an `nkv` section serves with the adapter attached
on every rank, or refuses to start with one error.

Installed on vLLM's `EngineCore` (the process that schedules steps) by the plugin:

* `nkv_apply`: the utility method that applies a swap/add/remove/clear between steps
  (swap.apply_swap);
* a check that runs once the workers have loaded the model, before the KV cache is
  allocated and the model compiled: every rank must report a gated module
  (`nkv_info`), and all ranks the same rows (source, commit, digest, fingerprint). A
  load hook that could not be installed, or a model loader that bypassed it, therefore
  stops the engine instead of serving the base model silently.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from nkv.errors import NKVError

from .config import section_of
from .swap import UTILITY, apply_swap

_MARK = "_nkv_checked"
# Fields every rank must agree on (tp_rank differs by design).
_SAME_ON_EVERY_RANK = ("module", "capacity", "n_facts", "gamma", "source", "revision", "digest", "fingerprint")


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
    return ranks


__all__ = ["install", "check_ranks"]
