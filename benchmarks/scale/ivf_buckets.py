"""Would an IVF index (keys in k-means buckets, each token scoring only the buckets whose
centroids score highest) find the exact gate's row? For every token where the exact gate
fires, the rank of its row's bucket among all centroids; an index probing the top k buckets
finds the row only when that rank is below k.

    python benchmarks/scale/ivf_buckets.py --keys keys.pt --facts 200000 --per-bucket 256

Keys: read_keys.py's real SmolLM2 keys, then synthetic ones matched to them (bench_scale.table).
Spherical k-means on the unit keys (full d_key), trained on a sample, every key assigned.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench_scale import decisions, table
from nkv.gate import key_inverse_norms

PROBES = (1, 4, 16, 64)


def spherical_kmeans(x: torch.Tensor, n_buckets: int, iters: int, g: torch.Generator) -> torch.Tensor:
    """(n_buckets, d) unit centroids of the unit rows of x."""
    centroids = x[torch.randperm(x.shape[0], generator=g)[:n_buckets]].clone()
    for _ in range(iters):
        nearest = (x @ centroids.T).argmax(1)
        centroids = torch.zeros_like(centroids).index_add_(0, nearest, x)
        centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return centroids


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--keys", type=Path, required=True)
    p.add_argument("--facts", type=int, default=200_000)
    p.add_argument("--per-bucket", type=int, default=256, help="mean keys per bucket")
    p.add_argument("--train", type=int, default=32768, help="keys the centroids are fitted on")
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    data = torch.load(args.keys, weights_only=False)
    keys = table(data, args.facts)
    inv = key_inverse_norms(keys)
    unit = torch.cat([keys[s : s + 65536].float() * inv[s : s + 65536, None] for s in range(0, args.facts, 65536)])
    n_buckets = max(1, args.facts // args.per_bucket)
    t0 = time.perf_counter()
    centroids = spherical_kmeans(unit[torch.randperm(args.facts, generator=g)[: args.train]], n_buckets, args.iters, g)
    bucket = torch.cat([(unit[s : s + 32768] @ centroids.T).argmax(1) for s in range(0, args.facts, 32768)])
    fit_s = time.perf_counter() - t0
    pairwise = unit[:2000] @ unit[:2000].T
    off_diagonal = pairwise[~torch.eye(2000, dtype=torch.bool)]
    for kind in ("text", "edit", "paraphrase"):
        q = data[kind]
        q = q[torch.randperm(q.shape[0], generator=g)[: args.max_tokens]].float()
        fired, row, _ = decisions(q, keys, None)
        scores = (q / q.norm(dim=-1, keepdim=True)) @ centroids.T  # (tokens, n_buckets)
        own = scores.gather(1, bucket[row].unsqueeze(1))
        rank = (scores > own).sum(1)[fired]
        print(json.dumps({"facts": args.facts, "buckets": n_buckets, "queries": kind, "fired": int(fired.sum()),
                          **{f"found_in_top_{k}": round(float((rank < k).float().mean()), 4) for k in PROBES},
                          "fit_s": round(fit_s, 1),
                          "mean_pairwise_cos_first_2000_keys": round(float(off_diagonal.mean()), 3)}), flush=True)


if __name__ == "__main__":
    main()
