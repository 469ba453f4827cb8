"""The `nkv` section of vLLM's `additional_config`, parsed and checked once.

Settings reach every vLLM process through `LLM(..., additional_config={"nkv": {...}})`
or `vllm serve ... --additional-config '{"nkv": {...}}'` (they also enter vLLM's
compile-cache key, which private environment variables would not). This module imports
nothing from vLLM so it can be used by the caller, the workers and the tests alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from nkv.compat import check_gamma
from nkv.errors import NKVError
from nkv.gate import DEFAULT_FACT_CHUNK

CONFIG_KEY = "nkv"

_KNOWN = {"adapter", "revision", "capacity", "layer", "gamma", "strict", "fact_chunk", "adapter_dirs", "hub_repos"}

EXAMPLE = '{"nkv": {"adapter": "user/repo-or-path.nkv", "capacity": 10000}}'


@dataclass(frozen=True)
class NKVServeConfig:
    """What the engine should attach at start-up.

    Attributes:
        adapter: path to an .nkv file or folder, or a Hub repo id; None to start empty.
        revision: Hub revision of `adapter`.
        capacity: rows preallocated at start-up; adapters swapped in later may hold at
            most this many facts. Every row is scored on every token, so capacity costs
            compute even when empty. Default: the start adapter's size.
        layer: the block whose FFN output projection is gated. Default: the start
            adapter's layer. Required when no adapter is given.
        gamma: overrides the adapter's threshold when set.
        strict: a base-model fingerprint mismatch fails (True) or only warns (False).
        fact_chunk: facts scored per matmul (bounds the score matrix's memory).
        adapter_dirs: server folders whose .nkv files `POST /v1/nkv/load` may read
            (nothing else on the server's disk is readable through the route).
        hub_repos: Hub repo ids the route may fetch; "owner/*" allows every repo of an owner.
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
        if adapter is None and (capacity is None or layer is None):
            problems.append("without 'adapter', both 'capacity' and 'layer' are needed to preallocate the "
                            "gated module, e.g. {\"nkv\": {\"capacity\": 10000, \"layer\": 7}}")
        adapter_dirs = _strings(section, "adapter_dirs", problems)
        hub_repos = _strings(section, "hub_repos", problems)
        if problems:
            raise NKVError(f"{where}: " + "; ".join(problems))
        return cls(adapter=adapter, revision=revision, capacity=capacity, layer=layer,
                   gamma=gamma, strict=strict,
                   fact_chunk=DEFAULT_FACT_CHUNK if fact_chunk is None else fact_chunk,
                   adapter_dirs=adapter_dirs, hub_repos=hub_repos)


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


def _strings(section: Mapping, key: str, problems: list[str]) -> tuple[str, ...]:
    value = section.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        problems.append(f"{key!r} must be a list of non-empty strings, got {value!r}")
        return ()
    return tuple(value)


__all__ = ["NKVServeConfig", "CONFIG_KEY", "EXAMPLE", "section_of"]
