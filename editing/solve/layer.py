"""`--layer auto`: pick the layer by building a few facts at several layers and testing them.

For each candidate layer, a small sample of the facts is built (same hyperparameters),
the adapter is attached with the gate (`nkv.loaders.transformers.attach`), and three
shares are measured, each in [0, 1]:

* E, efficacy: teacher-forced top-1 accuracy of target_new after the edit prompts;
* G, generalization: the same on the facts' paraphrases, or, when the sample has none,
  on the edit prompts behind fresh context prefixes (sampled with seed + 1);
* S, specificity: share of next-token predictions left unchanged on the neighbourhood
  prompts, or, when the sample has none, on fresh generated text unrelated to the edits.

The layer with the highest mean of E, G and S wins; ties go to the layer nearest the
family's default. Candidates: every layer of models with up to 8 layers, else 8 evenly
spaced layers plus the default.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from torch import nn

from nkv.constants import DEFAULT_GAMMA
from nkv.facts import Fact
from nkv.facts_io import FactInput
from nkv.loaders.architectures import arch_spec, empty_adapter_for, model_type_of
from nkv.loaders.transformers import attach

from ..scoring import next_token_predictions, score_pairs, unchanged_share
from .config import BuildConfig, default_layer
from .rows import compute_rows, encode_facts
from .templates import generate_prefixes

SAMPLE = 8
MAX_CANDIDATES = 8
BATCH = 16  # full (batch, length, vocab) logits per forward: keep them small for 128k vocabularies


@dataclass(frozen=True)
class LayerChoice:
    layer: int
    sample: list[str]  # fact ids used
    scores: dict[str, dict[str, float]]  # str(layer) -> {"E", "G", "S", "score"}


def candidate_layers(model: nn.Module) -> list[int]:
    """Every layer of a model with up to MAX_CANDIDATES layers, else that many evenly spaced plus the default."""
    n = len(model.get_submodule(arch_spec(model_type_of(model)).layers))
    if n <= MAX_CANDIDATES:
        return list(range(n))
    spaced = {round(i * (n - 1) / (MAX_CANDIDATES - 1)) for i in range(MAX_CANDIDATES)}
    return sorted(spaced | {default_layer(model)})


def choose_layer(model: nn.Module, tokenizer: Any, facts: Sequence[FactInput | Fact], *, config: BuildConfig,
                 layers: list[int] | None = None, sample: int = SAMPLE, gamma: float = DEFAULT_GAMMA,
                 log: Callable[[str], None] | None = None) -> LayerChoice:
    """Sweep `layers` (default: `candidate_layers`) on up to `sample` facts; see the module doc.

    `log` receives one line per layer tried (the CLI prints them on stderr).
    """
    items = [f if isinstance(f, FactInput) else FactInput(f) for f in facts]
    step = max(1, len(items) // sample)
    picked = items[::step][:sample]  # spread over the file, deterministic
    fact_list = [f.fact for f in picked]
    prefixes = generate_prefixes(model, tokenizer, config.n_prefixes, config.prefix_length, config.seed)
    fresh = generate_prefixes(model, tokenizer, max(config.n_prefixes, 2), config.prefix_length, config.seed + 1)[1:]
    edits = [(f.prompt, f.target_new) for f in fact_list]
    general = [(p, f.fact.target_new) for f in picked for p in f.paraphrases]
    if not general:
        general = [(x + f.prompt, f.target_new) for f in fact_list for x in fresh[:2]]
    neighbours = [p for f in picked for p, _ in f.neighborhood] or [x.strip() for x in fresh]
    before = next_token_predictions(model, tokenizer, neighbours, BATCH)
    tokens = encode_facts(tokenizer, fact_list, prefixes)
    quiet = replace(config, batch_size=max(len(tokens), 1), checkpoint_every=1)
    scores: dict[str, dict[str, float]] = {}
    for layer in layers or candidate_layers(model):
        rows = compute_rows(model, tokenizer, tokens, layer, quiet)
        adapter = empty_adapter_for(model, layer, gamma).add(fact_list, rows["keys"], rows["residuals"])
        handle = attach(model, adapter)
        try:
            e = _mean(s.token_accuracy for s in score_pairs(model, tokenizer, edits, BATCH))
            g = _mean(s.token_accuracy for s in score_pairs(model, tokenizer, general, BATCH))
            s = unchanged_share(before, next_token_predictions(model, tokenizer, neighbours, BATCH))
        finally:
            handle.detach()
        scores[str(layer)] = {"E": round(e, 4), "G": round(g, 4), "S": round(s, 4), "score": round((e + g + s) / 3, 4)}
        if log is not None:
            log(f"layer {layer}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores[str(layer)].items()))
    home = default_layer(model)
    best = max(scores, key=lambda k: (scores[k]["score"], -abs(int(k) - home)))
    return LayerChoice(int(best), [f.id for f in fact_list], scores)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


__all__ = ["choose_layer", "candidate_layers", "LayerChoice"]
