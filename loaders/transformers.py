"""Attach NKV adapters to a transformers causal LM.

Wrap, don't patch: the output projection at an adapter's layer is replaced in its parent
by `NKVLinear`, which keeps the original as `base_layer` and returns
`base_layer(x) + gate(x).delta`. Detaching puts the original module back, so outputs are
bit-identical to before. No global state is touched.

Families that normalise the FFN's output before the residual stream (Gemma 2/3, OLMo 2/3;
residual site "out_norm", spec §5) get their rows after that norm: the norm is wrapped too
(`NKVOutNorm`), and `NKVLinear` hands it the gated rows instead of adding them itself.

Several named adapters at one layer share one `NKVLinear`: their rows are concatenated in
one table and each keeps its own gamma and sketch (a `RowRange`). `NKVHandle.using` picks
an adapter (or none) per batch row, like PEFT's `adapter_names=`; the routed gate
(`nkv_gate_routed`) scores each token against its own adapter's rows only.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence, Union

import torch
from torch import nn

from nkv.adapter import NKVAdapter
from nkv.compat import check_fingerprint, check_gamma, check_shape, check_shortlist
from nkv.errors import NKVCompatibilityError, NKVError, NKVUnsupportedModelError
from nkv.facts import Fact
from nkv.fingerprint import FINGERPRINT2_PREFIX, compute_fingerprint
from nkv.constants import DEFAULT_SHORTLIST, SKETCH_MIN_FACTS
from nkv.gate import (DEFAULT_FACT_CHUNK, GateResult, RowRange, Sketch, nkv_gate,
                      nkv_gate_routed, rescore_group, shortlist_chunk, shortlist_scores)
from nkv.resolve import AdapterSource, resolve_adapter

from .architectures import (arch_spec, blocks, model_fingerprint, model_type_of, output_projection, projection_weight,
                            residual_module)

# Upper bound on the (tokens x facts) score matrix held at once: 2^25 float32 = 128 MiB.
SCORE_BUDGET = 2**25

# The name an adapter attached without `name=` gets ("default-<layer>" if taken at another layer).
DEFAULT_NAME = "default"

# What `NKVHandle.using` accepts: one name (or None) for every row, or one per batch row.
AdapterChoice = Union[str, None, Sequence[Union[str, None]]]


@dataclass
class GateActivity:
    """What one adapter's gate did while recording: tokens gated against it, fires per fact.

    `tokens` counts the tokens routed to the adapter (every token at its layer when no
    choice is active), `fired` and `per_fact` (keyed by the adapter's own fact ids) its
    fires. `results`, if kept, are the layer's raw GateResults: `index` is a row of the
    layer's shared table, which is the adapter's own row when it is alone at its layer.
    """

    fact_ids: list[str]
    tokens: int = 0
    fired: int = 0
    per_fact: Counter = field(default_factory=Counter)  # fact id -> tokens it fired on
    keep_results: bool = False
    results: list[GateResult] = field(default_factory=list)  # one per forward, if kept
    adapter: str = DEFAULT_NAME  # the adapter counted

    def update(self, result: GateResult, routed: torch.Tensor | None = None, start: int = 0) -> None:
        """Count `result`; `routed` masks the tokens gated against this adapter (None: all),
        whose rows start at `start` in the layer's table."""
        fired = result.fired if routed is None else result.fired & routed
        self.tokens += fired.numel() if routed is None else int(routed.sum())
        n_fired = int(fired.sum())
        self.fired += n_fired
        if n_fired:
            for idx, count in zip(*torch.unique(result.index[fired] - start, return_counts=True)):
                self.per_fact[self.fact_ids[int(idx)]] += int(count)
        if self.keep_results:
            self.results.append(GateResult(*(t.detach().cpu() for t in result)))

    @property
    def fire_rate(self) -> float:
        return self.fired / self.tokens if self.tokens else 0.0


_NO_CHOICE = object()  # `_Routing.choice` outside any `handle.using()` block


class _Routing:
    """Shared by every NKVLinear of one model: the active per-row choice and where each name lives."""

    def __init__(self) -> None:
        self.choice: Any = _NO_CHOICE  # a name or None for every row, or a tuple with one per row
        self.modules: dict[str, NKVLinear] = {}  # adapter name -> the module holding its rows

    def check_known(self, choice: Any) -> None:
        wanted = choice if isinstance(choice, tuple) else (choice,)
        unknown = sorted({n for n in wanted if n is not None and n not in self.modules})
        if unknown:
            attached = ", ".join(repr(n) for n in self.modules) or "none"
            raise NKVError(f"no NKV adapter named {', '.join(map(repr, unknown))} is attached to this model; "
                           f"attached: {attached} (None = the base model for that row)")

    def row_count_error(self, rows: int) -> NKVError:
        n = len(self.choice)
        hint = "pass one name (or None) per batch row"
        if rows > n and rows % n == 0:
            k = rows // n
            hint = (f"generate() with num_beams={k} or num_return_sequences={k} repeats each prompt {k} times in "
                    f"a row: pass one name per expanded row, e.g. handle.using([n for n in names for _ in range({k})])")
        return NKVError(f"handle.using() was given {n} adapter names, one per batch row, but the batch has "
                        f"{rows} rows; {hint}")

    def check_batch(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """Model forward pre-hook: the batch has one row per name (also for families that
        flatten (B, T) before the FFN, where the layer alone cannot tell rows from tokens)."""
        if not isinstance(self.choice, tuple):
            return None
        rows = kwargs.get("input_ids", args[0] if args else None)
        rows = kwargs.get("inputs_embeds") if rows is None else rows
        if isinstance(rows, torch.Tensor) and rows.dim() >= 2 and rows.shape[0] != len(self.choice):
            raise self.row_count_error(rows.shape[0])
        return None


class _Resident(nn.Module):
    """One adapter in an NKVLinear: rows [start, start + n_facts) of the shared table, its
    own gamma and its own sketch (spec §5.1; used from SKETCH_MIN_FACTS facts up)."""

    def __init__(self, name: str, adapter: NKVAdapter, start: int, device: torch.device,
                 compute_dtype: torch.dtype):
        super().__init__()
        self.name, self.adapter, self.start, self.compute_dtype = name, adapter, start, compute_dtype
        self.register_buffer("gamma", torch.tensor(float(adapter.gamma), device=device), persistent=False)
        self.shortlist = 0
        self.register_buffer("sketch_proj", None, persistent=False)  # (d_key, d_sketch) float32
        self.register_buffer("sketch_keys", None, persistent=False)  # (n_facts, d_sketch + 1): sketch, rest norm

    @property
    def n_facts(self) -> int:
        return self.adapter.n_facts

    def sketch(self) -> Sketch | None:
        return Sketch(self.sketch_proj, self.sketch_keys, self.shortlist, self.compute_dtype) if self.shortlist else None

    def row_range(self) -> RowRange:
        return RowRange(self.start, self.n_facts, float(self.gamma), self.sketch())


class _Pending:
    """The rows an NKVLinear gated in this forward, on their way to its block's NKVOutNorm."""

    delta: torch.Tensor | None = None


class NKVOutNorm(nn.Module):
    """The block's FFN-output norm plus the rows its layer's NKVLinear gated (site "out_norm")."""

    def __init__(self, base_layer: nn.Module, pending: _Pending):
        super().__init__()
        self.base_layer = base_layer
        self.pending = pending

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        delta, self.pending.delta = self.pending.delta, None
        if delta is not None and delta.shape != out.shape:
            raise NKVError(f"NKVOutNorm got rows of shape {list(delta.shape)} for an output of shape "
                           f"{list(out.shape)}: the norm was called on something other than this block's FFN output")
        return out if delta is None else out + delta.to(out.dtype)


class NKVLinear(nn.Module):
    """The output projection plus the NKV gate; shapes (..., d_key) -> (..., d_model).

    Holds one adapter, or several named ones in one table (`add`); with several, a choice
    made by `NKVHandle.using` says which adapter each batch row is gated against. With a
    `pending` (site "out_norm") the rows go to the block's NKVOutNorm, not into the output.
    """

    def __init__(self, base_layer: nn.Module, adapter: NKVAdapter, dtype: torch.dtype, device: torch.device,
                 name: str = DEFAULT_NAME, routing: _Routing | None = None, shortlist: int = DEFAULT_SHORTLIST):
        super().__init__()
        self.base_layer = base_layer
        self.compute_dtype = dtype  # the activations'; the exact path scores in it
        sketch = adapter.n_facts >= SKETCH_MIN_FACTS
        # Cast once here, never per call (the sketch path casts only its candidates, see
        # _table_dtype). Norms from the stored keys, before any rounding (x sign rows' score weights, spec §4.4).
        table = self._table_dtype(adapter.keys.dtype, every_resident_sketched=sketch)
        self.register_buffer("nkv_keys", adapter.keys.to(device=device, dtype=table), persistent=False)
        self.register_buffer("nkv_key_inv_norms", adapter.score_inverse_norms().to(device), persistent=False)
        self.register_buffer("nkv_residuals", adapter.residuals.to(device=device, dtype=table), persistent=False)
        self.nkv_residents = nn.ModuleList([_Resident(name, adapter, 0, device, dtype)])
        self.routing = routing if routing is not None else _Routing()
        self.path = ""  # where attach put it in the model
        self.site = adapter.residual_site
        self.pending: _Pending | None = None  # set by attach for site "out_norm"
        self.norm_path = ""  # where attach put the NKVOutNorm
        self._score_workspaces: dict[int, torch.Tensor] = {}  # thread id -> the sketch path's score buffer
        self.use_sketch(adapter, shortlist if sketch else 0, name=name)
        self.enabled = True
        self.recorders: list[GateActivity] = []

    # -- the residents
    @property
    def names(self) -> list[str]:
        return [r.name for r in self.nkv_residents]

    def resident(self, name: str | None = None) -> _Resident:
        """The adapter called `name`; None: the only one (an error when several are resident)."""
        if name is None and len(self.nkv_residents) == 1:
            return self.nkv_residents[0]
        for r in self.nkv_residents:
            if r.name == name:
                return r
        raise NKVError(f"no adapter named {name!r} in this layer's NKV module; it holds {self.names}")

    # One-adapter views, as before several adapters could share a module.
    @property
    def nkv_gamma(self) -> torch.Tensor:
        return self.resident().gamma

    @property
    def shortlist(self) -> int:
        return self.resident().shortlist

    @property
    def nkv_sketch_proj(self) -> torch.Tensor | None:
        return self.resident().sketch_proj

    @property
    def nkv_sketch_keys(self) -> torch.Tensor | None:
        return self.resident().sketch_keys

    @property
    def fact_ids(self) -> list[str]:
        return self.resident().adapter.ids

    def _table_dtype(self, rows_dtype: torch.dtype, every_resident_sketched: bool) -> torch.dtype:
        """The dtype the shared table holds: the rows' own (the file's) while every resident
        adapter takes the sketch path and the rows are no wider than the activations, since
        that path casts only the candidates it gathers (Sketch.rows_dtype): attaching 1M fp16
        rows to a float32 model then copies nothing (the cast took 16 of 40 s; benchmarks/scale).
        Else the activations' dtype, cast once: the exact path multiplies the whole table."""
        narrow = rows_dtype.itemsize <= self.compute_dtype.itemsize
        return rows_dtype if every_resident_sketched and narrow else self.compute_dtype

    @torch.no_grad()
    def _retable(self) -> None:
        """Cast the table to the activations' dtype once a resident takes the exact path."""
        want = self._table_dtype(self.nkv_keys.dtype, all(r.shortlist for r in self.nkv_residents))
        if self.nkv_keys.dtype != want:
            self.nkv_keys, self.nkv_residuals = self.nkv_keys.to(want), self.nkv_residuals.to(want)

    @torch.no_grad()
    def add(self, adapter: NKVAdapter, name: str, shortlist: int = DEFAULT_SHORTLIST) -> None:
        """Append `adapter`'s rows to the shared table under `name` (the caller checked its base model)."""
        assert name not in self.names, name
        start, device = self.nkv_keys.shape[0], self.nkv_keys.device
        if adapter.keys.dtype != self.nkv_keys.dtype:  # never round rows to another file's dtype
            self.nkv_keys, self.nkv_residuals = self.nkv_keys.to(self.compute_dtype), self.nkv_residuals.to(self.compute_dtype)
        dtype = self.nkv_keys.dtype
        self.nkv_keys = torch.cat([self.nkv_keys, adapter.keys.to(device=device, dtype=dtype)])
        self.nkv_key_inv_norms = torch.cat([self.nkv_key_inv_norms, adapter.score_inverse_norms().to(device)])
        self.nkv_residuals = torch.cat([self.nkv_residuals, adapter.residuals.to(device=device, dtype=dtype)])
        self.nkv_residents.append(_Resident(name, adapter, start, device, self.compute_dtype))
        self.use_sketch(adapter, shortlist if adapter.n_facts >= SKETCH_MIN_FACTS else 0, name=name)

    @torch.no_grad()
    def remove(self, name: str) -> None:
        """Drop `name`'s rows from the table; the adapters after it move up."""
        i = self.names.index(name)
        gone = self.nkv_residents[i]
        stop = gone.start + gone.n_facts
        for t in ("nkv_keys", "nkv_key_inv_norms", "nkv_residuals"):
            rows = getattr(self, t)
            setattr(self, t, torch.cat([rows[: gone.start], rows[stop:]]))
        for later in self.nkv_residents[i + 1 :]:
            later.start -= gone.n_facts
        del self.nkv_residents[i]

    @torch.no_grad()
    def use_sketch(self, adapter: NKVAdapter, shortlist: int, name: str | None = None,
                   table_dtype: torch.dtype | None = None) -> None:
        """Gate adapter `name` (None: the only one) by the sketch path (spec §5.1) with
        `shortlist` candidates per token, or exactly (0).

        Attach picks it from SKETCH_MIN_FACTS facts up; the projection is the file's
        `nkv.sketch.proj`, else fitted to the keys here. `table_dtype`: the key sketches'
        dtype, None = the activations'. bfloat16 sketches of float32 keys make the shortlist's product
        faster on a CPU with bf16 units but round the bound, so a few more best rows miss the
        shortlist (SmolLM2 at 200k facts: forward 1.66x -> 1.50x the unedited time, edit-prompt
        recall 99.925% -> 99.875%; benchmarks/scale), so it is not the default.
        """
        r = self.resident(name)
        r.shortlist = shortlist
        self._retable()
        self._score_workspaces = {}  # sized for the old tables
        if not shortlist:
            r.register_buffer("sketch_proj", None, persistent=False)
            r.register_buffer("sketch_keys", None, persistent=False)
            return
        proj = adapter.sketch_projection()
        device = self.nkv_keys.device
        r.register_buffer("sketch_proj", proj.to(device), persistent=False)  # (d_key, d_sketch) float32
        inv = self.nkv_key_inv_norms[r.start : r.start + r.n_facts].cpu()
        dtype = table_dtype or self.compute_dtype
        r.register_buffer("sketch_keys", adapter.key_sketches(proj, inv).to(device, dtype),
                          persistent=False)  # (n_facts, d_sketch + 1): sketch, rest norm

    # -- the forward pass
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.pending is not None:  # nothing left over from a forward that stopped before the norm
            self.pending.delta = None
        if not self.enabled:
            return out
        route = self.route(x)
        result = self.gate(x) if route is None else self.gate_routed(x, route)
        for recorder in self.recorders:  # empty on the normal path: no host sync
            self._record(recorder, result, route)
        if self.pending is not None:  # added after the block's FFN-output norm
            self.pending.delta = result.delta
            return out
        return out + result.delta.to(out.dtype)

    def route(self, x: torch.Tensor) -> torch.Tensor | None:
        """(N,) int64 per token of x: the index of its adapter in `nkv_residents`, -1 = none.

        None when no choice is active and one adapter is resident: every token is gated
        against it, as with a single adapter. Several resident and no choice is an error.
        A choice per row maps batch row b to every token of row b: x is (B, T, d_key), or
        (B * T, d_key) in families that flatten tokens before the FFN (OPT), row-major.
        """
        choice, names = self.routing.choice, self.names
        if choice is _NO_CHOICE:
            if len(names) == 1:
                return None
            layer = self.nkv_residents[0].adapter.layer
            raise NKVError(
                f"{len(names)} NKV adapters are attached at layer {layer} ({', '.join(names)}) and none was "
                "chosen; choose one per batch row with `with handle.using(['name', None, ...]):` (None = base "
                "model for that row), or one for every row with `handle.using('name')`")
        self.routing.check_known(choice)  # still attached (an unload inside the block)?
        n_tokens = x.shape[:-1].numel()
        if not isinstance(choice, tuple):  # one name (or None) for every row
            return torch.full((n_tokens,), _index(names, choice), dtype=torch.int64, device=x.device)
        n_rows = len(choice)
        if (x.dim() > 2 and x.shape[0] != n_rows) or n_tokens % n_rows:
            raise self.routing.row_count_error(x.shape[0] if x.dim() > 2 else n_tokens)
        per_row = torch.tensor([_index(names, n) for n in choice], dtype=torch.int64, device=x.device)  # (B,)
        return per_row.repeat_interleave(n_tokens // n_rows)  # (B * T,)

    def gate(self, x: torch.Tensor) -> GateResult:
        """nkv_gate over x against the one resident adapter, in row blocks so the op's largest
        blocks (rows x facts scores; the sketch path's scores and candidate rows, spec §5.1)
        stay under SCORE_BUDGET."""
        n_facts, d_key = self.nkv_keys.shape
        fact_chunk = min(DEFAULT_FACT_CHUNK, max(n_facts, 1))
        rows = x.reshape(-1, x.shape[-1])  # (N, d_key)
        r = self.resident()
        row_chunk = max(1, SCORE_BUDGET // _per_row(fact_chunk, r.shortlist, d_key))
        if r.shortlist:  # score as many sketches at once as the budget allows for these rows: each top-k
            # call costs ~60 us per token row whatever its length: at 200k facts and 256 tokens the
            # shortlist took 333-439 ms in 12,288-score chunks and 324-360 ms in these, before the
            # kept score buffer (benchmarks/scale/gate_parts.py, session 13)
            fact_chunk = max(fact_chunk, min(n_facts, SCORE_BUDGET // max(1, min(rows.shape[0], row_chunk))))
        block = min(rows.shape[0], row_chunk)
        sketch = _grouped(r.sketch(), block, d_key)
        workspace = self._score_workspace(shortlist_scores(block, n_facts, fact_chunk, r.shortlist, d_key),
                                          x.device) if sketch is not None and sketch.keys.dtype == torch.float32 else None
        parts = [
            nkv_gate(rows[i : i + row_chunk], self.nkv_keys, self.nkv_key_inv_norms, self.nkv_residuals,
                     r.gamma, fact_chunk=fact_chunk, sketch=sketch, workspace=workspace)
            for i in range(0, max(rows.shape[0], 1), row_chunk)
        ]
        return _merged(parts, x.shape[:-1])

    def _score_workspace(self, values: int, device: torch.device) -> torch.Tensor | None:
        """This thread's buffer for the sketch path's score chunks on a CPU, kept between calls.

        At 256 tokens a chunk of scores is 134 MB, and a fresh one per call is faulted in page
        by page: the shortlist over 200k facts took 326-360 ms that way and 245-270 ms into a
        kept buffer (benchmarks/scale/gate_parts.py, shortlist_budget_chunk[_workspace]). It is at most SCORE_BUDGET floats per thread
        and module; one per thread, so concurrent forwards never share it. CUDA's caching
        allocator already reuses its blocks: None there."""
        if device.type != "cpu":
            return None
        me = threading.get_ident()
        buf = self._score_workspaces.get(me)
        if buf is None or buf.numel() < values:
            alive = {t.ident for t in threading.enumerate()}
            self._score_workspaces = {k: v for k, v in self._score_workspaces.items() if k in alive}  # drop ended threads'
            buf = self._score_workspaces[me] = torch.empty(values, dtype=torch.float32, device=device)
        return buf

    def gate_routed(self, x: torch.Tensor, route: torch.Tensor) -> GateResult:
        """nkv_gate_routed over x: token t against the rows of adapter route[t] only (-1 = none);
        row blocks as in `gate`. `index` is a row of the shared table."""
        ranges = [r.row_range() for r in self.nkv_residents]
        d_key = self.nkv_keys.shape[1]
        fact_chunk = min(DEFAULT_FACT_CHUNK, max([r.n_facts for r in ranges] + [1]))
        shortlist = max(r.sketch.shortlist if r.sketch else 0 for r in ranges)
        rows = x.reshape(-1, x.shape[-1])  # (N, d_key)
        row_chunk = max(1, SCORE_BUDGET // _per_row(fact_chunk, shortlist, d_key))
        # a block's tokens bound each adapter's share of them: a group sized for them fits the cache
        ranges = [r._replace(sketch=_grouped(r.sketch, min(rows.shape[0], row_chunk), d_key)) for r in ranges]
        parts = [
            nkv_gate_routed(rows[i : i + row_chunk], route[i : i + row_chunk], ranges, self.nkv_keys,
                            self.nkv_key_inv_norms, self.nkv_residuals, fact_chunk=fact_chunk)
            for i in range(0, max(rows.shape[0], 1), row_chunk)
        ]
        return _merged(parts, x.shape[:-1])

    def _record(self, recorder: GateActivity, result: GateResult, route: torch.Tensor | None) -> None:
        if recorder.adapter not in self.names:  # unloaded while recording
            return
        if route is None:  # the one resident adapter saw every token
            recorder.update(result)
            return
        i = self.names.index(recorder.adapter)
        recorder.update(result, (route == i).reshape(result.fired.shape), self.nkv_residents[i].start)


def _grouped(sketch: Sketch | None, rows: int, d_key: int) -> Sketch | None:
    """The sketch with its rescoring group sized for calls on `rows` tokens (this loader runs eagerly)."""
    return sketch._replace(group=rescore_group(rows, d_key, sketch.shortlist)) if sketch is not None else None


def _per_row(fact_chunk: int, shortlist: int, d_key: int) -> int:
    """Floats nkv_gate holds at once per token row: a chunk of scores, or on the sketch path
    (shortlist > 0) its chunk of sketch scores, as large as a group of rescored rows."""
    return shortlist_chunk(fact_chunk, shortlist, d_key) if shortlist else fact_chunk


def _index(names: list[str], name: str | None) -> int:
    """Position of `name` among a module's residents; -1 for None or an adapter at another layer."""
    return names.index(name) if name in names else -1


def _merged(parts: list[GateResult], lead: torch.Size) -> GateResult:
    merged = parts[0] if len(parts) == 1 else GateResult(*(torch.cat(ts) for ts in zip(*parts)))
    return GateResult(merged.delta.reshape(*lead, -1), *(t.reshape(lead) for t in merged[1:]))


def _routing_of(model: nn.Module) -> _Routing | None:
    """The routing shared by the model's NKV modules, None when none is attached."""
    return next((m.routing for m in model.modules() if isinstance(m, NKVLinear) and m.names), None)


def _normalised(adapters: AdapterChoice) -> Any:
    if adapters is None or isinstance(adapters, str):
        return adapters
    if isinstance(adapters, Sequence) and adapters and all(a is None or isinstance(a, str) for a in adapters):
        return tuple(adapters)
    raise NKVError(f"handle.using() takes an adapter name, None, or a non-empty list with one name (or None) "
                   f"per batch row; got {adapters!r}")


class NKVHandle:
    """What `load_nkv_adapter` returns for a transformers model: one attached adapter.

    >>> handle = load_nkv_adapter(model, "edits.nkv")
    >>> with handle.disabled(): base_out = model(**inputs)   # adapter off temporarily
    >>> with handle.record() as activity: model(**inputs)    # which facts fired
    >>> handle.detach()                                      # original module restored

    Several named adapters, chosen per batch row (None = base model for that row):

    >>> prices = load_nkv_adapter(model, "prices.nkv", name="prices")
    >>> load_nkv_adapter(model, "org.nkv", name="org")
    >>> with prices.using(["prices", None, "org"]): model.generate(**batch)
    """

    def __init__(self, model: nn.Module, adapter: NKVAdapter, module: NKVLinear, path: str,
                 name: str = DEFAULT_NAME):
        self.model = model
        self.adapter = adapter
        self.module = module
        self.path = path
        self.name = name

    @property
    def facts(self) -> list[Fact]:
        return self.adapter.facts

    @property
    def attached(self) -> bool:
        return self.module.routing.modules.get(self.name) is self.module and \
            self.module.resident(self.name).adapter is self.adapter

    @property
    def info(self) -> dict[str, Any]:
        a = self.adapter
        return {"name": self.name, "n_facts": a.n_facts, "layer": a.layer, "gamma": a.gamma, "module": self.path,
                "base": a.base.name, "attached": self.attached, "enabled": self.module.enabled}

    @property
    def adapters(self) -> dict[str, dict[str, Any]]:
        """Every adapter attached to the model, by name: {"n_facts", "gamma", "layer"}."""
        routing = _routing_of(self.model)
        out = {}
        for name, module in (routing.modules.items() if routing else ()):
            a = module.resident(name).adapter
            out[name] = {"n_facts": a.n_facts, "gamma": a.gamma, "layer": a.layer}
        return out

    def detach(self) -> nn.Module:
        """Remove this handle's adapter; its layer gets the original projection back when no
        other adapter is left there. Returns the model."""
        if self.attached:
            _unload(self.model, self.module.routing, self.name)
        return self.model

    def unload(self, name: str | None = None) -> nn.Module:
        """Remove the adapter called `name` (any layer; None: this handle's, as `detach`).

        Raises:
            NKVError: no adapter of that name is attached (the message lists those that are).
        """
        if name is None:
            return self.detach()
        routing = _routing_of(self.model)
        if routing is None or name not in routing.modules:
            attached = ", ".join(map(repr, routing.modules)) if routing else "none"
            raise NKVError(f"cannot unload {name!r}: no NKV adapter of that name is attached; attached: {attached}")
        _unload(self.model, routing, name)
        return self.model

    @contextlib.contextmanager
    def using(self, adapters: AdapterChoice) -> Iterator[None]:
        """Choose the adapter of every batch row inside the block, like PEFT's `adapter_names=`.

        Args:
            adapters: a list with one name (or None = the base model) per batch row, or one
                name (or None) for every row. It applies to every layer: a row named
                "prices" is gated against "prices" where it is attached, and left alone
                at other layers. generate(num_beams=k / num_return_sequences=k) runs k
                rows per prompt: give one name per expanded row.
        Raises:
            NKVError: a name is not attached (at once); the batch's row count differs from
                the list's length (at forward time).

        >>> with handle.using(["prices", None, "org"]): out = model.generate(**batch)  # 3 rows
        """
        routing = _routing_of(self.model)
        if routing is None:
            raise NKVError("handle.using(): no NKV adapter is attached to this model any more")
        choice = _normalised(adapters)
        routing.check_known(choice)
        previous, routing.choice = routing.choice, choice
        hook = self.model.register_forward_pre_hook(routing.check_batch, with_kwargs=True)
        try:
            yield
        finally:
            hook.remove()
            routing.choice = previous

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run without NKV at this handle's layer inside the block (every adapter there is off,
        so with one adapter attached the outputs equal the base model)."""
        previous = self.module.enabled
        self.module.enabled = False
        try:
            yield
        finally:
            self.module.enabled = previous

    @contextlib.contextmanager
    def record(self, keep_results: bool = False) -> Iterator[GateActivity]:
        """Count this adapter's gate fires per fact id (and keep the layer's per-token
        index/score/fired if asked) inside the block; see GateActivity."""
        activity = GateActivity(self.adapter.ids, keep_results=keep_results, adapter=self.name)
        self.module.recorders.append(activity)
        try:
            yield activity
        finally:
            self.module.recorders.remove(activity)

    def __repr__(self) -> str:
        return f"NKVHandle({self.info})"


def attach(model: nn.Module, adapter: AdapterSource, *, revision: str | None = None,
           strict: bool = True, gamma: float | None = None, name: str | None = None,
           shortlist: int = DEFAULT_SHORTLIST) -> NKVHandle:
    """Attach an adapter to a transformers causal LM (see `nkv.load_nkv_adapter`).

    `gamma` overrides the adapter's threshold (a number in [0, 1]). `shortlist`: candidates
    per token the sketch path (from SKETCH_MIN_FACTS facts) rescores exactly; 256 instead of
    the default 128 kept the exact decision on >= 99.9% of every kind of token from 100k to
    1M real-like SmolLM2 keys, at 7.5% more forward time at 200k (benchmarks/scale). `name` lets several
    adapters share a layer (one table, each with its own gamma and sketch), chosen per batch
    row with `handle.using`. Without a name the adapter is called "default" ("default-<layer>"
    when "default" is taken at another layer) and its layer must hold no adapter yet.

    Raises:
        NKVUnsupportedModelError: the architecture is not in the table.
        NKVCompatibilityError: layer count or widths differ from the adapter's base model,
            an adapter of that name is already attached, or (without a name) an adapter is
            already attached at that layer.
        NKVFingerprintError: different checkpoint (a warning instead when strict=False).
    """
    if name is not None and (not isinstance(name, str) or not name):
        raise NKVError(f"load_nkv_adapter(name=...) must be a non-empty string; got {name!r}")
    if gamma is not None:
        gamma = check_gamma(gamma, "load_nkv_adapter(gamma=...)")
    shortlist = check_shortlist(shortlist, "load_nkv_adapter(shortlist=...)")
    adapter = resolve_adapter(adapter, revision=revision, lazy_facts=True)  # records parsed when read (spec §7)
    if gamma is not None:
        adapter = adapter.with_gamma(gamma)
    spec = arch_spec(model_type_of(model))
    check_base(model, adapter, strict=strict)
    if adapter.residual_site == "out_norm" and not spec.out_norm:
        raise NKVUnsupportedModelError(
            f"the adapter adds its rows after the FFN-output norm (residual site 'out_norm', spec §5), which "
            f"{model_type_of(model)!r} blocks do not have in this version's architecture table")
    if adapter.residual_site == "output" and spec.out_norm:
        warnings.warn(
            f"this adapter adds its rows to {spec.out_proj}'s output, before {model_type_of(model)!r}'s FFN-output "
            f"norm, which rescales them (built before NKV format 2.0): it is applied as built, but such rows edit "
            "poorly; rebuild it with `nkv build` to add them after the norm (spec §5)", stacklevel=2)
    path = spec.module_path(adapter.layer)
    target = output_projection(model, adapter.layer)
    routing = _routing_of(model) or _Routing()
    if name is None:
        if isinstance(target, NKVLinear):
            # Unnamed adapters keep the one-adapter-per-layer rule: one argmax over one table.
            raise NKVCompatibilityError(
                f"an NKV adapter is already attached at {path}; merge the two first "
                "(`nkv merge A B -o AB.nkv` or NKVAdapter.merge) or detach the first handle, or attach each "
                "with name= to hold several at one layer and choose per batch row with handle.using()")
        name = DEFAULT_NAME if DEFAULT_NAME not in routing.modules else f"{DEFAULT_NAME}-{adapter.layer}"
    if name in routing.modules:
        held = routing.modules[name].resident(name).adapter.layer
        raise NKVCompatibilityError(
            f"an NKV adapter named {name!r} is already attached (layer {held}); unload it first "
            f"(handle.unload({name!r})) or attach this one under another name")
    if isinstance(target, NKVLinear):
        if target.site != adapter.residual_site:
            raise NKVCompatibilityError(
                f"{name!r} adds its rows at residual site {adapter.residual_site!r} but the adapters already at "
                f"{path} add theirs at {target.site!r} (spec §5); rebuild it with this version of nkv")
        module = target
        module.add(adapter, name, shortlist)
    else:
        weight = target.weight
        dtype = weight.dtype if weight.is_floating_point() else getattr(model, "dtype", torch.float32)
        module = NKVLinear(target, adapter, dtype=dtype, device=weight.device, name=name, routing=routing,
                           shortlist=shortlist)
        module.path = path
        if adapter.residual_site == "out_norm":
            module.pending = _Pending()
            module.norm_path = spec.out_norm_path(adapter.layer)
            _set_submodule(model, module.norm_path, NKVOutNorm(residual_module(model, adapter.layer), module.pending))
        _set_submodule(model, path, module)
    routing.modules[name] = module
    return NKVHandle(model, adapter, module, path, name)


def _unload(model: nn.Module, routing: _Routing, name: str) -> None:
    module = routing.modules.pop(name)
    module.remove(name)
    if not module.names:  # the last one: the original projection (and norm) go back
        _set_submodule(model, module.path, module.base_layer)
        if module.norm_path:
            _set_submodule(model, module.norm_path, model.get_submodule(module.norm_path).base_layer)


def check_base(model: nn.Module, adapter: NKVAdapter, strict: bool = True) -> None:
    """Compare the model with the adapter's recorded base model (the rules live in nkv.compat)."""
    expected, layer = adapter.base, adapter.layer
    model_type, n_layers = model_type_of(model), len(blocks(model))
    same_layout = model_type == expected.model_type and n_layers == expected.n_layers
    if same_layout:
        refuse_quantized(model, layer)
    weight = projection_weight(model, layer).detach() if same_layout else None
    d_model, d_key = weight.shape if weight is not None else (0, 0)
    check_shape(expected, layer, model_type=model_type, n_layers=n_layers, d_model=d_model, d_key=d_key)
    if expected.fingerprint.startswith(FINGERPRINT2_PREFIX):
        got = model_fingerprint(model, layer)
    else:  # an nkvfp1 adapter is checked exactly as before nkvfp2: the one projection
        got = compute_fingerprint(weight)
    check_fingerprint(expected, layer, got, strict=strict, stacklevel=3)


def quantization_method(model_or_config: Any) -> str | None:
    """The `quant_method` of a model's (or config's) `quantization_config`, or None."""
    config = getattr(model_or_config, "config", model_or_config)
    qc = getattr(config, "quantization_config", None)
    if not qc:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method) or "unknown method")


def refuse_quantized(model: nn.Module, layer: int) -> None:
    """NKVUnsupportedModelError unless layer `layer`'s output projection holds a float weight.

    bitsandbytes int8/4-bit layers hold integer weights, GPTQ and AWQ layers packed `qweight`s
    and no `weight`: the gate's fingerprint and dtype come from the float weight, so such a
    layer is refused by name instead of failing as "wrong checkpoint" or AttributeError.
    (A dequantized model, such as a .gguf file transformers loaded, has float weights: fine.)
    """
    module = output_projection(model, layer)
    module = getattr(module, "base_layer", module)
    weight = getattr(module, "weight", None)
    packed = hasattr(module, "qweight") or not isinstance(weight, torch.Tensor) or not weight.is_floating_point()
    if packed:
        method = quantization_method(model) or type(module).__name__
        raise NKVUnsupportedModelError(
            f"the model is quantized ({method}): layer {layer}'s output projection is a {type(module).__name__} "
            "without a float weight, which NKV needs to check the base model and to gate; bitsandbytes, GPTQ "
            "and AWQ layers are not supported. Load the unquantized checkpoint (e.g. dtype=torch.bfloat16) "
            "to attach or build adapters")


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


__all__ = ["attach", "check_base", "refuse_quantized", "quantization_method", "NKVHandle", "NKVLinear", "NKVOutNorm",
           "GateActivity", "AdapterChoice", "DEFAULT_NAME"]
