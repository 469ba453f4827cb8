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

from .layer import gated_module
from .router import routes
from .slot import check_adapter
from .swap import SwapRequest, read_pinned


class NKVWorkerExtension:
    """Mixed into vLLM's worker class; `self.model_runner` is the worker's.

    Changes go through `swap.apply_swap` in the engine core, which calls nkv_prepare on
    every rank, then nkv_commit, and nkv_rollback on every rank if any of them failed.
    """

    def _nkv_module(self) -> Any:
        module = gated_module(self.model_runner.get_model())  # type: ignore[attr-defined]
        if module is None:
            raise NKVError("this vLLM engine was started without the nkv config, so no gated module exists; "
                           "start it with additional_config={'nkv': {'capacity': N, 'layer': L}}")
        return module

    def nkv_info(self) -> dict[str, Any]:
        """This rank's SlotInfo as a dict (with `routing`: whether its runner routes requests)."""
        return {**self._nkv_module().slot.to_dict(), "routing": routes(self.model_runner)}  # type: ignore[attr-defined]

    def nkv_prepare(self, request: dict[str, Any], change: str) -> dict[str, Any]:
        """Read and check the requested adapter, stage this rank's rows; the live rows stay as they are."""
        module = self._nkv_module()
        module.begin(change)
        swap = SwapRequest.from_dict(request)
        if swap.source is None:
            module.stage(None, name=swap.name)
        else:
            adapter = read_pinned(swap)
            check_adapter(adapter, module.slot, strict=swap.strict, name=swap.name)
            module.stage(adapter, gamma=swap.gamma, source=swap.source, revision=swap.revision, digest=swap.digest,
                         name=swap.name)
        return module.slot.to_dict()

    def nkv_commit(self) -> dict[str, Any]:
        """Copy the staged rows into the live buffers."""
        module = self._nkv_module()
        module.commit()
        return module.slot.to_dict()

    def nkv_rollback(self, change: str) -> dict[str, Any]:
        """Drop staged rows and undo this change's commit, if there was one."""
        module = self._nkv_module()
        module.rollback(change)
        return module.slot.to_dict()


__all__ = ["NKVWorkerExtension"]
