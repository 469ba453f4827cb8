"""`nkv build` and `nkv generate` end to end on a tiny llama saved with save_pretrained."""

from __future__ import annotations

import json

import pytest
import torch
import tiny_models as tm
from click.testing import CliRunner

import nkv.constants
from nkv.adapter import NKVAdapter
from nkv.cli.main import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = ["--steps", "12", "--lr", "0.2", "--clamp", "2", "--prefixes", "2", "--quiet"]
FACTS = [
    {"id": "dd", "subject": "Danielle Darrieux", "prompt": "The mother tongue of {}", "target_new": "English"},
    {"id": "ty", "subject": "Toko Yasuda", "prompt": "The guitar of Toko Yasuda", "target_new": "piano"},
]




@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tm.save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


def _facts(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_build_writes_a_valid_adapter_and_generate_shows_the_edit(tmp_path, model_dir):
    facts, out = _facts(tmp_path / "f.jsonl", FACTS), tmp_path / "edits.nkv"
    result = _run("build", facts, "--model", model_dir, "-o", out, *FAST, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    # No layer is verified for this 64-wide model, so the CLI swept the layers.
    assert summary["n_facts"] == 2 and summary["layer_choice"]["mode"] == "auto"
    assert summary["layer_choice"]["why"] == "no verified default for this depth and width"
    # The random model takes the first target token only (what this test forces), so the
    # self-check's whole-target efficacy is low here; its first-token share is not.
    assert summary["self_check"]["n_checked"] == 2 and summary["self_check"]["first_token"] == 1.0
    adapter = NKVAdapter.load(out)
    assert adapter.ids == ["dd", "ty"] and adapter.base.name == str(model_dir)
    assert adapter.build["config"]["steps"] == 12
    assert not (tmp_path / "edits.nkv.partial").exists()  # checkpoint removed after the save

    gen = _run("generate", "--model", model_dir, "--adapter", out, "--max-new-tokens", "1", "--json")
    assert gen.exit_code == 0, gen.output
    rows = [json.loads(line) for line in gen.stdout.splitlines()]
    tok = tm.tiny_tokenizer()
    for row, fact in zip(rows, FACTS):
        first = tok.decode(tok(" " + fact["target_new"])["input_ids"][:1])
        assert row["after"] == first != row["before"]

    text = _run("generate", "--model", model_dir, "--adapter", out, "--max-new-tokens", "2", "Hello there")
    assert text.exit_code == 0 and text.stdout.startswith("Hello there\n  before: ")


def test_bad_facts_fail_with_one_error_line_and_write_nothing(tmp_path, model_dir):
    facts = _facts(tmp_path / "f.jsonl", [FACTS[0], "{oops", {"subject": "X", "prompt": "Y", "target_new": "z"}])
    out = tmp_path / "edits.nkv"
    result = _run("build", facts, "--model", model_dir, "-o", out, *FAST)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith("Error: ") and "2 bad record(s)" in result.stderr
    assert "line 2: invalid JSON" in result.stderr and "line 3: subject 'X' is not in the prompt" in result.stderr
    assert "Traceback" not in result.output and not out.exists()

    skipped = _run("build", facts, "--model", model_dir, "-o", out, *FAST)
    assert skipped.exit_code == 1
    skipped = _run("build", facts, "--model", model_dir, "-o", out, *FAST, "--skip-bad")
    assert skipped.exit_code == 0, skipped.output
    assert "skipped: " in skipped.stderr and NKVAdapter.load(out).ids == ["dd"]


def test_resume_and_the_guard_against_forgetting_it(tmp_path, model_dir):
    facts, out = _facts(tmp_path / "f.jsonl", FACTS), tmp_path / "edits.nkv"
    partial = tmp_path / "edits.nkv.partial"
    partial.mkdir()
    (partial / "state.json").write_text(json.dumps({"format": 1}))
    result = _run("build", facts, "--model", model_dir, "-o", out, *FAST)
    assert result.exit_code == 1 and "--resume" in result.stderr and not out.exists()
    result = _run("build", facts, "--model", model_dir, "-o", out, *FAST, "--resume")
    assert result.exit_code == 1 and "different build" in result.stderr


def test_opt_dtype_is_recorded_and_a_bad_one_is_a_usage_error(tmp_path, model_dir):
    facts, out = _facts(tmp_path / "f.jsonl", FACTS), tmp_path / "edits.nkv"
    result = _run("build", facts, "--model", model_dir, "-o", out, "--layer", "1", *FAST, "--opt-dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    adapter = NKVAdapter.load(out)
    assert adapter.build["config"]["opt_dtype"] == "bfloat16" and adapter.keys.dtype == torch.float32
    bad = _run("build", facts, "--model", model_dir, "-o", tmp_path / "x.nkv", "--opt-dtype", "int8")
    assert bad.exit_code == 2 and "--opt-dtype" in bad.stderr and not (tmp_path / "x.nkv").exists()


def test_model_and_option_errors(tmp_path, model_dir):
    facts, out = _facts(tmp_path / "f.jsonl", FACTS), tmp_path / "edits.nkv"
    missing = _run("build", facts, "--model", tmp_path / "nope", "-o", out)
    assert missing.exit_code == 1 and "nope': no such folder" in missing.stderr
    assert "Traceback" not in missing.output
    (tmp_path / "empty").mkdir()
    empty = _run("build", facts, "--model", tmp_path / "empty", "-o", out)
    assert empty.exit_code == 1 and "the folder has no config.json" in empty.stderr and not out.exists()
    bad_layer = _run("build", facts, "--model", model_dir, "-o", out, "--layer", "seven")
    assert bad_layer.exit_code == 2 and "expected a layer number or 'auto'" in bad_layer.stderr
    too_deep = _run("build", facts, "--model", model_dir, "-o", out, "--layer", "9", *FAST)
    assert too_deep.exit_code == 1 and "layer 9 does not exist" in too_deep.stderr
    for option, value in [("--gamma", "nan"), ("--gamma", "1.5"), ("--lr", "nan"), ("--clamp", "inf"),
                          ("--kl-factor", "nan")]:  # refused before anything runs: no output, no .partial
        refused = _run("build", facts, "--model", model_dir, "-o", out, option, value)
        assert refused.exit_code == 2 and option in refused.stderr, (option, value, refused.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "f.jsonl"]


def test_ctrl_c_keeps_the_old_output_and_resume_finishes(tmp_path, model_dir, monkeypatch):
    from nkv.editing.solve import rows

    facts, out = _facts(tmp_path / "f.jsonl", FACTS), tmp_path / "edits.nkv"
    out.write_bytes(b"previous adapter")
    real, calls = rows.optimize_residuals, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rows, "optimize_residuals", interrupted)
    result = _run("build", facts, "--model", model_dir, "-o", out, *FAST, "--batch-size", "1", "--layer", "0")
    assert result.exit_code == 130 and "Interrupted: 1 of 2 facts are saved" in result.stderr
    assert out.read_bytes() == b"previous adapter"

    with_bar = [a for a in FAST if a != "--quiet"]
    result = _run("build", facts, "--model", model_dir, "-o", out, *with_bar, "--batch-size", "1", "--layer", "0",
                  "--resume")
    assert result.exit_code == 0, result.output
    assert calls["n"] == 3 and NKVAdapter.load(out).ids == ["dd", "ty"]
    assert "| 1/2 [" in result.stderr  # the bar starts at the resumed fact, before any new work
    assert not (tmp_path / "edits.nkv.partial").exists()


def test_an_adapter_whose_edits_did_not_take_is_reported_loudly_with_the_fix(tmp_path, model_dir):
    from nkv.model_card import render_model_card

    facts, out = _facts(tmp_path / "f.jsonl", FACTS), tmp_path / "edits.nkv"
    # One step: δ stays 0, so nothing is edited, and the build must say so.
    result = _run("build", facts, "--model", model_dir, "-o", out, "--steps", "1", "--layer", "0", "--prefixes", "1")
    assert result.exit_code == 0, result.output
    assert "WARNING: only 0% of 2 edits answer their new target" in result.stderr
    assert "--layer auto" in result.stderr and "self-check: 0% of 2" in result.stdout
    adapter = NKVAdapter.load(out)
    assert adapter.build["self_check"]["efficacy"] == 0.0 and adapter.build["self_check"]["failed"] == ["dd", "ty"]
    assert "| build self-check | 0.0% of 2 edit prompts" in render_model_card(adapter, "alice/edits")


def test_generate_prompt_options_need_a_facts_file(tmp_path, model_dir):
    result = _run("generate", "--model", model_dir, "--adapter", tmp_path / "x.nkv", "--neighborhood")
    assert result.exit_code == 2 and "take their prompts from --facts FILE" in result.output


def test_generate_treats_bad_facts_like_build(tmp_path, model_dir):
    facts, out = _facts(tmp_path / "f.jsonl", FACTS), tmp_path / "edits.nkv"
    assert _run("build", facts, "--model", model_dir, "-o", out, *FAST).exit_code == 0
    mixed = _facts(tmp_path / "mixed.jsonl", [FACTS[0], "{not json"])
    args = ["generate", "--model", model_dir, "--adapter", out, "--facts", mixed]
    refused = _run(*args)
    assert refused.exit_code == 1 and "fix them or pass --skip-bad" in refused.stderr
    assert "skip_bad=True" not in refused.stderr and "Traceback" not in refused.output
    skipped = _run(*args, "--skip-bad", "--report", tmp_path / "bad.txt")
    assert skipped.exit_code == 0, skipped.output
    assert "line 2" in (tmp_path / "bad.txt").read_text() and FACTS[0]["target_new"] in skipped.stdout


def test_rm_of_a_fact_solved_with_others_rebuilds_them_or_refuses(tmp_path, model_dir):
    """A subject's facts share one residual (solved together), so removing one of them leaves
    its edit in the others' rows until they are built again: without --model `nkv rm` refuses
    and changes nothing; with it the rest are rebuilt, exactly as a build without the removed one."""
    # prompts that start with the subject: the same key, so the build solves them together
    pair = [{"id": "ty", "subject": "Toko Yasuda", "prompt": "Toko Yasuda plays the", "target_new": "piano"},
            {"id": "ty2", "subject": "Toko Yasuda", "prompt": "Toko Yasuda lives in", "target_new": "Peru"}]
    facts, out = _facts(tmp_path / "f.jsonl", [FACTS[0], *pair]), tmp_path / "edits.nkv"
    assert _run("build", facts, "--model", model_dir, "-o", out, *FAST, "--layer", "0").exit_code == 0
    built = NKVAdapter.load(out)
    assert built.facts[1].provenance["solved_with"] == ["ty2"]
    assert built.solved_without_partners() == []
    with pytest.warns(UserWarning, match=r"\['ty'\] were solved together with a removed fact"):
        assert built.remove(ids=["ty2"]).solved_without_partners() == ["ty"]
    original = out.read_bytes()

    refused = _run("rm", out, "--id", "ty2")
    assert refused.exit_code == 1 and "ty were solved together with a fact being removed" in refused.stderr
    assert "--model" in refused.stderr and out.read_bytes() == original
    assert _run("rm", out, "--subject", "Toko Yasuda", "-o", tmp_path / "both.nkv").exit_code == 0  # all of them: fine

    done = _run("rm", out, "--id", "ty2", "--model", model_dir)
    assert done.exit_code == 0, done.output
    assert "removed 1 fact (ty2); 2 left" in done.stdout and "rebuilt 1 solved with them (ty)" in done.stdout
    alone = tmp_path / "alone.nkv"
    assert _run("build", _facts(tmp_path / "a.jsonl", [FACTS[0], pair[0]]), "--model", model_dir, "-o", alone,
                *FAST, "--layer", "0").exit_code == 0
    after, want = NKVAdapter.load(out), NKVAdapter.load(alone)
    assert after.ids == ["dd", "ty"] and "solved_with" not in after.facts[1].provenance
    assert not torch.allclose(after.residuals[1], built.residuals[1])  # ty2's edit is gone from ty's row
    torch.testing.assert_close(after.residuals, want.residuals)
    torch.testing.assert_close(after.keys, want.keys)


def test_add_builds_new_facts_and_solves_a_subject_already_edited_together(tmp_path, model_dir, monkeypatch):
    """`nkv add`: new facts at the adapter's own layer and settings; a new fact about a subject
    the adapter edits is solved with that subject's fact (its row rebuilt); other rows keep
    their bytes; the result equals one build of all the facts. Clashes change nothing. An
    adapter that grows to SKETCH_MIN_FACTS facts is written with its sketch projection."""
    monkeypatch.setattr(nkv.constants, "SKETCH_MIN_FACTS", 4)
    start = [FACTS[0], {"id": "ty", "subject": "Toko Yasuda", "prompt": "Toko Yasuda plays the",
                        "target_new": "piano"}]
    more = [{"id": "ty2", "subject": "Toko Yasuda", "prompt": "Toko Yasuda lives in", "target_new": "Peru"},
            {"id": "cb", "subject": "Carl Bosch", "prompt": "Which language does Carl Bosch", "target_new": "Tokyo"}]
    out = tmp_path / "edits.nkv"
    assert _run("build", _facts(tmp_path / "f.jsonl", start), "--model", model_dir, "-o", out, *FAST,
                "--layer", "0").exit_code == 0
    before = NKVAdapter.load(out)
    done = _run("add", out, _facts(tmp_path / "more.jsonl", more), "--model", model_dir, "--quiet")
    assert done.exit_code == 0, done.output
    assert "added 2 facts" in done.stdout and "(4 in all; rebuilt 1 about the same subjects)" in done.stdout
    after = NKVAdapter.load(out)
    assert after.ids == ["dd", "ty", "ty2", "cb"] and after.layer == 0
    assert before.sketch_proj is None and after.sketch_proj is not None  # 2 facts, then 4
    assert after.facts[1].provenance["solved_with"] == ["ty2"]
    assert torch.equal(after.residuals[0], before.residuals[0])  # another subject's row: untouched
    torch.testing.assert_close(after.residuals[1], after.residuals[2])  # ty and ty2 share one δ
    whole = tmp_path / "whole.nkv"
    assert _run("build", _facts(tmp_path / "all.jsonl", start + more), "--model", model_dir, "-o", whole, *FAST,
                "--layer", "0").exit_code == 0
    torch.testing.assert_close(after.residuals, NKVAdapter.load(whole).residuals)

    again = out.read_bytes()
    clash = _run("add", out, _facts(tmp_path / "dup.jsonl", [more[1]]), "--model", model_dir, "--quiet")
    assert clash.exit_code == 1 and "already in the adapter: ['cb']" in clash.stderr and out.read_bytes() == again
    same_question = {**more[0], "id": "ty3", "target_new": "Chile"}
    clash = _run("add", out, _facts(tmp_path / "q.jsonl", [same_question]), "--model", model_dir, "--quiet")
    assert clash.exit_code == 1 and "edit the same question" in clash.stderr and out.read_bytes() == again


def test_merge_of_two_adapters_editing_one_subject_builds_its_facts_together_with_model(tmp_path, model_dir):
    """Two adapters built apart that edit one subject: `nkv merge` says so (rows built apart, the
    gate may not tell them apart); with --model the subject's facts are built together, so the
    result equals one build of all the facts."""
    a_facts = [FACTS[0], {"id": "ty", "subject": "Toko Yasuda", "prompt": "Toko Yasuda plays the",
                          "target_new": "piano"}]
    b_facts = [{"id": "ty2", "subject": "Toko Yasuda", "prompt": "Toko Yasuda lives in", "target_new": "Peru"}]
    a, b = tmp_path / "a.nkv", tmp_path / "b.nkv"
    for facts, out in ((a_facts, a), (b_facts, b)):
        assert _run("build", _facts(tmp_path / f"{out.stem}.jsonl", facts), "--model", model_dir, "-o", out, *FAST,
                    "--layer", "0").exit_code == 0
    assert NKVAdapter.load(a).subjects_built_apart(NKVAdapter.load(b)) == ["Toko Yasuda"]
    assert NKVAdapter.load(a).subjects_built_apart(NKVAdapter.load(a)) == []  # the same facts: nothing new

    apart = _run("merge", a, b, "-o", tmp_path / "apart.nkv")
    assert apart.exit_code == 0 and "1 subject(s) are edited by both A and B" in apart.stderr
    assert "Toko Yasuda" in apart.stderr and "--model M" in apart.stderr
    separate = NKVAdapter.load(tmp_path / "apart.nkv")
    assert not torch.allclose(separate.residuals[1], separate.residuals[2])  # two residuals, built apart

    together = _run("merge", a, b, "-o", tmp_path / "together.nkv", "--model", model_dir)
    assert together.exit_code == 0, together.output
    assert "rebuilt the facts of 1 subject(s) both edit" in together.stdout and "edited by both" not in together.stderr
    merged = NKVAdapter.load(tmp_path / "together.nkv")
    assert merged.ids == ["dd", "ty", "ty2"] and merged.facts[1].provenance["solved_with"] == ["ty2"]
    assert torch.equal(merged.residuals[0], NKVAdapter.load(a).residuals[0])  # another subject: untouched
    whole = tmp_path / "whole.nkv"
    assert _run("build", _facts(tmp_path / "all.jsonl", a_facts + b_facts), "--model", model_dir, "-o", whole,
                *FAST, "--layer", "0").exit_code == 0
    torch.testing.assert_close(merged.residuals, NKVAdapter.load(whole).residuals)
