"""`nkv eval` through click's CliRunner on the three data shapes (small slices of ../shared/data).

Tiny random models: these tests check shapes, options and messages, not editing quality.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from handmade import forcing_adapter
from nkv import NKVAdapter
from nkv.cli.main import main
from nkv.facts_io import read_facts
from tiny_models import save_tiny, tiny_model, tiny_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SLICES = {  # file -> (expected protocol, expected paraphrases per fact)
    "counterfact-edit.json": "counterfact",  # EasyEdit shape
    "counterfact_azhx_test.json": "counterfact",  # ROME/MEMIT shape
    "zsre_mend_edit.json": "zsre",
}
N = 3


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two shared cores are 10-20x slower here
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")


def _slice(name: str, tmp_path: Path) -> Path:
    source = SHARED / name
    if not source.exists():
        pytest.skip(f"{source} not found (CI keeps ../shared beside the checkout)")
    out = tmp_path / name
    out.write_text(json.dumps(json.loads(source.read_text())[:N]))
    return out


def _adapter_for(data: Path, tmp_path: Path) -> Path:
    """A forcing adapter whose rows are the data file's facts (keys at each prompt's end)."""
    facts = [f.fact for f in read_facts(data)]
    model, tok = tiny_model("llama"), tiny_tokenizer()
    adapter = forcing_adapter(model, tok, [f.prompt for f in facts], [f.target_new for f in facts])
    path = tmp_path / "a.nkv"
    replace(adapter, facts=facts).save(path)
    return path


def _run(*args: str):
    return CliRunner().invoke(main, ["eval", *args], catch_exceptions=False)


@pytest.mark.parametrize("name", sorted(SLICES))
def test_eval_json_on_each_data_shape(name, model_dir, tmp_path):
    data = _slice(name, tmp_path)
    adapter = _adapter_for(data, tmp_path)
    result = _run("--model", str(model_dir), "--adapter", str(adapter), "--data", str(data), "--json",
                  "--fluency-prompts", "1", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["data"]["protocol"] == SLICES[name]
    assert report["data"]["n_facts"] == N and report["adapter"]["matched"] == N
    for key in ("efficacy", "generalization", "specificity", "free_gen_prompt", "fluency"):
        assert set(report["metrics"][key]) == {"pre", "post", "n"}
    assert report["metrics"]["efficacy"]["n"] == N
    assert report["data"]["paraphrases"] >= N and report["data"]["neighbours"] >= N
    assert 0.0 <= report["gate"]["false_fire"] <= 100.0


def test_eval_table_limit_plot_and_write_back(model_dir, tmp_path):
    data = _slice("counterfact-edit.json", tmp_path)
    adapter = _adapter_for(data, tmp_path)
    unrelated = tmp_path / "generic.txt"
    unrelated.write_text("Berlin, Rome, Madrid, London and Vienna are capitals in Europe.\n\nParis is a city.\n")
    plot = tmp_path / "gate.png"
    result = _run("--model", str(model_dir), "--adapter", str(adapter), "--data", str(data), "--limit", "2",
                  "--unrelated", str(unrelated), "--plot", str(plot), "--write-back", "--no-free-gen",
                  "--fluency-prompts", "0")
    assert result.exit_code == 0, result.output
    table = result.stdout
    assert "2 facts from counterfact-edit.json (counterfact protocol)" in table
    assert "efficacy" in table and "gate: false fires, unrelated tokens" in table and "free-gen" not in table
    assert plot.stat().st_size > 1000
    stored = NKVAdapter.load(adapter).eval["counterfact-edit.json"]
    assert stored["n_facts"] == 2 and stored["protocol"] == "counterfact" and "efficacy" in stored["post"]


def test_eval_gate_path_exact_or_sketch(model_dir, tmp_path):
    """--gate picks the gate's path at any size and the report says which ran; with a
    shortlist as long as the adapter, the sketch path decides exactly as the exact one."""
    data = _slice("counterfact-edit.json", tmp_path)
    adapter = _adapter_for(data, tmp_path)
    reports = {}
    for path, *extra in (("auto",), ("auto", "--shortlist", "2"), ("exact",), ("sketch",), ("sketch", "--shortlist", "2")):
        result = _run("--model", str(model_dir), "--adapter", str(adapter), "--data", str(data), "--json",
                      "--no-free-gen", "--fluency-prompts", "0", "--gate", path, *extra)
        assert result.exit_code == 0, result.output
        reports[" ".join([path, *extra])] = json.loads(result.stdout)
    assert reports["auto"]["settings"]["gate_path"] == "exact"  # 3 facts: below the sketch path's size
    assert reports["auto --shortlist 2"]["settings"]["gate_path"] == "exact"  # the loader's choice, as served
    assert reports["exact"]["settings"]["gate_path"] == "exact"
    assert reports["sketch"]["settings"]["gate_path"] == "sketch (shortlist 128)"
    assert reports["sketch --shortlist 2"]["settings"]["gate_path"] == "sketch (shortlist 2)"
    assert reports["sketch"]["metrics"] == reports["exact"]["metrics"]
    assert reports["sketch"]["gate"] == reports["exact"]["gate"]


@pytest.mark.parametrize("overrides, extra, message", [
    ({"--data": "missing.jsonl"}, [], "missing.jsonl: no such file"),
    ({"--adapter": "nope.nkv"}, [], "nope.nkv: no such file"),
    ({"--model": "no-such-model-folder"}, [], "cannot load model 'no-such-model-folder'"),
    ({}, ["--unrelated", "missing.txt"], "missing.txt: no such file"),
    ({"--adapter": "org/remote"}, ["--write-back"], "--write-back rewrites a local .nkv file"),
    ({}, ["--device", "tpu"], "--device 'tpu': not a device"),
    ({}, ["--gate", "exact", "--shortlist", "4"], "--shortlist sets the sketch path's candidates"),
])
def test_eval_user_errors_are_one_line(overrides, extra, message, model_dir, tmp_path, monkeypatch):
    data = _slice("zsre_mend_edit.json", tmp_path)
    adapter = _adapter_for(data, tmp_path)
    monkeypatch.chdir(tmp_path)
    options = {"--model": str(model_dir), "--adapter": str(adapter), "--data": str(data), **overrides}
    result = CliRunner().invoke(main, ["eval", *[x for kv in options.items() for x in kv], *extra])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_eval_names_facts_whose_row_was_built_for_another_target(model_dir, tmp_path):
    data = _slice("zsre_mend_edit.json", tmp_path)
    adapter = _adapter_for(data, tmp_path)
    records = json.loads(data.read_text())
    records[0]["alt"] = records[0]["alt"] + " (changed)"  # ZsRE's new target: the adapter asked for the old one
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(records))
    result = CliRunner().invoke(main, ["eval", "--model", str(model_dir), "--adapter", str(adapter), "--data",
                                       str(changed), "--json", "--no-free-gen", "--fluency-prompts", "0"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["adapter"]["matched"] == N and report["adapter"]["other_target"] == 1
    assert "1 fact(s) of" in result.stderr and "built for another target" in result.stderr


def test_write_back_refuses_data_the_adapter_was_not_built_on(model_dir, tmp_path):
    data = _slice("zsre_mend_edit.json", tmp_path)
    adapter = _adapter_for(data, tmp_path)
    before = adapter.read_bytes()
    other = tmp_path / "other.json"
    other.write_text(json.dumps(json.loads((SHARED / "zsre_mend_edit.json").read_text())[N : 2 * N]))
    result = CliRunner().invoke(main, ["eval", "--model", "no-model-is-loaded", "--adapter", str(adapter),
                                       "--data", str(other), "--write-back"])
    assert result.exit_code == 1 and "--write-back: none of the 3 facts" in result.stderr, result.output
    assert adapter.read_bytes() == before
