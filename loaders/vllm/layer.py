"""`NKVGatedProjection`: vLLM's row-parallel FFN output projection plus the NKV gate.

Wrap, don't patch: the projection (a `RowParallelLinear`, already loaded and processed)
is kept as `base_layer`; forward returns what it returns, with `nkv_gate(...).delta`
added to the reduced output. The module is put in place while vLLM loads the model,
before compilation, so it is traced into the compiled graph.

Buffers have a fixed size (`capacity` rows) chosen at start-up. Loading an adapter
copies its rows into them in place (`copy_`), which a compiled graph (and a CUDA graph,
which holds buffer addresses) keeps seeing; unused rows are padding: zero key, zero
residual, inverse norm 0. A padding row scores 0: it can win the argmax (when no real
row scores above 0) but never fires, since 0 never exceeds γ >= 0, and its residual is zero.

Named adapters (`max_adapters` > 0): several adapters share the `capacity` rows, each a
contiguous range, and every request chooses one or none. The worker's model runner
writes each token's adapter index into `nkv_route` before every step (router.py); the
gate then scores each token against its own adapter's rows only (`nkv_gate_routed`).
That grouping reads the routing on the host, so it runs inside one opaque custom op
(`nkv::routed_delta`), as vLLM runs attention: compiled graphs call it, never trace it.
The engine-wide adapter, when loaded, is one more range, used by requests that name none.

Sketch path (spec §5.1): with `sketch` on (by default from SKETCH_MIN_FACTS rows of
capacity up), the module also holds the keys' sketches and each adapter's projection
(the file's `nkv.sketch.proj`, else fitted at load), copied in place like the rows; the
gate then shortlists by sketch and rescores exactly. Named adapters take it from
SKETCH_MIN_FACTS facts each (or always, with `sketch: true`).

Residual site "out_norm" (Gemma 2/3: the block normalises the FFN's output before the
residual stream, spec §5): the rows are added after that norm. The gated module then writes
them into a preallocated `nkv_pending` buffer (max_tokens rows) instead of its output, and
`NKVOutNorm`, wrapped around the norm, adds them to the norm's output: in-place buffer
writes, so compiled and CUDA graphs keep both.

Tensor parallel: rank r sees the key slice `x[:, r*d/tp:(r+1)*d/tp]` and a replicated,
already reduced output. Its keys buffer holds the same column slice of K1, the inverse
norms are those of the *full* rows, and `nkv_gate` all-reduces the partial dot products
and squared norms before the argmax, so every rank picks the same fact; every rank then
adds that residual to its (identical) reduced output.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from nkv.adapter import NKVAdapter
from nkv.compat import check_gamma
from nkv.errors import NKVError
from nkv.constants import DEFAULT_SHORTLIST, DEFAULT_SKETCH_DIM, SKETCH_MIN_FACTS
from nkv.gate import RowRange, Sketch, nkv_gate, nkv_gate_routed

from .slot import SlotInfo

# The gated modules of this process by "<module path>@rank<r>", for the opaque op (a compiled
# graph can hold a string, not a module). The key is the same in every run of the same
# engine, so a compiled graph loaded from vLLM's cache finds the module of the engine now
# running; the rank keeps ranks that share a process (tests) apart.
_ROUTED: dict[str, "NKVGatedProjection"] = {}


@torch.library.custom_op("nkv::routed_delta", mutates_args=())
def routed_delta(x: torch.Tensor, route: torch.Tensor, key: str) -> torch.Tensor:
    """(num_tokens, d_key / tp) -> (num_tokens, d_model): each token's residual from its own adapter."""
    return _ROUTED[key].routed_delta(x, route)


@routed_delta.register_fake
def _(x: torch.Tensor, route: torch.Tensor, key: str) -> torch.Tensor:
    residuals = _ROUTED[key].nkv_residuals
    return x.new_empty((x.shape[0], residuals.shape[1]), dtype=residuals.dtype)


class NKVGatedProjection(nn.Module):
    """(num_tokens, d_key / tp) -> what `base_layer` returns, plus the gated residual."""

    def __init__(self, base_layer: nn.Module, slot: SlotInfo, *, dtype: torch.dtype, device: torch.device,
                 fact_chunk: int, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None,
                 max_tokens: int = 0, sketch: bool | None = None, shortlist: int = DEFAULT_SHORTLIST) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slot = slot
        self.fact_chunk = fact_chunk
        self.d_key_local = slot.d_key // slot.tp_size
        self.col_start = slot.tp_rank * self.d_key_local
        # Static Python facts, read while tracing; never branch on tensor values here.
        self._all_reduce = all_reduce if slot.tp_size > 1 else None
        self._return_bias = bool(getattr(base_layer, "return_bias", False))
        # An unreduced output (reduce_results=False) is summed over ranks later, so only
        # rank 0 may add the residual there; a reduced one is replicated, so every rank does.
        reduced = bool(getattr(base_layer, "reduce_results", True)) or slot.tp_size == 1
        self._add_delta = reduced or slot.tp_rank == 0
        cap = slot.capacity
        self.register_buffer("nkv_keys", torch.zeros(cap, self.d_key_local, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("nkv_key_inv_norms", torch.zeros(cap, dtype=torch.float32, device=device),
                             persistent=False)
        self.register_buffer("nkv_residuals", torch.zeros(cap, slot.d_model, dtype=dtype, device=device),
                             persistent=False)
        # gamma is a buffer, not a Python float: a float would be baked into the graph.
        self.register_buffer("nkv_gamma", torch.tensor(1.0, dtype=torch.float32, device=device),
                             persistent=False)
        # Sketch path: static (decided here), so the compiled graph has one shape.
        self.sketch_mode = sketch  # True: always; None: from SKETCH_MIN_FACTS rows; False: exact only
        self.sketched = sketch is True or (sketch is None and cap >= SKETCH_MIN_FACTS)
        d_sketch = min(DEFAULT_SKETCH_DIM, slot.d_key) if self.sketched else 0
        self.register_buffer("nkv_sketch_proj", torch.zeros(slot.max_adapters + 1, self.d_key_local, d_sketch,
                                                            dtype=torch.float32, device=device), persistent=False)
        # each row's sketch and the norm of its rest (gate.sketch_keys): d_sketch + 1 columns
        self.register_buffer("nkv_sketch_keys", torch.zeros(cap if self.sketched else 0, d_sketch + 1, dtype=dtype,
                                                            device=device), persistent=False)
        self.shortlist = min(shortlist, cap) if self.sketched else 0  # static: the graph's top-k width
        self._row_buffers = self._ROWS if self.sketched else self._ROWS[:3]  # what one fact row spans here
        self.slot = _replace(slot, sketch=self.sketched, shortlist=self.shortlist)
        # Named adapters: each token's index into self.ranges (-1 none), written before every step.
        self.routed = slot.max_adapters > 0
        self.register_buffer("nkv_route", torch.full((max_tokens if self.routed else 0,), -1, dtype=torch.int64,
                                                     device=device), persistent=False)
        # Site "out_norm": this step's rows, for NKVOutNorm to add after the norm.
        self.to_norm = slot.residual_site == "out_norm"
        self.register_buffer("nkv_pending", torch.zeros(max_tokens if self.to_norm else 0, slot.d_model, dtype=dtype,
                                                        device=device), persistent=False)
        self.ranges: dict[str | None, RowRange] = {}  # adapter name (None: engine-wide) -> its rows
        self._slots: dict[str | None, int] = {None: 0}  # adapter name -> routing slot (route_of)
        self._by_slot: list[RowRange] = []  # routing slot -> rows (empty ranges for free slots)
        # The engine-wide adapter's live rows, one digest per row; None: not computed yet (a load
        # into empty buffers needs none), computed from the buffers when a change compares rows.
        self._digests: list[bytes] | None = []
        self._op_key = f"{slot.module}@rank{slot.tp_rank}"
        if self.routed:
            _ROUTED[self._op_key] = self
        self.begin()

    def forward(self, x: torch.Tensor) -> Any:
        out = self.base_layer(x)
        y, bias = out if self._return_bias else (out, None)
        # Every rank runs the gate: its all-reduces are collective even where nothing is added.
        if self.routed:
            delta = torch.ops.nkv.routed_delta(x, self.nkv_route, self._op_key)
        else:
            sketch = Sketch(self.nkv_sketch_proj[0], self.nkv_sketch_keys, self.shortlist) if self.sketched else None
            delta = nkv_gate(x, self.nkv_keys, self.nkv_key_inv_norms, self.nkv_residuals, self.nkv_gamma,
                             fact_chunk=self.fact_chunk, all_reduce=self._all_reduce, sketch=sketch).delta
        if self.to_norm:  # every rank: the norm's output is replicated
            torch._check(delta.shape[0] <= self.nkv_pending.shape[0],
                         lambda: "NKV: more tokens in one step than nkv_pending has rows (max_num_batched_tokens)")
            self.nkv_pending[: delta.shape[0]].copy_(delta)
        elif self._add_delta:
            y = y + delta.to(y.dtype)
        return (y, bias) if self._return_bias else y

    def routed_delta(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        """The body of `nkv::routed_delta`: eager, inside the compiled graph's opaque op."""
        if x.shape[0] > route.shape[0]:
            raise NKVError(f"NKV: {x.shape[0]} tokens in one step but routing room for {route.shape[0]}")
        return nkv_gate_routed(x, route, self._by_slot, self.nkv_keys, self.nkv_key_inv_norms, self.nkv_residuals,
                               fact_chunk=self.fact_chunk, all_reduce=self._all_reduce).delta

    def route_of(self, name: str | None) -> int:
        """The routing slot of a request naming `name` (None: the engine-wide adapter; -1: none).

        Slot 0 is the engine-wide adapter's, slots 1..max_adapters the named ones'; a name keeps
        its slot until it is unloaded, so a route written before a change still means the same adapter.
        """
        if name in self.ranges:
            return self._slots[name]
        if name is None:
            return -1
        # The engine core refuses requests for names it does not hold and aborts a name's requests
        # before unloading it, so this is a broken invariant: fail the step rather than serve unedited.
        raise NKVError(f"a request names NKV adapter {name!r}, which this engine does not hold "
                       f"(resident: {sorted(n for n in self.ranges if n is not None)})")

    @torch.no_grad()
    def set_route(self, names: Sequence[str | None], tokens_per_request: np.ndarray) -> None:
        """Write each token's adapter index for the next step: request i's tokens are the next
        `tokens_per_request[i]` positions; positions after the last request get -1."""
        per_request = np.array([self.route_of(n) for n in names], dtype=np.int64)
        route = np.repeat(per_request, tokens_per_request[: len(names)])
        if route.shape[0] > self.nkv_route.shape[0]:
            raise NKVError(f"NKV: {route.shape[0]} tokens in one step but routing room for "
                           f"{self.nkv_route.shape[0]} (max_num_batched_tokens)")
        self.nkv_route[: route.shape[0]].copy_(torch.from_numpy(route))
        self.nkv_route[route.shape[0]:].fill_(-1)

    # ------------------------------------------------------------ changes
    # A change is staged, then committed: `apply_swap` stages on every rank first and
    # commits only when all succeeded, and can roll every rank back (see swap.py).
    # A change writes only what differs: `Writes` lists (buffer, first index along dim 0, values).
    # The engine-wide adapter's rows are compared by a digest per row, so `add`/`remove` on a
    # large adapter copy the rows from the first changed one on, not the whole table; a named
    # adapter goes into a free range (the others stay where they are) and the table is packed
    # only when no free range is large enough. The rows a commit overwrites are kept, so
    # `rollback` restores exactly those.
    _ROWS = ("nkv_keys", "nkv_key_inv_norms", "nkv_residuals", "nkv_sketch_keys")  # one entry per fact row

    def begin(self, change: str | None = None) -> None:
        """Start change `change` (an id): forget the previous change's staged and saved rows."""
        self._change = change
        self._staged: _Change | None = None
        self._previous: _Change | None = None

    @torch.no_grad()
    def stage(self, adapter: NKVAdapter | None, gamma: float | None = None, source: str | None = None,
              revision: str | None = None, digest: str | None = None, name: str | None = None) -> None:
        """Prepare `adapter`'s rows (this rank's key slice) without touching the live buffers;
        None stages an empty table (or unloads `name`). The caller checks compatibility
        (`slot.check_adapter`) and calls `begin`; only invariants that would corrupt memory
        are asserted."""
        self._staged = None
        if self.routed:
            self._stage_routed(adapter, gamma, source, revision, digest, name)
            return
        assert name is None, "named adapters need an engine started with max_adapters > 0"
        n = 0 if adapter is None else adapter.n_facts
        rows = self._rows_of(adapter, 0) if adapter is not None else {}
        live_n = self.slot.n_facts
        digests: list[bytes] | None = None  # into empty buffers every row is written: no digest needed now
        first = 0
        if live_n:  # copy from the first row that differs from the live one on
            live = self._live_digests()
            digests = _row_digests(self._served(rows), n) if n else []
            first = next((i for i in range(min(n, live_n)) if digests[i] != live[i]), min(n, live_n))
        writes: Writes = [(b, first, rows[b][first:]) for b in self._row_buffers if n > first]
        if live_n > n:  # rows no longer used become padding again: zero key, residual and norm
            writes += [(b, n, torch.zeros_like(getattr(self, b)[n:live_n], device="cpu"))
                       for b in self._row_buffers]
        value = 1.0 if adapter is None else check_gamma(adapter.gamma if gamma is None else gamma)
        writes.append(("nkv_gamma", -1, torch.tensor(value)))
        if "proj" in rows:
            writes.append(("nkv_sketch_proj", 0, rows["proj"].unsqueeze(0)))
        loaded = adapter is not None
        info = {"n_facts": n, "gamma": value if loaded else None, "source": source if loaded else None,
                "revision": revision if loaded else None, "digest": digest if loaded else None}
        self._staged = _Change(writes, _replace(self.slot, **info),
                               {} if adapter is None else {None: RowRange(0, n, value)}, {None: 0}, digests)

    def _live_digests(self) -> list[bytes]:
        """The live engine-wide rows' digests, computed from the buffers the first time a change needs them."""
        if self._digests is None:
            self._digests = _row_digests([getattr(self, b) for b in self._row_buffers], self.slot.n_facts)
        return self._digests

    def _stage_routed(self, adapter: NKVAdapter | None, gamma: float | None, source: str | None,
                      revision: str | None, digest: str | None, name: str | None) -> None:
        """Named adapters: `adapter`'s rows under `name` (replacing any it had) go into the first
        free range; the others stay where they are, unless no free range is large enough: then
        the others are packed from row 0 (moved) first. Rows outside every range are never scored."""
        ranges = {kept: r for kept, r in self.ranges.items() if kept != name}
        writes: Writes = []
        n = 0 if adapter is None else adapter.n_facts
        at = _first_fit(ranges.values(), n, self.slot.capacity) if adapter is not None else None
        if adapter is not None and at is None:  # fragmented: pack the others, then append
            packed, at = {}, 0
            for kept, r in ranges.items():
                if r.start != at:
                    rows_of = slice(r.start, r.start + r.n_facts)
                    writes += [(b, at, getattr(self, b)[rows_of].to("cpu", copy=True)) for b in self._row_buffers]
                packed[kept] = r._replace(start=at)
                at += r.n_facts
            ranges = packed
        entries = [e for e in self.slot.named if e["name"] != name]
        default = {k: getattr(self.slot, k) for k in ("n_facts", "gamma", "source", "revision", "digest")}
        slots = {k: i for k, i in self._slots.items() if k is None or k in ranges or k == name}
        info = {"n_facts": 0, "gamma": None, "source": None, "revision": None, "digest": None}
        if adapter is not None:
            if name not in slots:  # a new name takes the lowest free slot; a replaced one keeps its own
                taken = set(slots.values())
                slots[name] = next(i for i in range(1, self.slot.max_adapters + 1) if i not in taken)
            assert at is not None
            rows = self._rows_of(adapter, slots[name])
            writes += [(b, at, rows[b]) for b in self._row_buffers]
            if "proj" in rows:
                writes.append(("nkv_sketch_proj", slots[name], rows["proj"].unsqueeze(0)))
            value = check_gamma(adapter.gamma if gamma is None else gamma)
            ranges[name] = RowRange(at, n, value)
            info = {"n_facts": n, "gamma": value, "source": source, "revision": revision, "digest": digest}
        else:
            slots.pop(name, None)
        if name is None:
            default = info
        elif adapter is not None:
            entries.append({"name": name, **info})
        self._staged = _Change(writes, _replace(self.slot, **default, named=sorted(entries, key=lambda e: e["name"])),
                               ranges, slots, [])

    def _rows_of(self, adapter: NKVAdapter, slot: int) -> dict[str, torch.Tensor]:
        """`adapter`'s rows as this rank holds them (its key slice), on the CPU, in the file's
        dtype: the copy into the buffers casts them (`_write`), into memory already allocated;
        a cast here first allocated a second table (1M rows: 10.8 s of 24 s, most of it page
        faults; benchmarks/scale/attach_file.py --loader vllm). With the sketch path also their
        sketches and "proj", this rank's rows of the projection (for `slot`)."""
        assert adapter.n_facts <= self.slot.capacity and adapter.keys.shape[1] == self.slot.d_key
        rows = {
            "nkv_keys": adapter.keys[:, self.col_start:self.col_start + self.d_key_local],
            # norms of the full stored rows, before any rounding to the serving dtype (x score weights, spec §4.4)
            "nkv_key_inv_norms": adapter.score_inverse_norms(),
            "nkv_residuals": adapter.residuals,
            "nkv_sketch_keys": torch.zeros(adapter.n_facts, self.nkv_sketch_keys.shape[1]),
        }
        if self.sketched and adapter.n_facts:
            proj = adapter.sketch_projection(self.nkv_sketch_proj.shape[2])  # the buffers' width; same on every rank
            rows["nkv_sketch_keys"] = adapter.key_sketches(proj, rows["nkv_key_inv_norms"])
            rows["proj"] = proj[self.col_start:self.col_start + self.d_key_local].contiguous()
        return rows

    def _served(self, rows: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The rows of each row buffer as the buffer holds them (its dtype): what a digest compares."""
        return [rows[b].to(getattr(self, b).dtype) for b in self._row_buffers]

    @torch.no_grad()
    def commit(self, keep_previous: bool = True) -> None:
        """Copy the staged rows into the live buffers (in place: compiled graphs keep seeing them),
        keeping the rows they overwrite until `rollback` or the next change; a change on this rank
        alone (`load`, `clear`) keeps none, having no rollback (at 1M rows a copy of 4.5 GB)."""
        assert self._staged is not None, "commit() without stage()"
        staged = self._staged
        if keep_previous:
            saved = [(b, at, self._at(b, at, len(values) if at >= 0 else 0).to("cpu", copy=True))
                     for b, at, values in staged.writes]
            self._previous = _Change(saved[::-1], self.slot, dict(self.ranges), dict(self._slots), self._digests)
        self._write(*staged)
        self._staged = None

    @torch.no_grad()
    def rollback(self, change: str | None = None) -> None:
        """Undo change `change` on this rank: drop staged rows, put back the rows its commit
        replaced. A rank that failed before `begin(change)` holds another change: left as is."""
        if change != self._change:
            return
        previous = self._previous
        self.begin()
        if previous is not None:
            self._write(*previous)

    def _at(self, buffer: str, at: int, count: int) -> torch.Tensor:
        """The view a write goes to: rows [at, at + count) of `buffer`, or all of it when at is -1."""
        target = getattr(self, buffer)
        return target if at < 0 else target[at:at + count]

    def _write(self, writes: "Writes", slot: SlotInfo, ranges: dict[str | None, RowRange],
               slots: dict[str | None, int], digests: list[bytes] | None) -> None:
        for buffer, at, values in writes:
            self._at(buffer, at, len(values) if at >= 0 else 0).copy_(values)
        self.slot, self.ranges, self._slots, self._digests = slot, ranges, slots, digests
        self._by_slot = [RowRange(0, 0, 1.0)] * (slot.max_adapters + 1)
        for name, r in ranges.items():
            if self.sketched and (self.sketch_mode is True or r.n_facts >= SKETCH_MIN_FACTS):
                rows_of = slice(r.start, r.start + r.n_facts)
                r = r._replace(sketch=Sketch(self.nkv_sketch_proj[slots[name]], self.nkv_sketch_keys[rows_of],
                                             min(self.shortlist, r.n_facts)))
            self._by_slot[slots[name]] = r

    def load(self, adapter: NKVAdapter, gamma: float | None = None, source: str | None = None,
             revision: str | None = None, digest: str | None = None, name: str | None = None) -> None:
        """Stage and commit `adapter` (under `name`, if given) on this rank alone (start-up, tests)."""
        self.begin()
        self.stage(adapter, gamma=gamma, source=source, revision=revision, digest=digest, name=name)
        self.commit(keep_previous=False)
        self.begin()

    def clear(self, name: str | None = None) -> None:
        """Drop the engine-wide adapter (or the named one): its requests then get the base model."""
        self.begin()
        self.stage(None, name=name)
        self.commit(keep_previous=False)
        self.begin()

    def extra_repr(self) -> str:
        s = self.slot
        named = f", named={[e['name'] for e in s.named]}" if self.routed else ""
        return (f"layer={s.layer}, capacity={s.capacity}, n_facts={s.n_facts}, d_key={s.d_key}, "
                f"tp_rank={s.tp_rank}/{s.tp_size}{named}")


Writes = list  # [(buffer name, first index along dim 0 or -1 for the whole buffer, values)]


class _Change(NamedTuple):
    """One change of a rank's gated module, staged (or saved, to roll it back)."""

    writes: Writes
    slot: SlotInfo
    ranges: dict[str | None, RowRange]
    slots: dict[str | None, int]
    digests: list[bytes] | None  # the engine-wide adapter's rows after the change (None: not computed)


def _row_digests(tables: list[torch.Tensor], n: int) -> list[bytes]:
    """A digest of each of the first n rows across `tables` (key slice, norm, residual, sketch),
    to find the rows a change leaves as they are."""
    if not n:
        return []
    parts = [t[:n].reshape(n, -1).cpu().contiguous().view(torch.uint8).numpy() for t in tables]
    return [hashlib.blake2b(b"".join(p[i].tobytes() for p in parts), digest_size=16).digest() for i in range(n)]


def _first_fit(ranges: Any, n: int, capacity: int) -> int | None:
    """The first row from which n rows are free of every range, or None."""
    at = 0
    for r in sorted(ranges, key=lambda r: r.start):
        if r.start - at >= n:
            return at
        at = max(at, r.start + r.n_facts)
    return at if capacity - at >= n else None


class NKVOutNorm(nn.Module):
    """The block's FFN-output norm plus the rows its gated projection left in `nkv_pending`."""

    def __init__(self, base_layer: nn.Module, gated: NKVGatedProjection) -> None:
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "gated", gated)  # a reference, not a second place in the module tree

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(x, *args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        y = y + self.gated.nkv_pending[: y.shape[0]].to(y.dtype)
        return (y, *out[1:]) if isinstance(out, tuple) else y


def gated_module(model: nn.Module) -> NKVGatedProjection | None:
    """The engine's gated module, or None when it was started without the nkv config."""
    for module in model.modules():
        if isinstance(module, NKVGatedProjection):
            return module
    return None


def _replace(slot: SlotInfo, **changes: Any) -> SlotInfo:
    return SlotInfo.from_dict({**slot.to_dict(), **changes})


__all__ = ["NKVGatedProjection", "gated_module"]
