"""Writes that survive crashes and races (issue 14): the folder is fsync'd after the rename,
nothing is rewritten through a symlink or inside the Hugging Face cache, and concurrent
rewrites of one adapter are serialised so neither loses the other's edit."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import nkv
from nkv import NKVAdapter
from nkv.atomic import atomic_file, rewrite_adapter

from test_cli_manage import GOLDEN, assert_user_error, run

SHA = "a" * 40


@pytest.fixture
def golden(tmp_path: Path) -> Path:
    return Path(shutil.copy(GOLDEN, tmp_path / "golden.nkv"))


@pytest.fixture
def cached(tmp_path: Path) -> Path:
    """An adapter as the Hub client caches it: snapshots/<commit>/adapter.nkv -> ../../blobs/<hash>."""
    repo = tmp_path / "hf" / "hub" / "models--alice--edits"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / SHA).mkdir(parents=True)
    blob = Path(shutil.copy(GOLDEN, repo / "blobs" / "0123abcd"))
    link = repo / "snapshots" / SHA / "adapter.nkv"
    link.symlink_to(os.path.relpath(blob, link.parent))
    return link


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    NKVAdapter.load(GOLDEN).save(tmp_path / "out.nkv")
    assert synced == ["file", "dir"]


def test_an_interrupted_write_leaves_the_old_file(golden):
    before = golden.read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_file(golden) as fh:
            fh.write(b"half")
            raise RuntimeError("crash")
    assert golden.read_bytes() == before and [p.name for p in golden.parent.iterdir()] == ["golden.nkv"]


def test_rm_refuses_to_rewrite_a_symlink_into_the_hub_cache(cached, tmp_path):
    blob = cached.resolve()
    before = blob.read_bytes()
    line = assert_user_error(run("rm", cached, "--id", "cf-0"), "symlink", "Hugging Face cache", "-o NEW.nkv")
    assert "Traceback" not in line
    assert cached.is_symlink() and blob.read_bytes() == before  # neither the link nor the blob changed
    result = run("rm", cached, "--id", "cf-0", "-o", tmp_path / "mine.nkv")  # the fix the message gives
    assert result.exit_code == 0, result.output
    assert NKVAdapter.load(tmp_path / "mine.nkv").ids == ["cf-1"] and blob.read_bytes() == before


def test_files_inside_the_hub_cache_are_not_rewritten_even_without_symlinks(cached, tmp_path):
    copy = cached.parent / "plain.nkv"  # caches on file systems without symlinks hold real files
    shutil.copy(GOLDEN, copy)
    assert_user_error(run("rm", copy, "--id", "cf-0"), "inside the Hugging Face cache")
    assert_user_error(run("merge", GOLDEN, GOLDEN, "-o", copy), "inside the Hugging Face cache")


def test_merge_and_rm_refuse_any_symlinked_output(golden, tmp_path):
    link = tmp_path / "current.nkv"
    link.symlink_to(golden)
    assert_user_error(run("merge", GOLDEN, GOLDEN, "-o", link), "symlink")
    assert_user_error(run("rm", link, "--id", "cf-0"), "symlink")
    assert NKVAdapter.load(golden).ids == ["cf-0", "cf-1"]


def test_merge_gamma_is_range_checked_including_nan(golden, tmp_path):
    for bad in ("nan", "-1", "1.5"):
        result = run("merge", golden, golden, "-o", tmp_path / "m.nkv", "--gamma", bad)
        assert result.exit_code == 2 and "[0, 1]" in result.stderr and "Traceback" not in result.output, bad
    assert not (tmp_path / "m.nkv").exists()


_WRITER = textwrap.dedent("""
    import sys, time
    from nkv.atomic import rewrite_adapter

    def change(adapter):
        time.sleep(1.0)  # read ... (the other writer starts here) ... write
        return adapter.remove(ids=[sys.argv[2]])

    rewrite_adapter(sys.argv[1], change)
""")


def test_concurrent_rewrites_are_serialised(golden):
    """Two processes each remove one fact from the same file; both removals must survive."""
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(golden), fact_id]) for fact_id in ("cf-0", "cf-1")]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    assert NKVAdapter.load(golden).n_facts == 0


def test_rewrite_adapter_writes_a_new_file_and_leaves_the_source(golden, tmp_path):
    out = tmp_path / "new.nkv"
    result = rewrite_adapter(golden, lambda a: a.remove(ids=["cf-1"]), output=out)
    assert result.ids == ["cf-0"] and NKVAdapter.load(golden).ids == ["cf-0", "cf-1"]
    assert isinstance(NKVAdapter.load(out), nkv.NKVAdapter)
