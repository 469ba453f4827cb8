"""Keys and residuals for many facts, batch by batch, with finished batches checkpointed.

`compute_rows` is the loop both `build_adapter` and the layer sweep (`--layer auto`) run:
keys for a batch, then its residuals, rows stored in preallocated tensors.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from nkv.errors import NKVFactsError
from nkv.facts import Fact
from nkv.facts_io import FactInput

from ..forward import model_device, pad_id_of
from .checkpoint import Checkpoint
from .config import BuildConfig, batch_size_on
from .keys import average_key, compute_keys, template_inputs
from .preserve import choose_probes
from .prompts import FactTokens, encode_fact, joined
from .reference import optimize_residuals_reference
from .residuals import optimize_residuals

Progress = Callable[[int], None]  # called with the number of facts just finished


def compute_rows(model: nn.Module, tokenizer: Any, tokens: list[FactTokens], layer: int, config: BuildConfig,
                 *, groups: Sequence[Sequence[int]] | None = None, checkpoint: Checkpoint | None = None,
                 on_done: Progress | None = None, on_resumed: Progress | None = None, reference: bool = False,
                 store_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Keys, residuals (in `store_dtype`, on the CPU), last losses and update counts, batch by batch.

    `groups`: facts solved together (indices into `tokens`; `joint_groups`): each fact keeps
    its own key, and the group's one δ, optimised over all its members' prompts, is every
    member's residual. None = every fact alone.
    `reference=True` optimises one item at a time (the benchmark's baseline) instead of
    `config.batch_size` items per forward/backward. Facts already in `checkpoint` are
    loaded, not recomputed: `on_resumed` is told how many, `on_done` after every batch.
    """
    n = len(tokens)
    pad_id = pad_id_of(tokenizer)
    groups = [list(g) for g in groups] if groups is not None else [[i] for i in range(n)]
    # Preallocated: 100k facts of an 8B model are ~6 GB of rows; hold them once.
    out = {"keys": None, "residuals": None, "loss": torch.zeros(n), "steps": torch.zeros(n, dtype=torch.long)}
    filled = torch.zeros(n, dtype=torch.bool)

    def put(idx: list[int], part: dict[str, torch.Tensor]) -> None:
        for name in ("keys", "residuals"):
            if out[name] is None:
                out[name] = torch.zeros(n, part[name].shape[-1], dtype=store_dtype)
        where = torch.tensor(idx, dtype=torch.long)
        for name, t in part.items():
            out[name][where] = t.to(out[name].dtype)
        filled[where] = True

    if checkpoint is not None and checkpoint.folder.is_dir():
        for idx, part in checkpoint.iter_rows():
            put(idx, part)
    # A group is checkpointed whole (its members are in one batch), so it is done or not.
    # Similar lengths in one batch waste less padding; items are independent, so order is free.
    todo = sorted((g for g in groups if not bool(filled[g].all())), key=lambda g: _length_key(tokens[g[0]]))
    resumed = n - sum(len(g) for g in todo)
    if on_resumed is not None and resumed:
        on_resumed(resumed)
    pending: list[tuple[list[int], dict[str, torch.Tensor]]] = []
    chunks = _batches(todo, batch_size_on(config, model_device(model)))
    for number, chunk in enumerate(chunks):
        idx = [i for g in chunk for i in g]
        keys, h0 = compute_keys(model, layer, [tokens[i] for i in idx], pad_id)  # every fact its own key
        optimize = optimize_residuals_reference if reference else optimize_residuals
        result = optimize(model, layer, [joined([tokens[i] for i in g]) for g in chunk], _item_h0(h0, chunk),
                          config, pad_id)
        per_fact = torch.tensor([k for k, g in enumerate(chunk) for _ in g])  # item -> each of its members
        part = {"keys": keys.to("cpu", store_dtype),
                "residuals": result.residuals.to("cpu", store_dtype)[per_fact],
                "loss": result.loss.float().cpu()[per_fact], "steps": result.steps.cpu()[per_fact]}
        put(idx, part)
        if checkpoint is not None:
            pending.append((idx, part))
            if len(pending) >= config.checkpoint_every or number == len(chunks) - 1:
                _flush(checkpoint, pending)
        if on_done is not None:
            on_done(len(idx))
    return out


def _batches(groups: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Consecutive groups, at most `batch_size` facts a batch (a larger group alone), so a
    batch's sequences, and its memory, stay what `batch_size` facts alone would need."""
    out: list[list[list[int]]] = []
    size = 0
    for g in groups:
        if out and size + len(g) <= batch_size:
            out[-1].append(g)
            size += len(g)
        else:
            out.append([g])
            size = len(g)
    return out


def _item_h0(h0: torch.Tensor, chunk: list[list[int]]) -> torch.Tensor:
    """(items, d_model): each item's h0, which sets the scale of its δ through its norm only. For
    a group, the mean of its members' norms (on the first member's direction), so the result
    does not depend on the order the members came in (`nkv add` lists new facts first)."""
    rows, at = [], 0
    for g in chunk:
        members = h0[at : at + len(g)]  # (m, d_model): compute_keys ran the chunk's facts group by group
        norms = members.float().norm(dim=-1)
        rows.append(members[0] * (norms.mean() / norms[0].clamp_min(1e-12)))
        at += len(g)
    return torch.stack(rows)


def joint_groups(model: nn.Module, tokenizer: Any, tokens: list[FactTokens], facts: Sequence[Fact],
                 layer: int) -> list[list[int]]:
    """The facts to solve together: those of one subject whose rows the gate cannot tell apart.

    Facts a and b of one subject are joined when, on one of a's own key texts (the bare prompt
    or a prefixed one, up to the subject), b's key scores at least as high as a's (or the other
    way round): the gate would then add b's residual to a's question, so whichever row wins
    must carry both edits. Keys read before the relation are often that alike (the fact-world
    model: a subject's keys at cosine 0.998); where the words before the subject tell them
    apart ("The capital of France" / "The official language of France" on SmolLM2), the rows
    stay independent, and two rewordings of one question with different answers (ZsRE has
    many) are not forced into one residual that can give neither.
    """
    groups = subject_groups(facts)
    shared = [i for g in groups if len(g) > 1 for i in g]
    if not shared:
        return groups
    k_all, _ = template_inputs(model, layer, [tokens[i] for i in shared], pad_id_of(tokenizer))
    unit_k = torch.nn.functional.normalize(average_key(k_all), dim=-1)  # (m, d_key)
    unit_x = torch.nn.functional.normalize(k_all, dim=-1)  # (m, templates, d_key)
    at = {fact: row for row, fact in enumerate(shared)}
    parent = {i: i for i in shared}

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for g in (g for g in groups if len(g) > 1):
        rows = torch.tensor([at[i] for i in g])
        scores = torch.einsum("atd,bd->atb", unit_x[rows], unit_k[rows])  # (g, templates, g): a's texts vs keys
        own = scores.diagonal(dim1=0, dim2=2).T.unsqueeze(-1)  # (g, templates, 1) a's texts vs a's key
        confused = (scores >= own).any(1)  # (g, g): some text of a scores b's key >= a's
        confused = confused | confused.T
        for x in range(len(g)):
            for y in range(x + 1, len(g)):
                if confused[x, y]:
                    parent[root(g[y])] = root(g[x])
    joined: dict[int, list[int]] = {}
    for g in groups:
        for i in g:
            joined.setdefault(root(i) if i in parent else i, []).append(i)
    return sorted(joined.values(), key=lambda members: members[0])


def subject_groups(facts: Sequence[Fact]) -> list[list[int]]:
    """Indices of the facts that share a subject, in first-appearance order ([i] for a subject
    edited once). Their keys are nearly equal (read at the subject, before the relation), so
    the gate cannot tell their rows apart; solved together, any of them carries all their edits."""
    by_subject: dict[str, list[int]] = {}
    for i, f in enumerate(facts):
        by_subject.setdefault(f.subject, []).append(i)
    return list(by_subject.values())


def _length_key(fact: FactTokens) -> tuple[int, int]:
    """(tokens from the subject on, tokens before it) of the bare prompt + target."""
    bare = fact.rewrites[0]
    return len(bare.ids) - bare.subject_pos, bare.subject_pos


def _flush(checkpoint: Checkpoint, pending: list[tuple[list[int], dict[str, torch.Tensor]]]) -> None:
    indices = [i for idx, _ in pending for i in idx]
    rows = {name: torch.cat([part[name] for _, part in pending]) for name in pending[0][1]}
    checkpoint.save_rows(indices, rows)
    pending.clear()


def tokenize_for_build(model: nn.Module, tokenizer: Any, facts: Sequence[FactInput | Fact], prefixes: list[str],
                       config: BuildConfig) -> list[FactTokens]:
    """`encode_facts` with the probes `config` asks for (the subject's other relations)."""
    plain = plain_facts(facts)
    probes = (choose_probes(model, tokenizer, facts, config.preserve_templates) if config.preserve_factor > 0
              else None)
    return encode_facts(tokenizer, plain, prefixes, probes)


def encode_facts(tokenizer: Any, facts: Sequence[FactInput | Fact], prefixes: list[str],
                 probes: Sequence[Sequence[str]] | None = None) -> list[FactTokens]:
    """Tokenize facts for `compute_rows` (prefixes from `generate_prefixes`, probes per fact
    from `preserve.choose_probes`; none: the subject's other relations are not held)."""
    plain = plain_facts(facts)
    probes = probes if probes is not None else [()] * len(plain)
    return [encode_fact(tokenizer, f, prefixes, held) for f, held in zip(plain, probes)]


def plain_facts(facts: Sequence[FactInput | Fact]) -> list[Fact]:
    """The `Fact`s of `facts`, checked: not empty, only Fact/FactInput items, unique ids and
    questions (subject and prompt)."""
    plain = [f.fact if isinstance(f, FactInput) else f for f in facts]
    if not plain:
        raise NKVFactsError("build_adapter: no facts given")
    seen: set[str] = set()
    asked: dict[tuple[str, ...], str] = {}
    for f in plain:
        if not isinstance(f, Fact):
            raise NKVFactsError(f"build_adapter: expected Fact or FactInput items, got {type(f).__name__}")
        if f.id in seen:
            raise NKVFactsError(f"build_adapter: duplicate fact id {f.id!r}; ids must be unique")
        first = next((asked[q] for q in f.questions if q in asked), None)
        if first is not None:
            what = f"relation {f.relation!r}" if ("relation", f.subject, f.relation) in asked else repr(f.prompt)
            raise NKVFactsError(f"build_adapter: facts {first!r} and {f.id!r} edit the same question ({what} about "
                                f"{f.subject!r}); the model can give one answer: keep one")
        seen.add(f.id)
        for q in f.questions:
            asked.setdefault(q, f.id)
    return plain


__all__ = ["compute_rows", "joint_groups", "subject_groups", "encode_facts", "tokenize_for_build", "plain_facts", "Progress"]
