"""Fact records: what each row of an adapter means, stored inside the file itself.

Records live in the `nkv.facts` tensor as UTF-8 JSON Lines (row i of K1/R1 <-> line i),
not in the header: 100,000 facts would blow the header's size limit and make every
`read_header` parse them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from .constants import FACT_OPTIONAL_FIELDS, FACT_REQUIRED_FIELDS
from .errors import NKVFormatError
from .header import _reject_constant, strict_json_loads


@dataclass(frozen=True)
class Fact:
    """One edit: `prompt` (containing `subject`) should now be completed with `target_new`.

    `id` is stable and unique within an adapter; row operations address facts by it.
    """

    id: str
    subject: str
    prompt: str
    target_new: str
    target_true: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> tuple[str, str]:
        """(subject, prompt): what this fact edits. Two facts with one question are two
        answers to it, of which the model can give one, so they conflict (spec §9)."""
        return (self.subject, self.prompt)

    @property
    def relation(self) -> str | None:
        """The relation the record names, if any: `provenance.relation_id` (CounterFact's
        "P103") or a "relation:<name>" tag; None when it names none."""
        rel = self.provenance.get("relation_id")
        if isinstance(rel, str) and rel:
            return rel
        tags = self.provenance.get("tags", [])
        return next((t.split(":", 1)[1] for t in tags if isinstance(t, str) and t.startswith("relation:")
                     and len(t) > len("relation:")), None) if isinstance(tags, list) else None

    @property
    def questions(self) -> tuple[tuple[str, ...], ...]:
        """Every way two facts can ask the same thing (spec §9): the same subject and prompt,
        or the same subject and named relation ("The capital of France is" and "France's
        capital is", both tagged relation:capital)."""
        keys: tuple[tuple[str, ...], ...] = (("prompt", self.subject, self.prompt),)
        if self.relation is not None:
            keys += (("relation", self.subject, self.relation),)
        return keys

    def to_record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "id": self.id,
            "subject": self.subject,
            "prompt": self.prompt,
            "target_new": self.target_new,
        }
        if self.target_true is not None:
            rec["target_true"] = self.target_true
        if self.provenance:
            rec["provenance"] = self.provenance
        return rec


def fact_record_problems(rec: Any, where: str) -> list[str]:
    """Every way `rec` fails to be a valid fact record (empty list when it is valid)."""
    if not isinstance(rec, dict):
        return [f"{where}: expected a JSON object, got {type(rec).__name__}"]
    problems = []
    for name in FACT_REQUIRED_FIELDS:
        value = rec.get(name)
        if not isinstance(value, str) or not value:
            problems.append(f"{where}: field {name!r} must be a non-empty string, got {value!r:.60}")
    if rec.get("target_true") is not None and not isinstance(rec["target_true"], str):
        problems.append(f"{where}: field 'target_true' must be a string or absent")
    if "provenance" in rec and not isinstance(rec["provenance"], dict):
        problems.append(f"{where}: field 'provenance' must be a JSON object")
    unknown = set(rec) - set(FACT_REQUIRED_FIELDS) - set(FACT_OPTIONAL_FIELDS)
    if unknown:
        problems.append(f"{where}: unknown field(s) {sorted(unknown)}; allowed: "
                        f"{list(FACT_REQUIRED_FIELDS + FACT_OPTIONAL_FIELDS)}")
    try:  # the writer must be able to store it again as strict UTF-8 JSON
        for value in rec.values():  # the text fields: valid Unicode (no lone surrogates)
            if isinstance(value, str):
                value.encode("utf-8")
        if rec.get("provenance"):  # any JSON: the only field that needs the full check
            json.dumps(rec["provenance"], ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        problems.append(f"{where}: not storable as UTF-8 JSON ({str(exc)[:80]}); "
                        "use JSON types, finite numbers and valid Unicode")
    return problems


def fact_from_record(rec: dict[str, Any]) -> Fact:
    """Build a Fact from a record already checked by `fact_record_problems`."""
    return Fact(
        id=rec["id"],
        subject=rec["subject"],
        prompt=rec["prompt"],
        target_new=rec["target_new"],
        target_true=rec.get("target_true"),
        provenance=dict(rec.get("provenance") or {}),
    )


# How the writer stores a record: compact JSON, UTF-8 as is, keys in `Fact.to_record` order.
# One encoder object for every record (json.dumps with options builds a new one per call).
_compact_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode_facts(facts: list[Fact]) -> bytes:
    """JSON Lines, one compact record per fact, each line ending in '\\n'."""
    return "".join(_compact_json(f.to_record()) + "\n" for f in facts).encode("utf-8")


def decode_facts(data: bytes, n_facts: int, source: str) -> tuple[list[Fact], list[str]]:
    """Parse the `nkv.facts` bytes; returns (facts, problems). Never raises on bad data."""
    where = "V9: tensor nkv.facts"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [], [f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})"]
    if n_facts == 0:
        return [], ([] if text == "" else [f"{where}: expected no records (nkv.n_facts = 0), got data"])
    if not text.endswith("\n"):
        return [], [f"{where}: must end with a newline (every record is one line)"]
    lines = text[:-1].split("\n")
    if len(lines) != n_facts:
        return [], [f"{where}: expected {n_facts} records (nkv.n_facts), got {len(lines)} lines"]
    facts = _decode_as_written(lines)
    return (facts, []) if facts is not None else _decode_each(lines, where)


def count_problems(data: bytes, n_facts: int) -> list[str]:
    """The part of V9 a serving loader checks at load: one line per row (no parse).
    Empty when the count is right; `decode_facts` finds the rest when the records are read."""
    if n_facts == 0:
        return [] if data == b"" else ["V9: tensor nkv.facts: expected no records (nkv.n_facts = 0), got data"]
    if not data.endswith(b"\n") or data.count(b"\n") != n_facts:
        return [f"V9: tensor nkv.facts: expected {n_facts} records (nkv.n_facts), one per line ending in a newline"]
    return []


class LazyFacts(Sequence[Fact]):
    """A file's fact records, parsed and checked (V9) when first read, not at load.

    Serving never reads them: they name the rows, they do not change what the model computes,
    and parsing 1,000,000 of them took 6.5 of the 22 s of attaching (benchmarks/scale). A
    record that breaks V9 raises NKVFormatError, naming the file, when the facts are read.
    """

    def __init__(self, data: bytes, n_facts: int, source: str):
        self._data: bytes | None = data
        self._n, self._source = n_facts, source
        self._facts: list[Fact] | None = None

    def _all(self) -> list[Fact]:
        if self._facts is None:
            assert self._data is not None
            facts, problems = decode_facts(self._data, self._n, self._source)
            if problems:
                raise NKVFormatError(self._source, problems)
            self._facts, self._data = facts, None
        return self._facts

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> Fact: ...
    @overload
    def __getitem__(self, i: slice) -> list[Fact]: ...
    def __getitem__(self, i: int | slice) -> Fact | list[Fact]:
        return self._all()[i]

    def __iter__(self) -> Iterator[Fact]:
        return iter(self._all())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"LazyFacts({self._n} records{', read' if self._facts is not None else ''})"


def _decode_each(lines: list[str], where: str) -> tuple[list[Fact], list[str]]:
    """Parse and check the records line by line, strictly: (facts, problems)."""
    facts: list[Fact] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for row, line in enumerate(lines):
        try:
            rec = strict_json_loads(line)  # no NaN, duplicate keys or lone surrogates
        except (ValueError, RecursionError) as exc:  # ValueError: also ints over 4300 digits
            problems.append(f"{where} row {row}: invalid JSON ({exc})"[:300])
            continue
        rec_problems = fact_record_problems(rec, f"{where} row {row}")
        if rec_problems:
            problems.extend(rec_problems)
            continue
        fact = fact_from_record(rec)
        if fact.id in seen:
            problems.append(f"{where} row {row}: duplicate fact id {fact.id!r} (first at row {seen[fact.id]})")
        seen[fact.id] = row
        facts.append(fact)
        if len(problems) > 20:  # enough to act on; do not build a giant message
            problems.append(f"{where}: stopped after 20 problems")
            break
    return facts, problems


_ALLOWED_FIELDS = frozenset(FACT_REQUIRED_FIELDS + FACT_OPTIONAL_FIELDS)


def _decode_as_written(lines: list[str]) -> list[Fact] | None:
    """The facts of `lines` if every line is a valid record exactly as `encode_facts` writes
    it and the ids are unique, else None (then the record-by-record check finds the problems).

    One parse of all lines as a JSON array: 1.4x faster than the strict parse per line, which
    took ~9 of the ~40 s of attaching 1M facts (benchmarks/scale/attach_file.py). It is as
    strict: a line that equals the compact encoding of what the array parse gave for it is
    one JSON value with no duplicate key, no NaN and no lone surrogate, since the encoding
    has none (a str decoded from UTF-8 holds no surrogate), and the equality of all n lines
    with n values pins each value to its own line. Any other spelling takes the per-line path.
    """
    try:
        records = json.loads("[" + ",".join(lines) + "]", parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    if len(records) != len(lines) or not all(map(_plain_valid, records)):
        return None
    try:
        if any(_compact_json(rec) != line for rec, line in zip(records, lines)):
            return None
    except (TypeError, ValueError, RecursionError):  # e.g. nesting the encoder refuses
        return None
    if len({rec["id"] for rec in records}) != len(records):
        return None
    return [Fact(rec["id"], rec["subject"], rec["prompt"], rec["target_new"], rec.get("target_true"),
                 rec.get("provenance", {})) for rec in records]


def _plain_valid(rec: Any) -> bool:
    """A quick form of `fact_record_problems(rec) == []` for records fresh from json.loads
    (exact JSON types); text validity is left to the caller's encoding check."""
    return (type(rec) is dict and rec.keys() <= _ALLOWED_FIELDS
            and all(type(rec.get(name)) is str and rec[name] for name in FACT_REQUIRED_FIELDS)
            and type(rec.get("target_true", "")) in (str, type(None))
            and type(rec.get("provenance", {})) is dict)


__all__ = ["Fact", "LazyFacts", "encode_facts", "decode_facts", "count_problems", "fact_record_problems",
           "fact_from_record"]
