"""`EvalOptions`: the knobs of `evaluate` (recorded in the report's settings)."""

from __future__ import annotations

from dataclasses import dataclass

from nkv.errors import NKVError

from ..scoring import DEFAULT_BATCH

PROTOCOLS = ("counterfact", "zsre")


@dataclass(frozen=True)
class EvalOptions:
    """Knobs of `evaluate`; defaults keep a 1,000-fact run on a small model to minutes on CPU.

    protocol: "counterfact" | "zsre" | None (auto, see the module doc).
    fluency_prompts / fluency_tokens: edit prompts sampled from (top-k 5) and tokens generated.
    true_facts_limit: true facts sampled per group (unedited subjects; edited subjects' others).
    unrelated_tokens: tokens of unrelated text scored for false fires.
    generated_texts / generated_tokens: unrelated text made by the unedited model when none is given.
    free_generation: also run greedy exact match (off saves time on big sets).
    gate_diagnostics: measure where the gate fires (needs an NKV handle; off for other editors).
    measure_pre: also measure the unedited model (off when another run already did, e.g. benchmarks).
    probe_other_facts: without true facts, measure the edited subjects' other facts on the
        unedited model's own answers to relation prompts (probes.py).
    """

    batch_size: int = DEFAULT_BATCH
    protocol: str | None = None
    fluency_prompts: int = 16
    fluency_tokens: int = 48
    true_facts_limit: int = 500
    unrelated_tokens: int = 20_000
    generated_texts: int = 40
    generated_tokens: int = 48
    free_generation: bool = True
    gate_diagnostics: bool = True
    measure_pre: bool = True
    probe_other_facts: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise NKVError(f"protocol must be one of {list(PROTOCOLS)} or None (auto), got {self.protocol!r}")
        if self.batch_size < 1:
            raise NKVError(f"batch_size must be >= 1, got {self.batch_size}")


__all__ = ["EvalOptions", "PROTOCOLS"]
