"""The `vllm.general_plugins` entry point (`nkv = "nkv.loaders.vllm.plugin:register"`).

vLLM calls `register()` in every process it starts (engine core, each worker, the API
server), possibly more than once, for every engine, whether or not it uses NKV. So it
only installs the load-time hook, once per process; engines whose `additional_config`
has no `nkv` section load exactly as before.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.nkv")  # vLLM's handlers and format


def register() -> None:
    """Install NKV's model-load hook in this process (idempotent)."""
    try:
        from .load_hook import install

        install()
    except Exception:  # never break engines that do not use NKV because of NKV
        logger.exception("NKV: could not install the vLLM load hook; engines started with "
                         "additional_config['nkv'] will run WITHOUT the edits")


__all__ = ["register"]
