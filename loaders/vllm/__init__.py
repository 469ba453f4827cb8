"""Serve NKV adapters in vLLM (offline `LLM` and `vllm serve`).

One file per concern:
  config.py     the `nkv` section of additional_config
  slot.py       the gated module's description (plain data) and adapter checks
  layer.py      NKVGatedProjection: the row-parallel projection + nkv_gate, capacity buffers
  load_hook.py  attaches the module while vLLM loads the model (before compilation)
  plugin.py     the vllm.general_plugins entry point that installs the hook and the guard
  guard.py      fail closed: the engine refuses to start unless every rank holds the module
  swap.py       one change of rows, pinned (path or commit + sha256), applied between steps on all ranks or none
  worker.py     collective_rpc methods (nkv_info / nkv_prepare / nkv_commit / nkv_rollback)
  attach.py     load_nkv_adapter(llm, ...) and NKVEngineHandle (swap, add, remove, clear)
  routes.py     HTTP routes for `vllm serve` (a vllm.endpoint_plugins entry point)

Importing this package does not import vLLM; the modules that need it import it lazily.
"""

from __future__ import annotations

__all__: list[str] = []
