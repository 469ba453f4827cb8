"""The `vllm.general_plugins` entry point (`nkv = "nkv.loaders.vllm.plugin:register"`).

vLLM calls `register()` in every process it starts (engine core, each worker, the API
server), possibly more than once, for every engine, whether or not it uses NKV. So it
installs, once per process, the load-time hook (load_hook.py) and the engine-side guard
(guard.py); engines whose `additional_config` has no `nkv` section load exactly as before.

Fail closed: if the load hook cannot be installed, engines without NKV still start, but
one started with an `nkv` section refuses to start (guard.py) and says why, instead of
serving the base model as if it were edited.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.nkv")  # vLLM's handlers and format

_hook_error: str | None = None  # why the load hook could not be installed in this process


def register() -> None:
    """Install NKV's engine guard and model-load hook in this process (idempotent)."""
    global _hook_error
    from .guard import install as install_guard

    install_guard(lambda: _hook_error)
    try:
        from .load_hook import install

        install()
        _hook_error = None
    except Exception as exc:  # engines without NKV keep working; the guard stops those with it
        _hook_error = f"{type(exc).__name__}: {exc}"
        logger.exception("NKV: could not install the vLLM load hook; engines started with "
                         "additional_config['nkv'] will refuse to start")


__all__ = ["register"]
