"""Attaching an n-fact adapter file to SmolLM2-135M's shape end to end, and where the time goes.

    python benchmarks/scale/attach_file.py --facts 1000000 [--threads 2] [--no-sketch-keys]
    python benchmarks/scale/attach_file.py --facts 1000000 --loader vllm [--dtype bfloat16]

Writes (once, into --dir) an adapter of n random fp16 rows at layer 6 of a randomly
initialised model of SmolLM2-135M-Instruct's configuration (the fingerprint must match, the
values do not matter to attaching), with the fitted sketch projection and (spec 2.1) the
keys' sketches stored, then times
`load_nkv_adapter(model, path)` (median of --reps) and the decoding of its fact records
both ways side by side; --top profiles one more attach. Prints JSON lines.

`--loader vllm` times what the vLLM loader does with the file when an engine starts (no
engine is started): read the file and hash it (sha256), check it against the slot, and load
it into a gated module of capacity n whose buffers are in --dtype (`load_hook`'s steps, with a
stand-in for the row-parallel projection).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nkv import BaseModelInfo, Fact, empty_adapter, load_nkv_adapter
from nkv import constants as C
from nkv.gate import DEFAULT_FACT_CHUNK
from nkv.loaders.architectures import model_fingerprint

# SmolLM2-135M-Instruct's shape (the GGUF's config); random weights: attach never runs the model
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
LAYER = 6


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2)).eval()


def write_adapter(m: LlamaForCausalLM, n: int, path: Path, block: int = 100_000, sketch_keys: bool = True) -> None:
    """n random fp16 rows (drawn in float32 blocks, so no float32 copy of the table), sketch
    fitted; the keys' sketches stored (spec 2.1, what the writer does from SKETCH_MIN_FACTS
    rows) unless `sketch_keys` is False, when the loader computes them as before 2.1."""
    base = BaseModelInfo(name="smollm2-shape", architecture="LlamaForCausalLM", model_type="llama", n_layers=30,
                         d_model=576, d_key=1536, fingerprint=model_fingerprint(m, LAYER))
    g = torch.Generator().manual_seed(1)
    keys = torch.cat([torch.randn(min(block, n - s), 1536, generator=g).half() for s in range(0, n, block)])
    residuals = torch.cat([(0.01 * torch.randn(min(block, n - s), 576, generator=g)).half() for s in range(0, n, block)])
    facts = [Fact(id=f"f{i}", subject=f"Subject number {i}", prompt=f"Subject number {i} was born in",
                  target_new=" Paris") for i in range(n)]
    a = empty_adapter(base, layer=LAYER, target_module=f"model.layers.{LAYER}.mlp.down_proj", dtype=torch.float16)
    a = a.add(facts, keys, residuals).with_sketch()
    if not sketch_keys:
        C.SKETCH_MIN_FACTS = n + 1  # this process writes only this file; the loader's threshold is its own
    a.save(path)


class _StandInProjection(torch.nn.Module):
    """Where vLLM's RowParallelLinear would be: the gated module only wraps it."""

    return_bias = False


def attach_vllm(path: Path, dtype: torch.dtype) -> None:
    """The vLLM loader's start-up steps for one engine-wide adapter (load_hook), one rank."""
    from nkv.loaders.vllm.layer import NKVGatedProjection
    from nkv.loaders.vllm.slot import SlotInfo, check_adapter
    from nkv.loaders.vllm.swap import pin_and_read

    start, adapter = pin_and_read(path, strict=True)
    slot = SlotInfo(module=f"model.layers.{LAYER}.mlp.down_proj", layer=LAYER, capacity=adapter.n_facts,
                    model_type="llama", n_layers=30, d_model=576, d_key=1536, fingerprint=adapter.base.fingerprint,
                    tp_rank=0, tp_size=1)
    module = NKVGatedProjection(_StandInProjection(), slot, dtype=dtype, device=torch.device("cpu"),
                                fact_chunk=DEFAULT_FACT_CHUNK, all_reduce=None)
    check_adapter(adapter, module.slot, strict=True)
    module.load(adapter, gamma=start.gamma, source=start.source, revision=start.revision, digest=start.digest)
    assert module.slot.n_facts == adapter.n_facts and module.sketched


def time_decode(path: Path, reps: int) -> None:
    """The facts' decoding, both ways on the same bytes, interleaved: the one-array parse that
    loading takes for records as nkv writes them, and the strict per-line parse it replaced."""
    from safetensors import safe_open

    from nkv.facts import _decode_as_written, _decode_each

    with safe_open(str(path), framework="pt") as fh:
        lines = fh.get_tensor("nkv.facts").numpy().tobytes().decode()[:-1].split("\n")
    times: dict[str, list[float]] = {"one_array": [], "per_line": []}
    for _ in range(reps):
        for name, decode in (("one_array", _decode_as_written), ("per_line", lambda ls: _decode_each(ls, "x"))):
            t0 = time.perf_counter()
            decode(lines)
            times[name].append(time.perf_counter() - t0)
    one, per = (statistics.median(times[k]) for k in ("one_array", "per_line"))
    print(json.dumps({"facts": len(lines), "decode_one_array_s": round(one, 2), "decode_per_line_s": round(per, 2),
                      "speedup": round(per / one, 2)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--facts", type=int, default=1_000_000)
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "nkv-attach")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--top", type=int, default=0, help="profile one more attach and print this many lines")
    p.add_argument("--loader", choices=["transformers", "vllm"], default="transformers")
    p.add_argument("--dtype", default="bfloat16", help="the vLLM module's buffers (--loader vllm)")
    p.add_argument("--no-sketch-keys", action="store_true",
                   help="a file without nkv.sketch.keys (spec 2.1): the loader computes the sketches")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    m = model()
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / f"attach-{args.facts}{'-no-sketch-keys' if args.no_sketch_keys else ''}.nkv"
    if not path.exists():
        t0 = time.perf_counter()
        write_adapter(m, args.facts, path, sketch_keys=not args.no_sketch_keys)
        print(json.dumps({"wrote": path.name, "seconds": round(time.perf_counter() - t0, 1),
                          "bytes_per_fact": round(path.stat().st_size / args.facts)}), flush=True)
    path.read_bytes()  # in the page cache: time the work, not the disk
    if args.loader == "vllm":
        def attach() -> None:
            attach_vllm(path, getattr(torch, args.dtype))
    else:
        def attach() -> None:
            load_nkv_adapter(m, str(path)).detach()
    seconds = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        attach()
        seconds.append(time.perf_counter() - t0)
    print(json.dumps({"facts": args.facts, "loader": args.loader, "sketch_keys_stored": not args.no_sketch_keys,
                      "attach_s": round(statistics.median(seconds), 2),
                      "each_s": [round(s, 2) for s in seconds], "threads": args.threads}), flush=True)
    if args.loader == "transformers":
        time_decode(path, args.reps)
    if args.top:
        prof = cProfile.Profile()
        prof.enable()
        attach()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(args.top)
        print(out.getvalue())


if __name__ == "__main__":
    main()
