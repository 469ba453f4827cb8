"""Edit sets and evaluation files of the fact world, in NKV's facts JSONL schema.

A facts line is
  {"id", "subject", "prompt", "target_new", "target_true", "paraphrases",
   "neighborhood": [{"prompt", "target"}], "tags"}
with targets written without a leading space and prompts ending right before the answer.

Split (seeded, stratified so the shared-last-token group is proportional):
  edit pool  2,000 subjects: each edited at most once in edits.jsonl
  holdout      400 subjects: never edited; they supply neighbourhood prompts and the
                             biographies in generic.txt
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import world

DATA_SEED = 4321
N_EDITS = 2000
N_SAME_SUBJECT = 100
N_NEIGHBOURS = 5
SHARED_TAG = "shared_last_token"


def split(subjects: list[world.Subject]) -> tuple[list[world.Subject], list[world.Subject]]:
    """(edit pool, holdout); the shared-suffix group is split in the same 2000:400 ratio."""
    rng = random.Random(DATA_SEED)
    shared = [s for s in subjects if SHARED_TAG in s.tags]
    plain = [s for s in subjects if SHARED_TAG not in s.tags]
    n_shared_edit = round(len(shared) * N_EDITS / len(subjects))
    rng.shuffle(shared)
    rng.shuffle(plain)
    pool = shared[:n_shared_edit] + plain[:N_EDITS - n_shared_edit]
    holdout = shared[n_shared_edit:] + plain[N_EDITS - n_shared_edit:]
    rng.shuffle(pool)
    return pool, holdout


def _neighbourhood(rng: random.Random, holdout: list[world.Subject], relation: str,
                   obj: str) -> list[dict]:
    """Prompts about never-edited subjects whose true answer is the edited fact's old object."""
    same = [s for s in holdout if s.facts[relation] == obj]
    picked = rng.sample(same, min(N_NEIGHBOURS, len(same)))
    n_templates = len(world.TEMPLATES[relation])
    return [{"prompt": world.prompt(relation, rng.randrange(n_templates), s.name),
             "target": obj} for s in picked]


def edit_record(rng: random.Random, edit_id: str, subject: world.Subject, relation: str,
                holdout: list[world.Subject], extra_tags: tuple[str, ...] = ()) -> dict:
    true = subject.facts[relation]
    new = rng.choice([o for o in world.OBJECTS[relation] if o != true])
    n_templates = len(world.TEMPLATES[relation])
    main = rng.randrange(n_templates)
    return {
        "id": edit_id,
        "subject": subject.name,
        "prompt": world.prompt(relation, main, subject.name),
        "target_new": new,
        "target_true": true,
        "paraphrases": [world.prompt(relation, t, subject.name)
                        for t in range(n_templates) if t != main],
        "neighborhood": _neighbourhood(rng, holdout, relation, true),
        "tags": [f"relation:{relation}", *subject.tags, *extra_tags],
    }


def edits(pool: list[world.Subject], holdout: list[world.Subject]) -> list[dict]:
    rng = random.Random(DATA_SEED + 1)
    return [edit_record(rng, f"fw-{i:04d}", s, rng.choice(world.RELATIONS), holdout)
            for i, s in enumerate(pool[:N_EDITS])]


def same_subject_edits(pool: list[world.Subject], holdout: list[world.Subject]) -> list[dict]:
    """Two facts of one subject edited together (the method's known weak spot)."""
    rng = random.Random(DATA_SEED + 2)
    out = []
    for i, s in enumerate(rng.sample(pool, N_SAME_SUBJECT)):
        for j, rel in enumerate(rng.sample(world.RELATIONS, 2)):
            out.append(edit_record(rng, f"fw-ss-{i:03d}-{j}", s, rel, holdout,
                                   extra_tags=("same_subject",)))
    return out


def quickstart(records: list[dict]) -> list[dict]:
    """One readable edit per relation: first-template prompt, no shared suffix."""
    picked: dict[str, dict] = {}
    for r in records:
        rel = r["tags"][0].split(":", 1)[1]
        first_template = world.prompt(rel, 0, r["subject"])
        if rel not in picked and SHARED_TAG not in r["tags"] and r["prompt"] == first_template:
            picked[rel] = r
    return [picked[rel] for rel in world.RELATIONS]


def true_facts(subjects: list[world.Subject]) -> list[dict]:
    return [{"subject": s.name, "relation": rel, "prompt": world.prompt(rel, t, s.name),
             "target": s.facts[rel]}
            for s in subjects for rel in world.RELATIONS
            for t in range(len(world.TEMPLATES[rel]))]


def generic_lines(holdout: list[world.Subject], n_filler: int = 400) -> list[str]:
    """Text in the world's style that is no edit prompt: holdout biographies + filler.

    The filler seed differs from every training epoch's, so these sentences are new text.
    """
    lines = world.biographies(holdout, seed=DATA_SEED + 3)
    lines += world.filler_sentences(n_filler, seed=DATA_SEED + 4)
    random.Random(DATA_SEED + 5).shuffle(lines)
    return lines


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    # Compact separators: true_facts.jsonl alone has 48,000 lines.
    text = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")


def write_data_files(out_dir: Path, subjects: list[world.Subject]) -> None:
    pool, holdout = split(subjects)
    records = edits(pool, holdout)
    _write_jsonl(out_dir / "edits.jsonl", records)
    _write_jsonl(out_dir / "edits_same_subject.jsonl", same_subject_edits(pool, holdout))
    _write_jsonl(out_dir / "quickstart.jsonl", quickstart(records))
    _write_jsonl(out_dir / "true_facts.jsonl", true_facts(subjects))
    (out_dir / "generic.txt").write_text("\n".join(generic_lines(holdout)) + "\n",
                                         encoding="utf-8")


if __name__ == "__main__":
    write_data_files(Path(__file__).resolve().parent, world.build_world())
