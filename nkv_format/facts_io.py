"""Reading the facts a user wants to edit in: our JSONL schema and three benchmark shapes.

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
     "tags": ["language"]}                             # optional, kept in provenance

Benchmark records are recognised by their fields and taken as they are:

* EasyEdit CounterFact (`case_id, prompt, subject, target_new, ground_truth,
  rephrase_prompt, locality_prompt, locality_ground_truth`);
* ROME/MEMIT CounterFact (`requested_rewrite{prompt with {}, subject, target_new.str,
  target_true.str}, paraphrase_prompts, neighborhood_prompts`); a neighbourhood prompt's
  expected answer is the old target;
* ZsRE (`subject, src, alt, answers, rephrase, loc, loc_ans`): the new target is `alt`,
  the old one `answers[0]`; the neighbourhood prompt is `loc + "?"` as in ROME's code.

Ids come from `id` (ours), `case_id` (CounterFact) or the record's 1-based position.
The first occurrence of the subject in the prompt is the one edited.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import NKVFactsError
from .facts import Fact

MAX_REPORTED = 20  # problems shown in one error; enough to fix a file in one pass

OUR_FIELDS = ("id", "subject", "prompt", "target_new", "target_true", "paraphrases", "neighborhood", "tags")


@dataclass(frozen=True)
class FactInput:
    """One fact to edit, plus the evaluation prompts that came with it."""

    fact: Fact
    paraphrases: list[str] = field(default_factory=list)
    neighborhood: list[tuple[str, str]] = field(default_factory=list)  # (prompt, expected answer)
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FactsScan:
    """Everything `scan_facts` found: the good facts and one message per bad record."""

    source: str
    facts: list[FactInput]
    problems: list[str]


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
    if scan.problems and not skip_bad:
        raise NKVFactsError(_summary(scan.source, scan.problems, len(scan.facts)))
    if not scan.facts:
        raise NKVFactsError(f"{scan.source}: no usable fact records"
                            + (f" ({len(scan.problems)} bad)" if scan.problems else ""))
    return scan.facts


def scan_facts(path: str | os.PathLike) -> FactsScan:
    """Parse every record of `path`; never raises for a bad record, only for an unreadable file."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NKVFactsError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise NKVFactsError(f"{source}: is a directory, expected a .jsonl or .json facts file") from None
    except UnicodeDecodeError as exc:
        raise NKVFactsError(f"{source}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise NKVFactsError(f"{source}: cannot read ({exc.strerror or exc})") from None

    facts: list[FactInput] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    for where, position, record in _records(text, source, problems):
        try:
            item = _parse_record(record, position)
        except _Bad as exc:
            problems.append(f"{source}: {where}: {exc}")
            continue
        fid = item.fact.id
        if fid in seen:
            problems.append(f"{source}: {where}: duplicate id {fid!r} (first at {seen[fid]}); give each fact its own id")
            continue
        seen[fid] = where
        facts.append(item)
    return FactsScan(source, facts, problems)


def _summary(source: str, problems: list[str], n_good: int) -> str:
    shown = [p.removeprefix(f"{source}: ") for p in problems[:MAX_REPORTED]]
    more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
    head = f"{source}: {len(problems)} bad record(s) ({n_good} good); fix them or pass --skip-bad (skip_bad=True)"
    return head + ":\n" + "\n".join(f"  - {p}" for p in shown) + more


def _records(text: str, source: str, problems: list[str]):
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
            problems.append(f"{source}: line {i}: invalid JSON ({exc.msg} at column {exc.colno})")
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
    provenance = {"tags": list(tags)} if tags else {}
    return _make(str(fid), rec.get("subject"), rec.get("prompt"), rec.get("target_new"), rec.get("target_true"),
                 [_text(p, f"paraphrases[{j}]").replace("{}", str(rec.get("subject")))
                  for j, p in enumerate(_list(rec, "paraphrases"))],
                 neighborhood, list(tags), provenance)


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


_SHAPES: list[tuple[Callable[[dict], bool], Callable[[dict, int], FactInput]]] = [
    (lambda r: "requested_rewrite" in r, _rome_counterfact),
    (lambda r: "src" in r and "alt" in r, _zsre),
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


__all__ = ["FactInput", "FactsScan", "read_facts", "scan_facts"]
