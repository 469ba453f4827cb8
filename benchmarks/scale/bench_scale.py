"""Scale benchmark: the exact gate against the sketch path at 10k .. 1M facts.

    python benchmarks/scale/read_keys.py --n 100000 -o keys.pt     # real SmolLM2 keys (CPU: ~1 h)
    python benchmarks/scale/bench_scale.py recall  --keys keys.pt --sizes 10000,100000,1000000
    python benchmarks/scale/bench_scale.py forward --keys keys.pt --sizes 10000,100000,200000
    python benchmarks/scale/bench_scale.py attach  --keys keys.pt --sizes 100000,1000000
    python benchmarks/scale/bench_scale.py bytes

Facts beyond the real keys are synthetic, drawn to match the real keys' first two moments:
x = mean + z · sqrt(λ) · Vᵀ over the top 256 principal directions of the real keys' covariance,
plus isotropic noise carrying the mean remaining variance (so the mean, the dominant
covariance, the norms and the mean cosine match; higher moments and the near-duplicates that
similar names give real keys do not: synthetic keys are easier to tell apart). Each command prints JSON lines; README.md beside this file holds the results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from nkv.constants import DEFAULT_SHORTLIST, DEFAULT_SKETCH_DIM, SKETCH_REST_WEIGHT
from nkv.gate import Sketch, fit_sketch, key_inverse_norms, nkv_gate, sketch_keys

GAMMA = 0.65


def _emit(**row) -> None:
    print(json.dumps(row), flush=True)


def synthetic_like(real: torch.Tensor, n: int, rank: int = 256, seed: int = 0, chunk: int = 65536) -> torch.Tensor:
    """(n, d) float16 keys with the mean of `real` and its covariance in the top `rank`
    principal directions, plus isotropic noise with the mean remaining variance."""
    x = real.float()
    mean = x.mean(0)
    vals, vecs = torch.linalg.eigh(torch.cov((x - mean).T.double()))  # ascending
    top_vals, top_vecs = vals[-rank:].clamp_min(0), vecs[:, -rank:]
    rest = float(vals[:-rank].clamp_min(0).sum() / max(1, x.shape[1] - rank))  # variance per other direction
    scale = (top_vecs * top_vals.sqrt()).T.float()  # (rank, d)
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, x.shape[1], dtype=torch.float16)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        low = torch.randn(m, rank, generator=g) @ scale  # (m, d) in the top directions
        noise = torch.randn(m, x.shape[1], generator=g) * rest**0.5  # also adds `rest` to the top directions
        out[s : s + m] = (mean + low + noise).half()
    return out


def table(data: dict, n: int) -> torch.Tensor:
    """n keys: the real ones first, then synthetic ones matched to them."""
    real = data["keys"]
    if n <= real.shape[0]:
        return real[:n]
    return torch.cat([real, synthetic_like(real, n - real.shape[0])])


def decisions(q: torch.Tensor, keys: torch.Tensor, sketch: Sketch | None, chunk: int = 100_000,
              inverse_norms: torch.Tensor | None = None):
    """(fired, index, score) of the gate on q against keys (float16 storage, float32 math),
    in blocks of `chunk` facts so a 1M table never exists in float32 at once.
    `inverse_norms`: the exact path's per-row score scales, None = 1 / ||key|| (a code that
    corrects its cosines, bench_int8's 1-bit keys, passes its own)."""
    no_residuals = torch.zeros(keys.shape[0], 1)
    if sketch is not None:
        r = nkv_gate(q.float(), _Float32Rows(keys), key_inverse_norms(keys), no_residuals, torch.tensor(GAMMA),
                     sketch=sketch)
        return r.fired, r.index, r.score
    best = torch.full((q.shape[0],), -2.0)
    idx = torch.zeros(q.shape[0], dtype=torch.long)
    for s in range(0, keys.shape[0], chunk):
        part = keys[s : s + chunk].float()
        inv = key_inverse_norms(part) if inverse_norms is None else inverse_norms[s : s + chunk]
        r = nkv_gate(q.float(), part, inv, no_residuals[: part.shape[0]], torch.tensor(GAMMA))
        better = r.score > best  # strict: the earlier block wins ties, like one argmax
        best = torch.where(better, r.score, best)
        idx = torch.where(better, r.index + s, idx)
    return best > GAMMA, idx, best


class _Float32Rows:
    """A float16 table that hands out float32 rows: all the sketch path reads of the keys
    (the shortlisted rows), without a float32 copy of the whole table."""

    def __init__(self, keys: torch.Tensor) -> None:
        self.keys, self.shape, self.dtype = keys, keys.shape, torch.float32

    def index_select(self, dim: int, idx: torch.Tensor) -> torch.Tensor:
        return self.keys.index_select(dim, idx).float()


def cmd_recall(data: dict, sizes: list[int], dims: list[int], shortlists: list[int], max_tokens: int,
               rankings: list[str], sketch_dtypes: list[str], list_misses: bool = False) -> None:
    """The sketch path's decisions against the exact gate's. Ranking "bound" is the op's (the
    sketch product plus the rests' norms: the op from session 8 to 10); "plain" ranks by the
    sketch product alone (the op before session 8); "restA" (e.g. rest0.5) by the sketch
    product plus A times the rests' norms; "op" is the op as it is (SKETCH_REST_WEIGHT, spec
    §5.1). The op weights the token's rest, so the key sketches' rest column is scaled by
    A / SKETCH_REST_WEIGHT here.
    `sketch_dtypes`: the dtypes the key sketches are held (and the shortlist scored) in."""
    queries = {"text": data["text"], "edit": data["edit"], "paraphrase": data["paraphrase"]}
    owners = {name: data.get(f"{name}_subject") for name in queries}  # each token's own row (None: real text)
    g = torch.Generator().manual_seed(0)
    for name, q in queries.items():  # the same token sample at every size
        if q.shape[0] > max_tokens:
            pick = torch.randperm(q.shape[0], generator=g)[:max_tokens]
            queries[name] = q[pick]
            owners[name] = owners[name][pick] if owners[name] is not None else None
    for n in sizes:
        keys = table(data, n)
        t0 = time.perf_counter()
        exact = {name: decisions(q, keys, None) for name, q in queries.items()}
        exact_s = time.perf_counter() - t0
        for dim in dims:
            proj = fit_sketch(keys, dim)
            bound = sketch_keys(keys, proj)
            for ranking, c, dt in [(r, c, d) for r in rankings for c in shortlists for d in sketch_dtypes]:
                named = {"bound": 1.0, "plain": 0.0, "op": SKETCH_REST_WEIGHT}
                weight = named[ranking] if ranking in named else float(ranking.removeprefix("rest"))
                ranked = torch.cat([bound[:, :-1], weight / SKETCH_REST_WEIGHT * bound[:, -1:]], dim=-1)
                sketch = Sketch(proj, ranked.to(getattr(torch, dt)), c)
                for name, q in queries.items():
                    t0 = time.perf_counter()
                    fired, idx, score = decisions(q, keys, sketch)
                    fast_s = time.perf_counter() - t0
                    e_fired, e_idx, _ = exact[name]
                    same = (fired == e_fired) & (~e_fired | (idx == e_idx))
                    _emit(cmd="recall", n_facts=n, real_keys=min(n, data["keys"].shape[0]), d_sketch=dim,
                          shortlist=c, ranking=ranking, sketch_dtype=dt, queries=name, tokens=q.shape[0], exact_fired=int(e_fired.sum()),
                          fast_fired=int(fired.sum()), recall=round(float(same.float().mean()), 6),
                          missed=int((e_fired & ~same).sum()), false_fires=int((fired & ~e_fired).sum()),
                          **_own_rows(owners[name], n, e_fired, e_idx, fired, idx, same),
                          exact_s=round(exact_s, 1), fast_s=round(fast_s, 2))
                    if list_misses:
                        _list_misses(data, keys, q, owners[name], name, exact[name], (fired, idx, score), same)


def _own_rows(owner: torch.Tensor | None, n: int, e_fired: torch.Tensor, e_idx: torch.Tensor, fired: torch.Tensor,
              idx: torch.Tensor, same: torch.Tensor) -> dict[str, int]:
    """For tokens of a stored subject's prompts (owner: its row), how many pick that row, in
    the exact gate and in the fast path, and how many of the misses were tokens whose exact
    row is that row (the rest: the exact gate itself chose another subject's row)."""
    if owner is None:
        return {}
    stored = owner < n  # subjects beyond the table's size have no row here
    exact_own = e_fired & (e_idx == owner) & stored
    return {"own_row_exact": int(exact_own.sum()), "own_row_fast": int((fired & (idx == owner) & stored).sum()),
            "missed_where_exact_is_own_row": int((exact_own & ~same).sum())}


def _list_misses(data: dict, keys: torch.Tensor, q: torch.Tensor, owner: torch.Tensor | None, kind: str,
                 exact: tuple, fast: tuple, same: torch.Tensor, top: int = 5) -> None:
    """One line per token where the fast path's decision differs: its own subject, both
    decisions, and the exact gate's top rows (names from `data["subjects"]` when present)."""
    names = data.get("subjects")
    label = (lambda r: f"{r} {names[r]!r}") if names is not None else str  # noqa: E731
    for t in (~same).nonzero().squeeze(1).tolist():
        cos = torch.cat([q[t : t + 1].float() @ keys[s : s + 65536].float().T / keys[s : s + 65536].float().norm(dim=1)
                         for s in range(0, keys.shape[0], 65536)], dim=1).squeeze(0) / q[t].float().norm()
        best = cos.topk(top)
        _emit(cmd="miss", queries=kind, token=t, own_row=label(int(owner[t])) if owner is not None else None,
              exact=[bool(exact[0][t]), label(int(exact[1][t])), round(float(exact[2][t]), 4)],
              fast=[bool(fast[0][t]), label(int(fast[1][t])), round(float(fast[2][t]), 4)],
              exact_top=[[label(int(i)), round(float(v), 4)] for v, i in zip(best.values, best.indices)])


def cmd_forward(data: dict, sizes: list[int], model_name: str, reps: int, shortlists: list[int],
                sketch_dtypes: list[str], float32_table: bool = False) -> None:
    from nkv import BaseModelInfo, Fact, NKVAdapter
    from nkv.loaders.models import load_model
    from nkv.loaders.transformers import NKVLinear

    model, tok = load_model(model_name, device="cpu")
    model.eval()
    text = Path(__file__).resolve().parents[1] / "real" / "results" / "unrelated-smollm2-135m.txt"
    ids = tok(text.read_text()[:20000], return_tensors="pt")["input_ids"][0]
    batch = ids[: 4 * 64].reshape(4, 64)  # 4 x 64 tokens of real text, as issue 12 measured
    layer = int(data["layer"])
    mlp = model.model.layers[layer].mlp
    down = mlp.down_proj
    d_key, d_model = down.weight.shape[1], down.weight.shape[0]

    def fwd() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=batch)
        return time.perf_counter() - t0

    for n in sizes:
        keys = table(data, n)
        base = BaseModelInfo(name=model_name, architecture="LlamaForCausalLM", model_type="llama", n_layers=30,
                             d_model=d_model, d_key=d_key, fingerprint="unused")
        adapter = NKVAdapter(keys=keys, residuals=torch.zeros(n, d_model, dtype=keys.dtype),
                             facts=[Fact(id=str(i), subject="s", prompt="p", target_new="t") for i in range(n)],
                             layer=layer, gamma=GAMMA, base=base, target_module="")
        exact = NKVLinear(down, adapter, torch.float32, torch.device("cpu"))
        exact.use_sketch(adapter, 0)  # the loader takes the sketch path from SKETCH_MIN_FACTS facts: force exact
        modules = {"exact": exact}
        attach_s = {}
        for c, dt in [(c, d) for c in shortlists for d in sketch_dtypes]:
            t0 = time.perf_counter()
            fast = NKVLinear(down, adapter, torch.float32, torch.device("cpu"))
            fast.use_sketch(adapter, c, table_dtype=getattr(torch, dt))
            name = f"sketch{c}" if dt == "float32" else f"sketch{c}_{dt}"
            attach_s[name] = round(time.perf_counter() - t0, 2)
            modules[name] = fast
        if float32_table:  # the sketch path over a float32 copy of the table, as the loader held it before session 12
            wide = NKVLinear(down, adapter, torch.float32, torch.device("cpu"))
            wide.use_sketch(adapter, 0)  # cast to float32 (the exact path's table) ...
            wide.use_sketch(adapter, shortlists[0])  # ... and kept so on the sketch path
            assert wide.nkv_keys.dtype == torch.float32
            modules[f"sketch{shortlists[0]}_float32_table"] = wide
        times: dict[str, list[float]] = {"none": [], **{name: [] for name in modules}}
        fwd()  # warm-up
        for _ in range(reps):  # interleaved, so load from other jobs hits every variant alike
            for name in times:
                mlp.down_proj = down if name == "none" else modules[name]
                times[name].append(fwd())
        mlp.down_proj = down
        base_t = statistics.median(times["none"])
        _emit(cmd="forward", n_facts=n, tokens=int(batch.numel()), reps=reps, none_s=round(base_t, 4),
              **{f"{name}_ratio": round(statistics.median(t) / base_t, 3) for name, t in times.items() if name != "none"},
              attach_s=attach_s, d_sketch=DEFAULT_SKETCH_DIM)
        del modules, adapter


def cmd_attach(data: dict, sizes: list[int]) -> None:
    """What attaching costs beyond copying rows: norms, the fitted projection, the sketches."""
    for n in sizes:
        keys = table(data, n)
        t0 = time.perf_counter()
        inv = key_inverse_norms(keys)
        t1 = time.perf_counter()
        proj = fit_sketch(keys, DEFAULT_SKETCH_DIM)
        t2 = time.perf_counter()
        sketch_keys(keys, proj)
        t3 = time.perf_counter()
        _emit(cmd="attach", n_facts=n, norms_s=round(t1 - t0, 2), fit_s=round(t2 - t1, 2),
              sketch_keys_s=round(t3 - t2, 2), total_s=round(t3 - t0, 2), rows=int(inv.numel()))


def cmd_bytes() -> None:
    """Bytes read per decode step (one token) by the gate, against the model's weights."""
    shapes = {"llama-3-8b": (14336, 4096, 8.03e9), "smollm2-135m": (1536, 576, 1.35e8)}
    for model, (d_key, d_model, params) in shapes.items():
        weights = 2 * params  # fp16/bf16
        for n in (10_000, 100_000, 1_000_000):
            exact = 2 * n * d_key + 4 * n + 2 * d_model  # keys, inverse norms, one residual row
            sketch = (2 * n * (DEFAULT_SKETCH_DIM + 1) + 4 * d_key * DEFAULT_SKETCH_DIM  # sketches + rest norm, projection
                      + DEFAULT_SHORTLIST * (2 * d_key + 4) + 2 * d_model)  # rescored rows, one residual
            _emit(cmd="bytes", model=model, n_facts=n, exact_overhead=round(exact / weights, 4),
                  sketch_overhead=round(sketch / weights, 4), file_bytes_per_fact=2 * (d_key + d_model))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["recall", "forward", "attach", "bytes"])
    p.add_argument("--keys", type=Path)
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--dims", default=str(DEFAULT_SKETCH_DIM))
    p.add_argument("--shortlists", default=str(DEFAULT_SHORTLIST))
    p.add_argument("--max-tokens", type=int, default=4000, help="query tokens per kind (sampled)")
    p.add_argument("--rankings", default="op",
                   help="recall: shortlist rankings, op (the op's), bound, plain and/or restA (rests' norms times A)")
    p.add_argument("--sketch-dtypes", default="float32",
                   help="recall, forward: dtypes the key sketches are scored in, float32 and/or bfloat16")
    p.add_argument("--float32-table", action="store_true",
                   help="forward: also the sketch path over a float32 copy of the fp16 table (before session 12)")
    p.add_argument("--list-misses", action="store_true",
                   help="recall: one line per token the fast path decides differently (its exact top rows)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    if args.cmd == "bytes":
        return cmd_bytes()
    data = torch.load(args.keys)
    if args.cmd == "recall":
        cmd_recall(data, ints(args.sizes), ints(args.dims), ints(args.shortlists), args.max_tokens,
                   args.rankings.split(","), args.sketch_dtypes.split(","), args.list_misses)
    elif args.cmd == "forward":
        cmd_forward(data, ints(args.sizes), args.model, args.reps, ints(args.shortlists), args.sketch_dtypes.split(","),
                    args.float32_table)
    else:
        cmd_attach(data, ints(args.sizes))


if __name__ == "__main__":
    main()
