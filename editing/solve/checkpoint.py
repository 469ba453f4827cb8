"""Sidecar checkpoints: a long build that dies continues where it stopped.

A checkpoint folder holds `state.json` (a digest of everything that determines the
rows, the chosen layer and the context prefixes) and one `rows-<start>-<end>.safetensors`
per flushed range of facts, each written atomically. Rows are independent, so resuming
is just "compute the facts not covered yet".

Rows files do not trust `state.json`: each records the build it belongs to (a digest of
the state's inputs, layer and prefixes) and one digest per row (build, fact index, row
bytes). `iter_rows` checks both against the state written for the current build, so a
deleted or stale `state.json`, a rows file left by another build, or a changed byte never
lets a wrong row into an adapter: such a file is an error that names it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from nkv.atomic import atomic_file
from nkv.errors import NKVError

STATE = "state.json"
FORMAT = 1  # of state.json (rows files without digests are refused by _verify)
_ROWS_GLOB = "rows-*.safetensors"
_BUILD_KEY, _ROWS_KEY = "nkv.checkpoint.build", "nkv.checkpoint.row_digests"
_BUILD_FIELDS = ("inputs", "layer", "prefixes")  # what determines a row's values


def digest(payload: Any) -> str:
    """sha256 of a JSON-serialisable description of the build's inputs."""
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Checkpoint:
    """One build's checkpoint folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    @property
    def exists(self) -> bool:
        """True when the folder holds a state or any rows (rows without a state still need --resume)."""
        return (self.folder / STATE).is_file() or any(self.folder.glob(_ROWS_GLOB))

    def state(self) -> dict[str, Any]:
        try:
            state = json.loads((self.folder / STATE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise NKVError(f"{self.folder / STATE}: unreadable checkpoint state ({exc}); delete {self.folder} "
                           "to start over") from None
        if state.get("format") != FORMAT:
            raise NKVError(f"{self.folder}: checkpoint written by another nkv version; delete it to start over")
        return state

    def require_resume(self, resume: bool) -> None:
        """Refuse to start over an interrupted build unless resuming it (the CLI asks before loading a model)."""
        if self.exists and not resume:
            raise NKVError(f"{self.folder} holds an interrupted build ({self.n_done()} of its facts done); "
                           "resume it (--resume / resume=True) or delete that folder to start over")

    def resumed_state(self, inputs: str) -> dict[str, Any]:
        """The saved state if there is one ({} if not); an error if it was written for other `inputs`."""
        if not (self.folder / STATE).is_file():
            return {}  # rows without a state: recomputed choices; iter_rows checks each row against them
        state = self.state()
        if state.get("inputs") != inputs:
            raise NKVError(f"{self.folder}: this checkpoint belongs to a different build (facts, options or "
                           "model changed); rerun with the same inputs or delete it to start over")
        return state

    def write_state(self, state: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.folder / STATE, json.dumps({"format": FORMAT, **state}, indent=1).encode("utf-8"))

    def update_state(self, **fields: Any) -> None:
        state = self.state() if self.exists else {}
        state.pop("format", None)
        self.write_state({**state, **fields})

    def save_rows(self, indices: list[int], rows: dict[str, torch.Tensor]) -> None:
        """Store rows for fact `indices` (contiguous or not; recorded in the file)."""
        from safetensors.torch import save

        tensors = {name: t.detach().to("cpu").contiguous() for name, t in rows.items()}
        build = self.build_digest()
        meta = {_BUILD_KEY: build, _ROWS_KEY: json.dumps(_row_digests(build, indices, tensors))}
        tensors["index"] = torch.tensor(indices, dtype=torch.int64)
        name = f"rows-{min(indices):09d}-{max(indices):09d}.safetensors"
        _atomic_write(self.folder / name, save(tensors, metadata=meta))

    def build_digest(self) -> str:
        """Digest of what determines the rows (inputs, layer, prefixes), from the current state.json."""
        if not (self.folder / STATE).is_file():
            raise NKVError(f"{self.folder}: no {STATE}, so checkpointed rows cannot be checked; resume the build "
                           "(it writes the state first) or delete the folder")
        state = self.state()
        return digest({key: state.get(key) for key in _BUILD_FIELDS})

    def iter_rows(self) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """(fact indices, their rows) for every rows file in the folder, each row's digest checked.

        Raises:
            NKVError: a file is damaged, was written by another build or another nkv version,
                or a row's bytes do not match its digest (the message names the file).
        """
        from safetensors import safe_open

        paths = sorted(self.folder.glob(_ROWS_GLOB))
        build = self.build_digest() if paths else ""
        for path in paths:
            try:
                with safe_open(str(path), framework="pt") as fh:
                    meta = fh.metadata() or {}
                    tensors = {name: fh.get_tensor(name) for name in fh.keys()}
            except Exception as exc:  # a damaged file (torn write on a full disk, say)
                raise NKVError(f"{path}: damaged checkpoint file ({exc}); delete it and resume") from None
            indices = tensors.pop("index").tolist()
            _verify(path, build, meta, indices, tensors)
            yield indices, tensors

    def n_done(self) -> int:
        """Facts stored so far (reads only the index tensors)."""
        from safetensors import safe_open

        total = 0
        for path in self.folder.glob(_ROWS_GLOB):
            try:
                with safe_open(str(path), framework="pt") as fh:
                    total += fh.get_slice("index").get_shape()[0]
            except Exception:
                continue  # damaged: recomputed on resume anyway
        return total

    def remove(self) -> None:
        """Delete the folder's checkpoint files (after the output is safely written)."""
        if not self.folder.is_dir():
            return
        for path in self.folder.glob(_ROWS_GLOB):
            path.unlink(missing_ok=True)
        (self.folder / STATE).unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass  # the user keeps other files there


def _row_digests(build: str, indices: list[int], tensors: dict[str, torch.Tensor]) -> list[str]:
    """sha256 per row of (build, fact index, every tensor's bytes for that row)."""
    out = []
    for r, index in enumerate(indices):
        h = hashlib.sha256(f"{build}:{index}".encode())
        for name in sorted(tensors):
            h.update(name.encode())
            h.update(tensors[name][r].reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        out.append(h.hexdigest())
    return out


def _verify(path: Path, build: str, meta: dict[str, str], indices: list[int],
            tensors: dict[str, torch.Tensor]) -> None:
    """Raise unless the file belongs to `build` and every row matches its recorded digest."""
    if _BUILD_KEY not in meta or _ROWS_KEY not in meta:
        raise NKVError(f"{path}: written by an older nkv without row digests, so it cannot be checked; delete it "
                       "and resume (its facts are recomputed)")
    if meta[_BUILD_KEY] != build:
        raise NKVError(f"{path}: these rows belong to a different build (facts, options, layer or prefixes differ "
                       f"from {STATE}); delete the file, or the whole folder to start over, and resume")
    expected = json.loads(meta[_ROWS_KEY])
    got = _row_digests(build, indices, tensors)
    bad = [i for i, e, g in zip(indices, expected, got) if e != g]
    if len(expected) != len(got) or bad:
        raise NKVError(f"{path}: {len(bad) or 'some'} row(s) do not match their digest (fact index "
                       f"{bad[:5]}); the file was changed or damaged: delete it and resume")


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_file(path) as fh:
        fh.write(data)

__all__ = ["Checkpoint", "digest"]
