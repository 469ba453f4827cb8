"""The `nkv` section of vLLM's `additional_config`, parsed and checked once.

Settings reach every vLLM process through `LLM(..., additional_config={"nkv": {...}})`
or `vllm serve ... --additional-config '{"nkv": {...}}'` (they also enter vLLM's
compile-cache key, which private environment variables would not). This module imports
nothing from vLLM so it can be used by the caller, the workers and the tests alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from nkv.compat import check_gamma, check_shortlist
from nkv.constants import DEFAULT_SHORTLIST
from nkv.errors import NKVError
from nkv.gate import DEFAULT_FACT_CHUNK

CONFIG_KEY = "nkv"

_KNOWN = {"adapter", "revision", "capacity", "layer", "gamma", "strict", "fact_chunk", "adapter_dirs", "hub_repos",
          "max_adapters", "adapters", "sketch", "shortlist"}

# A named adapter is chosen by requests (SamplingParams extra_args, the OpenAI `model` field), so its
# name must survive URLs, JSON and vLLM's model-name checks unchanged.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
REQUEST_KEY = "nkv"  # SamplingParams(extra_args={"nkv": name}); vllm_xargs over HTTP


def check_name(name: object, where: str = "adapter name") -> str:
    """`name` if it is a valid adapter name, else NKVError saying what is allowed."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise NKVError(f"{where} {name!r} is not a valid adapter name: use 1-128 letters, digits and . _ : / -, "
                       "starting with a letter or digit")
    return name


def requested_adapter(sampling_params: Any) -> str | None:
    """The adapter a request names (`SamplingParams.extra_args["nkv"]`), or None."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    return extra.get(REQUEST_KEY)


# What the client side of an engine (the `LLM` or the API server process) knows is resident,
# by engine config: it refuses requests for other names before they reach the engine. Kept up
# to date by the handle and the routes after each change; the engine core checks again.
_CLIENT_RESIDENT: dict[int, tuple[Any, frozenset[str]]] = {}


def client_resident(vllm_config: Any) -> frozenset[str]:
    """Named adapters this process last saw resident in the engine of `vllm_config`."""
    entry = _CLIENT_RESIDENT.get(id(vllm_config))
    if entry is not None:
        return entry[1]
    section = section_of(getattr(vllm_config, "additional_config", None))
    names = section.get("adapters", {}) if isinstance(section, Mapping) else {}
    return frozenset(names) if isinstance(names, Mapping) else frozenset()


def remember_client_resident(vllm_config: Any, names: frozenset[str]) -> None:
    _CLIENT_RESIDENT[id(vllm_config)] = (vllm_config, names)  # holding the config keeps its id unique


@dataclass(frozen=True)
class NamedAdapter:
    """One entry of the config's `adapters`: loaded at start-up under `name`."""

    name: str
    adapter: str
    revision: str | None = None
    gamma: float | None = None

EXAMPLE = '{"nkv": {"adapter": "user/repo-or-path.nkv", "capacity": 10000}}'


@dataclass(frozen=True)
class NKVServeConfig:
    """What the engine should attach at start-up.

    Attributes:
        adapter: path to an .nkv file or folder, or a Hub repo id; None to start empty.
        revision: Hub revision of `adapter`.
        capacity: rows preallocated at start-up; adapters swapped in later may hold at
            most this many facts. Every row is scored on every token, so capacity costs
            compute even when empty (named adapters: only their own rows are scored). Default:
            the start adapters' sizes added up.
        layer: the block whose FFN output projection is gated. Default: the start
            adapter's layer. Required when no adapter is given.
        gamma: overrides the adapter's threshold when set.
        strict: a base-model fingerprint mismatch fails (True) or only warns (False).
        fact_chunk: facts scored per matmul on the exact path (bounds the score matrix's memory);
            the sketch path scores at least 8 * d_key / tp sketches per chunk (gate.shortlist_chunk).
        adapter_dirs: server folders whose .nkv files `POST /v1/nkv/load` may read
            (nothing else on the server's disk is readable through the route).
        hub_repos: Hub repo ids the route may fetch; "owner/*" allows every repo of an owner.
        max_adapters: named adapters the engine may hold at once, each chosen per request
            (0: one engine-wide adapter, as before). They share the `capacity` rows with the
            engine-wide adapter; a request scores only its own adapter's rows.
        adapters: named adapters to load at start-up, {name: source} or
            {name: {"adapter": source, "revision": ..., "gamma": ...}}.
        sketch: the gate's sketch path (spec §5.1): None (default) from SKETCH_MIN_FACTS
            rows of capacity up (named adapters: from that many facts each), True always,
            False never (exact scoring of every row).
        shortlist: candidates per token the sketch path rescores exactly (default 128). 256 kept
            the exact decision on >= 99.9% of every kind of token from 100k to 1M facts, where
            128 missed 0.125% of paraphrase tokens; a 16-token gate call at 100k facts took
            28 ms instead of 20 (benchmarks/scale).
    """

    adapter: str | None = None
    revision: str | None = None
    capacity: int | None = None
    layer: int | None = None
    gamma: float | None = None
    strict: bool = True
    fact_chunk: int = DEFAULT_FACT_CHUNK
    adapter_dirs: tuple[str, ...] = ()
    hub_repos: tuple[str, ...] = ()
    max_adapters: int = 0
    adapters: tuple[NamedAdapter, ...] = ()
    sketch: bool | None = None
    shortlist: int = DEFAULT_SHORTLIST

    @property
    def routed(self) -> bool:
        """Requests choose among named adapters (the gate routes each token to its request's rows)."""
        return self.max_adapters > 0

    @classmethod
    def from_mapping(cls, section: Any, where: str = "additional_config['nkv']") -> "NKVServeConfig":
        """Parse the `nkv` section; one NKVError lists every problem."""
        if not isinstance(section, Mapping):
            raise NKVError(f"{where} must be a JSON object, got {type(section).__name__}; e.g. {EXAMPLE}")
        problems = [f"unknown key {k!r} (known: {', '.join(sorted(_KNOWN))})" for k in section if k not in _KNOWN]
        adapter = section.get("adapter")
        if adapter is not None and not isinstance(adapter, str):
            problems.append(f"'adapter' must be a path or Hub repo id string, got {type(adapter).__name__}")
        revision = section.get("revision")
        if revision is not None and not isinstance(revision, str):
            problems.append(f"'revision' must be a string, got {type(revision).__name__}")
        capacity = _int(section, "capacity", 0, problems)
        layer = _int(section, "layer", 0, problems)
        fact_chunk = _int(section, "fact_chunk", 1, problems)
        gamma = section.get("gamma")
        if gamma is not None:
            try:
                gamma = check_gamma(gamma, "'gamma'")
            except NKVError as exc:
                problems.append(str(exc))
        strict = section.get("strict", True)
        if not isinstance(strict, bool):
            problems.append(f"'strict' must be true or false, got {strict!r}")
        sketch = section.get("sketch")
        if sketch is not None and not isinstance(sketch, bool):
            problems.append(f"'sketch' must be true, false or null (auto), got {sketch!r}")
        shortlist = section.get("shortlist")
        shortlist = DEFAULT_SHORTLIST if shortlist is None else shortlist  # null: the default, as for the other keys
        try:
            shortlist = check_shortlist(shortlist, "'shortlist'")
        except NKVError as exc:
            problems.append(str(exc))
        max_adapters = _int(section, "max_adapters", 0, problems) or 0
        adapters = _named_adapters(section.get("adapters", {}), problems)
        if len(adapters) > max_adapters:
            problems.append(f"'adapters' names {len(adapters)} adapters but 'max_adapters' is {max_adapters}; "
                            f"set \"max_adapters\": {len(adapters)} or more")
        if adapter is None and not adapters and (capacity is None or layer is None):
            problems.append("without 'adapter', both 'capacity' and 'layer' are needed to preallocate the "
                            "gated module, e.g. {\"nkv\": {\"capacity\": 10000, \"layer\": 7}}")
        adapter_dirs = _strings(section, "adapter_dirs", problems)
        hub_repos = _strings(section, "hub_repos", problems)
        if problems:
            raise NKVError(f"{where}: " + "; ".join(problems))
        return cls(adapter=adapter, revision=revision, capacity=capacity, layer=layer,
                   gamma=gamma, strict=strict,
                   fact_chunk=DEFAULT_FACT_CHUNK if fact_chunk is None else fact_chunk,
                   adapter_dirs=adapter_dirs, hub_repos=hub_repos, max_adapters=max_adapters, adapters=adapters,
                   sketch=sketch, shortlist=shortlist)


def section_of(additional_config: Any) -> Any | None:
    """The raw `nkv` section of an `additional_config`, or None when absent."""
    if isinstance(additional_config, Mapping):
        return additional_config.get(CONFIG_KEY)
    return None


def _int(section: Mapping, key: str, minimum: int, problems: list[str]) -> int | None:
    value = section.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        problems.append(f"{key!r} must be an integer >= {minimum}, got {value!r}")
        return None
    return value


def _named_adapters(value: Any, problems: list[str]) -> tuple[NamedAdapter, ...]:
    if not isinstance(value, Mapping):
        problems.append(f"'adapters' must map names to sources, e.g. {{\"prices\": \"user/prices\"}}, got {value!r}")
        return ()
    out = []
    for name, entry in value.items():
        try:
            check_name(name, "'adapters' key")
        except NKVError as exc:
            problems.append(str(exc))
            continue
        entry = {"adapter": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, Mapping) or not isinstance(entry.get("adapter"), str) or \
                set(entry) - {"adapter", "revision", "gamma"}:
            problems.append(f"'adapters'[{name!r}] must be a source string or {{\"adapter\": source, \"revision\": "
                            f"..., \"gamma\": ...}}, got {entry!r}")
            continue
        gamma = entry.get("gamma")
        try:
            gamma = None if gamma is None else check_gamma(gamma, f"'adapters'[{name!r}] gamma")
        except NKVError as exc:
            problems.append(str(exc))
            continue
        out.append(NamedAdapter(name, entry["adapter"], entry.get("revision"), gamma))
    return tuple(out)


def _strings(section: Mapping, key: str, problems: list[str]) -> tuple[str, ...]:
    value = section.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        problems.append(f"{key!r} must be a list of non-empty strings, got {value!r}")
        return ()
    return tuple(value)


__all__ = ["NKVServeConfig", "NamedAdapter", "CONFIG_KEY", "EXAMPLE", "REQUEST_KEY", "check_name", "requested_adapter", "client_resident",
           "remember_client_resident", "section_of"]
