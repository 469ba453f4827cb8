"""Would an IVF index (keys in k-means buckets, each token scoring only the buckets whose
centroids score highest) keep the exact gate's decisions, and would it be faster?

    python benchmarks/scale/ivf_buckets.py --keys keys100k.pt --facts 100000 --per-bucket 128 --probes 8,16,32
    python benchmarks/scale/ivf_buckets.py --keys keys-datasets.pt --facts 19589 --per-bucket 32 --probes 8,16,32 --time
    ... --centroids full   (k-means and centroid ranking on the full unit keys, not their sketches)
    ... --spill 2          (each key also stored in its second-best bucket)

Keys: read_keys.py's real SmolLM2 keys (beyond the file's rows, synthetic ones matched to
them: bench_scale.table). The index lives in the sketch space of the op (spec §5.1): spherical
k-means on the keys' sketches, then every bucket larger than `--cap` split along its first
principal direction, so buckets have a fixed capacity (what a graph-safe index needs).
Per token and number of probes p:
- `bucket_rank_<k>`: for tokens where the exact gate fires, the share whose row's bucket
  ranks among the top k centroids (sketch product with the bucket's mean sketch);
- `agree_p<p>`: the whole IVF path (the p buckets' sketches scored with the op's ranking,
  the best `shortlist` rescored exactly, `gate._rescore`) against the exact gate: same fired /
  not fired and, where fired, the same row; next to the flat sketch path's agreement;
- `--time`: one gate call on 256 tokens of real text, the flat sketch path (the op) against
  the IVF path in two forms with the same decisions (checked): candidate sketches gathered per
  token (`ivf_p*`, static shapes, what a compiled graph needs) and bucket by bucket
  (`ivf_bucket_major_p*`, eager only), median of 5, interleaved.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench_scale import GAMMA, decisions, table
from nkv.constants import SKETCH_REST_WEIGHT
from nkv.gate import _rescore, Sketch, fit_sketch, key_inverse_norms, nkv_gate, rescore_group, sketch_keys, shortlist_scores

RANKS = (1, 4, 16, 64)
SHORTLIST = 128


class Index:
    """Fixed-capacity buckets of rows, with each bucket's sketches stored bucket-major."""

    def __init__(self, sketches: torch.Tensor, per_bucket: int, cap: int, iters: int, g: torch.Generator,
                 space: torch.Tensor | None = None, spill: int = 1) -> None:
        # clustered and ranked in `space` (the unit keys) when given, else in the sketches' space
        s = sketches[:, :-1] if space is None else space  # (n, d) (the rest norm left out)
        self.full_space = space is not None
        unit = s / s.norm(dim=1, keepdim=True).clamp_min(1e-12)
        centroids = unit[torch.randperm(s.shape[0], generator=g)[: max(1, s.shape[0] // per_bucket)]].clone()
        for _ in range(iters + 1):
            nearest = torch.cat([(unit[i : i + 65536] @ centroids.T).argmax(1) for i in range(0, s.shape[0], 65536)])
            centroids = torch.zeros_like(centroids).index_add_(0, nearest, unit)
            centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-12)
        buckets: list[torch.Tensor] = []
        for b in torch.unique(nearest):
            rows = (nearest == b).nonzero().squeeze(1)
            if rows.numel() > cap:  # split along the bucket's first principal direction
                centred = s[rows] - s[rows].mean(0)
                direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
                buckets += list(rows[(centred @ direction).argsort()].split(cap))
            else:
                buckets.append(rows)
        self.means = torch.stack([s[rows].mean(0) for rows in buckets])  # (B, d_sketch)
        primary = buckets
        if spill > 1:  # rows near a bucket's border also stored in the next buckets, while those have room
            means_unit = self.means / self.means.norm(dim=1, keepdim=True).clamp_min(1e-12)
            best = [(unit[i : i + 65536] @ means_unit.T).topk(spill + 1, dim=1) for i in range(0, s.shape[0], 65536)]
            scores, ranked = torch.cat([b.values for b in best]), torch.cat([b.indices for b in best])  # (n, spill + 1)
            own = torch.empty(s.shape[0], dtype=torch.long)
            for i, rows in enumerate(buckets):
                own[rows] = i
            own_score = (unit * means_unit[own]).sum(1)  # (n,)
            sizes = [rows.numel() for rows in buckets]
            extra: list[list[int]] = [[] for _ in buckets]
            own_list, own_scores = own.tolist(), own_score.tolist()
            pairs = [(own_scores[r] - sc, r, b) for r, (bs, scs) in enumerate(zip(ranked.tolist(), scores.tolist()))
                     for b, sc in zip(bs, scs) if b != own_list[r]]
            placed = [0] * s.shape[0]
            for _, r, b in sorted(pairs):  # the rows closest to another bucket first
                if placed[r] < spill - 1 and sizes[b] < cap:
                    extra[b].append(r)
                    sizes[b] += 1
                    placed[r] += 1
            buckets = [torch.cat([rows, torch.tensor(more, dtype=torch.long)]) for rows, more in zip(buckets, extra)]
        self.cap = cap
        self.members = torch.full((len(buckets), cap), -1, dtype=torch.long)  # (B, cap), -1 = empty slot
        for i, rows in enumerate(buckets):
            self.members[i, : rows.numel()] = rows
        self.sketches = torch.where((self.members >= 0)[..., None], sketches[self.members.clamp_min(0)], 0.0)  # (B, cap, d+1)
        self.bucket_of = torch.empty(s.shape[0], dtype=torch.long)
        for i, rows in enumerate(primary):
            self.bucket_of[rows] = i


def _unscored(rows: torch.Tensor, probed: torch.Tensor, index: Index) -> torch.Tensor:
    """(T, p * cap) True where a slot must not compete for the shortlist: an empty slot, or a
    spilled copy of a row whose own bucket the token probes too (it is scored there: a second
    copy would take a shortlist place from another row)."""
    T, probes = probed.shape
    slot_bucket = probed.repeat_interleave(index.cap, dim=1)  # (T, p * cap)
    own = index.bucket_of[rows.clamp_min(0)]  # (T, p * cap)
    probed_mask = torch.zeros(T, index.means.shape[0], dtype=torch.bool).scatter_(1, probed, True)
    return (rows < 0) | ((own != slot_bucket) & probed_mask.gather(1, own))


def _probe(x: torch.Tensor, proj: torch.Tensor, index: Index, probes: int):
    """(unit tokens, their [sketch, weighted rest norm] as the op ranks with, (T, p) probed buckets)."""
    unit = x / x.norm(dim=-1, keepdim=True)
    q = unit @ proj  # (T, d_sketch)
    rest = SKETCH_REST_WEIGHT * (1.0 - q.pow(2).sum(-1, keepdim=True)).clamp_min(0.0).sqrt()
    ranked_in = unit if index.full_space else q
    probed = (ranked_in @ index.means.T).topk(min(probes, index.means.shape[0]), dim=-1).indices
    return unit, torch.cat([q, rest], -1), probed


def _decide(unit: torch.Tensor, keys: torch.Tensor, inv: torch.Tensor, index: Index, probed: torch.Tensor,
            scores: torch.Tensor):
    """(fired, row): the best SHORTLIST of the probed slots' `scores` (T, p * cap), rescored exactly."""
    T = unit.shape[0]
    rows = index.members[probed].view(T, -1)
    scores = scores.masked_fill(_unscored(rows, probed, index), float("-inf"))
    top = rows.gather(1, scores.topk(min(SHORTLIST, scores.shape[1]), dim=-1).indices)  # (T, c), -1 = empty
    top = torch.where(top < 0, top[:, :1], top)  # an empty slot repeats the token's first candidate
    best, row = _rescore(unit, keys, inv, top, None, rescore_group(T, keys.shape[1], top.shape[1]))
    return best > GAMMA, row


def ivf_gate(x: torch.Tensor, keys: torch.Tensor, inv: torch.Tensor, proj: torch.Tensor, index: Index, probes: int):
    """(fired, row) of the IVF path for (T, d_key) tokens, each token's candidate sketches
    gathered: static shapes, what a compiled graph needs."""
    unit, q_rest, probed = _probe(x, proj, index, probes)
    cand = index.sketches[probed].view(x.shape[0], -1, index.sketches.shape[-1])  # (T, p * cap, d + 1)
    return _decide(unit, keys, inv, index, probed, torch.bmm(cand, q_rest.unsqueeze(-1)).squeeze(-1))


def ivf_gate_bucket_major(x: torch.Tensor, keys: torch.Tensor, inv: torch.Tensor, proj: torch.Tensor, index: Index,
                          probes: int):
    """`ivf_gate`'s decisions, computed bucket by bucket: one product per probed bucket with the
    tokens that probe it, so each bucket's sketches are read once. Shapes depend on the
    tokens (eager only)."""
    unit, q_rest, probed = _probe(x, proj, index, probes)
    p = probed.shape[1]
    pairs_by_bucket = probed.reshape(-1).argsort()  # (token, slot) pairs, as token * p + slot
    counts = torch.bincount(probed.reshape(-1), minlength=index.means.shape[0]).tolist()
    scores = torch.full((x.shape[0] * p, index.cap), float("-inf"))
    start = 0
    for bucket, n in enumerate(counts):
        if n:
            pairs = pairs_by_bucket[start : start + n]
            scores[pairs] = q_rest[pairs // p] @ index.sketches[bucket].T  # (n, cap)
            start += n
    return _decide(unit, keys, inv, index, probed, scores.view(x.shape[0], -1))


def agreement(fired_a, row_a, fired_b, row_b) -> tuple[float, int]:
    same = (fired_a == fired_b) & (~fired_a | (row_a == row_b))
    return round(float(same.float().mean()) * 100, 3), int((~same).sum())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--keys", type=Path, required=True)
    p.add_argument("--facts", type=int, default=100_000)
    p.add_argument("--per-bucket", type=int, default=128, help="mean keys per k-means bucket")
    p.add_argument("--cap", type=int, default=0, help="bucket capacity (default 2 x per-bucket)")
    p.add_argument("--probes", default="8,16,32")
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--spill", type=int, default=1, help="buckets each key is stored in (its own + the next best)")
    p.add_argument("--centroids", choices=("sketch", "full"), default="sketch",
                   help="cluster and rank in the sketch space or on the full unit keys")
    p.add_argument("--max-tokens", type=int, default=2000)
    p.add_argument("--time", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    data = torch.load(args.keys, weights_only=False)
    keys = table(data, args.facts).float()
    inv = key_inverse_norms(keys)
    proj = fit_sketch(keys, 128)
    sketch = Sketch(proj, sketch_keys(keys, proj, inv), SHORTLIST)
    t0 = time.perf_counter()
    space = keys * inv[:, None] if args.centroids == "full" else None
    index = Index(sketch.keys, args.per_bucket, args.cap or 2 * args.per_bucket, args.iters, g, space, args.spill)
    fit_s = round(time.perf_counter() - t0, 1)
    probes = [int(v) for v in args.probes.split(",")]
    for kind in ("text", "edit", "paraphrase"):
        q = data[kind]
        q = q[torch.randperm(q.shape[0], generator=g)[: args.max_tokens]].float()
        fired, row, _ = decisions(q, keys, None)
        s_fired, s_row, _ = decisions(q, keys, sketch)
        q_unit = q / q.norm(dim=-1, keepdim=True)
        centroid_scores = (q_unit if index.full_space else q_unit @ proj) @ index.means.T  # (tokens, B)
        own = centroid_scores.gather(1, index.bucket_of[row].unsqueeze(1))
        rank = (centroid_scores > own).sum(1)[fired]
        out = {"facts": args.facts, "centroids": args.centroids, "spill": args.spill, "buckets": index.means.shape[0], "cap": index.cap, "fit_s": fit_s,
               "queries": kind, "tokens": q.shape[0], "fired": int(fired.sum()),
               **{f"bucket_rank_{k}": round(float((rank < k).float().mean()), 4) for k in RANKS},
               "agree_sketch_path": agreement(fired, row, s_fired, s_row)}
        for n_probes in probes:
            parts = [ivf_gate(q[s : s + 256], keys, inv, proj, index, n_probes) for s in range(0, q.shape[0], 256)]
            out[f"agree_p{n_probes}"] = agreement(fired, row, torch.cat([f for f, _ in parts]), torch.cat([r for _, r in parts]))
        print(json.dumps(out), flush=True)
    if args.time:
        x = data["text"][:256].float()
        no_res = torch.zeros(keys.shape[0], 1)
        flat = sketch._replace(group=rescore_group(256, keys.shape[1], SHORTLIST))
        ws = torch.empty(shortlist_scores(256, keys.shape[0], 8192, SHORTLIST, keys.shape[1]))
        calls = {"sketch_path": lambda: nkv_gate(x, keys, inv, no_res, torch.tensor(GAMMA), sketch=flat, workspace=ws)}
        for n_probes in probes:
            calls[f"ivf_p{n_probes}"] = lambda n=n_probes: ivf_gate(x, keys, inv, proj, index, n)
            calls[f"ivf_bucket_major_p{n_probes}"] = lambda n=n_probes: ivf_gate_bucket_major(x, keys, inv, proj, index, n)
            gathered, by_bucket = (f(x, keys, inv, proj, index, n_probes) for f in (ivf_gate, ivf_gate_bucket_major))
            if agreement(*gathered, *by_bucket)[1]:
                raise AssertionError(f"the two IVF forms disagree at p = {n_probes}")
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(5):
            for name, call in calls.items():
                t = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t)
        print(json.dumps({"tokens": 256, "facts": args.facts, **{f"{k}_ms": round(sorted(v)[2] * 1000, 1) for k, v in times.items()}}))


if __name__ == "__main__":
    main()
