"""`nkv eval` on an adapter whose keys carry per-row score scales (bench_int8.py's simulated
1-bit code): the loader's inverse key norms are replaced by those scales, so the gate scores
a token against a key as the code would (an unbiased estimate of the exact cosine).

    python benchmarks/scale/bench_int8.py adapter --keys keys100k.pt --nkv cf1000.nkv --bits 1 --write-coded coded/
    python benchmarks/scale/eval_coded.py coded/cf1000-1.scales.pt eval --model smollm2-135m \\
        --adapter coded/cf1000-1.nkv --data cf1000.json --limit 500 --unrelated ... --json

Everything after the scales file is `nkv`'s own command line. The scales apply only to the
key table they were saved with (checked by value); any other table keeps 1 / ||key||.
Not part of NKV: the format has no 1-bit code (benchmarks/scale/README.md, "Session 16").
"""

from __future__ import annotations

import sys

import torch

import nkv.loaders.transformers as transformers_loader
from nkv.cli.main import main
from nkv.gate import key_inverse_norms


def _patched_inverse_norms(coded_keys: torch.Tensor, scales: torch.Tensor):
    def inverse_norms(keys: torch.Tensor) -> torch.Tensor:
        if keys.shape == coded_keys.shape and torch.equal(keys.float(), coded_keys.float()):
            print("eval_coded: scoring with the code's per-row score scales", file=sys.stderr)
            return scales.to(keys.device)
        return key_inverse_norms(keys)

    return inverse_norms


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    coded, scales = torch.load(sys.argv[1])
    transformers_loader.key_inverse_norms = _patched_inverse_norms(coded, scales)
    sys.argv = ["nkv", *sys.argv[2:]]
    main()
