"""Turn what a user passes as "the adapter" into an `NKVAdapter`.

A source is a path (an .nkv file, or a folder holding exactly one), a Hugging Face Hub
repo id ("user/name"), or an `NKVAdapter` already in memory. `locate_adapter` decides
which, once, for every caller: `resolve_adapter` (load it), the vLLM server routes (read
only its header) and the vLLM engine handle (pass it to worker processes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from .adapter import NKVAdapter
from .errors import NKVError, NKVFormatError
from .hub import fetch_adapter

AdapterSource = Union[str, os.PathLike, NKVAdapter]


@dataclass(frozen=True)
class AdapterLocation:
    """Where a source points; exactly one of `adapter`, `path`, `repo_id` is set."""

    adapter: NKVAdapter | None = None  # given in memory
    path: Path | None = None  # a local .nkv file (a folder's single .nkv file)
    repo_id: str | None = None  # a Hub repo id, not fetched yet


def locate_adapter(source: AdapterSource) -> AdapterLocation:
    """Classify `source` without reading any adapter data.

    Raises:
        NKVError: the path does not exist and is not a repo id, or a folder does not
            hold exactly one .nkv file.
    """
    if isinstance(source, NKVAdapter):
        return AdapterLocation(adapter=source)
    path = Path(source)
    if path.is_file():
        return AdapterLocation(path=path)
    if path.is_dir():
        return AdapterLocation(path=single_adapter_file(path))
    text = os.fspath(source)
    if looks_like_repo_id(text):
        return AdapterLocation(repo_id=text)
    raise NKVError(f"{text}: no such file, and not a Hub repo id of the form 'user/name'")


def resolve_adapter(source: AdapterSource, revision: str | None = None, *, lazy_facts: bool = False) -> NKVAdapter:
    """Load `source`: an NKVAdapter (returned as is), a local .nkv file, a local folder
    holding exactly one .nkv file, or a Hugging Face Hub repo id ("user/name").
    `lazy_facts`: as in `NKVAdapter.load` (serving loaders).

    Raises:
        NKVFormatError: the file is not a valid adapter.
        NKVHubError: the repo could not be fetched or holds no single adapter.
        NKVError: the path does not exist and is not a repo id.
    """
    where = locate_adapter(source)
    if where.adapter is not None:
        return where.adapter
    if where.path is not None:
        return NKVAdapter.load(where.path, lazy_facts=lazy_facts)
    assert where.repo_id is not None
    local = fetch_adapter(where.repo_id, revision=revision)
    try:
        return NKVAdapter.load(local, lazy_facts=lazy_facts)
    except NKVFormatError as exc:  # name the repo the user asked for, not the cache path
        raise type(exc)(f"{where.repo_id}@{revision or 'main'}:{local.name}", exc.problems) from None


def single_adapter_file(folder: Path) -> Path:
    """The one .nkv file in `folder`; an error when there are none or several."""
    found = sorted(folder.glob("*.nkv"))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise NKVError(f"{folder}: expected exactly one .nkv file, found {len(found)} ({names}); "
                       "pass the file's path instead")
    return found[0]


def looks_like_repo_id(text: str) -> bool:
    """True for "user/name" (two non-empty parts, not a relative/absolute path, not *.nkv)."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")) and not text.endswith(".nkv")


__all__ = ["resolve_adapter", "locate_adapter", "AdapterLocation", "single_adapter_file", "looks_like_repo_id",
           "AdapterSource"]
