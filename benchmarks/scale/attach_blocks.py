"""Attach work on one thread: the key norms and sketches as `nkv.gate` computes them now
(4,096-row float32 blocks, `vector_norm`, sketches reusing the norms) against the way it
did before (64k-row blocks, `pow(2).sum()`, norms computed again for the sketches),
interleaved in one run on random keys.

    python benchmarks/scale/attach_blocks.py --facts 200000 --d-key 1536
"""

from __future__ import annotations

import argparse
import time

import torch

from nkv.gate import fit_sketch, key_inverse_norms, sketch_keys


def previous_norms(keys: torch.Tensor) -> torch.Tensor:
    norms = torch.cat([keys[s : s + 65536].float().pow(2).sum(-1).sqrt() for s in range(0, keys.shape[0], 65536)])
    return torch.where(norms > 0, 1.0 / norms.clamp_min(1e-30), torch.zeros_like(norms))


def previous_sketches(keys: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    return torch.cat([keys[s : s + 65536].float() * previous_norms(keys[s : s + 65536]).unsqueeze(-1) @ proj
                      for s in range(0, keys.shape[0], 65536)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--facts", type=int, default=200_000)
    p.add_argument("--d-key", type=int, default=1536)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    for dtype in (torch.float32, torch.float16):
        keys = torch.randn(args.facts, args.d_key, generator=torch.Generator().manual_seed(0)).to(dtype)
        proj = fit_sketch(keys[:16384], 128)
        for _ in range(args.reps):
            t = time.perf_counter(); previous_norms(keys); a = time.perf_counter() - t
            t = time.perf_counter(); inv = key_inverse_norms(keys); b = time.perf_counter() - t
            t = time.perf_counter(); previous_sketches(keys, proj); c = time.perf_counter() - t
            t = time.perf_counter(); sketch_keys(keys, proj, inv); d = time.perf_counter() - t
            print(f"{str(dtype):14} norms: before {a:.2f} s, now {b:.2f} s; norms + sketches: before {a + c:.2f} s, "
                  f"now {b + d:.2f} s")


if __name__ == "__main__":
    main()
