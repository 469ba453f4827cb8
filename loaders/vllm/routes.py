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

With named adapters (`"max_adapters": N` in the config), `POST /v1/nkv/load` with a
`"name"` loads one under that name and `POST /v1/nkv/unload {"name": ...}` drops it; a
completion or chat request chooses one through its `model` field (like `--lora-modules`)
or `"vllm_xargs": {"nkv": name}`, and `/v1/models` lists each with the base model as
`parent`. A request whose `model` is the base model gets no edits.

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
import json
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request  # the server's own dependency; this module loads only there
from fastapi.responses import JSONResponse

from nkv.compat import check_gamma
from nkv.errors import NKVError, NKVFormatError
from nkv.header import NKVHeader, read_header
from nkv.resolve import looks_like_repo_id

from .config import (REQUEST_KEY, NKVServeConfig, check_name, client_resident, remember_client_resident,
                     section_of)
from .slot import SlotInfo, check_adapter
from .swap import CLEAR, SwapRequest, call_engine_async, pin, resident_names, unload

PREFIX = "/v1/nkv"


class NKVEndpointPlugin:
    """The `vllm.endpoint_plugins` entry point object (entry point name: `nkv`)."""

    name = "nkv"
    required_tasks = ("generate",)

    def attach_router(self, app: Any) -> None:
        app.include_router(build_router())
        app.add_middleware(ModelFieldRouting)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        state.nkv_engine_client = engine_client


def build_router() -> APIRouter:
    """The FastAPI router: GET /v1/nkv, POST /v1/nkv/load, /clear, /unload, and GET /v1/models."""
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
        body = await _json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("adapter"), str):
            return failure(NKVError('request body must be a JSON object like {"adapter": "path or user/repo", '
                                    '"name": null, "revision": null, "strict": true, "gamma": null}'))
        revision, strict, gamma = body.get("revision"), body.get("strict", True), body.get("gamma")
        name = body.get("name")
        try:
            if name is not None:
                check_name(name, '"name"')
            if revision is not None and not isinstance(revision, str):
                raise NKVError('"revision" must be a string or null')
            if not isinstance(strict, bool):
                raise NKVError('"strict" must be true or false')
            gamma = None if gamma is None else check_gamma(gamma, '"gamma"')
            engine = client(request)
            source = allowed_source(body["adapter"], serve_config(engine))
            slot = SlotInfo.from_dict((await _rpc(engine, "nkv_info"))[0])
            # Pinned and header-checked in the server process (no tensors), off the event loop.
            swap, header = await asyncio.to_thread(pinned_header, source, revision, strict, gamma, name)
            check_adapter(header, slot, strict=strict, name=name)
            return {"ranks": await changed(engine, swap)}
        except NKVFormatError as exc:  # its problems may quote the file: say which rule, not what it holds
            return failure(NKVFormatError(body["adapter"], [f"not a valid NKV adapter ({len(exc.problems)} "
                                                            "problem(s)); run `nkv validate` on it"]))
        except NKVError as exc:
            return failure(exc)

    @router.post(PREFIX + "/clear")
    async def clear(request: Request) -> Any:
        try:
            return {"ranks": await changed(client(request), CLEAR)}
        except NKVError as exc:
            return failure(exc)

    @router.post(PREFIX + "/unload")
    async def unload_named(request: Request) -> Any:
        body = await _json_body(request)
        try:
            name = check_name(body.get("name") if isinstance(body, dict) else None, '"name"')
            engine = client(request)
            if name not in await refreshed_resident(engine, force=True):
                raise NKVError(f"the engine holds no adapter named {name!r}")
            return {"ranks": await changed(engine, unload(name))}
        except NKVError as exc:
            return failure(exc)

    @router.get("/v1/models")
    async def models(request: Request) -> Any:
        """vLLM's model list (base model, LoRA adapters) plus one card per named NKV adapter."""
        listed = (await request.app.state.openai_serving_models.show_available_models()).model_dump()
        engine = client(request)
        base = listed["data"][0]["id"] if listed["data"] else None
        try:
            ranks = await _rpc(engine, "nkv_info")
        except NKVError:
            return JSONResponse(content=listed)
        remember_client_resident(engine.vllm_config, resident_names(ranks[0]))
        for entry in ranks[0].get("named", []):
            listed["data"].append({"id": entry["name"], "object": "model", "created": int(time.time()),
                                   "owned_by": "vllm", "root": entry["source"], "parent": base,
                                   "max_model_len": None, "permission": []})
        return JSONResponse(content=listed)

    return router


async def _json_body(request: Request) -> Any:
    """The request's JSON body, or None when it is not JSON."""
    try:
        return await request.json()
    except ValueError:
        return None


async def changed(engine: Any, swap: SwapRequest) -> list[dict[str, Any]]:
    """Apply one change in the engine; this process then knows which named adapters are resident."""
    ranks = await call_engine_async(engine, swap)
    remember_client_resident(engine.vllm_config, resident_names(ranks[0]))
    return ranks


_REFRESH_S = 1.0  # an unknown name re-reads the engine's names at most this often
_last_refresh: dict[int, float] = {}


async def refreshed_resident(engine: Any, force: bool = False) -> frozenset[str]:
    """The engine's named adapters: this process's record, re-read from the engine when stale
    (another API server process may have loaded one)."""
    now = time.monotonic()
    if force or now - _last_refresh.get(id(engine), 0.0) >= _REFRESH_S:
        _last_refresh[id(engine)] = now
        ranks = await _rpc(engine, "nkv_info")
        remember_client_resident(engine.vllm_config, resident_names(ranks[0]))
    return client_resident(engine.vllm_config)


class ModelFieldRouting:
    """ASGI middleware: a completion or chat request whose `model` is a named NKV adapter is
    passed to vLLM as a request for the base model with `vllm_xargs: {"nkv": name}`, and the
    response names the adapter again, as vLLM's `--lora-modules` do for LoRA names."""

    PATHS = ("/v1/completions", "/v1/chat/completions")

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.PATHS:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        name, body = await self._route(scope, body)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = {**scope, "headers": headers + [(b"content-length", str(len(body)).encode())]}
        await self.app(scope, replay, send if name is None else _renaming(send, name))

    async def _route(self, scope: dict, body: bytes) -> tuple[str | None, bytes]:
        try:
            payload = json.loads(body)
        except ValueError:
            return None, body
        if not isinstance(payload, dict):
            return None, body
        state = scope["app"].state
        engine = getattr(state, "nkv_engine_client", None) or getattr(state, "engine_client", None)
        if engine is None or section_of(engine.vllm_config.additional_config) is None:
            return None, body
        model, xargs = payload.get("model"), payload.get("vllm_xargs")
        asked = xargs.get(REQUEST_KEY) if isinstance(xargs, dict) else None
        served = {p.name for p in state.openai_serving_models.base_model_paths}
        wanted = asked if isinstance(asked, str) else model if isinstance(model, str) and model not in served else None
        if wanted is None:
            return None, body
        try:
            resident = client_resident(engine.vllm_config)
            if wanted not in resident:
                resident = await refreshed_resident(engine)
        except NKVError:
            return None, body
        if asked is not None or model not in resident:
            return None, body  # vLLM answers: 404 for an unknown model, 400 for an unknown vllm_xargs name
        payload["model"] = state.openai_serving_models.base_model_paths[0].name
        payload["vllm_xargs"] = {**(xargs if isinstance(xargs, dict) else {}), REQUEST_KEY: model}
        return model, json.dumps(payload).encode()


async def _read_body(receive: Any) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def _renaming(send: Any, name: str) -> Any:
    """A `send` that writes `name` into the "model" field of JSON bodies and of each server-sent event."""
    start: dict | None = None
    started = False  # the response start went out (streaming)
    buffered: list[bytes] = []

    async def renamed(message: dict) -> None:
        nonlocal start, started
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body" or start is None:
            await send(message)
            return
        headers = dict(start.get("headers", []))
        streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
        if streaming:
            if not started:
                started = True
                await send(start)
            await send({**message, "body": _rename_events(message.get("body", b""), name)})
            return
        buffered.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = _rename_json(b"".join(buffered), name)
        start["headers"] = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"] + \
            [(b"content-length", str(len(body)).encode())]
        await send(start)
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return renamed


def _rename_json(body: bytes, name: str) -> bytes:
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    if isinstance(payload, dict) and "model" in payload:
        payload["model"] = name
        return json.dumps(payload).encode()
    return body


def _rename_events(chunk: bytes, name: str) -> bytes:
    lines = []
    for line in chunk.split(b"\n"):
        if line.startswith(b"data: ") and line[6:].strip() not in (b"", b"[DONE]"):
            line = b"data: " + _rename_json(line[6:], name)
        lines.append(line)
    return b"\n".join(lines)


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


def pinned_header(source: str, revision: str | None, strict: bool, gamma: float | None,
                  name: str | None = None) -> tuple[SwapRequest, NKVHeader]:
    """The request every rank loads (path or Hub commit, digest) and the file's validated header."""
    request, local = pin(source, revision, strict=strict, gamma=gamma, name=name)
    return request, read_header(local)


__all__ = ["NKVEndpointPlugin", "ModelFieldRouting", "build_router", "allowed_source", "serve_config", "PREFIX"]
