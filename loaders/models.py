"""Load a causal LM and its tokenizer for the commands that run one (build, generate, eval).

One loader, so every command accepts the same model sources and fails with the same
message: a local folder saved with `save_pretrained`, a Hub id (cached, or online), a
.gguf file or a packaged real model (`nkv.loaders.gguf`: converted once, then a folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nkv.errors import NKVError, NKVUnsupportedModelError


def load_model(model_name: str, *, revision: str | None = None, device: str = "auto",
               dtype: str = "float32") -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local folder, a Hub id, a .gguf file or a
    packaged model name (`nkv.loaders.gguf.PACKAGED`), or raise NKVError."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from nkv.dtypes import TORCH_DTYPES as DTYPES

    from .gguf import model_source
    from .transformers import quantization_method

    device = resolve_device(device, "--device")  # before a GGUF conversion, which can take a while
    model_name = model_source(model_name)  # a .gguf file or packaged model: its converted folder
    _check_local_folder(model_name)
    where = "local folder" if Path(model_name).is_dir() else "Hub id"
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name, revision=revision)
        method = quantization_method(AutoConfig.from_pretrained(model_name, revision=revision))
        if method is not None:  # before from_pretrained, which would want the quantization library
            raise NKVUnsupportedModelError(
                f"model {model_name!r} is quantized ({method}); NKV builds and checks adapters on float weights, "
                "and bitsandbytes, GPTQ and AWQ layers are not supported. Use the unquantized checkpoint (a "
                ".gguf file is fine: nkv dequantizes it)")
        model = AutoModelForCausalLM.from_pretrained(model_name, revision=revision, dtype=DTYPES[dtype])
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NKVError(f"cannot load model {model_name!r} ({where}): {first[:300]}; pass a folder saved with "
                       "save_pretrained, or a Hub id that is cached or reachable") from None
    model.to(device)
    model.eval()
    return model, tokenizer


def resolve_device(device: str, where: str = "device") -> str:
    """`device`, with "auto" resolved; NKVError for a name torch does not know or CUDA that is
    absent. `where` names the setting in the message (an option, or BuildConfig.device)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise NKVError(f"{where} {device!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise NKVError(f"{where} {device!r}: CUDA is not available on this machine; use cpu")
    return device


def _check_local_folder(model_name: str) -> None:
    """A name written as a path (absolute, ./, ../, ~) must be a folder holding config.json; a
    Hub id never starts that way, so the Hub's "repo id must be ..." would only confuse."""
    path = Path(model_name).expanduser()
    looks_local = path.is_absolute() or model_name.startswith((".", "~")) or path.exists()
    if not looks_local:
        return
    if not path.exists():
        raise NKVError(f"model {model_name!r}: no such folder (pass a folder saved with save_pretrained, a .gguf "
                       "file, a Hub id or a packaged model name)")
    if not path.is_dir():
        raise NKVError(f"model {model_name!r}: a file, not a model folder (a model is a folder saved with "
                       "save_pretrained, or a .gguf file)")
    if not (path / "config.json").is_file():
        raise NKVError(f"model {model_name!r}: the folder has no config.json, so it is not a model saved with "
                       "save_pretrained")


__all__ = ["load_model", "resolve_device"]
