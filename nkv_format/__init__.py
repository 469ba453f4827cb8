"""NKV: NeuralDB knowledge-edit adapters.

`import nkv` loads only the format (torch + safetensors); transformers, vLLM and the Hub
client are imported when a function that needs them is first used.

>>> import nkv
>>> adapter = nkv.NKVAdapter.load("edits.nkv")           # validate + read
>>> handle = nkv.load_nkv_adapter(model, "edits.nkv")    # attach to a transformers model
"""

from __future__ import annotations

from typing import Any

from . import errors
from ._version import __version__
from .adapter import AdapterDiff, NKVAdapter, empty_adapter
from .errors import (
    NKVCompatibilityError,
    NKVConflictError,
    NKVError,
    NKVFactsError,
    NKVFingerprintError,
    NKVFormatError,
    NKVHubError,
    NKVUnsupportedModelError,
    NKVVersionError,
)
from .facts import Fact
from .fingerprint import compute_fingerprint, fingerprints_match
from .gate import GateResult, key_inverse_norms, nkv_gate
from .header import BaseModelInfo, NKVHeader, read_header

__all__ = [
    "__version__",
    "NKVAdapter",
    "AdapterDiff",
    "empty_adapter",
    "Fact",
    "BaseModelInfo",
    "NKVHeader",
    "read_header",
    "nkv_gate",
    "GateResult",
    "key_inverse_norms",
    "compute_fingerprint",
    "fingerprints_match",
    "load_nkv_adapter",
    *errors.__all__,
]


def __getattr__(name: str) -> Any:
    # The one import against the layering (nkv.loaders depends on nkv, not the reverse), on
    # purpose: `nkv.load_nkv_adapter` is the entry point users look for first. It is lazy,
    # so `import nkv` stays the format alone (no transformers, vllm or huggingface_hub).
    if name == "load_nkv_adapter":
        from .loaders import load_nkv_adapter

        return load_nkv_adapter
    raise AttributeError(f"module 'nkv' has no attribute {name!r}")
