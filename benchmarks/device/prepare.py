"""Pack what `build_8b.sh` needs into `.device/` for a GPU machine with no network.

    python benchmarks/device/prepare.py [--n 256]

Writes `.device/tokenizer/` (SmolLM2-135M's tokenizer, from the packaged model: the random
Llama-3-8B-config model needs some tokenizer, and its 49,152 ids all lie inside the config's
128,256) and `.device/facts.json` (the first `--n` CounterFact edits of ../shared/data).
`.device/` is git-ignored, so it must be copied to the GPU machine along with the checkout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COUNTERFACT = ROOT.parent / "shared" / "data" / "counterfact-edit.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="CounterFact facts to pack")
    parser.add_argument("--tokenizer-from", default="smollm2-135m", help="what `nkv build --model` takes")
    parser.add_argument("-o", "--out", type=Path, default=ROOT / ".device")
    args = parser.parse_args()

    from nkv.loaders.models import load_model

    args.out.mkdir(exist_ok=True)
    _, tokenizer = load_model(args.tokenizer_from)
    tokenizer.save_pretrained(args.out / "tokenizer")
    facts = json.loads(COUNTERFACT.read_text())[: args.n]
    (args.out / "facts.json").write_text(json.dumps(facts))
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {args.out.relative_to(ROOT)}/: tokenizer and {len(facts)} facts, {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
