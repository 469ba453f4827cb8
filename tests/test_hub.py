"""Push and fetch through the real huggingface_hub client against a fake Hub on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
import yaml

from hub_fixtures import BASE, adapter_bytes, cache_dir, hub, small_adapter  # noqa: F401 (fixtures)
from hub_server import FakeHub, point_client_at
from nkv import NKVAdapter, NKVFormatError, NKVHubError
from nkv.hub import CANONICAL_FILENAME, fetch, fetch_adapter, fetch_model_card, push_adapter
from nkv.resolve import resolve_adapter


def same_adapter(a: NKVAdapter, b: NKVAdapter) -> bool:
    return a.facts == b.facts and torch.equal(a.keys, b.keys) and torch.equal(a.residuals, b.residuals)


# ---------------------------------------------------------------------------- push
def test_push_creates_repo_and_uploads_adapter_and_card_in_one_commit(hub, tmp_path):
    adapter = small_adapter()
    path = adapter.save(tmp_path / "my-edits.nkv")
    result = push_adapter(path, "alice/edits", commit_message="first edits")

    commits = [r for r in hub.requests if "/commit/" in r.path]
    assert len(commits) == 1
    files = hub.files("alice/edits")
    assert result.commit_oid == hub.repos["alice/edits"].refs["main"]
    assert files[CANONICAL_FILENAME] == path.read_bytes()  # canonical name, whatever the local one
    assert set(files) == {".gitattributes", CANONICAL_FILENAME, "README.md"}
    meta = yaml.safe_load(files["README.md"].decode().split("---\n", 2)[1])
    assert meta["base_model"] == BASE and meta["library_name"] == "nkv"
    assert hub.yaml_seen == [meta]  # the client had the Hub validate the card before committing
    assert b'"summary": "first edits"' in commits[0].body


def test_push_again_commits_on_top_and_private_flag_reaches_the_hub(hub, tmp_path):
    push_adapter(small_adapter(seed=1).save(tmp_path / "a.nkv"), "alice/edits", private=True)
    first = hub.repos["alice/edits"].refs["main"]
    push_adapter(small_adapter(seed=2).save(tmp_path / "b.nkv"), "alice/edits")
    assert hub.repos["alice/edits"].private
    assert hub.repos["alice/edits"].refs["main"] != first
    assert NKVAdapter.from_bytes(hub.files("alice/edits")[CANONICAL_FILENAME]).keys.equal(small_adapter(seed=2).keys)


def test_push_to_a_branch_and_as_a_pull_request(hub, tmp_path):
    path = small_adapter().save(tmp_path / "a.nkv")
    push_adapter(path, "alice/edits")
    main = hub.repos["alice/edits"].refs["main"]
    push_adapter(small_adapter(seed=5).save(tmp_path / "b.nkv"), "alice/edits", revision="v2")
    assert hub.repos["alice/edits"].refs["main"] == main  # the branch moved, main did not
    assert CANONICAL_FILENAME in hub.files("alice/edits", "v2")
    result = push_adapter(small_adapter(seed=6).save(tmp_path / "c.nkv"), "alice/edits", create_pr=True, card=False)
    assert result.pr_url and result.pr_url.endswith("/discussions/1")
    assert "refs/pr/1" in hub.repos["alice/edits"].refs


def test_push_never_uploads_an_invalid_adapter(hub, tmp_path):
    bad = tmp_path / "bad.nkv"
    data = bytearray(adapter_bytes(small_adapter(), tmp_path))
    data[20:40] = b"x" * 20  # break the header JSON
    bad.write_bytes(bytes(data))
    with pytest.raises(NKVFormatError, match="bad.nkv"):
        push_adapter(bad, "alice/edits")
    assert hub.requests == []


def test_push_without_a_token_says_how_to_log_in(hub, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(NKVHubError, match=r"no Hugging Face token.*huggingface-cli login.*HF_TOKEN"):
        push_adapter(small_adapter().save(tmp_path / "a.nkv"), "alice/edits")
    assert hub.requests == []


def test_push_with_a_bad_token_or_into_someone_elses_namespace(hub, tmp_path, monkeypatch):
    path = small_adapter().save(tmp_path / "a.nkv")
    with pytest.raises(NKVHubError, match=r"bob/edits.*permission denied \(403\)"):
        push_adapter(path, "bob/edits")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    with pytest.raises(NKVHubError, match=r"alice/edits: the Hub rejected the token \(401\)"):
        push_adapter(path, "alice/edits")


# ---------------------------------------------------------------------------- fetch
def test_fetch_downloads_only_the_adapter_and_resolve_loads_it(hub, tmp_path):
    adapter = small_adapter()
    push_adapter(adapter.save(tmp_path / "a.nkv"), "alice/edits")
    hub.requests.clear()
    loaded = resolve_adapter("alice/edits")
    assert same_adapter(loaded, adapter)
    assert hub.downloads() == [CANONICAL_FILENAME]  # not the README, nothing else


def test_revision_pinning_by_commit_branch_and_default(hub, tmp_path):
    v1, v2 = small_adapter(seed=1), small_adapter(seed=2)
    push_adapter(v1.save(tmp_path / "1.nkv"), "alice/edits")
    sha1 = hub.repos["alice/edits"].refs["main"]
    push_adapter(v2.save(tmp_path / "2.nkv"), "alice/edits")
    push_adapter(v1.save(tmp_path / "1.nkv"), "alice/edits", revision="stable")

    assert same_adapter(resolve_adapter("alice/edits"), v2)
    assert same_adapter(resolve_adapter("alice/edits", revision=sha1), v1)
    assert same_adapter(resolve_adapter("alice/edits", revision="stable"), v1)
    fetched = fetch("alice/edits", revision=sha1)
    assert fetched.commit == sha1 and f"snapshots/{sha1}/" in fetched.path.as_posix()


def test_repo_without_an_adapter_or_with_ambiguous_ones(hub, tmp_path):
    a = adapter_bytes(small_adapter(seed=1), tmp_path, "a.nkv")
    b = adapter_bytes(small_adapter(seed=2), tmp_path, "b.nkv")
    hub.add_repo("alice/model", {"config.json": b"{}", "model.safetensors": b"weights"})
    with pytest.raises(NKVHubError, match=r"alice/model: no .nkv adapter file in the repo \(files: .*config.json"):
        fetch_adapter("alice/model")
    hub.add_repo("alice/two", {"paris.nkv": a, "rome.nkv": b})
    with pytest.raises(NKVHubError, match=r"2 .nkv files and no adapter.nkv .*paris.nkv, rome.nkv.*--file NAME"):
        fetch_adapter("alice/two")
    assert same_adapter(resolve_adapter(fetch_adapter("alice/two", filename="rome.nkv")), small_adapter(seed=2))
    hub.add_repo("alice/three", {"paris.nkv": a, "adapter.nkv": b, "old/x.nkv": a})
    assert same_adapter(resolve_adapter("alice/three"), small_adapter(seed=2))  # the canonical name wins
    nested_sha = hub.add_repo("alice/nested", {"edits/only.nkv": a})
    nested = fetch("alice/nested")
    assert (nested.filename, nested.commit) == ("edits/only.nkv", nested_sha)
    assert hub.downloads() == ["rome.nkv", "adapter.nkv", "edits/only.nkv"]


def test_missing_repo_revision_and_file(hub, tmp_path):
    with pytest.raises(NKVHubError, match=r"alice/nope: repository not found.*HF_TOKEN"):
        fetch_adapter("alice/nope")
    push_adapter(small_adapter().save(tmp_path / "a.nkv"), "alice/edits")
    with pytest.raises(NKVHubError, match=r"revision 'v9' not found"):
        fetch_adapter("alice/edits", revision="v9")
    with pytest.raises(NKVHubError, match=r"no file 'other.nkv' in the repo \(it has: .*adapter.nkv"):
        fetch_adapter("alice/edits", filename="other.nkv")


def test_only_nkv_files_are_fetched_and_bad_ids_are_explained(hub, tmp_path):
    hub.add_repo("alice/edits", {"adapter.nkv": adapter_bytes(small_adapter(), tmp_path)})
    with pytest.raises(NKVHubError, match="'README.md' is not an .nkv file; only adapters are fetched"):
        fetch_adapter("alice/edits", filename="README.md")
    with pytest.raises(NKVHubError, match="'alice/ed its' is not a valid Hub repo id"):
        fetch_adapter("alice/ed its")
    assert fetch_model_card("alice/edits") is None  # no README.md in that repo
    assert hub.downloads() == []


def test_private_and_gated_repos_need_a_token(hub, tmp_path, monkeypatch):
    data = adapter_bytes(small_adapter(), tmp_path)
    hub.add_repo("alice/secret", {"adapter.nkv": data}, private=True)
    hub.add_repo("alice/gated", {"adapter.nkv": data}, gated=True)
    assert fetch_adapter("alice/secret").is_file()  # the owner's token reads it
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(NKVHubError, match="alice/secret: repository not found, or not accessible"):
        fetch_adapter("alice/secret")
    with pytest.raises(NKVHubError, match="alice/gated: the repo is gated; accept its access conditions"):
        fetch_adapter("alice/gated")


def test_corrupt_tensor_bytes_are_caught_by_checksum_and_dropped_from_cache(hub, tmp_path):
    push_adapter(small_adapter().save(tmp_path / "a.nkv"), "alice/edits")
    hub.corrupt[CANONICAL_FILENAME] = lambda b: b[:-5] + bytes(x ^ 0xFF for x in b[-5:])  # same length
    with pytest.raises(NKVFormatError, match=r"alice/edits/adapter.nkv@\w+: downloaded bytes do not match"):
        resolve_adapter("alice/edits")
    hub.corrupt.clear()  # transfer fixed: running again downloads a clean copy
    assert resolve_adapter("alice/edits").n_facts == 3
    assert hub.downloads() == [CANONICAL_FILENAME, CANONICAL_FILENAME]


def test_a_repo_file_that_is_not_an_adapter_names_the_repo_file(hub, tmp_path):
    data = bytearray(adapter_bytes(small_adapter(), tmp_path))
    data[8:9] = b"["  # header JSON is no longer an object
    hub.add_repo("alice/broken", {"adapter.nkv": bytes(data)})
    with pytest.raises(NKVFormatError, match=r"(?s)alice/broken/adapter.nkv@\w+: .*V2.*not a valid NKV adapter"):
        fetch_adapter("alice/broken")


# ---------------------------------------------------------------------------- offline
def seed_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = "c" * 40,
               ref: str = "main", symlinks: bool = True) -> Path:
    """The hub cache layout by hand: models--org--name/{blobs,refs/<ref>,snapshots/<commit>/}."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    for name, data in files.items():
        if symlinks:
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            blob.write_bytes(data)
            (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
        else:
            (snapshot / name).write_bytes(data)
    return snapshot


def go_offline(monkeypatch, cache: Path) -> None:
    import huggingface_hub.constants as hc

    point_client_at(monkeypatch, "http://127.0.0.1:9", str(cache), None)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)


def test_offline_mode_uses_a_seeded_cache_and_pins_revisions(tmp_path, monkeypatch, cache_dir):
    v1, v2 = small_adapter(seed=1), small_adapter(seed=2)
    seed_cache(cache_dir, "alice/edits", {"adapter.nkv": adapter_bytes(v1, tmp_path)}, commit="1" * 40)
    seed_cache(cache_dir, "alice/edits", {"adapter.nkv": adapter_bytes(v2, tmp_path)}, commit="2" * 40)
    go_offline(monkeypatch, cache_dir)
    fetched = fetch("alice/edits")
    assert fetched.offline and fetched.commit == "2" * 40  # refs/main points at the last seeded commit
    assert same_adapter(resolve_adapter("alice/edits"), v2)
    assert same_adapter(resolve_adapter("alice/edits", revision="1" * 40), v1)


def test_offline_mode_without_the_repo_in_cache_says_so(monkeypatch, cache_dir, tmp_path):
    go_offline(monkeypatch, cache_dir)
    with pytest.raises(NKVHubError, match=r"alice/edits@main: not in the local cache .* HF_HUB_OFFLINE is set"):
        fetch_adapter("alice/edits")
    seed_cache(cache_dir, "alice/edits", {"adapter.nkv": adapter_bytes(small_adapter(), tmp_path)})
    with pytest.raises(NKVHubError, match=r"revision|not in the local cache"):
        fetch_adapter("alice/edits", revision="v1")


def test_offline_cache_copies_without_symlinks_still_load(monkeypatch, cache_dir, tmp_path):
    seed_cache(cache_dir, "alice/edits", {"adapter.nkv": adapter_bytes(small_adapter(), tmp_path)}, symlinks=False)
    go_offline(monkeypatch, cache_dir)
    assert resolve_adapter("alice/edits").n_facts == 3


def test_offline_corrupt_cached_blob_is_detected(monkeypatch, cache_dir, tmp_path):
    snapshot = seed_cache(cache_dir, "alice/edits", {"adapter.nkv": adapter_bytes(small_adapter(), tmp_path)})
    blob = (snapshot / "adapter.nkv").resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    go_offline(monkeypatch, cache_dir)
    with pytest.raises(NKVFormatError, match="do not match the Hub's checksum"):
        fetch_adapter("alice/edits")


def test_unreachable_hub_falls_back_to_the_cache(monkeypatch, cache_dir, tmp_path, caplog):
    with FakeHub() as server:
        point_client_at(monkeypatch, server.url, str(cache_dir), server.token)
        push_adapter(small_adapter().save(tmp_path / "a.nkv"), "alice/edits")
        fetch_adapter("alice/edits")  # fills the cache
    # The server is gone: connection refused on the same port.
    fetched = fetch("alice/edits")
    assert fetched.offline and NKVAdapter.load(fetched.path).n_facts == 3
    assert "unreachable" in caplog.text and "trying the cached copy" in caplog.text
    with pytest.raises(NKVHubError, match=r"alice/other@main: not in the local cache .* is unreachable"):
        fetch_adapter("alice/other")
