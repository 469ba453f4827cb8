"""Build hyperparameters, their per-architecture defaults, and the default layer.

The residual δ of a fact is parametrised as `δ = (||h0|| / sqrt(d_model)) · u` and Adam
optimises `u`. Adam moves each coordinate of `u` by about `lr` per step, so `lr` is the
step of δ *relative to ||h0||* (the unedited hidden state at the subject): the same
setting works for a 64-wide random model with ||h0|| ≈ 3 and a 4096-wide model with
||h0|| ≈ 200. (MEMIT's absolute lr 0.5 barely moves δ when ||h0|| is large and
overshoots when it is small.) The clamp is relative to ||h0|| as in MEMIT. The weight decay
is ||δ|| / ||h0||, a scale-free ratio like the clamp; MEMIT's is ||δ|| / ||h0||², which
shrinks with the model's hidden-state norm, so its weights do not carry over.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from nkv.dtypes import TORCH_DTYPES
from nkv.errors import NKVError
from nkv.loaders.architectures import arch_spec, model_type_of, projection_weight

from .preserve import PRESERVE_TEMPLATES


PRESERVE_LOSSES = ("kl", "answer")


@dataclass(frozen=True)
class BuildConfig:
    """Hyperparameters of `build_adapter`. Recorded in `adapter.build`.

    steps: optimisation steps per fact (MEMIT: at most steps-1 updates).
    lr: Adam step, relative to ||h0|| (see the module docstring).
    kl_factor: weight of KL(P_δ || P_0) on "{subject} is a".
    preserve_factor: weight of the mean KL(P_δ || P_0) after the subject's probes (its other
        relations, `preserve_templates` filled with the subject; preserve.py); 0 = none.
    preserve_templates: the probes' templates ("{}" is the subject).
    preserve_loss: "answer" (a probe's unedited top answer: the drop in its log-probability)
        or "kl" (its whole next-token distribution, KL(P_δ || P_0)); "answer" held more of
        SmolLM2's other facts at a smaller cost in generalization (benchmarks/compare).
    joint_subjects: facts of one build that share a subject and whose rows the gate cannot
        tell apart on their own prompts (`rows.joint_groups`) are solved together: each keeps
        its own key, and one δ, optimised over all their prompts (each with its own target),
        is every one's residual, so whichever row the gate picks carries all their edits
        (issue 13). False: each fact alone (such rows then compete, and one edit is lost).
    weight_decay: weight of ||δ|| / ||h0|| (not MEMIT's ||δ|| / ||h0||²).
    clamp: ||δ|| is kept <= clamp · ||h0|| after each step.
    early_stop_loss: a fact stops (its row frozen) once its loss is below this.
    stop_margin: None, or a fact also stops once every target token on every template it is
        optimised under is ranked first by this many nats (log-prob over the runner-up).
    opt_prefixes: None (all), or how many of the context prefixes δ is optimised under
        (the bare prompt always; keys always average over all `n_prefixes`).
    rotate_prefixes: with `opt_prefixes`, each step takes the next `opt_prefixes` of all
        the prefixes in turn (step t: prefixes t·k ... t·k+k-1, modulo their number)
        instead of always the first ones, so a fact's steps together see every template.
    n_prefixes: generated context prefixes ("The", "Therefore", "Because", "I", "You").
    prefix_length: tokens generated per prefix.
    batch_size: facts optimised together in one forward/backward; None: `batch_size_on` the
        model's device (16 on a CPU, 64 on an accelerator).
    seed: seeds prefix generation (the only randomness).
    dtype: "float32" | "bfloat16" | "float16" | None (the model's own).
    opt_dtype: None, or the dtype the optimisation's forward and backward passes run in,
        by autocast ("bfloat16"): keys, h0, the prefix cache, the checks and the stored rows
        stay in the model's dtype, and so does the LM head (the loss is read off it). On this
        project's CPU (bf16 instructions) 1.3-1.4x the facts/s on SmolLM2, at G -3.1
        (CounterFact 64 facts; -0.8 on 256) and -1.0 (ZsRE 64): benchmarks/build.
    device: "cpu" | "cuda" | "cuda:N" | None (where the model is).
    checkpoint_every: batches between checkpoints when a checkpoint folder is given.
    """

    steps: int = 25
    lr: float = 0.2
    kl_factor: float = 0.0625
    preserve_factor: float = 0.0
    preserve_templates: tuple[str, ...] = PRESERVE_TEMPLATES
    preserve_loss: str = "answer"
    joint_subjects: bool = True
    weight_decay: float = 0.01
    clamp: float = 0.75
    early_stop_loss: float = 0.05
    stop_margin: float | None = None
    opt_prefixes: int | None = None
    rotate_prefixes: bool = False
    n_prefixes: int = 5
    prefix_length: int = 10
    batch_size: int | None = None
    seed: int = 0
    dtype: str | None = None
    opt_dtype: str | None = None
    device: str | None = None
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "preserve_templates", tuple(self.preserve_templates))  # a JSON list is fine
        problems = []
        for name in ("steps", "batch_size", "checkpoint_every", "prefix_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "clamp"):  # written so that NaN fails too
            if not 0 < getattr(self, name) < math.inf:
                problems.append(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("kl_factor", "preserve_factor", "weight_decay", "early_stop_loss", "n_prefixes"):
            if not 0 <= getattr(self, name) < math.inf:
                problems.append(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        for name in ("dtype", "opt_dtype"):
            if getattr(self, name) is not None and getattr(self, name) not in TORCH_DTYPES:
                problems.append(f"{name} must be one of {list(TORCH_DTYPES)}, got {getattr(self, name)!r}")
        for name in ("stop_margin", "opt_prefixes"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                problems.append(f"{name} must be None or >= 0, got {getattr(self, name)}")
        if self.preserve_loss not in PRESERVE_LOSSES:
            problems.append(f"preserve_loss must be one of {list(PRESERVE_LOSSES)}, got {self.preserve_loss!r}")
        bad = [t for t in self.preserve_templates if not isinstance(t, str) or t.count("{}") != 1]
        if bad:
            problems.append(f"preserve_templates must each hold '{{}}' (the subject) once, got {bad}")
        if problems:
            raise NKVError("BuildConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The torch dtype of `opt_dtype` (None: the model's own)."""
        return TORCH_DTYPES[self.opt_dtype] if self.opt_dtype else None

    @property
    def objective(self) -> dict[str, Any]:
        """The fields that change the result (what a checkpoint must agree on)."""
        # joint_subjects: the groups it gives are kept in the checkpoint's state instead
        skip = {"batch_size", "device", "checkpoint_every", "joint_subjects"}
        # Settings added after checkpoints were first written are left out where they change
        # nothing, so a checkpoint written before them still resumes.
        if not self.rotate_prefixes:
            skip.add("rotate_prefixes")
        if self.opt_dtype is None:
            skip.add("opt_dtype")
        if self.preserve_factor == 0:
            skip.add("preserve_loss")
        return {k: v for k, v in asdict(self).items() if k not in skip}


# Per-architecture overrides of the generic defaults. MEMIT used 20 steps for GPT-2 and
# 25 for GPT-J / Llama; clamp 0.75, kl 0.0625 and early stop 0.05 are its values too.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": {"steps": 20},
}

# Toy-sized models (d_model <= 256, e.g. the trained fact-world models and test models)
# memorise with very sharp distributions: on examples/factworld/models/llama the edit
# prompt's target starts at NLL ~15 and MEMIT's clamp 0.75 leaves most such facts
# unedited. Measured there on 64 edits at layer 0: efficacy 0.63 -> 0.75, specificity
# 0.94 -> 0.91; the 5-fact quick start goes from 2/5 to 5/5 edits.
SMALL_D_MODEL = 256
SMALL_DEFAULTS: dict[str, Any] = {"clamp": 2.0, "lr": 0.3, "steps": 40}

# The fast defaults (issue 11), over the ones above; preset "previous" leaves them out.
# Measured on SmolLM2-135M (layer 6), 32 CounterFact facts, by evaluating the δ of every
# step of one run after all edits: with lr 0.2 a fact reaches ||δ|| = clamp in ~8 steps
# and the loss threshold after 21 updates on average, but 12 updates already give the
# same efficacy, generalization, specificity and free-generation exact match. With lr 0.5
# and a fact stopped once every target token on every template is ranked first by 3 nats
# (or on the loss threshold), facts stop after 7.2 updates on average (at most 11) with
# the same metrics; a 2-nat margin stops after 5.9 but free-generation exact match on
# paraphrases drops 25 -> 19%. Toy-sized models keep their previous settings: a quarter
# of the fact-world facts never reach either rule, and there it changed specificity.
# benchmarks/build/README.md has the numbers. The cap was 12 steps until session 5: on
# ZsRE, whose answers are longer, 12 left most facts short of either rule (1,000 facts:
# self-check 47.8%); a cap of 25 edits them (16 facts: E 69.6 -> 89.3, free generation
# 50 -> 87.5%) at 1.23x the build time, and facts that stop by the margin never reach it.
FAST_DEFAULTS: dict[str, Any] = {"steps": 25, "lr": 0.5, "stop_margin": 3.0}
FAST_SMALL_DEFAULTS: dict[str, Any] = {"stop_margin": None}
# Preset "fast", for large builds: the default, with δ optimised under the bare prompt and
# one context prefix instead of all six templates (keys still average all of them), so a
# step runs 3 of 7 sequences per fact. It trades free-generation on paraphrases for speed:
# benchmarks/build/README.md has the measured cost.
FASTEST: dict[str, Any] = {"opt_prefixes": 1}
# Holding the subject's other relations (preserve.py, issue 13) is opt-in
# (`preserve_factor=1.0`, `nkv build --preserve-factor 1`): it keeps them on the
# fact-world model (33.6 -> 95.8%), but on SmolLM2 it held nothing of the real set's
# countries and cities (40 -> 40%) and cost the default build G 89 -> 84 and
# paraphrase free-generation 31 -> 17 on CounterFact (benchmarks/build, benchmarks/compare).
PRESERVE_DEFAULTS: dict[str, Any] = {}
PRESETS = ("default", "fast", "previous")

# Default layer as a fraction of depth, from the paper's layers: GPT2-XL 17/48,
# GPT-J 8/28, Llama-3-8B 7/32 (rounded down; other families take the Llama fraction).
# On the 4-layer fact-world models this gives layer 0 (Llama) and 1 (GPT-2).
LAYER_FRACTION: dict[str, float] = {"gpt2": 17 / 48, "gptj": 8 / 28}
DEFAULT_LAYER_FRACTION = 7 / 32


CPU_BATCH = 16  # facts per forward/backward on a CPU when the config leaves it open
ACCELERATOR_BATCH = 64  # and on a GPU, where a larger batch keeps the device busy


def batch_size_on(config: BuildConfig, device: torch.device) -> int:
    """The config's batch size, or the default for `device`. On this 2-core CPU, 64 SmolLM2
    CounterFact facts built in the same time at 16 and 64 a batch (1 thread: 184 / 186 s; 2
    threads: 96-116 / 103-105 s), and 64 a batch peaked at 6.2 GB against 2.8 GB
    (benchmarks/build, "Session 13")."""
    if config.batch_size is not None:
        return config.batch_size
    return CPU_BATCH if device.type == "cpu" else ACCELERATOR_BATCH


def default_config(model: nn.Module | str, preset: str = "default", **overrides: Any) -> BuildConfig:
    """The defaults for `model` (or a model_type string: full-size defaults), with `overrides`.

    preset: "default" (the fast settings), "fast" (the default optimised under 2 of the 6
    templates: about 2x faster, fewer paraphrases generate the new answer) or "previous"
    (the build before them: 25 steps or the family's, every template, stop on the loss
    threshold; the benchmark's reference).

    >>> default_config("llama", steps=10).steps
    10
    """
    if preset not in PRESETS:
        raise NKVError(f"unknown build preset {preset!r}; known: {list(PRESETS)}")
    model_type = model if isinstance(model, str) else model_type_of(model)
    arch_spec(model_type)  # unsupported -> error listing the supported ones
    unknown = set(overrides) - {f.name for f in fields(BuildConfig)}
    if unknown:
        raise NKVError(f"unknown build option(s) {sorted(unknown)}; known: {[f.name for f in fields(BuildConfig)]}")
    small = not isinstance(model, str) and _d_model(model) <= SMALL_D_MODEL
    defaults = dict(ARCH_DEFAULTS.get(model_type, {}))
    if preset != "previous":
        defaults.update(FAST_DEFAULTS)
    if small:
        defaults.update(SMALL_DEFAULTS)
        if preset != "previous":
            defaults.update(FAST_SMALL_DEFAULTS)
    if preset == "fast":
        defaults.update(FASTEST)
    if preset != "previous":
        defaults.update(PRESERVE_DEFAULTS)
    return replace(BuildConfig(**defaults), **overrides)


def _d_model(model: nn.Module) -> int:
    return projection_weight(model, 0).shape[0]


# Layers known to edit well, by (model_type, layers, d_model): the depth and width a
# default was measured on. Anything else gets `--layer auto` when no layer is given, since
# the family fraction below silently failed on a model nobody tuned (6-layer Llama:
# layer 1, 3 of 20 edits took; auto: 97 of 100).
VERIFIED_LAYERS: dict[tuple[str, int, int], tuple[int, str]] = {
    ("gpt2", 48, 1600): (17, "GPT-2 XL, NeuralDB paper"),
    ("gptj", 28, 4096): (8, "GPT-J 6B, NeuralDB paper"),
    ("llama", 32, 4096): (7, "Llama-3-8B-Instruct, NeuralDB paper"),
    ("llama", 30, 576): (6, "SmolLM2-135M-Instruct, benchmarks/real (CounterFact)"),
    ("gemma3_text", 18, 640): (3, "Gemma 3 270M, benchmarks/real (CounterFact)"),
    ("llama", 4, 128): (0, "fact-world Llama, examples/factworld (causal trace)"),
}


def verified_layer(model: nn.Module) -> tuple[int, str] | None:
    """(layer, where it was measured) if this depth and width has a known-good layer."""
    model_type = model_type_of(model)
    n_layers = len(model.get_submodule(arch_spec(model_type).layers))
    return VERIFIED_LAYERS.get((model_type, n_layers, _d_model(model)))


def default_layer(model: nn.Module) -> int:
    """The verified layer for this depth and width, else the paper's relative depth for the family."""
    known = verified_layer(model)
    if known is not None:
        return known[0]
    model_type = model_type_of(model)
    n_layers = len(model.get_submodule(arch_spec(model_type).layers))
    fraction = LAYER_FRACTION.get(model_type, DEFAULT_LAYER_FRACTION)
    return min(n_layers - 1, max(0, int(fraction * n_layers)))


__all__ = ["BuildConfig", "ARCH_DEFAULTS", "SMALL_DEFAULTS", "FAST_DEFAULTS", "FASTEST", "PRESETS", "VERIFIED_LAYERS",
           "default_config", "default_layer",
           "verified_layer"]
