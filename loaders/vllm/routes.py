"""HTTP routes for `vllm serve`: swap, clear and inspect the served adapter without restarting.

vLLM's `vllm.endpoint_plugins` group adds routes to the OpenAI-compatible server; such
plugins are opt-in (named in `VLLM_PLUGINS`), and pair with a general plugin that
installs the engine-side methods, which is what `plugin.py` + `worker.py` are:

    VLLM_PLUGINS=nkv vllm serve <model> --additional-config '{"nkv": {"capacity": 10000, "layer": 7}}'
    curl localhost:8000/v1/nkv                                             # what is loaded
    curl localhost:8000/v1/nkv/load -H 'Content-Type: application/json' \
         -d '{"adapter": "user/paris-edits"}'                              # swap in
    curl -X POST localhost:8000/v1/nkv/clear                               # remove all facts

These routes let any client change what the model answers: serve them behind
`--api-key` (it guards every /v1 route) or a proxy. The adapter path or repo id is
resolved on the server's machine. Errors come back as HTTP 400 with the NKV error's
class and message; the swap is checked (model, layer, capacity, fingerprint) from the
file's header before any worker is touched, and the prefix cache is reset after it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request  # the server's own dependency; this module loads only there
from fastapi.responses import JSONResponse

from nkv.errors import NKVError
from nkv.header import NKVHeader, read_header
from nkv.hub import fetch_adapter
from nkv.resolve import locate_adapter

from .slot import SlotInfo, check_adapter

PREFIX = "/v1/nkv"


class NKVEndpointPlugin:
    """The `vllm.endpoint_plugins` entry point object (entry point name: `nkv`)."""

    name = "nkv"
    required_tasks = ("generate",)

    def attach_router(self, app: Any) -> None:
        app.include_router(build_router())

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        state.nkv_engine_client = engine_client


def build_router() -> APIRouter:
    """The FastAPI router with GET /v1/nkv, POST /v1/nkv/load, POST /v1/nkv/clear."""
    router = APIRouter()

    def client(request: Request) -> Any:
        return getattr(request.app.state, "nkv_engine_client", None) or request.app.state.engine_client

    def failure(exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=400, content={"error": {"type": type(exc).__name__, "message": str(exc)}})

    @router.get(PREFIX)
    async def info(request: Request) -> Any:
        try:
            return {"ranks": await _rpc(client(request), "nkv_info")}
        except NKVError as exc:
            return failure(exc)

    @router.post(PREFIX + "/load")
    async def load(request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("adapter"), str):
            return failure(NKVError('request body must be a JSON object like {"adapter": "path or user/repo", '
                                    '"revision": null, "strict": true, "gamma": null}'))
        source, revision = body["adapter"], body.get("revision")
        strict, gamma = bool(body.get("strict", True)), body.get("gamma")
        try:
            engine = client(request)
            slot = SlotInfo.from_dict((await _rpc(engine, "nkv_info"))[0])
            # Header only (no tensors) in the server process: cheap, and off the event loop.
            header = await asyncio.to_thread(adapter_header, source, revision)
            check_adapter(header, slot, strict=strict)
            ranks = await _rpc(engine, "nkv_load", (source, revision, strict, gamma))
            await engine.reset_prefix_cache(reset_running_requests=True)
            return {"ranks": ranks}
        except NKVError as exc:
            return failure(exc)

    @router.post(PREFIX + "/clear")
    async def clear(request: Request) -> Any:
        try:
            engine = client(request)
            ranks = await _rpc(engine, "nkv_clear")
            await engine.reset_prefix_cache(reset_running_requests=True)
            return {"ranks": ranks}
        except NKVError as exc:
            return failure(exc)

    return router


async def _rpc(engine: Any, method: str, args: tuple = ()) -> list[dict[str, Any]]:
    try:
        return await engine.collective_rpc(method, args=args)
    except NotImplementedError:
        raise NKVError("the engine's workers have no NKV methods: start the server with "
                       "--additional-config '{\"nkv\": {\"capacity\": N, \"layer\": L}}'") from None
    except NKVError:
        raise
    except Exception as exc:  # errors raised in the engine process arrive re-wrapped
        raise NKVError(f"{method} failed in the engine: {exc}") from None


def adapter_header(source: str, revision: str | None = None) -> NKVHeader:
    """The validated header of the adapter at `source` (file, folder or Hub repo id on the server's machine)."""
    where = locate_adapter(source)
    if where.path is not None:
        return read_header(where.path)
    assert where.repo_id is not None  # a string source is never an in-memory adapter
    return read_header(fetch_adapter(where.repo_id, revision=revision))


__all__ = ["NKVEndpointPlugin", "build_router", "adapter_header", "PREFIX"]
