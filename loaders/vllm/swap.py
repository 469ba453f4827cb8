"""One change of the engine's rows (swap, add, remove, clear), the same on every rank, between steps.

Caller side (attach.py, routes.py): `pin()` turns what the user passed into a `SwapRequest`
that every rank reads identically: an absolute path, or a Hub repo id pinned to the one
commit the caller fetched, plus the sha256 of the file's bytes, which each rank checks.
At start-up each rank reads its start adapters itself (`pin_and_read`: read and hashed once),
and the engine refuses to start unless every rank's digest is the same (guard.py).

Engine side (`apply_swap`, vLLM's EngineCore method `nkv_apply`): the engine core runs
utility calls between engine steps, never during a forward, so in one call

1. every rank stages the new rows (`nkv_prepare`: read, check digest, check fit); if any
   rank fails, every rank drops what it staged (`nkv_rollback`): nothing changed;
2. every rank commits (copies the staged rows into its buffers, keeping the old ones);
   if any rank fails, every rank puts its old rows back (`nkv_rollback`);
3. the prefix cache is reset and running requests are preempted, so no request goes on
   decoding from KV blocks computed with the old rows; unloading a named adapter first
   aborts the requests that name it (they finish with reason "abort").

The next step therefore sees the new rows on every rank, and every request's tokens come
from one adapter: the one live when it was (re)scheduled.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nkv.adapter import NKVAdapter
from nkv.errors import NKVError
from nkv.hub import fetch
from nkv.resolve import locate_adapter

from .config import requested_adapter

UTILITY = "nkv_apply"  # the EngineCore method name clients call


@dataclass(frozen=True)
class SwapRequest:
    """What every rank loads: plain data, since it crosses process boundaries (msgpack)."""

    source: str | None  # absolute path or Hub repo id; None clears (unloads) the adapter
    revision: str | None = None  # the commit a repo id was pinned to
    digest: str | None = None  # sha256 of the file's bytes
    strict: bool = True
    gamma: float | None = None
    name: str | None = None  # a named adapter (engines with max_adapters); None: the engine-wide one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SwapRequest":
        return cls(**data)


CLEAR = SwapRequest(source=None)


def unload(name: str) -> SwapRequest:
    """The change that unloads named adapter `name`."""
    return SwapRequest(source=None, name=name)


def file_digest(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _located(source: str | os.PathLike, revision: str | None) -> tuple[str, str | None, Path]:
    """(the request's source, its pinned revision, the local file) for a path or a Hub repo id.

    A Hub repo id is fetched here and pinned to the commit that was downloaded, so a branch
    that moves while ranks read it cannot give them different bytes.
    """
    where = locate_adapter(source)
    if where.path is not None:
        path = where.path.resolve()
        return str(path), None, path
    assert where.repo_id is not None  # a str/PathLike source is never an in-memory adapter
    fetched = fetch(where.repo_id, revision)
    return where.repo_id, fetched.commit or revision, Path(fetched.path)


def pin(source: str | os.PathLike, revision: str | None = None, *, strict: bool = True,
        gamma: float | None = None, name: str | None = None) -> tuple[SwapRequest, Path]:
    """Resolve `source` once, in the caller: (the request every rank loads, the local file)."""
    src, pinned, path = _located(source, revision)
    return SwapRequest(src, pinned, file_digest(path), strict, gamma, name), path


def pin_and_read(source: str | os.PathLike, revision: str | None = None, *, strict: bool = True,
                 gamma: float | None = None, name: str | None = None) -> tuple[SwapRequest, NKVAdapter]:
    """`pin` and `read_pinned` in one process (a rank at start-up): the request, with the
    digest of the bytes this rank read, and the adapter from those bytes. The file is read and
    hashed once, not twice (a 1M-fact file: 4.9 GB, ~3 s a pass here); the engine's start-up
    check (guard.py) then compares every rank's digest."""
    src, pinned, path = _located(source, revision)
    data = _read_file(path)
    request = SwapRequest(src, pinned, hashlib.sha256(data).hexdigest(), strict, gamma, name)
    return request, _adapter_of(data, request)


def read_pinned(request: SwapRequest) -> NKVAdapter:
    """A rank's copy of the requested adapter; an error unless its bytes have the caller's digest."""
    assert request.source is not None
    where = locate_adapter(request.source)
    path = where.path if where.path is not None else fetch(request.source, request.revision).path
    data = _read_file(Path(path))
    got = hashlib.sha256(data).hexdigest()
    if request.digest is not None and got != request.digest:
        raise NKVError(f"{request.source}: this rank read different bytes (sha256 {got[:12]}...) from those the "
                       f"swap was checked against ({request.digest[:12]}...); the file changed during the swap; "
                       "retry it, and do not rewrite adapters in place while an engine loads them")
    return _adapter_of(data, request)


def _read_file(path: Path) -> bytearray:
    """The file's bytes in one buffer, which the adapter read from it then shares (no second copy)."""
    with open(path, "rb") as fh:
        data = bytearray(os.fstat(fh.fileno()).st_size)
        view, got = memoryview(data), 0
        while got < len(data):
            n = fh.readinto(view[got:])
            if not n:
                break
            got += n
        if got != len(data) or fh.read(1):
            raise NKVError(f"{path}: the file changed size while it was read; do not rewrite adapters in place "
                           "while an engine loads them (nkv writes them atomically)")
    return data


def _adapter_of(data: bytearray, request: SwapRequest) -> NKVAdapter:
    # a rank serves rows, not records; its buffer is its own, so the tensors share it
    return NKVAdapter.from_bytes(data, source=request.source, lazy_facts=True, share=True)


def apply_swap(core: Any, request: dict[str, Any]) -> list[dict[str, Any]]:
    """EngineCore side of one change (steps 1-3 above); returns every rank's SlotInfo dict."""
    change = uuid.uuid4().hex  # a rank rolls back only a change it took part in
    try:
        core.collective_rpc("nkv_prepare", args=(request, change))
    except Exception as exc:
        core.collective_rpc("nkv_rollback", args=(change,))
        raise NKVError(f"the change was refused and no rank changed: {_first_line(exc)}") from None
    swap = SwapRequest.from_dict(request)
    if swap.source is None and swap.name is not None:
        abort_requests_for(core, swap.name)
    try:
        ranks = core.collective_rpc("nkv_commit")
    except Exception as exc:
        core.collective_rpc("nkv_rollback", args=(change,))
        raise NKVError(f"a rank failed to copy the new rows, so every rank was rolled back to the previous "
                       f"adapter: {_first_line(exc)}") from None
    core.reset_prefix_cache(reset_running_requests=True)
    remember_resident(core, ranks[0])
    return ranks


def resident_names(rank: dict[str, Any]) -> frozenset[str]:
    """The named adapters a rank's SlotInfo dict holds."""
    return frozenset(entry["name"] for entry in rank.get("named", []))


def remember_resident(core: Any, rank: dict[str, Any]) -> None:
    """Record, on the engine core, which names requests may choose (read by its request checks);
    None on an engine without named adapters, so its refusals say that, not "unknown name"."""
    core._nkv_resident = resident_names(rank) if rank.get("max_adapters") else None


def abort_requests_for(core: Any, name: str) -> list[str]:
    """Abort the scheduler's requests that name adapter `name` (before it is unloaded)."""
    requests = getattr(getattr(core, "scheduler", None), "requests", {}) or {}
    doomed = [r for r in requests.values() if requested_adapter(r.sampling_params) == name]
    if doomed:
        core.abort_requests([r.request_id for r in doomed])
        notify = getattr(core, "_send_abort_outputs_to_client", None)  # EngineCoreProc: tell the clients
        for client in {r.client_index for r in doomed} if notify else ():
            notify([r.request_id for r in doomed if r.client_index == client], client)
    return [r.request_id for r in doomed]


def call_engine(llm: Any, request: SwapRequest) -> list[dict[str, Any]]:
    """Run `apply_swap` in a `vllm.LLM`'s engine core (in-process or its own process)."""
    client = llm.llm_engine.engine_core
    try:
        if hasattr(client, "call_utility"):  # the engine core runs in another process
            return client.call_utility(UTILITY, request.to_dict())
        return getattr(client.engine_core, UTILITY)(request.to_dict())
    except NKVError:
        raise
    except Exception as exc:  # re-wrapped on its way from the engine process
        raise NKVError(_first_line(exc)) from None


async def call_engine_async(engine_client: Any, request: SwapRequest) -> list[dict[str, Any]]:
    """`call_engine` for the server's async engine client (`vllm serve`)."""
    try:
        return await engine_client.engine_core.call_utility_async(UTILITY, request.to_dict())
    except NKVError:
        raise
    except Exception as exc:
        raise NKVError(_first_line(exc)) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().removeprefix(f"Call to {UTILITY} method failed: ")
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["SwapRequest", "CLEAR", "unload", "resident_names", "remember_resident", "abort_requests_for", "pin", "pin_and_read", "read_pinned", "file_digest", "apply_swap", "call_engine",
           "call_engine_async", "UTILITY"]
