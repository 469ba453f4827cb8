"""Write a file so that readers see the old content or the new one, never a half; and
serialise the processes that rewrite one adapter.

Three rules, for every file NKV writes:

* atomic: a temp file in the same folder, fsync'd, renamed over the target, and the
  folder fsync'd so the rename itself survives a power cut;
* never through a symlink, nor into the Hugging Face cache: replacing a cached file
  would make the cache lie about what the Hub served (and a symlink's target would
  silently stop being the file the link names). Write a new file instead;
* one writer at a time: read-modify-write commands (`nkv rm`, `merge`, `eval
  --write-back`) hold a lock file next to the adapter (`rewrite_adapter`, `locked`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator

from .errors import NKVError

if TYPE_CHECKING:
    from .adapter import NKVAdapter

LOCK_TIMEOUT_S = 120.0  # a rewrite holds the lock for one read + one write


def check_writable_target(path: str | os.PathLike) -> Path:
    """`path` as a Path, or NKVError if writing there would replace a symlink or a cached Hub file."""
    path = Path(path)
    cache = _hf_cache_root(path.resolve())
    if path.is_symlink():
        where = " in the Hugging Face cache" if cache else ""
        raise NKVError(f"refusing to replace {path}: it is a symlink to {os.readlink(path)}{where}, and replacing "
                       "it would not change the file it points to; write to a new file instead (nkv rm/merge: "
                       f"-o NEW.nkv; nkv eval --write-back: copy it first, `cp -L {path} local.nkv`)")
    if cache is not None:
        raise NKVError(f"refusing to rewrite {path}: it is inside the Hugging Face cache ({cache}), which must keep "
                       "the bytes the Hub served; write to a new file instead (nkv rm/merge: -o NEW.nkv; "
                       "nkv eval --write-back: `nkv pull REPO -o DIR` and pass that copy)")
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a temp file next to `path`; on a clean exit fsync it, rename it over `path`, fsync the folder.

    Any exception (crash, Ctrl-C, full disk) removes the temp file and leaves an existing
    `path` untouched. The replaced file's permission bits are kept (new files: 0644, not
    mkstemp's 0600).

    Raises:
        NKVError: `path` is a symlink or lies in the Hugging Face cache (`check_writable_target`).
    """
    path = check_writable_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in `folder` durable (POSIX: fsync the directory itself)."""
    if os.name != "posix":
        return  # Windows cannot open a directory for fsync; NTFS journals renames itself
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: str | os.PathLike, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the writers' lock of `path` (the file `.<name>.lock` beside it) inside the block.

    An OS lock (flock): released when the holder exits, even if it crashes.
    """
    from filelock import FileLock, Timeout  # a dependency of huggingface-hub and transformers

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path.parent / f".{path.name}.lock"))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise NKVError(f"{path}: another process has been rewriting it for {timeout:.0f} s (lock "
                       f"{lock.lock_file}); wait for it to finish and retry") from None
    try:
        yield
    finally:
        lock.release()


def rewrite_adapter(path: str | os.PathLike, change: Callable[["NKVAdapter"], "NKVAdapter"],
                    output: str | os.PathLike | None = None) -> "NKVAdapter":
    """Read the adapter at `path`, apply `change`, write the result to `output` (default: `path`),
    holding the writers' lock of the file written, so two rewrites never lose each other's edits.

    >>> rewrite_adapter("edits.nkv", lambda a: a.remove(ids=["cf-17"]))
    """
    from .adapter import NKVAdapter

    target = check_writable_target(path if output is None else output)
    with locked(target):
        result = change(NKVAdapter.load(path))
        result.save(target)
    return result


def _hf_cache_root(resolved: Path) -> Path | None:
    """The `models--owner--name` folder of the Hugging Face cache that holds `resolved`, if any."""
    for parent in resolved.parents:
        if parent.name.startswith(("models--", "datasets--", "spaces--")) and \
                any((parent / sub).is_dir() for sub in ("snapshots", "blobs")):
            return parent
    return None


__all__ = ["atomic_file", "check_writable_target", "fsync_dir", "locked", "rewrite_adapter"]
