"""Evaluating NKV adapters the way the knowledge-editing literature does (ROME, MEMIT).

>>> from nkv.editing.evaluate import evaluate, EvalOptions, read_true_facts
>>> report = evaluate(model, tokenizer, adapter, read_facts("edits.jsonl"),
...                   true_facts=read_true_facts("true_facts.jsonl"))
>>> print(report.table())

Modules, by role: run (`evaluate`), options, measure (the model runs, pre and post),
aggregate (per-case results into metrics), weak_spots (where edits go wrong), fluency
(n-gram entropy), knowedit (KnowEdit's Edit Succ. / Portability / Locality / Fluency), gatediag (where the gate fires), truefacts (unedited-fact accuracy),
report (table / JSON / stored summary), plot (the γ histogram). Teacher-forced scoring, generation and token positions are shared with
the build: `nkv.editing.scoring`, `.generation`, `.tokens`.
"""

from __future__ import annotations

from .fluency import fluency, ngram_entropy, text_fluency
from ..generation import free_generation_exact
from ..scoring import Scored, score_pairs
from ..tokens import subject_position
from .gatediag import GateDiagnostics, diagnose, gate_trace, unrelated_chunks
from .plot import plot_cosines
from .report import EvalReport
from .options import EvalOptions
from .run import adapter_rows, attached, other_targets, detect_protocol, evaluate, evaluate_adapter
from .truefacts import TrueFact, read_true_facts, sample_facts

__all__ = [
    "evaluate",
    "evaluate_adapter",
    "EvalOptions",
    "EvalReport",
    "detect_protocol",
    "adapter_rows",
    "other_targets",
    "attached",
    "score_pairs",
    "free_generation_exact",
    "Scored",
    "fluency",
    "text_fluency",
    "ngram_entropy",
    "diagnose",
    "gate_trace",
    "subject_position",
    "unrelated_chunks",
    "GateDiagnostics",
    "plot_cosines",
    "TrueFact",
    "read_true_facts",
    "sample_facts",
]
