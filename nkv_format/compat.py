"""Does a loaded model match the base model an adapter was built on? One rule set for
every loader, so transformers and vLLM refuse the same things with the same words."""

from __future__ import annotations

import math
import warnings

from .constants import DEFAULT_SHORTLIST
from .errors import NKVCompatibilityError, NKVError, NKVFingerprintError
from .fingerprint import FINGERPRINT2_PREFIX, fingerprint_differences, read_fingerprint
from .header import BaseModelInfo


def check_shape(expected: BaseModelInfo, layer: int, *, model_type: str, n_layers: int, d_model: int,
                d_key: int) -> None:
    """Raise NKVCompatibilityError unless the model has the adapter's base architecture and
    widths (d_model/d_key are only read when model type and layer count already match)."""
    if model_type != expected.model_type:
        raise NKVCompatibilityError(f"adapter was built for model_type {expected.model_type!r} "
                                    f"({expected.name}), got {model_type!r}")
    if n_layers != expected.n_layers:
        raise NKVCompatibilityError(f"adapter expects {expected.n_layers} layers ({expected.name}), "
                                    f"the model has {n_layers}")
    if (d_model, d_key) != (expected.d_model, expected.d_key):
        raise NKVCompatibilityError(
            f"adapter expects d_model={expected.d_model}, d_key={expected.d_key} at layer {layer}, "
            f"the model has d_model={d_model}, d_key={d_key}")


def check_fingerprint(expected: BaseModelInfo, layer: int, fingerprint: str | None, *, strict: bool = True,
                      stacklevel: int = 3) -> None:
    """Raise NKVFingerprintError (or warn when strict=False) unless `fingerprint` matches the
    adapter's base checkpoint. None means the runtime could not read the projection's weights
    (vLLM: quantized, or repacked before the load hook saw them); the transformers loader always
    passes a fingerprint. An nkvfp2 mismatch names each part that differs (spec §6)."""
    differences = fingerprint_differences(expected.fingerprint, fingerprint) if fingerprint is not None else None
    taken_at = next(iter(read_fingerprint(expected.fingerprint).parts))
    if differences is not None and expected.fingerprint.startswith(FINGERPRINT2_PREFIX) and taken_at != f"L{layer}":
        # Parts are named by absolute layer, so a layer-1 model holds a layer-0 fingerprint's parts too.
        differences.insert(0, f"the adapter's fingerprint was taken at layer {taken_at[1:]}, not at its layer {layer}")
    if differences == []:
        return
    detail = (f"got {fingerprint[:40]}..." if fingerprint is not None
              else "the runtime could not read the projection's weights (quantized or repacked), so it cannot "
                   "be checked; a GGUF model is served from its dequantized folder (`nkv convert MODEL.gguf`)")
    if differences and expected.fingerprint.startswith(FINGERPRINT2_PREFIX):
        detail += ": " + ", ".join(differences)
    message = (f"the model is not the checkpoint this adapter was built on ({expected.name}"
               f"{'@' + expected.revision if expected.revision else ''}): fingerprint at layer "
               f"{layer} expected {expected.fingerprint[:40]}..., {detail}; "
               "load the adapter's base model (from Python, load_nkv_adapter(..., strict=False) attaches anyway)")
    if strict:
        raise NKVFingerprintError(message)
    warnings.warn(message, stacklevel=stacklevel + 1)


def check_gamma(value: object, where: str = "gamma") -> float:
    """Return `value` as a float if it is a threshold the gate can use, else raise NKVError.

    γ is a cosine threshold: the gate fires where cos(key, activation) > γ. Below 0 nearly
    every token fires; above 1 (or NaN) nothing ever does. Every entry point (the vLLM
    config and HTTP route, `load_nkv_adapter`, `nkv merge --gamma`) calls this one check.

    >>> check_gamma(0.65)
    0.65
    """
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not 0.0 <= value <= 1.0:  # type: ignore[operator,arg-type]
        raise NKVError(f"{where} must be a number in [0, 1] (the cosine above which the gate fires), got "
                       f"{value!r}; omit it to use the adapter's own threshold")
    return float(value)  # type: ignore[arg-type]


def check_shortlist(value: object, where: str = "shortlist") -> int:
    """Return `value` if it is a shortlist length the sketch path can use (an integer >= 1),
    else raise NKVError. Both loaders' options (`load_nkv_adapter(shortlist=...)`, vLLM's
    `"shortlist"`) call this one check.

    >>> check_shortlist(256)
    256
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise NKVError(f"{where} must be an integer >= 1 (the candidates per token the sketch path rescores "
                       f"exactly; default {DEFAULT_SHORTLIST}), got {value!r}")
    return value


__all__ = ["check_shape", "check_fingerprint", "check_gamma", "check_shortlist"]
