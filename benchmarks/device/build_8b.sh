#!/usr/bin/env bash
# Issue 11's GPU figures in one run: facts/s, mean updates and peak GPU memory of `nkv build`
# on a randomly initialised Llama-3-8B-config model in bf16, today's default against the
# previous build, interleaved (benchmarks/build/bench_build.py). Run from the repository root
# on a machine with torch, transformers, safetensors and click but no network, after
# `python benchmarks/device/prepare.py` here has packed `.device/`:
#
#     bash benchmarks/device/build_8b.sh            # results in $OUT (default benchmarks/device/out)
#
# Settings by environment: N (facts, 256), MODES ("default,previous"), DEVICE (cuda), DTYPE
# (bfloat16), MODEL (benchmarks/device/llama-3-8b), CHUNK (64, also the batch size).
set -euo pipefail
OUT=${OUT:-benchmarks/device/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# nkv itself, from this checkout, with no dependencies fetched (the machine has them, or has none to fetch)
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . 2>&1 | tail -n 3
python3 -c "import torch, nkv; print('torch', torch.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmarks/build/bench_build.py --model "${MODEL:-benchmarks/device/llama-3-8b}" --random \
    --tokenizer .device/tokenizer --data .device/facts.json --n "${N:-256}" \
    --chunk "${CHUNK:-64}" --batch-size "${CHUNK:-64}" --modes "${MODES:-default,previous}" \
    --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" --no-eval > "$OUT/build-8b.json"
python3 - "$OUT/build-8b.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
for mode, r in report["modes"].items():
    print(f"{mode}: {r['facts_per_s']:.3f} facts/s, 10,000 facts in {10_000 / r['facts_per_s'] / 60:.0f} min, "
          f"mean updates {r['mean_updates']}, peak GPU {r['peak_gpu_mb']} MB")
print({k: v for k, v in report.items() if k.startswith("speedup")})
PY
