"""`load_nkv_adapter(llm, ...)` for a `vllm.LLM`: swap adapters on a running engine.

The gated module and its buffers exist from start-up (see load_hook); here an adapter is
pinned (path or Hub commit, plus its sha256) and checked against the engine in the
caller's process (so errors keep their NKV class), then the engine core applies it on
every rank between two steps and resets the prefix cache, or rolls every rank back
(swap.py).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from nkv.adapter import ConflictPolicy, NKVAdapter
from nkv.compat import check_gamma
from nkv.errors import NKVCompatibilityError, NKVError
from nkv.facts import Fact
from nkv.resolve import AdapterSource, resolve_adapter

from .config import EXAMPLE, check_name, remember_client_resident, section_of
from .slot import SlotInfo, check_adapter
from .swap import CLEAR, SwapRequest, call_engine, pin, resident_names, unload


class NKVEngineHandle:
    """What `load_nkv_adapter(llm, ...)` returns; every method changes the running engine.

    >>> llm = LLM(model="...", additional_config={"nkv": {"capacity": 1000, "layer": 7}})
    >>> handle = load_nkv_adapter(llm, "edits.nkv")   # copied into the preallocated rows
    >>> handle.swap("other.nkv")                      # old facts gone, new ones answer
    >>> handle.remove(ids=["f3"]); handle.clear()     # row operations, no restart

    Named adapters (an engine started with `max_adapters`): each request chooses one.

    >>> llm = LLM(model="...", additional_config={"nkv": {"max_adapters": 4, "capacity": 40000, "layer": 7}})
    >>> handle = load_nkv_adapter(llm, "user/prices", name="prices")
    >>> handle.load("org", "org-chart.nkv")
    >>> llm.generate(prompts, SamplingParams(extra_args={"nkv": "prices"}))  # no "nkv": the base model
    >>> handle.unload("org")
    """

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        config = llm.llm_engine.vllm_config.additional_config
        if section_of(config) is None:
            raise NKVError(
                "this vLLM engine was started without NKV, so there are no preallocated rows to load an adapter "
                "into (vLLM compiles the model at start-up; modules cannot be added afterwards). Start it with "
                "LLM(model=..., additional_config={'nkv': {'capacity': N, 'layer': L}}) -- N the most facts you "
                "will load, L the adapter's layer -- or pass the adapter itself: additional_config=" + EXAMPLE)
        self.slot = self._info()
        self.adapter: NKVAdapter | None = None
        self._source: str | None = None  # slot.source when self.adapter was loaded

    # ---------------------------------------------------------------- views
    @property
    def facts(self) -> list[Fact]:
        """The facts the engine holds now (read from where they came from if another handle loaded them)."""
        current = self._current()
        return [] if current is None else current.facts

    @property
    def adapters(self) -> dict[str, dict[str, Any]]:
        """The named adapters resident now: name -> n_facts, gamma, source, revision, digest."""
        return {e["name"]: {k: v for k, v in e.items() if k != "name"} for e in self._info().named}

    @property
    def info(self) -> dict[str, Any]:
        """The engine's gated module as rank 0 reports it (module, capacity, n_facts, gamma, source...)."""
        return self._info().to_dict()

    def __repr__(self) -> str:
        s = self.slot
        return f"NKVEngineHandle(module={s.module!r}, capacity={s.capacity}, n_facts={s.n_facts}, tp={s.tp_size})"

    # ---------------------------------------------------------------- changes
    def swap(self, adapter: AdapterSource, *, revision: str | None = None, strict: bool = True,
             gamma: float | None = None) -> "NKVEngineHandle":
        """Replace whatever the engine holds with `adapter` (path, Hub repo id or NKVAdapter).

        The change lands between two engine steps, on every rank or on none (swap.py).

        Raises:
            NKVCompatibilityError: other model/layer/widths, or more facts than the capacity.
            NKVFingerprintError: different base checkpoint (a warning when strict=False).
        """
        gamma = None if gamma is None else check_gamma(gamma, "swap(gamma=...)")
        with _pinned(adapter, revision, strict, gamma) as (request, local):
            resolved = adapter if isinstance(adapter, NKVAdapter) else NKVAdapter.load(local)
            check_adapter(resolved, self.slot, strict=strict)
            results = call_engine(self.llm, request)
        self._after_change(results, expected_facts=resolved.n_facts)
        self.adapter, self._source = resolved, self.slot.source
        return self

    def load(self, name: str, adapter: AdapterSource, *, revision: str | None = None, strict: bool = True,
             gamma: float | None = None) -> "NKVEngineHandle":
        """Load `adapter` as named adapter `name` (replacing the adapter of that name, if any);
        requests choose it with `SamplingParams(extra_args={"nkv": name})`.

        Raises:
            NKVCompatibilityError: the engine has no named adapters (max_adapters 0), holds
                max_adapters others already, or lacks the rows; and as `swap`.
        """
        check_name(name)
        gamma = None if gamma is None else check_gamma(gamma, "load(gamma=...)")
        with _pinned(adapter, revision, strict, gamma, name) as (request, local):
            resolved = adapter if isinstance(adapter, NKVAdapter) else NKVAdapter.load(local)
            check_adapter(resolved, self._info(), strict=strict, name=name)
            results = call_engine(self.llm, request)
        self._after_change(results, expected_facts=self.slot.n_facts, name=name,
                           expected_named=resolved.n_facts)
        return self

    def unload(self, name: str) -> "NKVEngineHandle":
        """Unload named adapter `name`; requests still naming it are aborted, later ones refused."""
        if name not in self.adapters:
            raise NKVError(f"unload: the engine holds no adapter named {name!r} (named: {sorted(self.adapters)})")
        results = call_engine(self.llm, unload(name))
        self._after_change(results, expected_facts=self.slot.n_facts, name=name, expected_named=0)
        return self

    def add(self, other: AdapterSource, *, on_conflict: ConflictPolicy = "error",
            revision: str | None = None, strict: bool = True) -> "NKVEngineHandle":
        """Add the facts of another adapter (same base model and layer) to the loaded ones."""
        incoming = resolve_adapter(other, revision=revision)
        current = self._current()
        merged = incoming if current is None else current.merge(incoming, on_conflict=on_conflict)
        return self.swap(merged, strict=strict)

    def remove(self, ids: list[str] | tuple[str, ...] = (), subjects: list[str] | tuple[str, ...] = (),
               missing_ok: bool = False) -> "NKVEngineHandle":
        """Drop facts by id and/or subject from the loaded adapter."""
        current = self._current()
        if current is None:
            raise NKVError("remove: the engine holds no facts; load an adapter with swap() first")
        return self.swap(current.remove(ids=ids, subjects=subjects, missing_ok=missing_ok), strict=False)

    def clear(self) -> "NKVEngineHandle":
        """Remove every fact; the engine then answers like the base model."""
        results = call_engine(self.llm, CLEAR)
        self._after_change(results, expected_facts=0)
        self.adapter, self._source = None, None
        return self

    detach = clear  # the module stays compiled in; with no rows it adds exactly zero

    # ---------------------------------------------------------------- internals
    def _current(self) -> NKVAdapter | None:
        """The adapter whose rows the engine holds: this handle's, or re-read from where the engine got it
        (the start adapter from additional_config, or another handle's swap)."""
        self.slot = self._info()
        if self.slot.n_facts == 0:
            return None
        if self.adapter is not None and self.slot.source == self._source:
            return self.adapter
        try:
            self.adapter = resolve_adapter(self.slot.source or "", revision=self.slot.revision)
        except NKVError as exc:
            raise NKVError(f"the engine's {self.slot.n_facts} facts came from {self.slot.source!r}, which cannot "
                           f"be read again ({exc}); swap() in a complete adapter instead") from None
        self._source = self.slot.source
        return self.adapter

    def _info(self) -> SlotInfo:
        try:
            results = self.llm.collective_rpc("nkv_info")
        except NotImplementedError:
            raise NKVError("the engine's workers have no nkv_info method: the nkv vLLM plugin did not run in "
                           "them (is nkv installed in the same environment, and VLLM_PLUGINS unset or "
                           "including 'nkv'?)") from None
        return SlotInfo.from_dict(results[0])

    def _after_change(self, results: list[dict[str, Any]], expected_facts: int, name: str | None = None,
                      expected_named: int = 0) -> None:
        counts = {r["n_facts"] for r in results}
        if name is not None:  # the named adapter's rows (0: unloaded)
            counts = {(SlotInfo.from_dict(r).named_entry(name) or {"n_facts": 0})["n_facts"] for r in results}
            expected_facts = expected_named
        if counts != {expected_facts}:
            raise NKVCompatibilityError(f"workers disagree after the swap: rows in use per rank {sorted(counts)}, "
                                        f"expected {expected_facts}; restart the engine")
        self.slot = SlotInfo.from_dict(results[0])
        remember_client_resident(self.llm.llm_engine.vllm_config, resident_names(results[0]))


@contextlib.contextmanager
def _pinned(adapter: AdapterSource, revision: str | None, strict: bool, gamma: float | None,
            name: str | None = None) -> Iterator[tuple[SwapRequest, Path]]:
    """(the request every rank loads, the local file) for `adapter`: a path, a Hub repo id
    pinned to one commit, or an in-memory adapter written to a temporary file, removed after."""
    if not isinstance(adapter, NKVAdapter):
        yield pin(adapter, revision, strict=strict, gamma=gamma, name=name)
        return
    tmpdir = tempfile.mkdtemp(prefix="nkv-swap-")
    try:
        yield pin(adapter.save(Path(tmpdir) / "adapter.nkv"), strict=strict, gamma=gamma, name=name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def attach_to_llm(llm: Any, adapter: AdapterSource, revision: str | None = None, strict: bool = True,
                  name: str | None = None, **options: Any) -> NKVEngineHandle:
    """Load `adapter` into a running vLLM engine (the `load_nkv_adapter` entry for vllm.LLM).

    The engine must have been started with `additional_config={"nkv": {...}}` (capacity
    and layer, or a start adapter), which preallocates the rows this copies into.

    `name` loads it as a named adapter that requests choose (engines with `max_adapters`);
    without it, it becomes the engine-wide adapter. Options: gamma (float) overrides the
    adapter's threshold.

    Raises:
        NKVError: the engine was started without the nkv config (the message shows how).
        NKVCompatibilityError / NKVFingerprintError: as for transformers, plus capacity and layer.

    >>> llm = LLM(model="...", additional_config={"nkv": {"capacity": 1000, "layer": 7}})
    >>> handle = load_nkv_adapter(llm, "user/paris-edits")
    >>> llm.generate(["The Eiffel Tower is in"], SamplingParams(temperature=0))
    """
    gamma = options.pop("gamma", None)
    gamma = None if gamma is None else check_gamma(gamma, "load_nkv_adapter(gamma=...)")
    if "shortlist" in options:  # static in the compiled graph: an engine setting
        raise NKVError(f"load_nkv_adapter(vllm.LLM, shortlist={options['shortlist']!r}): an engine's sketch path has "
                       "the shortlist it was started with (its compiled graph's top-k width); start the engine with "
                       "additional_config={\"nkv\": {..., \"shortlist\": N}}")
    if options:
        raise NKVError(f"load_nkv_adapter(vllm.LLM): unknown option(s) {sorted(options)}; known: gamma")
    handle = NKVEngineHandle(llm)
    if name is not None:
        return handle.load(name, adapter, revision=revision, strict=strict, gamma=gamma)
    return handle.swap(adapter, revision=revision, strict=strict, gamma=gamma)


__all__ = ["attach_to_llm", "NKVEngineHandle"]
