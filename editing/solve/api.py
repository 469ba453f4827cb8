"""`build_adapter`: facts in, an `NKVAdapter` out (one key and one residual per fact)."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import replace
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from nkv import __version__
from nkv.adapter import NKVAdapter
from nkv.compat import check_gamma
from nkv.constants import DEFAULT_GAMMA, DEFAULT_RESIDUAL_SITE
from nkv.dtypes import ROW_DTYPE_NAMES, TORCH_DTYPES
from nkv.errors import NKVError, NKVFactsError
from nkv.facts import Fact
from nkv.facts_io import FactInput
from nkv.loaders.architectures import arch_spec, base_model_info, empty_adapter_for, model_type_of, residual_site
from nkv.loaders.models import resolve_device

from ..forward import frozen, model_device
from .checkpoint import Checkpoint, digest
from .config import BuildConfig, batch_size_on, default_config, verified_layer
from .layer import choose_layer
from .rows import Progress, compute_rows, joint_groups, plain_facts, tokenize_for_build
from .selfcheck import self_check
from .templates import as_templates, generate_prefixes


def build_adapter(
    model: nn.Module,
    tokenizer: Any,
    facts: Sequence[FactInput | Fact],
    *,
    layer: int | str | None = None,
    gamma: float = DEFAULT_GAMMA,
    config: BuildConfig | None = None,
    name: str | None = None,
    revision: str | None = None,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> NKVAdapter:
    """Compute one key and one residual per fact on the unedited `model`.

    Args:
        model: a transformers causal LM whose model_type is in the architecture table.
            If `config.device` / `config.dtype` are set, the model is moved / cast in place.
        tokenizer: its tokenizer.
        facts: `FactInput`s (from `nkv.facts_io.read_facts`) or `Fact`s; ids must be unique.
        layer: the layer to edit; None = the layer verified for this model's depth and width
            (`config.VERIFIED_LAYERS`), or, when there is none, "auto"; "auto" = a short sweep
            on a sample of the facts (`choose_layer`).
        gamma: the gate threshold stored in the adapter.
        config: hyperparameters; None = `default_config(model)`.
        name, revision: how the base model is recorded (default: config._name_or_path).
        progress: a tqdm bar with facts/s on stderr.
        checkpoint_dir: save finished rows there every `config.checkpoint_every` batches.
            It is not deleted here: remove it (`Checkpoint(dir).remove()`) once the
            adapter is saved.
        resume: continue from `checkpoint_dir`; without it an existing checkpoint is an error.
    Returns:
        The adapter (not saved). `adapter.build` records the tool version, the resolved
        hyperparameters, the layer choice, the context templates, loss statistics and the
        self-check (`selfcheck.self_check`: efficacy on the edit prompts through the gate).
    Raises:
        NKVFactsError: duplicate ids, or a subject the tokenizer cannot locate (raised
            before any optimisation).
        NKVUnsupportedModelError: the model's family is not in the table.

    >>> adapter = build_adapter(model, tokenizer, read_facts("facts.jsonl"), layer=3)
    >>> adapter.save("edits.nkv")
    """
    config = config or default_config(model)
    gamma = check_gamma(gamma)  # before any work: the writer would refuse it only at the end
    plain = plain_facts(facts)
    with _placed(model, config), frozen(model):
        ckpt = Checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
        if ckpt is not None:
            ckpt.require_resume(resume)
        dtype = next(model.parameters()).dtype
        inputs = {"facts": [f.to_record() for f in plain], "objective": config.objective, "layer": layer,
                  "dtype": str(dtype), "model": base_model_info(model, 0).fingerprint}
        site = residual_site(model_type_of(model))
        if site != DEFAULT_RESIDUAL_SITE:  # rows of another site are other rows; llama-like checkpoints still resume
            inputs["residual_site"] = site
        inputs = digest(inputs)
        state = ckpt.resumed_state(inputs) if ckpt is not None else {}
        layer, layer_choice = _resolve_layer(model, tokenizer, facts, layer, config, state, progress)
        prefixes = state.get("prefixes") or generate_prefixes(model, tokenizer, config.n_prefixes,
                                                              config.prefix_length, config.seed)
        tokens = tokenize_for_build(model, tokenizer, facts, prefixes, config)  # all errors before any work
        # a resumed build keeps the grouping it started with (none: a build from before joint subjects)
        groups = state.get("groups") if state else (
            joint_groups(model, tokenizer, tokens, plain, layer) if config.joint_subjects else None)
        if ckpt is not None:
            ckpt.write_state({"inputs": inputs, "layer": layer, "layer_choice": layer_choice,
                              "prefixes": prefixes, "n_facts": len(plain), "groups": groups})
        store = dtype if dtype in ROW_DTYPE_NAMES else torch.float32  # a dtype the format can hold
        with _bar(len(plain), progress) as (advance, resumed):
            rows = compute_rows(model, tokenizer, tokens, layer, config, groups=groups, checkpoint=ckpt,
                                on_done=advance, on_resumed=resumed, store_dtype=store)
        adapter = empty_adapter_for(model, layer, gamma, store, name=name, revision=revision).add(
            with_solved_together(plain, groups), rows["keys"], rows["residuals"])
        build = {**_provenance(model, config, layer_choice, prefixes, rows["loss"]),
                 "self_check": self_check(model, tokenizer, adapter)}
        return replace(adapter, build=build)


def rebuild_facts(model: nn.Module, tokenizer: Any, adapter: NKVAdapter, ids: Sequence[str], *,
                  progress: bool = False) -> NKVAdapter:
    """`adapter` with the rows of `ids` built again on `model` (its base model: checked) at the
    adapter's layer and γ with the settings its build recorded, grouped as `build_adapter`
    groups them (without the facts no longer in the adapter).

    What `nkv rm --model` does for the facts that were solved with a removed one: their shared
    residual still carries the removed fact's edit until they are solved again (spec §9).
    """
    from nkv.loaders.transformers import check_base

    check_base(model, adapter)
    facts = [_unpartnered(adapter.facts[adapter.index_of(i)]) for i in ids]
    rebuilt = build_adapter(model, tokenizer, facts, layer=adapter.layer, gamma=adapter.gamma,
                            config=recorded_config(adapter), progress=progress)
    return adapter.replace(rebuilt.facts, rebuilt.keys.to(adapter.keys.dtype), rebuilt.residuals.to(adapter.residuals.dtype))


def add_facts(model: nn.Module, tokenizer: Any, adapter: NKVAdapter, facts: Sequence[FactInput | Fact], *,
              progress: bool = False) -> NKVAdapter:
    """`adapter` with `facts` added, built on `model` (its base model: checked) at the adapter's
    layer and γ with the settings its build recorded. A new fact about a subject the adapter
    already edits is built in one build with that subject's facts, whose rows are rebuilt in
    place (those the gate cannot tell apart from it then share its residual); every other row
    is left as it was. Ids and questions already in the adapter are refused (`NKVFactsError`),
    before any work.
    """
    from nkv.loaders.transformers import check_base

    check_base(model, adapter)
    new = plain_facts(facts)
    subjects = {f.subject for f in new}
    partners = [_unpartnered(f) for f in adapter.facts if f.subject in subjects]
    taken = adapter.positions()
    clash = [f.id for f in new if f.id in taken]
    if clash:
        raise NKVFactsError(f"add: fact id(s) already in the adapter: {clash[:5]}; remove them first or use new ids")
    plain_facts([*new, *partners])  # a question the adapter already edits: refused here, before the build
    built = build_adapter(model, tokenizer, [*facts, *partners], layer=adapter.layer, gamma=adapter.gamma,
                          config=recorded_config(adapter), progress=progress)
    keys, residuals = built.keys.to(adapter.keys.dtype), built.residuals.to(adapter.residuals.dtype)
    n = len(new)
    out = adapter.replace(built.facts[n:], keys[n:], residuals[n:]) if partners else adapter
    return out.add(built.facts[:n], keys[:n], residuals[:n])


def recorded_config(adapter: NKVAdapter) -> BuildConfig:
    """The BuildConfig an adapter's build recorded (settings it predates take today's defaults;
    device and dtype are the model's as given)."""
    from dataclasses import fields

    recorded = (adapter.build or {}).get("config", {})
    known = {f.name for f in fields(BuildConfig)} - {"device", "dtype"}
    return BuildConfig(**{k: v for k, v in recorded.items() if k in known})


def _unpartnered(fact: Fact) -> Fact:
    """The fact without its recorded partners: a build decides them again."""
    return replace(fact, provenance={k: v for k, v in fact.provenance.items() if k != "solved_with"})


def with_solved_together(facts: list[Fact], groups: list[list[int]] | None) -> list[Fact]:
    """The facts, each of a jointly solved subject recording the ids it shares its residual with
    (`provenance["solved_with"]`), so row operations can tell (spec §9)."""
    if groups is None:
        return facts
    out = list(facts)
    for g in groups:
        if len(g) > 1:
            for i in g:
                others = [facts[j].id for j in g if j != i]
                out[i] = replace(facts[i], provenance={**facts[i].provenance, "solved_with": others})
    return out


def _provenance(model: nn.Module, config: BuildConfig, layer_choice: dict[str, Any], prefixes: list[str],
                loss: torch.Tensor) -> dict[str, Any]:
    """What `adapter.build` records: tool, resolved settings, layer choice, templates, losses."""
    return {
        "tool": f"nkv {__version__}",
        "method": "neuraldb: keys and residuals as MEMIT compute_ks / compute_z, batched",
        "config": {**config.to_dict(), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                   "device": str(model_device(model)), "batch_size": batch_size_on(config, model_device(model))},
        "seed": config.seed,
        "layer_choice": layer_choice,
        "templates": as_templates(prefixes),
        "loss": {"mean": round(float(loss.mean()), 6), "max": round(float(loss.max()), 6),
                 "n_above_early_stop": int((loss >= config.early_stop_loss).sum())},
    }


def _resolve_layer(model: nn.Module, tokenizer: Any, facts: Sequence[FactInput | Fact], layer: int | str | None,
                   config: BuildConfig, state: dict[str, Any], verbose: bool) -> tuple[int, dict[str, Any]]:
    if state:  # resuming: the layer chosen when the build started
        return int(state["layer"]), state["layer_choice"]
    if layer is None:
        known = verified_layer(model)
        if known is not None:
            return known[0], {"mode": "default", "verified_on": known[1]}
        if verbose:
            print("nkv build: no layer is verified for this model's depth and width, so it is chosen by a short "
                  "sweep (--layer auto); pass --layer N to skip it", file=sys.stderr)
        return _swept_layer(model, tokenizer, facts, config, verbose, "no verified default for this depth and width")
    if layer == "auto":
        return _swept_layer(model, tokenizer, facts, config, verbose, "asked for")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise NKVError(f"layer must be an integer, 'auto' or None, got {layer!r}")
    arch_n = len(model.get_submodule(arch_spec(model_type_of(model)).layers))
    if not 0 <= layer < arch_n:
        raise NKVError(f"layer {layer} does not exist: the model has {arch_n} layers (0..{arch_n - 1})")
    return layer, {"mode": "given"}


def _swept_layer(model: nn.Module, tokenizer: Any, facts: Sequence[FactInput | Fact], config: BuildConfig,
                 verbose: bool, why: str) -> tuple[int, dict[str, Any]]:
    log = (lambda line: print(f"nkv build --layer auto: {line}", file=sys.stderr)) if verbose else None
    choice = choose_layer(model, tokenizer, facts, config=config, log=log)
    if log is not None:
        log(f"chose layer {choice.layer}")
    return choice.layer, {"mode": "auto", "why": why, "sample": choice.sample, "scores": choice.scores}


@contextlib.contextmanager
def _placed(model: nn.Module, config: BuildConfig) -> Iterator[None]:
    """Move / cast the model as the config asks (in place: a copy of an 8B model would not fit)."""
    if config.device is not None:
        model.to(torch.device(resolve_device(config.device, "BuildConfig.device")))
    if config.dtype is not None:
        model.to(TORCH_DTYPES[config.dtype])
    yield


@contextlib.contextmanager
def _bar(total: int, enabled: bool) -> Iterator[tuple[Progress, Progress]]:
    """(advance, resumed): facts just finished, and facts loaded from a checkpoint."""
    if not enabled:
        yield (lambda n: None), (lambda n: None)
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="fact", desc="nkv build", dynamic_ncols=True, smoothing=0.1) as bar:

        def resumed(n: int) -> None:
            # shown at once, and counted as the bar's start (tqdm's `initial`) so that facts/s
            # and the ETA measure this run's work only
            bar.n = bar.last_print_n = bar.initial = n
            bar.refresh()

        yield bar.update, resumed


__all__ = ["build_adapter", "add_facts", "rebuild_facts", "recorded_config"]
