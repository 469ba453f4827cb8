"""Reading the facts a user wants to edit in: our JSONL schema and the benchmarks' shapes.

Torch-free, so `nkv build --help` style checks and validation stay cheap.

Our schema: one JSON object per line (a `.json` file holding a list also works)::

    {"id": "dd-lang",                                  # optional; default: the line number
     "subject": "Danielle Darrieux",
     "prompt": "The mother tongue of {} is",           # "{}" marks the subject, or the
                                                       # subject appears literally; the
                                                       # prompt ends right before the answer
     "target_new": "English",                          # no leading space: one is added
     "target_true": "French",                          # optional
     "paraphrases": ["{} speaks"],                     # optional, for evaluation ("{}" or literal)
     "neighborhood": [{"prompt": "Michel Rocard is a native speaker of",
                       "target": "French"}],           # optional, for evaluation
     "portability": [{"prompt": "The language of the country Danielle Darrieux was born in is",
                      "target": "French", "kind": "Reasoning"}],  # optional, for evaluation
     "tags": ["language"]}                             # optional, kept in provenance

Benchmark records are recognised by their fields and taken as they are:

* EasyEdit CounterFact (`case_id, prompt, subject, target_new, ground_truth,
  rephrase_prompt, locality_prompt, locality_ground_truth`);
* ROME/MEMIT CounterFact (`requested_rewrite{prompt with {}, subject, target_new.str,
  target_true.str}, paraphrase_prompts, neighborhood_prompts`); a neighbourhood prompt's
  expected answer is the old target;
* ZsRE (`subject, src, alt, answers, rephrase, loc, loc_ans`): the new target is `alt`,
  the old one `answers[0]`; the neighbourhood prompt is `loc + "?"` as in ROME's code;
* KnowEdit (EasyEdit's benchmark: ZsRE, WikiData_counterfact, WikiData_recent) records,
  `subject, prompt, target_new`, optional `ground_truth` (a string, a list of answers, or a
  list of alias lists), `rephrase_prompt`, and `portability` / `locality` as objects that
  map a kind (`Reasoning`, `Subject_Aliasing`, `Relation_Specificity`, ...) to a list of
  `{prompt, ground_truth}` items, or to one `{prompt: [...], ground_truth: [...]}` of
  parallel lists (EasyEdit's `edit()` input). Locality prompts become the neighbourhood,
  portability prompts the portability questions; where a ground truth lists several
  answers or aliases, the first is the one scored, as EasyEdit does;
* KnowEdit WikiBio (`text, labels, concept, locality`): the subject is `concept`, the
  prompt `text`, the new target `labels`.

Ids come from `id` (ours), `case_id` (CounterFact) or the record's 1-based position.
Fields a shape does not use (ZsRE's `cond`, for one) are ignored.
The first occurrence of the subject in the prompt is the one edited.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .errors import NKVFactsError
from .facts import Fact

OUR_FIELDS = ("id", "subject", "prompt", "target_new", "target_true", "paraphrases", "neighborhood", "portability",
              "tags")


@dataclass(frozen=True)
class FactInput:
    """One fact to edit, plus the evaluation prompts that came with it."""

    fact: Fact
    paraphrases: list[str] = field(default_factory=list)
    neighborhood: list[tuple[str, str]] = field(default_factory=list)  # (prompt, expected answer)
    tags: list[str] = field(default_factory=list)
    # (kind, prompt, answer): questions whose answer follows from the edit (KnowEdit's
    # portability: reasoning / multi-hop, subject aliases, logical generalization)
    portability: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class BadRecord:
    """One bad record: where it is ("line 3", "record 7") and what is wrong with it."""

    where: str
    reason: str


@dataclass(frozen=True)
class FactsScan:
    """Everything `scan_facts` found: the good facts and every bad record."""

    source: str
    facts: list[FactInput]
    bad: list[BadRecord]

    @property
    def problems(self) -> list[str]:
        """One message per bad record: "FILE: WHERE: REASON"."""
        return [f"{self.source}: {b.where}: {b.reason}" for b in self.bad]

    def summary(self, groups: int = 5) -> str:
        """A few lines for many bad records: the most common reasons, counted, with where.

        Records that fail the same way (a KnowEdit file read by an older shape: every
        record's `ground_truth` a list) collapse into one line; `write_report` lists all.
        """
        return problems_summary(self.source, self.bad, len(self.facts), groups)

    def write_report(self, path: str | os.PathLike) -> Path:
        """Write every bad record, one "WHERE: REASON" line each, to `path`; returns the path."""
        path = Path(path)
        text = "".join(f"{b.where}: {b.reason}\n" for b in self.bad)
        try:
            path.write_text(f"# {self.source}: {len(self.bad)} bad record(s), {len(self.facts)} good\n" + text,
                            encoding="utf-8")
        except OSError as exc:
            raise NKVFactsError(f"{path}: cannot write the bad-record report ({exc.strerror or exc})") from None
        return path


class _Bad(Exception):
    """A record-level problem; turned into a message naming file and line."""


def read_facts(path: str | os.PathLike, *, skip_bad: bool = False) -> list[FactInput]:
    """Read facts from a .jsonl or .json file in our schema or a benchmark's shape.

    Args:
        path: the file.
        skip_bad: drop bad records instead of raising (use `scan_facts` to see them).
    Returns:
        The facts, in file order.
    Raises:
        NKVFactsError: the file can't be read, holds no fact, or (unless skip_bad) has
            bad records; the message names the file, each line/record and the problem.

    >>> facts = read_facts("facts.jsonl")
    >>> facts[0].fact.prompt, facts[0].fact.target_new
    ('The mother tongue of Danielle Darrieux is', 'English')
    """
    scan = scan_facts(path)
    if scan.bad and not skip_bad:
        raise NKVFactsError(scan.summary() + "\nFix them or pass --skip-bad (skip_bad=True); "
                            "--report FILE (FactsScan.write_report) lists them all")
    if not scan.facts:
        raise NKVFactsError(f"{scan.source}: no usable fact records"
                            + (f" ({len(scan.bad)} bad)" if scan.bad else ""))
    return scan.facts


def scan_facts(path: str | os.PathLike, *, edited_together: bool = False) -> FactsScan:
    """Parse every record of `path`; never raises for a bad record, only for an unreadable file.

    `edited_together` (the facts of one build): a record that edits a question (subject and
    prompt) an earlier record edits is bad too, since the model can give one answer to it.
    An evaluation set may ask a question twice (CounterFact does, for twin cities)."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (some Windows editors) is not a record
    except FileNotFoundError:
        raise NKVFactsError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise NKVFactsError(f"{source}: is a directory, expected a .jsonl or .json facts file") from None
    except UnicodeDecodeError as exc:
        raise NKVFactsError(f"{source}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise NKVFactsError(f"{source}: cannot read ({exc.strerror or exc})") from None

    facts: list[FactInput] = []
    bad: list[BadRecord] = []
    seen: dict[str, str] = {}
    asked: dict[tuple[str, ...], str] = {}  # question (Fact.questions) -> where it was first edited
    for where, position, record in _records(text, source, bad):
        try:
            item = _parse_record(record, position)
        except _Bad as exc:
            bad.append(BadRecord(where, str(exc)))
            continue
        fid = item.fact.id
        if fid in seen:
            bad.append(BadRecord(where, f"duplicate id {fid!r} (first at {seen[fid]}); give each fact its own id"))
            continue
        first = next((asked[q] for q in item.fact.questions if q in asked), None)
        if edited_together and first is not None:
            bad.append(BadRecord(where, f"edits the same question as {first} (same subject and prompt, or same "
                                        "subject and relation): the model can give one answer to it; keep one"))
            continue
        seen[fid] = where
        for q in item.fact.questions:
            asked.setdefault(q, where)
        facts.append(item)
    return FactsScan(source, facts, bad)


def problems_summary(source: str, bad: list[BadRecord], n_good: int, groups: int = 5) -> str:
    """"FILE: N bad record(s) (M good):" and one line per reason, most common first.

    A reason shared by several records is shown once with its count and the first few
    places; at most `groups` reasons are shown, then how many records are left out.
    """
    by_reason: dict[str, list[str]] = {}
    for b in bad:
        by_reason.setdefault(b.reason, []).append(b.where)
    ranked = sorted(by_reason.items(), key=lambda kv: -len(kv[1]))
    lines = [f"{source}: {len(bad)} bad record(s) ({n_good} good):"]
    for reason, places in ranked[:groups]:
        if len(places) == 1:
            lines.append(f"  - {places[0]}: {reason}")
        else:
            first = ", ".join(places[:3]) + (", ..." if len(places) > 3 else "")
            lines.append(f"  - {len(places)} records ({first}): {reason}")
    rest = sum(len(places) for _, places in ranked[groups:])
    if rest:
        lines.append(f"  - ... and {rest} more record(s) failing in {len(ranked) - groups} other way(s)")
    return "\n".join(lines)


def _records(text: str, source: str, bad: list[BadRecord]):
    """Yield (where, 1-based position, parsed JSON) for a JSON list or JSON Lines text."""
    if text.lstrip().startswith("["):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise NKVFactsError(f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        for i, rec in enumerate(doc, start=1):
            yield f"record {i}", i, rec
        return
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(BadRecord(f"line {i}", f"invalid JSON ({exc.msg}: column {exc.colno})"))
            continue
        yield f"line {i}", i, rec


# ------------------------------------------------------------------ record shapes
def _parse_record(rec: Any, position: int) -> FactInput:
    if not isinstance(rec, dict):
        raise _Bad(f"expected a JSON object, got {type(rec).__name__}")
    for detect, parse in _SHAPES:
        if detect(rec):
            return parse(rec, position)
    return _ours(rec, position)


def _ours(rec: dict, position: int) -> FactInput:
    unknown = sorted(set(rec) - set(OUR_FIELDS))
    if unknown:
        raise _Bad(f"unknown field(s) {unknown}; allowed: {list(OUR_FIELDS)}")
    fid = rec.get("id", position)
    if isinstance(fid, bool) or not isinstance(fid, (str, int)) or str(fid) == "":
        raise _Bad(f"field 'id' must be a non-empty string or an integer, got {fid!r:.60}")
    tags = rec.get("tags", [])
    if not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        raise _Bad("field 'tags' must be a list of strings")
    neighborhood = []
    for j, item in enumerate(_list(rec, "neighborhood")):
        if isinstance(item, dict) and set(item) == {"prompt", "target"}:
            pair = (item["prompt"], item["target"])
        elif isinstance(item, list) and len(item) == 2:
            pair = (item[0], item[1])
        else:
            raise _Bad(f"neighborhood[{j}] must be {{\"prompt\": ..., \"target\": ...}}, got {item!r:.80}")
        neighborhood.append((_text(pair[0], f"neighborhood[{j}].prompt"), _target(pair[1], f"neighborhood[{j}].target")))
    portability = []
    for j, item in enumerate(_list(rec, "portability")):
        if not (isinstance(item, dict) and {"prompt", "target"} <= set(item) <= {"prompt", "target", "kind"}):
            raise _Bad(f"portability[{j}] must be {{\"prompt\": ..., \"target\": ..., \"kind\": ...}} "
                       f"(kind optional), got {item!r:.80}")
        kind = _text(item.get("kind", "portability"), f"portability[{j}].kind")
        portability.append((kind, _text(item["prompt"], f"portability[{j}].prompt").replace("{}", str(rec.get("subject"))),
                            _target(item["target"], f"portability[{j}].target")))
    provenance = {"tags": list(tags)} if tags else {}
    made = _make(str(fid), rec.get("subject"), rec.get("prompt"), rec.get("target_new"), rec.get("target_true"),
                 [_text(p, f"paraphrases[{j}]").replace("{}", str(rec.get("subject")))
                  for j, p in enumerate(_list(rec, "paraphrases"))],
                 neighborhood, list(tags), provenance)
    return replace(made, portability=portability)


def _easyedit_counterfact(rec: dict, position: int) -> FactInput:
    nb = []
    if rec.get("locality_prompt") and rec.get("locality_ground_truth"):
        nb.append((_text(rec["locality_prompt"], "locality_prompt"),
                   _target(rec["locality_ground_truth"], "locality_ground_truth")))
    para = [_text(rec["rephrase_prompt"], "rephrase_prompt")] if rec.get("rephrase_prompt") else []
    fid = rec.get("case_id", position)
    return _make(str(fid), rec.get("subject"), rec.get("prompt"), rec.get("target_new"), rec.get("ground_truth"),
                 para, nb, [], {"source": "counterfact", "case_id": fid},
                 names=("subject", "prompt", "target_new", "ground_truth"))


def _rome_counterfact(rec: dict, position: int) -> FactInput:
    rw = rec["requested_rewrite"]
    if not isinstance(rw, dict):
        raise _Bad("field 'requested_rewrite' must be an object")
    new, true = rw.get("target_new"), rw.get("target_true")
    new = new.get("str") if isinstance(new, dict) else new
    true = true.get("str") if isinstance(true, dict) else true
    true_t = _target(true, "requested_rewrite.target_true.str") if true is not None else None
    nb = [(_text(p, f"neighborhood_prompts[{j}]"), true_t) for j, p in enumerate(_list(rec, "neighborhood_prompts"))
          if true_t]
    fid = rec.get("case_id", position)
    prov = {"source": "counterfact", "case_id": fid}
    if rw.get("relation_id"):
        prov["relation_id"] = rw["relation_id"]
    return _make(str(fid), rw.get("subject"), rw.get("prompt"), new, true,
                 [_text(p, f"paraphrase_prompts[{j}]") for j, p in enumerate(_list(rec, "paraphrase_prompts"))],
                 nb, [], prov, names=("requested_rewrite.subject", "requested_rewrite.prompt",
                                      "requested_rewrite.target_new.str", "requested_rewrite.target_true.str"))


def _zsre(rec: dict, position: int) -> FactInput:
    answers = rec.get("answers") or []
    true = answers[0] if isinstance(answers, list) and answers else None
    para = [_text(rec["rephrase"], "rephrase")] if rec.get("rephrase") else []
    nb = []
    if rec.get("loc") and rec.get("loc_ans"):
        nb.append((_text(rec["loc"], "loc") + "?", _target(rec["loc_ans"], "loc_ans")))
    return _make(str(position), rec.get("subject"), rec.get("src"), rec.get("alt"), true, para, nb, [],
                 {"source": "zsre", "record": position}, names=("subject", "src", "alt", "answers[0]"))


def _knowedit(rec: dict, position: int) -> FactInput:
    """KnowEdit's ZsRE, WikiData_counterfact and WikiData_recent records (see the module doc)."""
    true = _first_answer(rec["ground_truth"], "ground_truth") if rec.get("ground_truth") is not None else None
    para = [_text(rec["rephrase_prompt"], "rephrase_prompt")] if rec.get("rephrase_prompt") else []
    locality = [(p, a) for _, p, a in _knowedit_groups(rec, "locality")]
    made = _make(str(position), rec.get("subject"), rec.get("prompt"), rec.get("target_new"), true, para, locality,
                 [], {"source": "knowedit", "record": position},
                 names=("subject", "prompt", "target_new", "ground_truth"))
    return replace(made, portability=_knowedit_groups(rec, "portability"))


def _wikibio(rec: dict, position: int) -> FactInput:
    """KnowEdit's WikiBio: a passage (`text`) about `concept`, continued by the sentence `labels`."""
    locality = [(p, a) for _, p, a in _knowedit_groups(rec, "locality")]
    return _make(str(position), rec.get("concept"), rec.get("text"), rec.get("labels"), None, [], locality, [],
                 {"source": "knowedit", "record": position}, names=("concept", "text", "labels", "ground_truth"))


def _knowedit_groups(rec: dict, name: str) -> list[tuple[str, str, str]]:
    """(kind, prompt, answer) of a KnowEdit `portability` / `locality` object."""
    groups = rec.get(name)
    if groups is None:
        return []
    if not isinstance(groups, dict):
        raise _Bad(f"field {name!r} must be an object mapping a kind to its prompts, got {type(groups).__name__}")
    out = []
    for kind, items in groups.items():
        where = f"{name}.{kind}"
        for j, item in enumerate(items if isinstance(items, list) else [items]):
            if not (isinstance(item, dict) and "prompt" in item and "ground_truth" in item):
                raise _Bad(f"{where}[{j}] must be {{\"prompt\": ..., \"ground_truth\": ...}}, got {item!r:.80}")
            out.extend((kind, p, a) for p, a in _prompt_answers(item["prompt"], item["ground_truth"], f"{where}[{j}]"))
    return out


def _prompt_answers(prompt: Any, truth: Any, where: str) -> list[tuple[str, str]]:
    """One prompt with its answer(s), or EasyEdit's parallel lists of prompts and answers."""
    if not isinstance(prompt, list):
        return [(_text(prompt, f"{where}.prompt"), _first_answer(truth, f"{where}.ground_truth"))]
    if not isinstance(truth, list) or len(truth) != len(prompt):
        raise _Bad(f"{where}: a list of {len(prompt)} prompts needs a list of as many ground truths, "
                   f"got {truth!r:.80}")
    return [(_text(p, f"{where}.prompt[{k}]"), _first_answer(t, f"{where}.ground_truth[{k}]"))
            for k, (p, t) in enumerate(zip(prompt, truth))]


def _first_answer(value: Any, name: str) -> str:
    """A ground truth given as a string, a list of answers or a list of alias lists: its first string."""
    while isinstance(value, list):
        if not value:
            raise _Bad(f"field {name!r} is an empty list; it needs at least one answer")
        value = value[0]
    return _target(value, name)


def _is_knowedit(rec: dict) -> bool:
    return (isinstance(rec.get("portability"), dict) or isinstance(rec.get("locality"), dict)
            or isinstance(rec.get("ground_truth"), list))


_SHAPES: list[tuple[Callable[[dict], bool], Callable[[dict, int], FactInput]]] = [
    (lambda r: "requested_rewrite" in r, _rome_counterfact),
    (lambda r: "src" in r and "alt" in r, _zsre),
    (lambda r: "concept" in r and "labels" in r, _wikibio),
    (_is_knowedit, _knowedit),
    (lambda r: "ground_truth" in r or "rephrase_prompt" in r or "case_id" in r, _easyedit_counterfact),
]


# ------------------------------------------------------------------ field checks
def _make(fid: str, subject: Any, prompt: Any, target_new: Any, target_true: Any, paraphrases: list[str],
          neighborhood: list[tuple[str, str]], tags: list[str], provenance: dict,
          names: tuple[str, str, str, str] = ("subject", "prompt", "target_new", "target_true")) -> FactInput:
    """Check the core fields; `names` are the source's own field names, for messages."""
    subject = _text(subject, names[0]).strip()
    prompt = _prompt(_text(prompt, names[1]), subject)
    new = _target(target_new, names[2])
    true = _target(target_true, names[3]) if target_true is not None else None
    fact = Fact(id=fid, subject=subject, prompt=prompt, target_new=new, target_true=true, provenance=provenance)
    return FactInput(fact, paraphrases, neighborhood, tags)


def _prompt(prompt: str, subject: str) -> str:
    """Fill "{}" with the subject; check the subject is there; drop trailing spaces."""
    if not subject:
        raise _Bad("the subject is only whitespace")
    count = prompt.count("{}")
    if count > 1:
        raise _Bad(f"prompt has {count} '{{}}' placeholders, expected at most one: {prompt!r:.100}")
    if count == 1:
        prompt = prompt.replace("{}", subject)
    elif subject not in prompt:
        raise _Bad(f"subject {subject!r} is not in the prompt {prompt!r:.100}; "
                   "write the subject into the prompt literally or as '{}'")
    # The target is appended with one space, so a trailing space would double it.
    prompt = prompt.rstrip(" ")
    if prompt == subject:
        raise _Bad("the prompt is only the subject; it must also state the relation (e.g. '{} was born in')")
    return prompt


def _target(value: Any, name: str) -> str:
    text = _text(value, name).strip()
    if not text:
        raise _Bad(f"field {name!r} is empty; a fact needs a target answer")
    return text


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"field {name!r} must be a string, got {'nothing' if value is None else type(value).__name__}")
    if not value.strip():
        raise _Bad(f"field {name!r} is empty")
    return value


def _list(rec: dict, name: str) -> list:
    value = rec.get(name, [])
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Bad(f"field {name!r} must be a list, got {type(value).__name__}")
    return value


__all__ = ["FactInput", "FactsScan", "BadRecord", "read_facts", "scan_facts", "problems_summary"]
