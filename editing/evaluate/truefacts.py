"""True facts the edits must leave alone: reading them and picking the ones to test.

A true-facts file is JSON Lines, one `{"subject", "prompt", "target"}` object per line
(`relation` optional), e.g. examples/factworld/true_facts.jsonl. Records of our facts
schema (`target_true`) are accepted too.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from nkv.errors import NKVFactsError


@dataclass(frozen=True)
class TrueFact:
    subject: str
    prompt: str
    target: str
    relation: str | None = None


def read_true_facts(path: str | os.PathLike) -> list[TrueFact]:
    """Parse a true-facts JSONL file; errors name the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not a record
    except FileNotFoundError:
        raise NKVFactsError(f"{path}: no such file (expected true facts, one JSON object per line)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NKVFactsError(f"{path}: cannot read as UTF-8 text ({exc})") from None
    out: list[TrueFact] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise NKVFactsError(f"{path}: line {number}: invalid JSON ({exc.msg})") from None
        target = rec.get("target", rec.get("target_true")) if isinstance(rec, dict) else None
        fields = (rec.get("subject"), rec.get("prompt"), target) if isinstance(rec, dict) else (None,) * 3
        if not all(isinstance(v, str) and v.strip() for v in fields):
            raise NKVFactsError(f"{path}: line {number}: expected {{\"subject\", \"prompt\", \"target\"}} "
                                f"non-empty strings, got {line[:100]!r}")
        subject, prompt, target = (v.strip() for v in fields)  # type: ignore[union-attr]
        if subject not in prompt:
            raise NKVFactsError(f"{path}: line {number}: subject {subject!r} is not in the prompt {prompt!r}")
        relation = rec.get("relation")
        out.append(TrueFact(subject, prompt, target, relation if isinstance(relation, str) else None))
    if not out:
        raise NKVFactsError(f"{path}: holds no true facts")
    return out


def sample_facts(facts: Iterable[TrueFact], limit: int, seed: int = 0) -> list[TrueFact]:
    """Up to `limit` facts, drawn with a fixed seed (same sample before and after an edit)."""
    facts = list(facts)
    if len(facts) <= limit:
        return facts
    return random.Random(seed).sample(facts, limit)


__all__ = ["TrueFact", "read_true_facts", "sample_facts"]
