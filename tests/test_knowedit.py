"""KnowEdit files (EasyEdit's benchmark) in and KnowEdit's metrics out.

The fixtures in fixtures/knowedit/ are written for these tests in the shapes of KnowEdit's
files (ZsRE-test-all.json, wiki_counterfact, wiki_recent, WikiBio as EasyEdit documents
them); they hold no record of the benchmark itself.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from handmade import forcing_adapter
from nkv import NKVAdapter
from nkv.cli.main import main
from nkv.editing.evaluate import EvalOptions, detect_protocol, evaluate
from nkv.errors import NKVFactsError
from nkv.facts import Fact
from nkv.facts_io import FactInput, read_facts, scan_facts
from tiny_models import save_tiny, tiny_model, tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "knowedit"
FAST = ["--steps", "8", "--lr", "0.2", "--clamp", "2", "--prefixes", "1", "--quiet", "--layer", "1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")


def _run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---------------------------------------------------------------- reading the shapes
def test_zsre_list_ground_truth_rephrase_locality_and_portability():
    first, second, third = read_facts(FIXTURES / "zsre.json")
    f = first.fact
    assert (f.id, f.subject, f.prompt, f.target_new, f.target_true) == (
        "1", "Eiffel Tower", "In which city is the Eiffel Tower?", "Rome", "Paris")
    assert f.provenance == {"source": "knowedit", "record": 1}
    assert first.paraphrases == ["Where is the Eiffel Tower located?"]
    assert first.neighborhood == [("The Eiffel Tower was completed in the year", "1889"),
                                  ("Eiffel Tower completion year", "1889")]
    assert first.portability == [("Reasoning", "In which country is the city where the Eiffel Tower stands?", "Italy")]
    assert third.portability == []  # an empty portability object
    assert detect_protocol([first, second, third]) == "zsre"  # KnowEdit scores token accuracy everywhere


def test_wiki_counterfact_takes_the_first_alias_and_keeps_every_kind():
    marie, kili = read_facts(FIXTURES / "wiki_counterfact.json")
    assert (marie.fact.target_true, kili.fact.target_true) == ("France", "Africa")
    assert [k for k, _, _ in marie.portability] == ["Subject_Aliasing", "Reasoning", "Reasoning"]
    assert [a for _, _, a in marie.portability] == ["Brazil", "Brazilian real", "Portuguese"]  # [[aliases]] -> first
    assert marie.neighborhood[1] == ("The country of citizenship of Marie Curie, which is not Brazil, is", "France")


def test_wiki_recent_has_no_old_target_and_wikibio_edits_a_passage():
    [ada] = read_facts(FIXTURES / "wiki_recent.json")
    assert ada.fact.target_true is None
    assert ("Logical_Generalization", "Is Ada Lovelace still alive?", "no") in ada.portability
    assert ada.neighborhood == [("The name of the father of Ada Lovelace is", "Lord Byron")]

    [bio] = read_facts(FIXTURES / "wikibio.json")
    assert bio.fact.subject == "alan turing" and bio.fact.prompt.startswith("This is a Wikipedia passage about")
    assert bio.fact.target_new.startswith("He is widely considered")
    assert bio.neighborhood[0] == ("The field of work of alan turing is", "mathematics")


def test_easyedit_parallel_lists_and_their_errors(tmp_path):
    rec = {"subject": "Oslo", "prompt": "Oslo is the capital of", "target_new": "Sweden", "ground_truth": ["Norway"],
           "locality": {"Relation_Specificity": {"prompt": ["Oslo lies on the", "Oslo's river is the"],
                                                 "ground_truth": ["fjord", "Akerselva"]}}}
    path = tmp_path / "api.json"
    path.write_text(json.dumps([rec]))
    [item] = read_facts(path)
    assert item.neighborhood == [("Oslo lies on the", "fjord"), ("Oslo's river is the", "Akerselva")]

    broken = {**rec, "locality": {"Relation_Specificity": {"prompt": ["a", "b"], "ground_truth": ["c"]}},
              "portability": {"Reasoning": [{"prompt": "Which sea?", "ground_truth": []}]}}
    path.write_text(json.dumps([broken, {**rec, "locality": ["x"]}]))
    problems = scan_facts(path).problems
    assert "record 1: locality.Relation_Specificity[0]: a list of 2 prompts needs a list of as many" in problems[0]
    assert "record 2: field 'locality' must be an object mapping a kind to its prompts, got list" in problems[1]


def test_our_schema_takes_portability_questions(tmp_path):
    rec = {"subject": "Oslo", "prompt": "{} is the capital of", "target_new": "Sweden",
           "portability": [{"prompt": "The currency of the country whose capital is {} is", "target": "krona",
                            "kind": "multi-hop"}, {"prompt": "{} lies in", "target": "Sweden"}]}
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "portability": [{"prompt": "x"}]}) + "\n")
    [item] = read_facts(path, skip_bad=True)
    assert item.portability == [("multi-hop", "The currency of the country whose capital is Oslo is", "krona"),
                                ("portability", "Oslo lies in", "Sweden")]
    assert "line 2: portability[0] must be" in scan_facts(path).problems[0]


# ---------------------------------------------------------------- many bad records
def _many_bad(path: Path, n_bad: int) -> Path:
    good = {"subject": "Oslo", "prompt": "Oslo is the capital of", "target_new": "Sweden"}
    bad = [{"subject": f"City {i}", "prompt": f"City {i} lies in", "target_new": ["Norway"]} for i in range(n_bad)]
    path.write_text(json.dumps([good, *bad, {"subject": "X", "prompt": "Y", "target_new": "z"}]))
    return path


def test_many_bad_records_make_a_short_summary_and_a_full_report(tmp_path):
    scan = scan_facts(_many_bad(tmp_path / "bad.json", 50))
    summary = scan.summary()
    assert len(summary.splitlines()) == 3
    assert "51 bad record(s) (1 good)" in summary
    assert "50 records (record 2, record 3, record 4, ...): field 'target_new' must be a string, got list" in summary
    assert "record 52: subject 'X' is not in the prompt" in summary
    report = scan.write_report(tmp_path / "bad.txt").read_text().splitlines()
    assert len(report) == 1 + 51 and report[1] == "record 2: field 'target_new' must be a string, got list"
    with pytest.raises(NKVFactsError) as info:
        read_facts(tmp_path / "bad.json")
    assert len(str(info.value).splitlines()) == 4


def test_build_summarises_bad_records_and_writes_the_report(tmp_path, model_dir):
    facts = _many_bad(tmp_path / "bad.json", 50)
    out, report = tmp_path / "a.nkv", tmp_path / "bad.txt"
    result = _run("build", facts, "--model", model_dir, "-o", out, *FAST, "--report", report)
    assert result.exit_code == 1 and not out.exists()
    assert len(result.stderr.splitlines()) <= 6, result.stderr
    assert result.stderr.splitlines()[-1].startswith("Error: ") and "51 bad record(s)" in result.stderr
    assert f"all listed in {report}" in result.stderr
    assert len(report.read_text().splitlines()) == 52


# ---------------------------------------------------------------- build and eval end to end
def test_build_and_eval_a_knowedit_file(tmp_path, model_dir):
    data, out = FIXTURES / "zsre.json", tmp_path / "k.nkv"
    built = _run("build", data, "--model", model_dir, "-o", out, *FAST)
    assert built.exit_code == 0, built.output
    assert NKVAdapter.load(out).ids == ["1", "2", "3"]

    evaluated = _run("eval", "--model", model_dir, "--adapter", out, "--data", data, "--json", "--no-free-gen",
                     "--fluency-prompts", "1", "--batch-size", "4")
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)
    assert report["data"]["protocol"] == "zsre" and report["data"]["portability"] == 2
    k = report["knowedit"]
    assert set(k) >= {"edit_succ", "portability", "portability_by_kind", "locality", "fluency"}
    assert k["edit_succ"]["post"] == report["metrics"]["efficacy"]["post"]  # same token accuracy, same scorer
    assert k["portability"]["n"] == 2 and k["portability_by_kind"]["Reasoning"]["n"] == 2
    assert k["locality"]["n"] == 3 and 0.0 <= k["locality"]["post"] <= 100.0

    table = _run("eval", "--model", model_dir, "--adapter", out, "--data", data, "--no-free-gen",
                 "--fluency-prompts", "0")
    assert "KnowEdit (EasyEdit's definitions):" in table.stdout and "Portability (token acc." in table.stdout


# ---------------------------------------------------------------- the metrics, by hand
PROMPT, NEW = "The Eiffel Tower is located in", "Paris"


def test_knowedit_metrics_on_a_forcing_adapter():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    fact = Fact(id="f0", subject="Eiffel Tower is located in", prompt=PROMPT, target_new=NEW,
                provenance={"source": "knowedit"})
    adapter = replace(forcing_adapter(model, tok, [PROMPT], [NEW]), facts=[fact])
    far = FactInput(fact, neighborhood=[("Toko Yasuda plays the", "guitar")],
                    portability=[("Reasoning", PROMPT, NEW), ("Subject_Aliasing", "Toko Yasuda plays the", NEW)])
    options = EvalOptions(fluency_prompts=0, free_generation=False, gate_diagnostics=False)
    k = evaluate(model, tok, adapter, [far], options=options).knowedit
    assert (k["edit_succ"]["pre"], k["edit_succ"]["post"]) == (0.0, 100.0)
    assert k["portability_by_kind"]["Reasoning"]["post"] == 100.0  # the edit prompt itself: forced
    assert k["portability_by_kind"]["Subject_Aliasing"]["post"] == 0.0  # the gate never fires there
    assert k["portability"]["post"] == 50.0  # pooled per fact, as EasyEdit's summary does
    assert k["locality"]["post"] == 100.0  # the unrelated neighbour's tokens do not move

    near = FactInput(fact, neighborhood=[(PROMPT, "Rome")])  # the edited prompt as its own "neighbour"
    k = evaluate(model, tok, adapter, [near], options=options).knowedit
    assert k["locality"]["post"] < 100.0 and k["portability"]["n"] == 0

    unmeasured = evaluate(model, tok, adapter, [far], options=replace(options, measure_pre=False)).knowedit
    assert unmeasured["locality"]["post"] is None and unmeasured["edit_succ"]["pre"] is None


def test_eval_reports_bad_data_records_before_loading_anything(tmp_path):
    data, report = _many_bad(tmp_path / "bad.json", 30), tmp_path / "bad.txt"
    result = _run("eval", "--model", "never-loaded", "--adapter", "never-read.nkv", "--data", data, "--report", report)
    assert result.exit_code == 1 and "31 bad record(s)" in result.stderr
    assert "30 records (record 2, record 3, record 4, ...)" in result.stderr
    assert len(report.read_text().splitlines()) == 32 and "cannot load model" not in result.stderr
