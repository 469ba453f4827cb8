"""HTTP routes for `vllm serve`: swap, clear and inspect the served adapter without restarting.

vLLM's `vllm.endpoint_plugins` group adds routes to the OpenAI-compatible server; such
plugins are opt-in (named in `VLLM_PLUGINS`), and pair with a general plugin that
installs the engine-side methods, which is what `plugin.py` + `worker.py` are:

    VLLM_PLUGINS=nkv vllm serve <model> --api-key $KEY --additional-config \
        '{"nkv": {"capacity": 10000, "layer": 7, "hub_repos": ["user/*"], "adapter_dirs": ["/srv/nkv"]}}'
    curl localhost:8000/v1/nkv -H "Authorization: Bearer $KEY"             # what is loaded
    curl localhost:8000/v1/nkv/load -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
         -d '{"adapter": "user/paris-edits"}'                              # swap in
    curl -X POST localhost:8000/v1/nkv/clear -H "Authorization: Bearer $KEY"  # remove all facts

The routes change what the model answers, so they are locked down (threat model: README):

* `POST /v1/nkv/load` reads only .nkv files under the folders listed in the config's
  `adapter_dirs` (after resolving symlinks) and Hub repos listed in `hub_repos`; any
  other path or repo is refused before anything is opened;
* errors name the rule that refused the request, never the bytes of a file;
* they sit under /v1, which `vllm serve --api-key` guards: serve them behind it or a proxy.

A change is pinned and checked (model, layer, capacity, fingerprint) from the file's
header in the server process, then applied by the engine core between two steps, on
every rank or none, with the prefix cache reset (swap.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request  # the server's own dependency; this module loads only there
from fastapi.responses import JSONResponse

from nkv.compat import check_gamma
from nkv.errors import NKVError, NKVFormatError
from nkv.header import NKVHeader, read_header
from nkv.resolve import looks_like_repo_id

from .config import NKVServeConfig, section_of
from .slot import SlotInfo, check_adapter
from .swap import CLEAR, SwapRequest, call_engine_async, pin

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
        revision, strict, gamma = body.get("revision"), body.get("strict", True), body.get("gamma")
        try:
            if revision is not None and not isinstance(revision, str):
                raise NKVError('"revision" must be a string or null')
            if not isinstance(strict, bool):
                raise NKVError('"strict" must be true or false')
            gamma = None if gamma is None else check_gamma(gamma, '"gamma"')
            engine = client(request)
            source = allowed_source(body["adapter"], serve_config(engine))
            slot = SlotInfo.from_dict((await _rpc(engine, "nkv_info"))[0])
            # Pinned and header-checked in the server process (no tensors), off the event loop.
            swap, header = await asyncio.to_thread(pinned_header, source, revision, strict, gamma)
            check_adapter(header, slot, strict=strict)
            return {"ranks": await call_engine_async(engine, swap)}
        except NKVFormatError as exc:  # its problems may quote the file: say which rule, not what it holds
            return failure(NKVFormatError(body["adapter"], [f"not a valid NKV adapter ({len(exc.problems)} "
                                                            "problem(s)); run `nkv validate` on it"]))
        except NKVError as exc:
            return failure(exc)

    @router.post(PREFIX + "/clear")
    async def clear(request: Request) -> Any:
        try:
            return {"ranks": await call_engine_async(client(request), CLEAR)}
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


def serve_config(engine: Any) -> NKVServeConfig:
    """The engine's parsed `nkv` section (what the routes may read comes from it)."""
    section = section_of(engine.vllm_config.additional_config)
    if section is None:
        raise NKVError("the engine was started without NKV: start the server with "
                       "--additional-config '{\"nkv\": {\"capacity\": N, \"layer\": L, \"adapter_dirs\": [...]}}'")
    return NKVServeConfig.from_mapping(section)


def allowed_source(source: str, config: NKVServeConfig) -> str:
    """`source` if the config lets HTTP clients load it, else NKVError; reads nothing.

    A path must name an .nkv file (or a folder) that, with symlinks resolved, lies under one
    of `adapter_dirs`; a Hub repo id must be listed in `hub_repos` (or its owner as "owner/*").
    """
    if looks_like_repo_id(source) and not Path(source).exists():
        owner = source.split("/")[0]
        if source in config.hub_repos or f"{owner}/*" in config.hub_repos:
            return source
        raise NKVError(f"Hub repo {source!r} is not in this server's additional_config nkv.hub_repos "
                       f"({list(config.hub_repos) or 'none'}); add it there and restart the server")
    path = Path(source).resolve()
    roots = [Path(d).resolve() for d in config.adapter_dirs]
    inside = any(path == root or root in path.parents for root in roots)
    if not inside or (path.suffix != ".nkv" and not path.is_dir()):
        raise NKVError(f"{source!r} is not an .nkv file under this server's additional_config nkv.adapter_dirs "
                       f"({list(config.adapter_dirs) or 'none'}); the routes read nothing else. Put the adapter "
                       "in one of those folders, or list its folder there and restart the server")
    return str(path)


def pinned_header(source: str, revision: str | None, strict: bool,
                  gamma: float | None) -> tuple[SwapRequest, NKVHeader]:
    """The request every rank loads (path or Hub commit, digest) and the file's validated header."""
    request, local = pin(source, revision, strict=strict, gamma=gamma)
    return request, read_header(local)


__all__ = ["NKVEndpointPlugin", "build_router", "allowed_source", "serve_config", "PREFIX"]
