"""Evaluating NKV adapters the way the knowledge-editing literature does (method.md §6).

>>> from nkv.loaders.eval import evaluate, EvalOptions, read_true_facts
>>> report = evaluate(model, tokenizer, adapter, read_facts("edits.jsonl"),
...                   true_facts=read_true_facts("true_facts.jsonl"))
>>> print(report.table())

Modules, by role: scoring (teacher forcing, greedy and sampled generation), fluency
(n-gram entropy), gatediag (where the gate fires), truefacts (unedited-fact accuracy),
run (`evaluate`), report (table / JSON / stored summary), plot (the γ histogram).
"""

from __future__ import annotations

from .fluency import fluency, ngram_entropy, text_fluency
from .gatediag import GateDiagnostics, diagnose, gate_trace, subject_position, unrelated_chunks
from .plot import plot_cosines
from .report import EvalReport
from .run import EvalOptions, adapter_rows, attached, detect_protocol, evaluate, evaluate_adapter
from .scoring import Scored, free_generation_exact, score_pairs
from .truefacts import TrueFact, read_true_facts, sample_facts

__all__ = [
    "evaluate",
    "evaluate_adapter",
    "EvalOptions",
    "EvalReport",
    "detect_protocol",
    "adapter_rows",
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
