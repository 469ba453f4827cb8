"""Sidecar checkpoints: a long build that dies continues where it stopped.

A checkpoint folder holds `state.json` (a digest of everything that determines the
rows, the chosen layer and the context prefixes) and one `rows-<start>-<end>.safetensors`
per flushed range of facts, each written atomically. Rows are independent, so resuming
is just "compute the facts not covered yet".
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
FORMAT = 1


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
        return (self.folder / STATE).is_file()

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
        if not self.exists:
            return {}
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
        tensors["index"] = torch.tensor(indices, dtype=torch.int64)
        name = f"rows-{min(indices):09d}-{max(indices):09d}.safetensors"
        _atomic_write(self.folder / name, save(tensors))

    def iter_rows(self) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """(fact indices, their rows) for every rows file in the folder."""
        from safetensors.torch import load_file

        for path in sorted(self.folder.glob("rows-*.safetensors")):
            try:
                tensors = load_file(str(path))
            except Exception as exc:  # a damaged file (torn write on a full disk, say)
                raise NKVError(f"{path}: damaged checkpoint file ({exc}); delete it and resume") from None
            yield tensors.pop("index").tolist(), tensors

    def n_done(self) -> int:
        """Facts stored so far (reads only the index tensors)."""
        from safetensors import safe_open

        total = 0
        for path in self.folder.glob("rows-*.safetensors"):
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
        for path in self.folder.glob("rows-*.safetensors"):
            path.unlink(missing_ok=True)
        (self.folder / STATE).unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass  # the user keeps other files there


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_file(path) as fh:
        fh.write(data)

__all__ = ["Checkpoint", "digest"]
