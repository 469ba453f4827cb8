"""Worker-side methods for `collective_rpc`: swap, clear and inspect the gated module.

The load hook adds this class to the worker's bases when the engine starts with the
`nkv` config, so these methods exist without `worker_extension_cls`; passing
`worker_extension_cls="nkv.loaders.vllm.worker.NKVWorkerExtension"` works too.

Arguments and results are plain strings, numbers and dicts because collective_rpc
msgpack-encodes them between processes: an adapter travels as a path that every worker
reads itself (each rank keeps only its key slice), never as pickled tensors.
"""

from __future__ import annotations

from typing import Any

from nkv.errors import NKVError
from nkv.resolve import resolve_adapter

from .layer import gated_module, load_into


class NKVWorkerExtension:
    """Mixed into vLLM's worker class; `self.model_runner` is the worker's."""

    def _nkv_module(self) -> Any:
        module = gated_module(self.model_runner.get_model())  # type: ignore[attr-defined]
        if module is None:
            raise NKVError("this vLLM engine was started without the nkv config, so no gated module exists; "
                           "start it with additional_config={'nkv': {'capacity': N, 'layer': L}}")
        return module

    def nkv_info(self) -> dict[str, Any]:
        """This rank's SlotInfo as a dict."""
        return self._nkv_module().slot.to_dict()

    def nkv_load(self, source: str, revision: str | None = None, strict: bool = True,
                 gamma: float | None = None) -> dict[str, Any]:
        """Copy the adapter at `source` (path or repo id) into the preallocated buffers."""
        module = self._nkv_module()
        load_into(module, resolve_adapter(source, revision=revision), strict=strict, gamma=gamma, source=source,
                  revision=revision)
        return module.slot.to_dict()

    def nkv_clear(self) -> dict[str, Any]:
        """Remove every fact: outputs equal the base model's again."""
        module = self._nkv_module()
        module.clear()
        return module.slot.to_dict()


__all__ = ["NKVWorkerExtension"]
