"""`nkv push` / `nkv pull` end to end: CLI, fake Hub, and a tiny transformers model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from handmade import first_token, forcing_adapter
from hub_fixtures import adapter_bytes, hub, small_adapter  # noqa: F401 (fixtures)
from hub_server import FakeHub
from tiny_models import tiny_model, tiny_tokenizer
from nkv import NKVAdapter, load_nkv_adapter
from nkv.cli.main import main

EDITED = ["The Eiffel Tower is located in", "Danielle Darrieux speaks"]
TARGETS = ["Rome", "German"]


def nkv(*args: str):
    return CliRunner().invoke(main, list(args))


def next_token(model, tok, prompt: str) -> int:
    with torch.no_grad():
        return int(model(**tok(prompt, return_tensors="pt")).logits[0, -1].argmax())


def test_push_then_load_by_repo_id_edits_a_tiny_model(hub, tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    path = forcing_adapter(model, tok, EDITED, TARGETS).save(tmp_path / "edits.nkv")
    before = [next_token(model, tok, p) for p in EDITED]

    result = nkv("push", str(path), "--repo", "alice/paris-edits")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{hub.url}/alice/paris-edits/commit/{hub.repos['alice/paris-edits'].refs['main']}"
    assert "Pushed" in result.stderr

    handle = load_nkv_adapter(model, "alice/paris-edits")
    assert [next_token(model, tok, p) for p in EDITED] == [first_token(tok, t) for t in TARGETS]
    handle.detach()
    assert [next_token(model, tok, p) for p in EDITED] == before


def test_pull_prints_the_path_and_copies_with_output_dir(hub, tmp_path):
    adapter = small_adapter()
    nkv("push", str(adapter.save(tmp_path / "a.nkv")), "--repo", "alice/edits")
    result = nkv("pull", "alice/edits")
    assert result.exit_code == 0, result.output
    cached = Path(result.stdout.strip())
    assert cached.name == "adapter.nkv" and "models--alice--edits" in cached.as_posix()
    assert "3 facts, layer 1" in result.stderr

    out = tmp_path / "out"
    result = nkv("pull", "alice/edits", "-o", str(out), "--card", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["path"] == str(out / "adapter.nkv") and info["n_facts"] == 3
    assert NKVAdapter.load(out / "adapter.nkv").facts == adapter.facts
    assert (out / "README.md").read_text().startswith("---\nlibrary_name: nkv")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter.nkv"]  # no temp files left


@pytest.mark.parametrize("args, message", [
    (["pull", "alice/nope"], "Error: alice/nope: repository not found"),
    (["pull", "alice/two"], "Error: alice/two: 2 .nkv files and no adapter.nkv"),
    (["pull", "alice/two", "--revision", "v7"], "Error: alice/two: revision 'v7' not found"),
])
def test_pull_errors_are_one_line(hub, tmp_path, args, message):
    data = adapter_bytes(small_adapter(), tmp_path)
    hub.add_repo("alice/two", {"a.nkv": data, "b.nkv": data})
    result = nkv(*args)
    assert result.exit_code == 1
    assert result.stderr.startswith(message)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_push_without_token_and_invalid_file_are_one_line_errors(hub, tmp_path, monkeypatch):
    bad = tmp_path / "bad.nkv"
    bad.write_bytes(b"not an adapter")
    result = nkv("push", str(bad), "--repo", "alice/edits")
    assert result.exit_code == 1 and result.stderr.startswith(f"Error: {bad}: V1")
    monkeypatch.delenv("HF_TOKEN")
    result = nkv("push", str(small_adapter().save(tmp_path / "a.nkv")), "--repo", "alice/edits")
    assert result.exit_code == 1
    assert result.stderr == ("Error: push alice/edits: no Hugging Face token found; run `huggingface-cli login` "
                             "(or `hf auth login`) or set HF_TOKEN\n")
    assert hub.requests == []


def test_environment_variables_alone_configure_the_cli(tmp_path):
    """In fresh processes huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HUB_CACHE at import."""
    path = small_adapter().save(tmp_path / "a.nkv")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_HOME=str(tmp_path / "home"), HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_DISABLE_TELEMETRY="1")
    # push then pull in one process (two processes, not three: each pays the torch import)
    script = ("import sys; from nkv.cli.main import main\n"
              "for args in (['push', sys.argv[1], '--repo', 'alice/edits'], ['pull', 'alice/edits']):\n"
              "    main(args, standalone_mode=False)\n")
    with FakeHub() as server:
        online = {**env, "HF_ENDPOINT": server.url, "HF_TOKEN": server.token, "HF_HUB_OFFLINE": "0"}
        run = subprocess.run([sys.executable, "-c", script, str(path)], env=online, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        assert server.downloads() == ["adapter.nkv"]
    commit_url, pulled = run.stdout.splitlines()
    assert commit_url.startswith(server.url + "/alice/edits/commit/")
    assert Path(pulled).is_relative_to(tmp_path / "cache")
    offline = {**env, "HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "1"}  # the server is gone too
    again = subprocess.run([sys.executable, "-c", "from nkv.cli.main import main; main()", "pull", "alice/edits"],
                           env=offline, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == pulled and "from the cache, offline" in again.stderr
