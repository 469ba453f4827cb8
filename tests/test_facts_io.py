"""Reading facts: our JSONL schema, the three benchmark shapes, and every error a user can make."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from nkv.errors import NKVFactsError
from nkv.facts_io import read_facts, scan_facts


def _jsonl(path: Path, *records: object) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


OURS = {"id": "dd", "subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is", "target_new": "English",
        "target_true": "French", "paraphrases": ["{} speaks", "Danielle Darrieux writes in"],
        "neighborhood": [{"prompt": "Michel Rocard speaks", "target": "French"}], "tags": ["language"]}

EASYEDIT = {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
            "subject": "Danielle Darrieux", "ground_truth": "French",
            "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
            "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}

ROME = {"case_id": 20952, "pararel_idx": 5151,
        "requested_rewrite": {"prompt": "{} is located in", "relation_id": "P30", "subject": "Angola",
                              "target_new": {"id": "Q51", "str": "Antarctica"},
                              "target_true": {"id": "Q15", "str": "Africa"}},
        "paraphrase_prompts": ["Angola belongs to the continent of", "Angola is a part of the continent of"],
        "neighborhood_prompts": ["Ghana is in", "Ethiopia is in"],
        "attribute_prompts": ["Vostok Station is located in"], "generation_prompts": ["Angola's surroundings include"]}

ZSRE = {"subject": "IAAF Combined Events Challenge", "src": "When was the inception of IAAF Combined Events Challenge?",
        "pred": "2011", "rephrase": "When was the IAAF Combined Events Challenge launched?", "alt": "2006",
        "answers": ["1998"], "loc": "nq question: what is the name of the last episode of spongebob",
        "loc_ans": "The String", "cond": "2011 >> 2006 || When was ..."}


def test_our_schema_fills_the_subject_and_keeps_evaluation_prompts(tmp_path):
    [item] = read_facts(_jsonl(tmp_path / "f.jsonl", OURS))
    f = item.fact
    assert (f.id, f.subject, f.prompt, f.target_new, f.target_true) == (
        "dd", "Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "English", "French")
    assert item.paraphrases == ["Danielle Darrieux speaks", "Danielle Darrieux writes in"]
    assert item.neighborhood == [("Michel Rocard speaks", "French")]
    assert item.tags == ["language"] and f.provenance == {"tags": ["language"]}


def test_defaults_literal_subject_and_whitespace(tmp_path):
    path = _jsonl(tmp_path / "f.jsonl", "",
                  {"subject": "Toko Yasuda", "prompt": "Toko Yasuda plays the ", "target_new": " piano "},
                  {"id": 7, "subject": "Carl Bosch", "prompt": "{} speaks", "target_new": "German"})
    a, b = read_facts(path)
    assert a.fact.id == "2"  # line number: the blank first line still counts
    assert a.fact.prompt == "Toko Yasuda plays the" and a.fact.target_new == "piano"
    assert a.fact.target_true is None and a.paraphrases == [] and a.neighborhood == []
    assert b.fact.id == "7"


def test_json_list_and_benchmark_shapes(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([EASYEDIT, ROME, ZSRE]), encoding="utf-8")
    cf, rome, zsre = read_facts(path)
    assert (cf.fact.id, cf.fact.target_new, cf.fact.target_true) == ("0", "English", "French")
    assert cf.paraphrases == [EASYEDIT["rephrase_prompt"]]
    assert cf.neighborhood == [("Michel Rocard is a native speaker of", "French")]
    assert cf.fact.provenance == {"source": "counterfact", "case_id": 0}

    assert (rome.fact.id, rome.fact.prompt, rome.fact.target_new, rome.fact.target_true) == (
        "20952", "Angola is located in", "Antarctica", "Africa")
    assert rome.paraphrases == ROME["paraphrase_prompts"]
    assert rome.neighborhood == [("Ghana is in", "Africa"), ("Ethiopia is in", "Africa")]  # old target
    assert rome.fact.provenance["relation_id"] == "P30"

    assert (zsre.fact.id, zsre.fact.prompt, zsre.fact.target_new, zsre.fact.target_true) == (
        "3", ZSRE["src"], "2006", "1998")
    assert zsre.paraphrases == [ZSRE["rephrase"]]
    assert zsre.neighborhood == [(ZSRE["loc"] + "?", "The String")]
    assert zsre.fact.provenance["source"] == "zsre"


@pytest.mark.parametrize("record, message", [
    ('{"subject": "A", "prompt": "A is', "invalid JSON (Unterminated string"),
    ({"subject": "Paris", "prompt": "The city is", "target_new": "x"}, "subject 'Paris' is not in the prompt"),
    ({"subject": "Paris", "prompt": "Paris is in", "target_new": "  "}, "field 'target_new' is empty"),
    ({"subject": "Paris", "prompt": "Paris is in"}, "field 'target_new' must be a string, got nothing"),
    ({"subject": "Paris", "prompt": "{} and {} are", "target_new": "x"}, "2 '{}' placeholders"),
    ({"subject": "Paris", "prompt": "Paris is in", "target_new": "x", "target": "y"}, "unknown field(s) ['target']"),
    ({"subject": "Paris", "prompt": "Paris", "target_new": "x"}, "only the subject"),
    ({"subject": "Paris", "prompt": "Paris is in", "target_new": "x", "neighborhood": ["a"]}, "neighborhood[0]"),
    ([1, 2], "expected a JSON object, got list"),
    ({**ZSRE, "alt": ""}, "field 'alt' is empty"),
])
def test_bad_records_are_named_by_file_and_line(tmp_path, record, message):
    path = _jsonl(tmp_path / "bad.jsonl", {"subject": "Oslo", "prompt": "Oslo is in", "target_new": "Norway"}, record)
    with pytest.raises(NKVFactsError) as info:
        read_facts(path)
    text = str(info.value)
    assert str(path) in text and "line 2" in text and message in text


def test_duplicate_ids_name_both_lines(tmp_path):
    rec = {"id": "x", "subject": "Oslo", "prompt": "Oslo is in", "target_new": "Norway"}
    with pytest.raises(NKVFactsError, match=r"line 2: duplicate id 'x' \(first at line 1\)"):
        read_facts(_jsonl(tmp_path / "d.jsonl", rec, rec))


def test_skip_bad_returns_the_good_ones_and_scan_reports_the_rest(tmp_path):
    good = {"subject": "Oslo", "prompt": "Oslo is in", "target_new": "Norway"}
    path = _jsonl(tmp_path / "f.jsonl", good, "{oops", {"subject": "X", "prompt": "Y", "target_new": "z"})
    with pytest.raises(NKVFactsError, match="2 bad record"):
        read_facts(path)
    assert [f.fact.id for f in read_facts(path, skip_bad=True)] == ["1"]
    scan = scan_facts(path)
    assert len(scan.facts) == 1 and len(scan.problems) == 2
    assert scan.problems[0].startswith(f"{path}: line 2: invalid JSON")


def test_unreadable_inputs(tmp_path):
    with pytest.raises(NKVFactsError, match="no such file"):
        read_facts(tmp_path / "missing.jsonl")
    with pytest.raises(NKVFactsError, match="is a directory"):
        read_facts(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(NKVFactsError, match="no usable fact records"):
        read_facts(tmp_path / "empty.jsonl")
    (tmp_path / "broken.json").write_text('[{"a": 1},\n  {"b": ]')
    with pytest.raises(NKVFactsError, match="invalid JSON at line 2"):
        read_facts(tmp_path / "broken.json")


def test_facts_io_does_not_import_torch_or_transformers():
    import subprocess

    code = "import sys, nkv.facts_io; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared benchmark data not present")
@pytest.mark.parametrize("name, n", [("counterfact-edit.json", 10000), ("counterfact_azhx_test.json", 2191),
                                     ("zsre_mend_edit.json", 1037)])
def test_real_benchmark_files_parse_completely(name, n):
    scan = scan_facts(SHARED / name)
    assert scan.problems == [] and len(scan.facts) == n


def test_a_byte_order_mark_is_not_a_bad_record(tmp_path):
    from nkv.editing.evaluate import read_true_facts

    facts = tmp_path / "bom.jsonl"
    facts.write_text(json.dumps({"subject": "Paris", "prompt": "Paris is in", "target_new": "Peru"}) + "\n",
                     encoding="utf-8-sig")
    assert [f.fact.target_new for f in read_facts(facts)] == ["Peru"]
    true = tmp_path / "true.jsonl"
    true.write_text(json.dumps({"subject": "Paris", "relation": "country", "prompt": "Paris is in",
                                "target": "France"}) + "\n", encoding="utf-8-sig")
    assert [t.target for t in read_true_facts(true)] == ["France"]
