"""Why the gate costs more on CPU than its bytes predict: the key-score matmul vs vLLM's GEMM.

vLLM's CPU backend runs every linear layer through a prepacked oneDNN GEMM; the gate's
scores `x @ K1.T` go through torch's ordinary bf16 matmul. This times, on one thread
(as vLLM's CPU worker runs), for a decode batch:
  - nkv_gate over K1 (n_facts x d_key),
  - the plain torch matmul x @ K1.T,
  - vLLM's prepacked oneDNN GEMM on the same K1 (what the model's layers get per weight).

    python benchmarks/vllm/gate_matmul.py --facts 10000 --d-key 5632 --tokens 8
"""

from __future__ import annotations

import argparse
import time

import torch

from nkv.gate import key_inverse_norms, nkv_gate


def best_ms(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--facts", type=int, default=10000)
    p.add_argument("--d-key", type=int, default=5632)
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    keys = torch.randn(args.facts, args.d_key).bfloat16()  # (n_facts, d_key)
    residuals = torch.randn(args.facts, args.d_model).bfloat16()
    inv, gamma = key_inverse_norms(keys), torch.tensor(0.65)
    x = torch.randn(args.tokens, args.d_key).bfloat16()  # (T, d_key)
    rows = {
        "nkv_gate (torch matmul inside)": best_ms(lambda: nkv_gate(x, keys, inv, residuals, gamma)),
        "torch x @ K1.T": best_ms(lambda: x @ keys.T),
    }
    try:
        from vllm import _custom_ops as ops

        handler = ops.create_onednn_mm(keys.t(), 32)  # what vLLM does to each linear layer's weight
        rows["vLLM prepacked oneDNN GEMM on K1"] = best_ms(lambda: ops.onednn_mm(handler, x, None))
    except Exception as exc:  # not a vLLM CPU build
        rows[f"vLLM oneDNN GEMM unavailable ({type(exc).__name__})"] = float("nan")
    for name, ms in rows.items():
        print(f"{name:40s} {ms:8.2f} ms")


if __name__ == "__main__":
    main()
