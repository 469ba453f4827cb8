"""Turn what a user passes as "the adapter" into an `NKVAdapter`.

Every loader calls `resolve_adapter`, so a path, a Hub repo id and an in-memory adapter
are accepted the same way everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from .adapter import NKVAdapter
from .errors import NKVError, NKVFormatError

AdapterSource = Union[str, os.PathLike, NKVAdapter]


def resolve_adapter(source: AdapterSource, revision: str | None = None) -> NKVAdapter:
    """Load `source`: an NKVAdapter (returned as is), a local .nkv file, a local folder
    holding exactly one .nkv file, or a Hugging Face Hub repo id ("user/name").

    Raises:
        NKVFormatError: the file is not a valid adapter.
        NKVHubError: the repo could not be fetched or holds no single adapter.
        NKVError: the path does not exist and is not a repo id.
    """
    if isinstance(source, NKVAdapter):
        return source
    path = Path(source)
    if path.is_file():
        return NKVAdapter.load(path)
    if path.is_dir():
        return NKVAdapter.load(single_adapter_file(path))
    text = str(source)
    if _looks_like_repo_id(text):
        from .hub import fetch_adapter  # lazy: huggingface_hub only when needed

        local = fetch_adapter(text, revision=revision)
        try:
            return NKVAdapter.load(local)
        except NKVFormatError as exc:  # name the repo the user asked for, not the cache path
            raise type(exc)(f"{text}@{revision or 'main'}:{local.name}", exc.problems) from None
    raise NKVError(f"{text}: no such file, and not a Hub repo id of the form 'user/name'")


def single_adapter_file(folder: Path) -> Path:
    """The one .nkv file in `folder`; an error when there are none or several."""
    found = sorted(folder.glob("*.nkv"))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise NKVError(f"{folder}: expected exactly one .nkv file, found {len(found)} ({names}); "
                       "pass the file's path instead")
    return found[0]


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")) and not text.endswith(".nkv")


__all__ = ["resolve_adapter", "single_adapter_file", "AdapterSource"]
