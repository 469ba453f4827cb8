"""Dispatch `load_nkv_adapter` to the loader that knows the target runtime."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, Callable

from nkv.errors import NKVError
from nkv.resolve import AdapterSource

ENTRY_POINT_GROUP = "nkv.loaders"


@dataclass(frozen=True)
class Loader:
    """A runtime NKV can attach to.

    can_attach must be cheap and must not import the runtime (it sees every target).
    attach(target, adapter_source, **options) returns the runtime's handle.
    """

    name: str
    can_attach: Callable[[Any], bool]
    attach: Callable[..., Any]


def _module_of(obj: Any) -> str:
    return type(obj).__module__ or ""


def _lazy(path: str) -> Callable[..., Any]:
    module, func = path.split(":")
    return lambda *args, **kwargs: getattr(import_module(module), func)(*args, **kwargs)


_BUILTIN = [
    Loader("vllm", lambda t: _module_of(t).startswith("vllm."), _lazy("nkv.loaders.vllm.attach:attach_to_llm")),
    Loader("transformers", lambda t: _module_of(t).startswith("transformers."),
           _lazy("nkv.loaders.transformers:attach")),
]
_EXTRA: list[Loader] = []
_entry_points_loaded = False


def register_loader(loader: Loader) -> None:
    """Add a loader (tried before the built-ins). Registering the same name twice replaces it."""
    _EXTRA[:] = [l for l in _EXTRA if l.name != loader.name] + [loader]


def registered_loaders() -> list[Loader]:
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            register_loader(ep.load())
    return [*_EXTRA, *_BUILTIN]


def load_nkv_adapter(target: Any, adapter: AdapterSource, *, revision: str | None = None,
                     strict: bool = True, **options: Any) -> Any:
    """Attach an NKV adapter to a model or engine and return a handle.

    Args:
        target: a transformers causal LM, or a vllm.LLM engine.
        adapter: path to an .nkv file, a Hub repo id ("user/name"), or an NKVAdapter.
        revision: Hub revision (branch, tag or commit) when `adapter` is a repo id.
        strict: a base-model fingerprint mismatch raises (True) or only warns (False).
        options: loader options, e.g. `gamma=`, and `name=` to load the adapter under a name
            next to others (transformers: chosen per batch row with `handle.using(...)`;
            vLLM engines started with `max_adapters`: chosen per request).
    Returns:
        The loader's handle (transformers: `NKVHandle` with detach(), disabled(), info).

    >>> model = AutoModelForCausalLM.from_pretrained("examples/factworld/models/llama")
    >>> handle = load_nkv_adapter(model, "edits.nkv")
    >>> handle.detach()  # original model back, bit-identical outputs
    """
    for loader in registered_loaders():
        if loader.can_attach(target):
            return loader.attach(target, adapter, revision=revision, strict=strict, **options)
    names = ", ".join(l.name for l in registered_loaders())
    raise NKVError(f"load_nkv_adapter: cannot attach to a {type(target).__module__}.{type(target).__name__}; "
                   f"supported runtimes: {names} (others can join through the '{ENTRY_POINT_GROUP}' entry-point group)")
