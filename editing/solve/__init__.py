"""Building NKV adapters: keys and residuals for facts, computed on a transformers model.

>>> from nkv.facts_io import read_facts
>>> from nkv.editing.solve import build_adapter
>>> adapter = build_adapter(model, tokenizer, read_facts("facts.jsonl"))
>>> adapter.save("edits.nkv")

Modules, by role: config (hyperparameters, defaults), prompts (a fact's token
sequences), templates (context prefixes), preserve (probes of the subject's other facts), keys, residuals (batched), batch and
replay (what makes the batch fast), reference (one fact at a time), rows (keys and
residuals for many facts, checkpointed), layer (`layer="auto"`), checkpoint (resume),
api (`build_adapter`). Token positions, teacher-forced scoring and model plumbing are
shared with the evaluation: `nkv.editing.tokens`, `.scoring`, `.forward`.
"""

from __future__ import annotations

from .api import add_facts, build_adapter, rebuild_facts, recorded_config
from .checkpoint import Checkpoint
from .config import ARCH_DEFAULTS, BuildConfig, default_config, default_layer
from .layer import LayerChoice, candidate_layers, choose_layer
from .reference import optimize_residual_one, optimize_residuals_reference
from .residuals import optimize_residuals
from .preserve import PRESERVE_TEMPLATES, choose_probes
from .rows import compute_rows, encode_facts, joint_groups, subject_groups, tokenize_for_build
from nkv.loaders.architectures import empty_adapter_for  # the adapter compute_rows' rows belong in (its residual site)
from .templates import generate_prefixes

__all__ = [
    "build_adapter",
    "add_facts",
    "rebuild_facts",
    "recorded_config",
    "subject_groups",
    "joint_groups",
    "BuildConfig",
    "default_config",
    "default_layer",
    "ARCH_DEFAULTS",
    "choose_layer",
    "candidate_layers",
    "LayerChoice",
    "compute_rows",
    "empty_adapter_for",
    "encode_facts",
    "tokenize_for_build",
    "choose_probes",
    "PRESERVE_TEMPLATES",
    "generate_prefixes",
    "optimize_residuals",
    "optimize_residuals_reference",
    "optimize_residual_one",
    "Checkpoint",
]
