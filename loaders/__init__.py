"""Attaching NKV adapters to the runtimes people serve models with.

`load_nkv_adapter(target, adapter)` dispatches on `target` through a small registry:
built-in loaders for transformers models and vLLM engines, plus any third-party loader
published under the entry-point group `nkv.loaders` (an object with `name`,
`can_attach(target) -> bool` and `attach(target, adapter, **options)`).
"""

from __future__ import annotations

from .registry import Loader, load_nkv_adapter, register_loader, registered_loaders

__all__ = ["load_nkv_adapter", "register_loader", "registered_loaders", "Loader"]
