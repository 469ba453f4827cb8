"""Row operations at O(n): the dict/vectorised implementations against a plain reference.

`_reference_add` and `_reference_diff` restate spec §9 the obvious way (per-row scans and
comparisons, as the 1.0 implementation did); random adapters with overlapping ids, exact
duplicates, changed records and changed rows must give identical results (or the same
error) under every conflict policy. Timings at 200k rows are in benchmarks/scale/README.md.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from nkv import Fact, NKVConflictError
from test_format import D_KEY, D_MODEL, make


def _reference_add(a, facts, keys, residuals, on_conflict):
    ids = [f.id for f in facts]
    if len(set(ids)) != len(ids):
        raise NKVConflictError("repeated")
    keys, residuals = keys.to(a.keys.dtype), residuals.to(a.residuals.dtype)
    out = [(f, a.keys[i], a.residuals[i]) for i, f in enumerate(a.facts)]
    for r, f in enumerate(facts):
        hit = [i for i, (g, _, _) in enumerate(out) if g.id == f.id]
        if not hit:
            out.append((f, keys[r], residuals[r]))
            continue
        g, k, v = out[hit[0]]
        identical = g == f and torch.equal(k, keys[r]) and torch.equal(v, residuals[r])
        if not identical and on_conflict == "error":
            raise NKVConflictError("conflict")
        if on_conflict == "theirs":
            out[hit[0]] = (f, keys[r], residuals[r])
    return [o[0] for o in out], torch.stack([o[1] for o in out]), torch.stack([o[2] for o in out])


def _reference_diff(a, b):
    mine = {f.id: i for i, f in enumerate(a.facts)}
    theirs = {f.id: i for i, f in enumerate(b.facts)}
    changed = [f.id for f in a.facts if f.id in theirs and (
        f != b.facts[theirs[f.id]] or not torch.equal(a.keys[mine[f.id]].float(), b.keys[theirs[f.id]].float())
        or not torch.equal(a.residuals[mine[f.id]].float(), b.residuals[theirs[f.id]].float()))]
    return ([f.id for f in b.facts if f.id not in mine], [f.id for f in a.facts if f.id not in theirs], changed)


def _random_case(rng: random.Random):
    pool = [f"f{i}" for i in range(12)]
    a = make(rng.sample(pool, rng.randint(1, 8)), salt=0)
    new_ids = rng.sample(pool, rng.randint(0, 8))
    b = make(new_ids, salt=0)
    facts, keys, res = list(b.facts), b.keys.clone(), b.residuals.clone()
    for r in range(len(new_ids)):  # perturb some rows: a changed record, key or residual
        what = rng.choice(["same", "same", "record", "key", "residual"])
        if what == "record":
            f = facts[r]
            facts[r] = Fact(id=f.id, subject=f.subject, prompt=f.prompt, target_new=f.target_new + "!")
        elif what == "key":
            keys[r, rng.randrange(D_KEY)] += 1.0
        elif what == "residual":
            res[r, rng.randrange(D_MODEL)] -= 1.0
    return a, facts, keys, res


@pytest.mark.parametrize("policy", ["error", "ours", "theirs"])
def test_add_and_merge_match_the_reference(policy: str) -> None:
    rng = random.Random(policy)
    for _ in range(150):
        a, facts, keys, res = _random_case(rng)
        try:
            want = _reference_add(a, facts, keys, res, policy)
        except NKVConflictError:
            with pytest.raises(NKVConflictError):
                a.add(facts, keys, res, on_conflict=policy)
            continue
        got = a.add(facts, keys, res, on_conflict=policy)
        assert got.facts == want[0]
        assert torch.equal(got.keys, want[1]) and torch.equal(got.residuals, want[2])
        other = make([], salt=0).add(facts, keys, res)
        merged = a.merge(other, on_conflict=policy)
        assert merged.facts == want[0] and torch.equal(merged.keys, want[1])


def test_diff_select_remove_match_the_reference() -> None:
    rng = random.Random(7)
    for _ in range(150):
        a, facts, keys, res = _random_case(rng)
        b = make([], salt=0).add(facts, keys, res)
        d = a.diff(b)
        assert (d.added, d.removed, d.changed) == _reference_diff(a, b)
        ids = rng.sample(a.ids, rng.randint(0, a.n_facts))
        sel = a.select(ids)
        assert sel.ids == ids
        assert torch.equal(sel.keys, a.keys[[a.ids.index(i) for i in ids]] if ids else a.keys[:0])
        kept = a.remove(ids=ids)
        assert kept.ids == [i for i in a.ids if i not in ids]
        assert torch.equal(kept.residuals, a.residuals[[a.ids.index(i) for i in kept.ids]] if kept.ids
                           else a.residuals[:0])
    with pytest.raises(KeyError):
        make(["a"]).select(["zz"])


def test_add_compares_rows_in_the_adapters_dtype() -> None:
    a = make(["a", "b"]).to(torch.bfloat16)
    same = a.add(a.facts, a.keys.float(), a.residuals.float())  # fp32 copies of bf16 rows: duplicates
    assert same.ids == ["a", "b"]
    with pytest.raises(NKVConflictError, match="already in the adapter"):
        a.add(a.facts[:1], a.keys[:1].float() + 1, a.residuals[:1].float())


def _asking(fact_id: str, like: Fact, target: str) -> Fact:
    """A fact with its own id that edits `like`'s question (same subject and prompt)."""
    return Fact(id=fact_id, subject=like.subject, prompt=like.prompt, target_new=target)


@pytest.mark.parametrize("policy", ["error", "ours", "theirs"])
def test_a_second_edit_of_one_question_is_a_conflict(policy: str) -> None:
    """Spec §9: a new id that edits a question a row already edits conflicts under the policy;
    `theirs` puts it in the old row's place, `ours` skips it."""
    a = make(["a", "b", "c"])
    other = make(["z", "y"], salt=1)  # rows of other ids, to tell whose rows land where
    new = [_asking("z", a.facts[1], "T-new"), Fact(id="y", subject="Sy", prompt="About Sy:", target_new="Ty")]
    if policy == "error":
        with pytest.raises(NKVConflictError, match="same|already edits.*'z' and 'b'"):
            a.add(new, other.keys, other.residuals)
        return
    got = a.add(new, other.keys, other.residuals, on_conflict=policy)
    if policy == "ours":
        assert got.ids == ["a", "b", "c", "y"]
        assert torch.equal(got.keys[1], a.keys[1]) and torch.equal(got.keys[3], other.keys[1])
    else:
        assert got.ids == ["a", "z", "c", "y"] and got.facts[1].target_new == "T-new"
        assert torch.equal(got.keys[1], other.keys[0]) and torch.equal(got.residuals[1], other.residuals[0])
        assert torch.equal(got.keys[0], a.keys[0]) and torch.equal(got.keys[3], other.keys[1])


def test_new_rows_that_edit_one_question_twice_are_refused() -> None:
    a = make(["a"])
    twice = make(["x", "w"], salt=2)
    facts = [Fact(id="x", subject="Q", prompt="About Q:", target_new="1"), _asking("w", Fact("_", "Q", "About Q:", "?"), "2")]
    for policy in ("error", "ours", "theirs"):
        with pytest.raises(NKVConflictError, match="twice"):
            a.add(facts, twice.keys, twice.residuals, on_conflict=policy)


def test_facts_files_and_the_build_refuse_one_question_edited_twice(tmp_path) -> None:
    from nkv.editing.solve.rows import plain_facts
    from nkv.errors import NKVFactsError
    from nkv.facts_io import scan_facts

    lines = ['{"id": "a", "subject": "Lyon", "prompt": "Lyon is a twin city of", "target_new": "Rome"}',
             '{"id": "b", "subject": "Lyon", "prompt": "Lyon is a twin city of", "target_new": "Oslo"}',
             '{"id": "c", "subject": "Lyon", "prompt": "Lyon is located in", "target_new": "Peru"}']
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert scan_facts(path).bad == []  # an evaluation set may ask a question twice
    scan = scan_facts(path, edited_together=True)
    assert [f.fact.id for f in scan.facts] == ["a", "c"]  # another relation of Lyon is fine
    assert len(scan.bad) == 1 and "same question as" in scan.bad[0].reason and "line 1" in scan.bad[0].reason
    a, b, _ = (Fact(id=i, subject="Lyon", prompt="Lyon is a twin city of", target_new=t)
               for i, t in (("a", "Rome"), ("b", "Oslo"), ("c", "-")))
    with pytest.raises(NKVFactsError, match="'a' and 'b' edit the same question"):
        plain_facts([a, b])


def test_the_same_subject_and_named_relation_is_one_question() -> None:
    """Spec §9: records that name their relation (CounterFact's relation_id, a "relation:<name>"
    tag) ask one question when subject and relation agree, whatever the wording; without a
    relation only the exact prompt counts."""
    from nkv.editing.solve.rows import plain_facts
    from nkv.errors import NKVFactsError

    capital = Fact(id="a", subject="France", prompt="The capital of France is", target_new="Lyon",
                   provenance={"tags": ["relation:capital"]})
    reworded = Fact(id="b", subject="France", prompt="France's capital is", target_new="Nice",
                    provenance={"relation_id": "capital"})
    language = Fact(id="c", subject="France", prompt="In France people speak", target_new="Welsh",
                    provenance={"tags": ["relation:language"]})
    unnamed = Fact(id="d", subject="France", prompt="The capital city of France is", target_new="Metz")
    assert capital.relation == "capital" and reworded.relation == "capital" and unnamed.relation is None
    assert capital.questions[1] == reworded.questions[1] == ("relation", "France", "capital")
    a = replace(make(["a", "c"]), facts=[capital, language])
    new = make(["b", "d"], salt=1)
    with pytest.raises(NKVConflictError, match="'b' and 'a'.*relation 'capital'"):
        a.add([reworded, unnamed], new.keys, new.residuals)
    got = a.add([reworded, unnamed], new.keys, new.residuals, on_conflict="theirs")
    assert got.ids == ["b", "c", "d"]  # b takes a's row; d names no relation and asks another prompt
    with pytest.raises(NKVConflictError, match="twice"):
        a.add([reworded, Fact("e", "France", "Paris is the capital of", "x", provenance={"relation_id": "capital"})],
              new.keys, new.residuals)
    with pytest.raises(NKVFactsError, match="'a' and 'b' edit the same question \\(relation 'capital'"):
        plain_facts([capital, reworded, language])
    assert [f.id for f in plain_facts([capital, language, unnamed])] == ["a", "c", "d"]


def test_a_facts_file_naming_the_relation_twice_for_one_subject_is_a_bad_record(tmp_path) -> None:
    from nkv.facts_io import scan_facts

    lines = ['{"id": "a", "subject": "France", "prompt": "The capital of France is", "target_new": "Lyon", '
             '"tags": ["relation:capital"]}',
             '{"id": "b", "subject": "France", "prompt": "France\'s capital is", "target_new": "Nice", '
             '"tags": ["relation:capital"]}']
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join(lines) + "\n")
    scan = scan_facts(path, edited_together=True)
    assert [f.fact.id for f in scan.facts] == ["a"] and "same subject and relation" in scan.bad[0].reason


def _one_subject(adapter, subject: str = "Toko Yasuda"):
    """The adapter with every fact about `subject`, each asking its own question."""
    facts = [replace(f, subject=subject, prompt=f"{subject} and question {f.id}:") for f in adapter.facts]
    return replace(adapter, facts=facts)


@pytest.mark.parametrize("policy", ["error", "ours", "theirs"])
def test_a_subject_whose_merged_rows_come_from_both_adapters_is_built_apart(policy: str) -> None:
    a, b = _one_subject(make(["x", "y"])), _one_subject(make(["y", "z"]))  # y: the same record and rows in both
    assert a.subjects_built_apart(b, policy) == ["Toko Yasuda"]  # x only in A, z only in B
    assert a.subjects_built_apart(a, policy) == []  # merging a copy adds nothing


def test_built_apart_follows_the_conflict_policy() -> None:
    """A shared id with other content comes from A under "ours", from B under "theirs"."""
    a = _one_subject(make(["x", "y"]))
    b = _one_subject(make(["x"], salt=1))  # x changed
    assert a.subjects_built_apart(b, "ours") == []  # every row of the subject is A's
    assert a.subjects_built_apart(b, "theirs") == ["Toko Yasuda"]  # B's x beside A's y
    c = _one_subject(make(["x", "z"], salt=1))  # x changed, z new
    assert _one_subject(make(["x"])).subjects_built_apart(c, "theirs") == []  # every row is B's
    assert _one_subject(make(["x"])).subjects_built_apart(c, "ours") == ["Toko Yasuda"]  # A's x, B's z
    other_subject = _one_subject(make(["z"]), "Carl Bosch")
    assert a.subjects_built_apart(other_subject) == []
