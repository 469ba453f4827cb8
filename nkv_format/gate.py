"""The gated retrieval: the whole inference-time method, in one pure function.

Every loader (transformers, vLLM) calls `nkv_gate`; spec/nkv-format.md §5 gives the
same computation as reference pseudocode. It works on the last dimension only, so it
serves `(B, T, d_key)` activations from transformers and `(num_tokens, d_key)` from vLLM.

It is written to be traced by torch.compile: no `.item()`, no Python branch on tensor
values, loops only over static sizes (the number of facts), gamma a tensor.

Two paths, one decision rule (spec §5): the exact path scores every stored key; the
sketch path (`Sketch`, spec §5.1) scores low-dimensional sketches of the keys, keeps the
`shortlist` best candidates per token and rescores those exactly. A candidate's score is
its exact cosine, so the sketch path never fires where the exact path does not; it can
only miss the best row when that row falls outside the shortlist.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import torch

from .constants import SKETCH_REST_WEIGHT

DEFAULT_FACT_CHUNK = 8192
RESCORE_GROUP = 8  # Sketch.group's default: (T, 8, d_key) rows in memory, not (T, shortlist, d_key)


class Sketch(NamedTuple):
    """The sketch path's inputs (spec §5.1); static `shortlist`, tensors copied in place on a swap."""

    proj: torch.Tensor  # (d_key, d_sketch) float32 projection; under TP the rank's rows (d_key / tp, d_sketch)
    keys: torch.Tensor  # (n_facts, d_sketch + 1) from sketch_keys: unit_key @ proj, then the norm of the rest (0 = padding)
    shortlist: int  # candidates rescored exactly per token
    # The dtype the candidates are rescored in; None = the key table's. With it a loader can keep
    # a table in the file's fp16 under a float32 model and cast only the gathered candidates:
    # the same values as casting the whole table first, without its copy (8 GB at 1M facts).
    rows_dtype: torch.dtype | None = None
    # Shortlist slots rescored at once (`_rescore`). Compiled callers keep the static default;
    # an eager caller that knows its row count passes `rescore_group(rows, d_key, shortlist)`.
    group: int = RESCORE_GROUP


class GateResult(NamedTuple):
    delta: torch.Tensor  # (..., d_model) residual to add: R1[j] where fired, else 0
    index: torch.Tensor  # (...,) int64, best fact j (meaningful where fired)
    score: torch.Tensor  # (...,) float32, cosine of the best fact
    fired: torch.Tensor  # (...,) bool, score > gamma


ROW_BLOCK = 4096  # rows of a key table cast to float32 at once when attaching (norms, sketches)


def key_inverse_norms(keys: torch.Tensor) -> torch.Tensor:
    """1 / ||K_i|| per row, in float32; 0 for all-zero (padding) rows.

    A padding row then scores exactly 0. It can still win the argmax (when every real row
    scores below 0, or there is none), but a score of 0 never exceeds gamma >= 0, so it
    never fires; its residual is zero as well.
    """
    norms = torch.empty(keys.shape[0], dtype=torch.float32, device=keys.device)  # (n_facts,)
    for start, block in float32_blocks(keys):
        torch.linalg.vector_norm(block, dim=-1, out=norms[start : start + block.shape[0]])
    return torch.where(norms > 0, 1.0 / norms.clamp_min(1e-30), torch.zeros_like(norms))


def float32_blocks(rows: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, rows[start : start + ROW_BLOCK] in float32) over a table, through one reused
    buffer: a float32 copy of a 1M-row fp16 table would take 6 GB at SmolLM2's width, and a
    fresh block per step made the allocator fault its pages in again (the norms of 1M fp16
    rows took 5.4 s that way, 0.38 s through one buffer: benchmarks/scale/attach_file.py --top).
    Each block is valid until the next one is drawn."""
    if rows.dtype == torch.float32:
        for start in range(0, rows.shape[0], ROW_BLOCK):
            yield start, rows[start : start + ROW_BLOCK]
        return
    buf = torch.empty(min(ROW_BLOCK, rows.shape[0]), *rows.shape[1:], dtype=torch.float32, device=rows.device)
    for start in range(0, rows.shape[0], ROW_BLOCK):
        m = min(ROW_BLOCK, rows.shape[0] - start)
        yield start, buf[:m].copy_(rows[start : start + m])


def unit_rows(x: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """x / ||x|| per row, in float32; 0 for all-zero rows. `sq_norm` (T,) is the full-width
    squared norm (all-reduced under tensor parallelism, so a rank scales its slice by it).

    Normalising *before* the product in the keys' dtype keeps every dot product within
    ||K_i||, whatever the activation's scale: real models' "massive activations" (x400)
    overflowed fp16 products to inf and fired the gate on unrelated tokens.
    """
    return x.float() * torch.rsqrt(sq_norm.clamp_min(1e-24)).unsqueeze(-1)  # (T, d_key)


def nkv_gate(
    k: torch.Tensor,
    keys: torch.Tensor,
    key_inv_norms: torch.Tensor,
    residuals: torch.Tensor,
    gamma: torch.Tensor,
    *,
    fact_chunk: int = DEFAULT_FACT_CHUNK,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sketch: Sketch | None = None,
    workspace: torch.Tensor | None = None,
) -> GateResult:
    """Cosine-gated nearest-fact residual for every row of `k`.

    Args:
        k: (..., d_key) input of the output projection (the FFN key) per token.
        keys: (n_facts, d_key) K1 in the activation dtype (the sketch path: in any dtype, with
            `sketch.rows_dtype` the activation's); under tensor parallelism the rank's column
            slice (n_facts, d_key / tp).
        key_inv_norms: (n_facts,) float32 1/||K1_i|| over the *full* d_key (0 = padding).
        residuals: (n_facts, d_model) R1; `delta` comes back in their dtype (the caller casts
            it to the output's).
        gamma: () float tensor, the threshold; the gate fires when cos > gamma.
        fact_chunk: facts scored at once; the exact path's memory is bounded by rows(k) * fact_chunk.
            The sketch path scores max(fact_chunk, RESCORE_GROUP * d_key) sketches at once
            (`shortlist_chunk`) and holds (rows(k), sketch.group, d_key) candidate rows.
        all_reduce: sums a tensor over tensor-parallel ranks (in place or returned);
            None on a single device. Partial dot products and squared norms are reduced
            before the argmax so every rank picks the same fact.
        sketch: None for the exact path; else shortlist by sketch, then rescore exactly.
            Under tensor parallelism the all-reduces carry (T, d_sketch) and
            (T, shortlist) floats instead of (T, n_facts).
        workspace: a flat float32 tensor of at least `shortlist_scores(...)` values that the
            sketch path writes its score chunks into, for eager callers that keep one between
            calls (a fresh 100 MB-scale block is faulted in page by page on every call); None:
            a fresh tensor per chunk, as a compiled graph plans its own memory.
    Returns:
        GateResult(delta, index, score, fired); add `delta` to the projection's output.

    Example:
        >>> out = down_proj(k)
        >>> out = out + nkv_gate(k, K, key_inverse_norms(K), R, torch.tensor(0.65)).delta
    """
    lead = k.shape[:-1]
    x = k.reshape(-1, k.shape[-1])  # (T, d_key)
    n_facts = keys.shape[0]
    if n_facts == 0:  # static shape, safe under tracing
        zeros = torch.zeros(x.shape[0], dtype=torch.float32, device=k.device)
        return GateResult(
            torch.zeros(*lead, residuals.shape[-1], dtype=residuals.dtype, device=k.device),
            torch.zeros(lead, dtype=torch.int64, device=k.device),
            zeros.reshape(lead),
            torch.zeros(lead, dtype=torch.bool, device=k.device),
        )

    sq_norm = x.float().pow(2).sum(-1)  # (T,)
    if all_reduce is not None:
        sq_norm = _reduced(all_reduce, sq_norm)

    x_unit = unit_rows(x, sq_norm)  # (T, d_key) float32: no fp16 overflow downstream
    if sketch is None:
        best, best_idx = _exact_best(x_unit.to(keys.dtype), keys, key_inv_norms, fact_chunk, all_reduce)
    else:
        cand = _shortlist(x_unit, sketch, fact_chunk, all_reduce, workspace)  # (T, c)
        best, best_idx = _rescore(x_unit.to(sketch.rows_dtype or keys.dtype), keys, key_inv_norms, cand, all_reduce,
                                  sketch.group)

    score = best.clamp(-1.0, 1.0)  # (T,) rounding may leave |cos| a hair above 1
    fired = score > gamma
    rows = residuals.index_select(0, best_idx)  # (T, d_model)
    delta = rows * fired.unsqueeze(-1).to(rows.dtype)
    return GateResult(
        delta.reshape(*lead, residuals.shape[-1]),
        best_idx.reshape(lead),
        score.reshape(lead),
        fired.reshape(lead),
    )


class RowRange(NamedTuple):
    """One resident adapter's rows in a shared table (several adapters in one engine or module)."""

    start: int  # first row of this adapter in keys / residuals
    n_facts: int  # rows in use, from `start`
    gamma: float  # this adapter's threshold
    sketch: Sketch | None = None  # its sketch path (keys already sliced to the range), None = exact


def nkv_gate_routed(
    k: torch.Tensor,
    token_adapter: torch.Tensor,
    ranges: list[RowRange],
    keys: torch.Tensor,
    key_inv_norms: torch.Tensor,
    residuals: torch.Tensor,
    *,
    fact_chunk: int = DEFAULT_FACT_CHUNK,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> GateResult:
    """`nkv_gate` for a batch whose tokens choose different adapters, like a MoE layer routes
    tokens to experts: token t is gated against the rows of `ranges[token_adapter[t]]` only,
    and left untouched (fired False, delta 0) where `token_adapter[t]` is -1.

    Each token is scored against its own adapter's rows, so the cost per token does not grow
    with the number of resident adapters. The grouping reads the routing on the host (one
    sync), so this runs eagerly: loaders that compile the model call it from an opaque op.
    Under tensor parallelism every rank holds the same routing, so the ranks visit the same
    adapters in the same order and their all-reduces pair up.

    Args:
        k: (..., d_key) FFN keys, as for `nkv_gate`.
        token_adapter: (...) or (N,) with N >= k's token count, int: index into `ranges`, -1 = none.
            Extra entries past the token count are ignored (a preallocated routing buffer).
        ranges: the resident adapters; index i is what `token_adapter` names.
        keys, key_inv_norms, residuals: the shared table; adapter i owns rows
            [ranges[i].start, ranges[i].start + ranges[i].n_facts).
    Returns:
        GateResult with `index` the row in the shared table (meaningful where fired).

    >>> r = nkv_gate_routed(k, torch.tensor([0, 0, -1, 1]), [RowRange(0, 10, 0.65), RowRange(10, 5, 0.7)],
    ...                     K, key_inverse_norms(K), R)
    """
    lead = k.shape[:-1]
    x = k.reshape(-1, k.shape[-1])  # (T, d_key)
    route = token_adapter.reshape(-1)[: x.shape[0]].to(torch.int64)  # (T,)
    delta = torch.zeros(x.shape[0], residuals.shape[-1], dtype=residuals.dtype, device=k.device)  # (T, d_model)
    index = torch.zeros(x.shape[0], dtype=torch.int64, device=k.device)
    score = torch.zeros(x.shape[0], dtype=torch.float32, device=k.device)
    fired = torch.zeros(x.shape[0], dtype=torch.bool, device=k.device)
    for a in torch.unique(route[route >= 0]).tolist():  # sorted: the same order on every rank
        if a >= len(ranges):
            raise IndexError(f"token routed to adapter {a}, but only {len(ranges)} are resident")
        r = ranges[a]
        tokens = (route == a).nonzero().squeeze(1)  # (T_a,)
        rows = slice(r.start, r.start + r.n_facts)
        part = nkv_gate(x.index_select(0, tokens), keys[rows], key_inv_norms[rows], residuals[rows],
                        torch.tensor(r.gamma, device=k.device), fact_chunk=fact_chunk, all_reduce=all_reduce,
                        sketch=r.sketch)
        delta.index_copy_(0, tokens, part.delta.to(delta.dtype))
        index.index_copy_(0, tokens, part.index + r.start)
        score.index_copy_(0, tokens, part.score)
        fired.index_copy_(0, tokens, part.fired)
    return GateResult(delta.reshape(*lead, residuals.shape[-1]), index.reshape(lead), score.reshape(lead),
                      fired.reshape(lead))


def _exact_best(x_c: torch.Tensor, keys: torch.Tensor, key_inv_norms: torch.Tensor, fact_chunk: int,
                all_reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(best cosine, its row) per token over every stored key; the first row wins ties."""
    best = torch.full((x_c.shape[0],), float("-inf"), dtype=torch.float32, device=x_c.device)  # (T,)
    best_idx = torch.zeros(x_c.shape[0], dtype=torch.int64, device=x_c.device)  # (T,)
    for start in range(0, keys.shape[0], fact_chunk):
        dots = (x_c @ keys[start : start + fact_chunk].T).float()  # (T, chunk)
        if all_reduce is not None:
            dots = _reduced(all_reduce, dots)
        scaled = dots * key_inv_norms[start : start + fact_chunk]  # (T, chunk) cosines
        chunk_best, chunk_idx = scaled.max(dim=-1)  # (T,), first index on ties
        better = chunk_best > best  # strict: earlier chunks win ties, like one argmax
        best = torch.where(better, chunk_best, best)
        best_idx = torch.where(better, chunk_idx + start, best_idx)
    return best, best_idx


def _shortlist(x_unit: torch.Tensor, sketch: Sketch, fact_chunk: int,
               all_reduce: Callable[[torch.Tensor], torch.Tensor] | None,
               workspace: torch.Tensor | None = None) -> torch.Tensor:
    """(T, c) rows ranked highest by their sketch product plus a share of the rests' norms
    (spec §5.1).

    With P's columns orthonormal (a fitted P is), a unit vector is its sketch plus a rest
    orthogonal to P, so cos = sketch·sketch + rest·rest, and |rest|·|rest| bounds the second
    term (Cauchy-Schwarz). The sketch product alone drops rows P describes badly; the full
    bound over-ranks every row with a large rest, since real rests are far from aligned.
    SKETCH_REST_WEIGHT (0.6) of it missed the fewest best rows on 100,000 real SmolLM2 keys
    (benchmarks/scale). The candidates are rescored exactly, so the weight only decides
    which rows are looked at.
    """
    q = x_unit @ sketch.proj.float()  # (T, d_sketch); a rank's partial sum under TP
    if all_reduce is not None:
        q = _reduced(all_reduce, q)
    # (T, 1) the token's rest norm (|x_unit| = 1), weighted as the docstring says
    rest = SKETCH_REST_WEIGHT * (1.0 - q.pow(2).sum(-1, keepdim=True)).clamp_min(0.0).sqrt()
    q = torch.cat([q, rest], dim=-1).to(sketch.keys.dtype)  # (T, d_sketch + 1), as the key sketches
    n_facts = sketch.keys.shape[0]
    c = min(sketch.shortlist, n_facts)
    chunk = shortlist_chunk(fact_chunk, c, x_unit.shape[-1])
    chunks = ((start, _sketch_scores(q, sketch.keys[start : start + chunk], workspace))  # (T, chunk) float32
              for start in range(0, n_facts, chunk))
    if n_facts <= chunk and n_facts < SHORTLIST_MIN_BLOCKS_PER_SLOT * SHORTLIST_BLOCK * c:
        return next(chunks)[1].topk(c, dim=-1).indices  # one short chunk: one top-k call is cheapest
    return _top_columns(chunks, c)


def _sketch_scores(q: torch.Tensor, rows: torch.Tensor, workspace: torch.Tensor | None) -> torch.Tensor:
    """(T, rows) float32 products q @ rows.T, written into `workspace` when one fits."""
    T, width = q.shape[0], rows.shape[0]
    if workspace is None or rows.dtype != torch.float32 or workspace.numel() < T * width:
        return (q @ rows.T).float()
    return torch.mm(q, rows.T, out=workspace[: T * width].view(T, width))


def shortlist_scores(rows: int, n_facts: int, fact_chunk: int, shortlist: int, d_key: int) -> int:
    """Values of the largest score chunk the sketch path computes for `rows` tokens: the size
    of a `workspace` for nkv_gate."""
    return rows * min(n_facts, shortlist_chunk(fact_chunk, min(shortlist, n_facts), d_key))


SHORTLIST_BLOCK = 32  # scores per block of the two-level top-k (`_top_columns`); 16 and 64 were slower
SHORTLIST_MIN_BLOCKS_PER_SLOT = 4  # a single chunk of fewer than c * 4 blocks takes one top-k call


def _top_columns(chunks: Iterator[tuple[int, torch.Tensor]], c: int) -> torch.Tensor:
    """(T, c) columns of the c highest scores over `chunks` ((first column, (T, width) scores),
    in order), as one `topk(c)` over all of them would pick them, up to the order of ties.

    Two levels: the scores in blocks of SHORTLIST_BLOCK; the c blocks with the highest maxima
    so far are kept (their scores and first columns) from chunk to chunk; at the end the top c
    of the kept blocks' scores. Exact: a top-c score in a block that was dropped would lie
    below c kept maxima of other blocks, each at least as high as its own: c + 1 scores at
    least as high as a top-c score. Each chunk's top-k sees one value per block plus the c
    kept ones instead of every score: at 256 tokens and 200k facts one top-k over all scores
    took 74-76 ms and this 39-48 ms, and at 16 tokens over 9 chunks of 12,288 a top-k per
    chunk and a merge took 8.8 ms and this 5.3 ms (benchmarks/scale/gate_parts.py).
    Static shapes throughout, so it traces like the rest of the op.
    """
    best = kept = firsts = None  # (T, k) kept blocks' maxima, (T, k, block) their scores, (T, k) first columns
    for start, scores in chunks:
        T, width = scores.shape
        pad = -width % SHORTLIST_BLOCK
        if pad:  # a last, partial block: padded with -inf, below every real score
            scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
        blocks = scores.view(T, -1, SHORTLIST_BLOCK)  # (T, nb, block)
        starts = start + SHORTLIST_BLOCK * torch.arange(blocks.shape[1], device=scores.device)  # (nb,)
        maxima = blocks.amax(-1)  # (T, nb)
        n_kept = 0 if best is None else best.shape[1]
        if best is not None:
            maxima = torch.cat([best, maxima], dim=-1)  # (T, k + nb)
        best, pick = maxima.topk(min(c, maxima.shape[-1]), dim=-1)  # (T, k)
        new = (pick - n_kept).clamp_min(0)  # (T, k) block of this chunk (where pick >= n_kept)
        scores_of = blocks.gather(1, new.unsqueeze(-1).expand(-1, -1, SHORTLIST_BLOCK))  # (T, k, block)
        firsts_of = starts[new]  # (T, k)
        if kept is not None:
            was_kept = pick < n_kept  # (T, k)
            old = pick.clamp_max(n_kept - 1)
            scores_of = torch.where(was_kept.unsqueeze(-1),
                                    kept.gather(1, old.unsqueeze(-1).expand(-1, -1, SHORTLIST_BLOCK)), scores_of)
            firsts_of = torch.where(was_kept, firsts.gather(1, old), firsts_of)
        kept, firsts = scores_of, firsts_of
    T, k, _ = kept.shape
    offsets = torch.arange(SHORTLIST_BLOCK, device=kept.device)
    columns = (firsts.unsqueeze(-1) + offsets).reshape(T, k * SHORTLIST_BLOCK)  # (T, k * block)
    pick = kept.reshape(T, k * SHORTLIST_BLOCK).topk(c, dim=-1).indices  # (T, c)
    return columns.gather(-1, pick)


def shortlist_chunk(fact_chunk: int, shortlist: int, d_key: int) -> int:
    """Sketch scores computed at once per token by the shortlist: up to RESCORE_GROUP * d_key,
    as many values as one rescoring group's rows (the scores take 2-3x their memory: key dtype
    plus a float32 copy). Fewer, longer topk calls cost less than the loader's 8,192-fact
    chunks (benchmarks/scale/sketch_gate_speed.py)."""
    return max(fact_chunk, shortlist, RESCORE_GROUP * d_key)


RESCORE_VALUES = 2**18  # gathered key values per rescoring group in eager calls: 1 MB in float32


def rescore_group(rows: int, d_key: int, shortlist: int) -> int:
    """`Sketch.group` for a call on `rows` tokens: the largest power of two that keeps a group's
    gathered rows (rows x group x d_key) within RESCORE_VALUES, at least 1, at most `shortlist`.

    A group that outgrows the cache is written to memory and read back: at 256 tokens of
    SmolLM2's width and 200k facts, 8 slots at a time took 42 ms and 1 at a time 28 ms; at one
    token, 8 at a time 0.3 ms and all 128 at once 0.1 ms (benchmarks/scale/gate_parts.py). A
    Python function of the row count, so only eager callers (the transformers loader) use it;
    a compiled graph keeps the static default."""
    fit = max(1, RESCORE_VALUES // max(1, rows * d_key))
    return max(1, min(shortlist, 1 << (fit.bit_length() - 1)))


def _rescore(x_c: torch.Tensor, keys: torch.Tensor, key_inv_norms: torch.Tensor, cand: torch.Tensor,
             all_reduce: Callable[[torch.Tensor], torch.Tensor] | None,
             group: int = RESCORE_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosines of the candidates; (best, its row), the lowest row winning ties as in §5.
    The gathered rows are cast to x_c's dtype (a no-op when the table is already in it).

    The candidates' rows are gathered `group` slots at a time (a static loop): at Llama-3-8B
    width and 8k tokens all 128 at once would be 15 G values (30 GB in bf16), and small groups
    stay in cache. The token is the (1, d_key) left operand and its candidates the (d_key, g)
    right one: the (g, d_key) x (d_key, 1) layout took 2.3x as long on CPU for the same values
    (95 ms against 42 at 256 tokens and 8 slots; benchmarks/scale/gate_parts.py)."""
    T, c = cand.shape
    parts = []
    for s in range(0, c, group):
        slots = cand[:, s : s + group]  # (T, g)
        rows = keys.index_select(0, slots.reshape(-1)).to(x_c.dtype).reshape(T, slots.shape[1], keys.shape[-1])  # (T, g, d_key)
        parts.append(torch.bmm(x_c.unsqueeze(1), rows.transpose(1, 2)).squeeze(1))  # (T, g)
    dots = torch.cat(parts, dim=-1).float()  # (T, c)
    if all_reduce is not None:
        dots = _reduced(all_reduce, dots)
    scaled = dots * key_inv_norms.index_select(0, cand.reshape(-1)).reshape(T, c)  # (T, c) cosines
    best = scaled.max(dim=-1).values  # (T,)
    at_best = torch.where(scaled == best.unsqueeze(-1), cand, torch.full_like(cand, keys.shape[0]))
    # A NaN token (a NaN activation upstream) equals no score: keep a real row, never row n,
    # which index_select would refuse (eager) or read out of bounds (compiled); NaN never fires.
    return best, at_best.min(dim=-1).values.clamp_max(keys.shape[0] - 1)


def fit_sketch(keys: torch.Tensor, dim: int, max_rows: int = 16384, seed: int = 0) -> torch.Tensor:
    """A (d_key, dim) float32 projection fitted to the keys: the top right singular vectors of
    the unit keys (uncentred PCA: it keeps the directions that carry the dot products).

    Fitted on at most `max_rows` rows, drawn with `seed`, so the cost does not grow with
    n_facts and the same keys always give the same projection.

    >>> proj = fit_sketch(adapter.keys, 64)
    """
    n, d_key = keys.shape
    dim = max(1, min(dim, d_key))
    rows = keys
    if n > max_rows:
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_rows]
        rows = keys.index_select(0, pick)
    unit = rows.float() * key_inverse_norms(rows).unsqueeze(-1)  # (m, d_key)
    second = (unit.T @ unit).double()  # (d_key, d_key) second moment; float64 for a stable eigh
    _, vecs = torch.linalg.eigh(second)  # ascending eigenvalues
    proj = vecs[:, -dim:].flip(-1).float()  # (d_key, dim), strongest direction first
    # eigenvectors are defined up to sign: fix it so the same keys give the same bytes
    signs = torch.sign(proj[proj.abs().argmax(0), torch.arange(dim)])
    return (proj * torch.where(signs == 0, 1.0, signs)).contiguous()


def sketch_keys(keys: torch.Tensor, proj: torch.Tensor, inverse_norms: torch.Tensor | None = None) -> torch.Tensor:
    """(n_facts, d_sketch + 1) float32: each unit key's sketch (unit_key @ proj), then the norm
    of its part outside proj's span, sqrt(1 - |sketch|^2), so that one product with a token's
    [sketch, rest norm] bounds the cosine (`_shortlist`). All-zero (padding) rows give zeros.

    `inverse_norms` (from key_inverse_norms) saves computing them again."""
    inv = key_inverse_norms(keys) if inverse_norms is None else inverse_norms.float()
    proj = proj.float()
    out = torch.empty(keys.shape[0], proj.shape[1] + 1, dtype=torch.float32, device=keys.device)
    for s, block in float32_blocks(keys):
        rows = slice(s, s + block.shape[0])
        sk = torch.matmul(block, proj, out=out[rows, :-1])  # (rows, d_sketch)
        sk.mul_(inv[rows].unsqueeze(-1))
        real = inv[rows] > 0  # a padding row's unit key is 0: no rest either
        rest = (1.0 - sk.pow(2).sum(-1)).clamp_min(0.0).sqrt()
        out[rows, -1] = torch.where(real, rest, 0.0)
    return out


def _reduced(all_reduce: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    out = all_reduce(t)
    return t if out is None else out


__all__ = ["GateResult", "Sketch", "RowRange", "nkv_gate", "nkv_gate_routed", "key_inverse_norms", "unit_rows", "fit_sketch", "sketch_keys",
           "rescore_group", "shortlist_scores", "DEFAULT_FACT_CHUNK"]
