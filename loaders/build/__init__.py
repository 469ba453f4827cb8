"""Building NKV adapters: keys and residuals for facts, computed on a transformers model.

>>> from nkv.facts_io import read_facts
>>> from nkv.loaders.build import build_adapter
>>> adapter = build_adapter(model, tokenizer, read_facts("facts.jsonl"))
>>> adapter.save("edits.nkv")

Modules, by role: config (hyperparameters, defaults), prompts (token positions),
templates (context prefixes), keys (§3), residuals (§4, batched), reference (§4, one fact
at a time), layer (`layer="auto"`), checkpoint (resume), measure (quick edit success),
api (`build_adapter`).
"""

from __future__ import annotations

from .api import build_adapter, compute_rows, encode_facts
from .checkpoint import Checkpoint
from .config import ARCH_DEFAULTS, BuildConfig, default_config, default_layer
from .layer import LayerChoice, candidate_layers, choose_layer
from .measure import score_answers
from .reference import optimize_residual_one, optimize_residuals_reference
from .residuals import optimize_residuals
from .templates import generate_prefixes

__all__ = [
    "build_adapter",
    "BuildConfig",
    "default_config",
    "default_layer",
    "ARCH_DEFAULTS",
    "choose_layer",
    "candidate_layers",
    "LayerChoice",
    "compute_rows",
    "encode_facts",
    "generate_prefixes",
    "optimize_residuals",
    "optimize_residuals_reference",
    "optimize_residual_one",
    "score_answers",
    "Checkpoint",
]
